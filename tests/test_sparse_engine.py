"""yoda_sparse.sparse.SparseUNet against the dense model: exact where the engine promises it
(all-ones masks, the first step, every tile active, an unchanged input), and the bookkeeping
(fresh caches per input, plans, cost model, bad input)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from yoda_sparse.diffusion import build_diffusion
from yoda_sparse.models import build_model, get_model_config
from yoda_sparse.sparse import CostModel, SparseUNet, UnsupportedLayerError
from yoda_sparse.sparse.plan import level_tile_maps

FAMILIES = ("sr3_tiny", "srdiff_tiny")
H = W = 32


def setup(name, dtype=torch.float64, B=2, seed=0, model=None):
    if model is None:
        torch.manual_seed(seed)
        model = build_model(name).eval().to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(B, 3, H, W, generator=g, dtype=dtype)
    if name.startswith("sr3"):
        x_up = torch.randn(B, 3, H, W, generator=g, dtype=dtype)
        level = torch.rand(B, generator=g, dtype=dtype)
        kw = dict(x_up=x_up, noise_level=level)

        def dense(zz):
            with torch.no_grad():
                return model(torch.cat([x_up, zz], 1), level)
    else:
        cond = model.encode(torch.randn(B, 3, H // 4, W // 4, generator=g, dtype=dtype)).detach()
        t = torch.randint(1, 100, (B,), generator=g)
        kw = dict(t=t, cond=cond)

        def dense(zz):
            with torch.no_grad():
                return model.denoise(zz, t, cond)
    return model, z, kw, dense


def blob_mask(B=2, cy=10, cx=12, r=7):
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    m = (((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r).expand(B, 1, H, W).clone()
    m[1:, :, :, W // 2:] = False  # a different mask per image
    return m


@pytest.mark.parametrize("name", FAMILIES)
def test_all_ones_mask_is_the_dense_model(name):
    model, z, kw, dense = setup(name)
    eng = SparseUNet(model, cost_model=2.0)
    ones = torch.ones(z.shape[0], 1, H, W, dtype=torch.bool)
    for _ in range(2):
        assert torch.equal(eng(z, ones, **kw), dense(z))
    assert all(h["model"] for h in eng.history)


@pytest.mark.parametrize("name", FAMILIES)
def test_first_step_exact_and_sparse_steps_exact_while_the_input_is_unchanged(name):
    model, z, kw, dense = setup(name)
    eng = SparseUNet(model, cost_model=2.0)
    mask = blob_mask(z.shape[0])
    ref = dense(z)
    torch.testing.assert_close(eng(z, mask, **kw), ref, rtol=1e-10, atol=1e-10)  # the dense fill step
    assert all(eng.history[0]["dense"])
    # the same state again: the cache equals what a dense step computes, so the sparse step
    # reproduces the dense values in the active area
    eps = eng(z, mask, **kw)
    assert not any(eng.history[1]["dense"]) and 0 < eng.history[1]["fractions"][0] < 1
    m = mask.expand_as(eps)
    torch.testing.assert_close(eps[m], ref[m], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_tile_active_equals_dense_on_a_changed_input(name):
    model, z, kw, dense = setup(name)
    eng = SparseUNet(model, tile=4, cost_model=2.0)
    mask = torch.zeros(z.shape[0], 1, H, W, dtype=torch.bool)
    mask[:, :, ::4, ::4] = True  # one pixel in every 4x4 tile: all tiles active, not all pixels
    eng(z, mask, **kw)
    z2 = z + 0.3 * torch.randn_like(z)
    eps = eng(z2, mask, **kw)
    assert eng.history[1]["fractions"] == [1.0] * len(eng.history[1]["fractions"])
    assert not any(eng.history[1]["dense"])
    torch.testing.assert_close(eps, dense(z2), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", FAMILIES)
def test_changed_input_drifts_only_a_little_and_halo_reduces_it(name):
    model, z, kw, dense = setup(name)
    mask = blob_mask(z.shape[0])
    z2 = z + 0.2 * torch.randn_like(z)
    ref = dense(z2)
    m = mask.expand_as(ref)
    errs = []
    for halo in (0, 1):
        eng = SparseUNet(model, halo=halo, cost_model=2.0)
        eng(z, mask, **kw)
        errs.append((eng(z2, mask, **kw) - ref)[m].abs().mean().item())
    assert errs[1] < errs[0]
    assert errs[0] < 0.5 * ref.abs().mean().item()


@pytest.mark.parametrize("name", FAMILIES)
def test_a_new_input_starts_a_fresh_cache(name):
    model, z, kw, dense = setup(name)
    eng = SparseUNet(model, cost_model=2.0)
    mask = blob_mask(z.shape[0])
    eng(z, mask, **kw)
    eng(z, mask, **kw)
    _, z_b, kw_b, dense_b = setup(name, seed=7, model=model)
    eps = eng(z_b, mask, **kw_b)  # another image: must not see the first one's cache
    assert all(eng.history[-1]["dense"]) and len(eng.history) == 1
    torch.testing.assert_close(eps, dense_b(z_b), rtol=1e-10, atol=1e-10)
    eng.reset()
    assert eng.cache_bytes == 0


@pytest.mark.parametrize("name", FAMILIES)
def test_frozen_norm_stats_and_refresh_run(name):
    model, z, kw, dense = setup(name, dtype=torch.float32)
    mask = blob_mask(z.shape[0])
    eng = SparseUNet(model, norm_stats="frozen", refresh_every=2, cost_model=2.0)
    for _ in range(3):
        eps = eng(z, mask, **kw)
    # the fill, a sparse step, then a refresh: every level dense again, so with the same state
    # the whole prediction is the model's
    assert [all(h["dense"]) for h in eng.history] == [True, False, True]
    assert [h["refresh"] for h in eng.history] == [False, False, True]
    torch.testing.assert_close(eps, dense(z), rtol=1e-4, atol=1e-4)
    assert eng.summary()["steps"] == 3 and eng.cache_bytes > 0


def test_min_tile_default_per_family_and_device():
    sr3, _, _, _ = setup("sr3_tiny", dtype=torch.float32)
    srdiff, _, _, _ = setup("srdiff_tiny", dtype=torch.float32)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # 1-pixel deep tiles only where the C++ kernel's pixel layout serves them
    assert SparseUNet(sr3).min_tile_for(cpu) == 1 and SparseUNet(sr3).min_tile_for(cuda) == 2
    assert SparseUNet(srdiff).min_tile_for(cpu) == 2
    assert SparseUNet(sr3, min_tile=3).min_tile_for(cpu) == 3
    with pytest.raises(ValueError, match="min_tile"):
        SparseUNet(srdiff, min_tile=1)


def test_sample_with_the_sparse_engine():
    torch.manual_seed(0)
    config = get_model_config("sr3_tiny")
    diff = build_diffusion(build_model(config).eval(), config)
    lr = torch.rand(1, 3, 8, 8)
    ones = torch.ones(1, 1, 32, 32)
    dense = diff.sample(lr, ones, steps=4, generator=torch.Generator().manual_seed(0), progress=False)
    sparse = diff.sample(lr, ones, steps=4, generator=torch.Generator().manual_seed(0), progress=False,
                         engine="sparse", engine_options=dict(cost_model=2.0))
    assert torch.equal(dense.images, sparse.images)  # all-ones masks: the model every step
    attn = torch.zeros(1, 1, 32, 32)
    attn[..., 8:20, 4:16] = 1.0
    res = diff.sample(lr, attn, steps=4, generator=torch.Generator().manual_seed(0), progress=False,
                      engine="sparse", engine_options=dict(cost_model=2.0))
    assert res.extras["engine"] == "sparse" and torch.isfinite(res.images).all()
    assert res.extras["engine_summary"]["steps"] == 4
    auto = diff.sample(lr, None, steps=2, progress=False, engine="auto")
    assert auto.extras["engine"] == "dense"
    with pytest.raises(ValueError, match="engine"):
        diff.sample(lr, attn, steps=2, progress=False, engine="fast")
    with pytest.raises(ValueError, match="engine_options"):
        diff.sample(lr, attn, steps=2, progress=False, engine="dense", engine_options=dict(halo=1))
    # "auto" keeps models too small to pay (this one: ~0.5 GFLOP per step) on the dense engine
    small = diff.sample(lr, attn, steps=2, progress=False, engine="auto")
    assert small.extras["engine"] == "dense"


def test_unsupported_layers_and_bad_input_name_the_argument():
    config = dataclasses.replace(get_model_config("sr3_tiny"), affine_embedding=True)
    model = build_model(config).eval()
    with pytest.raises(UnsupportedLayerError, match=r"down_blocks\.0\.0\.res: .*affine_embedding"):
        SparseUNet(model, cost_model=2.0)
    srdiff = build_model(dataclasses.replace(get_model_config("srdiff_tiny"), norm_groups=8)).eval()
    with pytest.raises(UnsupportedLayerError, match="norm1"):
        SparseUNet(srdiff)
    with pytest.raises(UnsupportedLayerError, match="model"):
        SparseUNet(torch.nn.Conv2d(3, 3, 3))
    model, z, kw, _ = setup("sr3_tiny", dtype=torch.float32)
    eng = SparseUNet(model, cost_model=2.0)
    with pytest.raises(ValueError, match="mask"):
        eng(z, torch.ones(2, 1, H, W - 1, dtype=torch.bool), **kw)
    with pytest.raises(TypeError, match="mask"):
        eng(z, torch.ones(2, 1, H, W), **kw)
    with pytest.raises(ValueError, match="x_up"):
        eng(z, blob_mask(), x_up=torch.randn(1, 3, H, W), noise_level=kw["noise_level"])
    with pytest.raises(ValueError, match="z"):
        eng(torch.randn(2, 3, 30, 30), torch.ones(2, 1, 30, 30, dtype=torch.bool), **kw)
    for bad in (dict(tile=0), dict(halo=-1), dict(norm_stats="exact"), dict(refresh_every=-2), dict(cost_model="x")):
        with pytest.raises((ValueError, TypeError), match=next(iter(bad)).split("_")[0]):
            SparseUNet(model, **bad)


def test_level_tile_maps_pool_and_dilate():
    mask = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    mask[0, 0, 5, 9] = True
    maps = level_tile_maps(mask, 3, 4, 2, 0)
    assert [tuple(m.shape[1:]) for m in maps] == [(4, 4), (4, 4), (2, 2)]
    assert maps[0].nonzero().tolist() == [[0, 1, 2]]
    assert maps[2].nonzero().tolist() == [[0, 0, 1]]
    dil = level_tile_maps(mask, 1, 4, 2, 1)[0]
    assert dil.sum().item() == 9


def test_cost_model_measures_once_and_persists(tmp_path):
    path = tmp_path / "cost.json"
    cm = CostModel(path=path, rounds=1)
    thr = cm.threshold("cpu", torch.float32, 1, 16, (16, 16), 4)
    assert isinstance(thr, float)
    table = json.loads(path.read_text())
    (entry,) = table.values()
    assert {"dense_s", "sparse_full_s", "sparse_half_s", "threshold"} <= set(entry)
    again = CostModel(path=path)
    again.measure = lambda *a, **k: pytest.fail("a cached shape must not be measured again")
    assert again.threshold("cpu", torch.float32, 1, 16, (16, 16), 4) == thr
    path.write_text("{not json")
    assert isinstance(CostModel(path=path, rounds=1).threshold("cpu", torch.float32, 1, 16, (16, 16), 4), float)
    assert CostModel(fixed=0.5).threshold("cpu", torch.float32, 1, 16, (16, 16), 4) == 0.5
