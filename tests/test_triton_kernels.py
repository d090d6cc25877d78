"""Triton kernels (yoda_sparse.kernels) and the "triton" backend vs the float64 reference.

Without a GPU the kernels run on CPU tensors in Triton's interpreter, which must be switched
on before the kernel modules are imported: this module sets TRITON_INTERPRET=1 first thing.
If another test module imported them earlier in this process (compiled, unusable on CPU),
every test here is skipped except one that reruns this file in a fresh interpreter process.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    _ALREADY_COMPILED = False
    if "yoda_sparse.kernels.masked_l1" in sys.modules or "yoda_sparse.kernels.yoda_step" in sys.modules:
        from yoda_sparse.kernels import masked_l1 as _m, yoda_step as _y

        _ALREADY_COMPILED = not (_m.interpreted() and _y.interpreted())
    if not _ALREADY_COMPILED:
        os.environ["TRITON_INTERPRET"] = "1"
else:
    _ALREADY_COMPILED = False

import subprocess  # noqa: E402
import textwrap  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

import yoda_sparse.ops as ops  # noqa: E402
from yoda_sparse.kernels import masked_l1 as kl1  # noqa: E402
from yoda_sparse.kernels import yoda_step as kys  # noqa: E402
from yoda_sparse.ops import reference, triton_backend  # noqa: E402
from yoda_sparse.schedule import NoiseSchedule  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
SHAPES = [(1, 1, 5, 7), (3, 3, 9, 13), (2, 64, 4, 6), (8, 3, 3, 5)]
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=4e-3, rtol=4e-3), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}

in_this_process = pytest.mark.skipif(_ALREADY_COMPILED, reason="kernels were imported compiled before TRITON_INTERPRET=1 was set; see test_rerun_in_fresh_process")


@pytest.mark.skipif(not _ALREADY_COMPILED, reason="this process runs the tests itself")
def test_rerun_in_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def _gen(*key):
    """A generator seeded from the test's parameters (stable across processes, unlike hash())."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _randn(shape, g, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def _mask(shape, g, kind="bool", p=0.5):
    B, _, H, W = shape
    u = torch.rand((B, 1, H, W), generator=g, dtype=torch.float64)
    if kind == "bool":
        return (u < p).to(DEVICE)
    if kind == "empty":
        return torch.zeros((B, 1, H, W), dtype=torch.bool, device=DEVICE)
    if kind == "full":
        return torch.ones((B, 1, H, W), dtype=torch.bool, device=DEVICE)
    return torch.where(u < p, u, torch.zeros_like(u)).to(torch.float32).to(DEVICE)  # float weights with zeros


def _d(x):
    return None if x is None else x.detach().to(torch.float64)


# ---------------------------------------------------------------------------------- masked L1
@in_this_process
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", ["all", "active", "sum"])
@pytest.mark.parametrize("mask_kind", ["bool", "float", "empty", "full"])
def test_masked_l1_forward_matches_reference(shape, dtype, normalize, mask_kind):
    g = _gen(shape, normalize, mask_kind)
    pred, target = _randn(shape, g, dtype), _randn(shape, g, dtype)
    mask = _mask(shape, g, mask_kind)
    loss, denom = kl1.masked_l1_forward(pred, target, mask, normalize)
    want = reference.masked_l1_loss(_d(pred), _d(target), mask, normalize)
    assert loss.dtype == dtype and loss.shape == () and denom.dtype == torch.float32
    torch.testing.assert_close(loss.to(torch.float64), want, **TOL[dtype])
    torch.testing.assert_close(denom.to(torch.float64), reference.masked_l1_denominator(pred, mask, normalize), rtol=1e-7, atol=0)
    if mask_kind == "empty" and normalize != "all":
        assert loss.item() == 0.0


