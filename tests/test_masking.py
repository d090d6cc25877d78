import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from yoda_sparse import MaskSchedule, NoiseSchedule, time_mask


def test_eq9_hand_computed():
    # T = 10, l = 0.2: pixel with M = 0.5 is active for t <= 10 * 0.7 = 7
    attn = torch.tensor([[[[0.0, 0.5], [0.8, 1.0]]]])
    T, lb = 10, 0.2
    expected = {
        10: [[0, 0], [1, 1]],  # 0.8+0.2 = 1.0 -> 10 >= 10 ; 1.0+0.2 -> 12
        8: [[0, 0], [1, 1]],
        7: [[0, 1], [1, 1]],
        3: [[0, 1], [1, 1]],
        2: [[1, 1], [1, 1]],  # 10 * 0.2 = 2 >= 2
        0: [[1, 1], [1, 1]],
    }
    for t, e in expected.items():
        m = time_mask(attn, t, T, lb)
        assert m.dtype == torch.bool and m.shape == (1, 1, 2, 2)
        assert m[0, 0].tolist() == [[bool(v) for v in row] for row in e], t


def test_time_mask_resizes_bilinearly():
    attn = torch.rand(2, 1, 7, 5)
    m = time_mask(attn, 100, 500, 0.3, size=(28, 20))
    assert m.shape == (2, 1, 28, 20)


def test_update_ratio_closed_form():
    torch.manual_seed(1)
    attn = torch.rand(3, 1, 16, 16)
    T, lb = 1000, 0.25
    ms = MaskSchedule(attn, T, lb)
    act = T * (attn.double() + lb)
    exact = act.floor().clamp(max=T).mean((1, 2, 3)) / T
    assert torch.allclose(ms.update_ratio, exact, atol=1e-12)
    limit = (attn.double() + lb).clamp(max=1).mean((1, 2, 3))
    assert torch.allclose(ms.update_ratio, limit, atol=2 / T)


def test_active_fraction_matches_masks_and_grows():
    attn = torch.rand(2, 1, 9, 11)
    s = NoiseSchedule.linear(500).respace(40)
    ms = MaskSchedule(attn, 500, 0.1, timesteps=s.timesteps.flip(0))
    masks = ms.masks()
    assert masks.shape == (40, 2, 1, 9, 11)
    frac = masks.double().mean((2, 3, 4))
    assert torch.allclose(ms.active_fraction, frac)
    assert (frac[1:] >= frac[:-1]).all()
    ms.check_monotone()
    for i in (0, 17, 39):
        assert torch.equal(ms.mask(i), masks[i])


def test_active_tiles_cover_active_pixels():
    attn = torch.rand(2, 1, 13, 10)
    ms = MaskSchedule(attn, 100, 0.3)
    tiles = ms.active_tiles((4, 3))  # [S, B, 4, 4]
    assert tiles.shape == (100, 2, math.ceil(13 / 4), math.ceil(10 / 3))
    masks = ms.masks()[:, :, 0]
    for i in (0, 30, 60, 99):
        for b in range(2):
            for ty in range(tiles.shape[2]):
                for tx in range(tiles.shape[3]):
                    block = masks[i, b, ty * 4:(ty + 1) * 4, tx * 3:(tx + 1) * 3]
                    assert bool(tiles[i, b, ty, tx]) == bool(block.any())


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3), h=st.integers(1, 20), w=st.integers(1, 20),
    T=st.integers(1, 300), lb=st.floats(0.01, 0.99),
)
def test_hypothesis_shapes(b, h, w, T, lb):
    attn = torch.rand(b, 1, h, w)
    ms = MaskSchedule(attn, T, lb)
    assert ms.active_fraction.shape == (T, b)
    # every pixel is updated in at least floor(T*l) of the T steps, and never more than T
    assert (ms.update_ratio >= math.floor(T * lb) / T - 1e-12).all() and (ms.update_ratio <= 1).all()
    # the last step (t = 1) updates every pixel whenever T*l >= 1
    if T * lb >= 1:
        assert ms.mask(T - 1).all()
    m0 = time_mask(attn, T, T, lb)
    assert torch.equal(m0, ms.mask(0))


def test_bad_inputs():
    attn = torch.rand(1, 1, 4, 4)
    with pytest.raises(ValueError, match="lower_bound"):
        time_mask(attn, 1, 10, 0.0)
    with pytest.raises(ValueError, match="lower_bound"):
        MaskSchedule(attn, 10, 1.0)
    with pytest.raises(ValueError, match="t must lie"):
        time_mask(attn, 11, 10, 0.5)
    with pytest.raises(ValueError, match="t must lie"):
        time_mask(attn, -1, 10, 0.5)
    nan = attn.clone()
    nan[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="attn contains NaN"):
        time_mask(nan, 1, 10, 0.5)
    with pytest.raises(ValueError, match=r"attn must lie in \[0, 1\]"):
        time_mask(attn * 2, 1, 10, 0.5)
    assert time_mask(attn * 2, 1, 10, 0.5, clamp=True).all()
    with pytest.raises(TypeError, match="attn must be a floating"):
        time_mask((attn * 255).to(torch.uint8), 1, 10, 0.5)
    with pytest.raises(ValueError, match="strictly decreasing"):
        MaskSchedule(attn, 10, 0.5, timesteps=[1, 2, 3])
    with pytest.raises(ValueError, match="shape"):
        time_mask(torch.rand(1, 3, 4, 4), 1, 10, 0.5)
