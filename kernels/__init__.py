"""Triton kernels of yoda-sparse, usable on their own (installed as ``yoda_sparse.kernels``).

One module per op, each holding its kernels and a thin launcher that takes torch tensors:

* ``yoda_sparse.kernels.masked_l1``: ``masked_l1_forward(pred, target, mask, normalize) ->
  (loss, denom)`` and ``masked_l1_backward(grad, pred, target, mask, denom)`` (eq. 10).
* ``yoda_sparse.kernels.yoda_step``: ``yoda_step(z, eps, x_bar, mask, noise, lr_noise, seed,
  offset, coeffs, clip_x0, clip_lo, clip_hi)`` (eq. 11-14, one masked reverse step).

Nothing here imports the rest of yoda_sparse. The launchers call their kernels through
``torch.library.wrap_triton``, so they trace under ``torch.compile``/``make_fx`` and can be
wrapped in ``torch.library.triton_op`` (``yoda_sparse.ops.triton_backend`` does that).

Tensor layout: images are [B, C, H, W] with any strides. A tensor whose H and W dimensions
merge into one pixel dimension (contiguous, channels_last, batch/channel slices of those)
is read in place through its strides; any other one is copied with ``.contiguous()`` first.
Outputs are channels_last when the leading input is channels_last, contiguous otherwise.

Without a GPU, set ``TRITON_INTERPRET=1`` *before* importing these modules: the kernels then
run on CPU tensors in Triton's interpreter (float32/float16 only; bfloat16 arithmetic is
wrong there).
"""
from __future__ import annotations

import torch

__all__ = ["pixel_strides", "as_pixel_view", "output_like", "needs_int64", "tile_shape", "is_interpreted", "launcher"]

INT32_MAX = 2**31 - 1


def pixel_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(batch, channel, pixel) strides of a [B, C, H, W] tensor whose pixel (h, w) lies at
    ``(h * W + w) * pixel_stride``, or None when H and W don't merge (then copy first)."""
    _, _, H, W = t.shape
    sb, sc, sh, sw = t.stride()
    if H <= 1 and W <= 1:
        return sb, sc, 1
    if H <= 1:
        return sb, sc, sw
    if W <= 1:
        return sb, sc, sh
    if sh == W * sw:
        return sb, sc, sw
    return None


def as_pixel_view(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``t`` (or a contiguous copy when its H and W don't merge) and its (B, C, pixel) strides."""
    strides = pixel_strides(t)
    if strides is None:
        t = t.contiguous()
        strides = pixel_strides(t)
    return t, strides


def output_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised tensor of ``t``'s shape: channels_last when ``t`` is (and isn't also
    plain contiguous), else contiguous. Fake kernels use this too, so strides agree."""
    channels_last = not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device, memory_format=fmt)


def needs_int64(*tensors: torch.Tensor) -> bool:
    """True when an element offset of any tensor may exceed int32 (index math goes int64)."""
    for t in tensors:
        reach = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0)
        if reach > INT32_MAX or t.numel() > INT32_MAX:
            return True
    return False


def tile_shape(channel_stride: int, C: int, HW: int, elements: int = 4096) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) of a [pixels, channels] tile of about ``elements``.

    Channels-innermost memory (channels_last, C > 1) takes up to 64 channels per tile so
    loads run along memory; planar memory takes at most 4 (the tile's pixel axis is the
    contiguous one). Small images get a smaller pixel axis instead of masked-off lanes.
    """
    bc = min(_next_pow2(C), 64 if (C > 1 and channel_stride == 1) else 4)
    bp = min(max(16, elements // bc), max(16, _next_pow2(HW)))
    return bp, bc, 8 if bp * bc >= 4096 else 4


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def is_interpreted(kernel) -> bool:
    """Whether a ``@triton.jit`` kernel was created under TRITON_INTERPRET=1 (runs on CPU)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - triton without an interpreter
        return False
    k = kernel
    while hasattr(k, "fn") and not isinstance(k, InterpretedFunction):  # autotuner/heuristics
        k = k.fn
    return isinstance(k, InterpretedFunction)


def launcher(kernel):
    """``torch.library.wrap_triton(kernel)``, or the kernel itself when it is interpreted.

    An interpreted kernel only runs eagerly on CPU tensors and cannot be traced anyway. torch
    2.14's wrap_triton hands it back unwrapped, but older ones (2.11 seen) raise "wrap_triton
    only works on functions annotated with triton.jit", so the check is made here.
    """
    if is_interpreted(kernel):
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)