def _layouts(shape, g, dtype, layout):
    """pred, target in one of several memory layouts (values drawn the same way)."""
    B, C, H, W = shape
    if layout == "contiguous":
        return _randn(shape, g, dtype), _randn(shape, g, dtype)
    if layout == "channels_last":
        return tuple(_randn(shape, g, dtype).to(memory_format=torch.channels_last) for _ in range(2))
    if layout == "sliced":  # H stride doubled (copied) and a channel slice (read in place)
        a = _randn((B, C, 2 * H, W), g, dtype)[:, :, ::2]
        b = _randn((B, C + 2, H, W), g, dtype)[:, 1:-1]
        return a, b
    if layout == "transposed":  # H and W don't merge: copied
        return _randn((B, C, W, H), g, dtype).transpose(2, 3), _randn(shape, g, dtype).to(memory_format=torch.channels_last)
    if layout == "expanded":  # batch-broadcast target (stride 0)
        return _randn(shape, g, dtype), _randn((1, C, H, W), g, dtype).expand(B, C, H, W)
    raise AssertionError(layout)


LAYOUTS = ["contiguous", "channels_last", "sliced", "transposed", "expanded"]


@in_this_process
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mask_layout", ["contiguous", "channels_last", "sliced"])
def test_masked_l1_strided_inputs(layout, mask_layout):
    shape = (2, 3, 6, 10)
    g = _gen(7)
    pred, target = _layouts(shape, g, torch.float32, layout)
    mask = _mask(shape, g, "float")
    if mask_layout == "channels_last":
        mask = mask.to(memory_format=torch.channels_last)
    elif mask_layout == "sliced":
        mask = _mask((2, 1, 6, 20), g, "bool")[..., ::2]
    for normalize in ("all", "active"):
        loss, _ = kl1.masked_l1_forward(pred, target, mask, normalize)
        torch.testing.assert_close(loss.double(), reference.masked_l1_loss(_d(pred), _d(target), mask, normalize), **TOL[torch.float32])
    gp, gt = kl1.masked_l1_backward(torch.tensor(1.5, device=DEVICE), pred, target, mask, torch.tensor(7.0, device=DEVICE))
    sign = torch.sign(_d(pred) - _d(target))
    want = 1.5 * sign * _d(mask.to(torch.float32)) / 7.0
    torch.testing.assert_close(gp.double(), want, **TOL[torch.float32])
    torch.testing.assert_close(gt.double(), -want, **TOL[torch.float32])
    assert gp.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


@in_this_process
@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", ["all", "active", "sum"])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_masked_l1_gradients_match_reference_autograd(shape, dtype, normalize, mask_kind):
    g = _gen(shape, normalize, mask_kind, 1)
    pred, target = _randn(shape, g, dtype), _randn(shape, g, dtype)
    target[..., 0] = pred[..., 0]  # sign(0) = 0
    mask = _mask(shape, g, mask_kind)
    p, t = pred.clone().requires_grad_(), target.clone().requires_grad_()
    loss = ops.masked_l1_loss(p, t, mask, normalize, backend="triton")
    (loss * 0.75).backward()
    p64, t64 = _d(pred).requires_grad_(), _d(target).requires_grad_()
    (reference.masked_l1_loss(p64, t64, mask, normalize) * 0.75).backward()
    torch.testing.assert_close(loss.double(), reference.masked_l1_loss(_d(pred), _d(target), mask, normalize), **TOL[dtype])
    torch.testing.assert_close(p.grad.double(), p64.grad, **TOL[dtype])
    torch.testing.assert_close(t.grad.double(), t64.grad, **TOL[dtype])


@in_this_process
def test_masked_l1_grad_only_for_pred_and_nan_semantics():
    shape = (2, 3, 5, 7)
    g = _gen(3)
    pred, target = _randn(shape, g), _randn(shape, g)
    mask = _mask(shape, g)
    p = pred.clone().requires_grad_()
    loss = ops.masked_l1_loss(p, target, mask, "active", backend="triton")
    loss.backward()
    p64 = _d(pred).requires_grad_()
    reference.masked_l1_loss(p64, _d(target), mask, "active").backward()
    torch.testing.assert_close(p.grad.double(), p64.grad, **TOL[torch.float32])
    # A NaN anywhere makes the loss NaN (as the dense reference); its gradient is 0 (sign(NaN) = 0).
    pred[0, 0, 0, 0] = float("nan")
    p = pred.clone().requires_grad_()
    loss = ops.masked_l1_loss(p, target, mask, "all", backend="triton")
    assert torch.isnan(loss)
    loss.backward()
    assert p.grad[0, 0, 0, 0] == 0 and torch.isfinite(p.grad).all()


