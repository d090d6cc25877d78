"""Metrics (PSNR/SSIM/colour shift/LPIPS), image files, resampling, bundled images and plots."""
from __future__ import annotations

import math
import os
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from yoda_sparse import imageio as yio
from yoda_sparse.imageio import (
    ImageError,
    bicubic_downscale,
    bicubic_upscale,
    bundled_faces,
    bundled_image_paths,
    bundled_images,
    crop_to_multiple,
    load_image,
    pad_to_multiple,
    save_image,
    unpad,
)
from yoda_sparse.metrics import (
    LPIPSMetric,
    LPIPSUnavailable,
    cached_backbone_path,
    colour_shift,
    psnr,
    rgb_to_y,
    ssim,
    try_lpips,
)


def _rand(shape, seed=0, dtype=torch.float64):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(scope="module")
def astronaut():
    return bundled_images()["astronaut"]()


# --------------------------------------------------------------------------- PSNR
def test_psnr_constant_offset_rgb_and_y():
    hr = torch.full((2, 3, 16, 16), 0.5, dtype=torch.float64)
    sr = hr + 0.1  # MSE = 0.01 in every channel
    assert torch.allclose(psnr(sr, hr, y_channel=False), torch.full((2,), 20.0, dtype=torch.float64), atol=1e-9)
    # Y difference is 0.1 * (65.481 + 128.553 + 24.966) / 255 = 0.1 * 219 / 255
    expect = -20 * math.log10(0.1 * 219 / 255)
    assert psnr(sr, hr).tolist() == pytest.approx([expect, expect], abs=1e-9)


def test_psnr_known_mse_pattern():
    hr = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    sr = hr.clone()
    sr[..., :4, :] = 0.2  # half of the pixels off by 0.2 -> MSE = 0.02
    assert psnr(sr, hr, y_channel=False).item() == pytest.approx(10 * math.log10(1 / 0.02), abs=1e-9)
    out = psnr(sr, hr, y_channel=False)
    assert out.dtype == torch.float64 and out.shape == (1,)


def test_identical_images_inf_and_one(astronaut):
    x = astronaut[:, :64, :64]
    assert psnr(x, x).item() == math.inf
    assert ssim(x, x).item() == 1.0
    assert ssim(x, x, y_channel=False).item() == 1.0


def test_y_channel_conversion_numbers():
    rgb = torch.tensor([[0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    y = rgb_to_y(rgb.view(1, 5, 3).permute(0, 2, 1).unsqueeze(-1)).flatten()
    expect = torch.tensor([16, 235, 16 + 65.481, 16 + 128.553, 16 + 24.966], dtype=torch.float64) / 255
    assert torch.allclose(y, expect, atol=1e-12)


def test_border_crop(astronaut):
    hr = astronaut[:, :48, :48].double()
    sr = hr.clone()
    sr[:, :4, :] = 1 - sr[:, :4, :]  # damage only a 4-pixel border strip
    assert math.isfinite(psnr(sr, hr).item())
    assert psnr(sr, hr, scale=4).item() == math.inf  # crop_border defaults to scale
    assert psnr(sr, hr, crop_border=4).item() == math.inf
    assert math.isfinite(psnr(sr, hr, scale=4, crop_border=0).item())
    assert ssim(sr, hr, scale=4).item() == 1.0
    with pytest.raises(ValueError, match="crop_border"):
        ssim(sr, hr, crop_border=19)  # 48 - 38 = 10 < 11
    with pytest.raises(ValueError, match="crop_border"):
        psnr(sr, hr, crop_border=-1)


def test_numpy_hwc_matches_torch_and_data_range(astronaut):
    hr = astronaut[:, :40, :40].double()
    sr = (hr + 0.03 * _rand(hr.shape, 1) - 0.015).clamp(0, 1)
    t = psnr(sr, hr)
    n = psnr(sr.permute(1, 2, 0).numpy(), hr.permute(1, 2, 0).numpy())
    assert torch.equal(t, n)
    assert torch.allclose(psnr(sr * 255, hr * 255, data_range=255), t, atol=1e-9)
    assert torch.allclose(ssim(sr * 255, hr * 255, data_range=255), ssim(sr, hr), atol=1e-12)


def test_quantize_rounds_to_8_bits():
    hr = torch.full((1, 3, 16, 16), 100 / 255, dtype=torch.float64)
    sr = hr + 0.4 / 255  # below half an 8-bit level: vanishes after quantisation
    assert math.isfinite(psnr(sr, hr).item())
    assert psnr(sr, hr, quantize=True).item() == math.inf


def test_input_errors_name_the_argument():
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="sr .*hr"):
        psnr(x, torch.rand(1, 3, 16, 17))
    with pytest.raises(TypeError, match="sr"):
        psnr((x * 255).to(torch.uint8), x)
    with pytest.raises(TypeError, match="hr"):
        ssim(x.numpy().transpose(0, 2, 3, 1), (x * 255).to(torch.uint8).numpy().transpose(0, 2, 3, 1))
    with pytest.raises(ValueError, match="hr must lie in"):
        psnr(x, x + 0.01)
    with pytest.raises(ValueError, match="sr contains NaN"):
        psnr(torch.full_like(x, float("nan")), x)
    with pytest.raises(ValueError, match="y_channel"):
        psnr(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16))
    # within the 1e-3 tolerance: accepted as is (not clamped)
    assert psnr(x, (x + 5e-4).clamp(max=1 + 5e-4)).shape == (1,)
    assert psnr(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16), y_channel=False).shape == (1,)


