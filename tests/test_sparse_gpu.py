"""GPU checks of the tile-sparse convolution and the sparse engine (skipped without CUDA; run by
benchmarks/gpu_check.sh): the Triton and CUDA-extension backends on CUDA tensors against the
float64 CPU reference, bf16 included, and the Triton backend inside a captured CUDA graph."""
from __future__ import annotations

import pytest
import torch

from yoda_sparse import ops
from yoda_sparse.ops import registry

pytestmark = pytest.mark.gpu

GEOMETRIES = {
    "3x3": (3, 1, 1, "zeros", 1, False),
    "3x3_reflect": (3, 1, 1, "reflect", 1, False),
    "1x1": (1, 1, 0, "zeros", 1, False),
    "3x3_s2": (3, 2, 1, "zeros", 1, False),
    "up2_3x3": (3, 1, 1, "zeros", 2, False),
    "convT_4x4_s2": (4, 2, 1, "zeros", 1, True),
}
TOL = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}  # tf32/fp16/bf16 convolutions


def gpu_backends():
    if not torch.cuda.is_available():
        return ["triton", "cuda_ext"]
    return [b.name for b in registry.backends("sparse_conv2d") if b.name in ("triton", "cuda_ext")]


def _inputs(geo, B=2, C1=24, C2=8, Co=40, H=22, W=18, seed=0):
    k, s, p, mode, up, tr = geo
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C1, H, W, generator=g, dtype=torch.float64)
    x2 = torch.randn(B, C2, H, W, generator=g, dtype=torch.float64)
    shape = (C1 + C2, Co, k, k) if tr else (Co, C1 + C2, k, k)
    w = torch.randn(shape, generator=g, dtype=torch.float64) / (k * (C1 + C2)) ** 0.5
    b = torch.randn(Co, generator=g, dtype=torch.float64)
    norm = ops.NormParams(torch.randn(B, 8, generator=g, dtype=torch.float64),
                          torch.rand(B, 8, generator=g, dtype=torch.float64) + 0.5,
                          torch.randn(C1 + C2, generator=g, dtype=torch.float64),
                          torch.randn(C1 + C2, generator=g, dtype=torch.float64))
    add = torch.randn(B, Co, generator=g, dtype=torch.float64)
    return x, x2, w, b, norm, add


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("geo_name", list(GEOMETRIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_backend_matches_the_float64_reference(backend, geo_name, dtype):
    geo = GEOMETRIES[geo_name]
    k, s, p, mode, up, tr = geo
    if backend == "triton" and tr:
        pytest.skip("transposed convolutions go to the other backends")
    x, x2, w, b, norm, add = _inputs(geo)
    B, Co = x.shape[0], (w.shape[1] if tr else w.shape[0])
    Ho = ops.sparse_conv.conv_output_size(x.shape[2], k, s, p, up, tr)
    Wo = ops.sparse_conv.conv_output_size(x.shape[3], k, s, p, up, tr)
    tile = (4, 4)
    tmap = torch.rand(B, -(-Ho // 4), -(-Wo // 4), generator=torch.Generator().manual_seed(1)) < 0.6
    out0 = torch.randn(B, Co, Ho, Wo, dtype=torch.float64)
    kw = dict(tile=tile, stride=s, padding=p, padding_mode=mode, upsample=up, transposed=tr, act="silu",
              out_act="silu", x2=x2, norm=norm, add=add)
    ref = out0.clone()
    ops.sparse_conv2d(x, w, b, tmap, ref, backend="reference", residual=out0, **kw)
    dev = torch.device("cuda")
    cast = lambda t: t.to(device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.to(dev, dtype)  # noqa: E731
    gn = ops.NormParams(norm.mean.float().to(dev), norm.rstd.float().to(dev), norm.weight.to(dev, dtype), norm.bias.to(dev, dtype))
    out = cast(out0)
    res = cast(out0)
    ops.sparse_conv2d(cast(x), cast(w), b.to(dev, dtype), tmap.to(dev), out, backend=backend, residual=res,
                      **dict(kw, x2=cast(x2), norm=gn, add=add.to(dev, dtype)))
    err = (out.double().cpu() - ref).abs().max().item()
    assert err <= TOL[dtype] * (1 + ref.abs().max().item()), f"{backend} {geo_name} {dtype}: max error {err}"
    pix = tmap.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, :Ho, :Wo].unsqueeze(1).expand_as(out0)
    assert torch.equal(out.cpu()[~pix], cast(out0).cpu()[~pix])


def test_triton_backend_runs_inside_a_cuda_graph():
    if "triton" not in gpu_backends():
        pytest.skip("no Triton backend")
    dev = torch.device("cuda")
    x = torch.randn(1, 32, 32, 32, device=dev).contiguous(memory_format=torch.channels_last)
    w = torch.randn(32, 32, 3, 3, device=dev) * 0.05
    out = torch.zeros_like(x)
    tile_map = torch.zeros(1, 4, 4, dtype=torch.bool, device=dev)
    tiles, count = ops.tile_list(tile_map)
    ops.sparse_conv2d(x, w, None, tiles, out, count=count, tile=8, backend="triton")  # warm-up/compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.sparse_conv2d(x, w, None, tiles, out, count=count, tile=8, backend="triton")
    for active in ([0, 5], [3, 7, 9, 15]):
        tile_map.zero_()
        tile_map.view(-1)[active] = True
        t2, c2 = ops.tile_list(tile_map)
        tiles.copy_(t2)
        count.copy_(c2)
        out.zero_()
        graph.replay()
        ref = torch.zeros_like(out)
        ops.sparse_conv2d(x, w, None, tile_map, ref, tile=8, backend="reference")
        torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)


def test_sparse_engine_on_gpu_matches_dense_in_the_first_step():
    from yoda_sparse.models import build_model
    from yoda_sparse.sparse import SparseUNet

    dev = torch.device("cuda")
    model = build_model("sr3_tiny").eval().to(dev)
    z = torch.randn(2, 3, 64, 64, device=dev)
    x_up = torch.randn(2, 3, 64, 64, device=dev)
    level = torch.rand(2, device=dev)
    mask = torch.zeros(2, 1, 64, 64, dtype=torch.bool, device=dev)
    mask[..., 10:40, 5:30] = True
    eng = SparseUNet(model, cost_model=2.0, norm_stats="current")  # whole-map statistics: exact here
    with torch.no_grad():
        dense = model(torch.cat([x_up, z], 1), level)
    torch.testing.assert_close(eng(z, mask, x_up=x_up, noise_level=level), dense, rtol=1e-3, atol=1e-3)
    eps = eng(z, mask, x_up=x_up, noise_level=level)  # sparse, unchanged input: equal in the active area
    m = mask.expand_as(eps)
    torch.testing.assert_close(eps[m], dense[m], rtol=2e-3, atol=2e-3)
    probed = SparseUNet(model, cost_model=2.0)  # probe tiles and weighted statistics on the device
    probed(z, mask, x_up=x_up, noise_level=level)
    assert torch.isfinite(probed(z, mask, x_up=x_up, noise_level=level)).all()
