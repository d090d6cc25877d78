"""Tiled sampling: the tile grid, the blending weights, and sample_tiled against diff.sample."""
from __future__ import annotations

import pytest
import torch

from yoda_sparse.diffusion import ScheduleSettings, YodaSettings, build_diffusion
from yoda_sparse.masking import MaskSchedule
from yoda_sparse.models import build_model, get_model_config
from yoda_sparse.tiling import blend_weights, check_tiling, count_tiles, mask_statistics, sample_tiled, tile_starts


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=["sr3_tiny", "srdiff_tiny"])
def diff(request):
    cfg = get_model_config(request.param)
    torch.manual_seed(0)
    sched = ScheduleSettings("linear", 20, 1e-4, 0.1) if cfg.family == "sr3" else ScheduleSettings("cosine", 20)
    return build_diffusion(build_model(cfg).eval(), cfg, schedule=sched, yoda=YodaSettings(attention="gaussian", lower_bound=0.3))


@pytest.mark.parametrize("length, tile, overlap", [(100, 32, 8), (64, 32, 0), (33, 32, 16), (32, 32, 8), (20, 32, 8),
                                                   (1000, 512, 64), (12000, 512, 64)])
def test_tiles_cover_the_axis_and_overlap_enough(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    size = min(tile, length)
    assert starts[0] == 0 and starts[-1] + size == length
    assert all(b > a for a, b in zip(starts, starts[1:]))
    assert all(a + size - b >= overlap for a, b in zip(starts, starts[1:]))  # neighbours share >= overlap
    covered = torch.zeros(length, dtype=torch.bool)
    for a in starts:
        covered[a:a + size] = True
    assert covered.all()


@pytest.mark.parametrize("length, tile, overlap", [(100, 32, 8), (64, 32, 0), (33, 32, 16), (12000, 512, 64)])
def test_blend_weights_are_a_partition_of_unity_with_linear_ramps(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    size = min(tile, length)
    weights = blend_weights(length, starts, size)
    total = torch.zeros(length, dtype=torch.float64)
    for a, w in zip(starts, weights):
        assert w.shape == (size,) and (w > 0).all() and (w <= 1).all()
        total[a:a + size] += w
    assert torch.allclose(total, torch.ones(length, dtype=torch.float64), atol=1e-6)
    if len(starts) > 1 and overlap:  # a crossfade across the first overlap: linear, falling
        a1 = starts[1]
        ramp = weights[0][a1:].double()
        assert (ramp[1:] < ramp[:-1]).all()
        assert torch.allclose(ramp[1:] - ramp[:-1], (ramp[1] - ramp[0]).expand(len(ramp) - 1), atol=1e-6)
        assert (weights[0][:a1] == 1).all()


def test_check_tiling_names_the_argument(diff):
    m = 4  # tiny configs: UNet size multiple 4, scale 4
    assert check_tiling(diff, 64, 16) == (64, 16)
    with pytest.raises(ValueError, match=f"^--tile must be a multiple of {m}"):
        check_tiling(diff, 62, 8, names=("--tile", "--tile-overlap"))
    with pytest.raises(ValueError, match="^overlap must be a multiple of the scale 4"):
        check_tiling(diff, 64, 6)
    with pytest.raises(ValueError, match="^overlap must be at most half of tile"):
        check_tiling(diff, 64, 36)
    with pytest.raises(ValueError, match="^tile must be >= 1"):
        check_tiling(diff, 0, 0)
    with pytest.raises(TypeError, match="^tile must be an integer"):
        check_tiling(diff, "64", 8)
    with pytest.raises(TypeError, match="^overlap must be an integer"):
        check_tiling(diff, 64, True)


def test_one_tile_is_exactly_diff_sample(diff):
    lr = torch.rand(1, 3, 8, 12)
    attn = torch.rand(1, 1, 32, 48)
    want = diff.sample(lr, attn, steps=3, generator=torch.Generator().manual_seed(4), progress=False)
    got = sample_tiled(diff, lr, attn, tile=48, overlap=8, steps=3, generator=torch.Generator().manual_seed(4),
                       progress=False)
    assert torch.equal(got.images, want.images)
    assert torch.equal(got.update_ratio, want.update_ratio) and got.extras["tiles"] == 1


@pytest.mark.parametrize("with_attention", [True, False])
def test_tiles_are_placed_blended_and_the_masks_are_the_whole_images(diff, with_attention):
    lr = torch.rand(1, 3, 12, 20)  # output 48x80: tiles of 32, overlap 8 -> 2 x 3 tiles
    attn = torch.rand(1, 1, 48, 80) if with_attention else None
    res = sample_tiled(diff, lr, attn, tile=32, overlap=8, steps=3, generator=torch.Generator().manual_seed(5),
                       progress=False)
    assert res.images.shape == (1, 3, 48, 80) and res.extras["tiles"] == 6 == count_tiles((48, 80), 32, 8)
    assert 0 <= res.images.min() and res.images.max() <= 1
    # the first tile draws first from the generator: its own run, where no other tile reaches
    first = diff.sample(lr[..., :8, :8], attn[..., :32, :32] if attn is not None else None, steps=3,
                        generator=torch.Generator().manual_seed(5), progress=False)
    assert torch.allclose(res.images[..., :16, :16], first.images[..., :16, :16], atol=1e-6)
    if with_attention:
        whole = MaskSchedule(attn, diff.schedule.num_steps, diff.yoda.lower_bound, timesteps=res.timesteps)
        assert torch.equal(res.active_fraction, whole.active_fraction)
        assert torch.equal(res.update_ratio, whole.update_ratio)
    else:
        assert (res.update_ratio == 1).all()


def test_mask_statistics_match_mask_schedule_in_row_chunks():
    attn = torch.rand(2, 1, 37, 23)
    ts = torch.tensor([500, 420, 300, 299, 120, 3])
    want = MaskSchedule(attn, 500, 0.2, timesteps=ts).active_fraction
    assert torch.equal(mask_statistics(attn, 500, 0.2, ts, rows=5), want)


def test_upscale_command_samples_in_tiles(tmp_path, capsys):
    from yoda_sparse.cli import main
    from yoda_sparse.imageio import save_image

    cfg = get_model_config("sr3_tiny")
    torch.manual_seed(0)
    d = build_diffusion(build_model(cfg), cfg, schedule=ScheduleSettings("linear", 20, 1e-4, 0.1),
                        yoda=YodaSettings(attention="gaussian", lower_bound=0.3))
    ckpt = tmp_path / "c.safetensors"
    d.save(ckpt, cfg)
    save_image(torch.rand(3, 10, 23), tmp_path / "in.png")  # output 40x92: padded to 40x92, 2 x 4 tiles of 32
    args = ["upscale", str(tmp_path / "in.png"), "--out", str(tmp_path), "--checkpoint", str(ckpt), "--steps", "2",
            "--no-progress", "--tile", "32"]
    assert main(args) == 0
    assert "(8 tiles)" in capsys.readouterr().out
    from PIL import Image

    assert Image.open(tmp_path / "in_x4.png").size == (92, 40)
    for extra, msg in ((["--tile", "30"], "--tile must be a multiple of 4"),
                       (["--tile", "32", "--tile-overlap", "20"], "--tile-overlap must be at most half of --tile (16)"),
                       (["--tile", "0", "--tile-overlap", "8"], "--tile-overlap: --tile 0 samples without tiles")):
        assert main(args[:-2] + extra + ["--overwrite"]) == 1
        assert msg in capsys.readouterr().err
