"""SparseUNet: runs an SR3 or SRDiff UNet for one sampling step on the active tiles of that
step's mask, reusing cached activations elsewhere.

Per step:

1. the step mask M(t) [B, 1, H, W] is max-pooled to every resolution level (``tile`` pixels
   at full resolution, halved per level down to ``min_tile``) and dilated by ``halo`` tiles;
2. each level runs sparse (its tiles only, :func:`yoda_sparse.ops.sparse_conv2d` with the
   norm/activation/embedding/residual fused around the convolution) or dense (whole maps), as
   the cost model measured on this device decides for its active fraction; the first step
   of a run runs every level dense and fills the cache, and so does (a *refresh*) a step
   whose active tiles hold ``refresh_above`` of a dense step's work or more, where sparse
   kernels save little, or one ``refresh_every`` steps after the cache was last computed whole;
3. a step whose mask is all ones (every step once t <= l * T) calls the model itself: exactly
   the dense network, no overhead.

The cache holds every layer's output for the whole map (memory: :attr:`cache_bytes`; on the CPU
the convolution's BRGEMM layouts also keep their weights packed while they live:
:func:`packed_weight_bytes`). It is
tied to one input: a new ``x_up``/``cond`` tensor or shape starts a fresh cache, as does
:meth:`reset` (the samplers build one engine per ``sample`` call).

What is approximate, and measured (benchmarks/RESULTS.md): outside the active tiles the
cached features come from the last step that computed them, while the state there (the LR
branch) draws new noise every step; active tiles near the boundary see that stale context
through their convolutions' halos and the attention keys/values, and group-norm statistics
over the whole map would see it too. The statistics are what drift (with exact ones the
drift all but vanishes), so by default they come from fresh tiles only: the active ones and a
lattice of probe tiles in the inactive area that sparse steps compute as well (``norm_stats``,
``probes``; yoda_sparse.sparse.norm).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .cost import CostModel
from .layers import StepContext, UnsupportedLayerError, activation_name
from .norm import NORM_STATS
from .plan import LevelPlan, level_probes, level_tile_maps, level_tile_sizes, sparse_work, with_probes
from .programs import level_sizes, sr3_step, srdiff_step, unet_of
from ..models.layers import ResBlock, SelfAttention
from ..models.sr3 import SR3UNet
from ..ops import tile_list

__all__ = ["SparseUNet", "AUTO_PROBE_STALENESS", "packed_weight_bytes"]

#: "auto" group-norm statistics switch from the current map's to probed ones once the noise
#: level sqrt(gamma) has moved this far since the cache was computed: with a refresh every 8
#: of 100 steps (moves up to ~0.08) the current map's statistics stayed closer to the dense
#: step's (PSNR(sparse, dense) 57 dB against 52 dB), at 20 steps (moves up to ~0.36) the
#: probed ones did by far (51 dB against 38 dB) (benchmarks/RESULTS.md)
AUTO_PROBE_STALENESS = 0.08


def packed_weight_bytes() -> int:
    """Bytes of the packed weights the C++ sparse convolution keeps for its BRGEMM layouts
    (direct and pixels: a transposed copy of each weight it served, held while that weight
    tensor lives; 0 without the extension). For SR3 16->128 on the CPU 364 MB: nearly every
    3x3 and 1x1 convolution's weights."""
    from ..ops import cpp_backend

    if cpp_backend.ensure_loaded() is not None:
        return 0
    return int(torch.ops.yoda_sparse.ext_packed_weight_bytes())


