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
from yoda_sparse.sparse.norm import group_stats
from yoda_sparse.sparse.plan import (LevelPlan, level_probes, level_tile_maps, level_tile_sizes, probe_centres,
                                     with_probes)

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
    # "current" statistics: with the state unchanged, the cached map is the dense one (the
    # default "probed" statistics estimate the inactive area's from probe tiles instead)
    eng = SparseUNet(model, cost_model=2.0, norm_stats="current")
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
    # refresh_above=None: every tile's work through the sparse kernels, not a whole step
    eng = SparseUNet(model, tile=4, cost_model=2.0, refresh_above=None)
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


@pytest.mark.parametrize("name", FAMILIES)
def test_summary_work_ratio_counts_full_steps_whole_and_sparse_levels_by_tile_fraction(name):
    model, z, kw, dense = setup(name, dtype=torch.float32)
    eng = SparseUNet(model, refresh_every=3, cost_model=2.0)
    shares = eng.level_flop_shares()
    assert len(shares) == len(model.unet.down_blocks if hasattr(model, "unet") else model.down_blocks)
    assert all(s > 0 for s in shares) and abs(sum(shares) - 1) < 1e-9
    mask = blob_mask(z.shape[0])
    ones = torch.ones_like(mask)
    for m in (mask, mask, mask, mask, ones):  # fill, sparse, sparse, refresh, all ones
        eng(z, m, **kw)
    summ = eng.summary()
    work = summ["step_work"]
    assert [w == pytest.approx(1.0) for w in work] == [True, False, False, True, True]
    h = eng.history[1]
    assert work[1] == pytest.approx(sum(s * f for s, f in zip(shares, h["fractions"])))
    assert 0 < work[1] < 1
    assert summ["work_ratio"] == pytest.approx(sum(work) / 5)
    # the FLOP count behind the shares also gives the dense GFLOP, proportional to the area
    assert eng.dense_gflops(2, 64, 64) == pytest.approx(8 * eng.dense_gflops(1, 32, 32))


def test_a_refresh_drops_the_old_maps_before_recomputing_them():
    model, z, kw, dense = setup("sr3_tiny", dtype=torch.float32)
    eng = SparseUNet(model, refresh_every=2, cost_model=2.0)
    mask = blob_mask(z.shape[0])
    eng(z, mask, **kw)
    eng(z, mask, **kw)
    before = set(eng.maps)
    seen = []

    class Maps(dict):
        def clear(self):
            seen.append(len(self))
            super().clear()

    eng.maps = Maps(eng.maps)
    eng(z, mask, **kw)  # the refresh: every map dropped first, then each computed anew
    assert eng.history[-1]["refresh"] and seen == [len(before)] and set(eng.maps) == before


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


