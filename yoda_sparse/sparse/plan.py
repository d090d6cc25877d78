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

__all__ = ["LevelPlan", "level_tile_sizes", "level_tile_maps", "sparse_work"]


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
    _pixels: torch.Tensor | None = None

    def pixel_mask(self) -> torch.Tensor:
        """Bool [B, H_L * W_L]: the level pixels inside active tiles (for attention queries)."""
        if self._pixels is None:
            h, w = self.size
            m = self.tile_map.repeat_interleave(self.tile, 1).repeat_interleave(self.tile, 2)[:, :h, :w]
            self._pixels = m.reshape(m.shape[0], -1)
        return self._pixels


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
