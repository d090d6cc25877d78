"""Triton kernels for the masked L1 noise loss of YODA's training objective (paper eq. 10).

    loss = sum_{b,c,h,w} |pred - target| * m[b, 0, h, w] / denom

with the mask broadcast over channels (read once per pixel, never expanded), and
``denom`` = B*C*H*W ("all"), max(1, C * sum(m)) ("active") or 1 ("sum").

Forward = two launches and no atomics, so the result is bitwise reproducible:
  1. ``_masked_l1_partials_kernel``: one program per (batch, pixel block) sums |pred-target|
     over its pixels and all channels in float32 (and, for "active", C times the mask sum),
     writing one partial per program;
  2. ``_masked_l1_finalize_kernel``: one program adds the partials in a fixed order in
     float64 and writes the loss (in pred's dtype) and the denominator (float32).
Backward = one launch: grad_pred = g * sign(pred - target) * m / denom, grad_target = -grad_pred.

Every element is read (the mask is applied after the load), so a NaN/inf anywhere makes the
loss NaN exactly as the dense reference does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import as_pixel_view, is_interpreted, launcher, needs_int64, output_like, tile_shape

__all__ = ["masked_l1_forward", "masked_l1_backward", "NORMALIZATIONS", "interpreted"]

NORMALIZATIONS = ("all", "active", "sum")
_FINALIZE_BLOCK = 1024


@triton.jit
def _masked_l1_partials_kernel(
    pred_ptr, target_ptr, mask_ptr, loss_part_ptr, count_part_ptr,
    C, HW, n_pblocks,
    p_sb, p_sc, p_sp,
    t_sb, t_sc, t_sp,
    m_sb, m_sp,
    COUNT_MASK: tl.constexpr,
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
    m = tl.load(mask_ptr + b * m_sb + p * m_sp, mask=p_ok, other=0).to(tl.float32)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        if IDX64:
            c = c.to(tl.int64)
        ok = p_ok[:, None] & (c < C)[None, :]
        x = tl.load(pred_ptr + b * p_sb + p[:, None] * p_sp + c[None, :] * p_sc, mask=ok, other=0)
        y = tl.load(target_ptr + b * t_sb + p[:, None] * t_sp + c[None, :] * t_sc, mask=ok, other=0)
        acc += tl.abs(x.to(tl.float32) - y.to(tl.float32))
    # The mask is per pixel: weight the channel sums, not every element.
    tl.store(loss_part_ptr + pid, tl.sum(tl.sum(acc, axis=1) * m, axis=0))
    if COUNT_MASK:
        tl.store(count_part_ptr + pid, tl.sum(m, axis=0) * C)


@triton.jit
def _masked_l1_finalize_kernel(
    loss_part_ptr, count_part_ptr, loss_ptr, denom_ptr,
    n_parts, fixed_denom,
    ACTIVE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    count = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, n_parts, BLOCK):
        idx = start + offs
        ok = idx < n_parts
        acc += tl.load(loss_part_ptr + idx, mask=ok, other=0).to(tl.float64)
        if ACTIVE:
            count += tl.load(count_part_ptr + idx, mask=ok, other=0).to(tl.float64)
    total = tl.sum(acc, axis=0)
    if ACTIVE:
        denom = tl.maximum(tl.sum(count, axis=0), 1.0)
    else:
        denom = tl.cast(fixed_denom, tl.float64)
    tl.store(loss_ptr, (total / denom).to(loss_ptr.dtype.element_ty))
    tl.store(denom_ptr, denom.to(tl.float32))


@triton.jit
def _masked_l1_backward_kernel(
    grad_ptr, denom_ptr, pred_ptr, target_ptr, mask_ptr, grad_pred_ptr, grad_target_ptr,
    C, HW, n_pblocks,
    p_sb, p_sc, p_sp,
    t_sb, t_sc, t_sp,
    m_sb, m_sp,
    o_sb, o_sc, o_sp,
    WRITE_PRED: tl.constexpr,
    WRITE_TARGET: tl.constexpr,
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
    scale = tl.load(grad_ptr).to(tl.float32) / tl.load(denom_ptr).to(tl.float32)
    w = tl.load(mask_ptr + b * m_sb + p * m_sp, mask=p_ok, other=0).to(tl.float32) * scale
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        if IDX64:
            c = c.to(tl.int64)
        ok = p_ok[:, None] & (c < C)[None, :]
        x = tl.load(pred_ptr + b * p_sb + p[:, None] * p_sp + c[None, :] * p_sc, mask=ok, other=0)
        y = tl.load(target_ptr + b * t_sb + p[:, None] * t_sp + c[None, :] * t_sc, mask=ok, other=0)
        d = x.to(tl.float32) - y.to(tl.float32)
        # sign(d), 0 for d = 0 and for NaN, as torch.abs's backward gives.
        s = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        g = s * w[:, None]
        o = b * o_sb + p[:, None] * o_sp + c[None, :] * o_sc
        if WRITE_PRED:
            tl.store(grad_pred_ptr + o, g.to(grad_pred_ptr.dtype.element_ty), mask=ok)
        if WRITE_TARGET:
            tl.store(grad_target_ptr + o, (-g).to(grad_target_ptr.dtype.element_ty), mask=ok)


def interpreted() -> bool:
    """Whether these kernels were created under TRITON_INTERPRET=1 (they then run on CPU)."""
    return is_interpreted(_masked_l1_partials_kernel)


def _mask_view(mask: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    # A bool mask goes to the kernels as it is (Triton reads *i1 as bytes). No dtype view to
    # uint8: inductor cannot lower a view of bool when torch.compile traces the triton_op.
    mask, (sb, _, sp) = as_pixel_view(mask)
    return mask, (sb, sp)


def _check(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
    if pred.dim() != 4 or target.shape != pred.shape:
        raise ValueError(f"pred and target must both be [B, C, H, W], got {tuple(pred.shape)} and {tuple(target.shape)}")
    B, _, H, W = pred.shape
    if tuple(mask.shape) != (B, 1, H, W):
        raise ValueError(f"mask must have shape [B, 1, H, W] = {(B, 1, H, W)}, got {tuple(mask.shape)}")


def masked_l1_forward(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, normalize: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 10's masked L1 loss in one reading pass plus a tiny deterministic reduction.

    Args:
        pred, target: [B, C, H, W] float16/bfloat16/float32, any strides (see package doc).
        mask: [B, 1, H, W] bool or floating weights (any float dtype), broadcast over C.
        normalize: "all" (divide by B*C*H*W), "active" (by max(1, C * sum(mask))), "sum".
    Returns:
        (loss, denom): 0-d tensors; loss in pred's dtype, denom float32 (the backward needs it).
    """
    _check(pred, target, mask)
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    B, C, H, W = pred.shape
    HW = H * W
    pred, (p_sb, p_sc, p_sp) = as_pixel_view(pred)
    target, (t_sb, t_sc, t_sp) = as_pixel_view(target)
    mask, (m_sb, m_sp) = _mask_view(mask)
    BLOCK_P, BLOCK_C, num_warps = tile_shape(p_sc, C, HW)
    n_pblocks = triton.cdiv(HW, BLOCK_P)
    n_parts = B * n_pblocks
    active = normalize == "active"
    loss_parts = torch.empty(max(n_parts, 1), dtype=torch.float32, device=pred.device)
    count_parts = torch.empty(max(n_parts, 1) if active else 1, dtype=torch.float32, device=pred.device)
    loss = torch.empty((), dtype=pred.dtype, device=pred.device)
    denom = torch.empty((), dtype=torch.float32, device=pred.device)
    if n_parts > 0:
        launcher(_masked_l1_partials_kernel)[(n_parts,)](
            pred, target, mask, loss_parts, count_parts,
            C, HW, n_pblocks,
            p_sb, p_sc, p_sp, t_sb, t_sc, t_sp, m_sb, m_sp,
            COUNT_MASK=active, IDX64=needs_int64(pred, target, mask),
            BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=num_warps,
        )
    fixed = float(B * C * HW) if normalize == "all" else 1.0
    launcher(_masked_l1_finalize_kernel)[(1,)](
        loss_parts, count_parts, loss, denom, n_parts, fixed,
        ACTIVE=active, BLOCK=_FINALIZE_BLOCK, num_warps=4,
    )
    return loss, denom