def test_predicted_time_ratio_counts_full_steps_and_sparse_work(monkeypatch):
    from yoda_sparse.masking import MaskSchedule
    from yoda_sparse.sparse.plan import level_tile_maps, level_tile_sizes, sparse_work

    torch.manual_seed(0)
    model = build_model("sr3_tiny").eval()
    attn = torch.zeros(2, 1, H, W)
    attn[0, :, 4:20, 6:18] = 1.0
    attn[1, :, 10:30, 2:12] = 0.7
    masks = MaskSchedule(attn, 100, 0.2, timesteps=torch.arange(100, 0, -10))
    eng = SparseUNet(model, tile=4, refresh_every=4, cost_model=2.0)  # never dense: ratio = work
    shares = eng.level_flop_shares()
    min_tile = eng.min_tile_for(torch.device("cpu"))
    tiles = level_tile_sizes(3, 4, min_tile)
    expected, filled, last_full = [], False, 0
    for i in range(len(masks)):
        m = masks.mask(i)
        if bool(m.all()):
            expected.append(1.0)
            filled = False
        elif not filled or i - last_full >= 4:  # the fill, and a refresh 4 steps after it
            expected.append(1.0)
            filled, last_full = True, i
        else:
            maps = level_tile_maps(m, 3, 4, min_tile, 0)
            expected.append(sum(s * sparse_work(tm, t, H >> lvl) for lvl, (s, tm, t) in enumerate(zip(shares, maps, tiles))))
    assert 0 < min(expected) < 1 and expected.count(1.0) >= 3
    assert eng.predicted_time_ratio(masks) == pytest.approx(sum(expected) / len(expected))
    assert SparseUNet(model, cost_model=0.0).predicted_time_ratio(masks) == pytest.approx(1.0)  # always dense
    # a measured cost model: each level's sparse time from its fitted line, never above dense
    cm = CostModel(persist=False)
    cm._table = {}
    for key_args in [(torch.device("cpu"), torch.float32, 2, c, (H >> l, W >> l), t, None)
                     for l, (c, t) in enumerate(zip(eng._level_channels(), tiles))]:
        cm._table[cm.key(*key_args)] = {"dense_s": 1.0, "sparse_full_s": 1.3, "sparse_half_s": 0.7, "full_work": 1.0,
                                        "half_work": 0.5, "threshold": (1.0 - 0.1) / 1.2}
    assert cm.time_ratio(torch.device("cpu"), torch.float32, 2, eng._level_channels()[0], (H, W), tiles[0], None,
                         0.25) == pytest.approx(0.1 + 1.2 * 0.25)
    assert cm.time_ratio(torch.device("cpu"), torch.float32, 2, eng._level_channels()[0], (H, W), tiles[0], None,
                         0.8) == 1.0
    measured = SparseUNet(model, tile=4, refresh_every=4, cost_model=cm).predicted_time_ratio(masks)
    assert sum(expected) / len(expected) < measured <= 1.0
    # refresh_above: a step predicted at that share of a dense step or more counts whole
    cheap = min(e for e in expected if e < 1.0)
    costly = SparseUNet(model, tile=4, refresh_every=4, cost_model=2.0, refresh_above=cheap / 2)
    assert costly.predicted_time_ratio(masks) == pytest.approx(1.0)
    never = SparseUNet(model, tile=4, refresh_every=4, cost_model=2.0, refresh_above=1.0)
    assert never.predicted_time_ratio(masks) == pytest.approx(sum(expected) / len(expected))


def test_refresh_above_runs_an_expensive_step_whole_and_restarts_the_refresh_count():
    model, z, kw, dense = setup("sr3_tiny", dtype=torch.float32)
    small, big = blob_mask(z.shape[0], r=5), blob_mask(z.shape[0], r=14)
    probe = SparseUNet(model, cost_model=2.0, norm_stats="current")
    sizes = [(H >> lvl, W >> lvl) for lvl in range(len(model.down_blocks))]
    min_tile = probe.min_tile_for(z.device)
    tiles = level_tile_sizes(len(sizes), probe.tile, min_tile)
    maps_small = level_tile_maps(small, len(sizes), probe.tile, min_tile, 0)
    maps_big = level_tile_maps(big, len(sizes), probe.tile, min_tile, 0)
    cost_small = probe.step_work(maps_small, sizes, tiles)
    cost_big = probe.step_work(maps_big, sizes, tiles)
    assert 0 < cost_small < cost_big < 1
    theta = (cost_small + cost_big) / 2
    eng = SparseUNet(model, cost_model=2.0, norm_stats="current", refresh_every=3, refresh_above=theta)
    # the fill; whole (costly: its share is above theta); sparse twice: the count towards
    # refresh_every restarted at step 1; a refresh three steps after step 1
    for m in (small, big, small, small, small):
        eps = eng(z, m, **kw)
    assert [all(h["dense"]) for h in eng.history] == [True, True, False, False, True]
    assert [h["refresh"] for h in eng.history] == [False, True, False, False, True]
    torch.testing.assert_close(eps, dense(z), rtol=1e-4, atol=1e-4)  # a whole step is the model's
    for bad in (0.0, 1.5, True, "0.8"):
        with pytest.raises(ValueError, match="refresh_above"):
            SparseUNet(model, refresh_above=bad)


