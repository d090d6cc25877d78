"""Attention-map extractors: the shared contract, input checks, helpers and the name registry.

An extractor turns the bicubic-upsampled LR batch ``x_up`` into the attention map M of the
paper (Sec. 3.1): ``extractor(images) -> Tensor[B, 1, H, W]``, float32, min-max normalised to
[0, 1] per image, same H, W as ``images`` and on the same device.

``images`` is a floating-point tensor ``[B, 3, H, W]`` with RGB values in [0, 1].  Bicubic
upsampling overshoots slightly at edges, so values down to ``-0.5`` and up to ``1.5`` are
accepted as they are (not clamped); anything further out is taken for a wrong convention
([-1, 1] or [0, 255]) and rejected.  Any floating dtype is accepted and the maps are computed
in float32.
"""
from __future__ import annotations

import abc
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "AttentionExtractor",
    "check_images",
    "minmax_normalize",
    "resize_to",
    "register_attention",
    "get_attention",
    "list_attention",
    "IMAGES_RANGE_TOLERANCE",
]

# How far outside [0, 1] `images` may go: bicubic overshoot stays well inside this margin,
# while [-1, 1] or [0, 255] images fall outside it.
IMAGES_RANGE_TOLERANCE = 0.5

# A map whose range is below this fraction of its magnitude is treated as constant (-> zeros),
# so float rounding noise on a flat map is not stretched to [0, 1].
_REL_FLAT = 1e-5
_ABS_FLAT = 1e-12


def check_images(images, *, name: str = "images") -> torch.Tensor:
    """Validate an RGB batch: floating tensor ``[B, 3, H, W]``, finite, values ~[0, 1].

    Returns the tensor unchanged.  Raises TypeError for a non-tensor or a non-floating dtype,
    ValueError for a wrong rank, channel count, empty spatial size, NaN/inf or a value range
    that is not [0, 1] (within ``IMAGES_RANGE_TOLERANCE``).
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, 3, H, W] with values in [0, 1], "
                        f"got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor with values in [0, 1], got dtype "
                        f"{images.dtype} (convert integer images with images.float() / 255)")
    if images.dim() != 4:
        raise ValueError(f"{name} must have shape [B, 3, H, W], got {images.dim()} dims "
                         f"{tuple(images.shape)}")
    if images.shape[1] != 3:
        raise ValueError(f"{name} must have 3 (RGB) channels in dim 1, got shape {tuple(images.shape)}")
    if images.shape[2] < 1 or images.shape[3] < 1:
        raise ValueError(f"{name} must have H, W >= 1, got shape {tuple(images.shape)}")
    if images.numel() == 0:
        return images
    if not torch.isfinite(images).all():
        bad = "NaN" if torch.isnan(images).any() else "inf"
        raise ValueError(f"{name} contains {bad} values")
    lo, hi = images.min().item(), images.max().item()
    tol = IMAGES_RANGE_TOLERANCE
    if lo < -tol or hi > 1 + tol:
        raise ValueError(f"{name} must hold RGB values in [0, 1] (bicubic overshoot up to {tol} "
                         f"tolerated), got values in [{lo:.4g}, {hi:.4g}]; convert [-1, 1] images "
                         f"with (images + 1) / 2 and [0, 255] images with images / 255")
    return images


def minmax_normalize(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each ``[..., H, W]`` map to [0, 1] independently.

    Works on ``[B, C, H, W]`` (each (b, c) slice separately).  A (near-)constant map becomes
    all zeros rather than NaN.  Returns a new tensor with the input's dtype.
    """
    flat = maps.flatten(-2)
    lo = flat.amin(dim=-1, keepdim=True)
    hi = flat.amax(dim=-1, keepdim=True)
    rng = hi - lo
    scale = torch.maximum(hi.abs(), lo.abs())
    flat_map = rng <= torch.clamp(scale * _REL_FLAT, min=_ABS_FLAT)
    out = (flat - lo) / torch.where(flat_map, torch.ones_like(rng), rng)
    out = torch.where(flat_map, torch.zeros_like(out), out)
    return out.reshape(maps.shape)


def resize_to(maps: torch.Tensor, size) -> torch.Tensor:
    """Bilinearly resize ``[B, C, h, w]`` maps to ``size = (H, W)`` (align_corners=False).

    Bilinear weights are convex, so non-negative maps stay non-negative.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


class AttentionExtractor(nn.Module, abc.ABC):
    """Base class: ``extractor(images) -> [B, 1, H, W]`` float32 in [0, 1].

    Subclasses implement :meth:`compute` which receives validated float32 images on the
    extractor's device and returns non-normalised ``[B, 1, h, w]`` maps (any h, w); the base
    class resizes them bilinearly to the input's H, W and min-max normalises per image.
    Extractors are frozen: they always run in eval mode under ``torch.no_grad``.
    """

    #: registry name of the configured extractor, e.g. ``"dino_vits8_max"``.
    name: str = "attention"

    @abc.abstractmethod
    def compute(self, images: torch.Tensor) -> torch.Tensor:
        """Raw (non-normalised) maps ``[B, 1, h, w]`` for validated float32 ``images``."""

    def train(self, mode: bool = True):
        # Frozen feature extractor: BatchNorm/Dropout must never switch to training behaviour,
        # even when the extractor sits inside a model that is put into train mode.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        B, _, H, W = images.shape
        if B == 0:
            return torch.zeros(0, 1, H, W, dtype=torch.float32, device=images.device)
        maps = self.compute(images.float())
        maps = resize_to(maps.float(), (H, W))
        return minmax_normalize(maps).contiguous()

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

_REGISTRY: Dict[str, Callable[..., AttentionExtractor]] = {}


def register_attention(name: str, factory: Callable[..., AttentionExtractor]) -> None:
    """Register ``factory(**kwargs) -> AttentionExtractor`` under ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"attention name {name!r} is already registered")
    _REGISTRY[name] = factory


def list_attention() -> List[str]:
    """All registered attention-map names, in registration order."""
    return list(_REGISTRY)


def get_attention(name: str, **kwargs) -> AttentionExtractor:
    """Build the extractor registered as ``name``; ``kwargs`` go to its constructor.

    DINO extractors take ``weights=None | path``, ``pretrained=True``, ``input_size=224``;
    the classical ones take their own parameters (see ``yoda_sparse.attention.classical``).
    Raises ValueError naming the valid names for an unknown ``name``.
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"name must be one of {', '.join(_REGISTRY)}; got {name!r}")
    return _REGISTRY[name](**kwargs)
