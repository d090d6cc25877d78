"""Peak memory of a sampling run, estimated before it starts, and the check that refuses a run
that would not fit (rather than have the kernel's OOM killer end it without a word).

The estimate has three parts, all per output (HR) pixel except the model's:

* the UNet's own activations during one noise prediction, found by running the prediction on
  fake tensors (:class:`torch._subclasses.FakeTensorMode`: shapes only, nothing computed or
  allocated) and tracking the bytes of the tensors alive after every op.  It sees what the
  real run does, e.g. whether self-attention takes a fused kernel (memory linear in the
  pixels) or the math path (an [N, N] score matrix);
* the sampler's state beside it (state, noise, predicted noise, the previous step's too,
  activation times, masks): :data:`SAMPLER_BYTES_PER_PIXEL` values of the image dtype's size;
* the whole image's buffers (the attention map and its extraction, the output, the PNG
  encoding), which tiling does not shrink.

Phases that do not overlap (extracting the map, sampling, saving) count as the largest of
them.  The numbers are estimates: ``tests/test_memory.py`` compares them with the peak RSS of
real runs.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["InsufficientMemoryError", "MemoryEstimate", "traced_peak_bytes", "model_peak_bytes", "estimate_sample_memory",
           "available_memory", "check_memory", "format_bytes", "MEMORY_LIMIT_ENV"]

#: caps the memory :func:`available_memory` reports (bytes, or with a K/M/G/T suffix), e.g. to
#: keep a run within a share of a machine
MEMORY_LIMIT_ENV = "YODA_SPARSE_MEMORY_LIMIT"

#: tensors of the image dtype per output pixel that the sampler keeps beside the UNet's
#: activations: state z, the LR branch's mean, this and the previous step's noise and noise
#: prediction (3 channels each), the float64 activation time (2 values' worth), the masks
SAMPLER_BYTES_PER_PIXEL = 3 * 5 + 3
#: bytes per output pixel while the attention map is extracted (x_up, the map, and the method's
#: own work: the edge method's float64 image, gray levels and Canny stages; SIFT's scale space),
#: measured on CPU at a 2048x2048 output (DINO's network runs at a fixed input size)
ATTENTION_BYTES_PER_PIXEL = {"gaussian": 40, "edge": 400, "sift": 1300, "dino": 120}
DEFAULT_ATTENTION_BYTES_PER_PIXEL = 1300
#: the traced UNet activations times this: oneDNN's blocked-format copies of convolution
#: inputs and outputs and the allocator's slack between tiles, which the trace can't see
#: (measured on CPU with the tiny checkpoint: peak RSS 0.98-1.33x the traced bytes)
UNET_OVERHEAD = 1.4
#: bytes a first run allocates whatever its size (oneDNN's generated kernels, the thread pool,
#: image codecs, lazily imported modules): measured about 70 MiB on CPU
FIXED_BYTES = 96 << 20
#: bytes per output pixel while the result is saved: the float32 image, its uint8 copy, the
#: PIL image and the PNG encoder's buffers
SAVE_BYTES_PER_PIXEL = 12 + 3 + 3 + 6
#: bytes per output pixel and drawn step of the mask strip of ``--save-masks`` (8 steps)
MASK_STRIP_BYTES_PER_PIXEL_STEP = 1 + 8 + 3 + 3


class InsufficientMemoryError(MemoryError):
    """A run was refused because its estimated peak memory exceeds what is available."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes of a run (``total``) and what makes it up (``parts``, bytes)."""

    total: int
    parts: dict = field(default_factory=dict)

    def describe(self) -> str:
        return ", ".join(f"{k} {format_bytes(v)}" for k, v in self.parts.items() if v)


