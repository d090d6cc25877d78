"""Tile-sparse convolution: compute a convolution's output only in listed tiles, in place.

:func:`sparse_conv2d` writes, for every listed output tile ``(b, tile_row, tile_col)``, what
``F.conv2d`` (or ``F.conv_transpose2d``) of the whole input would give there, reading the
input's halo straight from the full input map (whatever the caller keeps outside the active
tiles: fresh or cached values); every other pixel of ``out`` is left untouched. Edge tiles that
overhang the image are clipped. Fused around the convolution, all optional:

* prologue on the input read: a second input concatenated along channels (a UNet's skip
  connection, never materialised), group-norm apply with given per-(image, group) mean/rstd
  and affine, then SiLU or Mish; nearest-neighbour x2 upsampling of the input (SR3's
  Upsample) is read in place too;
* epilogue on the output write: bias, an activation, a per-(image, channel) add (the time
  embedding), and a residual map (which may be ``out`` itself: accumulate).

Tile lists: :func:`tile_list` turns a boolean tile map into a fixed-capacity int32 list plus
a device-side count without synchronising the host, so the same shapes serve every step (a
CUDA graph can be captured once per shape).

Backends (the registry picks the best available; ``backend=`` forces one): ``reference``
(pure PyTorch gather -> conv -> scatter, the truth), ``cpp`` (CPU: a fused gather of the
active row segments side by side into strips, of every tile's halo'd window into a batch, or of
every output pixel's window into an im2col matrix, whichever costs least for the call; one
oneDNN convolution or GEMM per strip or batch; a fused scatter), ``triton`` (implicit GEMM over
active tiles) and ``cuda_ext``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import sparse_conv_reference as reference
from .registry import dispatch, register_backend, register_signature

__all__ = ["NormParams", "sparse_conv2d", "tile_list", "conv_output_size", "ACTIVATIONS", "PADDING_MODES"]

ACTIVATIONS = reference.ACTIVATIONS
PADDING_MODES = reference.PADDING_MODES
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class NormParams(NamedTuple):
    """Group-norm apply on the convolution's input: ``(x - mean[b, g]) * rstd[b, g] * weight[c]
    + bias[c]``; mean/rstd float32 (float64 for float64 inputs) [B, G], weight/bias [C_in] or
    None. G must divide the input channels (x and x2 together)."""

    mean: torch.Tensor
    rstd: torch.Tensor
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def conv_output_size(size: int, kernel: int, stride: int, padding: int, upsample: int = 1,
                     transposed: bool = False) -> int:
    """Output length of one spatial axis (after nearest ``upsample`` of the input)."""
    size = size * upsample
    if transposed:
        return (size - 1) * stride - 2 * padding + kernel
    return (size + 2 * padding - kernel) // stride + 1


def tile_list(tile_map: torch.Tensor, capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Active tiles of a boolean map [B, nH, nW] as ``(tiles, count)``, with no host sync.

    ``tiles``: int32 [capacity, 3] rows ``(b, tile_row, tile_col)`` in raster order, then
    rows of -1 up to ``capacity`` (default B * nH * nW, which always fits); ``count``: int32
    [1] on the map's device, the number of valid rows. A capacity below the number of active
    tiles keeps the first ``capacity`` of them and ``count`` says how many there were, so the
    caller can tell (it is not clamped).
    """
    if not isinstance(tile_map, torch.Tensor) or tile_map.dtype != torch.bool or tile_map.dim() != 3:
        got = f"{tile_map.dtype} {tuple(tile_map.shape)}" if isinstance(tile_map, torch.Tensor) else type(tile_map).__name__
        raise ValueError(f"tile_map: expected a bool tensor [B, nH, nW], got {got}")
    B, nH, nW = tile_map.shape
    total = B * nH * nW
    if capacity is None:
        capacity = total
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(f"capacity: expected a non-negative int, got {capacity!r}")
    dev = tile_map.device
    flat = tile_map.reshape(-1)
    pos = torch.cumsum(flat.to(torch.int32), 0) - 1
    # inactive tiles (and overflow) go to a dump row past the end
    dest = torch.where(flat & (pos < capacity), pos.to(torch.int64), torch.full_like(pos, capacity, dtype=torch.int64))
    lin = torch.arange(total, device=dev, dtype=torch.int64)
    coords = torch.stack([lin // (nH * nW), (lin // nW) % nH, lin % nW], dim=1).to(torch.int32)
    tiles = torch.full((capacity + 1, 3), -1, dtype=torch.int32, device=dev)
    tiles.index_copy_(0, dest, coords)  # several tiles land in the dump row; it is dropped
    count = flat.sum(dtype=torch.int32).reshape(1)
    return tiles[:capacity], count


# ---------------------------------------------------------------------------- validation
def _check_tensor(name: str, t, *, dims: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name}: expected {dims} dimensions, got shape {tuple(t.shape)}")
    return t


def _check_same(name: str, t: torch.Tensor, x: torch.Tensor, *, dtype: bool = True) -> None:
    if t.device != x.device:
        raise ValueError(f"{name}: expected a tensor on x's device {x.device}, got {t.device}")
    if dtype and t.dtype != x.dtype:
        raise TypeError(f"{name}: expected x's dtype {x.dtype}, got {t.dtype}")


def _pair(name: str, v) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in v)):
        raise ValueError(f"{name}: expected a positive int or a pair of them, got {v!r}")
    return int(v[0]), int(v[1])


