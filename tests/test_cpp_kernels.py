"""The C++ CPU kernels (backend "cpp") against the float64 reference.

Skipped as a whole, with the reason, when the extension can neither be imported nor built.
The CUDA kernels ("cuda_ext") share these tests' reference checks on a GPU machine
(benchmarks/gpu_check.sh); here only their registration is visible.
"""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from yoda_sparse import NoiseSchedule, ops
from yoda_sparse.ops import cpp_backend, reference

SCHEDULE = NoiseSchedule.linear(100, 1e-4, 2e-2)
TOL = {  # (rtol, atol) vs the float64 reference of the same (rounded) inputs
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
LAYOUTS = ("contiguous", "channels_last", "transposed", "sliced")


@pytest.fixture(scope="module", autouse=True)
def _extension():
    reason = cpp_backend.ensure_loaded()
    if reason is not None:
        pytest.skip(f"C++ extension unavailable: {reason}")


# ------------------------------------------------------------------------------ helpers
def image(shape, dtype, layout="contiguous", device="cpu"):
    """A [B,C,H,W] random tensor in one of several memory layouts (same values)."""
    B, C, H, W = shape
    if layout == "transposed":  # w-stride H: the strided path
        return torch.randn(B, C, W, H).to(device, dtype).transpose(2, 3)
    if layout == "sliced":  # non-contiguous in C and W (w-stride 2)
        return torch.randn(B, C + 2, H, 2 * W).to(device, dtype)[:, 1 : C + 1, :, ::2]
    x = torch.randn(B, C, H, W).to(device, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def make_mask(shape, kind, dtype=torch.float32, fill=None):
    B, _, H, W = shape
    u = torch.rand(B, 1, H, W)
    if fill is not None:
        u = torch.full_like(u, 1.0 if fill else 0.0)
        return u.bool() if kind == "bool" else u.to(dtype)
    if kind == "bool":
        return u > 0.4
    return torch.where(u > 0.3, u, torch.zeros_like(u)).to(dtype)  # weights in [0,1] with zeros


def assert_close(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def loss_vs_reference(shape, dtype, layout, mask_kind, normalize, mask_dtype=None, fill=None):
    pred = image(shape, dtype, layout).requires_grad_()
    target = image(shape, dtype, layout).requires_grad_()
    mask = make_mask(shape, mask_kind, mask_dtype or dtype, fill=fill)
    loss = ops.masked_l1_loss(pred, target, mask, normalize, backend="cpp")
    assert loss.dtype == dtype and loss.dim() == 0
    gp, gt = torch.autograd.grad(loss * 1.5, (pred, target))
    p64 = pred.detach().double().requires_grad_()
    t64 = target.detach().double().requires_grad_()
    m64 = mask if mask.dtype == torch.bool else mask.to(dtype).double()  # the reference rounds it to pred's dtype
    ref = reference.masked_l1_loss(p64, t64, m64, normalize)
    rp, rt = torch.autograd.grad(ref * 1.5, (p64, t64))
    assert_close(loss, ref, dtype)
    assert gp.shape == pred.shape and gp.dtype == dtype
    assert_close(gp, rp, dtype)
    assert_close(gt, rt, dtype)
    return loss, gp


def step_vs_reference(shape, dtype, layout, *, t=40, lr_branch="forward", clip=False, with_x_bar=True,
                      lr_noise=False, fill=None):
    z, eps = image(shape, dtype, layout), image(shape, dtype, layout)
    x_bar = image(shape, dtype, layout) if with_x_bar else None
    noise = image(shape, dtype, layout)
    lr = image(shape, dtype, layout) if lr_noise else None
    mask = make_mask(shape, "bool", fill=fill)
    kw = dict(noise=noise, lr_noise=lr, lr_branch=lr_branch, clip_x0=clip, clip_range=(-0.8, 0.9))
    out = ops.yoda_step(z, eps, x_bar, mask, t, SCHEDULE, backend="cpp", **kw)
    assert out.shape == z.shape and out.dtype == dtype
    d = lambda x: None if x is None else x.double()  # noqa: E731
    kw.update(noise=noise.double(), lr_noise=d(lr))
    ref = ops.yoda_step(z.double(), eps.double(), d(x_bar), mask, t, SCHEDULE, backend="reference", **kw)
    assert_close(out, ref, dtype)
    return out


# ------------------------------------------------------------------------------ masked L1
@pytest.mark.parametrize("normalize", ["all", "active", "sum"])
@pytest.mark.parametrize(
    "shape,dtype,layout,mask_kind",
    [
        ((1, 1, 7, 13), torch.float32, "contiguous", "bool"),
        ((3, 3, 33, 65), torch.float32, "channels_last", "float"),
        ((2, 64, 7, 13), torch.float32, "transposed", "bool"),
        ((5, 3, 13, 7), torch.float64, "sliced", "float"),
        ((8, 3, 16, 33), torch.float16, "contiguous", "float"),
        ((2, 3, 33, 17), torch.bfloat16, "channels_last", "bool"),
        ((4, 1, 9, 31), torch.float16, "sliced", "bool"),
        ((1, 64, 5, 8), torch.bfloat16, "transposed", "float"),
    ],
)
def test_masked_l1_matches_reference(shape, dtype, layout, mask_kind, normalize):
    loss_vs_reference(shape, dtype, layout, mask_kind, normalize)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_masked_l1_float_mask_of_another_dtype(dtype):
    other = torch.float64 if dtype != torch.float64 else torch.float32
    loss_vs_reference((2, 3, 11, 19), dtype, "contiguous", "float", "active", mask_dtype=other)


@pytest.mark.parametrize("normalize", ["all", "active", "sum"])
@pytest.mark.parametrize("fill", [False, True])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_masked_l1_empty_and_full_mask(normalize, fill, mask_kind):
    loss, gp = loss_vs_reference((2, 3, 9, 14), torch.float32, "contiguous", mask_kind, normalize, fill=fill)
    if not fill:
        assert loss.item() == 0.0 and gp.abs().max().item() == 0.0  # "active" with no pixel: 0, not NaN


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 8), C=st.sampled_from([1, 3, 64]), H=st.integers(1, 40), W=st.integers(1, 70),
    dtype=st.sampled_from([torch.float32, torch.float64]), layout=st.sampled_from(LAYOUTS),
    mask_kind=st.sampled_from(["bool", "float"]), normalize=st.sampled_from(["all", "active", "sum"]),
)
def test_masked_l1_random_shapes(B, C, H, W, dtype, layout, mask_kind, normalize):
    loss_vs_reference((B, C, H, W), dtype, layout, mask_kind, normalize)


def test_masked_l1_grad_layout_follows_pred():
    pred = image((2, 3, 8, 8), torch.float32, "channels_last").requires_grad_()
    target = image((2, 3, 8, 8), torch.float32, "channels_last")
    ops.masked_l1_loss(pred, target, make_mask((2, 3, 8, 8), "bool"), backend="cpp").backward()
    assert pred.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("normalize", ["all", "active", "sum"])
def test_masked_l1_gradcheck(normalize):
    shape = (2, 3, 5, 7)
    pred = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    target = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    mask = make_mask(shape, "float", torch.float64)
    fn = lambda p, t: ops.masked_l1_loss(p, t, mask, normalize, backend="cpp")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (pred, target))


