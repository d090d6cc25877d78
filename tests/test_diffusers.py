"""yoda_sparse.integrations.diffusers: YodaScheduler equals DDPMScheduler on dense runs, keeps
the LR branch where the mask is off, and the super-resolution pipeline runs a UNet2DModel."""
import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from yoda_sparse.integrations.diffusers import YodaScheduler, YodaSuperResolutionPipeline  # noqa: E402
from yoda_sparse.resize import upsample  # noqa: E402


def _unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=6, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()


def _ddpm_reference(unet, config, lr, steps, seed, scale=4):
    """diffusers' own DDPM sampling of the same model, written as its LDM SR pipeline loops."""
    ddpm = DDPMScheduler.from_config(config)
    ddpm.set_timesteps(steps)
    x_up = upsample(lr, scale) * 2 - 1
    g = torch.Generator().manual_seed(seed)
    latents = randn_tensor(x_up.shape, generator=g, dtype=x_up.dtype) * ddpm.init_noise_sigma
    with torch.no_grad():
        for t in ddpm.timesteps:
            eps = unet(torch.cat([latents, x_up], dim=1), t).sample
            latents = ddpm.step(eps, t, latents, generator=g).prev_sample
    return ((latents + 1) / 2).clamp(0, 1)


@pytest.mark.parametrize("config", [
    dict(),
    dict(timestep_spacing="trailing", beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
    dict(timestep_spacing="leading", steps_offset=1, variance_type="fixed_large", prediction_type="sample", clip_sample=False),
    dict(timestep_spacing="linspace", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
])
def test_dense_all_ones_mask_equals_diffusers_ddpm_sampling(config):
    unet = _unet()
    sched = YodaScheduler(num_train_timesteps=100, **config)
    pipe = YodaSuperResolutionPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    lr = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    want = _ddpm_reference(unet, sched.config, lr, steps=5, seed=7)
    ones = torch.ones(2, 1, 4, 4)  # T (1 + l) >= t everywhere: every pixel active at every step
    out = pipe(lr, ones, num_inference_steps=5, generator=torch.Generator().manual_seed(7), output_type="pt")
    torch.testing.assert_close(out.images, want, rtol=0, atol=1e-5)
    assert torch.equal(out.update_ratio, torch.ones(2, dtype=torch.float64))
    dense = pipe(lr, None, num_inference_steps=5, generator=torch.Generator().manual_seed(7), output_type="pt")
    assert torch.equal(dense.images, out.images)


def test_inactive_pixels_follow_the_lr_branch():
    sched = YodaScheduler(num_train_timesteps=100, lower_bound=0.1)
    sched.set_timesteps(10)
    x_bar = torch.rand(1, 3, 8, 8) * 2 - 1
    attn = torch.zeros(1, 1, 8, 8)
    attn[..., :4] = 1.0  # left half always active, right half from t + 1 <= 100 * 0.1 on
    sched.set_attention(attn, x_bar=x_bar)
    z = torch.randn(1, 3, 8, 8)
    t = int(sched.timesteps[0])  # 90
    mask = sched.mask(t, z)
    assert mask[..., :4].all() and not mask[..., 4:].any()
    out = sched.step(torch.randn_like(z), t, z, generator=torch.Generator().manual_seed(3)).prev_sample
    noise = randn_tensor(z.shape, generator=torch.Generator().manual_seed(3))
    prev = int(sched.previous_timestep(t))
    a_prev = float(sched.alphas_cumprod[prev])
    lr_branch = a_prev ** 0.5 * x_bar + (1 - a_prev) ** 0.5 * noise  # Fig. 2: x_bar at the next level
    torch.testing.assert_close(out[..., 4:], lr_branch[..., 4:], rtol=1e-6, atol=1e-6)
    # and the start of a run: prior noise left, x_bar forward-diffused to the first level right
    start = sched.initial_sample(noise)
    a0 = float(sched.alphas_cumprod[t])
    torch.testing.assert_close(start[..., 4:], (a0 ** 0.5 * x_bar + (1 - a0) ** 0.5 * noise)[..., 4:], rtol=1e-6, atol=1e-6)
    assert torch.equal(start[..., :4], noise[..., :4])
    sched.clear_attention()
    assert sched.mask(t, z).all() and torch.equal(sched.initial_sample(noise), noise)


def test_yoda_pipeline_run_masks_and_reports_the_update_ratio():
    unet = _unet()
    pipe = YodaSuperResolutionPipeline(unet=unet, scheduler=YodaScheduler(num_train_timesteps=100, masked_input=True))
    pipe.set_progress_bar_config(disable=True)
    lr = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    attn = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    out = pipe(lr, attn, lower_bound=0.3, num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 16, 16, 3) and np.isfinite(out.images).all()
    assert 0 < float(out.update_ratio[0]) < 1
    from PIL import Image

    pil = Image.fromarray((lr[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    images = pipe(pil, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert images[0].size == (16, 16)


def test_configs_round_trip_with_ddpm(tmp_path):
    ddpm = DDPMScheduler(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")
    yoda = YodaScheduler.from_config(ddpm.config)
    assert torch.equal(yoda.alphas_cumprod, ddpm.alphas_cumprod)
    yoda.set_timesteps(7)
    ddpm.set_timesteps(7)
    assert torch.equal(yoda.timesteps, ddpm.timesteps)
    back = DDPMScheduler.from_config(YodaScheduler(lower_bound=0.4).config)
    assert back.config.num_train_timesteps == 1000
    assert "DDPMScheduler" in [c.__name__ for c in yoda.compatibles]
    x, n = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    ts = torch.tensor([3, 40])
    assert torch.equal(yoda.add_noise(x, n, ts), ddpm.add_noise(x, n, ts))
    YodaScheduler(lower_bound=0.35, lr_branch="literal", num_train_timesteps=20).save_config(tmp_path)
    loaded = YodaScheduler.from_pretrained(tmp_path)
    assert loaded.config.lower_bound == 0.35 and loaded.config.lr_branch == "literal" and len(loaded) == 20


def test_unsupported_settings_and_bad_inputs_are_named():
    with pytest.raises(ValueError, match="thresholding"):
        YodaScheduler(thresholding=True)
    with pytest.raises(ValueError, match="variance_type"):
        YodaScheduler(variance_type="learned_range")
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        YodaScheduler(rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="lower_bound"):
        YodaScheduler(lower_bound=1.5)
    sched = YodaScheduler(num_train_timesteps=100)
    sched.set_timesteps(4)
    z = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="timestep: 5 is not one of"):
        sched.step(z, 5, z)
    with pytest.raises(ValueError, match="attention must lie in"):
        sched.set_attention(torch.full((1, 1, 4, 4), 2.0))
    sched.set_attention(torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="one map per image"):
        sched.mask(int(sched.timesteps[0]), z)
    with pytest.raises(TypeError, match="scheduler: expected a YodaScheduler"):
        YodaSuperResolutionPipeline(unet=_unet(), scheduler=DDPMScheduler())


def test_pipeline_saves_and_loads(tmp_path):
    pipe = YodaSuperResolutionPipeline(unet=_unet(), scheduler=YodaScheduler(lower_bound=0.3, num_train_timesteps=50))
    pipe.save_pretrained(tmp_path)
    loaded = YodaSuperResolutionPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.scheduler, YodaScheduler) and loaded.scheduler.config.lower_bound == 0.3
    a, b = pipe.unet.state_dict(), loaded.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