def sparse_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tiles: torch.Tensor,
    out: torch.Tensor,
    *,
    tile,
    count: torch.Tensor | None = None,
    stride: int = 1,
    padding: int | None = None,
    padding_mode: str = "zeros",
    upsample: int = 1,
    transposed: bool = False,
    x2: torch.Tensor | None = None,
    norm: NormParams | None = None,
    act: str | None = None,
    out_act: str | None = None,
    add: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Compute ``conv(act(norm(cat(x, x2))))`` only in the listed tiles of ``out``, in place.

    Per listed tile, out = out_act(conv + bias) + add[b, :] + residual, with conv =
    ``F.conv2d(up(act(norm(cat(x, x2)))), weight, stride, padding)`` (``padding_mode``
    "zeros" or "reflect"; ``up`` nearest x``upsample``) or, with ``transposed``,
    ``F.conv_transpose2d(act(norm(cat(x, x2))), weight, stride, padding)``.

    Args:
        x: [B, C1, H, W] float (channels_last is the fast layout of every backend).
        weight: [C_out, C1 + C2, k, k] (transposed: [C1 + C2, C_out, k, k]), x's dtype.
        bias: [C_out] or None.
        tiles: int32 [N, 3] rows (b, tile_row, tile_col) at out's resolution (see
            :func:`tile_list`), or a bool tile map [B, nH, nW] (converted here).
        out: [B, C_out, Ho, Wo], written in place in the listed tiles only; returned.
        tile: (th, tw) tile size in output pixels (an int for square tiles).
        count: int32 [1] tensor on x's device: only the first ``count`` rows of ``tiles`` are
            used (None: all of them).
        stride, padding: the convolution's (padding defaults to k // 2, or 1 when transposed).
        x2: [B, C2, H, W], concatenated after x along channels (never materialised).
        norm: :class:`NormParams` applied to the concatenated input before ``act``.
        act / out_act: None, "silu" or "mish" on the input / on conv + bias.
        add: [B, C_out] added per image and channel (e.g. a time embedding).
        residual: [B, C_out, Ho, Wo] added last; may be ``out`` itself.
    """
    _check_tensor("x", x, dims=4)
    if x.dtype not in _FLOATS:
        raise TypeError(f"x: expected float32/float16/bfloat16/float64, got {x.dtype}")
    _check_tensor("weight", weight, dims=4)
    _check_same("weight", weight, x)
    if not isinstance(transposed, bool):
        raise TypeError(f"transposed: expected a bool, got {type(transposed).__name__}")
    B, C1, H, W = x.shape
    C2 = 0
    if x2 is not None:
        _check_tensor("x2", x2, dims=4)
        _check_same("x2", x2, x)
        if x2.shape[0] != B or x2.shape[2:] != x.shape[2:]:
            raise ValueError(f"x2: expected [B={B}, C2, {H}, {W}] like x, got {tuple(x2.shape)}")
        C2 = x2.shape[1]
    cin = C1 + C2
    if transposed:
        w_in, cout = weight.shape[0], weight.shape[1]
    else:
        cout, w_in = weight.shape[0], weight.shape[1]
    if w_in != cin:
        raise ValueError(f"weight: expected {cin} input channels (x {C1}" + (f" + x2 {C2}" if C2 else "")
                         + f"), got weight of shape {tuple(weight.shape)}" + (" (transposed: [C_in, C_out, k, k])" if transposed else ""))
    k_h, k_w = weight.shape[-2:]
    if k_h != k_w:
        raise ValueError(f"weight: expected a square kernel, got {k_h}x{k_w}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride: expected a positive int, got {stride!r}")
    if padding is None:
        padding = 1 if transposed else k_h // 2
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding: expected a non-negative int, got {padding!r}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode: expected one of {PADDING_MODES}, got {padding_mode!r}")
    if upsample not in (1, 2):
        raise ValueError(f"upsample: expected 1 or 2 (nearest x2), got {upsample!r}")
    if transposed:
        if upsample != 1:
            raise ValueError("upsample: a transposed convolution upsamples by its stride; pass upsample=1")
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode: transposed convolutions pad with zeros, got {padding_mode!r}")
        if padding >= k_h:
            raise ValueError(f"padding: expected < kernel size {k_h} for a transposed convolution, got {padding}")
    elif padding_mode == "reflect" and padding >= min(H, W) * upsample:
        raise ValueError(f"padding: reflect padding {padding} needs an input larger than that, got {H}x{W}")
    if bias is not None:
        _check_tensor("bias", bias, dims=1)
        _check_same("bias", bias, x)
        if bias.shape[0] != cout:
            raise ValueError(f"bias: expected [{cout}], got {tuple(bias.shape)}")
    Ho = conv_output_size(H, k_h, stride, padding, upsample, transposed)
    Wo = conv_output_size(W, k_w, stride, padding, upsample, transposed)
    if Ho < 1 or Wo < 1:
        raise ValueError(f"x: a {H}x{W} input gives no output for kernel {k_h}, stride {stride}, padding {padding}")
    _check_tensor("out", out, dims=4)
    _check_same("out", out, x)
    if tuple(out.shape) != (B, cout, Ho, Wo):
        raise ValueError(f"out: expected shape {(B, cout, Ho, Wo)}, got {tuple(out.shape)}")
    th, tw = _pair("tile", tile)
    if transposed and (th % stride or tw % stride):
        raise ValueError(f"tile: a transposed convolution needs tiles that are multiples of its stride {stride}, got {(th, tw)}")
    nH, nW = -(-Ho // th), -(-Wo // tw)
    _check_tensor("tiles", tiles)
    if tiles.dtype == torch.bool:
        if tuple(tiles.shape) != (B, nH, nW):
            raise ValueError(f"tiles: a tile map must have shape [B, nH, nW] = {(B, nH, nW)} for {Ho}x{Wo} "
                             f"outputs in {th}x{tw} tiles, got {tuple(tiles.shape)}")
        if count is not None:
            raise ValueError("count: only with a tile list, not with a bool tile map")
        if tiles.device != x.device:
            raise ValueError(f"tiles: expected a tensor on x's device {x.device}, got {tiles.device}")
        tiles, count = tile_list(tiles)
    else:
        if tiles.dtype != torch.int32 or tiles.dim() != 2 or tiles.shape[1] != 3:
            raise ValueError(f"tiles: expected int32 [N, 3] rows (b, tile_row, tile_col) or a bool tile map, "
                             f"got {tiles.dtype} {tuple(tiles.shape)}")
        if tiles.device != x.device:
            raise ValueError(f"tiles: expected a tensor on x's device {x.device}, got {tiles.device}")
        if count is not None:
            _check_tensor("count", count)
            if count.dtype != torch.int32 or count.numel() != 1 or count.device != x.device:
                raise ValueError(f"count: expected an int32 [1] tensor on {x.device}, got {count.dtype} "
                                 f"{tuple(count.shape)} on {count.device}")
        if x.device.type == "cpu":
            # indices are checked where that costs no device sync; kernels also skip bad rows
            n = tiles.shape[0] if count is None else int(count[0])
            if n < 0 or n > tiles.shape[0]:
                raise ValueError(f"count: {n} is outside [0, {tiles.shape[0]}] (the tile list's capacity)")
            if n:
                used = tiles[:n]
                lo = used.amin(0).tolist()
                hi = used.amax(0).tolist()
                if min(lo) < 0 or hi[0] >= B or hi[1] >= nH or hi[2] >= nW:
                    raise ValueError(f"tiles: indices must lie in b < {B}, tile_row < {nH}, tile_col < {nW} "
                                     f"({Ho}x{Wo} outputs in {th}x{tw} tiles); got rows in {lo}..{hi}")
    if norm is not None:
        if not isinstance(norm, NormParams):
            raise TypeError(f"norm: expected a NormParams(mean, rstd, weight, bias), got {type(norm).__name__}")
        _check_tensor("norm.mean", norm.mean, dims=2)
        _check_tensor("norm.rstd", norm.rstd, dims=2)
        G = norm.mean.shape[1]
        if norm.mean.shape[0] != B or norm.rstd.shape != norm.mean.shape or G < 1 or cin % G:
            raise ValueError(f"norm: mean and rstd must be [B={B}, G] with G dividing {cin} input channels, "
                             f"got {tuple(norm.mean.shape)} and {tuple(norm.rstd.shape)}")
        for nm, t in (("norm.mean", norm.mean), ("norm.rstd", norm.rstd)):
            _check_same(nm, t, x, dtype=False)
            if not t.is_floating_point():
                raise TypeError(f"{nm}: expected a float tensor, got {t.dtype}")
        for nm, t in (("norm.weight", norm.weight), ("norm.bias", norm.bias)):
            if t is not None:
                _check_tensor(nm, t, dims=1)
                _check_same(nm, t, x)
                if t.shape[0] != cin:
                    raise ValueError(f"{nm}: expected [{cin}], got {tuple(t.shape)}")
    for nm, a in (("act", act), ("out_act", out_act)):
        if a is not None and a not in ACTIVATIONS:
            raise ValueError(f"{nm}: expected None or one of {ACTIVATIONS}, got {a!r}")
    if add is not None:
        _check_tensor("add", add, dims=2)
        _check_same("add", add, x)
        if tuple(add.shape) != (B, cout):
            raise ValueError(f"add: expected [B, C_out] = {(B, cout)}, got {tuple(add.shape)}")
    if residual is not None:
        _check_tensor("residual", residual, dims=4)
        _check_same("residual", residual, x)
        if residual.shape != out.shape:
            raise ValueError(f"residual: expected out's shape {tuple(out.shape)}, got {tuple(residual.shape)}")
    dispatch("sparse_conv2d", x, x2, weight, bias, tiles, count, out, (th, tw), stride, padding, padding_mode,
             upsample, transposed, norm, act, out_act, add, residual, backend=backend)
    return out


def _signature(x, x2, weight, bias, tiles, count, out, tile, stride, padding, padding_mode, upsample,
               transposed, norm, act, out_act, add, residual):
    """What the backends' checks read, for the registry's selection cache."""
    if torch.compiler.is_compiling():
        return None
    return (x.device.type, x.dtype, transposed, upsample, stride, weight.shape[-1], padding_mode,
            norm is not None, x2 is not None)


register_signature("sparse_conv2d", _signature)
register_backend("sparse_conv2d", "reference", reference.sparse_conv2d, priority=0, cacheable=True)