# --------------------------------------------------------------------------- SSIM vs skimage
@pytest.mark.parametrize("name", ["astronaut", "coffee", "camera", "grace_hopper"])
def test_ssim_matches_skimage_on_real_images(name):
    from skimage.metrics import structural_similarity

    imgs = bundled_images()
    if name not in imgs:
        pytest.skip(f"{name} not bundled here")
    hr = imgs[name]()[:, 100:196, 120:248].double()
    sr = (hr + 0.06 * torch.randn(hr.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)).clamp(0, 1)
    hr_np, sr_np = hr.permute(1, 2, 0).numpy(), sr.permute(1, 2, 0).numpy()
    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
    ref_rgb = structural_similarity(sr_np, hr_np, channel_axis=-1, **kw)
    assert ssim(sr, hr, y_channel=False).item() == pytest.approx(ref_rgb, abs=1e-6)

    def y(a):
        return (16 + 65.481 * a[..., 0] + 128.553 * a[..., 1] + 24.966 * a[..., 2]) / 255

    c = 4
    ref_y = structural_similarity(y(sr_np)[c:-c, c:-c], y(hr_np)[c:-c, c:-c], **kw)
    assert ssim(sr, hr, scale=c).item() == pytest.approx(ref_y, abs=1e-6)
    assert 0 < ref_y < 1