@in_this_process
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's 0/0 for "all"
def test_masked_l1_is_reproducible_and_handles_empty_tensors():
    shape = (4, 3, 33, 65)
    g = _gen(5)
    pred, target, mask = _randn(shape, g), _randn(shape, g), _mask(shape, g, "float")
    a = kl1.masked_l1_forward(pred, target, mask, "active")[0]
    b = kl1.masked_l1_forward(pred, target, mask, "active")[0]
    assert torch.equal(a, b)
    z = torch.empty((0, 3, 4, 4), device=DEVICE)
    zm = torch.empty((0, 1, 4, 4), dtype=torch.bool, device=DEVICE)
    for normalize in ("all", "active", "sum"):
        got = kl1.masked_l1_forward(z, z, zm, normalize)[0]
        want = reference.masked_l1_loss(z, z, zm, normalize)
        torch.testing.assert_close(got, want, equal_nan=True)


# ---------------------------------------------------------------------------------- YODA step
SCHEDULE = NoiseSchedule.linear(100, 1e-4, 0.05)


def _step_inputs(shape, g, dtype, with_xbar, with_lr_noise, mask_kind="bool"):
    z, eps = _randn(shape, g, dtype, 2.0), _randn(shape, g, dtype, 2.0)  # wide enough for clipping to bite
    x_bar = _randn(shape, g, dtype) if with_xbar else None
    noise = _randn(shape, g, dtype)
    lr_noise = _randn(shape, g, dtype) if with_lr_noise else None
    return z, eps, x_bar, _mask(shape, g, mask_kind), noise, lr_noise


def _step_reference(z, eps, x_bar, mask, noise, lr_noise, coeffs, clip_x0, clip_range=(-1.0, 1.0)):
    return reference.yoda_step_from_coefficients(
        _d(z), _d(eps), _d(x_bar), mask, _d(noise), _d(noise if lr_noise is None else lr_noise),
        clip_x0=clip_x0, clip_range=clip_range, **coeffs,
    )


@in_this_process
@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip_x0", [False, True])
@pytest.mark.parametrize("with_xbar", [False, True])
@pytest.mark.parametrize("with_lr_noise", [False, True])
def test_yoda_step_matches_reference(shape, dtype, clip_x0, with_xbar, with_lr_noise):
    g = _gen(shape, clip_x0, with_xbar, with_lr_noise)
    z, eps, x_bar, mask, noise, lr_noise = _step_inputs(shape, g, dtype, with_xbar, with_lr_noise)
    for t, lr_branch in ((1, "forward"), (37, "literal"), (100, "forward")):
        got = ops.yoda_step(
            z, eps, x_bar, mask, t, SCHEDULE, noise=noise, lr_noise=lr_noise, lr_branch=lr_branch,
            clip_x0=clip_x0, clip_range=(-1.0, 1.0), backend="triton",
        )
        coeffs = ops.step_coefficients(SCHEDULE, t, lr_branch=lr_branch)
        want = _step_reference(z, eps, x_bar, mask, noise, lr_noise, coeffs, clip_x0)
        assert got.dtype == dtype and got.shape == shape
        torch.testing.assert_close(got.double(), want, **TOL[dtype])


@in_this_process
@pytest.mark.parametrize("mask_kind", ["empty", "full"])
def test_yoda_step_empty_and_full_mask(mask_kind):
    shape = (2, 3, 7, 9)
    z, eps, x_bar, mask, noise, lr_noise = _step_inputs(shape, _gen(11), torch.float32, True, True, mask_kind)
    coeffs = ops.step_coefficients(SCHEDULE, 50)
    got = kys.yoda_step(z, eps, x_bar, mask, noise, lr_noise, None, 0, coeffs, True, -1.0, 1.0)
    torch.testing.assert_close(got.double(), _step_reference(z, eps, x_bar, mask, noise, lr_noise, coeffs, True), **TOL[torch.float32])