def test_auto_engine_follows_the_predicted_time_ratio(monkeypatch):
    torch.manual_seed(0)
    config = get_model_config("sr3_tiny")
    diff = build_diffusion(build_model(config).eval(), config)
    lr = torch.rand(1, 3, 8, 8)
    attn = torch.zeros(1, 1, 32, 32)
    attn[..., 8:20, 4:16] = 1.0
    monkeypatch.setattr(type(diff), "AUTO_MIN_GFLOPS", 0.0)
    runs = {}
    for limit in (0.0, 1.0):
        monkeypatch.setattr(type(diff), "AUTO_MAX_PREDICTED_RATIO", limit)
        runs[limit] = diff.sample(lr, attn, steps=6, generator=torch.Generator().manual_seed(0), progress=False,
                                  engine="auto", engine_options=dict(cost_model=2.0))
    predicted = runs[0.0].extras["predicted_time_ratio"]
    assert 0 < predicted < 1 and runs[1.0].extras["predicted_time_ratio"] == predicted
    assert runs[0.0].extras["engine"] == "dense" and runs[1.0].extras["engine"] == "sparse"
    # all-ones masks: nothing to save, so "auto" stays dense
    monkeypatch.setattr(type(diff), "AUTO_MAX_PREDICTED_RATIO", 0.99)
    ones = diff.sample(lr, torch.ones(1, 1, 32, 32), steps=3, progress=False, engine="auto",
                       engine_options=dict(cost_model=2.0))
    assert ones.extras["engine"] == "dense" and ones.extras["predicted_time_ratio"] == pytest.approx(1.0)


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
    for bad in (dict(tile=0), dict(halo=-1), dict(norm_stats="exact"), dict(refresh_every=-2), dict(cost_model="x"),
                dict(probes=1)):
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


