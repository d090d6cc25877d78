"""Tests for yoda_sparse.attention: the extractor contract on real images, the DINO head maps
against independent references, weight loading, the offline error, input checks and the
classical baselines.  DINO backbones use random weights (no hub here); images come from
scikit-image's bundled data."""
from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from skimage import data

from yoda_sparse.attention import (
    NUM_HEADS,
    AttentionExtractor,
    DinoResNetAttention,
    DinoViTAttention,
    EdgeAttention,
    GaussianAttention,
    SIFTAttention,
    WeightsUnavailableError,
    aggregate_heads,
    get_attention,
    list_attention,
    minmax_normalize,
)
from yoda_sparse.attention import weights as weights_mod
from yoda_sparse.attention.dino import interpolate_pos_embed

EXPECTED_NAMES = (
    [f"dino_vits8_head{i}" for i in range(6)] + ["dino_vits8_avg", "dino_vits8_max"]
    + [f"dino_resnet50_head{i}" for i in range(6)] + ["dino_resnet50_avg", "dino_resnet50_max"]
    + ["gaussian", "edge", "sift"]
)


# ---------------------------------------------------------------------------------------------
# Real images: square centre crops, downscaled to LR and bicubic-upsampled back (the x_up an
# extractor sees in YODA; bicubic overshoot included).
# ---------------------------------------------------------------------------------------------

def _rgb(name: str) -> torch.Tensor:
    if name == "face":
        img = np.repeat(data.lfw_subset()[0][..., None], 3, axis=-1)  # 25x25 gray face in [0, 1]
    else:
        img = getattr(data, name)() / 255.0
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()
    s = min(t.shape[1:])
    top, left = (t.shape[1] - s) // 2, (t.shape[2] - s) // 2
    return t[:, top:top + s, left:left + s]


def upsampled_batch(names=("astronaut", "chelsea"), size=(64, 64), scale=4) -> torch.Tensor:
    H, W = size
    hr = torch.stack([F.interpolate(_rgb(n)[None], size=(H, W), mode="bilinear", antialias=True)[0]
                      for n in names])
    lr = F.interpolate(hr, size=(H // scale, W // scale), mode="bilinear", antialias=True)
    return F.interpolate(lr, size=(H, W), mode="bicubic", align_corners=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the backbones are small at these sizes, and on a shared 2-core
    machine spinning OpenMP workers cost more than they gain."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def batch64():
    return upsampled_batch(("astronaut", "chelsea"), (64, 64))


@pytest.fixture(scope="module")
def batch_odd():
    return upsampled_batch(("coffee", "face"), (72, 88))


@pytest.fixture(scope="module")
def vit_state():
    torch.manual_seed(0)
    return {k: v.clone() for k, v in DinoViTAttention(pretrained=False).model.state_dict().items()}


@pytest.fixture(scope="module")
def resnet_state():
    torch.manual_seed(1)
    return {k: v.clone() for k, v in DinoResNetAttention(pretrained=False).model.state_dict().items()}


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory, vit_state):
    p = tmp_path_factory.mktemp("w") / "vit.pth"
    torch.save(vit_state, p)
    return p


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory, resnet_state):
    p = tmp_path_factory.mktemp("w") / "resnet.pth"
    torch.save(resnet_state, p)
    return p


@pytest.fixture(scope="module")
def vit(vit_file):
    return DinoViTAttention("max", weights=vit_file, input_size=None)


@pytest.fixture(scope="module")
def resnet(resnet_file):
    return DinoResNetAttention("max", weights=resnet_file, input_size=None)


def check_map(out: torch.Tensor, images: torch.Tensor):
    B, _, H, W = images.shape
    assert out.shape == (B, 1, H, W)
    assert out.dtype == torch.float32
    assert out.device == images.device
    assert torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

def test_list_attention_names():
    assert list_attention() == EXPECTED_NAMES


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="dino_resnet50_max") as e:
        get_attention("dino_vitb16_max")
    assert "sift" in str(e.value) and "dino_vitb16_max" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Contract for every name
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_every_extractor_contract(name, batch64, batch_odd, vit_file, resnet_file):
    if name.startswith("dino_vits8"):
        kw = dict(weights=vit_file, input_size=None)
    elif name.startswith("dino_resnet50"):
        kw = dict(weights=resnet_file, input_size=None)
    else:
        kw = {}
    ext = get_attention(name, **kw)
    assert isinstance(ext, AttentionExtractor) and ext.name == name
    assert ext.to("cpu") is ext
    for images in (batch64, batch_odd):
        out = ext(images)
        check_map(out, images)
        if name != "sift":  # sift is legitimately all-zero on an image without keypoints
            assert out.max() == 1.0
        assert not out.requires_grad


