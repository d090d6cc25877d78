"""The reference ops against independent float64 computations, and the registry."""
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from yoda_sparse import NoiseSchedule, ops
from yoda_sparse.ops import reference, registry


def _posterior_by_hand(z, eps, x_bar, mask, noise, lr_noise, sched, t, lr_branch, variance, clip):
    """DDPM posterior written from the textbook formulas, independently of the library's
    coefficient arrays: betas -> gammas -> q(z_{t-1} | z_t, x0)."""
    betas = sched.betas.tolist()
    g = 1.0
    gammas = []
    for b in betas:
        g *= 1 - b
        gammas.append(g)
    beta, gam = betas[t - 1], gammas[t - 1]
    gam_prev = gammas[t - 2] if t > 1 else 1.0
    x0 = (z - math.sqrt(1 - gam) * eps) / math.sqrt(gam)
    if clip:
        x0 = x0.clamp(-1, 1)
    mean = (math.sqrt(gam_prev) * beta / (1 - gam)) * x0 + (math.sqrt(1 - beta) * (1 - gam_prev) / (1 - gam)) * z
    var = beta * (1 - gam_prev) / (1 - gam) if variance == "fixed_small" else beta
    if t == 1:
        var = 0.0
    z_sr = mean + math.sqrt(var) * noise
    xb = torch.zeros_like(z) if x_bar is None else x_bar
    if lr_branch == "forward":
        z_lr = math.sqrt(gam_prev) * xb + math.sqrt(1 - gam_prev) * lr_noise
    else:
        z_lr = xb + math.sqrt(var) * lr_noise
    return mask * z_sr + (~mask) * z_lr