def check_supported(unet: nn.Module) -> None:
    """Raise UnsupportedLayerError naming the first layer the engine cannot run sparse."""
    for name, mod in unet.named_modules():
        if isinstance(mod, ResBlock):
            if mod.affine_embedding:
                raise UnsupportedLayerError(f"{name}: ResBlock with affine_embedding (FiLM) is not supported by the "
                                            f"sparse engine; sample this model with engine='dense'")
            activation_name(mod.act, f"{name}.act")
            for norm_name in ("norm1", "norm2"):
                norm = getattr(mod, norm_name)
                if not isinstance(norm, (nn.GroupNorm, nn.Identity)):
                    raise UnsupportedLayerError(f"{name}.{norm_name}: {type(norm).__name__} is not supported (GroupNorm)")
                if not mod.pre_activation and isinstance(norm, nn.GroupNorm):
                    raise UnsupportedLayerError(f"{name}.{norm_name}: a conv-first ResBlock with GroupNorm "
                                                f"(norm_groups > 0) is not supported by the sparse engine")
        elif isinstance(mod, SelfAttention) and not isinstance(mod.norm, nn.GroupNorm):
            raise UnsupportedLayerError(f"{name}.norm: attention without GroupNorm is not supported")


def _positive_int(name: str, v, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v!r}")
    return v


