"""Triton kernel of the tile-sparse convolution: an implicit GEMM over the listed tiles.

One program computes one output tile (TH x TW pixels, the GEMM's M) for BLOCK_N output
channels. Its K loop runs over the kernel taps and the input channels, reading the halo'd
input straight from the full input map (any strides; channels_last is the coalesced one)
with the prologue applied on the fly: concat of x and x2 (two K ranges), group-norm apply as
a per-(image, channel) scale and shift, SiLU/Mish, nearest x2 upsampling (the source pixel is
the virtual one divided by 2) and zero/reflect padding. The epilogue adds the bias, applies
the output activation, adds the per-(image, channel) vector and the residual (which may be
``out`` itself), and stores only pixels inside the image.

The tile list's count is read on the device: programs past it return at once, so the grid
(the list's capacity) and hence a captured CUDA graph are the same every step.

Without a GPU, set ``TRITON_INTERPRET=1`` before importing (float32/float16 only there).
"""
from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from . import is_interpreted, launcher

__all__ = ["sparse_conv2d", "interpreted", "ACT_CODES"]

ACT_CODES = {None: 0, "silu": 1, "mish": 2}


@triton.jit
def _activate(v, ACT: tl.constexpr):
    if ACT == 1:
        v = v / (1.0 + tl.exp(-v))
    elif ACT == 2:
        # mish(v) = v * tanh(softplus(v)) = v * n / (n + 2), n = e (e + 2), e = exp(v)
        e = tl.exp(tl.minimum(v, 20.0))
        n = e * (e + 2.0)
        v = tl.where(v > 20.0, v, v * n / (n + 2.0))
    return v


