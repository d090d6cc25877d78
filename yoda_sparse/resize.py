"""Bicubic resizing in the three conventions SR codebases make their upsampled input with.

* ``"torch_bicubic"``: ``F.interpolate(mode="bicubic", align_corners=False)``: Keys' cubic with
  a = -0.75, edge pixels replicated, no antialiasing. What yoda-sparse's own models use.
* ``"pil_bicubic"``: Pillow's ``Image.resize(..., BICUBIC)`` on float images: a = -0.5; the
  taps that fall outside the image are dropped and the rest renormalised; when shrinking the
  kernel is widened by the scale (antialiasing). The public SR3 code makes its x_up this way.
* ``"matlab_bicubic"``: MATLAB's ``imresize(I, scale)`` (bicubic, antialiasing on): a = -0.5;
  out-of-image taps read the image mirrored at its edge (edge pixel repeated). SRDiff's code
  makes its x_up this way.

All three are separable and linear: each is a pair of ``[out, in]`` weight matrices, computed
in float64 and applied to the image in float64 (the result takes the input's dtype). Inside
the image PIL and MATLAB agree; they differ at the borders; torch's a = -0.75 differs
everywhere. Images are float ``[..., H, W]`` of any range.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

__all__ = ["UPSAMPLE_METHODS", "resize", "upsample", "resize_weights", "cubic_kernel"]

UPSAMPLE_METHODS = ("torch_bicubic", "pil_bicubic", "matlab_bicubic")


def cubic_kernel(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel (support [-2, 2]); a = -0.5 in PIL and MATLAB."""
    x = x.abs()
    x2, x3 = x * x, x * x * x
    near = (a + 2) * x3 - (a + 3) * x2 + 1
    far = a * x3 - 5 * a * x2 + 8 * a * x - 4 * a
    return torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _pil_weights(n_in: int, n_out: int) -> torch.Tensor:
    # Pillow's precompute_coeffs (Resample.c) for the bicubic filter (support 2), in float64.
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        center = (o + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)  # C's (int) truncates; clamped at 0 anyway
        hi = min(int(center + support + 0.5), n_in)
        taps = torch.arange(lo, hi, dtype=torch.float64)
        k = cubic_kernel((taps - center + 0.5) / filterscale)
        total = float(k.sum())
        if total != 0.0:
            k = k / total
        w[o, lo:hi] = k
    return w


def _matlab_weights(n_in: int, n_out: int, scale: float) -> torch.Tensor:
    # MATLAB imresize's contributions(): u is the output pixel's centre in input coordinates
    # (1-based), P taps from floor(u - width/2); taps outside [1, n_in] read the mirrored image.
    width = 4.0
    if scale < 1:
        width = width / scale
    x = torch.arange(1, n_out + 1, dtype=torch.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(u - width / 2)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + torch.arange(taps, dtype=torch.float64)[None, :]  # 1-based input positions
    dist = u[:, None] - idx
    k = scale * cubic_kernel(scale * dist) if scale < 1 else cubic_kernel(dist)
    k = k / k.sum(dim=1, keepdim=True)
    zero_based = idx.long() - 1
    period = 2 * n_in
    mirrored = torch.remainder(zero_based, period)
    mirrored = torch.where(mirrored >= n_in, period - 1 - mirrored, mirrored)
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    w.scatter_add_(1, mirrored, k)
    return w


@lru_cache(maxsize=64)
def _cached_weights(method: str, n_in: int, n_out: int, scale: float | None) -> torch.Tensor:
    # built as real tensors even when called under a FakeTensorMode (yoda_sparse.memory traces
    # a sampler call with fakes): a cached fake would poison every later real call
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return _build_weights(method, n_in, n_out, scale)


def _build_weights(method: str, n_in: int, n_out: int, scale: float | None) -> torch.Tensor:
    if method == "pil_bicubic":
        return _pil_weights(n_in, n_out)
    if method == "matlab_bicubic":
        return _matlab_weights(n_in, n_out, n_out / n_in if scale is None else scale)
    raise ValueError(f"method: expected 'pil_bicubic' or 'matlab_bicubic' for a weight matrix, got {method!r}")


def resize_weights(method: str, n_in: int, n_out: int, scale: float | None = None) -> torch.Tensor:
    """The float64 ``[n_out, n_in]`` matrix that resizes one axis (rows sum to 1).

    ``scale`` (MATLAB only) is the factor imresize was called with; by default n_out / n_in.
    """
    for name, v in (("n_in", n_in), ("n_out", n_out)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return _cached_weights(method, n_in, n_out, None if scale is None else float(scale)).clone()


def _check(x, method: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point image, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x: expected [..., H, W], got shape {tuple(x.shape)}")
    if method not in UPSAMPLE_METHODS:
        raise ValueError(f"method: expected one of {UPSAMPLE_METHODS}, got {method!r}")


def resize(x: torch.Tensor, size: tuple[int, int], method: str = "torch_bicubic", *,
           scale: float | None = None) -> torch.Tensor:
    """Resize float images ``[..., H, W]`` to ``size = (H', W')`` with ``method``.

    ``scale`` (matlab_bicubic only): the factor imresize was given (its kernel and centres use
    the factor, not the rounded size ratio); by default each axis's size ratio.
    """
    _check(x, method)
    oh, ow = (int(s) for s in size)
    if oh < 1 or ow < 1:
        raise ValueError(f"size: expected two positive ints, got {size!r}")
    h, w = x.shape[-2:]
    if method == "torch_bicubic":
        if x.dim() != 4:
            raise ValueError(f"x: torch_bicubic needs [B, C, H, W], got shape {tuple(x.shape)}")
        return F.interpolate(x, size=(oh, ow), mode="bicubic", align_corners=False)
    if scale is not None and method != "matlab_bicubic":
        raise ValueError(f"scale: only matlab_bicubic takes a scale, got method {method!r}")
    wh = resize_weights(method, h, oh, scale).to(x.device)
    ww = resize_weights(method, w, ow, scale).to(x.device)
    out = torch.einsum("oh,...hw,pw->...op", wh, x.to(torch.float64), ww)
    return out.to(x.dtype)


def upsample(x: torch.Tensor, scale: int, method: str = "torch_bicubic") -> torch.Tensor:
    """Upsample ``[B, C, h, w]`` by an integer ``scale`` to ``[B, C, h*scale, w*scale]``.

    ``torch_bicubic`` is exactly ``F.interpolate(x, scale_factor=scale, mode="bicubic",
    align_corners=False)`` (what yoda-sparse's own models were trained with).
    """
    _check(x, method)
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale: expected a positive int, got {scale!r}")
    if x.dim() != 4:
        raise ValueError(f"x: expected [B, C, h, w], got shape {tuple(x.shape)}")
    if method == "torch_bicubic":
        return F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
    h, w = x.shape[-2:]
    return resize(x, (h * scale, w * scale), method, scale=float(scale) if method == "matlab_bicubic" else None)