@pytest.mark.parametrize("normalize", ["all", "active", "sum"])
def test_masked_l1_gradgradcheck(normalize):
    """Double backward: the gradient is linear in the incoming grad, constant in pred and target."""
    shape = (2, 3, 5, 7)
    pred = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    target = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    mask = make_mask(shape, "bool")
    fn = lambda p, t: ops.masked_l1_loss(p, t, mask, normalize, backend="cpp")  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (pred, target))
    # the second derivative in grad_out, against the reference
    g = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    (gp,) = torch.autograd.grad(fn(pred, target), pred, g, create_graph=True)
    (gg,) = torch.autograd.grad((gp * target).sum(), g)
    p64, t64 = pred.detach().requires_grad_(), target.detach()
    (rp,) = torch.autograd.grad(reference.masked_l1_loss(p64, t64, mask, normalize), p64)
    torch.testing.assert_close(gg, (rp * target.detach()).sum())


@pytest.mark.parametrize("needs", ["pred", "target", "both", "none"])
def test_masked_l1_grad_of_either_input(needs):
    shape = (3, 2, 9, 11)
    pred = image(shape, torch.float32, "sliced").requires_grad_(needs in ("pred", "both"))
    target = image(shape, torch.float32, "transposed").requires_grad_(needs in ("target", "both"))
    mask = make_mask(shape, "float")
    loss = ops.masked_l1_loss(pred, target, mask, "active", backend="cpp")
    p64 = pred.detach().double().requires_grad_()
    t64 = target.detach().double().requires_grad_()
    ref = reference.masked_l1_loss(p64, t64, mask.double(), "active")
    assert_close(loss, ref, torch.float32)
    if needs == "none":
        assert not loss.requires_grad and loss.grad_fn is None
        return
    assert loss.grad_fn is not None
    inputs = [x for x in (pred, target) if x.requires_grad]
    grads = torch.autograd.grad(loss * 2.0, inputs)
    rp, rt = torch.autograd.grad(ref * 2.0, (p64, t64))
    want = [r for r, x in ((rp, pred), (rt, target)) if x.requires_grad]
    for got, exp in zip(grads, want):
        assert_close(got, exp, torch.float32)