@in_this_process
@pytest.mark.parametrize("layout", ["channels_last", "mixed", "strided"])
def test_yoda_step_strided_inputs(layout):
    B, C, H, W = shape = (2, 3, 6, 10)
    g = _gen(13)
    z, eps, x_bar, mask, noise, lr_noise = _step_inputs(shape, g, torch.float32, True, True)
    if layout == "channels_last":
        z, eps, x_bar, noise, lr_noise = (t.to(memory_format=torch.channels_last) for t in (z, eps, x_bar, noise, lr_noise))
        mask = mask.to(memory_format=torch.channels_last)
    elif layout == "mixed":
        z = z.to(memory_format=torch.channels_last)
        x_bar = _randn((B, C, W, H), g).transpose(2, 3)
    else:
        z = _randn((B, C, 2 * H, W), g, scale=2.0)[:, :, 1::2]
        eps = _randn((B, C + 1, H, W), g, scale=2.0)[:, 1:]
        noise = _randn((1, C, H, W), g).expand(B, C, H, W)
        mask = _mask((B, 1, H, 2 * W), g)[..., ::2]
    coeffs = ops.step_coefficients(SCHEDULE, 60, lr_branch="literal")
    got = kys.yoda_step(z, eps, x_bar, mask, noise, lr_noise, None, 0, coeffs, True, -0.5, 0.75)
    want = _step_reference(z, eps, x_bar, mask, noise, lr_noise, coeffs, True, (-0.5, 0.75))
    torch.testing.assert_close(got.double(), want, **TOL[torch.float32])
    assert got.is_contiguous(memory_format=torch.channels_last) == (layout in ("channels_last", "mixed"))


@in_this_process
def test_int64_index_path(monkeypatch):
    """The IDX64 variants (taken when an offset passes 2**31) give the same results."""
    shape = (2, 3, 5, 7)
    z, eps, x_bar, mask, noise, _ = _step_inputs(shape, _gen(17), torch.float32, True, False)
    coeffs = ops.step_coefficients(SCHEDULE, 20)
    base_step = kys.yoda_step(z, eps, x_bar, mask, noise, None, None, 0, coeffs, False)
    base_noise = kys.yoda_step(z, eps, x_bar, mask, None, None, 5, 9, coeffs, False)
    base_loss = kl1.masked_l1_forward(z, eps, mask, "active")[0]
    base_grad = kl1.masked_l1_backward(torch.tensor(1.0, device=DEVICE), z, eps, mask, torch.tensor(3.0, device=DEVICE))[0]
    monkeypatch.setattr(kys, "needs_int64", lambda *a: True)
    monkeypatch.setattr(kl1, "needs_int64", lambda *a: True)
    assert torch.equal(kys.yoda_step(z, eps, x_bar, mask, noise, None, None, 0, coeffs, False), base_step)
    assert torch.equal(kys.yoda_step(z, eps, x_bar, mask, None, None, 5, 9, coeffs, False), base_noise)
    assert torch.equal(kl1.masked_l1_forward(z, eps, mask, "active")[0], base_loss)
    assert torch.equal(kl1.masked_l1_backward(torch.tensor(1.0, device=DEVICE), z, eps, mask, torch.tensor(3.0, device=DEVICE))[0], base_grad)


# ---------------------------------------------------------------------------------- in-kernel noise
_NOISE_ONLY = dict(sqrt_recip_ac=0.0, sqrt_recipm1_ac=0.0, coef1=0.0, coef2=0.0, sigma=0.0, lr_scale=0.0, lr_sigma=1.0)


def _kernel_noise(shape, seed, offset, memory_format=torch.contiguous_format):
    """The normals the kernel draws: an all-inactive step with lr_sigma = 1 and no x_bar."""
    B, _, H, W = shape
    z = torch.zeros(shape, device=DEVICE).to(memory_format=memory_format)
    mask = torch.zeros((B, 1, H, W), dtype=torch.bool, device=DEVICE)
    return kys.yoda_step(z, z, None, mask, None, None, seed, offset, _NOISE_ONLY, False)


