"""Group-norm statistics for sparse steps.

A GroupNorm normalises with statistics over the whole map, but a sparse step computes only
some tiles of it. The policies:

* ``"auto"`` (default): ``"current"`` while the cache is fresh, ``"probed"`` once the noise
  level has moved far since it was computed (``yoda_sparse.sparse.engine``);
* ``"probed"``: the fresh tiles' moments only: the active tiles, weighted by their
  share of the map, and *probe tiles*, a sparse lattice of inactive tiles that every sparse
  step computes as well (each with a ring of context tiles around it), standing for the rest
  of the map;
* ``"current"``: mean and variance over the current map, fresh tiles and cached ones together
  (one read of the map; on a 2-core CPU ~1 ms for a 64-channel 256x256 map against ~20 ms for
  one of its convolutions);
* ``"frozen"``: the statistics of the last dense step, reused (no pass over the map).

Why probes (benchmarks/RESULTS.md, SR3 demo checkpoint, 18 held-out crops, 20 steps): with
"current" statistics the sparse engine drifted by -0.85 dB; with the dense step's statistics
at the same state (an oracle) by -0.05 dB even without refreshes: the cached area's stale
values bias the statistics of every active pixel, while the stale context near the active
tiles matters little. Probe lattices that missed the map's border drifted 6-8x more than ones
that include it (zero padding makes border features differ), hence corner-to-corner lattices
and two strata, border tiles and interior (``LevelPlan.stat_weights``). Tried and dropped:
correcting the current map's moments by the change seen at the probes (-0.24 dB against +0.06
dB).

Either way the result is a :class:`yoda_sparse.ops.NormParams` for the convolution's prologue.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import NormParams

__all__ = ["NORM_STATS", "group_stats", "norm_params"]

NORM_STATS = ("auto", "probed", "current", "frozen")


_EXT: list = []


def _extension_ready() -> bool:
    if not _EXT:
        from ..ops import cpp_backend

        _EXT.append(cpp_backend.ensure_loaded() is None)
    return _EXT[0]


def group_stats(x: torch.Tensor, x2: torch.Tensor | None, groups: int, eps: float,
                weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd) float32 [B, G] of cat(x, x2) along channels (float64 inputs stay float64),
    with groups of C // G consecutive channels (which may straddle x and x2). ``weight``
    [B, H, W], each image's summing to 1: weighted moments (pixels of weight 0 unread on the
    CPU) instead of pixel means. On the CPU the C++ kernel reads each map once
    (torch.var_mean over a channels_last map is ~20x slower)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and _extension_ready():
        return torch.ops.yoda_sparse.ext_group_stats(x, x2, groups, float(eps), weight)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    parts = [x] if x2 is None else [x, x2]
    # per-channel mean and mean of squares, then combined per group (exact for any split)
    means, sq = [], []
    for p in parts:
        if weight is None:
            var, mean = torch.var_mean(p.to(acc), dim=(2, 3), correction=0)
            means.append(mean)
            sq.append(var + mean * mean)
        else:
            w = weight.to(acc)[:, None]
            pa = p.to(acc)
            means.append((pa * w).sum((2, 3)))
            sq.append((pa * pa * w).sum((2, 3)))
    mean_c = torch.cat(means, 1)
    sq_c = torch.cat(sq, 1)
    B, C = mean_c.shape
    mean_g = mean_c.view(B, groups, C // groups).mean(2)
    var_g = (sq_c.view(B, groups, C // groups).mean(2) - mean_g * mean_g).clamp_min(0)
    return mean_g, torch.rsqrt(var_g + eps)


def norm_params(norm: nn.GroupNorm, mean: torch.Tensor, rstd: torch.Tensor, dtype: torch.dtype) -> NormParams:
    weight = norm.weight.to(dtype) if norm.weight is not None else None
    bias = norm.bias.to(dtype) if norm.bias is not None else None
    return NormParams(mean, rstd, weight, bias)
