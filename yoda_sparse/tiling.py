"""Tiled sampling: super-resolve an image of any size in overlapping tiles, seams blended.

The UNet's memory and (through its self-attention) its time grow with the image; a tile keeps
both at the size of one tile.  :func:`sample_tiled` cuts the LR image into overlapping tiles
(``tile`` x ``tile`` output pixels, neighbours sharing ``overlap`` output pixels), samples each
tile with :meth:`diff.sample <yoda_sparse.diffusion._DiffusionSR.sample>`, and blends the tiles
with linear ramps across every overlap (weights that sum to 1 at every pixel).  An image whose
output fits in one tile is sampled in one call, exactly as ``diff.sample`` would.

Attention map and masks: the map is computed by the caller over the whole image and resized
once to the output size, and each tile samples with its crop of it, so every pixel has the
activation time ``T (M + l)`` of an untiled run: the masks M(t), the update ratio and the
active fractions (computed here over the whole image, not per tile) are exactly those of the
untiled run.  What tiling changes is the model's view: convolutions near a tile border and
the self-attention see only the tile, and each tile draws its own noise (one generator used
tile after tile, in row-major order), so the overlap mixes two samples.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_TILE", "DEFAULT_OVERLAP", "default_overlap", "tile_multiple", "check_tiling", "tile_starts", "blend_weights",
           "count_tiles", "sample_tiled", "mask_statistics"]

#: default tile side and overlap, in output (HR) pixels
DEFAULT_TILE = 512
DEFAULT_OVERLAP = 64


def tile_multiple(diff) -> int:
    """What a tile side (output pixels) must be a multiple of: the scale (a tile starts and ends
    on LR pixels) and the UNet's size multiple."""
    return math.lcm(int(getattr(diff.model, "size_multiple", 1)), int(diff.scale))