@in_this_process
def test_in_kernel_noise_statistics():
    n = _kernel_noise((4, 3, 128, 128), seed=2024, offset=0).double()  # 196608 samples
    assert abs(n.mean().item()) < 0.012
    assert abs(n.var().item() - 1.0) < 0.02
    assert abs(((n - n.mean()) ** 3).mean().item()) < 0.05  # symmetric
    assert abs(((n - n.mean()) ** 4).mean().item() - 3.0) < 0.1  # normal kurtosis
    x = n - n.mean()
    for a, b in ((x[..., 1:], x[..., :-1]), (x[:, :, 1:], x[:, :, :-1]), (x[:, 1:], x[:, :-1]), (x[1:], x[:-1])):
        r = (a * b).mean() / x.var()
        assert abs(r.item()) < 0.015, r


@in_this_process
def test_in_kernel_noise_counters():
    shape = (2, 3, 8, 12)
    a = _kernel_noise(shape, 7, 100)
    assert torch.equal(a, _kernel_noise(shape, 7, 100))  # same (seed, offset): identical
    assert not torch.equal(a, _kernel_noise(shape, 7, 101))  # different offset: different
    assert not torch.equal(a, _kernel_noise(shape, 8, 100))  # different seed: different
    # element i uses counter offset + i (logical contiguous order, whatever the layout)
    flat = _kernel_noise(shape, 7, 0).flatten()
    assert torch.equal(a.flatten()[:-100], flat[100:])
    assert torch.equal(_kernel_noise(shape, 7, 100, torch.channels_last), a)
    # 64-bit counters: crossing 2**32 keeps the shift property, large seeds and offsets work
    lo = _kernel_noise(shape, 7, 2**32 - 50).flatten()
    hi = _kernel_noise(shape, 7, 2**32).flatten()
    assert torch.equal(lo[50:], hi[:-50])
    assert not torch.equal(lo[:50], hi[:50])
    big = _kernel_noise(shape, 2**62 + 3, 2**62)
    assert torch.isfinite(big).all() and not torch.equal(big, _kernel_noise(shape, 3, 2**62))


@in_this_process
@pytest.mark.parametrize("dtype", DTYPES)
def test_in_kernel_noise_step_matches_reference_with_that_noise(dtype):
    shape = (2, 3, 9, 13)
    z, eps, x_bar, mask, _, _ = _step_inputs(shape, _gen(19), dtype, True, False)
    noise = _kernel_noise(shape, 99, 1234).to(dtype)
    for t, lr_branch in ((30, "forward"), (80, "literal")):
        got = ops.yoda_step(z, eps, x_bar, mask, t, SCHEDULE, seed=99, offset=1234, lr_branch=lr_branch, clip_x0=True, backend="triton")
        coeffs = ops.step_coefficients(SCHEDULE, t, lr_branch=lr_branch)
        torch.testing.assert_close(got.double(), _step_reference(z, eps, x_bar, mask, noise, None, coeffs, True), **TOL[dtype])


# ---------------------------------------------------------------------------------- registry and torch.library
@in_this_process
def test_registry_selects_triton_and_explains_refusals(monkeypatch):
    shape = (1, 3, 4, 5)
    g = _gen(23)
    x, m = _randn(shape, g), _mask(shape, g)
    assert ops.select("masked_l1_loss", x, x, m, "all", backend="triton").name == "triton"
    b = {b.name: b for b in ops.backends("masked_l1_loss")}["triton"]
    assert b.availability() is None and b.priority == 30
    assert {b.name: b for b in ops.backends("yoda_step")}["triton"].availability() is None
    assert "float64" in b.why_not(x.double(), x.double(), m, "all")
    if DEVICE == "cpu":
        # the interpreter serves CPU tensors only when forced; automatic dispatch passes it by
        assert ops.select("masked_l1_loss", x, x, m, "all").name != "triton"
        assert "only when forced" in b.forced_only(x, x, m, "all")
        assert "bfloat16" in b.why_not(x.bfloat16(), x.bfloat16(), m, "all")
        monkeypatch.delenv("TRITON_INTERPRET")
        assert "CUDA" in b.why_not(x, x, m, "all")
        with pytest.raises(ops.NoBackendError, match="CUDA"):
            ops.masked_l1_loss(x, x, m, backend="triton")


