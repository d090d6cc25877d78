"""The GPU backends inside CUDA graphs (GPU machines only; skipped elsewhere).

A sampler can capture its reverse steps (or a trainer its loss) in a CUDA graph to remove
the launch overhead; that only works when the ops never synchronise with the host and read
their inputs from device memory at replay time. Each test captures the public op, replays
it on new data written into the captured input tensors, and compares with an eager call on
the same data: the same kernels run, so the results must be bit-identical.
"""
from __future__ import annotations

import pytest
import torch

from yoda_sparse import NoiseSchedule, ops

pytestmark = pytest.mark.gpu
GPU_BACKENDS = ("cuda_ext", "triton")
SHAPE = (2, 3, 37, 53)  # odd sizes: tails in every dimension
SCHEDULE = NoiseSchedule.linear(100, 1e-4, 2e-2)


def _available(op: str, backend: str) -> None:
    state = dict(ops.describe()[op]).get(backend)
    if state != "available":
        pytest.fail(f"{backend} should be available on a GPU machine, got: {state}")


def _capture(fn):
    """Warm ``fn`` up on a side stream (as torch.cuda.graph requires), then capture it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def _refill(*tensors):
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.randn(t.shape, device=t.device, dtype=t.dtype))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("noise_mode", ["tensor", "seed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [SHAPE, (2, 3, 32, 24)])  # cuda_ext: generic / planar kernel
def test_yoda_step_replays_in_a_cuda_graph(backend, noise_mode, dtype, shape):
    _available("yoda_step", backend)
    z, eps, x_bar, noise = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(4))
    mask = torch.rand(shape[0], 1, *shape[2:], device="cuda") > 0.3
    extra = dict(noise=noise) if noise_mode == "tensor" else dict(seed=11, offset=5)

    def step():
        return ops.yoda_step(z, eps, x_bar, mask, 40, SCHEDULE, clip_x0=True, backend=backend, **extra)

    graph, out = _capture(step)
    for _ in range(2):
        _refill(z, eps, x_bar, noise)
        mask.copy_(torch.rand(mask.shape, device="cuda") > 0.5)
        graph.replay()
        assert torch.equal(out, step())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("normalize", ["all", "active"])
def test_masked_l1_forward_backward_replays_in_a_cuda_graph(backend, normalize):
    _available("masked_l1_loss", backend)
    pred = torch.randn(SHAPE, device="cuda", requires_grad=True)
    target = torch.randn(SHAPE, device="cuda")
    mask = (torch.rand(SHAPE[0], 1, *SHAPE[2:], device="cuda") > 0.3).float()

    def loss_and_grad():
        loss = ops.masked_l1_loss(pred, target, mask, normalize, backend=backend)
        (grad,) = torch.autograd.grad(loss, pred)
        return loss.detach(), grad

    graph, (loss, grad) = _capture(loss_and_grad)
    for _ in range(2):
        _refill(pred, target)
        mask.copy_((torch.rand(mask.shape, device="cuda") > 0.5).float())
        graph.replay()
        eager_loss, eager_grad = loss_and_grad()
        assert torch.equal(loss, eager_loss)
        assert torch.equal(grad, eager_grad)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_ops_under_torch_compile_match_eager(backend):
    """fullgraph torch.compile of a training loss and a reverse step through each GPU backend."""
    _available("yoda_step", backend)
    pred = torch.randn(SHAPE, device="cuda", requires_grad=True)
    target = torch.randn(SHAPE, device="cuda")
    z, eps, x_bar = (torch.randn(SHAPE, device="cuda") for _ in range(3))
    mask = torch.rand(SHAPE[0], 1, *SHAPE[2:], device="cuda") > 0.3

    def loss_fn(pred, target, mask):
        return ops.masked_l1_loss(pred, target, mask, "active", backend=backend) * 2.0

    def step_fn(z, eps, x_bar, mask):
        return ops.yoda_step(z, eps, x_bar, mask, 40, SCHEDULE, seed=3, offset=0, clip_x0=True, backend=backend)

    compiled_loss = torch.compile(loss_fn, fullgraph=True)
    compiled_step = torch.compile(step_fn, fullgraph=True)
    got = compiled_loss(pred, target, mask)
    (got_grad,) = torch.autograd.grad(got, pred)
    want = loss_fn(pred, target, mask)
    (want_grad,) = torch.autograd.grad(want, pred)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-6)
    # the step's scalars are constants in the graph; the tolerance allows for inductor's code
    torch.testing.assert_close(compiled_step(z, eps, x_bar, mask), step_fn(z, eps, x_bar, mask), rtol=1e-5, atol=1e-5)
