"""Samplers and losses of both families on tiny models."""
import pytest
import torch
import torch.nn.functional as F

from yoda_sparse import ops
from yoda_sparse.diffusion import ScheduleSettings, YodaSettings, build_diffusion
from yoda_sparse.models import build_model, get_model_config


def _make(name, **yoda):
    cfg = get_model_config(name)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    sched = ScheduleSettings("linear", 40, 1e-4, 0.05) if cfg.family == "sr3" else ScheduleSettings("cosine", 40)
    return build_diffusion(model, cfg, schedule=sched, yoda=YodaSettings(attention="gaussian", **yoda)), cfg


def _pair(cfg, b=2, lr_size=8):
    hr = torch.rand(b, 3, lr_size * cfg.scale, lr_size * cfg.scale)
    lr = F.interpolate(hr, scale_factor=1 / cfg.scale, mode="bicubic", antialias=True).clamp(0, 1)
    return hr, lr


@pytest.mark.parametrize("name", ["sr3_tiny", "srdiff_tiny"])
@pytest.mark.parametrize("masked_input", [False, True])
def test_all_ones_mask_equals_dense(name, masked_input):
    diff, cfg = _make(name, masked_input=masked_input)
    _, lr = _pair(cfg)
    ones = torch.full((2, 1, 5, 5), 0.9)  # 0.9 + l >= 1: active at every step
    a = diff.sample(lr, ones, steps=6, generator=torch.Generator().manual_seed(1), progress=False)
    b = diff.sample(lr, None, steps=6, generator=torch.Generator().manual_seed(1), progress=False)
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.update_ratio, torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("name", ["sr3_tiny", "srdiff_tiny"])
def test_seeded_sampling_is_deterministic_and_batched(name):
    diff, cfg = _make(name)
    _, lr = _pair(cfg, b=3)
    attn = torch.rand(3, 1, 8, 8)
    a = diff.sample(lr, attn, steps=5, generator=torch.Generator().manual_seed(7), progress=False)
    b = diff.sample(lr, attn, steps=5, generator=torch.Generator().manual_seed(7), progress=False)
    assert torch.equal(a.images, b.images)
    assert a.images.shape == (3, 3, 8 * cfg.scale, 8 * cfg.scale)  # the whole batch, not one image
    assert a.images.min() >= 0 and a.images.max() <= 1
    assert a.active_fraction.shape == (5, 3)
    assert (a.active_fraction[1:] >= a.active_fraction[:-1]).all()
    assert torch.allclose(a.update_ratio, a.active_fraction.mean(0))


def test_inactive_pixels_follow_the_lr_branch():
    """With an attention map of zeros and a lower bound that keeps the first steps inactive,
    SR3's first step leaves x_bar forward-diffused in the inactive area, exactly as training
    builds it (``_lr_branch_at``)."""
    diff, cfg = _make("sr3_tiny", lower_bound=0.5)
    _, lr = _pair(cfg, b=1)
    sched = diff.schedule
    x_up, x_bar, _ = diff._prepare(lr * 2 - 1)
    noise = torch.randn_like(x_up)
    t = 30  # inactive: 40 * (0 + 0.5) = 20 < 30
    mask = torch.zeros(1, 1, *x_up.shape[-2:], dtype=torch.bool)
    z_next = ops.yoda_step(torch.randn_like(x_up), torch.randn_like(x_up), x_bar, mask, t, sched, noise=noise)
    level_prev = torch.tensor([sched.coefficients(t - 1).noise_level], dtype=torch.float32)
    built = diff._lr_branch_at(x_bar, torch.tensor([t - 1]), noise, level_prev)
    torch.testing.assert_close(z_next, built, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["sr3_tiny", "srdiff_tiny"])
def test_training_loss_dense_and_yoda(name):
    diff, cfg = _make(name)
    diff.model.train()
    hr, lr = _pair(cfg)
    g = torch.Generator().manual_seed(0)
    dense = diff.training_loss(hr, lr, generator=g)
    yoda = diff.training_loss(hr, lr, torch.rand(2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    assert dense.ndim == 0 and yoda.ndim == 0 and torch.isfinite(dense) and torch.isfinite(yoda)
    yoda.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in diff.model.parameters())
    # an attention map of ones with any lower bound activates every pixel: eq. 10 == eq. 8
    ones = torch.ones(2, 1, 8, 8)
    a = diff.training_loss(hr, lr, ones, generator=torch.Generator().manual_seed(3))
    b = diff.training_loss(hr, lr, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)


def test_bad_inputs():
    diff, cfg = _make("sr3_tiny")
    hr, lr = _pair(cfg)
    with pytest.raises(ValueError, match="hr"):
        diff.training_loss(hr[..., :-4], lr)
    with pytest.raises(TypeError, match="lr must be a float"):
        diff.sample((lr * 255).to(torch.uint8), progress=False)
    with pytest.raises(ValueError, match="attn must have one map per image"):
        diff.sample(lr, torch.rand(3, 1, 8, 8), steps=2, progress=False)
    with pytest.raises(ValueError, match="lower_bound"):
        YodaSettings(lower_bound=1.5)
    with pytest.raises(ValueError, match="unknown yoda settings fields"):
        YodaSettings.from_dict({"lower_bound": 0.2, "bogus": 1})


def test_in_kernel_noise_sampling_is_seeded():
    diff, cfg = _make("sr3_tiny")
    _, lr = _pair(cfg)
    attn = torch.rand(2, 1, 8, 8)
    a = diff.sample(lr, attn, steps=4, seed=11, progress=False, backend="reference")
    b = diff.sample(lr, attn, steps=4, seed=11, progress=False, backend="reference")
    c = diff.sample(lr, attn, steps=4, seed=12, progress=False, backend="reference")
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    with pytest.raises(ValueError, match="either generator or seed"):
        diff.sample(lr, attn, steps=2, seed=1, generator=torch.Generator(), progress=False)