@triton.jit
def _accumulate_input(acc, src_ptr, s_b, s_c, s_h, s_w, C, c_base, Cin, b, iy, ix, valid,
                      w_ptr, scale_ptr, shift_ptr, n, n_ok, tap, Cout,
                      NORM: tl.constexpr, ACT: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += prologue(src[b, :, iy, ix]) @ W[tap, c_base:c_base+C, n] over C channels."""
    for k0 in range(0, C, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < C
        ld = valid[:, None] & k_ok[None, :]
        a = tl.load(src_ptr + b * s_b + k[None, :] * s_c + iy[:, None] * s_h + ix[:, None] * s_w,
                    mask=ld, other=0.0).to(tl.float32)
        if NORM:
            sc = tl.load(scale_ptr + b * Cin + c_base + k, mask=k_ok, other=0.0)
            sh = tl.load(shift_ptr + b * Cin + c_base + k, mask=k_ok, other=0.0)
            a = a * sc[None, :] + sh[None, :]
        if NORM or ACT != 0:
            # the convolution pads its (normalised, activated) input with zeros
            a = tl.where(ld, _activate(a, ACT), 0.0)
        w = tl.load(w_ptr + (tap * Cin + c_base + k)[:, None] * Cout + n[None, :],
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
    return acc


def _configs():
    """Autotuning space on a GPU (BLOCK_N x BLOCK_K, warps, stages); one config in the
    interpreter, which has no timing to tune by."""
    import os

    if os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on"):
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
            for n in (32, 64, 128) for k in (32, 64) for w in (4, 8) for st in (2, 3)
            if not (n == 128 and w == 4)]


# out is restored between tuning runs: with a residual that is out itself, each run accumulates
@triton.autotune(configs=_configs(), key=["C1", "C2", "Cout", "BLOCK_M", "KSIZE", "STRIDE"],
                 restore_value=["out_ptr"])
@triton.jit
def _sparse_conv_kernel(
    x_ptr, x2_ptr, w_ptr, bias_ptr, tiles_ptr, count_ptr, out_ptr, scale_ptr, shift_ptr, add_ptr, res_ptr,
    C1, C2, Cout, Hv, Wv, Ho, Wo,
    x_sb, x_sc, x_sh, x_sw,
    x2_sb, x2_sc, x2_sh, x2_sw,
    o_sb, o_sc, o_sh, o_sw,
    r_sb, r_sc, r_sh, r_sw,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, UP: tl.constexpr, REFLECT: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_X2: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, ACT: tl.constexpr,
    OUT_ACT: tl.constexpr, HAS_ADD: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    count = tl.load(count_ptr)
    if pid_t >= count:
        return
    b = tl.load(tiles_ptr + pid_t * 3).to(tl.int64)
    tr = tl.load(tiles_ptr + pid_t * 3 + 1)
    tc = tl.load(tiles_ptr + pid_t * 3 + 2)
    m = tl.arange(0, BLOCK_M)
    oy = tr * TH + m // TW
    ox = tc * TW + m % TW
    m_ok = (m < TH * TW) & (oy < Ho) & (ox < Wo)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < Cout
    Cin = C1 + C2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kh in tl.static_range(KSIZE):
        for kw in tl.static_range(KSIZE):
            vy = oy * STRIDE - PAD + kh
            vx = ox * STRIDE - PAD + kw
            if REFLECT:
                vy = tl.where(vy < 0, -vy, vy)
                vy = tl.where(vy >= Hv, 2 * (Hv - 1) - vy, vy)
                vx = tl.where(vx < 0, -vx, vx)
                vx = tl.where(vx >= Wv, 2 * (Wv - 1) - vx, vx)
            valid = m_ok & (vy >= 0) & (vy < Hv) & (vx >= 0) & (vx < Wv)
            iy = tl.where(valid, vy, 0) // UP
            ix = tl.where(valid, vx, 0) // UP
            tap = kh * KSIZE + kw
            acc = _accumulate_input(acc, x_ptr, x_sb, x_sc, x_sh, x_sw, C1, 0, Cin, b, iy, ix, valid,
                                    w_ptr, scale_ptr, shift_ptr, n, n_ok, tap, Cout,
                                    NORM, ACT, BLOCK_K, DOT_PRECISION)
            if HAS_X2:
                acc = _accumulate_input(acc, x2_ptr, x2_sb, x2_sc, x2_sh, x2_sw, C2, C1, Cin, b, iy, ix, valid,
                                        w_ptr, scale_ptr, shift_ptr, n, n_ok, tap, Cout,
                                        NORM, ACT, BLOCK_K, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    acc = _activate(acc, OUT_ACT)
    if HAS_ADD:
        acc += tl.load(add_ptr + b * Cout + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    st = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:
        r = tl.load(res_ptr + b * r_sb + n[None, :] * r_sc + oy[:, None] * r_sh + ox[:, None] * r_sw,
                    mask=st, other=0.0)
        acc += r.to(tl.float32)
    tl.store(out_ptr + b * o_sb + n[None, :] * o_sc + oy[:, None] * o_sh + ox[:, None] * o_sw,
             acc.to(out_ptr.dtype.element_ty), mask=st)


def interpreted() -> bool:
    """Whether this kernel was created under TRITON_INTERPRET=1 (it then runs on CPU)."""
    return is_interpreted(_sparse_conv_kernel)


_WEIGHT_CACHE: dict = {}


def _gemm_weight(weight: torch.Tensor) -> torch.Tensor:
    """[C_out, C_in, k, k] -> [k*k*C_in, C_out] (tap-major K), cached per weight tensor and
    version. The entry holds a weak reference to its source, so a freed weight whose memory a
    new tensor reuses (same address) is never mistaken for it."""
    entry = _WEIGHT_CACHE.get(id(weight))
    if entry is not None and entry[0]() is weight and entry[1] == weight._version:
        return entry[2]
    if len(_WEIGHT_CACHE) > 512:
        _WEIGHT_CACHE.clear()
    k = weight.shape[-1]
    w = weight.detach().permute(2, 3, 1, 0).reshape(k * k * weight.shape[1], weight.shape[0]).contiguous()
    _WEIGHT_CACHE[id(weight)] = (weakref.ref(weight), weight._version, w)
    return w


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def sparse_conv2d(x, x2, weight, bias, tiles, count, out, tile, stride, padding, reflect, upsample,
                  scale, shift, act, out_act, add, residual):
    """Launch the kernel (arguments as ``yoda_sparse.ops.sparse_conv2d``, validated there).

    ``scale``/``shift``: float32 [B, C_in] group-norm apply folded per (image, channel), or
    None; ``act``/``out_act``: None, "silu" or "mish"; ``count``: int32 [1] tensor. Tiles
    must be unique (``ops.tile_list`` makes them so). Writes ``out`` in place."""
    B, C1, H, W = x.shape
    C2 = 0 if x2 is None else x2.shape[1]
    Cout, _, k, _ = weight.shape
    Ho, Wo = out.shape[-2:]
    th, tw = tile
    w = _gemm_weight(weight)
    n_tiles = tiles.shape[0]
    if n_tiles == 0:
        return out
    res = residual if residual is not None else out
    x2_ = x2 if x2 is not None else x
    dummy = out
    block_m = max(16, _next_pow2(th * tw))
    if x.dtype == torch.float32:
        precision = "ieee" if (interpreted() or not torch.backends.cuda.matmul.allow_tf32) else "tf32"
    else:
        precision = "ieee"
    def grid(meta):
        return (n_tiles, triton.cdiv(Cout, meta["BLOCK_N"]))

    launcher(_sparse_conv_kernel)[grid](
        x, x2_, w, bias if bias is not None else dummy, tiles, count, out,
        scale if scale is not None else dummy, shift if shift is not None else dummy,
        add if add is not None else dummy, res,
        C1, C2, Cout, H * upsample, W * upsample, Ho, Wo,
        *x.stride(), *x2_.stride(), *out.stride(), *res.stride(),
        KSIZE=k, STRIDE=stride, PAD=padding, UP=upsample, REFLECT=bool(reflect),
        TH=th, TW=tw, BLOCK_M=block_m,
        HAS_X2=x2 is not None, HAS_BIAS=bias is not None, NORM=scale is not None,
        ACT=ACT_CODES[act], OUT_ACT=ACT_CODES[out_act], HAS_ADD=add is not None, HAS_RES=residual is not None,
        DOT_PRECISION=precision,
    )
    return out