class SparseUNet:
    """Sparse execution of a yoda_sparse SR3UNet or SRDiff model.

    Args:
        model: an ``SR3UNet`` or an ``SRDiff`` (its UNet runs sparse; its RRDB encoder runs once
            per image in the sampler, as before). Used in eval mode; not modified.
        tile: tile side in full-resolution pixels at level 0 (halved per level).
        min_tile: smallest tile side at deep levels, in level pixels (>= 2 for SRDiff's
            transposed upsampling). Default: 1 for SR3 on the CPU, where the C++ kernel runs
            1-pixel tiles of the wide deep levels as one im2col GEMM (sparse steps 1-12%
            cheaper than with 2-pixel tiles, benchmarks/RESULTS.md), else 2.
        halo: dilation of the active tiles, in tiles: one int for every level, or a sequence of
            one per level (the last repeats for deeper levels).
        norm_stats: "probed" (over the fresh tiles: the active ones, and probe tiles standing
            for the inactive area), "current" (over the current map, fresh and cached tiles),
            "auto" ("current" until SR3's noise level has moved by more than
            ``AUTO_PROBE_STALENESS`` since the cache was computed, "probed" after) or "frozen"
            (those of the last dense step); see yoda_sparse.sparse.norm.
        probes: probe tiles per side when statistics are probed ("probed", or "auto" once it
            probes): a lattice of ``probes`` x ``probes`` tiles evenly spaced from corner to
            corner, each computed with a ring of one tile of context around it. Models without
            GroupNorm (SRDiff's) compute no probes. The default 2 (the four corner tiles)
            computes 36 tiles per level where 3 computed 81 (8% of a 32 x 32 tile grid): SR3 at
            256x256 ran 0.02-0.03 of a dense run faster on the CPU, and the bundled SR3
            checkpoint stays within 0.07 dB / 0.001 SSIM of dense-engine YODA at 20 and 100
            steps (PSNR(sparse, dense) 54.5 dB against 3's 56.5; benchmarks/RESULTS.md).
        refresh_every: run a whole dense step once k steps have passed since the cache was
            last computed whole (0, the default: no periodic refresh, only ``refresh_above``'s).
        refresh_above: a step whose active tiles hold this share of a dense step's
            convolution work or more (:meth:`step_work`: levels weighed by their FLOP share)
            runs whole instead, as a refresh: the sparse kernels run 1.1-1.3x the work there,
            so it costs little more, and the cache is fresh again for the steps after it (the
            count towards ``refresh_every`` restarts). A share of work, not a timing, so which
            steps run whole, hence the output, does not depend on the machine. None: only
            ``refresh_every``'s refreshes. With the default 0.85 (and no periodic refresh) the
            bundled SR3 checkpoint stays within 0.05 dB of dense-engine YODA at 20 and at 100
            steps (PSNR(sparse, dense) 56-57 dB); the earlier default, a refresh every 8 steps,
            lost 0.04 / 0.09 dB (51 / 57 dB), and it cost SR3 at 256x256 a whole step at
            20 steps (benchmarks/RESULTS.md).
        cost_model: a :class:`CostModel` (default: measured on this device, cached on disk),
            or a float: one fixed dense threshold for every level (2.0: never dense; 0.0:
            always dense).
        backend: force a backend of ``ops.sparse_conv2d`` (default: the registry's choice).
    """

    def __init__(self, model: nn.Module, *, tile: int = 8, min_tile: int | None = None, halo: int = 0,
                 norm_stats: str = "auto", probes: int = 2, refresh_every: int = 0,
                 refresh_above: float | None = 0.85, cost_model: CostModel | float | None = None,
                 backend: str | None = None):
        self.model = model
        self.unet = unet_of(model)
        self.family = "sr3" if isinstance(self.unet, SR3UNet) else "srdiff"
        check_supported(self.unet)
        self.tile = _positive_int("tile", tile)
        self.min_tile = None if min_tile is None else _positive_int("min_tile", min_tile,
                                                                     2 if self.family == "srdiff" else 1)
        if self.family == "srdiff" and (tile & (tile - 1)):
            raise ValueError(f"tile: SRDiff's transposed upsampling needs a power of two, got {tile}")
        if isinstance(halo, (list, tuple)):
            if not halo:
                raise ValueError("halo: expected an int >= 0 or a non-empty sequence of them, got []")
            self.halo = tuple(_positive_int("halo", h, 0) for h in halo)
        else:
            self.halo = _positive_int("halo", halo, 0)
        if norm_stats not in NORM_STATS:
            raise ValueError(f"norm_stats: expected one of {NORM_STATS}, got {norm_stats!r}")
        self.norm_stats = norm_stats
        self.probes = _positive_int("probes", probes, 2)
        self._has_norms = any(isinstance(m, nn.GroupNorm) for m in self.unet.modules())
        self.refresh_every = _positive_int("refresh_every", refresh_every, 0)
        if refresh_above is not None and (isinstance(refresh_above, bool)
                                          or not isinstance(refresh_above, (int, float))
                                          or not 0.0 < refresh_above <= 1.0):
            raise ValueError(f"refresh_above: expected None or a share of a dense step in (0, 1], "
                             f"got {refresh_above!r}")
        self.refresh_above = None if refresh_above is None else float(refresh_above)
        if cost_model is None:
            cost_model = CostModel()
        elif isinstance(cost_model, (int, float)) and not isinstance(cost_model, bool):
            cost_model = CostModel(fixed=float(cost_model))
        elif not isinstance(cost_model, CostModel):
            raise TypeError(f"cost_model: expected a CostModel, a float threshold or None, got {type(cost_model).__name__}")
        self.cost_model = cost_model
        self.backend = backend
        self.maps: dict[str, torch.Tensor] = {}
        self.frozen_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._probe_key = None
        self._level_probes = None
        self.history: list[dict] = []
        self._weights: dict[int, tuple[int, int, torch.Tensor]] = {}
        self._conv_counts: tuple[float, list[float]] | None = None
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget every cached activation (the next step runs dense)."""
        self.maps.clear()
        self.frozen_stats.clear()
        self.history = []
        self.peak_cache_bytes = 0
        self.peak_packed_bytes = 0
        self._input_key = None
        self._filled = False
        self._last_full = 0  # the step that last computed the cache whole
        self._filled_level = None  # SR3's noise level when the cache was last computed whole
        self._step = 0
        self._cond_hr = None

    def min_tile_for(self, device: torch.device) -> int:
        """The smallest tile side used on ``device`` (``min_tile``, or its default there)."""
        if self.min_tile is not None:
            return self.min_tile
        return 1 if self.family == "sr3" and device.type == "cpu" else 2

    @property
    def cache_bytes(self) -> int:
        """Bytes held by the activation cache."""
        return sum(t.numel() * t.element_size() for t in self.maps.values())

    def weight(self, conv: nn.Module) -> torch.Tensor:
        """The convolution's weight, channels_last (converted once; again if it changed)."""
        w = conv.weight
        entry = self._weights.get(id(conv))
        if entry is None or entry[0] != w.data_ptr() or entry[1] != w._version:
            entry = (w.data_ptr(), w._version, w.detach().contiguous(memory_format=torch.channels_last))
            self._weights[id(conv)] = entry
        return entry[2]

    def _level_channels(self) -> list[int]:
        """Each level's width (its down blocks' output channels): the cost model's shape key."""
        return [blocks[-1].out_channels for blocks in self.unet.down_blocks]

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def predict(self, z: torch.Tensor, mask: torch.Tensor, *, noise_level: torch.Tensor | None = None,
                x_up: torch.Tensor | None = None, t: torch.Tensor | None = None,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        """The model's noise prediction for state ``z`` [B, 3, H, W], computed on the active
        tiles of ``mask`` (bool [B, 1, H, W], the step's M(t)).

        SR3: pass ``x_up`` (the upsampled LR image, [-1, 1]) and ``noise_level`` [B].
        SRDiff: pass ``t`` [B] and ``cond`` (the RRDB encoder's features of the LR image).
        Returns eps [B, 3, H, W] (contiguous); only its active pixels are meaningful.
        """
        self._check(z, mask, noise_level, x_up, t, cond)
        B, _, H, W = z.shape
        key = (tuple(z.shape), z.dtype, z.device, id(x_up), id(cond))
        if key != self._input_key:
            self.reset()
            self._input_key = key
            self._keep = (x_up, cond)  # keeps the ids above from being reused while cached
        sizes = level_sizes(self.unet, H, W)
        record = {"step": self._step, "fractions": None, "dense": None, "model": False, "refresh": False}
        if bool(mask.all()):
            # every pixel active: the model itself. The cache would be stale after it, and
            # masks only grow, so it is dropped (memory back; a later partial mask refills it)
            eps = self._model_eps(z, noise_level, x_up, t, cond)
            if self.maps:
                self.maps.clear()
                self.frozen_stats.clear()
            self._filled = False
            record.update(fractions=[1.0] * len(sizes), dense=[True] * len(sizes), model=True)
        else:
            plans = self._plans(mask, sizes, z, noise_level)
            if all(p.dense for p in plans):
                # every map is recomputed whole and none is read: drop the old ones first, so
                # malloc hands their memory to the new ones (holding both, a refresh ran
                # 0.2-0.5 s slower than the fill, 2.9 s here: new pages faulted in per map)
                self.maps.clear()
                self._last_full = self._step
                if noise_level is not None:
                    self._filled_level = noise_level.detach().double().clone()
            ctx = StepContext(self, plans)
            zc = z.contiguous(memory_format=torch.channels_last)
            if self.family == "sr3":
                eps = sr3_step(ctx, self.unet, x_up.contiguous(memory_format=torch.channels_last), zc, noise_level)
            else:
                if self._cond_hr is None:
                    self._cond_hr = self.unet.cond_proj(cond).contiguous(memory_format=torch.channels_last)
                eps = srdiff_step(ctx, self.unet, zc, t, self._cond_hr)
            eps = eps.contiguous()
            self._filled = True
            self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes)
            if z.device.type == "cpu":
                self.peak_packed_bytes = max(self.peak_packed_bytes, packed_weight_bytes())
            record.update(fractions=[p.fraction for p in plans], dense=[p.dense for p in plans],
                          refresh=any(p.refresh for p in plans))
        self.history.append(record)
        self._step += 1
        return eps

    __call__ = predict

    def _model_eps(self, z, noise_level, x_up, t, cond):
        if self.family == "sr3":
            return self.unet(torch.cat([x_up, z], dim=1), noise_level)
        return self.unet(z, t, cond)

    def _probing(self, full: bool, noise_level: torch.Tensor | None) -> bool:
        """Whether this step computes probe tiles for its group-norm statistics: "probed"
        always; "auto" once the noise level sqrt(gamma) has moved by more than
        ``AUTO_PROBE_STALENESS`` since the cache was computed (before, the cached area's own
        statistics are closer to the dense step's than the probes' estimate)."""
        if full or not self._has_norms or self.norm_stats not in ("auto", "probed"):
            return False
        if self.norm_stats == "probed" or noise_level is None or self._filled_level is None:
            return True
        return float((noise_level.double() - self._filled_level).abs().max()) > AUTO_PROBE_STALENESS

    def _plans(self, mask: torch.Tensor, sizes, z, noise_level: torch.Tensor | None = None) -> list[LevelPlan]:
        min_tile = self.min_tile_for(z.device)
        maps = level_tile_maps(mask, len(sizes), self.tile, min_tile, self.halo)
        tiles = level_tile_sizes(len(sizes), self.tile, min_tile)
        fill = not self._filled
        # a refresh runs every level dense, replacing the cached maps: oneDNN's dense
        # convolution beats the sparse kernel over all tiles (2.09-2.10 s against 2.33-2.59 s
        # for SR3 at 256x256 here)
        refresh = self._refreshes(self._step, self._filled, self._last_full, self.step_work(maps, sizes, tiles))
        channels = self._level_channels()
        probes = None
        if self._probing(fill or refresh, noise_level):
            key = (tuple(mask.shape[-2:]), mask.device, min_tile)
            if self._probe_key != key:
                self._level_probes = level_probes(tuple(mask.shape[-2:]), self.probes, len(sizes), self.tile, min_tile,
                                                  mask.device)
                self._probe_key = key
            probes = self._level_probes
        plans = []
        for lvl, (active, size, t) in enumerate(zip(maps, sizes, tiles)):
            tm = active if probes is None else with_probes(active, probes[lvl])
            frac = float(tm.float().mean())
            work = sparse_work(tm, t, size[1])
            if fill or refresh:
                dense = True
            else:
                thr = self.cost_model.threshold(z.device, z.dtype, z.shape[0], channels[lvl], size, t, self.backend)
                dense = work >= thr
            plan = LevelPlan(lvl, size, t, tm, frac, dense, work, refresh=refresh)
            if probes is not None:
                plan.probes, plan.active_map = probes[lvl], active
            if not dense:
                plan.tiles, plan.count = tile_list(tm)
            plans.append(plan)
        return plans

    def _refreshes(self, step: int, filled: bool, last_full: int, work: float) -> bool:
        """Whether step ``step`` of a run (0-based), whose active tiles hold ``work`` of a dense
        step's (:meth:`step_work`), is a refresh, once the cache is filled: ``refresh_every``
        steps after the cache was last computed whole (at step ``last_full``), or a step with
        ``refresh_above`` of the work or more. The engine and ``predicted_time_ratio`` both ask."""
        if not filled:
            return False
        if self.refresh_every and step - last_full >= self.refresh_every:
            return True
        return self.refresh_above is not None and work >= self.refresh_above

    @staticmethod
    def _level_works(maps, sizes, tiles) -> list[float]:
        """``plan.sparse_work`` of each level's tile map."""
        return [sparse_work(tm, t, size[1]) for tm, size, t in zip(maps, sizes, tiles)]

    def step_work(self, maps, sizes, tiles, works: list[float] | None = None) -> float:
        """The share of a dense step's convolution work in the active tiles of these level tile
        maps (``plan.sparse_work`` per level, or ``works`` where already computed, weighed by
        :meth:`level_flop_shares`)."""
        works = self._level_works(maps, sizes, tiles) if works is None else works
        return sum(s * w for s, w in zip(self.level_flop_shares(), works))

    def _predicted_step(self, device, dtype, batch: int, works: list[float], sizes, tiles) -> tuple[float, bool]:
        """(the cost model's time of a sparse step whose levels compute ``works`` of their
        columns, as a share of a dense step, levels weighed by their FLOP share; whether every
        level would run dense)."""
        channels = self._level_channels()
        shares = self.level_flop_shares()
        cost, all_dense = 0.0, True
        for lvl, (work, size, t) in enumerate(zip(works, sizes, tiles)):
            args = (device, dtype, batch, channels[lvl], size, t, self.backend)
            all_dense = all_dense and work >= self.cost_model.threshold(*args)
            cost += shares[lvl] * self.cost_model.time_ratio(*args, work)
        return cost, all_dense

    def predicted_time_ratio(self, masks, dtype: torch.dtype = torch.float32) -> float:
        """Sparse over dense sampling time that the cost model predicts for a run over
        ``masks`` (a :class:`yoda_sparse.masking.MaskSchedule`, one mask per step in sampling
        order): the steps this engine runs in full (the fill, refreshes, all-ones masks) count
        1, a sparse step each level's predicted ratio (``CostModel.time_ratio`` of its work),
        levels weighed by their FLOP share. Probe tiles, the per-step fixed costs and the
        kernels' loss on scattered tiles are left out, so it errs low: on the 2-core CPU the
        measured ratios of SR3 at 256x256 ran 0.09-0.19 above it (0.06-0.27 on coffee's
        scattered edges; benchmarks/RESULTS.md)."""
        mask0 = masks.mask(0)
        B, _, H, W = mask0.shape
        device = mask0.device
        sizes = level_sizes(self.unet, H, W)
        min_tile = self.min_tile_for(device)
        tiles = level_tile_sizes(len(sizes), self.tile, min_tile)
        total, filled, last_full = 0.0, False, 0
        for i in range(len(masks)):
            m = masks.mask(i)
            if bool(m.all()):  # the model itself; the cache is dropped
                total, filled = total + 1.0, False
                continue
            maps = level_tile_maps(m, len(sizes), self.tile, min_tile, self.halo)
            works = self._level_works(maps, sizes, tiles)
            if not filled or self._refreshes(i, filled, last_full, self.step_work(maps, sizes, tiles, works)):
                total, filled, last_full = total + 1.0, True, i
                continue
            cost, all_dense = self._predicted_step(device, dtype, B, works, sizes, tiles)
            if all_dense:
                total, last_full = total + 1.0, i  # every level dense: the cache is fresh again
            else:
                total += cost
        return total / len(masks)

    def _check(self, z, mask, noise_level, x_up, t, cond) -> None:
        if not isinstance(z, torch.Tensor) or z.dim() != 4:
            raise ValueError(f"z: expected a tensor [B, C, H, W], got {getattr(z, 'shape', type(z).__name__)}")
        if not z.is_floating_point():
            raise TypeError(f"z: expected a float tensor, got {z.dtype}")
        B, _, H, W = z.shape
        m = self.unet.size_multiple
        if H % m or W % m:
            raise ValueError(f"z: H and W must be multiples of {m} for this UNet, got {H}x{W}")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a bool tensor (the step's M(t)), got "
                            f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if tuple(mask.shape) != (B, 1, H, W):
            raise ValueError(f"mask: expected shape {(B, 1, H, W)}, got {tuple(mask.shape)}")
        if mask.device != z.device:
            raise ValueError(f"mask: expected a tensor on z's device {z.device}, got {mask.device}")
        if self.family == "sr3":
            if x_up is None or noise_level is None:
                raise ValueError("x_up and noise_level: an SR3 UNet needs both")
            if tuple(x_up.shape) != tuple(z.shape) or x_up.dtype != z.dtype or x_up.device != z.device:
                raise ValueError(f"x_up: expected z's shape/dtype/device {tuple(z.shape)} {z.dtype}, got "
                                 f"{tuple(x_up.shape)} {x_up.dtype}")
            if tuple(noise_level.shape) != (B,):
                raise ValueError(f"noise_level: expected shape ({B},), got {tuple(noise_level.shape)}")
        else:
            if t is None or cond is None:
                raise ValueError("t and cond: an SRDiff UNet needs both")
            if tuple(t.shape) != (B,):
                raise ValueError(f"t: expected shape ({B},), got {tuple(t.shape)}")
            if cond.shape[0] != B:
                raise ValueError(f"cond: expected batch {B}, got {tuple(cond.shape)}")

    def _count_convs(self) -> tuple[float, list[float]]:
        """(dense GFLOP, each level's share of the convolutions' FLOPs) of one UNet forward at
        its smallest size, batch 1: convolution FLOPs are counted per output resolution with
        hooks (attention, 3% of SR3's dense step on the CPU, is left out of the shares)."""
        from torch.utils.flop_counter import FlopCounterMode

        if self._conv_counts is None:
            m = self.unet.size_multiple
            if self.family == "srdiff":  # a size the LR condition divides, 2+ pixels deep (reflect pads)
                m = 2 * m * self.unet.scale // math.gcd(m, self.unet.scale)
            p = next(self.unet.parameters())
            z = torch.zeros(1, 3, m, m, device=p.device, dtype=p.dtype)
            levels = len(self.unet.down_blocks)
            per_level = [0.0] * levels

            def hook(mod, inputs, out):
                level = min(levels - 1, max(0, round(math.log2(m / out.shape[-1]))))
                if isinstance(mod, nn.ConvTranspose2d):  # every input pixel meets the whole kernel
                    flops = inputs[0].numel() * mod.out_channels * mod.weight[0, 0].numel()
                else:
                    flops = out.numel() * mod.weight[0].numel()
                per_level[level] += 2.0 * flops

            handles = [mod.register_forward_hook(hook) for mod in self.unet.modules()
                       if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)) and mod is not getattr(self.unet, "cond_proj", None)]
            try:
                with torch.no_grad(), FlopCounterMode(display=False) as counter:
                    if self.family == "sr3":
                        self.unet(torch.cat([z, z], 1), torch.full((1,), 0.5, device=p.device, dtype=p.dtype))
                    else:
                        c = m // self.unet.scale
                        cond = torch.zeros(1, self.unet.cond_proj.in_channels, c, c, device=p.device, dtype=p.dtype)
                        self.unet(z, torch.ones(1, dtype=torch.long, device=p.device), cond)
            finally:
                for h in handles:
                    h.remove()
            total = sum(per_level) or 1.0
            self._conv_counts = (counter.get_total_flops() / (m * m) / 1e9, [f / total for f in per_level])
        return self._conv_counts

    def dense_gflops(self, batch: int, height: int, width: int) -> float:
        """Estimated GFLOP of one dense UNet evaluation at this size: counted by
        ``torch.utils.flop_counter`` on a forward at the UNet's smallest size, scaled by area."""
        return self._count_convs()[0] * batch * height * width

    def level_flop_shares(self) -> list[float]:
        """Each resolution level's share of the UNet's convolution FLOPs (they scale alike with
        the image's area, so one count serves every size)."""
        return list(self._count_convs()[1])

    # ------------------------------------------------------------------ summaries
    def summary(self) -> dict:
        """Mean active fraction per level, the share of steps each level ran dense, the
        largest size the activation cache reached (bytes), and the run's *work ratio*: the
        time ratio an ideal sparse kernel would reach with this run's tiles and schedule (each
        step's convolution FLOPs over a dense step's: a level run dense, and every level of a
        fill, refresh or all-ones step, counts whole; a sparse level its tile fraction, probes
        included; levels weighed by :meth:`level_flop_shares`)."""
        steps = [h for h in self.history if h["fractions"] is not None]
        if not steps:
            return {"steps": 0}
        levels = len(steps[0]["fractions"])
        shares = self.level_flop_shares()
        work = [sum(s * (1.0 if d else f) for s, d, f in zip(shares, h["dense"], h["fractions"])) for h in steps]
        return {
            "steps": len(steps),
            "model_steps": sum(h["model"] for h in steps),
            "level_fraction": [sum(h["fractions"][lv] for h in steps) / len(steps) for lv in range(levels)],
            "level_dense_share": [sum(h["dense"][lv] for h in steps) / len(steps) for lv in range(levels)],
            "level_flop_share": shares,
            "step_work": work,
            "work_ratio": sum(work) / len(work),
            "cache_bytes": self.peak_cache_bytes,
            "packed_weight_bytes": self.peak_packed_bytes,
        }


__all__ += ["UnsupportedLayerError"]