@pytest.mark.parametrize("lr_branch", ["forward", "literal"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("t", [1, 2, 57, 100])
def test_yoda_step_matches_float64_posterior(lr_branch, variance, clip, t):
    sched = NoiseSchedule.linear(100, 1e-4, 0.05)
    shape = (2, 3, 5, 7)
    z, eps, xb, n, n2 = (torch.randn(shape, dtype=torch.float64) for _ in range(5))
    mask = torch.rand(2, 1, 5, 7) > 0.4
    out = ops.yoda_step(z, eps, xb, mask, t, sched, noise=n, lr_noise=n2, lr_branch=lr_branch,
                        variance=variance, clip_x0=clip, backend="reference")
    ref = _posterior_by_hand(z, eps, xb, mask, n, n2, sched, t, lr_branch, variance, clip)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_yoda_step_respaced_and_no_xbar():
    sched = NoiseSchedule.cosine(100).respace(13)
    shape = (1, 3, 4, 4)
    z, eps, n = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., :2] = True
    out = ops.yoda_step(z, eps, None, mask, 9, sched, noise=n, backend="reference")
    ref = _posterior_by_hand(z, eps, None, mask, n, n, sched, 9, "forward", "fixed_small", False)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_all_ones_mask_is_plain_ddpm_step():
    sched = NoiseSchedule.linear(50, 1e-4, 0.05)
    z, eps, n = (torch.randn(2, 3, 6, 6, dtype=torch.float64) for _ in range(3))
    ones = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    t = 20
    out = ops.yoda_step(z, eps, torch.randn_like(z), ones, t, sched, noise=n, backend="reference")
    c = sched.coefficients(t)
    ddpm_mean = (z - c.beta / math.sqrt(1 - c.alphas_cumprod) * eps) / math.sqrt(1 - c.beta)
    torch.testing.assert_close(out, ddpm_mean + math.sqrt(c.posterior_variance) * n, rtol=1e-10, atol=1e-10)


def test_generator_and_seed_noise_are_reproducible():
    sched = NoiseSchedule.linear(20)
    z = torch.randn(1, 3, 8, 8)
    mask = torch.rand(1, 1, 8, 8) > 0.5
    a = ops.yoda_step(z, z, z, mask, 10, sched, generator=torch.Generator().manual_seed(3), backend="reference")
    b = ops.yoda_step(z, z, z, mask, 10, sched, generator=torch.Generator().manual_seed(3), backend="reference")
    assert torch.equal(a, b)
    c = ops.yoda_step(z, z, z, mask, 10, sched, seed=5, offset=0, backend="reference")
    d = ops.yoda_step(z, z, z, mask, 10, sched, seed=5, offset=0, backend="reference")
    e = ops.yoda_step(z, z, z, mask, 10, sched, seed=5, offset=192, backend="reference")
    assert torch.equal(c, d) and not torch.equal(c, e)


@pytest.mark.parametrize("normalize", ["all", "active", "sum"])
def test_masked_l1_loss_float64(normalize):
    pred, target = torch.randn(3, 4, 5, 6, dtype=torch.float64), torch.randn(3, 4, 5, 6, dtype=torch.float64)
    mask = torch.rand(3, 1, 5, 6) > 0.3
    loss = ops.masked_l1_loss(pred, target, mask, normalize, backend="reference")
    total = sum(abs(pred[b, c, i, j] - target[b, c, i, j]).item()
                for b in range(3) for c in range(4) for i in range(5) for j in range(6) if mask[b, 0, i, j])
    denom = {"all": pred.numel(), "active": 4 * mask.sum().item(), "sum": 1}[normalize]
    assert loss.item() == pytest.approx(total / denom, rel=1e-12)


def test_masked_l1_loss_gradcheck_and_empty_mask():
    pred = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 1, 4, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p, q: ops.masked_l1_loss(p, q, mask, "active", backend="reference"), (pred, target))
    empty = torch.zeros(2, 1, 4, 5, dtype=torch.bool)
    assert ops.masked_l1_loss(pred, target, empty, "active", backend="reference").item() == 0.0


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 4), c=st.sampled_from([1, 3, 5]), h=st.integers(1, 9), w=st.integers(1, 9), t=st.integers(1, 30))
def test_hypothesis_shapes_noncontiguous(b, c, h, w, t):
    sched = NoiseSchedule.linear(30, 1e-4, 0.05)
    base = torch.randn(b, c, w, h, dtype=torch.float64)
    z = base.transpose(2, 3)  # non-contiguous
    eps, n = torch.randn(b, c, h, w, dtype=torch.float64), torch.randn(b, c, h, w, dtype=torch.float64)
    mask = torch.rand(b, 1, h, w) > 0.5
    out = ops.yoda_step(z, eps, z, mask, t, sched, noise=n, backend="reference")
    ref = _posterior_by_hand(z.contiguous(), eps, z.contiguous(), mask, n, n, sched, t, "forward", "fixed_small", False)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    cl = z.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ops.yoda_step(cl, eps, cl, mask, t, sched, noise=n, backend="reference"), ref, rtol=1e-12, atol=1e-12)


def test_bad_inputs_name_the_argument():
    sched = NoiseSchedule.linear(10)
    z = torch.randn(2, 3, 4, 4)
    m = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="eps_pred must have the shape"):
        ops.yoda_step(z, torch.randn(2, 3, 4, 5), z, m, 1, sched)
    with pytest.raises(TypeError, match="eps_pred must have the dtype"):
        ops.yoda_step(z, z.double(), z, m, 1, sched)
    with pytest.raises(TypeError, match="x_bar must be a floating"):
        ops.yoda_step(z, z, (z * 100).to(torch.uint8), m, 1, sched)
    with pytest.raises(ValueError, match="mask must have shape"):
        ops.yoda_step(z, z, z, torch.ones(2, 3, 4, 4, dtype=torch.bool), 1, sched)
    with pytest.raises(TypeError, match="mask must be bool"):
        ops.yoda_step(z, z, z, m.float(), 1, sched)
    with pytest.raises(ValueError, match="t must be in"):
        ops.yoda_step(z, z, z, m, 11, sched)
    with pytest.raises(ValueError, match="lr_branch"):
        ops.yoda_step(z, z, z, m, 1, sched, lr_branch="paper")
    with pytest.raises(ValueError, match="variance"):
        ops.yoda_step(z, z, z, m, 1, sched, variance="learned")
    with pytest.raises(TypeError, match="z_t must be a floating"):
        ops.yoda_step(z.long(), z, z, m, 1, sched)
    with pytest.raises(ValueError, match="normalize"):
        ops.masked_l1_loss(z, z, m, "mean")
    with pytest.raises(TypeError, match="target must have the dtype"):
        ops.masked_l1_loss(z, z.half(), m)


