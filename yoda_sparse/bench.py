"""``yoda-sparse bench``: dense vs sparse YODA sampling on this device, side by side.

For a model (a named config with random weights, or a checkpoint), an image size, a batch and
mask sources, every source is sampled twice with the same seed: with the dense engine (the
whole UNet every step) and with the sparse engine (:class:`yoda_sparse.sparse.SparseUNet`).
Reported per source: time per run and their ratio, the update ratio u (the ideal time
ratio), the work ratio (the time ratio ideal kernels would reach with the run's tiles and
its full steps: fill, refreshes, all-ones steps; ``SparseUNet.summary``) and time / work (how
far the kernels are from that), the active tile fraction of every level, peak memory over
the run's start (on the CPU the bytes malloc has handed out, read in one more run of each
engine that is not timed), and PSNR(sparse, dense): how
far the sparse run drifts from the dense one. Writes a markdown table, a JSON file and two
plots: time ratio against u with the ideal line and the work ratios, and per-step time
against the step's active fraction. Both engines run with the allocator keeping freed memory
(:mod:`yoda_sparse.allocator`).

Mask sources: ``gaussian``; ``edge`` or ``edge:IMAGE`` (edge-based attention on a bundled
image, e.g. ``edge:astronaut``); ``disk`` or ``disk:U`` (a synthetic disk map whose update
ratio is U, default 0.4); ``ones`` (every pixel active every step: dense work).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["BenchConfig", "run_bench", "mask_source"]

DEFAULT_SOURCES = ("gaussian", "edge:astronaut", "edge:coffee", "disk:0.4", "ones")


@dataclass
class BenchConfig:
    model: str = "sr3_16_128"          # a registered config name (random weights) or a checkpoint path
    size: int = 256                     # HR side
    batch: int = 1
    steps: int = 20                     # respaced sampling steps
    sources: tuple = DEFAULT_SOURCES
    lower_bound: float = 0.2
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    seed: int = 0
    repeats: int = 1                    # runs of each engine per source, interleaved (median reported)
    memory: bool = True                 # CPU: one more, untimed run per engine and source for peak memory
    engine_options: dict = field(default_factory=dict)
    out: Path | None = None
    progress: bool = True


def _image(name: str, size: int) -> torch.Tensor:
    """A centre crop of ``size`` pixels of a bundled image (resized first only where the image
    is smaller), [1, 3, size, size] in [0, 1]."""
    from .imageio import bundled_images
    import torch.nn.functional as F

    images = bundled_images()
    if name not in images:
        raise ValueError(f"mask source image: unknown bundled image {name!r}; known: {sorted(images)}")
    img = images[name]()
    img = img.unsqueeze(0) if img.dim() == 3 else img
    if min(img.shape[-2:]) < size:
        f = size / min(img.shape[-2:])
        img = F.interpolate(img, scale_factor=f, mode="bicubic", align_corners=False).clamp(0, 1)
    top, left = (img.shape[-2] - size) // 2, (img.shape[-1] - size) // 2
    return img[..., top:top + size, left:left + size].contiguous()


def mask_source(source: str, size: int, batch: int, lower_bound: float, scale: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(hr image [B, 3, S, S] in [0, 1], attention map [B, 1, S, S]) of a mask source. Maps
    are computed, as the sampler would, on the bicubic upsampling of the image's ``scale``
    times smaller LR version."""
    from .attention import get_attention
    from .imageio import bicubic_downscale, bicubic_upscale

    kind, _, arg = source.partition(":")
    if kind in ("gaussian", "edge"):
        hr = _image(arg or ("astronaut" if kind == "edge" else "coffee"), size)
        attn = get_attention(kind)(bicubic_upscale(bicubic_downscale(hr, scale), scale))
    elif kind == "disk":
        u = float(arg) if arg else 0.4
        if not lower_bound < u <= 1:
            raise ValueError(f"mask source {source!r}: the update ratio must lie in ({lower_bound}, 1]")
        # M is 1 inside the disk, 0 outside: u = l + (1 - l) * area
        area = (u - lower_bound) / (1 - lower_bound)
        yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
        r = math.sqrt(area * size * size / math.pi)
        attn = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) <= r * r).float()[None, None]
        hr = _image("coffee", size)
    elif kind == "ones":
        hr = _image("coffee", size)
        attn = torch.ones(1, 1, size, size)
    else:
        raise ValueError(f"mask source: expected gaussian, edge[:IMAGE], disk[:U] or ones, got {source!r}")
    return hr.expand(batch, -1, -1, -1).contiguous(), attn.expand(batch, -1, -1, -1).contiguous()


