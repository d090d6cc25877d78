"""The per-level dense-fallback cost model, measured on the device at first use.

For a level of C channels and H x W pixels (batch B, dtype, device), one representative layer
(a 3x3 C -> C convolution with group-norm + SiLU on its input and a per-channel add on its
output, the body of a ResBlock) is timed three ways: dense (what the model runs), sparse over
all tiles, and sparse over half of them. Sparse time is modelled as ``a + b * w`` for the
share w of output columns a sparse step computes (``plan.sparse_work``: active tiles plus the
halo columns of each run); the level runs dense from the share where that line crosses the
dense time on (``threshold``; above 1 when sparse is cheaper even with every tile active).

Thresholds are cached in memory and in a JSON file (``$YODA_SPARSE_CACHE`` or
``~/.cache/yoda_sparse/cost_model.json``) keyed by device name, torch version, dtype, batch,
channels, size and tile, so a shape is measured once per machine.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import ops
from ..atomic import atomic_write
from .plan import sparse_work

__all__ = ["CostModel", "cost_cache_path"]

# of what is measured (4: the CPU kernel's window batches; 5: its pixel layout and 1-px deep
# tiles; 6: the pixel layout's BRGEMM GEMM and gather-aware layout costs): other versions are
# measured again
_VERSION = 7


def cost_cache_path() -> Path:
    base = os.environ.get("YODA_SPARSE_CACHE")
    return Path(base) / "cost_model.json" if base else Path.home() / ".cache" / "yoda_sparse" / "cost_model.json"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu:{line.split(':', 1)[1].strip()}:{torch.get_num_threads()}t"
    except OSError:
        pass
    return f"cpu:{torch.get_num_threads()}t"


def _sparse_line(t_full: float, t_half: float, w_full: float, w_half: float) -> tuple[float, float]:
    """(intercept, slope) of sparse time = a + b * work through the two measured points."""
    slope = (t_full - t_half) / max(w_full - w_half, 1e-9)
    return t_full - slope * w_full, slope


class CostModel:
    """Dense-or-sparse decision per level: ``threshold(...)`` measures (once) and returns the
    active fraction from which dense is cheaper. ``fixed`` replaces measurement with one
    threshold for every level (e.g. 1.01: always sparse unless every tile is active... and
    never dense then either; 0.0: always dense)."""

    def __init__(self, *, path: Path | None = None, fixed: float | None = None, persist: bool = True, rounds: int = 5):
        self.path = cost_cache_path() if path is None else Path(path)
        self.fixed = fixed
        self.persist = persist
        self.rounds = rounds
        self._table: dict[str, dict] | None = None

    def _load(self) -> dict:
        if self._table is None:
            self._table = {}
            if self.persist and self.path.is_file():
                try:
                    self._table = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    self._table = {}  # a corrupt cache is re-measured, never trusted
        return self._table

    def key(self, device, dtype, batch: int, channels: int, size: tuple[int, int], tile: int, backend) -> str:
        return "|".join(map(str, (f"v{_VERSION}", _device_name(torch.device(device)), torch.__version__, dtype, batch,
                                  channels, size[0], size[1], tile, backend or "auto")))

    def threshold(self, device, dtype, batch: int, channels: int, size: tuple[int, int], tile: int,
                  backend: str | None = None) -> float:
        if self.fixed is not None:
            return self.fixed
        table = self._load()
        k = self.key(device, dtype, batch, channels, size, tile, backend)
        if k not in table:
            table[k] = self.measure(torch.device(device), dtype, batch, channels, size, tile, backend)
            if self.persist:
                try:
                    with atomic_write(self.path, make_dirs=True, mode="w") as f:
                        f.write(json.dumps(table, indent=1, sort_keys=True))
                except OSError:
                    pass  # read-only home: keep the measurement for this process
        return float(table[k]["threshold"])

    def time_ratio(self, device, dtype, batch: int, channels: int, size: tuple[int, int], tile: int,
                   backend: str | None, work: float) -> float:
        """The predicted time of a sparse level computing the share ``work`` of its output
        columns (``plan.sparse_work``) over the dense level's, at most 1 (from the threshold on
        the level runs dense). With a ``fixed`` threshold nothing is measured: ``work`` itself
        below it (ideal kernels), 1 from it on."""
        thr = self.threshold(device, dtype, batch, channels, size, tile, backend)
        if work >= thr:
            return 1.0
        if self.fixed is not None:
            return float(work)
        e = self._load()[self.key(device, dtype, batch, channels, size, tile, backend)]
        intercept, slope = _sparse_line(e["sparse_full_s"], e["sparse_half_s"], e["full_work"], e["half_work"])
        return min(1.0, max(0.0, (intercept + slope * work) / e["dense_s"]))

    def measure(self, device: torch.device, dtype, batch: int, channels: int, size: tuple[int, int], tile: int,
                backend: str | None) -> dict:
        """Time the representative layer dense and sparse at f = 1 and f = 1/2."""
        H, W = size
        C = channels
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, C, H, W, generator=g).to(device=device, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        w = (torch.randn(C, C, 3, 3, generator=g) / (3 * C ** 0.5)).to(device=device, dtype=dtype)
        w = w.contiguous(memory_format=torch.channels_last)
        bias = torch.zeros(C, device=device, dtype=dtype)
        add = torch.zeros(batch, C, device=device, dtype=dtype)
        groups = 32 if C % 32 == 0 else 1
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        norm = ops.NormParams(torch.zeros(batch, groups, device=device, dtype=acc),
                              torch.ones(batch, groups, device=device, dtype=acc))
        out = torch.zeros_like(x)
        n_h, n_w = -(-H // tile), -(-W // tile)
        full = torch.ones(batch, n_h, n_w, dtype=torch.bool, device=device)
        half = full.clone()
        half.view(batch, -1)[:, (n_h * n_w) // 2:] = False
        f_half = sparse_work(half[:1], tile, W)
        f_full = sparse_work(full[:1], tile, W)
        lists = {"full": ops.tile_list(full), "half": ops.tile_list(half)}

        def dense():
            y = F.conv2d(F.silu(F.group_norm(x, groups)), w, bias, padding=1)
            return y + add[:, :, None, None]

        def sparse(f):
            tiles, count = lists[f]
            return ops.sparse_conv2d(x, w, bias, tiles, out, count=count, tile=tile, norm=norm, act="silu",
                                     add=add, backend=backend)

        fns = {"dense": dense, "full": lambda: sparse("full"), "half": lambda: sparse("half")}
        times = {k: [] for k in fns}
        for fn in fns.values():
            fn()
        for _ in range(self.rounds):
            for k, fn in fns.items():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[k].append(time.perf_counter() - t0)
        t = {k: statistics.median(v) for k, v in times.items()}
        intercept, slope = _sparse_line(t["full"], t["half"], f_full, f_half)
        if slope <= 0:
            threshold = 0.0 if t["full"] >= t["dense"] else 2.0
        else:
            threshold = (t["dense"] - intercept) / slope
        return {"dense_s": t["dense"], "sparse_full_s": t["full"], "sparse_half_s": t["half"],
                "full_work": f_full, "half_work": f_half, "threshold": threshold}