def test_ssim_batch_is_per_image(astronaut):
    hr = torch.stack([astronaut[:, :64, :64], astronaut[:, 64:128, 64:128]]).double()
    sr = (hr + 0.05 * torch.randn(hr.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).clamp(0, 1)
    both = ssim(sr, hr)
    assert both.shape == (2,)
    assert both[1].item() == pytest.approx(ssim(sr[1], hr[1]).item(), abs=1e-14)


# --------------------------------------------------------------------------- colour shift
def test_colour_shift_sign():
    hr = torch.full((2, 3, 8, 8), 0.5, dtype=torch.float64)
    sr = hr.clone()
    sr[0, 0] += 0.1  # image 0 too red
    sr[1, 2] -= 0.2  # image 1 not blue enough
    cs = colour_shift(sr, hr)
    assert cs.per_channel.shape == (2, 3)
    assert torch.allclose(cs.per_channel, torch.tensor([[0.1, 0, 0], [0, 0, -0.2]], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(cs.mean_abs, torch.tensor([0.1 / 3, 0.2 / 3], dtype=torch.float64), atol=1e-12)


# --------------------------------------------------------------------------- LPIPS
@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory):
    import torchvision

    torch.manual_seed(0)
    # A random torchvision AlexNet's `features` weights under torchvision's key names
    # ("features.N.weight"); the classifier (240 MB) is left out as LPIPS never uses it.
    sd = {f"features.{k}": v for k, v in torchvision.models.alexnet().features.state_dict().items()}
    p = tmp_path_factory.mktemp("weights") / "alexnet-random.pth"
    torch.save(sd, p)
    return p, sd


def test_lpips_with_local_backbone_file(alexnet_file):
    path, sd = alexnet_file
    metric = LPIPSMetric(backbone_weights=path)
    assert torch.equal(metric.model.net.slice1[0].weight, sd["features.0.weight"])
    assert torch.equal(metric.model.net.slice5[0].bias, sd["features.10.bias"])
    x = _rand((2, 3, 48, 48), 0)
    y = _rand((2, 3, 48, 48), 1)
    d = metric(x, y)
    assert d.shape == (2,) and d.dtype == torch.float64 and torch.isfinite(d).all() and (d > 0).all()
    assert metric(x, x).abs().max().item() < 1e-6
    with pytest.raises(ValueError, match="too small"):
        metric(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="hr must lie in"):
        metric(x, y * 2)


def test_lpips_bare_features_file_and_bad_file(tmp_path, alexnet_file):
    _, sd = alexnet_file
    bare = tmp_path / "features.pth"
    torch.save({k[len("features."):]: v for k, v in sd.items()}, bare)
    assert torch.equal(LPIPSMetric(backbone_weights=bare).model.net.slice2[1].weight, sd["features.3.weight"])
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, wrong)
    with pytest.raises(LPIPSUnavailable, match="shape"):
        LPIPSMetric(backbone_weights=wrong)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(256))
    metric, reason = try_lpips(backbone_weights=junk)
    assert metric is None and "cannot read backbone weights" in reason and "\n" not in reason


def test_lpips_unavailable_quickly_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert cached_backbone_path("alex").parent == tmp_path / "hub" / "checkpoints"
    t0 = time.perf_counter()
    with pytest.raises(LPIPSUnavailable, match="no download"):
        LPIPSMetric()
    metric, reason = try_lpips()
    assert time.perf_counter() - t0 < 5
    assert metric is None and "alexnet-owt-7be5be79.pth" in reason and "\n" not in reason
    metric, reason = try_lpips(backbone_weights=tmp_path / "missing.pth")
    assert metric is None and "not found" in reason