class _PeakMemory:
    """Peak memory of this process during a block (CPU runs), sampled every 5 ms: the bytes
    malloc has handed out (:func:`yoda_sparse.allocator.allocated_bytes`; resident memory
    would not fall when the allocator keeps freed pages), resident memory where that is
    unknown."""

    def __enter__(self):
        from .allocator import allocated_bytes

        self._read = allocated_bytes if allocated_bytes() is not None else self._rss
        self.base = self.peak = self._read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._read())

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096
        except OSError:
            return 0

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())


def _build(cfg: BenchConfig):
    from .diffusion import build_diffusion, load_diffusion
    from .models import build_model, get_model_config, list_model_configs

    if cfg.model in list_model_configs():
        config = get_model_config(cfg.model)
        torch.manual_seed(cfg.seed)
        model = build_model(config).eval()
        diff = build_diffusion(model, config)
        label = f"{cfg.model} (random weights)"
    else:
        diff, config, _ = load_diffusion(cfg.model)
        label = str(cfg.model)
    dtype = getattr(torch, cfg.dtype)
    # channels_last: the faster layout of the dense network here (oneDNN and cuDNN alike), so
    # the dense baseline is the fastest dense run, not a strawman
    diff.model.to(device=cfg.device, dtype=dtype, memory_format=torch.channels_last)
    if diff.yoda.lower_bound != cfg.lower_bound:
        diff.yoda.lower_bound = cfg.lower_bound
    return diff, config, label


