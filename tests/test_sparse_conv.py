"""ops.sparse_conv2d: every backend against the dense convolution (float64 where the backend
takes it) and against the reference; inactive outputs untouched bit for bit; tile lists; bad
input.  Small shapes: the Triton interpreter is slow."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from yoda_sparse import ops
from yoda_sparse.ops import registry
from yoda_sparse.ops.sparse_conv import NormParams, conv_output_size
from yoda_sparse.ops.sparse_conv_reference import activation, prologue

# geometry cases the UNets use: (kernel, stride, padding, padding_mode, upsample, transposed)
GEOMETRIES = {
    "3x3": (3, 1, 1, "zeros", 1, False),
    "3x3_reflect": (3, 1, 1, "reflect", 1, False),
    "1x1": (1, 1, 0, "zeros", 1, False),
    "3x3_s2": (3, 2, 1, "zeros", 1, False),
    "3x3_s2_reflect": (3, 2, 1, "reflect", 1, False),
    "up2_3x3": (3, 1, 1, "zeros", 2, False),
    "convT_4x4_s2": (4, 2, 1, "zeros", 1, True),
}


def available_backends():
    names = []
    for b in registry.backends("sparse_conv2d"):
        if b.name != "reference" and b.availability() is None:
            names.append(b.name)
    return names


def dense_truth(x, w, b, geo, *, x2=None, norm=None, act=None, out_act=None, add=None, residual=None):
    k, s, p, mode, up, tr = geo
    inp = prologue(x, x2, norm, act)
    if up > 1:
        inp = F.interpolate(inp, scale_factor=up, mode="nearest")
    if tr:
        y = F.conv_transpose2d(inp, w, b, stride=s, padding=p)
    else:
        if mode == "reflect" and p:
            inp, p = F.pad(inp, (p,) * 4, mode="reflect"), 0
        y = F.conv2d(inp, w, b, stride=s, padding=p)
    y = activation(y, out_act)
    if add is not None:
        y = y + add[:, :, None, None]
    if residual is not None:
        y = y + residual
    return y


def make_inputs(geo, dtype, *, B=2, C1=5, C2=0, Co=6, H=11, W=13, seed=0):
    k, s, p, mode, up, tr = geo
    g = torch.Generator().manual_seed(seed)
    if tr or s > 1:  # even sizes for the stride-2 layers, as the UNets have
        H, W = H + H % 2, W + W % 2
    x = torch.randn(B, C1, H, W, generator=g, dtype=dtype)
    x2 = torch.randn(B, C2, H, W, generator=g, dtype=dtype) if C2 else None
    shape = (C1 + C2, Co, k, k) if tr else (Co, C1 + C2, k, k)
    w = torch.randn(shape, generator=g, dtype=dtype) / (k * (C1 + C2)) ** 0.5
    b = torch.randn(Co, generator=g, dtype=dtype)
    Ho = conv_output_size(H, k, s, p, up, tr)
    Wo = conv_output_size(W, k, s, p, up, tr)
    return x, x2, w, b, Ho, Wo


def pixel_mask(tile_map, tile, Ho, Wo):
    th, tw = tile
    return tile_map.repeat_interleave(th, 1).repeat_interleave(tw, 2)[:, :Ho, :Wo].unsqueeze(1)


def call(x, w, b, tiles, out, geo, tile, backend, **kw):
    k, s, p, mode, up, tr = geo
    return ops.sparse_conv2d(x, w, b, tiles, out, tile=tile, stride=s, padding=p, padding_mode=mode,
                             upsample=up, transposed=tr, backend=backend, **kw)


@pytest.mark.parametrize("geo_name", list(GEOMETRIES))
@pytest.mark.parametrize("tile", [(4, 4), (2, 6)])
def test_reference_equals_dense_convolution_in_listed_tiles_only(geo_name, tile):
    geo = GEOMETRIES[geo_name]
    x, _, w, b, Ho, Wo = make_inputs(geo, torch.float64)
    g = torch.Generator().manual_seed(1)
    tmap = torch.rand(x.shape[0], -(-Ho // tile[0]), -(-Wo // tile[1]), generator=g) < 0.5
    tmap[0, -1, -1] = True  # an edge tile that overhangs the image
    out0 = torch.randn(x.shape[0], w.shape[1] if geo[5] else w.shape[0], Ho, Wo, dtype=torch.float64)
    out = out0.clone()
    call(x, w, b, tmap, out, geo, tile, "reference")
    pix = pixel_mask(tmap, tile, Ho, Wo).expand_as(out)
    truth = dense_truth(x, w, b, geo)
    torch.testing.assert_close(out[pix], truth[pix], rtol=1e-12, atol=1e-12)
    assert torch.equal(out[~pix], out0[~pix])


FUSIONS = {
    "plain": {},
    "concat_norm_silu_add": dict(x2=True, norm=True, act="silu", add=True),
    "mish_in_mish_out_residual": dict(act="mish", out_act="mish", residual=True),
    "everything": dict(x2=True, norm=True, act="silu", out_act="silu", add=True, residual=True),
    "accumulate_into_out": dict(norm=True, act="silu", residual="out"),
}


def fused_kwargs(spec, x, x2, Co, Ho, Wo, dtype, seed=2):
    g = torch.Generator().manual_seed(seed)
    B = x.shape[0]
    cin = x.shape[1] + (x2.shape[1] if spec.get("x2") else 0)
    kw = {}
    if spec.get("x2"):
        kw["x2"] = x2
    if spec.get("norm"):
        G = 1 if cin % 2 else 2
        kw["norm"] = NormParams(torch.randn(B, G, generator=g, dtype=torch.float64).to(dtype),
                                (torch.rand(B, G, generator=g, dtype=torch.float64) + 0.5).to(dtype),
                                torch.randn(cin, generator=g, dtype=dtype), torch.randn(cin, generator=g, dtype=dtype))
    for name in ("act", "out_act"):
        if name in spec:
            kw[name] = spec[name]
    if spec.get("add"):
        kw["add"] = torch.randn(B, Co, generator=g, dtype=dtype)
    if spec.get("residual") is True:
        kw["residual"] = torch.randn(B, Co, Ho, Wo, generator=g, dtype=dtype)
    return kw


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("geo_name", list(GEOMETRIES))
@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_backend_matches_reference_and_dense(backend, geo_name, fusion):
    geo = GEOMETRIES[geo_name]
    spec = FUSIONS[fusion]
    dtype = torch.float64 if backend == "cpp" else torch.float32
    if backend == "triton" and geo[5]:
        pytest.skip("transposed convolutions go to the other backends")
    x, x2, w, b, Ho, Wo = make_inputs(geo, dtype, C2=3 if spec.get("x2") else 0, Co=6)
    Co = w.shape[1] if geo[5] else w.shape[0]
    tile = (4, 4) if not geo[5] else (4, 2)
    g = torch.Generator().manual_seed(3)
    tmap = torch.rand(x.shape[0], -(-Ho // tile[0]), -(-Wo // tile[1]), generator=g) < 0.6
    tmap[1] = ~tmap[0]  # different tiles per image
    out0 = torch.randn(x.shape[0], Co, Ho, Wo, dtype=dtype)
    kw = fused_kwargs(spec, x, x2, Co, Ho, Wo, dtype)
    outs = {}
    for name in ("reference", backend):
        out = out0.clone()
        kwn = dict(kw, residual=out) if spec.get("residual") == "out" else kw
        call(x, w, b, tmap, out, geo, tile, name, **kwn)
        outs[name] = out
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(outs[backend], outs["reference"], **tol)
    pix = pixel_mask(tmap, tile, Ho, Wo).expand_as(out0)
    assert torch.equal(outs[backend][~pix], out0[~pix]), "inactive outputs must be untouched bit for bit"
    kwd = {k: v for k, v in kw.items()}
    if spec.get("residual") == "out":
        kwd["residual"] = out0
    truth = dense_truth(x, w, b, geo, **kwd)
    torch.testing.assert_close(outs[backend][pix], truth[pix], **tol)


@pytest.mark.parametrize("backend", ["reference"] + available_backends())
def test_full_tile_list_equals_conv2d_and_empty_list_changes_nothing(backend):
    geo = GEOMETRIES["3x3"]
    dtype = torch.float32
    x, _, w, b, Ho, Wo = make_inputs(geo, dtype, B=1, C1=8, Co=8, H=16, W=16)
    out = torch.zeros(1, 8, Ho, Wo)
    call(x, w, b, torch.ones(1, 4, 4, dtype=torch.bool), out, geo, (4, 4), backend)
    torch.testing.assert_close(out, F.conv2d(x, w, b, padding=1), rtol=1e-5, atol=1e-5)
    before = out.clone()
    call(x, w, b, torch.zeros(1, 4, 4, dtype=torch.bool), out, geo, (4, 4), backend)
    assert torch.equal(out, before)


@pytest.mark.parametrize("backend", ["reference"] + available_backends())
def test_channels_last_and_non_contiguous_inputs(backend):
    geo = GEOMETRIES["3x3_reflect"]
    dtype = torch.float64 if backend != "triton" else torch.float32
    g = torch.Generator().manual_seed(5)
    big = torch.randn(2, 7, 15, 17, generator=g, dtype=dtype)
    x = big[:, 1:6, 1:14:, 2:15]  # a strided view, not contiguous in any format
    x_cl = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 5, 3, 3, generator=g, dtype=dtype)
    b = torch.randn(4, generator=g, dtype=dtype)
    tmap = torch.rand(2, 5, 5, generator=g) < 0.5
    ref = torch.zeros(2, 4, 13, 13, dtype=dtype)
    call(x.contiguous(), w, b, tmap, ref, geo, (3, 3), "reference")
    for inp in (x, x_cl):
        for fmt in (torch.contiguous_format, torch.channels_last):
            out = torch.zeros(2, 4, 13, 13, dtype=dtype).contiguous(memory_format=fmt)
            call(inp, w, b, tmap, out, geo, (3, 3), backend)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("geo_name", ["3x3", "3x3_s2", "convT_4x4_s2", "up2_3x3"])
def test_cpp_strips_split_long_segments(monkeypatch, geo_name):
    """Tiny strips (YODA_SPARSE_CONV_STRIP_BYTES) cut rows of tiles across several strips, each
    piece with its own halo; the result is unchanged."""
    if "cpp" not in available_backends():
        pytest.skip("C++ extension not available")
    monkeypatch.setenv("YODA_SPARSE_CONV_STRIP_BYTES", "2000")
    geo = GEOMETRIES[geo_name]
    x, x2, w, b, Ho, Wo = make_inputs(geo, torch.float64, B=2, C1=3, C2=2, Co=4, H=14, W=30)
    tile = (2, 2)
    tmap = torch.rand(2, -(-Ho // 2), -(-Wo // 2), generator=torch.Generator().manual_seed(4)) < 0.8
    outs = []
    for backend in ("reference", "cpp"):
        out = torch.zeros(2, 4, Ho, Wo, dtype=torch.float64)
        call(x, w, b, tmap, out, geo, tile, backend, x2=x2, act="silu")
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ["strip", "windows", "pixels"])
@pytest.mark.parametrize("strip_bytes", [None, "3000"])
@pytest.mark.parametrize("geo_name", list(GEOMETRIES))
def test_cpp_layouts_agree(monkeypatch, geo_name, strip_bytes, layout):
    """The C++ kernel's three layouts (segments side by side in a strip; one halo'd window per
    tile, batched; one window per output pixel, an im2col GEMM), forced by
    YODA_SPARSE_CONV_LAYOUT, on odd sizes with clipped edge tiles, a fused prologue and
    epilogue, and (with tiny strips) several window batches, the last one padded to its ladder
    size. Transposed and 1x1 layers always take strips."""
    if "cpp" not in available_backends():
        pytest.skip("C++ extension not available")
    monkeypatch.setenv("YODA_SPARSE_CONV_LAYOUT", layout)
    if strip_bytes:
        monkeypatch.setenv("YODA_SPARSE_CONV_STRIP_BYTES", strip_bytes)
    geo = GEOMETRIES[geo_name]
    x, x2, w, b, Ho, Wo = make_inputs(geo, torch.float64, B=2, C1=3, C2=2, Co=4, H=19, W=23)
    Co = w.shape[1] if geo[5] else w.shape[0]
    tile = (4, 2) if geo[5] else (5, 3)
    tmap = torch.rand(2, -(-Ho // tile[0]), -(-Wo // tile[1]), generator=torch.Generator().manual_seed(6)) < 0.5
    tmap[:, -1, -1] = True  # the corner tile, clipped in both directions
    add = torch.randn(2, Co, dtype=torch.float64)
    out0 = torch.randn(2, Co, Ho, Wo, dtype=torch.float64)
    outs = []
    for backend in ("reference", "cpp"):
        out = out0.clone()
        call(x, w, b, tmap, out, geo, tile, backend, x2=x2, act="silu", out_act="silu", add=add, residual=out)
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-10)
    pix = pixel_mask(tmap, tile, Ho, Wo).expand_as(out0)
    assert torch.equal(outs[1][~pix], out0[~pix])
    truth = dense_truth(x, w, b, geo, x2=x2, act="silu", out_act="silu", add=add, residual=out0)
    torch.testing.assert_close(outs[1][pix], truth[pix], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ["pixels", None])
@pytest.mark.parametrize("geo_name", ["3x3", "3x3_s2_reflect", "up2_3x3"])
def test_cpp_one_pixel_tiles_without_bias_on_strided_views(monkeypatch, geo_name, layout):
    """1-pixel tiles (what the engine uses at deep levels), no bias, a strided input view, an
    NCHW output and float32: the im2col GEMM against the reference; the default choice (None)
    too, with channels wide enough for the cost estimate to pick the pixel layout."""
    if "cpp" not in available_backends():
        pytest.skip("C++ extension not available")
    if layout:
        monkeypatch.setenv("YODA_SPARSE_CONV_LAYOUT", layout)
    geo = GEOMETRIES[geo_name]
    g = torch.Generator().manual_seed(8)
    C = 300
    big = torch.randn(1, C + 3, 11, 14, generator=g)
    x = big[:, 2:C + 2, 1:10, 1:14:2]  # [1, C, 9, 7], not contiguous in any format
    k, s, p, mode, u, _ = geo
    w = torch.randn(5, C, k, k, generator=g) / (3 * C ** 0.5)
    Ho = (9 * u + 2 * p - k) // s + 1
    Wo = (7 * u + 2 * p - k) // s + 1
    tmap = torch.rand(1, Ho, Wo, generator=g) < 0.4
    outs = []
    for backend in ("reference", "cpp"):
        out = torch.randn(1, 5, Ho, Wo, generator=torch.Generator().manual_seed(9))
        call(x, w, None, tmap, out, geo, (1, 1), backend, act="silu")
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-4, atol=2e-4)
    untouched = ~tmap[:, None].expand_as(outs[0])
    assert torch.equal(outs[1][untouched], outs[0][untouched])


@pytest.mark.parametrize("brgemm", ["1", "0"])
@pytest.mark.parametrize("geo_name", ["3x3", "1x1", "3x3_s2_reflect", "up2_3x3"])
def test_cpp_pixel_gemm_in_float32_against_float64(monkeypatch, geo_name, brgemm):
    """The pixel layout's float32 GEMM (oneDNN's BRGEMM micro-kernel with the epilogue fused per
    block, or, with YODA_SPARSE_CONV_BRGEMM=0, oneDNN's 1x1 convolution) against the float64
    dense truth: several row blocks (over 64 pixels), K chunks with a remainder (C = 2 x 61 + 9
    concatenated channels), output channels in blocks with a ragged last one (300), bias,
    group norm + SiLU, a per-image add, and the residual being out itself, in a channels_last and
    an NCHW out; pixels outside the tiles untouched."""
    if "cpp" not in available_backends():
        pytest.skip("C++ extension not available")
    monkeypatch.setenv("YODA_SPARSE_CONV_LAYOUT", "pixels")
    monkeypatch.setenv("YODA_SPARSE_CONV_BRGEMM", brgemm)
    geo = GEOMETRIES[geo_name]
    x, x2, w, b, Ho, Wo = make_inputs(geo, torch.float64, B=2, C1=122, C2=9, Co=300, H=12, W=15, seed=3)
    G = 131
    g = torch.Generator().manual_seed(4)
    norm = NormParams(torch.randn(2, G, generator=g, dtype=torch.float64),
                      torch.rand(2, G, generator=g, dtype=torch.float64) + 0.5,
                      torch.randn(131, generator=g, dtype=torch.float64), torch.randn(131, generator=g, dtype=torch.float64))
    add = torch.randn(2, 300, generator=g, dtype=torch.float64)
    tmap = torch.rand(2, Ho, Wo, generator=g) < 0.6
    out0 = torch.randn(2, 300, Ho, Wo, generator=g, dtype=torch.float64)
    truth = dense_truth(x, w, b, geo, x2=x2, norm=norm, act="silu", add=add, residual=out0)
    f32 = lambda t: t.float()
    norm32 = NormParams(*(f32(t) for t in norm))
    pix = pixel_mask(tmap, (1, 1), Ho, Wo).expand_as(out0)
    for fmt in (torch.channels_last, torch.contiguous_format):
        out = out0.float().contiguous(memory_format=fmt)
        call(f32(x).contiguous(memory_format=torch.channels_last), f32(w), f32(b), tmap, out, geo, (1, 1), "cpp",
             x2=f32(x2), norm=norm32, act="silu", add=f32(add), residual=out)
        torch.testing.assert_close(out.double()[pix], truth[pix], rtol=1e-4, atol=1e-4)
        assert torch.equal(out[~pix], out0.float()[~pix])


@pytest.mark.parametrize("strip_bytes", [None, "3000"])
@pytest.mark.parametrize("tile", [(5, 3), (4, 8), (1, 1)])
@pytest.mark.parametrize("geo_name", ["3x3", "3x3_reflect", "1x1", "up2_3x3", "3x3_s2"])
def test_cpp_direct_layout_in_float32_against_float64(monkeypatch, geo_name, tile, strip_bytes):
    """The direct layout (each segment's halo'd window gathered once, one BRGEMM per kernel tap
    over its flat pixels, the epilogue writing each block straight into out) against the
    float64 dense truth: clipped edge tiles, segments over several row blocks (over 64 flat
    outputs) and, with tiny chunks, one segment per gathered chunk; K chunks with a remainder
    (C = 2 x 61 + 9 concatenated channels), ragged output-channel blocks (300), group norm +
    SiLU, a per-image add, the residual being out itself, channels_last and NCHW outs, a
    non-contiguous input; pixels outside the tiles untouched. Stride 2 is not a direct case: it
    takes strips."""
    if "cpp" not in available_backends():
        pytest.skip("C++ extension not available")
    monkeypatch.setenv("YODA_SPARSE_CONV_LAYOUT", "direct")
    if strip_bytes:
        monkeypatch.setenv("YODA_SPARSE_CONV_STRIP_BYTES", strip_bytes)
    geo = GEOMETRIES[geo_name]
    x, x2, w, b, Ho, Wo = make_inputs(geo, torch.float64, B=2, C1=122, C2=9, Co=300, H=13, W=21, seed=5)
    g = torch.Generator().manual_seed(6)
    norm = NormParams(torch.randn(2, 131, generator=g, dtype=torch.float64),
                      torch.rand(2, 131, generator=g, dtype=torch.float64) + 0.5,
                      torch.randn(131, generator=g, dtype=torch.float64), torch.randn(131, generator=g, dtype=torch.float64))
    add = torch.randn(2, 300, generator=g, dtype=torch.float64)
    tmap = torch.rand(2, -(-Ho // tile[0]), -(-Wo // tile[1]), generator=g) < 0.6
    tmap[:, -1, -1] = True  # the corner tile, clipped in both directions
    tmap[1, 0, :] = True  # a whole tile row: one long segment
    out0 = torch.randn(2, 300, Ho, Wo, generator=g, dtype=torch.float64)
    truth = dense_truth(x, w, b, geo, x2=x2, norm=norm, act="silu", add=add, residual=out0)
    norm32 = NormParams(*(t.float() for t in norm))
    pix = pixel_mask(tmap, tile, Ho, Wo).expand_as(out0)
    x32 = x.float().transpose(2, 3).contiguous().transpose(2, 3)  # NCHW-shaped view of an NCWH tensor
    for fmt in (torch.channels_last, torch.contiguous_format):
        out = out0.float().contiguous(memory_format=fmt)
        call(x32, w.float(), b.float(), tmap, out, geo, tile, "cpp", x2=x2.float(), norm=norm32, act="silu",
             add=add.float(), residual=out)
        torch.testing.assert_close(out.double()[pix], truth[pix], rtol=1e-4, atol=1e-4)
        assert torch.equal(out[~pix], out0.float()[~pix])


def test_cpp_direct_layout_without_bias_or_epilogue(monkeypatch):
    """The direct layout's plainest call: no bias, no prologue or epilogue, float32 against
    F.conv2d in every listed tile, an empty tile row, the rest of out untouched."""
    if "cpp" not in available_backends():
        pytest.skip("C++ extension not available")
    monkeypatch.setenv("YODA_SPARSE_CONV_LAYOUT", "direct")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 64, 20, 36, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(80, 64, 3, 3, generator=g) / 24
    tmap = torch.rand(1, 3, 5, generator=g) < 0.5
    tmap[0, 1] = False
    tmap[0, 0, 0] = True
    out0 = torch.randn(1, 80, 20, 36, generator=g)
    out = out0.clone()
    call(x, w, None, tmap, out, GEOMETRIES["3x3"], (8, 8), "cpp")
    truth = F.conv2d(x.double(), w.double(), padding=1)
    pix = pixel_mask(tmap, (8, 8), 20, 36).expand_as(out0)
    torch.testing.assert_close(out.double()[pix], truth[pix], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[~pix], out0[~pix])


def test_cpp_pixel_gemm_sees_a_weight_changed_in_place(monkeypatch):
    """The packed weights of the BRGEMM path are cached per weight tensor: an in-place update
    (a new version of the same tensor) and a new tensor at the same shape are both seen."""
    if "cpp" not in available_backends():
        pytest.skip("C++ extension not available")
    monkeypatch.setenv("YODA_SPARSE_CONV_LAYOUT", "pixels")
    geo = GEOMETRIES["3x3"]
    x, _, w, b, Ho, Wo = make_inputs(geo, torch.float32, B=1, C1=64, Co=64, H=9, W=9, seed=5)
    tmap = torch.ones(1, Ho, Wo, dtype=torch.bool)
    for step in range(3):
        if step == 1:
            w.mul_(-2.0)
        elif step == 2:
            w = torch.randn_like(w)
        out = torch.zeros(1, 64, Ho, Wo)
        call(x, w, b, tmap, out, geo, (1, 1), "cpp")
        torch.testing.assert_close(out, F.conv2d(x, w, b, padding=1), rtol=1e-4, atol=1e-4)
    # the packed copy is counted while its weight lives, and no longer once it is gone
    packed = torch.ops.yoda_sparse.ext_packed_weight_bytes
    held = packed()
    if os.environ.get("YODA_SPARSE_CONV_BRGEMM") != "0" and held:
        assert held >= w.numel() * 4
        del w
        assert packed() == held - 64 * 64 * 9 * 4


def test_cpp_packed_weight_is_shared_by_a_weight_and_its_aliases(monkeypatch):
    """A parameter and the detached alias a caller makes of it (the sparse engine makes one per
    sampling run) share one packed copy: a second alias adds no bytes, an in-place update
    through the alias is seen by the original, and the copy lives while any alias does."""
    if "cpp" not in available_backends():
        pytest.skip("C++ extension not available")
    if os.environ.get("YODA_SPARSE_CONV_BRGEMM") == "0":
        pytest.skip("BRGEMM disabled: no packed weights")
    monkeypatch.setenv("YODA_SPARSE_CONV_LAYOUT", "pixels")
    geo = GEOMETRIES["3x3"]
    x, _, w, b, Ho, Wo = make_inputs(geo, torch.float32, B=1, C1=48, Co=40, H=7, W=7, seed=9)
    tmap = torch.ones(1, Ho, Wo, dtype=torch.bool)
    packed = torch.ops.yoda_sparse.ext_packed_weight_bytes
    param = torch.nn.Parameter(w.clone())
    before = packed()
    out = torch.zeros(1, 40, Ho, Wo)
    call(x, param.detach(), b, tmap, out, geo, (1, 1), "cpp")
    held = packed()
    if held == before:
        pytest.skip("this CPU has no BRGEMM kernel")
    assert held == before + w.numel() * 4
    alias = param.detach()
    call(x, alias, b, tmap, out, geo, (1, 1), "cpp")
    assert packed() == held  # the same copy, not a second one
    alias.mul_(0.5)  # shared version counter: the update is seen through the other alias
    call(x, param.detach(), b, tmap, out, geo, (1, 1), "cpp")
    torch.testing.assert_close(out, F.conv2d(x, w * 0.5, b, padding=1), rtol=1e-4, atol=1e-4)
    del param
    assert packed() == held  # the alias keeps the storage, hence the copy
    del alias
    assert packed() == before


@pytest.mark.parametrize("backend", ["reference"] + available_backends())
def test_count_limits_the_list(backend):
    geo = GEOMETRIES["3x3"]
    x, _, w, b, Ho, Wo = make_inputs(geo, torch.float32, B=1, C1=4, Co=4, H=8, W=8)
    tiles, count = ops.tile_list(torch.ones(1, 2, 2, dtype=torch.bool))
    assert count.item() == 4
    out = torch.zeros(1, 4, 8, 8)
    call(x, w, b, tiles, out, geo, (4, 4), backend, count=torch.tensor([1], dtype=torch.int32))
    dense = F.conv2d(x, w, b, padding=1)
    torch.testing.assert_close(out[..., :4, :4], dense[..., :4, :4], rtol=1e-5, atol=1e-5)
    assert not out[..., 4:, :].any() and not out[..., :, 4:].any()


def test_tile_list_order_capacity_and_count():
    m = torch.tensor([[[True, False, True], [False, True, False]], [[False, False, False], [True, True, False]]])
    tiles, count = ops.tile_list(m)
    assert tiles.dtype == torch.int32 and tiles.shape == (12, 3)
    assert count.tolist() == [5]
    assert tiles[:5].tolist() == [[0, 0, 0], [0, 0, 2], [0, 1, 1], [1, 1, 0], [1, 1, 1]]
    assert (tiles[5:] == -1).all()
    small, count2 = ops.tile_list(m, capacity=2)
    assert small.tolist() == [[0, 0, 0], [0, 0, 2]] and count2.item() == 5  # count tells the overflow
    empty, c0 = ops.tile_list(torch.zeros(1, 2, 2, dtype=torch.bool))
    assert c0.item() == 0 and (empty == -1).all()


def test_bad_input_names_the_argument():
    x = torch.randn(1, 4, 8, 8)
    w = torch.randn(4, 4, 3, 3)
    out = torch.zeros(1, 4, 8, 8)
    tiles = torch.ones(1, 2, 2, dtype=torch.bool)
    cases = [
        (dict(weight=torch.randn(4, 3, 3, 3)), "weight"),
        (dict(weight=w.double()), "weight"),
        (dict(out=torch.zeros(1, 4, 7, 8)), "out"),
        (dict(tile=0), "tile"),
        (dict(tiles=torch.ones(1, 3, 2, dtype=torch.bool)), "tiles"),
        (dict(tiles=torch.tensor([[0, 5, 0]], dtype=torch.int32)), "tiles"),
        (dict(tiles=torch.tensor([[0, 0, 0]], dtype=torch.int64)), "tiles"),
        (dict(padding_mode="circular"), "padding_mode"),
        (dict(stride=0), "stride"),
        (dict(upsample=3), "upsample"),
        (dict(act="relu"), "act"),
        (dict(add=torch.zeros(2, 4)), "add"),
        (dict(residual=torch.zeros(1, 4, 4, 4)), "residual"),
        (dict(norm=NormParams(torch.zeros(1, 3), torch.ones(1, 3))), "norm"),
        (dict(x2=torch.randn(1, 2, 7, 8)), "x2"),
        (dict(x=torch.randn(1, 4, 8, 8, dtype=torch.float64)), "weight"),
    ]
    for change, name in cases:
        kw = dict(x=x, weight=w, bias=None, tiles=tiles, out=out, tile=4)
        kw.update(change)
        with pytest.raises((ValueError, TypeError), match=name):
            ops.sparse_conv2d(kw.pop("x"), kw.pop("weight"), kw.pop("bias"), kw.pop("tiles"), kw.pop("out"), **kw)
    with pytest.raises(ValueError, match="tile"):
        ops.sparse_conv2d(x, torch.randn(4, 4, 4, 4), None, tiles, torch.zeros(1, 4, 16, 16), tile=3, stride=2,
                          transposed=True)


def test_custom_op_schema_and_fake_kernel():
    from yoda_sparse.ops import cpp_backend

    if cpp_backend.ensure_loaded() is not None:
        pytest.skip("C++ extension not available")
    x = torch.randn(1, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 4, 3, 3)
    tiles, count = ops.tile_list(torch.ones(1, 2, 2, dtype=torch.bool))
    out = torch.zeros(1, 4, 8, 8)
    args = (x, None, w, None, tiles, count, out, [4, 4], 1, 1, 0, 1, False, None, None, None, None, 1, 0, None, None,
            False)
    torch.library.opcheck(torch.ops.yoda_sparse.ext_sparse_conv2d.default, args)
