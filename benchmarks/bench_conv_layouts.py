"""Which layout keeps oneDNN efficient for a convolution over scattered tiles: the measurement
behind the C++ sparse convolution's choice between strips and window batches
(csrc/sparse_conv_plan.h, ``choose_layout``; its third and fourth layouts, one window per pixel
and the direct implicit GEMM, are timed through the op by ``--fused`` and
``bench_sparse_conv.py --cpp-layouts``).

    python benchmarks/bench_conv_layouts.py            # CPU, fp32, 2 threads

For each channel count C and tile size T (output pixels), the same number of output tiles is
convolved (3x3, no padding, channels_last) three ways, and each time is divided by the dense
convolution's time for as many output pixels (a square map, padding 1):

    strip, L tiles per segment   segments of L tiles side by side in one image T + 2 rows tall:
                                 k - 1 = 2 junk output columns per segment
    windows                      one (T + 2) x (T + 2) window per tile, the windows a batch:
                                 no junk output

Ratios > 1 are what a layout costs per useful output pixel over the dense convolution.

    python benchmarks/bench_conv_layouts.py --fused    # the op itself, every layout forced

``--fused`` times what the engine runs: ``ops.sparse_conv2d`` (C++ backend) with the group-norm
+ SiLU prologue and the residual epilogue, each layout forced (YODA_SPARSE_CONV_LAYOUT) and
the kernel's own choice, over the UNets' level shapes (input channels, output channels, map
side, tile) and five masks (a compact disk at f 0.3 / 0.7, random tiles at 0.5 / 0.85, smooth
blobs at 0.5). Times are over f x the dense layer (group norm, SiLU, convolution, residual add:
what the model runs), and the last line counts the cases where the choice is over 5% slower
than the best layout: the sweep the layout costs of csrc/sparse_conv_plan.h are fitted to.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F


def median_ms(fn, rounds: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


FUSED_SHAPES = [(64, 64, 256, 8), (192, 64, 256, 8), (128, 128, 128, 4), (384, 128, 128, 4), (256, 256, 64, 2),
                (768, 256, 64, 2), (512, 512, 32, 1), (1024, 512, 32, 1), (512, 512, 16, 1), (1024, 512, 16, 1),
                (256, 256, 64, 4), (512, 512, 32, 2), (128, 128, 128, 8)]
FUSED_MASKS = [("disk", 0.3), ("disk", 0.7), ("random", 0.5), ("random", 0.85), ("blobs", 0.5)]


def tile_mask(kind: str, f: float, n: int, seed: int = 1) -> torch.Tensor:
    """Bool [1, n, n] tile map of about f active tiles: a centred disk, independent random
    tiles, or a thresholded smooth random field (blobs)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "disk":
        yy, xx = torch.meshgrid(torch.arange(n) + 0.5, torch.arange(n) + 0.5, indexing="ij")
        r2 = f * n * n / 3.141592653589793
        return (((yy - n / 2) ** 2 + (xx - n / 2) ** 2) <= r2)[None]
    if kind == "random":
        return torch.rand(1, n, n, generator=g) < f
    field = F.interpolate(torch.rand(1, 1, 8, 8, generator=g), size=(n, n), mode="bicubic", align_corners=False)[0]
    return field > torch.quantile(field.flatten(), 1 - f)


def fused_sweep(rounds: int) -> int:
    from yoda_sparse import ops

    cl = torch.channels_last
    layouts = ("strip", "windows", "pixels", "direct", None)
    print("| C_in -> C_out | side | tile | mask | f | dense ms | strip | windows | pixels | direct | chosen |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    misses = cases = 0
    for cin, cout, side, tile in FUSED_SHAPES:
        torch.manual_seed(0)
        x = torch.randn(1, cin, side, side).to(memory_format=cl)
        w = (torch.randn(cout, cin, 3, 3) * 0.02).to(memory_format=cl)
        b = torch.randn(cout)
        res = torch.randn(1, cout, side, side).to(memory_format=cl)
        norm = ops.NormParams(torch.zeros(1, 32), torch.ones(1, 32), torch.ones(cin), torch.zeros(cin))
        dense = median_ms(lambda: F.conv2d(F.silu(F.group_norm(x, 32)), w, b, padding=1) + res, rounds)
        for kind, f in FUSED_MASKS:
            tm = tile_mask(kind, f, side // tile)
            tiles, count = ops.tile_list(tm)
            frac = float(tm.float().mean())
            out = torch.zeros(1, cout, side, side).to(memory_format=cl)
            ratios = {}
            for lay in layouts:
                if lay == "windows" and tile == 1:
                    continue  # a 1-px window batch costs 3-8x: never chosen
                if lay is None:
                    os.environ.pop("YODA_SPARSE_CONV_LAYOUT", None)
                else:
                    os.environ["YODA_SPARSE_CONV_LAYOUT"] = lay
                ms = median_ms(lambda: ops.sparse_conv2d(x, w, b, tiles, out, count=count, tile=tile, padding=1,
                                                         norm=norm, act="silu", residual=res, backend="cpp"), rounds)
                ratios[lay] = ms / (frac * dense)
            os.environ.pop("YODA_SPARSE_CONV_LAYOUT", None)
            best = min(v for k, v in ratios.items() if k is not None)
            cases += 1
            misses += ratios[None] > 1.05 * best
            cell = lambda k: f"{ratios[k]:.2f}" if k in ratios else "-"
            print(f"| {cin} -> {cout} | {side} | {tile} | {kind} | {frac:.2f} | {dense:.2f} | {cell('strip')} | "
                  f"{cell('windows')} | {cell('pixels')} | {cell('direct')} | {cell(None)} |", flush=True)
    print(f"\nchosen layout over 5% slower than the best: {misses} of {cases}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--channels", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--tiles", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--segments", type=int, nargs="+", default=[1, 2, 4], help="tiles per strip segment")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--fused", action="store_true", help="time the op itself with each layout forced (see above)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.fused:
        return fused_sweep(min(args.rounds, 7))
    cl = torch.channels_last
    print(f"# 3x3 convolution layouts over scattered tiles: {args.threads} threads, float32, torch {torch.__version__}\n")
    print("| C | tile | tiles | dense ms (same pixels) | windows | " +
          " | ".join(f"strip, {n}-tile segments" for n in args.segments) + " |")
    print("|---|---|---|---|---|" + "---|" * len(args.segments))
    for C in args.channels:
        w = torch.randn(C, C, 3, 3).to(memory_format=cl)
        for T in args.tiles:
            n_tiles = max(16, (1 << 20) // (C * T * T))  # about the same FLOPs per row
            side = max(1, round(n_tiles ** 0.5)) * T
            dense = torch.randn(1, C, side, side).to(memory_format=cl)
            dense_ms = median_ms(lambda: F.conv2d(dense, w, padding=1), args.rounds) * n_tiles * T * T / side ** 2
            windows = torch.randn(n_tiles, C, T + 2, T + 2).to(memory_format=cl)
            cells = [median_ms(lambda: F.conv2d(windows, w), args.rounds) / dense_ms]
            for n in args.segments:
                strip = torch.randn(1, C, T + 2, (n_tiles // n) * (n * T + 2)).to(memory_format=cl)
                cells.append(median_ms(lambda: F.conv2d(strip, w), args.rounds) / dense_ms)
            print(f"| {C} | {T} | {n_tiles} | {dense_ms:.2f} | " + " | ".join(f"{c:.2f}" for c in cells) + " |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