def _timed_predictor(diff, step_times: list, device: torch.device):
    """Wrap the per-step model call of a dense run to record (1.0, seconds) per step."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    dense_call = diff._predict_noise

    def timed_dense(*a, **k):
        sync()
        t0 = time.perf_counter()
        out = dense_call(*a, **k)
        sync()
        step_times.append((1.0, time.perf_counter() - t0))
        return out

    return timed_dense


def run_bench(cfg: BenchConfig, log=print) -> dict:
    """Run the benchmark; returns the results (and writes them under ``cfg.out`` if set)."""
    from .imageio import bicubic_downscale
    from .metrics import psnr

    from .allocator import keep_freed_memory

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # both engines with malloc keeping freed memory: by default a dense step page-faults its
    # activations in anew every step (0.3-0.6 s of system time per SR3 step on the CPU), which
    # the sparse engine's cache does not, and the dense baseline must be the fastest dense run
    tuned = keep_freed_memory()
    device = torch.device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    diff, config, label = _build(cfg)
    if cfg.size % diff.scale:
        raise ValueError(f"size: {cfg.size} is not a multiple of the model's scale {diff.scale}")
    results = {"model": label, "family": diff.family, "size": cfg.size, "batch": cfg.batch, "steps": cfg.steps,
               "device": _device_name(device), "dtype": cfg.dtype, "torch": torch.__version__,
               "engine_options": cfg.engine_options, "allocator": "glibc, freed memory kept" if tuned else "default",
               "runs": []}
    log(f"[bench] {label}, {cfg.size}x{cfg.size}, batch {cfg.batch}, {cfg.steps} steps, {results['device']}, {cfg.dtype}")
    # warm-up: one-time costs (extension load, oneDNN primitives, the cost model's
    # measurement of each level) stay out of the timings
    hr, attn = mask_source("disk:0.6", cfg.size, cfg.batch, cfg.lower_bound, diff.scale)
    lr = bicubic_downscale(hr, diff.scale).to(device=device, dtype=dtype)
    diff.sample(lr, attn.to(device), steps=2, progress=False, engine="sparse", engine_options=cfg.engine_options)
    diff.sample(lr, attn.to(device), steps=1, progress=False)

    per_step = {"dense": [], "sparse": []}
    for index, source in enumerate(cfg.sources):
        hr, attn = mask_source(source, cfg.size, cfg.batch, cfg.lower_bound, diff.scale)
        lr = bicubic_downscale(hr, diff.scale).to(device=device, dtype=dtype)
        attn = attn.to(device)
        run = {"source": source}
        outputs = {}
        times = {"dense": [], "sparse": []}
        peaks = {"dense": 0, "sparse": 0}
        # repeats interleave the engines, and which one runs first alternates per round and per
        # source, so a drift of the machine does not favour one
        for rep in range(cfg.repeats):
            order = ("dense", "sparse") if (index + rep) % 2 == 0 else ("sparse", "dense")
            for engine in order:
                seconds, res, step_times, peak = _timed_sample(diff, lr, attn, engine, cfg, device)
                times[engine].append(seconds)
                if peak is not None:
                    peaks[engine] = max(peaks[engine], peak)
                outputs[engine] = res.images
                if rep == 0:
                    per_step[engine].extend(step_times)
                if engine == "sparse":
                    summ = res.extras.get("engine_summary", {})
                    run["level_fraction"] = summ.get("level_fraction")
                    run["level_dense_share"] = summ.get("level_dense_share")
                    run["cache_bytes"] = summ.get("cache_bytes")
                    run["packed_weight_bytes"] = summ.get("packed_weight_bytes")
                    run["work_ratio"] = summ.get("work_ratio")
                run["update_ratio"] = float(res.update_ratio.mean())
        if device.type != "cuda":
            # on the CPU peak memory is sampled by a thread, whose wake-ups every 5 ms stall
            # the compute threads (2.5 s in 25 s here), so it gets a run of its own
            for engine in ("dense", "sparse"):
                peaks[engine] = (_timed_sample(diff, lr, attn, engine, cfg, device, watch_memory=True)[3]
                                 if cfg.memory else None)
        for engine in ("dense", "sparse"):
            run[engine] = {"seconds": statistics.median(times[engine]), "runs": times[engine],
                           "peak_bytes": None if peaks[engine] is None else int(peaks[engine])}
        run["time_ratio"] = run["sparse"]["seconds"] / run["dense"]["seconds"]
        run["psnr_sparse_vs_dense"] = float(psnr(outputs["sparse"].float().cpu(), outputs["dense"].float().cpu(),
                                                 scale=diff.scale).mean())
        results["runs"].append(run)
        fr = run.get("level_fraction") or []
        log(f"[bench] {source:16s} u={run['update_ratio']:.3f}  dense {run['dense']['seconds']:7.2f} s  "
            f"sparse {run['sparse']['seconds']:7.2f} s  ratio {run['time_ratio']:.3f}  "
            f"work ratio {run.get('work_ratio') or float('nan'):.3f}  "
            f"tiles per level {[round(f, 2) for f in fr]}  PSNR(sparse, dense) {run['psnr_sparse_vs_dense']:.2f} dB")
    dense_mean = statistics.mean(t for _, t in per_step["dense"]) if per_step["dense"] else float("nan")
    results["per_step"] = {"dense_mean_s": dense_mean,
                           "sparse": [(f, t) for f, t in per_step["sparse"]]}
    if cfg.out is not None:
        write_outputs(results, Path(cfg.out))
        log(f"[bench] wrote {Path(cfg.out) / 'bench.md'}, bench.json, time_ratio.png, step_time.png")
    return results


def _timed_sample(diff, lr, attn, engine: str, cfg: BenchConfig, device: torch.device, *,
                  watch_memory: bool = False):
    """One sampling run on ``engine``: (seconds, result, per-step (active fraction, seconds) of
    the sparse engine or seconds of the dense one, peak memory over the run's start: on a GPU
    always, on the CPU only with ``watch_memory`` (None otherwise), whose sampling thread
    slows the run down)."""
    from .sparse import SparseUNet

    step_times: list = []
    original = diff._predict_noise
    original_predict = SparseUNet.predict
    if engine == "dense":
        diff._predict_noise = _timed_predictor(diff, step_times, device)
    else:
        def timed_predict(self, z, mask, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = original_predict(self, z, mask, **kw)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_times.append((float(mask.float().mean()), time.perf_counter() - t0))
            return out
        SparseUNet.predict = timed_predict
        SparseUNet.__call__ = timed_predict
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.synchronize(device)
        with (_PeakMemory() if watch_memory and device.type != "cuda" else contextlib.nullcontext()) as mem:
            t0 = time.perf_counter()
            res = diff.sample(lr, attn, steps=cfg.steps, generator=torch.Generator().manual_seed(cfg.seed),
                              progress=cfg.progress, engine=engine,
                              engine_options=cfg.engine_options if engine == "sparse" else None)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
    finally:
        diff._predict_noise = original
        SparseUNet.predict = original_predict
        SparseUNet.__call__ = original_predict
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = mem.peak - mem.base if mem is not None else None
    return seconds, res, step_times, peak


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def format_table(results: dict) -> str:
    lines = [f"{results['model']}, {results['size']}x{results['size']}, batch {results['batch']}, "
             f"{results['steps']} steps, {results['device']}, {results['dtype']}, torch {results['torch']}, "
             f"engine options {results['engine_options'] or 'default'}, allocator {results.get('allocator', 'default')}", "",
             "| mask | u | dense s | sparse s | time ratio | work ratio | time / work | tiles per level | "
             "peak MB dense / sparse | cache MB (maps / packed weights) | PSNR(sparse, dense) dB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    def mb(n):
        return "-" if n is None else f"{n / 2**20:.0f}"

    for r in results["runs"]:
        fr = "/".join(f"{f:.2f}" for f in (r.get("level_fraction") or []))
        work = r.get("work_ratio")
        work_cols = f"{work:.3f} | {r['time_ratio'] / work:.2f}" if work else "- | -"
        lines.append(f"| {r['source']} | {r['update_ratio']:.3f} | {r['dense']['seconds']:.2f} | {r['sparse']['seconds']:.2f} | "
                     f"{r['time_ratio']:.3f} | {work_cols} | {fr} | {mb(r['dense']['peak_bytes'])} / "
                     f"{mb(r['sparse']['peak_bytes'])} | {(r.get('cache_bytes') or 0) / 2**20:.0f} / "
                     f"{(r.get('packed_weight_bytes') or 0) / 2**20:.0f} | "
                     f"{r['psnr_sparse_vs_dense']:.2f} |")
    return "\n".join(lines) + "\n"


def write_outputs(results: dict, out: Path) -> None:
    from .atomic import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "bench.json", mode="w") as f:
        json.dump(results, f, indent=1)
    with atomic_write(out / "bench.md", mode="w") as f:
        f.write(format_table(results))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for i, r in enumerate(results["runs"]):
        ax.plot(r["update_ratio"], r["time_ratio"], "o", color=f"C{i}")
        ax.annotate(r["source"], (r["update_ratio"], r["time_ratio"]), fontsize=7)
        if r.get("work_ratio"):  # what an ideal kernel would reach with these tiles and steps
            ax.plot(r["update_ratio"], r["work_ratio"], "x", color=f"C{i}",
                    label="work ratio (x): ideal kernels, these tiles" if i == 0 else None)
    ax.plot([0, 1], [0, 1], "k:", label="ideal (time ratio = u)")
    ax.set_xlabel("update ratio u")
    ax.set_ylabel("time sparse / time dense")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, 1.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{results['model']}, {results['size']}px, {results['device']}", fontsize=7)
    fig.tight_layout()
    with atomic_write(out / "time_ratio.png") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    pts = results["per_step"]["sparse"]
    dm = results["per_step"]["dense_mean_s"]
    if pts and dm == dm:
        ax.plot([f for f, _ in pts], [t / dm for _, t in pts], ".", ms=4, label="sparse steps")
    ax.plot([0, 1], [0, 1], "k:", label="ideal")
    ax.axhline(1.0, color="gray", lw=0.8, label="dense step (mean)")
    ax.set_xlabel("active pixel fraction of the step")
    ax.set_ylabel("step time / mean dense step time")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(out / "step_time.png") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- command line
_NONE = object()  # --refresh-above none: the option set to None, not left at its default


def _share_or_none(text: str):
    if text.strip().lower() == "none":
        return _NONE
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share in (0, 1] or 'none', got {text!r}") from None


def add_engine_arguments(q, *, with_engine: bool = True) -> None:
    """The engine choice and the SparseUNet options, shared by bench, upscale and eval."""
    from .sparse.norm import NORM_STATS

    if with_engine:
        q.add_argument("--engine", choices=("auto", "dense", "sparse"), default="auto",
                       help="YODA runs: 'sparse' computes the UNet only on each step's active tiles, 'dense' "
                            "everywhere; 'auto' (default) is sparse where the model is large enough to pay")
    q.add_argument("--sparse-tile", type=int, default=None,
                   help="sparse engine: tile side at full resolution (default 8)")
    q.add_argument("--min-tile", type=int, default=None, help="sparse engine: smallest tile side at deep levels")
    q.add_argument("--halo", type=int, default=None, help="sparse engine: dilation of active tiles, in tiles")
    q.add_argument("--norm-stats", choices=NORM_STATS, default=None,
                   help="sparse engine: group-norm statistics of sparse steps")
    q.add_argument("--probes", type=int, default=None,
                   help="sparse engine: probe tiles per side when norm statistics are probed (default 2)")
    q.add_argument("--refresh-every", type=int, default=None,
                   help="sparse engine: a dense step k steps after the cache was last computed whole")
    q.add_argument("--refresh-above", type=_share_or_none, default=None, metavar="SHARE|none",
                   help="sparse engine: run a step whole (a refresh) when its active tiles hold this share of "
                        "a dense step's work or more (default 0.85; 'none': never)")
    q.add_argument("--dense-threshold", type=float, default=None,
                   help="sparse engine: run a level dense from this active fraction on (default: measured "
                        "on this device at first use)")


def engine_options_from_args(args) -> dict:
    opts = {}
    for flag, name in (("sparse_tile", "tile"), ("min_tile", "min_tile"), ("halo", "halo"),
                       ("norm_stats", "norm_stats"), ("probes", "probes"),
                       ("refresh_every", "refresh_every"), ("refresh_above", "refresh_above")):
        v = getattr(args, flag, None)
        if v is not None:
            opts[name] = None if v is _NONE else v
    if getattr(args, "dense_threshold", None) is not None:
        opts["cost_model"] = float(args.dense_threshold)
    return opts


def add_bench_arguments(q) -> None:
    q.add_argument("--model", default="sr3_16_128", help="registered config (random weights) or a checkpoint file")
    q.add_argument("--size", type=int, default=256, help="HR image side")
    q.add_argument("--batch", type=int, default=1)
    q.add_argument("--steps", type=int, default=20, help="respaced sampling steps")
    q.add_argument("--sources", nargs="+", default=list(DEFAULT_SOURCES),
                   help="mask sources: gaussian, edge[:IMAGE], disk[:U], ones")
    q.add_argument("--lower-bound", type=float, default=0.2)
    q.add_argument("--device", default="cpu")
    q.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16", "float64"))
    q.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--repeats", type=int, default=1, help="runs of each engine per mask source, interleaved (median)")
    q.add_argument("--out", default="out/bench", help="folder for bench.md/json and the plots")
    q.add_argument("--no-progress", action="store_true")
    q.add_argument("--no-memory", action="store_true",
                   help="CPU: skip the untimed run per engine and mask source that reads peak memory")
    add_engine_arguments(q, with_engine=False)


def bench_from_args(args) -> int:
    for name in ("size", "batch", "steps", "repeats"):
        v = getattr(args, name)
        if v < 1:
            raise ValueError(f"--{name}: expected a positive integer, got {v}")
    cfg = BenchConfig(model=args.model, size=args.size, batch=args.batch, steps=args.steps,
                      sources=tuple(args.sources), lower_bound=args.lower_bound, device=args.device,
                      dtype=args.dtype, threads=args.threads, seed=args.seed, repeats=args.repeats,
                      engine_options=engine_options_from_args(args), out=Path(args.out),
                      progress=not args.no_progress, memory=not args.no_memory)
    run_bench(cfg)
    return 0