def default_overlap(tile: int, scale: int) -> int:
    """The overlap used when none is given: :data:`DEFAULT_OVERLAP`, or a quarter of a smaller
    tile (rounded down to a multiple of ``scale``)."""
    return min(DEFAULT_OVERLAP, (tile // 4) // scale * scale)


def _int_arg(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_tiling(diff, tile, overlap, *, names=("tile", "overlap")) -> tuple[int, int]:
    """Validate ``tile`` / ``overlap`` (output pixels) for ``diff``'s model; returns them.

    tile: a positive multiple of :func:`tile_multiple`; overlap: a multiple of the scale in
    [0, tile / 2] (so at most two tiles share a pixel along each axis).  ``names`` are used in
    the messages (the CLI passes its flags).
    """
    tn, on = names
    tile = _int_arg(tn, tile, 1)
    overlap = _int_arg(on, overlap, 0)
    m = tile_multiple(diff)
    if tile % m:
        raise ValueError(f"{tn} must be a multiple of {m} for this model (scale {diff.scale}, UNet size multiple "
                         f"{getattr(diff.model, 'size_multiple', 1)}), got {tile}")
    if overlap % diff.scale:
        raise ValueError(f"{on} must be a multiple of the scale {diff.scale}, got {overlap}")
    if 2 * overlap > tile:
        raise ValueError(f"{on} must be at most half of {tn} ({tile // 2}), got {overlap}")
    return tile, overlap


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the tiles along one axis of ``length`` pixels (any unit): one tile of
    the whole length if it fits, else tiles of ``tile`` spaced ``tile - overlap`` apart, the
    last one flush with the end (it may overlap its neighbour by more than ``overlap``)."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    starts.append(length - tile)
    return starts


def count_tiles(hr_size, tile: int, overlap: int) -> int:
    """Number of tiles :func:`sample_tiled` uses for an output of ``hr_size = (H, W)``."""
    h, w = hr_size
    return len(tile_starts(h, tile, overlap)) * len(tile_starts(w, tile, overlap))


def blend_weights(length: int, starts: list[int], size: int) -> list[torch.Tensor]:
    """1-D float32 blending weights of tiles at ``starts`` (each ``size`` long) along an axis of
    ``length``: a linear ramp across each overlap with a neighbour, 1 elsewhere, normalised so
    the weights of all tiles sum to 1 at every position (a partition of unity)."""
    raw = []
    for k, a in enumerate(starts):
        b = a + size
        pos = torch.arange(a, b, dtype=torch.float64) + 0.5
        w = torch.ones(size, dtype=torch.float64)
        if k > 0 and starts[k - 1] + size > a:  # overlap with the previous tile: ramp up
            w = torch.minimum(w, (pos - a) / (starts[k - 1] + size - a))
        if k + 1 < len(starts) and starts[k + 1] < b:  # overlap with the next tile: ramp down
            w = torch.minimum(w, (b - pos) / (b - starts[k + 1]))
        raw.append(w)
    total = torch.zeros(length, dtype=torch.float64)
    for a, w in zip(starts, raw):
        total[a:a + size] += w
    return [(w / total[a:a + size]).to(torch.float32) for a, w in zip(starts, raw)]


def mask_statistics(attn_hr: torch.Tensor, T: int, lower_bound: float, timesteps: torch.Tensor,
                    *, rows: int = 256) -> torch.Tensor:
    """Active fraction per step, float64 [S, B], of the masks of eq. 9 for an attention map
    already at the output size (``attn_hr`` [B,1,H,W]); the same numbers as
    ``MaskSchedule(attn_hr, T, lower_bound, timesteps).active_fraction``, computed ``rows``
    image rows at a time instead of sorting the whole map."""
    from .masking import activation_time

    ts = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1).cpu()
    S = ts.numel()
    ts_up = ts.flip(0).contiguous()  # increasing
    if ts.numel() > 1 and not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError("timesteps must be strictly decreasing (sampling runs from high t to low t)")
    B, _, H, W = attn_hr.shape
    out = torch.empty(S, B, dtype=torch.float64)
    for b in range(B):
        hist = torch.zeros(S + 1, dtype=torch.int64)
        for r in range(0, H, rows):
            act = activation_time(attn_hr[b:b + 1, :, r:r + rows], T, lower_bound).cpu().reshape(-1)
            # steps at which a pixel is active = number of timesteps <= its activation time
            hist += torch.bincount(torch.searchsorted(ts_up, act, right=True), minlength=S + 1)
        at_least = hist.flip(0).cumsum(0).flip(0)  # at_least[c] = pixels active in >= c steps
        # a pixel active in c steps is active at steps S-c .. S-1 (the active set only grows)
        out[:, b] = at_least[S - torch.arange(S)].to(torch.float64) / (H * W)
    return out


def sample_tiled(diff, lr: torch.Tensor, attn: torch.Tensor | None = None, *, tile: int = DEFAULT_TILE,
                 overlap: int = DEFAULT_OVERLAP, steps: int | None = None, generator: torch.Generator | None = None,
                 seed: int | None = None, progress: bool = True, **sample_kwargs):
    """``diff.sample`` in overlapping tiles when the output is larger than ``tile`` pixels.

    Args:
        diff: a diffusion wrapper (``load_diffusion``'s first result).
        lr: [B,3,h,w] in [0,1], a size ``diff.sample`` accepts.
        attn: [B,1,*,*] in [0,1] over the whole image (resized bilinearly to the output
            size once, then cropped per tile), or None for dense sampling.
        tile, overlap: tile side and overlap in output pixels (see :func:`check_tiling`).
        steps, generator, progress, sample_kwargs: as for ``diff.sample``; the one generator
            serves the tiles in turn. ``seed`` (in-kernel noise) becomes ``seed + k`` for tile k.
    Returns:
        a :class:`~yoda_sparse.diffusion.SampleResult` of the whole image: images [B,3,H,W],
        active_fraction / update_ratio of the whole image's masks, timesteps; ``extras`` holds
        ``tiles`` (how many), ``tile`` and ``overlap``.
    """
    from tqdm.auto import tqdm

    from .diffusion import SampleResult
    from .masking import _resize, check_attention

    tile, overlap = check_tiling(diff, tile, overlap)
    if not isinstance(lr, torch.Tensor) or lr.dim() != 4:
        raise TypeError(f"lr must be a [B, 3, h, w] tensor, got {type(lr).__name__}"
                        + (f" of shape {tuple(lr.shape)}" if isinstance(lr, torch.Tensor) else ""))
    s = diff.scale
    B, _, h, w = lr.shape
    H, W = h * s, w * s
    ys, xs = tile_starts(H, tile, overlap), tile_starts(W, tile, overlap)
    extras = dict(tiles=len(ys) * len(xs), tile=tile, overlap=overlap)
    if len(ys) == 1 and len(xs) == 1:
        res = diff.sample(lr, attn, steps=steps, generator=generator, seed=seed, progress=progress, **sample_kwargs)
        res.extras.update(extras)
        return res
    attn_hr = None
    if attn is not None:
        attn_hr = _resize(check_attention(attn).to(lr.device), (H, W))
        if attn_hr.shape[0] != B:
            raise ValueError(f"attn must have one map per image ({B}), got {attn_hr.shape[0]}")
    th, tw = min(tile, H), min(tile, W)
    wy, wx = blend_weights(H, ys, th), blend_weights(W, xs, tw)
    out = None
    timesteps = None
    bar = tqdm(total=len(ys) * len(xs), disable=not progress, desc="tiles", unit="tile")
    try:
        k = 0
        for y, wgt_y in zip(ys, wy):
            for x, wgt_x in zip(xs, wx):
                lr_tile = lr[:, :, y // s:(y + th) // s, x // s:(x + tw) // s]
                a_tile = attn_hr[:, :, y:y + th, x:x + tw] if attn_hr is not None else None
                res = diff.sample(lr_tile, a_tile, steps=steps, generator=generator,
                                  seed=None if seed is None else seed + k, progress=progress, **sample_kwargs)
                if out is None:
                    out = torch.zeros((B, 3, H, W), dtype=res.images.dtype, device=res.images.device)
                    timesteps = res.timesteps
                wgt = (wgt_y.to(out.device, out.dtype)[:, None] * wgt_x.to(out.device, out.dtype)[None, :])
                out[:, :, y:y + th, x:x + tw].add_(res.images * wgt)
                del res
                k += 1
                bar.update(1)
    finally:
        bar.close()
    # the weighted mean of images in [0, 1] stays there up to rounding
    out.clamp_(0, 1)
    if attn_hr is not None:
        frac = mask_statistics(attn_hr, diff.schedule.num_steps, diff.yoda.lower_bound, timesteps)
    else:
        frac = torch.ones((timesteps.numel(), B), dtype=torch.float64)
    return SampleResult(out, frac, frac.mean(0), timesteps, extras)