def test_masked_l1_inference_mode_and_no_grad():
    """Below autograd (inference_mode) and under no_grad: the forward kernel's loss, no graph."""
    shape = (2, 3, 8, 8)
    pred = image(shape, torch.float32).requires_grad_()
    target, mask = image(shape, torch.float32), make_mask(shape, "bool")
    want = ops.masked_l1_loss(pred, target, mask, "active", backend="cpp").detach()
    with torch.no_grad():
        got = ops.masked_l1_loss(pred, target, mask, "active", backend="cpp")
    assert torch.equal(got, want) and got.grad_fn is None
    with torch.inference_mode():
        got = ops.masked_l1_loss(pred, target, mask, "active", backend="cpp")
    assert torch.equal(got, want)


def test_masked_l1_backward_twice_and_inplace_check():
    shape = (1, 3, 6, 6)
    pred = image(shape, torch.float32).requires_grad_()
    target, mask = image(shape, torch.float32), make_mask(shape, "bool")
    loss = ops.masked_l1_loss(pred, target, mask, "all", backend="cpp")
    loss.backward(retain_graph=True)
    first = pred.grad.clone()
    loss.backward()
    torch.testing.assert_close(pred.grad, 2 * first)
    # the saved inputs are version-checked, as for any autograd formula
    leaf = image(shape, torch.float32).requires_grad_()
    x = leaf * 1.0
    loss = ops.masked_l1_loss(x, target, mask, "all", backend="cpp")
    x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_masked_l1_fused_forward_is_the_two_kernels(dtype, layout, mask_kind):
    """ext_masked_l1_fwd_grad (the CPU autograd's forward for "all" and "sum") = the forward kernel
    and the backward kernel at grad 1, bit for bit and stride for stride."""
    shape = (2, 3, 17, 70)
    pred, target = image(shape, dtype, layout), image(shape, dtype, layout)
    mask = make_mask(shape, mask_kind, dtype)
    for normalize in (0, 2):
        loss, denom, grad = torch.ops.yoda_sparse.ext_masked_l1_fwd_grad(pred, target, mask, normalize)
        loss2, denom2 = torch.ops.yoda_sparse.ext_masked_l1_fwd(pred, target, mask, normalize)
        grad2 = torch.ops.yoda_sparse.ext_masked_l1_bwd(torch.tensor(1.0, dtype=dtype), pred, target, mask, denom2)
        assert torch.equal(loss, loss2) and torch.equal(denom, denom2)
        assert torch.equal(grad, grad2) and grad.stride() == grad2.stride()
    with pytest.raises(RuntimeError, match="normalize must be 0 .all. or 2 .sum."):
        torch.ops.yoda_sparse.ext_masked_l1_fwd_grad(pred, target, mask, 1)


@pytest.mark.parametrize("normalize", ["all", "sum", "active"])
def test_masked_l1_backward_any_incoming_grad(normalize):
    """loss.backward() (grad 1: the forward's gradient is handed over) and other incoming grads
    (the backward kernel) agree with the kernels exactly; no copy of the handed-over gradient."""
    shape = (2, 3, 16, 24)
    pred = image(shape, torch.float32, "channels_last").requires_grad_()
    target, mask = image(shape, torch.float32), make_mask(shape, "bool")
    code = cpp_backend.NORMALIZE_CODES[normalize]
    _, denom = torch.ops.yoda_sparse.ext_masked_l1_fwd(pred.detach(), target, mask, code)
    for g in (1.0, 0.375, -2.0):
        pred.grad = None
        loss = ops.masked_l1_loss(pred, target, mask, normalize, backend="cpp")
        seen = []
        loss.grad_fn.register_hook(lambda grad_inputs, _: seen.append(grad_inputs[0].data_ptr()))
        loss.backward(torch.tensor(g))
        want = torch.ops.yoda_sparse.ext_masked_l1_bwd(torch.tensor(g), pred.detach(), target, mask, denom)
        assert torch.equal(pred.grad, want)
        assert pred.grad.is_contiguous(memory_format=torch.channels_last)
        assert seen == [pred.grad.data_ptr()]  # AccumulateGrad kept our tensor: no copy