@in_this_process
def test_opcheck_triton_ops():
    shape = (2, 3, 5, 7)
    g = _gen(29)
    p = _randn(shape, g).requires_grad_()
    t = _randn(shape, g).requires_grad_()
    m, mf = _mask(shape, g), _mask(shape, g, "float")
    z, eps, x_bar, _, noise, lr_noise = _step_inputs(shape, g, torch.float32, True, True)
    scalars = (1.1, 0.4, 0.3, 0.6, 0.1, 0.9, 0.2)
    cases = [
        (torch.ops.yoda_sparse.masked_l1_fwd_triton, (p, t, m, "active")),
        (torch.ops.yoda_sparse.masked_l1_fwd_triton, (p, t.detach(), mf, "all")),
        (torch.ops.yoda_sparse.masked_l1_bwd_triton, (torch.tensor(2.0, device=DEVICE), p.detach(), t.detach(), m, torch.tensor(5.0, device=DEVICE), True, False)),
        (torch.ops.yoda_sparse.yoda_step_triton, (z, eps, x_bar, m, noise, lr_noise, None, 0, *scalars, True, -1.0, 1.0)),
        (torch.ops.yoda_sparse.yoda_step_triton, (z, eps, None, m, None, None, 5, 2**40, *scalars, False, -1.0, 1.0)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@in_this_process
def test_eager_fast_path_is_the_triton_op(monkeypatch):
    """Outside torch.compile the public ops call the launchers directly; the triton_ops (the
    path under torch.compile, fake and functional tensors) give the same bits."""
    shape = (2, 3, 9, 13)
    g = _gen(17)
    pred, target, mask = _randn(shape, g), _randn(shape, g), _mask(shape, g, "float")
    z, eps, x_bar, smask, noise, lr_noise = _step_inputs(shape, g, torch.float32, True, True)
    assert triton_backend._runs_eagerly(pred, target, mask)

    def run():
        p, t = pred.clone().requires_grad_(), target.clone().requires_grad_()
        loss = ops.masked_l1_loss(p, t, mask, "active", backend="triton")
        (loss * 0.5).backward()
        with torch.no_grad():
            no_grad = ops.masked_l1_loss(pred, target, mask, "sum", backend="triton")
        steps = [
            ops.yoda_step(z, eps, x_bar, smask, 40, SCHEDULE, noise=noise, lr_noise=lr_noise, clip_x0=True, backend="triton"),
            ops.yoda_step(z, eps, None, smask, 40, SCHEDULE, seed=3, offset=5, backend="triton"),
        ]
        return [loss, p.grad, t.grad, no_grad, *steps], type(loss.grad_fn).__name__

    # The fast path launches with wrap_triton off (no higher-order op per launch), forward and
    # backward (which autograd may run on another thread), as triton_op's eager path does.
    from torch._library.triton import is_wrap_triton_enabled

    wrapping = []

    def spy(launch):
        def launcher(kernel):
            wrapping.append(is_wrap_triton_enabled())
            return launch(kernel)
        return launcher

    monkeypatch.setattr(kl1, "launcher", spy(kl1.launcher))
    monkeypatch.setattr(kys, "launcher", spy(kys.launcher))
    fast, fast_node = run()
    assert wrapping == [False] * 7, wrapping  # loss: 2 forward + 1 backward; no-grad loss: 2; 2 steps
    monkeypatch.undo()
    monkeypatch.setattr(triton_backend, "_runs_eagerly", lambda *tensors: False)
    op, op_node = run()
    assert fast_node == "_MaskedL1EagerBackward" and fast_node != op_node
    for a, b in zip(fast, op):
        assert torch.equal(a, b)

    monkeypatch.undo()
    compiled = torch.compile(lambda p, t, m: ops.masked_l1_loss(p, t, m, "active", backend="triton") * 2,
                             backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(pred, target, mask), 2 * fast[0].detach())


_COMPILE_SCRIPT = textwrap.dedent(
    """
    # Compile every kernel variant for sm_90 (Triton -> PTX -> cubin, no GPU needed) and trace
    # the triton_ops through AOT autograd with dynamic shapes, as torch.compile does on a GPU.
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from yoda_sparse.kernels import masked_l1 as M, yoda_step as Y
    import yoda_sparse.ops  # registers the triton_ops

    target = GPUTarget("cuda", 90, 32)

    def compile_(fn, types, const, warps=4):
        sig = {n: types.get(n, "i32") for n in fn.arg_names}
        for k in const:
            if k.isupper():
                sig[k] = "constexpr"
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=target, options={"num_warps": warps})
        assert "cubin" in k.asm

    for dt in ("fp32", "fp16", "bf16"):
        t = {"pred_ptr": "*" + dt, "target_ptr": "*" + dt, "mask_ptr": "*i1", "loss_part_ptr": "*fp32", "count_part_ptr": "*fp32"}
        compile_(M._masked_l1_partials_kernel, t, {"COUNT_MASK": dt == "fp16", "IDX64": dt == "bf16", "BLOCK_P": 1024, "BLOCK_C": 4}, 8)
        t = {"grad_ptr": "*" + dt, "denom_ptr": "*fp32", "pred_ptr": "*" + dt, "target_ptr": "*" + dt,
             "mask_ptr": "*i1" if dt == "fp16" else "*fp32", "grad_pred_ptr": "*" + dt, "grad_target_ptr": "*" + dt}
        compile_(M._masked_l1_backward_kernel, t, {"WRITE_PRED": True, "WRITE_TARGET": dt != "fp16", "IDX64": dt == "bf16", "BLOCK_P": 64, "BLOCK_C": 64})
        t = {n: "*" + dt for n in ("z_ptr", "eps_ptr", "xbar_ptr", "noise_ptr", "lr_noise_ptr", "out_ptr")}
        t.update(mask_ptr="*i1", seed="i64", offset="i64")  # bool masks go in as they are
        t.update({n: "fp32" for n in ("sqrt_recip_ac", "sqrt_recipm1_ac", "coef1", "coef2", "sigma", "lr_scale", "lr_sigma", "clip_lo", "clip_hi")})
        for has_noise, has_lr in ((False, False), (True, False), (True, True)) if dt == "fp32" else ((True, True),):
            compile_(Y._yoda_step_kernel, t, {"HAS_XBAR": has_lr, "HAS_NOISE": has_noise, "HAS_LR_NOISE": has_lr, "CLIP": has_noise,
                                              "IDX64": dt == "bf16", "BLOCK_P": 1024, "BLOCK_C": 4}, 8)
    t = {"loss_part_ptr": "*fp32", "count_part_ptr": "*fp32", "loss_ptr": "*bf16", "denom_ptr": "*fp32", "fixed_denom": "fp32"}
    for active in (False, True):
        compile_(M._masked_l1_finalize_kernel, t, {"ACTIVE": active, "BLOCK": 1024})

    class _Sm90:  # the trace asks the active driver for its target only
        def get_current_target(self):
            return target

    triton.runtime.driver.set_active(_Sm90())
    from torch._functorch.aot_autograd import aot_module_simplified
    graphs = []

    def backend(gm, example_inputs):
        def keep(g, _):
            graphs.append(g.code)
            return g
        return aot_module_simplified(gm, example_inputs, fw_compiler=keep, bw_compiler=keep)

    x = torch.randn(2, 3, 5, 7, requires_grad=True)
    m = torch.rand(2, 1, 5, 7) > 0.5
    f = torch.compile(lambda p, t, m: torch.ops.yoda_sparse.masked_l1_fwd_triton(p, t, m, "active")[0] * 2, backend=backend, dynamic=True)
    s = torch.compile(lambda z, m: torch.ops.yoda_sparse.yoda_step_triton(
        z, z, None, m, None, None, 3, 4, 1.0, 0.5, 0.3, 0.6, 0.1, 0.9, 0.2, True, -1.0, 1.0), backend=backend)
    for fn, args in ((f, (x, x.detach(), m)), (s, (x.detach(), m))):
        try:
            fn(*args)  # traced fine; running needs a GPU
        except Exception:
            pass
    text = "\\n".join(graphs)
    assert len(graphs) == 3, graphs  # loss forward, loss backward, step
    assert text.count("higher_order.triton_kernel_wrapper_functional(") == 4, text  # 2 forward, 1 backward, 1 step
    # No dtype view of the bool mask in the traced graphs: inductor (torch 2.11) fails to lower
    # view(bool -> uint8) with "torch.bool is not supported by torch.iinfo", on any device.
    assert "view.dtype" not in text, text
    print("ok")
    """
)


@pytest.mark.skipif(_ALREADY_COMPILED, reason="see test_rerun_in_fresh_process")
@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the kernels run compiled (tests/test_cuda_graphs.py covers torch.compile)")
def test_kernels_compile_for_sm90_and_trace_for_torch_compile():
    """What the interpreter can't check: type-correct kernels and graph-traceable launchers."""
    import inspect

    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        pytest.skip("the script drives ASTSource(..., constexprs=), which triton 3.2 lacks")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-3000:] + proc.stderr[-3000:]


_INDUCTOR_SCRIPT = textwrap.dedent(
    """
    # torch.compile (inductor) of each triton_op on CPU tensors, the Triton driver answering
    # for an sm_90 GPU: inductor traces, lowers and schedules the graph as on a GPU and can
    # only fail where it generates code for the device (no Triton backend for 'cpu').
    import torch, triton
    from triton.backends.compiler import GPUTarget
    import yoda_sparse.ops  # registers the triton_ops

    class _Sm90:  # the trace asks the active driver for its target only
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(_Sm90())
    p, t = torch.randn(2, 3, 5, 7), torch.randn(2, 3, 5, 7)
    m = torch.rand(2, 1, 5, 7) > 0.5
    ops = torch.ops.yoda_sparse
    cases = {
        "loss forward": lambda: ops.masked_l1_fwd_triton(p, t, m, "active")[0] * 2,
        "loss backward": lambda: ops.masked_l1_bwd_triton(torch.tensor(2.0), p, t, m, torch.tensor(5.0), True, True)[0] + 1,
        "step": lambda: ops.yoda_step_triton(p, t, p, m, None, None, 3, 4, 1.0, 0.5, 0.3, 0.6, 0.1, 0.9, 0.2, True, -1.0, 1.0) * 2,
    }
    for name, fn in cases.items():
        try:
            torch.compile(fn, fullgraph=True)()
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            if "'_Sm90' object has no attribute" in text:  # an older Triton asks the driver for more
                print("SKIP:", text.splitlines()[1][:200])
                raise SystemExit(0)
            assert "LoweringException" not in text and "backend" in text and "cpu" in text, name + " -> " + text[-3000:]
            print(name, "reached codegen:", text.splitlines()[0][:160])
    print("ok")
    """
)


@pytest.mark.skipif(_ALREADY_COMPILED, reason="see test_rerun_in_fresh_process")
@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU tests/test_cuda_graphs.py runs the compiled ops")
def test_inductor_lowers_the_triton_op_graphs():
    """The H100 run's torch.compile failure for Triton was in inductor's lowering (a dtype view
    of the bool mask; torch 2.11: "torch.bool is not supported by torch.iinfo"). Lowering runs
    without a GPU: this test fails on that, and passes once inductor reaches device codegen."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _INDUCTOR_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode == 0 and proc.stdout.startswith("SKIP:"):
        pytest.skip("the sm_90 stand-in driver is too small for this Triton: " + proc.stdout[5:].strip())
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-3000:] + proc.stderr[-3000:]
