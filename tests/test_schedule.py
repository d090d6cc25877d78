import math

import pytest
import torch

from yoda_sparse import NoiseSchedule


def test_linear_matches_definition():
    s = NoiseSchedule.linear(500, 1e-6, 1e-2)
    betas = torch.linspace(1e-6, 1e-2, 500, dtype=torch.float64)
    assert torch.equal(s.betas, betas)
    ac = torch.cumprod(1 - betas, 0)
    assert torch.allclose(s.alphas_cumprod, ac, rtol=0, atol=1e-15)
    # posterior quantities from their textbook formulas, element by element
    t = 137
    b, a, acp = betas[t - 1].item(), ac[t - 1].item(), ac[t - 2].item()
    c = s.coefficients(t)
    assert c.posterior_variance == pytest.approx(b * (1 - acp) / (1 - a), rel=1e-12)
    assert c.posterior_mean_coef1 == pytest.approx(b * math.sqrt(acp) / (1 - a), rel=1e-12)
    assert c.posterior_mean_coef2 == pytest.approx((1 - acp) * math.sqrt(1 - b) / (1 - a), rel=1e-12)
    assert c.noise_level == pytest.approx(math.sqrt(a), rel=1e-12)


def test_first_step_has_gamma_prev_one():
    s = NoiseSchedule.linear(10)
    c = s.coefficients(1)
    assert c.alphas_cumprod_prev == 1.0
    assert c.posterior_variance == 0.0
    assert c.sigma("fixed_small") == 0.0 and c.sigma("fixed_large") == 0.0


def test_cosine_is_monotone_and_bounded():
    s = NoiseSchedule.cosine(100)
    assert (s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all()
    assert (s.betas > 0).all() and (s.betas <= 0.999).all()
    assert s.alphas_cumprod[0] > 0.999 and s.alphas_cumprod[-1] < 1e-3


@pytest.mark.parametrize("T,n", [(500, 200), (500, 500), (100, 7), (2000, 100), (10, 1)])
def test_respace_keeps_levels(T, n):
    s = NoiseSchedule.linear(T)
    r = s.respace(n)
    assert len(r) == n and r.timesteps[-1] == T
    assert (r.timesteps[1:] > r.timesteps[:-1]).all()
    assert torch.allclose(r.alphas_cumprod, s.alphas_cumprod[r.timesteps - 1], rtol=1e-12, atol=0)
    assert r.train_steps == T
    # the level each respaced step conditions on is the exact training level
    for k in (1, n // 2 + 1, n):
        assert r.coefficients(k).noise_level == pytest.approx(s.coefficients(int(r.timesteps[k - 1])).noise_level, rel=1e-12)


def test_respace_of_respace_maps_to_training_units():
    s = NoiseSchedule.linear(500)
    r2 = s.respace(200).respace(50)
    assert torch.allclose(r2.alphas_cumprod, s.alphas_cumprod[r2.timesteps - 1], rtol=1e-12)


def test_q_sample():
    s = NoiseSchedule.cosine(50)
    x0, eps = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([1, 25, 50])
    z = s.q_sample(x0, t, eps)
    for b in range(3):
        a = s.alphas_cumprod[t[b] - 1]
        assert torch.allclose(z[b], a.sqrt() * x0[b] + (1 - a).sqrt() * eps[b])


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_bad_steps(bad):
    with pytest.raises(ValueError, match="T"):
        NoiseSchedule.linear(bad)


def test_bad_t_and_betas():
    s = NoiseSchedule.linear(10)
    with pytest.raises(ValueError, match="t must be in"):
        s.coefficients(11)
    with pytest.raises(ValueError, match="t must be in"):
        s.coefficients(0)
    with pytest.raises(TypeError, match="t must be an integer"):
        s.coefficients(2.5)
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule([0.1, 1.2])
    with pytest.raises(ValueError, match="n must be"):
        s.respace(11)