def test_lpips_uses_torch_hub_cache(tmp_path, monkeypatch, alexnet_file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = cached_backbone_path("alex")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(alexnet_file[0].read_bytes())
    metric, reason = try_lpips()
    assert reason is None and metric.backbone_path == cached


# --------------------------------------------------------------------------- load_image
def _png16(a: np.ndarray, path, color_type: int):
    """Minimal 16-bit PNG writer (Pillow can't write 16-bit colour)."""
    h, w = a.shape[:2]
    raw = b"".join(b"\x00" + a[i].astype(">u2").tobytes() for i in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_load_png_rgb(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "rgb.png")
    t, notes = load_image(tmp_path / "rgb.png")
    assert t.dtype == torch.float32 and t.shape == (3, 9, 7) and notes == []
    assert torch.equal(t, torch.from_numpy(a).permute(2, 0, 1).float() / 255)


def test_load_grayscale_and_palette(tmp_path):
    g = np.random.default_rng(1).integers(0, 256, (5, 6), dtype=np.uint8)
    Image.fromarray(g).save(tmp_path / "g.png")
    t, notes = load_image(tmp_path / "g.png")
    assert t.shape == (3, 5, 6) and torch.equal(t[0], t[2])
    assert torch.equal(t[1], torch.from_numpy(g).float() / 255)
    assert any("grayscale" in n for n in notes)
    Image.fromarray(np.stack([g] * 3, -1)).convert("P").save(tmp_path / "p.png")
    t, notes = load_image(tmp_path / "p.png")
    assert t.shape == (3, 5, 6) and any("palette" in n for n in notes)


def test_load_rgba_composited_over_white(tmp_path):
    a = np.zeros((4, 4, 4), dtype=np.uint8)
    a[..., 0] = 200
    a[..., 3] = 255
    a[0, 0, 3] = 0  # fully transparent -> white
    a[1, 1, 3] = 102  # 40% opaque
    Image.fromarray(a).save(tmp_path / "rgba.png")
    t, notes = load_image(tmp_path / "rgba.png")
    assert any("composited over white" in n for n in notes)
    assert t[:, 0, 0].tolist() == [1.0, 1.0, 1.0]
    alpha = 102 / 255
    assert t[0, 1, 1].item() == pytest.approx(200 / 255 * alpha + 1 - alpha, abs=1e-6)
    assert t[1, 1, 1].item() == pytest.approx(1 - alpha, abs=1e-6)
    assert t[:, 2, 2].tolist() == pytest.approx([200 / 255, 0, 0], abs=1e-7)
    a[..., 3] = 255
    Image.fromarray(a).save(tmp_path / "opaque.png")
    _, notes = load_image(tmp_path / "opaque.png")
    assert any("opaque alpha channel dropped" in n for n in notes)


def test_load_16_bit_gray_and_rgb(tmp_path):
    g = (np.arange(30).reshape(5, 6) * 2000 + 17).astype(np.uint16)
    Image.fromarray(g).save(tmp_path / "g16.png")
    t, notes = load_image(tmp_path / "g16.png")
    assert torch.allclose(t[0].double(), torch.from_numpy(g.astype(np.float64) / 65535), atol=1e-7)
    assert any("16-bit" in n for n in notes)
    rgb = (np.arange(4 * 5 * 3).reshape(4, 5, 3) * 1000 + 7).astype(np.uint16)
    _png16(rgb, tmp_path / "rgb16.png", color_type=2)
    t, notes = load_image(tmp_path / "rgb16.png")
    # 7/65535 would be 0 at 8 bits: exact 16-bit values prove nothing was truncated
    assert torch.allclose(t.double(), torch.from_numpy(rgb.astype(np.float64) / 65535).permute(2, 0, 1), atol=1e-7)
    assert any("16-bit RGB" in n for n in notes)
    # a corrupt 16-bit colour PNG must be an ImageError (torchvision's decoder alone would crash)
    good = (tmp_path / "rgb16.png").read_bytes()
    idat = good.index(b"IDAT") + 4
    (tmp_path / "bad16.png").write_bytes(good[:idat] + bytes(b ^ 0x5A for b in good[idat:idat + 20]) + good[idat + 20:])
    with pytest.raises(ImageError, match="bad16.png"):
        load_image(tmp_path / "bad16.png")


def test_load_errors_name_the_path(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(os.urandom(512))
    with pytest.raises(ImageError, match="junk.png"):
        load_image(junk)
    a = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.png") as e:
        load_image(tmp_path / "cut.png")
    assert "\n" not in str(e.value)
    with pytest.raises(ImageError, match="missing.png.*not found"):
        load_image(tmp_path / "missing.png")
    assert issubclass(ImageError, ValueError)


# --------------------------------------------------------------------------- save_image
def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_save_image_round_trip(tmp_path):
    x = _rand((1, 3, 10, 12), 5, torch.float32)
    out = save_image(x, tmp_path / "x.png")
    t, _ = load_image(out)
    assert torch.equal(t, torch.round(x[0].double() * 255).float() / 255)
    smooth = torch.linspace(0, 1, 16).view(1, 1, 16).expand(3, 16, 16) * torch.tensor([1.0, 0.6, 0.3]).view(3, 1, 1)
    save_image(smooth, tmp_path / "x.jpg")
    t, _ = load_image(tmp_path / "x.jpg")
    assert Image.open(tmp_path / "x.jpg").format == "JPEG"
    assert t.shape == (3, 16, 16) and (t - smooth).abs().mean() < 0.02
    assert _leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="img must lie in"):
        save_image(x + 0.1, tmp_path / "bad.png")
    with pytest.raises(ImageError, match="suffix"):
        save_image(x, tmp_path / "x.unknownformat")


def test_save_image_failure_is_atomic(tmp_path, monkeypatch):
    dest = tmp_path / "keep.png"
    save_image(torch.zeros(3, 4, 4), dest)
    before = dest.read_bytes()

    def broken_save(self, fp, *a, **k):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(ImageError, match="disk full"):
        save_image(torch.ones(3, 4, 4), dest)
    monkeypatch.undo()
    assert dest.read_bytes() == before and _leftovers(tmp_path) == []

    def broken_replace(src, dst):
        raise OSError("rename failed")

    import yoda_sparse.atomic

    monkeypatch.setattr(yoda_sparse.atomic.os, "replace", broken_replace)
    with pytest.raises(ImageError, match="rename failed"):
        save_image(torch.ones(3, 4, 4), dest)
    assert dest.read_bytes() == before and _leftovers(tmp_path) == []


def test_save_image_missing_folder(tmp_path):
    target = tmp_path / "nope" / "deeper" / "x.png"
    with pytest.raises(ImageError, match="folder .*nope.*does not exist"):
        save_image(torch.zeros(3, 4, 4), target)
    assert not (tmp_path / "nope").exists()
    save_image(torch.zeros(3, 4, 4), target, make_dirs=True)
    assert Image.open(target).size == (4, 4)


# --------------------------------------------------------------------------- resampling
def test_bicubic_down_and_up(astronaut):
    hr = astronaut[:, :64, :48]
    lr = bicubic_downscale(hr, 4)
    assert lr.shape == (3, 16, 12) and lr.min() >= 0 and lr.max() <= 1
    assert bicubic_downscale(hr.unsqueeze(0), 4).shape == (1, 3, 16, 12)
    const = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(bicubic_downscale(const, 2), torch.full((1, 3, 8, 8), 0.3), atol=1e-6)
    up = bicubic_upscale(lr, 4)
    assert up.shape == hr.shape and up.min() >= 0 and up.max() <= 1
    assert psnr(up, hr).item() > 20
    with pytest.raises(ValueError, match="multiple of scale"):
        bicubic_downscale(astronaut[:, :63, :48], 4)
    with pytest.raises(ValueError, match="scale"):
        bicubic_downscale(hr, 0)


def test_crop_pad_unpad():
    x = _rand((2, 3, 13, 10), 7)
    assert crop_to_multiple(x, 4).shape == (2, 3, 12, 8)
    p, size = pad_to_multiple(x, 8)
    assert p.shape == (2, 3, 16, 16) and size == (13, 10)
    assert torch.equal(p[..., 13, :10], x[..., 11, :])  # reflect: row 13 mirrors row 11
    assert torch.equal(unpad(p, size), x)
    tiny = _rand((3, 3, 2), 8)  # pad 5 >= 3 rows: replicate
    p, size = pad_to_multiple(tiny, 8)
    assert p.shape == (3, 8, 8) and torch.equal(p[:, 7, 1], tiny[:, 2, 1])
    assert torch.equal(unpad(p, size), tiny)
    same, size = pad_to_multiple(x[..., :8, :8], 8)
    assert torch.equal(same, x[..., :8, :8])


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 20), w=st.integers(1, 20), multiple=st.integers(1, 9), batch=st.booleans())
def test_pad_unpad_round_trip_any_shape(h, w, multiple, batch):
    x = _rand((2, 3, h, w) if batch else (3, h, w), h * 100 + w)
    p, size = pad_to_multiple(x, multiple)
    assert p.shape[-2] % multiple == 0 and p.shape[-1] % multiple == 0
    assert p.shape[-2] - h < multiple and p.shape[-1] - w < multiple
    assert torch.equal(unpad(p, size), x)