def test_weighted_group_stats_match_float64_and_the_torch_path(monkeypatch):
    """The probed statistics' weighted moments: the C++ kernel (float64, a concatenated second
    map, a non-channels_last input) and the torch path against a float64 reference; uniform
    weights give the plain statistics."""
    from yoda_sparse.sparse import norm

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, 9, 7, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x2 = torch.randn(2, 4, 9, 7, generator=g, dtype=torch.float64)  # NCHW: copied by the kernel
    w = torch.rand(2, 9, 7, generator=g, dtype=torch.float64) * (torch.rand(2, 9, 7, generator=g) < 0.5)
    w = w / w.sum((1, 2), keepdim=True)
    v = torch.cat([x, x2], 1).view(2, 4, 4, 9, 7)
    m1 = (v * w[:, None, None]).sum((3, 4)).mean(2)
    m2 = (v * v * w[:, None, None]).sum((3, 4)).mean(2)
    ref = (m1, (m2 - m1 * m1 + 1e-5).rsqrt())
    fast = group_stats(x, x2, 4, 1e-5, w)
    monkeypatch.setattr(norm, "_EXT", [False])
    slow = group_stats(x, x2, 4, 1e-5, w)
    for got in (fast, slow):
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(norm, "_EXT", [])
    uniform = torch.full((2, 9, 7), 1 / 63, dtype=torch.float64)
    for a, b in zip(group_stats(x, x2, 4, 1e-5, uniform), group_stats(x, x2, 4, 1e-5)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_probe_lattice_reaches_every_border_and_plans_weigh_probes_for_the_inactive_area():
    centres = probe_centres((32, 40), 3, 8)
    ys, xs = centres[0, 0].nonzero().unbind(1)
    assert sorted(set(ys.tolist())) == [4, 16, 27] and sorted(set(xs.tolist())) == [4, 20, 35]
    probes = level_probes((32, 40), 3, 2, 8, 2)
    assert probes[0].nonzero().tolist() == [[r, c] for r in (0, 2, 3) for c in (0, 2, 4)]
    assert torch.equal(probes[1], probes[0])  # 4-pixel tiles at level 1: the same grid
    active = torch.zeros(2, 4, 5, dtype=torch.bool)
    active[0, 1:3, 1:3] = True  # covers the centre probe tile (2, 2)
    active[1] = True  # every tile: no probe outside the active ones
    computed = with_probes(active, probes[0])
    assert computed[1].all()
    # image 0: the 8 probe tiles outside the active block, each with its ring (every tile here)
    assert computed[0].all() and not with_probes(active, probes[0], context=0)[0].all()
    plan = LevelPlan(0, (32, 40), 8, computed, 1.0, False, probes=probes[0], active_map=active)
    w = plan.stat_weights()
    torch.testing.assert_close(w.sum((1, 2)), torch.ones(2))
    n = 32 * 40
    assert w[0, 10, 10] == pytest.approx(1 / n)  # active pixel: its share of the map
    # a probe pixel stands for the inactive area: (n - active pixels) / (n * probe pixels)
    assert w[0, 0, 0] == pytest.approx((n - 4 * 64) / (n * 8 * 64))
    assert w[0, 0, 12] == 0  # a context tile: computed, not counted
    torch.testing.assert_close(w[1], torch.full((32, 40), 1 / n))  # all active: the whole map
    # border tiles and interior are separate strata, each standing in for its own inactive pixels
    one = torch.zeros(1, 4, 5, dtype=torch.bool)
    one[0, 1, 1] = True  # an interior tile, no probe
    w = LevelPlan(0, (32, 40), 8, with_probes(one, probes[0]), 1.0, False, probes=probes[0],
                  active_map=one).stat_weights()[0]
    assert w[12, 12] == pytest.approx(1 / n)
    assert w[20, 20] == pytest.approx(5 * 64 / (n * 64))  # the interior probe (2, 2): 5 inactive tiles
    assert w[0, 0] == pytest.approx(14 * 64 / (n * 8 * 64))  # 8 border probes: 14 border tiles
    assert float(w.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("name", FAMILIES)
def test_probed_statistics_compute_probes_only_where_there_is_group_norm(name):
    model, z, kw, dense = setup(name, dtype=torch.float32)
    mask = torch.zeros(z.shape[0], 1, H, W, dtype=torch.bool)
    mask[:, :, 12:20, 12:20] = True
    fractions = {}
    for stats in ("current", "probed"):
        eng = SparseUNet(model, cost_model=2.0, norm_stats=stats, tile=4)
        eng(z, mask, **kw)
        z2 = z + 0.1 * torch.randn_like(z)
        eps = eng(z2, mask, **kw)
        fractions[stats] = eng.history[1]["fractions"][0]
        m = mask.expand_as(eps)
        err = (eps - dense(z2))[m].abs().mean().item()
        assert err < 0.5 * dense(z2)[m].abs().mean().item()
    if name.startswith("sr3"):  # probe tiles and their rings are computed too
        assert fractions["probed"] > fractions["current"]
    else:  # SRDiff's UNet has no GroupNorm: nothing to probe
        assert fractions["probed"] == fractions["current"]


def test_auto_norm_stats_probe_only_once_the_noise_level_has_moved():
    """"auto" (the default) uses the current map's statistics while the cache is fresh and
    probes once SR3's noise level has moved past AUTO_PROBE_STALENESS since the cache was filled."""
    from yoda_sparse.sparse.engine import AUTO_PROBE_STALENESS

    model, z, kw, dense = setup("sr3_tiny", dtype=torch.float32)
    mask = torch.zeros(z.shape[0], 1, H, W, dtype=torch.bool)
    mask[:, :, 12:20, 12:20] = True
    eng = SparseUNet(model, cost_model=2.0, tile=4)
    assert eng.norm_stats == "auto"
    level = torch.full((z.shape[0],), 0.3)
    for moved in (0.0, 0.5 * AUTO_PROBE_STALENESS, 2 * AUTO_PROBE_STALENESS):
        eng(z, mask, x_up=kw["x_up"], noise_level=level + moved)
    assert all(eng.history[0]["dense"]) and not any(eng.history[2]["dense"])
    near, far = (h["fractions"][0] for h in eng.history[1:])
    assert far > near  # the last step computes probe tiles too
    current = SparseUNet(model, cost_model=2.0, tile=4, norm_stats="current")
    current(z, mask, x_up=kw["x_up"], noise_level=level)
    current(z, mask, x_up=kw["x_up"], noise_level=level)
    assert current.history[1]["fractions"][0] == near