def format_bytes(n: int | float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


class _LiveBytes(TorchDispatchMode):
    """Tracks the bytes of storages alive among the outputs of the ops run under it."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # storage id -> [tensors alive, bytes]

    def _release(self, key: int) -> None:
        entry = self._storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._storages[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                entry = self._storages.get(key)
                if entry is None:
                    entry = self._storages[key] = [0, storage.nbytes()]
                    self.live += entry[1]
                entry[0] += 1
                weakref.finalize(t, self._release, key)
        self.peak = max(self.peak, self.live)
        return out


def traced_peak_bytes(fn, *args, **kwargs) -> int:
    """Peak bytes of the tensors alive while ``fn(*args, **kwargs)`` runs on fake tensors
    (shapes only: nothing is computed or allocated; real tensors among the inputs and
    parameters are read as fakes and not counted).  ``fn`` creates its own inputs or gets them
    as arguments; it runs under ``torch.no_grad``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
        tracker = _LiveBytes()
        with tracker:
            fn(*args, **kwargs)
        return int(tracker.peak)


def model_peak_bytes(diff, lr_size, *, batch: int = 1, dtype=torch.float32, device="cpu") -> int:
    """Peak bytes of the tensors alive while ``diff`` prepares its conditioning and predicts
    the noise once for an LR input of ``lr_size = (h, w)`` (the sampler's inner loop; the
    parameters are not counted), by :func:`traced_peak_bytes`: milliseconds, no allocation."""
    h, w = (int(v) for v in lr_size)
    H, W = h * diff.scale, w * diff.scale
    device = torch.device(device)

    def predict():
        lr = torch.empty((batch, 3, h, w), dtype=dtype, device=device)
        x_up, x_bar, cond = diff._prepare(lr)
        z = torch.empty((batch, 3, H, W), dtype=dtype, device=device)
        t = torch.ones(batch, dtype=torch.long, device=device)
        level = torch.ones(batch, dtype=dtype, device=device)
        diff._predict_noise(z, t, level, x_up, cond)

    return traced_peak_bytes(predict)


def estimate_sample_memory(diff, lr_size, *, batch: int = 1, dtype=torch.float32, device="cpu",
                           attention: str | None = None, tile: int | None = None, overlap: int = 0,
                           save: bool = False, save_masks: bool = False) -> MemoryEstimate:
    """Estimated peak bytes of super-resolving ``batch`` LR images of ``lr_size = (h, w)``.

    attention: the attention method's name (its map is extracted over the whole image), or
        None for dense sampling.
    tile, overlap: as for :func:`yoda_sparse.tiling.sample_tiled` (None or 0: untiled).
    save, save_masks: include writing the result (and the ``--save-masks`` strip).
    """
    from .tiling import check_tiling, tile_starts

    h, w = (int(v) for v in lr_size)
    s = diff.scale
    H, W = h * s, w * s
    size = torch.empty((), dtype=dtype).element_size()
    pixels = batch * H * W
    if tile:
        tile, overlap = check_tiling(diff, tile, overlap)
        th, tw = min(tile, H), min(tile, W)
        tiled = len(tile_starts(H, tile, overlap)) * len(tile_starts(W, tile, overlap)) > 1
    else:
        th, tw, tiled = H, W, False
    call_pixels = batch * th * tw
    model = model_peak_bytes(diff, (th // s, tw // s), batch=batch, dtype=dtype, device=device)
    parts = {
        "UNet activations": int(UNET_OVERHEAD * model),
        "sampler state": SAMPLER_BYTES_PER_PIXEL * size * call_pixels,
        # the whole image: its output (the tiles' accumulator) and its attention map (at the
        # output size when tiled, cropped per tile)
        "whole-image buffers": 3 * size * pixels + (4 * pixels * (2 if tiled else 1) if attention else 0),
    }
    sampling = sum(parts.values())
    other = {}
    if attention:
        key = "dino" if attention.startswith("dino") else attention
        per_px = ATTENTION_BYTES_PER_PIXEL.get(key, DEFAULT_ATTENTION_BYTES_PER_PIXEL)
        other["attention map"] = per_px * pixels
    if save:
        other["saving"] = SAVE_BYTES_PER_PIXEL * pixels
    if save_masks and attention:
        other["mask strip"] = 8 * MASK_STRIP_BYTES_PER_PIXEL_STEP * pixels
    total = FIXED_BYTES + max([sampling, *other.values()])
    return MemoryEstimate(int(total), {"fixed": FIXED_BYTES, **parts, **other})


def _parse_bytes(text: str) -> int:
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    if mult != 1:
        t = t[:-1]
    try:
        value = float(t) * mult
    except ValueError:
        raise ValueError(f"{MEMORY_LIMIT_ENV} must be a size such as 4G or 512M, got {text!r}") from None
    if not value > 0:
        raise ValueError(f"{MEMORY_LIMIT_ENV} must be positive, got {text!r}")
    return int(value)


def _cgroup_available() -> int | None:
    """Bytes the cgroup (v2) of this process may still take, or None without a limit."""
    try:
        cg = Path("/proc/self/cgroup").read_text().strip().splitlines()
        rel = next(line.split(":", 2)[2] for line in cg if line.startswith("0::"))
        folder = Path("/sys/fs/cgroup") / rel.lstrip("/")
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((folder / "memory.current").read_text())
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def available_memory(device="cpu") -> int | None:
    """Bytes a run on ``device`` can still allocate: the free memory of a CUDA device (plus
    what torch's caching allocator holds unused); on the CPU, MemAvailable of /proc/meminfo
    and the cgroup's remaining limit, whichever is smaller.  ``$YODA_SPARSE_MEMORY_LIMIT`` caps
    it.  None when unknown (no check is made then)."""
    device = torch.device(device)
    found = None
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        found = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    elif device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            found = None
        cg = _cgroup_available()
        if cg is not None:
            found = cg if found is None else min(found, cg)
    cap = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if cap:
        cap_bytes = _parse_bytes(cap)
        found = cap_bytes if found is None else min(found, cap_bytes)
    return found


def check_memory(estimate: MemoryEstimate, device="cpu", *, what: str = "this run", hint: str = "") -> None:
    """Raise :class:`InsufficientMemoryError` naming ``what``, the estimate, what is available
    and ``hint`` (the option that makes it fit) when the estimate exceeds
    :func:`available_memory`."""
    avail = available_memory(device)
    if avail is None or estimate.total <= avail:
        return
    limit = f" (capped by ${MEMORY_LIMIT_ENV})" if os.environ.get(MEMORY_LIMIT_ENV, "").strip() else ""
    raise InsufficientMemoryError(
        f"{what} needs about {format_bytes(estimate.total)} ({estimate.describe()}) but only "
        f"{format_bytes(max(avail, 0))} are available on {torch.device(device)}{limit}" + (f"; {hint}" if hint else ""))
