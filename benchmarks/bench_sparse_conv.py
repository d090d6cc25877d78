"""Tile-sparse convolution vs dense, side by side in one run: time / dense time per active
fraction f (the fraction of output tiles computed), for every backend that can run here.

    python benchmarks/bench_sparse_conv.py                       # CPU sweep, fp32, 2 threads
    python benchmarks/bench_sparse_conv.py --quick               # a few shapes
    python benchmarks/bench_sparse_conv.py --device cuda --dtype bfloat16 --batch 4

Methods, each timed in the same run and interleaved (one call of each per round, median over
rounds, so drifts of the machine hit all of them alike):
    dense      F.conv2d of the whole map, channels_last (the fastest dense layout here)
    reference  the pure-PyTorch gather -> conv -> scatter over tiles (SIGE's scheme)
    <backend>  every other registered backend of ops.sparse_conv2d that can serve the inputs
    cpp[strip], cpp[windows], cpp[pixels], cpp[direct]   (--cpp-layouts) the C++ kernel with each of its layouts
               forced, where "cpp" picks one per call by its cost rule
Masks: "random" (exactly round(f * tiles) tiles drawn at random) and "blob" (the round(f *
tiles) tiles nearest the centre: one compact disk). Writes a markdown table and a plot of
time ratio against f with the ideal line ``f``.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from yoda_sparse import ops  # noqa: E402
from yoda_sparse.ops import registry  # noqa: E402

FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.85, 1.0)
# (channels, resolution) pairs that the SR3 16->128 UNet has at 128x128 and 256x256 inputs
SHAPES = ((64, 256), (128, 128), (128, 256), (256, 64), (512, 32), (512, 16), (64, 128), (256, 32))
QUICK_SHAPES = ((128, 128), (64, 256), (256, 64))
LAYOUT_ENV = "YODA_SPARSE_CONV_LAYOUT"


def tile_map(kind: str, batch: int, n_h: int, n_w: int, f: float, gen: torch.Generator) -> torch.Tensor:
    """A bool [batch, n_h, n_w] map with round(f * n_h * n_w) active tiles per image."""
    k = round(f * n_h * n_w)
    maps = torch.zeros(batch, n_h * n_w, dtype=torch.bool)
    if kind == "random":
        for b in range(batch):
            maps[b, torch.randperm(n_h * n_w, generator=gen)[:k]] = True
    elif kind == "blob":
        yy, xx = torch.meshgrid(torch.arange(n_h), torch.arange(n_w), indexing="ij")
        dist = ((yy - (n_h - 1) / 2) ** 2 + (xx - (n_w - 1) / 2) ** 2).flatten()
        maps[:, dist.argsort()[:k]] = True
    else:
        raise ValueError(f"mask kind: expected 'random' or 'blob', got {kind!r}")
    return maps.view(batch, n_h, n_w)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict, rounds: int, device: torch.device) -> dict:
    """Median seconds per call of each fn, calling them in turn, one call each per round."""
    for fn in fns.values():  # warm-up (oneDNN primitive creation, autotuning, JIT builds)
        fn()
    synchronize(device)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def sparse_backends(x, weight, bias, tiles, count, out, tile) -> list[str]:
    names = []
    for b in registry.backends("sparse_conv2d"):
        if b.name == "reference":
            continue
        args = (x, None, weight, bias, tiles, count, out, tile, 1, 1, "zeros", 1, False, None, None, None, None, None)
        if b.why_not(*args) is None and b.forced_only(*args) is None:
            names.append(b.name)
    return names


def with_layout(layout: str, fn):
    """``fn`` with the C++ kernel's layout forced (csrc/sparse_conv_plan.h reads it per call)."""
    def call():
        os.environ[LAYOUT_ENV] = layout
        try:
            fn()
        finally:
            del os.environ[LAYOUT_ENV]
    return call


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--tiles", type=int, nargs="+", default=[8, 16], help="tile sizes in output pixels")
    ap.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    ap.add_argument("--masks", nargs="+", default=["blob", "random"], choices=("blob", "random"))
    ap.add_argument("--shapes", nargs="+", default=None, help="CxR pairs, e.g. 128x128 64x256")
    ap.add_argument("--quick", action="store_true", help="three shapes, tile 16")
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) reference backend")
    ap.add_argument("--cpp-layouts", action="store_true",
                    help="also time the cpp backend with each layout forced: cpp[strip], cpp[windows], "
                         "cpp[pixels], cpp[direct] (cpp picks one per call)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("out/bench_sparse_conv"))
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = tuple(tuple(int(v) for v in s.lower().split("x")) for s in args.shapes)
    tiles_sizes = [16] if args.quick else args.tiles
    gen = torch.Generator().manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    header = (f"# Tile-sparse 3x3 convolution, {device_name(device)}, {args.dtype}, batch {args.batch}, "
              f"torch {torch.__version__}\n\ntime / dense time (dense = F.conv2d on the whole channels_last map; "
              f"median of {args.rounds} interleaved rounds)\n")
    print(header, flush=True)
    for C, R in shapes:
        x = torch.randn(args.batch, C, R, R, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = (torch.randn(C, C, 3, 3, device=device, dtype=dtype) / math.sqrt(9 * C)).contiguous(memory_format=torch.channels_last)
        b = torch.randn(C, device=device, dtype=dtype)
        out = torch.zeros_like(x)
        for tile in tiles_sizes:
            if tile > R:
                continue
            n = -(-R // tile)
            for kind in args.masks:
                for f in args.fractions:
                    m = tile_map(kind, args.batch, n, n, f, gen).to(device)
                    tl, cnt = ops.tile_list(m)
                    f_real = m.float().mean().item()
                    fns = {"dense": lambda: F.conv2d(x, w, b, padding=1)}
                    if not args.no_reference:
                        fns["reference"] = lambda: ops.sparse_conv2d(x, w, b, tl, out, count=cnt, tile=tile, backend="reference")
                    for name in sparse_backends(x, w, b, tl, cnt, out, (tile, tile)):
                        fns[name] = (lambda nm: lambda: ops.sparse_conv2d(x, w, b, tl, out, count=cnt, tile=tile, backend=nm))(name)
                    if args.cpp_layouts and "cpp" in fns:
                        for layout in ("strip", "windows", "pixels", "direct"):
                            fns[f"cpp[{layout}]"] = with_layout(layout, fns["cpp"])
                    t = time_interleaved(fns, args.rounds, device)
                    row = dict(C=C, R=R, tile=tile, mask=kind, f=f_real, dense_ms=t["dense"] * 1e3,
                               **{f"{k}": v / t["dense"] for k, v in t.items() if k != "dense"})
                    rows.append(row)
                    print(f"C{C:<4d} {R:>3d}px tile {tile:>2d} {kind:6s} f={f_real:.2f} dense {t['dense'] * 1e3:8.2f} ms  "
                          + "  ".join(f"{k} {v:.3f}" for k, v in row.items() if k not in ("C", "R", "tile", "mask", "f", "dense_ms"))
                          + f"   target {1.15 * f_real + 0.05:.3f}", flush=True)
    methods = [k for k in rows[0] if k not in ("C", "R", "tile", "mask", "f", "dense_ms")] if rows else []
    lines = [header, "| C | res | tile | mask | f | dense ms | " + " | ".join(methods) + " | 1.15f+0.05 |",
             "|---|---|---|---|---|---|" + "---|" * len(methods) + "---|"]
    for r in rows:
        lines.append(f"| {r['C']} | {r['R']} | {r['tile']} | {r['mask']} | {r['f']:.2f} | {r['dense_ms']:.2f} | "
                     + " | ".join(f"{r[m]:.3f}" for m in methods) + f" | {1.15 * r['f'] + 0.05:.3f} |")
    table = args.out / f"sparse_conv_{device.type}_{args.dtype}_b{args.batch}.md"
    table.write_text("\n".join(lines) + "\n")
    print(f"wrote {table}")
    try:
        _plot(rows, methods, args.out / f"sparse_conv_{device.type}_{args.dtype}_b{args.batch}.png", header.splitlines()[0])
    except ImportError:
        pass
    return 0


def _plot(rows, methods, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["C"], r["R"]) for r in rows})
    cols = min(4, len(shapes))
    fig, axes = plt.subplots(-(-len(shapes) // cols), cols, figsize=(4 * cols, 3.2 * -(-len(shapes) // cols)), squeeze=False)
    for ax, (C, R) in zip(axes.flat, shapes):
        sub = [r for r in rows if (r["C"], r["R"]) == (C, R)]
        for m in methods:
            for kind, style in (("blob", "-"), ("random", "--")):
                for tile in sorted({r["tile"] for r in sub}):
                    pts = sorted((r["f"], r[m]) for r in sub if r["mask"] == kind and r["tile"] == tile)
                    if pts:
                        ax.plot(*zip(*pts), style, marker="o", ms=3, label=f"{m} {kind} t{tile}")
        ax.plot([0, 1], [0, 1], "k:", label="ideal f")
        ax.set_title(f"C{C}, {R}x{R}")
        ax.set_xlabel("active fraction f")
        ax.set_ylabel("time / dense")
        ax.set_ylim(0, 2.5)
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