@pytest.mark.parametrize("which", ["vit", "resnet", "gaussian", "edge", "sift"])
def test_channels_last_and_strided_inputs(which, request, batch64):
    ext = request.getfixturevalue(which) if which in ("vit", "resnet") else get_attention(which)
    out = ext(batch64)
    cl = batch64.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ext(cl), out, atol=1e-5, rtol=0)
    strided = torch.stack([batch64, batch64], dim=-1)[..., 0]  # same values, strided view
    assert not strided.is_contiguous()
    torch.testing.assert_close(ext(strided), out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [DinoViTAttention, DinoResNetAttention])
def test_dino_default_input_size_resizes_short_side_to_224(cls, vit_file, resnet_file):
    file = vit_file if cls is DinoViTAttention else resnet_file
    ext = cls("avg", weights=file, input_size=112)  # 224 is the default; 112 keeps the test fast
    assert cls("avg", weights=file).input_size == 224
    assert ext.resized_size(72, 88) == (112, 136) and ext.resized_size(88, 72) == (136, 112)  # Resize(112)
    assert ext.backbone_size(72, 88) == (112, 136)
    images = upsampled_batch(("coffee", "face"), (72, 88))
    out = ext(images)
    check_map(out, images)
    grid = 8 if cls is DinoViTAttention else 32
    h, w = ext.backbone_size(72, 88)
    assert ext.head_maps(images).shape == (2, NUM_HEADS, -(-h // grid), -(-w // grid))


def test_empty_batch_and_float64(vit, batch64):
    out = vit(torch.zeros(0, 3, 40, 48))
    assert out.shape == (0, 1, 40, 48) and out.dtype == torch.float32
    torch.testing.assert_close(vit(batch64.double()), vit(batch64), atol=1e-5, rtol=0)


def test_extractor_stays_frozen(resnet, batch64):
    resnet.train()
    assert not resnet.training and not resnet.model.training
    assert not any(p.requires_grad for p in resnet.parameters())
    x = batch64.clone().requires_grad_(True)
    assert not resnet(x).requires_grad


# ---------------------------------------------------------------------------------------------
# Head maps and aggregation
# ---------------------------------------------------------------------------------------------

def _reference_from_head_maps(hm: torch.Tensor, heads, size):
    """float64 reference: resize -> per-head min-max -> aggregate -> min-max."""
    up = F.interpolate(hm.double(), size=size, mode="bilinear", align_corners=False)
    lo, hi = up.amin((-2, -1), keepdim=True), up.amax((-2, -1), keepdim=True)
    up = (up - lo) / (hi - lo)
    agg = {"avg": up.mean(1, keepdim=True), "max": up.amax(1, keepdim=True)}.get(heads)
    if agg is None:
        agg = up[:, heads:heads + 1]
    lo, hi = agg.amin((-2, -1), keepdim=True), agg.amax((-2, -1), keepdim=True)
    return (agg - lo) / (hi - lo)


@pytest.mark.parametrize("which", ["vit", "resnet"])
def test_head_maps_max_avg_relation_and_aggregation(which, request, batch_odd):
    ext = request.getfixturevalue(which)
    hm = ext.head_maps(batch_odd)
    grid = (9, 11) if which == "vit" else (3, 3)
    assert hm.shape == (2, NUM_HEADS, *grid) and hm.dtype == torch.float32
    assert torch.isfinite(hm).all() and (hm >= 0).all()
    avg, mx = aggregate_heads(hm, "avg"), aggregate_heads(hm, "max")
    assert (mx >= avg - 1e-7).all() and (avg >= 0).all()
    torch.testing.assert_close(mx[:, 0], hm.max(dim=1).values, atol=0, rtol=0)
    torch.testing.assert_close(avg[:, 0], hm.mean(dim=1), atol=0, rtol=0)
    for h in [3, "avg", "max"]:
        ext.heads = h
        try:
            assert ext.name == f"dino_{'vits8' if which == 'vit' else 'resnet50'}_" + (
                h if isinstance(h, str) else f"head{h}")
            out = ext(batch_odd)
        finally:
            ext.heads = "max"
        ref = _reference_from_head_maps(hm, h, (72, 88))
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    # after per-head normalisation MAX >= AVG still holds at every pixel
    up = minmax_normalize(F.interpolate(hm, size=(72, 88), mode="bilinear"))
    assert (aggregate_heads(up, "max") >= aggregate_heads(up, "avg") - 1e-6).all()


def test_vit_head_maps_match_timm_unfused_attention(vit_file):
    """Independent reference: timm's own non-fused attention probabilities of the last block,
    captured at its attn_drop, CLS row over the patch tokens.  At 224 x 224 (the trained 28 x 28
    grid) timm and DINO build the same tokens; elsewhere timm resamples the position embedding
    its own way (test_vit_maps_equal_dinos_own_at_any_size covers those sizes)."""
    vit = DinoViTAttention("max", weights=vit_file, input_size=None)
    images = upsampled_batch(("astronaut",), (224, 224))
    model = vit.model
    attn = model.blocks[-1].attn
    captured = {}
    handle = attn.attn_drop.register_forward_hook(lambda m, a, out: captured.setdefault("p", out))
    fused = attn.fused_attn
    attn.fused_attn = False
    try:
        with torch.no_grad():
            model.forward_features((images - vit.mean) / vit.std)
    finally:
        attn.fused_attn = fused
        handle.remove()
    ref = captured["p"][:, :, 0, 1:].reshape(1, NUM_HEADS, 28, 28)
    hm = vit.head_maps(images)
    torch.testing.assert_close(hm, ref, atol=1e-6, rtol=1e-4)
    # CLS attention over patches is a part of a probability row
    assert (hm.sum((-2, -1)) <= 1 + 1e-5).all()


# ---------------------------------------------------------------------------------------------
# DINO's own maps: tests/fixtures/dino_vits8 holds DINO's get_last_selfattention (run by DINO's
# code, float64) for synthetic weights at six sizes; see its README for how it was made.
# ---------------------------------------------------------------------------------------------

FIXTURE = Path(__file__).parent / "fixtures" / "dino_vits8"


@pytest.fixture(scope="module")
def dino_fixture(tmp_path_factory):
    from safetensors import safe_open

    spec = importlib.util.spec_from_file_location("dino_synthetic", FIXTURE / "synthetic.py")
    synthetic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(synthetic)
    with safe_open(str(FIXTURE / "dino_vits8_maps.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    with torch.device("meta"):
        shapes = [(k, tuple(v.shape)) for k, v in DinoViTAttention(pretrained=False).model.state_dict().items()]
    weights = synthetic.synthetic_state_dict(shapes)
    assert synthetic.digest(weights) == meta["weights_sha256"], "the synthetic weights are not those the fixture was made with"
    path = tmp_path_factory.mktemp("dino") / "synthetic_vits8.pth"
    torch.save(weights, path)
    cases = []
    for name in json.loads(meta["cases"]):
        size = json.loads(meta[f"{name}.input_size"])
        cases.append((name, tuple(size) if isinstance(size, list) else size,
                      tensors[f"{name}.image"], tensors[f"{name}.maps"]))
    return path, cases


def test_vit_maps_equal_dinos_own_at_any_size(dino_fixture):
    """Cropping, resizing and the position-embedding interpolation as DINO's code does them: in
    float64 the maps equal DINO's to float32 rounding; in float32 to ~1e-3 (these synthetic
    weights make attention peaked and so amplify rounding; timm's resampling of the position
    embedding, used before, differed by 0.31 to 0.97 on the same cases)."""
    path, cases = dino_fixture
    assert [c[0] for c in cases] == ["crop_61x90", "rect_72x88", "short_side_112", "square_224",
                                     "patches_784_not_square", "pair_100x100"]
    for name, input_size, image, expected in cases:
        ext = DinoViTAttention("max", weights=path, input_size=input_size)
        h, w = ext.backbone_size(*image.shape[-2:])
        assert expected.shape[-2:] == (h // 8, w // 8), name
        maps64 = ext.double().head_maps(image.double() / 255)
        torch.testing.assert_close(maps64.double(), expected, atol=1e-7, rtol=0, msg=lambda m: f"{name}: {m}")
        maps32 = ext.float().head_maps(image.float() / 255)
        torch.testing.assert_close(maps32.double(), expected, atol=2e-3, rtol=0, msg=lambda m: f"{name}: {m}")


def test_interpolate_pos_embed_follows_dino_not_timm():
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 28 * 28, 16, dtype=torch.float64)
    assert interpolate_pos_embed(pos, (28, 28)) is pos  # the trained grid: untouched
    out = interpolate_pos_embed(pos, (9, 11))
    assert out.shape == (1, 1 + 99, 16) and torch.equal(out[:, :1], pos[:, :1])
    # 784 patches in another shape are interpolated too (DINO skips only the trained square)
    assert not torch.equal(interpolate_pos_embed(pos, (14, 56))[:, 1:15], pos[:, 1:15])
    timm = resample_abs_pos_embed(pos, (9, 11), num_prefix_tokens=1)
    assert (timm - out).abs().max() > 1e-2  # what the maps differed by before
    with pytest.raises(ValueError, match="pos_embed"):
        interpolate_pos_embed(pos[:, :-1], (9, 11))
    with pytest.raises(ValueError, match="grid"):
        interpolate_pos_embed(pos, (0, 11))


def test_vit_crops_to_multiples_of_8_and_fills_the_strip(vit):
    """input_size=None on 61 x 90: the backbone sees the top-left 56 x 88 (DINO's crop, not a
    resize to 64 x 88); the maps cover those pixels and the cut-off rows/columns repeat the last
    covered ones."""
    images = upsampled_batch(("coffee", "chelsea"), (61, 90))
    assert vit.resized_size(61, 90) == (61, 90) and vit.backbone_size(61, 90) == (56, 88)
    hm = vit.head_maps(images)
    assert hm.shape == (2, NUM_HEADS, 7, 11)
    torch.testing.assert_close(hm, vit.head_maps(images[..., :56, :88]), atol=0, rtol=0)  # the crop
    full = vit.maps_to_image(hm, 61, 90)
    assert full.shape == (2, NUM_HEADS, 61, 90)
    torch.testing.assert_close(full[..., :56, :88], F.interpolate(hm, size=(56, 88), mode="bilinear"))
    assert torch.equal(full[..., 56:, :88], full[..., 55:56, :88].expand(-1, -1, 5, -1))
    assert torch.equal(full[..., :, 88:], full[..., :, 87:88].expand(-1, -1, -1, 2))
    check_map(vit(images), images)
    # an image narrower than a patch is enlarged to one patch
    assert vit.resized_size(5, 30) == (8, 30) and vit.backbone_size(5, 30) == (8, 24)


def test_resnet_heads_are_channel_group_means(resnet, batch64):
    with torch.no_grad():
        feats = resnet.model.forward_features((batch64 - resnet.mean) / resnet.std).double()
    bounds = [0, 342, 684, 1025, 1366, 1707, 2048]
    ref = torch.stack([feats[:, a:b].mean(1) for a, b in zip(bounds, bounds[1:])], 1)
    hm = resnet.head_maps(batch64)
    torch.testing.assert_close(hm.double(), ref, atol=1e-5, rtol=1e-5)
    sizes = torch.tensor([b - a for a, b in zip(bounds, bounds[1:])], dtype=torch.float64)
    full = (hm.double() * sizes.view(1, -1, 1, 1)).sum(1) / 2048
    torch.testing.assert_close(full, feats.mean(1), atol=1e-5, rtol=1e-5)


@settings(max_examples=6, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40))
def test_vit_any_size(vit, h, w):
    torch.manual_seed(h * 41 + w)
    images = torch.rand(1, 3, h, w)
    check_map(vit(images), images)


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["pth", "safetensors", "dino_teacher", "module_prefix"])
def test_vit_weights_file_roundtrip(fmt, tmp_path, vit_state, vit, batch64):
    """A file written from a model reproduces that model's maps exactly (``vit`` was built from
    ``vit_state``; a pretrained=False model was checked to equal it in the fixture test)."""
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in vit_state.items()}
    path = tmp_path / f"w.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "pth":
        torch.save(sd, path)
    elif fmt == "safetensors":
        save_file(sd, str(path))
    elif fmt == "dino_teacher":  # DINO's training layout: MultiCropWrapper + projection head
        full = {f"backbone.{k}": v for k, v in sd.items()}
        full["head.mlp.0.weight"] = torch.zeros(8, 384)
        full["head.last_layer.weight_g"] = torch.zeros(8, 1)
        torch.save({"teacher": full, "epoch": 100}, path)
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    loaded = DinoViTAttention("max", weights=path, input_size=None)
    assert torch.equal(loaded(batch64), vit(batch64))


def test_random_model_and_its_saved_file_agree(tmp_path, batch64):
    torch.manual_seed(3)
    src = DinoResNetAttention("avg", pretrained=False, input_size=None)
    path = tmp_path / "r.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    torch.manual_seed(4)
    loaded = DinoResNetAttention("avg", weights=path, input_size=None)
    assert torch.equal(loaded(batch64), src(batch64))
    assert torch.equal(loaded.head_maps(batch64), src.head_maps(batch64))


def test_resnet_torchvision_style_file_with_fc_loads(tmp_path, resnet_state, resnet, batch64):
    sd = dict(resnet_state)
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    path = tmp_path / "dino_resnet50_pretrain.pth"
    torch.save(sd, path)
    loaded = DinoResNetAttention("max", weights=str(path), input_size=None)
    assert torch.equal(loaded(batch64), resnet(batch64))


def test_half_precision_file_loads_as_float32(tmp_path, resnet_state, batch64):
    path = tmp_path / "half.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in resnet_state.items()}, path)
    ext = DinoResNetAttention("avg", weights=path, input_size=None)
    assert all(p.dtype == torch.float32 for p in ext.model.parameters())
    check_map(ext(batch64), batch64)


def test_wrong_keys_give_clear_error(tmp_path, vit_state, resnet_file):
    bad = {("encoder_" + k if i % 2 else k): v for i, (k, v) in enumerate(vit_state.items())}
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(ValueError, match=r"missing keys .*unexpected keys .*encoder_") as e:
        DinoViTAttention(weights=path)
    assert "bad.pth" in str(e.value)
    with pytest.raises(ValueError, match="missing keys"):
        DinoViTAttention(weights=resnet_file)  # a ResNet file for the ViT
    shrunk = dict(vit_state)
    shrunk["pos_embed"] = shrunk["pos_embed"][:, :10]
    torch.save(shrunk, path)
    with pytest.raises(ValueError, match="shape mismatch.*pos_embed"):
        DinoViTAttention(weights=path)


def test_weights_file_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        DinoResNetAttention(weights=tmp_path / "missing.pth")
    path = tmp_path / "full_ckpt.pth"
    torch.save({"teacher": {"x": torch.zeros(1)}, "args": argparse.Namespace(arch="vit_small")}, path)
    with pytest.raises(ValueError, match="weights_only"):
        DinoViTAttention(weights=path)
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="state dict"):
        DinoViTAttention(weights=path)


