"""yoda_sparse.sampling: the generic sampler drives any noise-prediction callable and is the
loop the library's own samplers run."""
import pytest
import torch
import torch.nn.functional as F

from yoda_sparse import NoiseSchedule
from yoda_sparse.diffusion import ScheduleSettings, YodaSettings, build_diffusion
from yoda_sparse.masking import MaskSchedule
from yoda_sparse.models import build_model, get_model_config
from yoda_sparse.sampling import step_keywords, yoda_sample


def _sr3(**yoda):
    cfg = get_model_config("sr3_tiny")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    return build_diffusion(model, cfg, schedule=ScheduleSettings("linear", 40, 1e-4, 0.05), yoda=YodaSettings(attention="gaussian", **yoda))


def _lr(b=2):
    g = torch.Generator().manual_seed(3)
    return torch.rand(b, 3, 8, 8, generator=g), torch.rand(b, 1, 8, 8, generator=g)


@pytest.mark.parametrize("masked_input", [False, True])
def test_own_module_through_yoda_sample_equals_the_librarys_sampler(masked_input):
    """A user wrapping the SR3 module in a plain function gets exactly diff.sample."""
    diff = _sr3(masked_input=masked_input)
    lr, attn = _lr()
    x_up = F.interpolate(lr * 2 - 1, scale_factor=4, mode="bicubic", align_corners=False)

    def eps_fn(z_t, t, level, cond):
        return diff.model(torch.cat([cond, z_t], dim=1), level)

    for a in (attn, None):
        for noise in (dict(generator=torch.Generator().manual_seed(1)), dict(seed=5, backend="reference")):
            want = diff.sample(lr, a, steps=5, progress=False, **noise)
            noise = dict(noise, generator=torch.Generator().manual_seed(1)) if "generator" in noise else noise
            got = yoda_sample(eps_fn, diff.schedule, x_bar=x_up, cond=x_up, attn=a, lower_bound=0.2, steps=5,
                              masked_input=masked_input, **noise)
            assert torch.equal(((got.sample + 1) / 2).clamp(0, 1), want.images)
            assert torch.equal(got.update_ratio, want.update_ratio) and torch.equal(got.timesteps, want.timesteps)


def test_step_and_mask_reach_a_callable_that_takes_them():
    sched = NoiseSchedule.linear(30, 1e-4, 0.05)
    attn = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    seen = []

    def eps_fn(z_t, t, level, cond, *, step, mask):
        seen.append((step, int(t[0]), float(level[0]), mask.clone(), cond))
        return torch.zeros_like(z_t)

    out = yoda_sample(eps_fn, sched, shape=(1, 3, 16, 16), attn=attn, lower_bound=0.3, steps=6, cond="c",
                      generator=torch.Generator().manual_seed(0))
    run = sched.respace(6)
    masks = MaskSchedule(attn, 30, 0.3, timesteps=run.timesteps.flip(0), size=(16, 16))
    assert [s[0] for s in seen] == list(range(6))
    assert [s[1] for s in seen] == run.timesteps.flip(0).tolist()  # training timesteps, 1-based
    assert [s[2] for s in seen] == pytest.approx(sched.sqrt_alphas_cumprod[run.timesteps.flip(0) - 1].tolist(), rel=1e-6)
    for i, s in enumerate(seen):
        assert s[3].dtype == torch.bool and torch.equal(s[3], masks.mask(i)) and s[4] == "c"
    torch.testing.assert_close(out.active_fraction, masks.active_fraction)
    # dense: an all-True mask; zero-based timesteps on request
    seen.clear()
    yoda_sample(eps_fn, sched, shape=(2, 3, 8, 8), steps=3, timestep_base=0, generator=torch.Generator().manual_seed(0))
    assert all(s[3].all() and s[3].shape == (2, 1, 8, 8) for s in seen)
    assert [s[1] for s in seen] == (run_t := sched.respace(3).timesteps.flip(0) - 1).tolist() and run_t[-1] >= 0


def test_step_keywords_follow_the_signature():
    assert step_keywords(lambda z, t, level, cond: z) == frozenset()
    assert step_keywords(lambda z, t, level, cond, **kw: z) == {"step", "mask"}
    assert step_keywords(lambda z, t, level, cond, mask=None: z) == {"mask"}
    calls = []
    yoda_sample(lambda z, t, level, cond: calls.append(1) or z * 0, NoiseSchedule.cosine(10), shape=(1, 3, 4, 4),
                steps=2, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2


def test_bad_arguments_are_named():
    sched = NoiseSchedule.cosine(10)
    with pytest.raises(ValueError, match="model_fn must return the predicted noise"):
        yoda_sample(lambda z, t, level, cond: z[:, :1], sched, shape=(1, 3, 4, 4), steps=2)
    with pytest.raises(ValueError, match="shape"):
        yoda_sample(lambda z, t, level, cond: z, sched)
    with pytest.raises(TypeError, match="schedule must be a yoda_sparse.NoiseSchedule"):
        yoda_sample(lambda z, t, level, cond: z, "cosine", shape=(1, 3, 4, 4))
    with pytest.raises(TypeError, match="model_fn must be callable"):
        yoda_sample(None, sched, shape=(1, 3, 4, 4))
    with pytest.raises(ValueError, match="attn must have one map per image"):
        yoda_sample(lambda z, t, level, cond: z, sched, shape=(2, 3, 4, 4), attn=torch.rand(3, 1, 4, 4))
    with pytest.raises(ValueError, match="timestep_base"):
        yoda_sample(lambda z, t, level, cond: z, sched, shape=(1, 3, 4, 4), timestep_base=2)
    with pytest.raises(ValueError, match="either generator or seed"):
        yoda_sample(lambda z, t, level, cond: z, sched, shape=(1, 3, 4, 4), seed=1, generator=torch.Generator())