def test_masked_l1_deterministic_across_thread_counts():
    shape = (4, 3, 64, 96)
    pred, target = torch.randn(shape), torch.randn(shape)
    mask = make_mask(shape, "float")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.masked_l1_loss(pred, target, mask, "active", backend="cpp")
        torch.set_num_threads(max(2, threads))
        many = ops.masked_l1_loss(pred, target, mask, "active", backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


# ------------------------------------------------------------------------------ YODA step
@pytest.mark.parametrize("lr_branch", ["forward", "literal"])
@pytest.mark.parametrize(
    "shape,dtype,layout,clip,with_x_bar,lr_noise",
    [
        ((1, 1, 7, 13), torch.float32, "contiguous", False, True, False),
        ((3, 3, 33, 65), torch.float32, "channels_last", True, False, True),
        ((2, 64, 7, 13), torch.float32, "transposed", True, True, False),
        ((5, 3, 13, 7), torch.float64, "sliced", False, False, False),
        ((8, 3, 16, 33), torch.float16, "contiguous", True, True, True),
        ((2, 3, 33, 17), torch.bfloat16, "channels_last", False, True, False),
        ((1, 64, 5, 9), torch.bfloat16, "sliced", True, False, True),
        ((4, 1, 9, 31), torch.float16, "transposed", False, True, False),
    ],
)
def test_yoda_step_matches_reference(shape, dtype, layout, clip, with_x_bar, lr_noise, lr_branch):
    out = step_vs_reference(shape, dtype, layout, lr_branch=lr_branch, clip=clip, with_x_bar=with_x_bar,
                            lr_noise=lr_noise)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("t", [1, 2, 100])
@pytest.mark.parametrize("fill", [False, True])
def test_yoda_step_empty_full_mask_and_extreme_steps(t, fill):
    step_vs_reference((2, 3, 9, 14), torch.float32, "contiguous", t=t, clip=True, fill=fill)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 8), C=st.sampled_from([1, 3, 64]), H=st.integers(1, 40), W=st.integers(1, 70),
    dtype=st.sampled_from([torch.float32, torch.float64]), layout=st.sampled_from(LAYOUTS),
    t=st.integers(1, 100), lr_branch=st.sampled_from(["forward", "literal"]), clip=st.booleans(),
    with_x_bar=st.booleans(), lr_noise=st.booleans(),
)
def test_yoda_step_random_shapes(B, C, H, W, dtype, layout, t, lr_branch, clip, with_x_bar, lr_noise):
    step_vs_reference((B, C, H, W), dtype, layout, t=t, lr_branch=lr_branch, clip=clip, with_x_bar=with_x_bar,
                      lr_noise=lr_noise)


def test_yoda_step_float_mask_means_nonzero():
    shape = (2, 3, 6, 10)
    z, eps, noise = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    mask = make_mask(shape, "float")
    params = torch.tensor([1.1, 0.3, 0.5, 0.4, 0.2, 0.9, 0.1, -1.0, 1.0], dtype=torch.float64)
    a = torch.ops.yoda_sparse.ext_yoda_step(z, eps, None, mask, noise, None, 0, 0, params, False)
    b = torch.ops.yoda_sparse.ext_yoda_step(z, eps, None, mask != 0, noise, None, 0, 0, params, False)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------ in-kernel noise
_M32 = 0xFFFFFFFF