def test_registry_error_lists_every_backend(monkeypatch):
    op = "test_only_op"
    registry.register_backend(op, "fast", lambda x: x, priority=10, unsupported=lambda x: "needs CUDA tensors")
    registry.register_backend(op, "gone", lambda x: x, priority=5, available=lambda: "extension not built: no compiler")
    registry.register_backend(op, "reference", lambda x: x, priority=0, unsupported=lambda x: "integer input")
    with pytest.raises(registry.NoBackendError) as exc:
        registry.dispatch(op, 1)
    msg = str(exc.value)
    assert "fast: needs CUDA tensors" in msg and "gone: extension not built" in msg and "reference: integer input" in msg
    registry.register_backend(op, "reference", lambda x: x * 2, priority=0)
    assert registry.dispatch(op, 2) == 4
    monkeypatch.setenv(registry.ENV_VAR, f"{op}=fast")
    with pytest.raises(registry.NoBackendError, match="forced backend 'fast'"):
        registry.dispatch(op, 1)
    monkeypatch.setenv(registry.ENV_VAR, "nonexistent")
    with pytest.raises(registry.NoBackendError, match="is not one of"):
        registry.dispatch(op, 1)
    monkeypatch.setenv(registry.ENV_VAR, "other_op=fast")
    assert registry.dispatch(op, 3) == 6
    registry._REGISTRY.pop(op)


def test_registry_selection_cache(monkeypatch):
    """Selections are cached per signature when every consulted backend is cacheable; the
    environment variables the backends name, YODA_SPARSE_BACKEND and re-registration all count."""
    op = "test_cached_op"
    calls = []

    def fast_unsupported(x):
        calls.append(x)
        if os.environ.get("YODA_TEST_FAST") == "off":
            return "switched off"
        return None if x >= 0 else "negative input"

    registry.register_signature(op, lambda x: (x >= 0,))
    try:
        registry.register_backend(op, "fast", lambda x: ("fast", x), priority=10, unsupported=fast_unsupported,
                                  cacheable=True, env=("YODA_TEST_FAST",))
        registry.register_backend(op, "reference", lambda x: ("reference", x), priority=0, cacheable=True)
        monkeypatch.delenv("YODA_TEST_FAST", raising=False)
        assert registry.dispatch(op, 1) == ("fast", 1)
        assert registry.dispatch(op, 2) == ("fast", 2)
        assert calls == [1]  # the second call hit the cache
        assert registry.dispatch(op, -1) == ("reference", -1)
        assert registry.dispatch(op, -2) == ("reference", -2)
        assert calls == [1, -1]
        monkeypatch.setenv("YODA_TEST_FAST", "off")  # a variable the backend reads: a new key
        assert registry.dispatch(op, 3) == ("reference", 3)
        with pytest.raises(registry.NoBackendError, match="switched off"):
            registry.dispatch(op, 3, backend="fast")
        monkeypatch.delenv("YODA_TEST_FAST")
        assert registry.dispatch(op, 4, backend="fast") == ("fast", 4)
        monkeypatch.setenv(registry.ENV_VAR, f"{op}=reference")
        assert registry.dispatch(op, 5) == ("reference", 5)
        monkeypatch.delenv(registry.ENV_VAR)
        # a backend that is not cacheable in front: checked at every call
        n = len(calls)
        registry.register_backend(op, "plain", lambda x: ("plain", x), priority=20, unsupported=lambda x: "never")
        assert registry.dispatch(op, 6) == ("fast", 6)
        assert registry.dispatch(op, 7) == ("fast", 7)
        assert calls[n:] == [6, 7]
        # re-registration clears the cache: a replaced backend is used at once
        registry._REGISTRY[op].pop("plain")
        registry.register_backend(op, "fast", lambda x: ("fast2", x), priority=10, cacheable=True)
        assert registry.dispatch(op, 8) == ("fast2", 8)
    finally:
        registry._REGISTRY.pop(op, None)
        registry._SIGNATURES.pop(op, None)
        registry._CACHE.clear()