# --------------------------------------------------------------------------- bundled images
def test_bundled_images_are_real():
    paths = bundled_image_paths()
    assert {"astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field"} <= set(paths)
    assert all(p.is_file() for p in paths.values())
    imgs = bundled_images()
    for name in ("astronaut", "camera", "grace_hopper"):
        if name not in imgs:
            continue
        x = imgs[name]()
        assert x.dtype == torch.float32 and x.dim() == 3 and x.shape[0] == 3 and min(x.shape[1:]) >= 256
        assert 0 <= x.min() and x.max() <= 1 and x.std() > 0.05
    cam = imgs["camera"]()
    assert torch.equal(cam[0], cam[1])
    faces = bundled_faces()
    assert len(faces) == 100
    f = faces["lfw_000"]()
    assert f.shape == (3, 25, 25) and f.std() > 0.02


# --------------------------------------------------------------------------- plots
def _is_png(path, size=None):
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        if size is not None:
            assert im.size == size
        return im.size


def test_plot_update_ratio_and_refined_area(tmp_path):
    from yoda_sparse.masking import MaskSchedule
    from yoda_sparse.plots import plot_refined_area, plot_update_ratio

    attn = _rand((3, 1, 8, 8), 9)
    ms = MaskSchedule(attn, T=20, lower_bound=0.3)
    p = plot_update_ratio({"ResNet-50 MAX": ms.update_ratio, "ViT-S/8": [0.55, 0.6, 0.62]}, tmp_path / "ratio.png")
    _is_png(p)
    p = plot_refined_area({"ResNet-50": ms.active_fraction.T, "mean only": ms.active_fraction[:, 0]},
                          ms.timesteps, tmp_path / "area.png", title="Fig. 5")
    _is_png(p)
    assert _leftovers(tmp_path) == []
    with pytest.raises(ValueError, match=r"fractions in \[0, 1\]"):
        plot_update_ratio({"percent": [70.0]}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="len\\(timesteps\\)"):
        plot_refined_area({"a": [0.1, 0.2]}, [3, 2, 1], tmp_path / "bad.png")
    with pytest.raises(ImageError, match="does not exist"):
        plot_update_ratio({"a": [0.5]}, tmp_path / "missing" / "r.png")