def masked_l1_backward(
    grad: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    denom: torch.Tensor,
    need_pred: bool = True,
    need_target: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`masked_l1_forward`'s loss in one pass.

    Args:
        grad: 0-d gradient of the loss (read on the device: no host sync).
        pred, target, mask: the forward's inputs.
        denom: the forward's 0-d float32 denominator.
        need_pred, need_target: skip writing a gradient nobody needs (it is then returned
            as an empty [0] tensor).
    Returns:
        (grad_pred, grad_target), each in pred's dtype and layout (see ``output_like``);
        grad_pred = grad * sign(pred - target) * mask / denom, grad_target = -grad_pred.
    """
    _check(pred, target, mask)
    if grad.numel() != 1 or denom.numel() != 1:
        raise ValueError(f"grad and denom must hold one value each, got shapes {tuple(grad.shape)} and {tuple(denom.shape)}")
    B, C, H, W = pred.shape
    HW = H * W
    grad_pred = output_like(pred) if need_pred else pred.new_empty(0)
    grad_target = output_like(pred) if need_target else pred.new_empty(0)
    if B * C * HW == 0 or not (need_pred or need_target):
        return grad_pred, grad_target
    pred, (p_sb, p_sc, p_sp) = as_pixel_view(pred)
    target, (t_sb, t_sc, t_sp) = as_pixel_view(target)
    mask, (m_sb, m_sp) = _mask_view(mask)
    o_sb, o_sc, o_sp = as_pixel_view(grad_pred if need_pred else grad_target)[1]
    BLOCK_P, BLOCK_C, num_warps = tile_shape(o_sc, C, HW)
    n_pblocks = triton.cdiv(HW, BLOCK_P)
    launcher(_masked_l1_backward_kernel)[(B * n_pblocks,)](
        grad.reshape(()), denom.reshape(()), pred, target, mask, grad_pred, grad_target,
        C, HW, n_pblocks,
        p_sb, p_sc, p_sp, t_sb, t_sc, t_sp, m_sb, m_sp, o_sb, o_sc, o_sp,
        WRITE_PRED=need_pred, WRITE_TARGET=need_target,
        IDX64=needs_int64(pred, target, mask, grad_pred, grad_target),
        BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=num_warps,
    )
    return grad_pred, grad_target