def philox4x32_10(ctr, key):
    """Pure-Python Philox4x32-10 (Random123), the check on the C++/CUDA one."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & _M32, p1 & _M32, ((p0 >> 32) ^ c3 ^ k1) & _M32, p0 & _M32
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def python_normal(seed, k):
    """The normal of counter k (csrc/philox.h's mapping), in float64 math."""
    blk, lane = k >> 2, k & 3
    x = philox4x32_10((blk & _M32, blk >> 32, 0, 0), (seed & _M32, seed >> 32))
    a, b = (x[0], x[1]) if lane < 2 else (x[2], x[3])
    radius = math.sqrt(-2.0 * math.log((2 * (a >> 9) + 1) * 2.0**-24))
    theta = ((b >> 22) & 3) * math.pi / 2 + (2 * (b & (2**22 - 1)) + 1 - 2**22) * (math.pi / 2) / 2**23
    return radius * (math.cos(theta) if lane % 2 == 0 else math.sin(theta))


def kernel_noise(shape, seed, offset, layout="contiguous"):
    """The op's in-kernel noise: mask all False, x_bar None, lr_scale 0, lr_sigma 1 -> out = n."""
    z = image(shape, torch.float32, layout)
    params = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    mask = torch.zeros(shape[0], 1, *shape[2:], dtype=torch.bool)
    return torch.ops.yoda_sparse.ext_yoda_step(z, z, None, mask, None, None, seed, offset, params, False)


def test_philox_known_answers():
    assert philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert philox4x32_10((_M32,) * 4, (_M32,) * 2) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert philox4x32_10((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == (
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


@pytest.mark.parametrize("seed,offset", [(0, 0), (1234, 3), (2**40 + 7, 2**33 + 1), (2**63 - 1, 5)])
def test_noise_counter_mapping(seed, offset):
    shape = (1, 2, 3, 7)  # 42 elements: rows cross Philox blocks
    n = kernel_noise(shape, seed, offset).flatten().double()
    expected = torch.tensor([python_normal(seed, offset + i) for i in range(n.numel())], dtype=torch.float64)
    torch.testing.assert_close(n, expected, rtol=0, atol=2e-6)


def test_noise_statistics():
    n = kernel_noise((1, 4, 500, 500), seed=2024, offset=0).double()  # 1e6 samples
    flat = n.flatten()
    assert abs(flat.mean().item()) < 5e-3  # std error 1e-3
    assert abs(flat.var().item() - 1.0) < 7e-3  # std error 1.4e-3
    assert abs((flat.abs() > 1.96).double().mean().item() - 0.05) < 1.5e-3  # a tail, not just 2 moments
    assert abs((flat**4).mean().item() - 3.0) < 0.05  # kurtosis of a normal
    corr = lambda a, b: torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()  # noqa: E731
    assert abs(corr(n[..., 1:], n[..., :-1])) < 5e-3  # horizontal neighbours (same Philox block too)
    assert abs(corr(n[..., 1:, :], n[..., :-1, :])) < 5e-3  # vertical neighbours
    assert abs(corr(n[:, 1:], n[:, :-1])) < 5e-3  # channels
    other = kernel_noise((1, 4, 500, 500), seed=2024, offset=n.numel()).double()  # the next step's stream
    assert abs(corr(n, other)) < 5e-3


def test_noise_determinism_and_offsets():
    shape = (2, 3, 17, 23)
    a = kernel_noise(shape, 7, 100)
    assert torch.equal(a, kernel_noise(shape, 7, 100))  # same (seed, offset): identical
    assert not torch.equal(a, kernel_noise(shape, 8, 100))  # other seed
    b = kernel_noise(shape, 7, 101)
    assert (a != b).float().mean() > 0.99  # other offset: other noise ...
    assert torch.equal(b.flatten()[:-1], a.flatten()[1:])  # ... namely counter offset + i
    # layout and thread count do not change the numbers (counter = logical NCHW index)
    assert torch.equal(a, kernel_noise(shape, 7, 100, "channels_last"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = kernel_noise(shape, 7, 100)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, single)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_noise_through_public_step_recovers_n(dtype):
    """Mask all False, Fig. 2 LR branch: out = lr_scale x_bar + lr_sigma n, so n can be recovered;
    with mask all True the same n drives the posterior sample (one normal per element)."""
    shape, t = (2, 3, 40, 50), 60
    z, eps, x_bar = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    c = ops.step_coefficients(SCHEDULE, t, lr_branch="forward")
    none = torch.zeros(2, 1, 40, 50, dtype=torch.bool)
    kw = dict(seed=11, offset=5, backend="cpp", lr_branch="forward")
    out_lr = ops.yoda_step(z.to(dtype), eps.to(dtype), x_bar.to(dtype), none, t, SCHEDULE, **kw)
    n = (out_lr.double() - c["lr_scale"] * x_bar.to(dtype).double()) / c["lr_sigma"]
    expected = kernel_noise(shape, 11, 5).double()
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(n, expected, rtol=rtol * 4, atol=atol * 4)
    out_sr = ops.yoda_step(z.to(dtype), eps.to(dtype), x_bar.to(dtype), ~none, t, SCHEDULE, **kw)
    ref = ops.yoda_step(z.to(dtype).double(), eps.to(dtype).double(), None, ~none, t, SCHEDULE,
                        noise=expected, backend="reference")
    assert_close(out_sr, ref, dtype)


# ------------------------------------------------------------------------------ torch.library
def _loss_args(requires_grad=True, layout="contiguous", device="cpu"):
    shape = (2, 3, 5, 7)
    pred = image(shape, torch.float32, layout, device).requires_grad_(requires_grad)
    target = image(shape, torch.float32, layout, device).requires_grad_(requires_grad)
    return pred, target, make_mask(shape, "bool").to(device)


def _step_args(noise: bool, layout="contiguous", device="cpu"):
    shape = (2, 3, 5, 7)
    z, eps, x_bar, n = (image(shape, torch.float32, layout, device) for _ in range(4))
    params = torch.tensor([1.1, 0.3, 0.5, 0.4, 0.2, 0.9, 0.1, -1.0, 1.0], dtype=torch.float64)  # stays on the CPU
    mask = make_mask(shape, "bool").to(device)
    if noise:
        return (z, eps, x_bar, mask, n, None, 0, 0, params, True)
    return (z, eps, None, mask, None, None, 3, 9, params, False)


@pytest.mark.parametrize(
    "op,args",
    [
        ("ext_masked_l1_loss", lambda: (*_loss_args(), 0)),
        ("ext_masked_l1_loss", lambda: (*_loss_args(layout="channels_last"), 1)),
        ("ext_masked_l1_loss", lambda: (*_loss_args(layout="sliced"), 2)),
        ("ext_masked_l1_loss", lambda: (*_loss_args(False), 1)),
        ("ext_masked_l1_fwd", lambda: (*_loss_args(), 1)),
        ("ext_masked_l1_fwd", lambda: (*_loss_args(layout="channels_last"), 0)),
        ("ext_masked_l1_fwd_grad", lambda: (*_loss_args(False), 0)),
        ("ext_masked_l1_fwd_grad", lambda: (*_loss_args(False, layout="sliced"), 2)),
        ("ext_masked_l1_bwd", lambda: (torch.tensor(0.5), *_loss_args(False), torch.tensor(7.0))),
        ("ext_yoda_step", lambda: _step_args(noise=True)),
        ("ext_yoda_step", lambda: _step_args(noise=False, layout="channels_last")),
    ],
)
def test_opcheck(op, args):
    torch.library.opcheck(getattr(torch.ops.yoda_sparse, op).default, args())


def test_torch_compile_fullgraph():
    """One small compiled call through the public ops (fake kernels, autograd, SymInt offset)."""
    shape = (2, 3, 5, 7)
    pred, target, mask = _loss_args()
    z, eps, x_bar = (torch.randn(shape) for _ in range(3))

    def fn(pred, target, z, eps, x_bar, mask, offset):
        loss = ops.masked_l1_loss(pred, target, mask, "active", backend="cpp")
        out = ops.yoda_step(z, eps, x_bar, mask, 5, SCHEDULE, seed=1, offset=offset, backend="cpp")
        return loss, out

    compiled = torch.compile(fn, fullgraph=True)
    loss, out = compiled(pred, target, z, eps, x_bar, mask, 0)
    (gp,) = torch.autograd.grad(loss, pred)
    e_loss, e_out = fn(pred, target, z, eps, x_bar, mask, 0)
    (e_gp,) = torch.autograd.grad(e_loss, pred)
    torch.testing.assert_close(loss, e_loss)
    torch.testing.assert_close(gp, e_gp)
    # a NoiseSchedule's step scalars are Python constants in the graph: the same kernel call
    torch.testing.assert_close(out, e_out, rtol=0, atol=0)


def test_torch_compile_as_the_first_call_of_a_process():
    """Backend availability is decided on first use (it may load the extension behind a lock,
    which dynamo cannot trace); a compiled function that is the process's first user of the ops
    must still trace in one graph, forced backend or not."""
    code = textwrap.dedent("""
        import torch
        from yoda_sparse import NoiseSchedule, ops
        sched = NoiseSchedule.linear(100, 1e-4, 2e-2)
        pred = torch.randn(2, 3, 5, 7, requires_grad=True)
        target, z = torch.randn(2, 3, 5, 7), torch.randn(2, 3, 5, 7)
        mask = torch.rand(2, 1, 5, 7) > 0.3
        for backend in (None, "cpp"):
            def fn(pred, target, z, mask):
                loss = ops.masked_l1_loss(pred, target, mask, "active", backend=backend) * 2.0
                return loss, ops.yoda_step(z, z, z, mask, 40, sched, seed=3, clip_x0=True, backend=backend)
            loss, out = torch.compile(fn, fullgraph=True)(pred, target, z, mask)
            e_loss, e_out = fn(pred, target, z, mask)
            torch.testing.assert_close(loss, e_loss)
            torch.testing.assert_close(out, e_out, rtol=1e-6, atol=1e-6)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]


def test_torch_compile_loss_both_grads():
    """The C++ autograd of ext_masked_l1_loss traced by AOTAutograd: both gradients, dynamic shapes."""
    def fn(pred, target, mask):
        return ops.masked_l1_loss(pred, target, mask, "all", backend="cpp") * 3.0

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    for shape in ((2, 3, 5, 7), (1, 3, 9, 4)):
        pred = image(shape, torch.float32, "channels_last").requires_grad_()
        target = image(shape, torch.float32).requires_grad_()
        mask = make_mask(shape, "float")
        got = torch.autograd.grad(compiled(pred, target, mask), (pred, target))
        want = torch.autograd.grad(fn(pred, target, mask), (pred, target))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


# ------------------------------------------------------------------------------ registry and errors
def test_registry_reports_backends():
    described = dict(ops.describe()["yoda_step"])
    assert described["cpp"] == "available"
    if not torch.cuda.is_available():
        assert "CUDA" in described["cuda_ext"]
    z = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    assert ops.select("masked_l1_loss", z, z, z > 0, "all", backend="cpp").name == "cpp"
    reason = ops.registry.backends("masked_l1_loss")[0]
    assert reason.name == "cuda_ext"
    assert "cuda" in reason.unsupported(z, z, z > 0, "all")


def test_unsupported_dtype_has_a_reason():
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float8_e4m3fn)
    cpp = {b.name: b for b in ops.registry.backends("yoda_step")}["cpp"]
    assert "float8" in cpp.unsupported(x, x, None, x.float() > 0, x, None, None, 0, {}, False, (-1.0, 1.0))


@pytest.mark.skipif(importlib.util.find_spec("yoda_sparse._C") is not None, reason="a prebuilt yoda_sparse._C exists")
def test_no_jit_reports_the_reason_once():
    code = textwrap.dedent("""
        import warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            from yoda_sparse import ops
            described = dict(ops.describe()["masked_l1_loss"])
            ops.describe()
        print(described["cpp"])
        print(sum("C++/CUDA ops unavailable" in str(w.message) for w in caught))
    """)
    env = dict(os.environ, YODA_SPARSE_NO_JIT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    reason, warned = out.stdout.strip().splitlines()[-2:]
    assert "YODA_SPARSE_NO_JIT=1" in reason and warned == "1"


def test_op_errors_name_the_argument():
    z = torch.randn(1, 3, 4, 4)
    params = torch.zeros(9, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="mask must have shape"):
        torch.ops.yoda_sparse.ext_masked_l1_fwd(z, z, torch.ones(1, 3, 4, 4, dtype=torch.bool), 0)
    with pytest.raises(RuntimeError, match="normalize"):
        torch.ops.yoda_sparse.ext_masked_l1_fwd(z, z, torch.ones(1, 1, 4, 4, dtype=torch.bool), 3)
    with pytest.raises(RuntimeError, match="params must be"):
        torch.ops.yoda_sparse.ext_yoda_step(z, z, None, z[:, :1] > 0, z, None, 0, 0, params[:7], False)
    with pytest.raises(RuntimeError, match="seed"):
        torch.ops.yoda_sparse.ext_yoda_step(z, z, None, z[:, :1] > 0, None, None, -1, 0, params, False)
    with pytest.raises(RuntimeError, match="lr_noise needs noise"):
        torch.ops.yoda_sparse.ext_yoda_step(z, z, None, z[:, :1] > 0, None, z, 0, 0, params, False)
    with pytest.raises(RuntimeError, match="dtype of z"):
        torch.ops.yoda_sparse.ext_yoda_step(z, z.double(), None, z[:, :1] > 0, z, None, 0, 0, params, False)


# ------------------------------------------------------------------------------ CUDA (GPU machines)
# NCHW-contiguous operands with H*W % 4 == 0 take the planar kernels, the rest the generic ones.
# The planar runs are 8 elements for float16/bfloat16 where H*W % 8 == 0, else 4.
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
# H*W odd (generic) / a multiple of 8 (planar, 8-wide runs in 16 bits) / 4 but not 8 (4-wide)
@pytest.mark.parametrize("shape", [(3, 3, 33, 65), (2, 3, 32, 20), (2, 3, 12, 17)])
def test_cuda_ext_matches_reference(dtype, layout, shape):
    assert dict(ops.describe()["yoda_step"])["cuda_ext"] == "available"
    for normalize in ("all", "active", "sum"):
        pred = image(shape, dtype, layout, "cuda").requires_grad_()
        target = image(shape, dtype, layout, "cuda")
        mask = make_mask(shape, "float", dtype).cuda()
        loss = ops.masked_l1_loss(pred, target, mask, normalize, backend="cuda_ext")
        (gp,) = torch.autograd.grad(loss, pred)
        p64 = pred.detach().double().requires_grad_()
        ref = reference.masked_l1_loss(p64, target.double(), mask.double(), normalize)
        (rp,) = torch.autograd.grad(ref, p64)
        assert_close(loss.cpu(), ref.cpu(), dtype)
        assert_close(gp.cpu(), rp.cpu(), dtype)
        again = ops.masked_l1_loss(pred, target, mask, normalize, backend="cuda_ext")
        assert torch.equal(loss, again)  # deterministic reduction
    z, eps, x_bar, noise = (image(shape, dtype, layout, "cuda") for _ in range(4))
    mask = make_mask(shape, "bool").cuda()
    for clip in (False, True):
        out = ops.yoda_step(z, eps, x_bar, mask, 40, SCHEDULE, noise=noise, clip_x0=clip, backend="cuda_ext")
        ref = ops.yoda_step(z.double(), eps.double(), x_bar.double(), mask, 40, SCHEDULE, noise=noise.double(),
                            clip_x0=clip, backend="reference")
        assert_close(out.cpu(), ref.cpu(), dtype)
        if layout == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
@pytest.mark.parametrize("normalize", ["all", "active", "sum"])
def test_cuda_loss_of_an_empty_batch_is_the_reference(normalize):
    """No pixels: the forward's one loop-free block writes zero partials (before, nothing wrote them
    and the finishing kernel summed whatever the new buffer held)."""
    pred = torch.zeros(0, 3, 8, 8, device="cuda")
    mask = torch.ones(0, 1, 8, 8, dtype=torch.bool, device="cuda")
    got = ops.masked_l1_loss(pred, pred, mask, normalize, backend="cuda_ext")
    want = reference.masked_l1_loss(pred.cpu().double(), pred.cpu().double(), mask.cpu().double(), normalize)
    assert torch.equal(got.cpu().isnan(), want.isnan()) and (want.isnan() or got.item() == want.item())


@pytest.mark.gpu
@pytest.mark.parametrize("seed,offset", [(0, 0), (1234, 3), (2**40 + 7, 2**33 + 1), (5, 2)])
@pytest.mark.parametrize("shape", [(2, 3, 61, 67), (2, 3, 16, 24)])  # generic / planar kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # planar runs of 4 / of 8
def test_cuda_noise_is_bit_identical_to_cpu(seed, offset, shape, dtype):
    # with z = 0 and unit coefficients the output is the float32 normal itself, rounded once to dtype
    cpu = kernel_noise(shape, seed, offset).to(dtype)
    z = torch.zeros(shape, device="cuda", dtype=dtype)
    params = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    mask = torch.zeros(shape[0], 1, *shape[2:], dtype=torch.bool, device="cuda")
    cuda = torch.ops.yoda_sparse.ext_yoda_step(z, z, None, mask, None, None, seed, offset, params, False)
    assert torch.equal(cuda.cpu(), cpu)
    # the active branch draws the same normals: mask all True, sigma 1, every other coefficient 0
    active = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, -1.0, 1.0], dtype=torch.float64)
    cuda = torch.ops.yoda_sparse.ext_yoda_step(z, z, None, ~mask, None, None, seed, offset, active, False)
    assert torch.equal(cuda.cpu(), cpu)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "op,args",
    [
        ("ext_masked_l1_loss", lambda: (*_loss_args(device="cuda"), 1)),
        ("ext_masked_l1_loss", lambda: (*_loss_args(layout="channels_last", device="cuda"), 0)),
        ("ext_masked_l1_fwd", lambda: (*_loss_args(device="cuda"), 1)),
        ("ext_masked_l1_bwd", lambda: (torch.tensor(0.5, device="cuda"), *_loss_args(False, device="cuda"),
                                       torch.tensor(7.0, device="cuda"))),
        ("ext_yoda_step", lambda: _step_args(noise=True, device="cuda")),
        ("ext_yoda_step", lambda: _step_args(noise=False, layout="channels_last", device="cuda")),
    ],
)
def test_opcheck_cuda(op, args):
    torch.library.opcheck(getattr(torch.ops.yoda_sparse, op).default, args())


def test_step_params_are_cached_by_value():
    coeffs = ops.step_coefficients(SCHEDULE, 40)
    a = cpp_backend._step_params(coeffs, (-1.0, 1.0))
    assert a is cpp_backend._step_params(dict(coeffs), (-1.0, 1.0))  # equal values: the same tensor
    want = [coeffs[k] for k in cpp_backend.COEFF_ORDER] + [-1.0, 1.0]
    assert a.dtype == torch.float64 and a.tolist() == want
    assert cpp_backend._step_params(coeffs, (-0.5, 1.0)).tolist() == want[:-2] + [-0.5, 1.0]