def test_mask_strip_and_side_by_side(tmp_path):
    from yoda_sparse.plots import mask_strip, save_mask_strip, side_by_side

    masks = torch.zeros(10, 1, 8, 6, dtype=torch.bool)
    for s in range(10):
        masks[s, 0, : s + 1] = True  # the active area grows
    strip = mask_strip(masks, n=4)
    assert strip.dtype == np.uint8 and strip.shape == (8, 4 * 6 + 3 * 2, 3)
    assert strip[0, 0].tolist() == [255, 255, 255] and strip[7, 0].tolist() == [0, 0, 0]
    assert strip[7, -1].tolist() == [255, 255, 255]  # last step: all active
    labelled = mask_strip(list(masks), n=4, labels=[f"t={t}" for t in range(10, 0, -1)])
    assert labelled.shape[0] > 8 and labelled.shape[1] == strip.shape[1]
    _is_png(save_mask_strip(masks[:, 0], tmp_path / "strip.png", n=20, labels=True))
    lr = _rand((3, 8, 8), 1, torch.float32)
    hr = _rand((3, 32, 32), 2, torch.float32)
    w, h = _is_png(side_by_side([lr, hr, hr], ["LR", "HR", "SR"], tmp_path / "cmp.png", gap=4))
    assert w == 3 * 32 + 2 * 4 and h > 32
    _is_png(side_by_side([lr, hr], None, tmp_path / "cmp2.png", height=16, gap=0), size=(32, 16))
    assert _leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="labels"):
        side_by_side([lr], ["a", "b"], tmp_path / "x.png")
