"""Triton kernel for one YODA reverse step t -> t-1 (paper eq. 11-14), fused into one pass.

Per element, in float32 (``m`` = the pixel's mask, broadcast over channels):

    x0   = sqrt_recip_ac * z - sqrt_recipm1_ac * eps          (clamped to [lo, hi] if CLIP)
    z_sr = coef1 * x0 + coef2 * z + sigma * n                 (active area: posterior sample)
    z_lr = lr_scale * x_bar + lr_sigma * n_lr                 (rest: LR branch; x_bar None = 0)
    out  = m ? z_sr : z_lr

Loads are predicated on the mask: z and eps are read only where m is set, x_bar (and a
separate lr_noise) only where it is not, so the inactive area of a YODA step costs no
reads of the model's output. The result equals ``torch.where(m, z_sr, z_lr)`` exactly in
semantics (the unused branch's inputs never reach the output).

Noise: either given (``noise``, optionally ``lr_noise`` for the LR branch; else ``noise``
serves both, which is sound because each element uses exactly one branch), or generated in
the kernel with ``tl.randn(seed, offset + i)`` where i is the element's index in the logical
contiguous [B, C, H, W] order, so no noise tensor is read or written and the numbers do not
depend on the memory layout or the tile shape. ``seed`` is any int in [0, 2**63): Triton's
Philox takes all 64 bits as its key; counters are int64, so ``offset + numel`` may go up to
2**63 - 1 (the high 32 bits become Philox's second counter word).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import as_pixel_view, is_interpreted, launcher, needs_int64, output_like, tile_shape

__all__ = ["yoda_step", "COEFFICIENTS", "interpreted"]

COEFFICIENTS = ("sqrt_recip_ac", "sqrt_recipm1_ac", "coef1", "coef2", "sigma", "lr_scale", "lr_sigma")
INT64_MAX = 2**63 - 1


@triton.jit
def _yoda_step_kernel(
    z_ptr, eps_ptr, xbar_ptr, noise_ptr, lr_noise_ptr, mask_ptr, out_ptr,
    C, HW, n_pblocks, seed, offset,
    sqrt_recip_ac, sqrt_recipm1_ac, coef1, coef2, sigma, lr_scale, lr_sigma, clip_lo, clip_hi,
    z_sb, z_sc, z_sp,
    e_sb, e_sc, e_sp,
    x_sb, x_sc, x_sp,
    n_sb, n_sc, n_sp,
    l_sb, l_sc, l_sp,
    m_sb, m_sp,
    o_sb, o_sc, o_sp,
    HAS_XBAR: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    HAS_LR_NOISE: tl.constexpr,
    CLIP: tl.constexpr,
    IDX64: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // n_pblocks
    p = (pid % n_pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < HW
    if IDX64:
        b = b.to(tl.int64)
        p = p.to(tl.int64)
    act_p = tl.load(mask_ptr + b * m_sb + p * m_sp, mask=p_ok, other=0) != 0
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        if IDX64:
            c = c.to(tl.int64)
        ok = p_ok[:, None] & (c < C)[None, :]
        act = act_p[:, None] & ok
        rest = (act_p == 0)[:, None] & ok
        pp = p[:, None]
        cc = c[None, :]

        z = tl.load(z_ptr + b * z_sb + pp * z_sp + cc * z_sc, mask=act, other=0).to(tl.float32)
        e = tl.load(eps_ptr + b * e_sb + pp * e_sp + cc * e_sc, mask=act, other=0).to(tl.float32)
        x0 = sqrt_recip_ac * z - sqrt_recipm1_ac * e
        if CLIP:
            # where-based clamp keeps NaN, as torch.clamp does
            x0 = tl.where(x0 < clip_lo, clip_lo, x0)
            x0 = tl.where(x0 > clip_hi, clip_hi, x0)
        mean = coef1 * x0 + coef2 * z

        if HAS_NOISE:
            if HAS_LR_NOISE:
                n_sr = tl.load(noise_ptr + b * n_sb + pp * n_sp + cc * n_sc, mask=act, other=0)
                n_lr = tl.load(lr_noise_ptr + b * l_sb + pp * l_sp + cc * l_sc, mask=rest, other=0)
                n = tl.where(act, n_sr.to(tl.float32), n_lr.to(tl.float32))
            else:
                n = tl.load(noise_ptr + b * n_sb + pp * n_sp + cc * n_sc, mask=ok, other=0).to(tl.float32)
        else:
            # logical contiguous index, int64: offset + index may pass 2**31
            lin = (b.to(tl.int64) * C + cc.to(tl.int64)) * HW + pp.to(tl.int64)
            n = tl.randn(seed, offset + lin)

        z_sr = mean + sigma * n
        z_lr = lr_sigma * n
        if HAS_XBAR:
            xb = tl.load(xbar_ptr + b * x_sb + pp * x_sp + cc * x_sc, mask=rest, other=0).to(tl.float32)
            z_lr = z_lr + lr_scale * xb
        out = tl.where(act, z_sr, z_lr)
        tl.store(out_ptr + b * o_sb + pp * o_sp + cc * o_sc, out.to(out_ptr.dtype.element_ty), mask=ok)


def interpreted() -> bool:
    """Whether this kernel was created under TRITON_INTERPRET=1 (it then runs on CPU)."""
    return is_interpreted(_yoda_step_kernel)


def _view(t: torch.Tensor | None, like: torch.Tensor, name: str):
    if t is None:
        return like, (0, 0, 0)  # never read: a valid pointer keeps the signature fixed
    if t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(
            f"{name} must match z ({tuple(like.shape)}, {like.dtype}, {like.device}), "
            f"got ({tuple(t.shape)}, {t.dtype}, {t.device})"
        )
    return as_pixel_view(t)


def yoda_step(
    z: torch.Tensor,
    eps: torch.Tensor,
    x_bar: torch.Tensor | None,
    mask: torch.Tensor,
    noise: torch.Tensor | None,
    lr_noise: torch.Tensor | None,
    seed: int | None,
    offset: int,
    coeffs: dict,
    clip_x0: bool,
    clip_lo: float = -1.0,
    clip_hi: float = 1.0,
) -> torch.Tensor:
    """One fused YODA reverse step (see the module doc for the formula).

    Args:
        z, eps: [B, C, H, W] float16/bfloat16/float32 (z_t and the predicted noise), any strides.
        x_bar: like z, or None (the LR-branch mean is then 0, SRDiff's residual case).
        mask: bool [B, 1, H, W], eq. 9's M(t), broadcast over C.
        noise: like z, or None to draw ``tl.randn(seed, offset + i)`` in the kernel.
        lr_noise: like z or None (the LR branch then uses ``noise``); needs ``noise``.
        seed, offset: ints for in-kernel noise (seed in [0, 2**63), offset >= 0 with
            offset + numel <= 2**63 - 1); ignored when ``noise`` is given.
        coeffs: floats ``sqrt_recip_ac, sqrt_recipm1_ac, coef1, coef2, sigma, lr_scale,
            lr_sigma`` (``yoda_sparse.ops.step_coefficients`` builds them).
        clip_x0, clip_lo, clip_hi: clamp x0 to [clip_lo, clip_hi] when clip_x0.
    Returns:
        z_{t-1}, like z (channels_last when z is, else contiguous).
    """
    if z.dim() != 4:
        raise ValueError(f"z must be [B, C, H, W], got {tuple(z.shape)}")
    B, C, H, W = z.shape
    if tuple(mask.shape) != (B, 1, H, W) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool [B, 1, H, W] = {(B, 1, H, W)}, got {mask.dtype} {tuple(mask.shape)}")
    missing = [k for k in COEFFICIENTS if k not in coeffs]
    if missing:
        raise ValueError(f"coeffs is missing {missing} (needs {COEFFICIENTS})")
    if lr_noise is not None and noise is None:
        raise ValueError("lr_noise needs noise too (or neither)")
    if noise is None:
        if seed is None:
            raise ValueError("pass noise, or seed (and offset) for in-kernel noise")
        if isinstance(seed, bool) or not 0 <= int(seed) <= INT64_MAX:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        if isinstance(offset, bool) or not 0 <= int(offset) or int(offset) + z.numel() > INT64_MAX:
            raise ValueError(f"offset must be >= 0 with offset + numel <= 2**63 - 1, got {offset!r}")
    HW = H * W
    has_xbar, has_noise, has_lr_noise = x_bar is not None, noise is not None, lr_noise is not None
    out = output_like(z)
    if z.numel() == 0:
        return out
    z, zs = as_pixel_view(z)
    eps, es = _view(eps, z, "eps")
    x_bar, xs = _view(x_bar, z, "x_bar")
    noise_t, ns = _view(noise, z, "noise")
    lr_noise_t, ls = _view(lr_noise, z, "lr_noise")
    mask_px, (m_sb, _, m_sp) = as_pixel_view(mask)  # bool as it is: see masked_l1._mask_view
    os_ = as_pixel_view(out)[1]
    BLOCK_P, BLOCK_C, num_warps = tile_shape(os_[1], C, HW)
    n_pblocks = triton.cdiv(HW, BLOCK_P)
    c = {k: float(coeffs[k]) for k in COEFFICIENTS}
    launcher(_yoda_step_kernel)[(B * n_pblocks,)](
        z, eps, x_bar, noise_t, lr_noise_t, mask_px, out,
        C, HW, n_pblocks, 0 if has_noise else int(seed), 0 if has_noise else int(offset),
        c["sqrt_recip_ac"], c["sqrt_recipm1_ac"], c["coef1"], c["coef2"], c["sigma"],
        c["lr_scale"], c["lr_sigma"], float(clip_lo), float(clip_hi),
        *zs, *es, *xs, *ns, *ls, m_sb, m_sp, *os_,
        HAS_XBAR=has_xbar, HAS_NOISE=has_noise, HAS_LR_NOISE=has_lr_noise,
        CLIP=bool(clip_x0), IDX64=needs_int64(z, eps, x_bar, noise_t, lr_noise_t, mask_px, out),
        BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=num_warps,
    )
    return out