def test_public_loss_dispatch_is_cached_and_follows_the_env(monkeypatch):
    z = torch.randn(1, 2, 3, 4)
    m = torch.rand(1, 1, 3, 4) > 0.5
    auto = ops.select("masked_l1_loss", z, z, m, "all")
    assert ops.select("masked_l1_loss", z, z, m, "all") is auto
    assert ops.select("masked_l1_loss", z.double(), z.double(), m, "all").name in {b.name for b in ops.backends("masked_l1_loss")}
    monkeypatch.setenv(registry.ENV_VAR, "masked_l1_loss=reference")
    assert ops.select("masked_l1_loss", z, z, m, "all").name == "reference"
    monkeypatch.delenv(registry.ENV_VAR)
    assert ops.select("masked_l1_loss", z, z, m, "all") is auto


def test_public_step_dispatch_is_cached_per_noise_mode_and_follows_the_env(monkeypatch):
    z = torch.randn(1, 2, 3, 4)
    m = torch.rand(1, 1, 3, 4) > 0.5
    coeffs = ops.step_coefficients(NoiseSchedule.linear(10), 5)
    with_noise = (z, z, z, m, z, None, None, 0, coeffs, False, (-1.0, 1.0))
    seeded = (z, z, z, m, None, None, 7, 0, coeffs, False, (-1.0, 1.0))
    auto = ops.select("yoda_step", *with_noise)
    assert ops.select("yoda_step", *with_noise) is auto
    assert ops.select("yoda_step", *seeded).why_not(*seeded) is None  # its own key, checked afresh
    monkeypatch.setenv(registry.ENV_VAR, "yoda_step=reference")
    assert ops.select("yoda_step", *with_noise).name == "reference"
    monkeypatch.delenv(registry.ENV_VAR)
    assert ops.select("yoda_step", *with_noise) is auto
    # an offset that overflows the 64-bit noise counters is part of the key: the backends that
    # refuse it are not picked from an earlier selection
    huge = (z, z, z, m, None, None, 7, 2**63 - 2, coeffs, False, (-1.0, 1.0))
    chosen = ops.select("yoda_step", *huge)
    assert chosen.why_not(*huge) is None


def test_schedule_coefficients_are_the_tensor_values():
    s = NoiseSchedule.linear(500).respace(200)
    for t in (1, 2, 77, 200):
        c = s.coefficients(t)
        i = t - 1
        assert c.posterior_mean_coef1 == float(s.posterior_mean_coef1[i])
        assert c.sqrt_recipm1_alphas_cumprod == float(s.sqrt_recipm1_alphas_cumprod[i])
        assert c.noise_level == float(s.sqrt_alphas_cumprod[i])
        assert c.beta == float(s.betas[i]) and c.alphas_cumprod_prev == float(s.alphas_cumprod_prev[i])


def test_lr_branch_coefficients_forward_reading():
    scale, std = reference.lr_branch_coefficients("forward", 0.36, 0.1)
    assert scale == pytest.approx(0.6) and std == pytest.approx(0.8)
    assert reference.lr_branch_coefficients("forward", 1.0, 0.0) == (1.0, 0.0)  # t = 1: no noise left
    assert reference.lr_branch_coefficients("literal", 0.36, 0.1) == (1.0, 0.1)
    with pytest.raises(ValueError, match="alphas_cumprod_prev"):
        reference.lr_branch_coefficients("forward", 1.5, 0.1)
