"""Per-level execution plans of one sparse UNet step: which tiles of each resolution level are
computed, and whether a level runs sparse (tile lists) or dense (whole maps).

A level ``L`` has resolution ``H / 2**L``. Its tiles are ``tile_L = max(min_tile, tile >> L)``
level pixels on a side, so deeper levels keep a granularity close to the full-resolution
tile until ``min_tile`` stops them. A tile is active when any pixel of the step's mask under
it is (the mask max-pooled to the level), dilated by ``halo`` tiles (per level, or one value
for all).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["LevelPlan", "level_tile_sizes", "level_tile_maps", "level_probes", "probe_centres",
           "sparse_work", "with_probes"]


@dataclass
class LevelPlan:
    """How one level runs in one step.

    dense: compute whole maps (the first step of a cache, and levels where the cost model says
        dense is cheaper); then ``tiles`` etc. are None.
    tile_map: bool [B, nH, nW] active tiles; tiles/count: its :func:`ops.tile_list`;
    tile: tile side in level pixels; fraction: active tiles / all tiles (mean over the batch);
    work: the share of a dense convolution's output columns a sparse one computes, counting
    the two halo columns every run of adjacent tiles adds (:func:`sparse_work`);
    refresh: every tile is recomputed (a refresh step), whatever the mask.
    probes / active_map: when the step probes its group-norm statistics, the level's probe
        tiles (bool [nH, nW]) and the tiles of the step's mask (bool [B, nH, nW]); ``tile_map``
        adds the probes outside ``active_map`` and their context rings to it.
    """

    level: int
    size: tuple[int, int]
    tile: int
    tile_map: torch.Tensor
    fraction: float
    dense: bool
    work: float = 1.0
    refresh: bool = False
    tiles: torch.Tensor | None = None
    count: torch.Tensor | None = None
    probes: torch.Tensor | None = None
    active_map: torch.Tensor | None = None
    _pixels: torch.Tensor | None = None
    _weights: torch.Tensor | None = None

    def pixel_mask(self) -> torch.Tensor:
        """Bool [B, H_L * W_L]: the level pixels inside active tiles (for attention queries)."""
        if self._pixels is None:
            h, w = self.size
            m = self.tile_map.repeat_interleave(self.tile, 1).repeat_interleave(self.tile, 2)[:, :h, :w]
            self._pixels = m.reshape(m.shape[0], -1)
        return self._pixels

    def stat_weights(self) -> torch.Tensor | None:
        """Float32 [B, H_L, W_L] pixel weights of the probed group-norm statistics (each image's
        summing to 1). An active pixel weighs 1 / N, its share of the map. The inactive area is
        split into two strata, the border tiles (their features see the zero padding) and the
        interior; the probe tiles outside the active ones in each stratum stand for that
        stratum's inactive pixels: each probe pixel weighs n_inactive / (N n_probe) of its
        stratum (a stratum without probes is counted with the other's). An image without such
        probes weighs every pixel 1 / N (the current map's statistics). None without probes."""
        if self.probes is None or self.active_map is None:
            return None
        if self._weights is None:
            h, w = self.size
            n = float(h * w)

            def pixels(tm):
                return tm.repeat_interleave(self.tile, -2).repeat_interleave(self.tile, -1)[..., :h, :w].to(torch.float32)

            border = torch.ones_like(self.probes)
            border[1:-1, 1:-1] = False
            act = pixels(self.active_map)
            probe = pixels(self.probes & ~self.active_map)
            weights = act / n
            strata = [pixels(border)[None], pixels(~border)[None]]
            n_probe = [(probe * st).sum((1, 2), keepdim=True) for st in strata]
            n_inactive = [((1 - act) * st).sum((1, 2), keepdim=True) for st in strata]
            for k in range(2):
                # a stratum without probes lends its inactive pixels to the other one
                own = n_probe[k] > 0
                share = torch.where(own, n_inactive[k], 0) + torch.where(n_probe[1 - k] > 0, 0, n_inactive[1 - k])
                weights = weights + probe * strata[k] * share / (n * n_probe[k].clamp_min(1))
            any_probe = (n_probe[0] + n_probe[1]) > 0
            self._weights = torch.where(any_probe, weights, torch.full_like(weights, 1 / n))
        return self._weights


def level_tile_sizes(levels: int, tile: int, min_tile: int) -> list[int]:
    """Tile side of each level in that level's pixels."""
    return [max(min_tile, tile >> lvl) for lvl in range(levels)]


def level_tile_maps(mask: torch.Tensor, levels: int, tile: int, min_tile: int, halo) -> list[torch.Tensor]:
    """Active-tile maps [B, nH_L, nW_L] of every level from a bool step mask [B, 1, H, W];
    ``halo``: dilation in tiles, one int for every level or one per level."""
    halos = [halo] * levels if isinstance(halo, int) else list(halo)
    m = mask.to(torch.float32) if mask.dtype == torch.bool else (mask != 0).to(torch.float32)
    H, W = mask.shape[-2:]
    maps = []
    for lvl, t in enumerate(level_tile_sizes(levels, tile, min_tile)):
        k = t << lvl  # the tile's size in full-resolution pixels
        h, w = H >> lvl, W >> lvl
        # pad to whole tiles (a partial edge tile is active when its visible part is)
        ph, pw = (-(-h // t)) * k - H, (-(-w // t)) * k - W
        mp = F.pad(m, (0, max(pw, 0), 0, max(ph, 0))) if ph > 0 or pw > 0 else m
        tm = F.max_pool2d(mp, kernel_size=k, stride=k)
        h = halos[lvl] if lvl < len(halos) else halos[-1]
        if h > 0:
            tm = F.max_pool2d(tm, kernel_size=2 * h + 1, stride=1, padding=h)
        maps.append(tm[:, 0] > 0)
    return maps


def probe_centres(size: tuple[int, int], per_side: int, tile: int, device=None) -> torch.Tensor:
    """Bool [1, 1, H, W]: the probe tiles' centres, ``per_side`` x ``per_side`` pixels evenly
    spaced from the centre of the first tile to that of the last in both directions, so that
    the map's border (where zero padding makes features differ from the interior) is sampled on
    all four sides as well as the interior (interior-only lattices drifted 4-8x more)."""
    H, W = size
    probe = torch.zeros(1, 1, H, W, dtype=torch.bool, device=device)

    def coords(n: int) -> torch.Tensor:
        half = min(tile, n) // 2
        return torch.linspace(half, n - 1 - half, per_side, device=device).round().long()

    probe[..., coords(H)[:, None], coords(W)[None, :]] = True
    return probe


def level_probes(size: tuple[int, int], per_side: int, levels: int, tile: int, min_tile: int,
                 device=None) -> list[torch.Tensor]:
    """Every level's probe tiles, bool [nH, nW], for a full-resolution ``size``."""
    centres = probe_centres(size, per_side, tile, device)
    return [tm[0] for tm in level_tile_maps(centres, levels, tile, min_tile, 0)]


def with_probes(active: torch.Tensor, probes: torch.Tensor, context: int = 1) -> torch.Tensor:
    """The tiles a sparse step computes: ``active`` [B, nH, nW] plus the probe tiles [nH, nW]
    outside it, each dilated by ``context`` tiles so that its convolutions read fresh values
    around it (probes without that ring drifted 3x more)."""
    outside = probes & ~active
    ring = F.max_pool2d(outside[:, None].to(torch.float32), 2 * context + 1, 1, context)[:, 0] > 0
    return active | ring


def sparse_work(tile_map: torch.Tensor, tile: int, width: int, halo_columns: int = 2) -> float:
    """Output columns a sparse 3x3 convolution computes over a level, relative to a dense one:
    every run of adjacent active tiles in a tile row costs ``tile`` columns per tile plus
    ``halo_columns`` that straddle its window and the next one's (benchmarks/RESULTS.md)."""
    tm = tile_map
    starts = tm.clone()
    starts[..., 1:] &= ~tm[..., :-1]
    active_cols = (tm.sum(-1) * tile).clamp(max=width)
    cols = active_cols + halo_columns * starts.sum(-1)
    return float(cols.float().mean()) / width