def _truncated(path, fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


@pytest.mark.parametrize("kind,expected", [
    ("text", r"is a text file, not weights \(it begins 'usage: main_dino.py"),
    ("html", r"is an HTML page"),
    ("lfs", r"is a Git LFS pointer.*git lfs pull"),
    ("empty", r"is empty \(0 bytes\)"),
    ("binary", r"is not weights: expected a torch.save file .* or a .safetensors file, but it begins with the bytes 00 01"),
    ("truncated_zip", r"is truncated or corrupt: it begins as a torch.save zip archive but its zip directory"),
    ("truncated_legacy", r"is truncated or corrupt: it begins as a torch.save file of the pre-1.6 \(pickle\) format"),
    ("truncated_safetensors", r"is truncated or corrupt: it begins as a safetensors file"),
    ("text_named_safetensors", r"is a text file"),
])
def test_a_file_that_is_not_whole_weights_is_named_as_such(kind, expected, tmp_path, resnet_state):
    """A text file or a cut-off download given as weights: a ValueError that names the file and
    says what it is (not a message about argparse args or torch's raw zip error)."""
    path = tmp_path / ("w.safetensors" if "safetensors" in kind else "w.pth")
    small = {k: v for k, v in list(resnet_state.items())[:4]}
    if kind == "text":
        path.write_text("usage: main_dino.py [-h] [--arch ARCH]\n  --arch ARCH  Name of architecture\n")
    elif kind == "html":
        path.write_text("<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head></html>\n")
    elif kind == "lfs":
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 94452385\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "binary":
        path.write_bytes(bytes(range(256)))
    elif kind == "truncated_zip":
        torch.save(small, path)
        _truncated(path)
    elif kind == "truncated_legacy":
        torch.save(small, path, _use_new_zipfile_serialization=False)
        _truncated(path, 0.9)
    elif kind == "truncated_safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in small.items()}, str(path))
        _truncated(path)
    else:
        path.write_text("not safetensors\n")
    with pytest.raises(ValueError, match=expected) as e:
        DinoResNetAttention(weights=path)
    assert str(path) in str(e.value)
    with pytest.raises(ValueError, match=expected):
        weights_mod.load_state_dict_file(path)


def test_weights_format_is_read_from_the_content(tmp_path, resnet_state, resnet, batch64):
    from safetensors.torch import save_file

    path = tmp_path / "dino_resnet50_pretrain.pth"  # a safetensors file under a .pth name
    save_file({k: v.contiguous() for k, v in resnet_state.items()}, str(path))
    assert torch.equal(DinoResNetAttention("max", weights=path, input_size=None)(batch64), resnet(batch64))


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    return tmp_path


@pytest.mark.parametrize("cls", [DinoViTAttention, DinoResNetAttention])
def test_offline_env_fails_fast_naming_both_fixes(cls, empty_caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as e:
        cls(pretrained=True)
    assert time.monotonic() - t0 < 2.0
    msg = str(e.value)
    assert isinstance(e.value, RuntimeError)
    assert "weights=" in msg and "HF_HUB_OFFLINE" in msg and "cache" in msg and "internet" in msg


def test_unreachable_hub_fails_within_about_a_second(empty_caches, monkeypatch):
    """A connect that hangs (as a DNS lookup without network can) is cut off at ~1 s, with the
    hosts probed in parallel."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def hanging_connect(*args, **kwargs):
        time.sleep(2.5)
        raise OSError("simulated timeout")

    monkeypatch.setattr(weights_mod.socket, "create_connection", hanging_connect)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="weights=") as e:
        DinoViTAttention(pretrained=True)
    assert time.monotonic() - t0 < 2.0
    assert "unreachable" in str(e.value) and "huggingface.co" in str(e.value)


def test_pretrained_found_in_torch_hub_cache_offline(empty_caches, monkeypatch, resnet_state,
                                                     resnet, batch64):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = empty_caches / "torch" / "hub" / "checkpoints" / "dino_resnet50_pretrain.pth"
    ckpt.parent.mkdir(parents=True)
    torch.save(resnet_state, ckpt)
    ext = DinoResNetAttention("max", pretrained=True, input_size=None)
    assert torch.equal(ext(batch64), resnet(batch64))


def test_pretrained_found_in_hf_cache_offline(empty_caches, monkeypatch, vit_state, vit, batch64):
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = empty_caches / "hf" / "models--timm--vit_small_patch8_224.dino"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in vit_state.items()}, str(snap / "model.safetensors"))
    ext = DinoViTAttention("max", pretrained=True, input_size=None)
    assert torch.equal(ext(batch64), vit(batch64))


def test_pretrained_false_needs_no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ext = DinoResNetAttention(2, pretrained=False)
    assert ext.name == "dino_resnet50_head2"


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------

BAD_INPUTS = [
    (lambda b: (b * 255).to(torch.uint8), TypeError, "dtype"),
    (lambda b: b[:, :1], ValueError, "3 \\(RGB\\) channels"),
    (lambda b: b[0], ValueError, "\\[B, 3, H, W\\]"),
    (lambda b: b.masked_fill(torch.rand_like(b) < 0.01, float("nan")), ValueError, "NaN"),
    (lambda b: b * 2 - 1, ValueError, "\\[0, 1\\]"),
    (lambda b: b * 255, ValueError, "\\[0, 1\\]"),
    (lambda b: b.numpy(), TypeError, "torch.Tensor"),
]


@pytest.mark.parametrize("make_bad,exc,what", BAD_INPUTS)
@pytest.mark.parametrize("which", ["vit", "resnet", "gaussian", "edge", "sift"])
def test_bad_images_name_the_argument(which, make_bad, exc, what, request, batch64):
    ext = request.getfixturevalue(which) if which in ("vit", "resnet") else get_attention(which)
    with pytest.raises(exc, match=what) as e:
        ext(make_bad(batch64))
    assert "images" in str(e.value)


def test_head_maps_checks_images(vit, batch64):
    with pytest.raises(TypeError, match="images"):
        vit.head_maps((batch64 * 255).to(torch.uint8))


def test_bad_constructor_arguments(vit_file):
    with pytest.raises(ValueError, match="heads"):
        DinoViTAttention(6, weights=vit_file)
    with pytest.raises(ValueError, match="heads"):
        aggregate_heads(torch.zeros(1, 6, 2, 2), "median")
    for bad in [(4, 100), (100,), 7, 224.0, True]:
        with pytest.raises(ValueError, match="input_size"):
            DinoViTAttention(weights=vit_file, input_size=bad)
    assert DinoViTAttention(weights=vit_file, input_size=(100, 100)).backbone_size(50, 60) == (96, 96)
    with pytest.raises(ValueError, match="sigma"):
        GaussianAttention(sigma=0)
    with pytest.raises(ValueError, match="low_threshold"):
        EdgeAttention(low_threshold=0.3, high_threshold=0.2)


# ---------------------------------------------------------------------------------------------
# Normalisation helper
# ---------------------------------------------------------------------------------------------

def test_minmax_normalize_per_map_and_constant():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, 7, dtype=torch.float64)
    x[1, 0] = 4.0
    out = minmax_normalize(x)
    ref = (x - x.amin((-2, -1), keepdim=True)) / (x.amax((-2, -1), keepdim=True) - x.amin((-2, -1), keepdim=True))
    assert torch.equal(out[1, 0], torch.zeros(5, 7, dtype=torch.float64))
    mask = torch.ones(3, 2, dtype=torch.bool)
    mask[1, 0] = False
    torch.testing.assert_close(out[mask], ref[mask])
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# Classical baselines
# ---------------------------------------------------------------------------------------------

def test_gaussian_is_centred_and_content_free(batch64):
    g = GaussianAttention()
    odd = torch.rand(2, 3, 65, 81)
    out = g(odd)
    assert out[0, 0].argmax().item() == 32 * 81 + 40
    assert out[0, 0, 32, 40] == 1.0
    assert torch.equal(out[0], out[1])
    out = g(batch64)[0, 0]
    centre = out[31:33, 31:33]
    assert torch.all(centre == out.max())
    assert torch.equal(out, out.flip(0)) and torch.equal(out, out.flip(1))
    assert out[0, 0] == 0.0
    wider = GaussianAttention(sigma=0.5)(batch64)[0, 0]
    assert wider.mean() > out.mean()


def test_edge_map_on_edges_and_constant(batch64):
    e = EdgeAttention()
    out = e(batch64)
    assert ((out > 0.1).float().mean((-2, -1)) > 0.05).all()
    const = torch.full((2, 3, 64, 64), 0.4)
    assert torch.equal(e(const), torch.zeros(2, 1, 64, 64))


def test_edge_closed_contour_becomes_filled_region():
    img = torch.zeros(1, 3, 96, 96)
    img[:, :, 24:72, 24:72] = 1.0
    img[:, :, 27:69, 27:69] = 0.0  # a square outline, 3 px thick
    out = EdgeAttention()(img)[0, 0]
    assert out[48, 48] > 0.9          # inside the outline: filled
    assert out[4, 4] == 0.0 and out[90, 90] == 0.0  # far outside: nothing


def test_sift_keypoints_and_fallbacks():
    s = SIFTAttention()
    images = upsampled_batch(("astronaut", "coffee"), (128, 128))
    out = s(images)
    check_map(out, images)
    assert (out.amax((-2, -1)) == 1).all() and ((out > 0.1).float().mean((-2, -1)) > 0.02).all()
    const = torch.full((2, 3, 64, 64), 0.7)
    assert torch.equal(s(const), torch.zeros(2, 1, 64, 64))
    tiny = torch.rand(2, 3, 6, 5)   # too small for SIFT's scale space: skimage raises inside
    assert torch.equal(s(tiny), torch.zeros(2, 1, 6, 5))


@settings(max_examples=8, deadline=None)
@given(h=st.integers(1, 48), w=st.integers(1, 48), seed=st.integers(0, 2**16))
def test_classical_any_size(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, h, w, generator=g)
    for ext in (GaussianAttention(), EdgeAttention(), SIFTAttention()):
        check_map(ext(images), images)
