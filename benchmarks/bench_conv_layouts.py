"""Which layout keeps oneDNN efficient for a convolution over scattered tiles: the measurement
behind the C++ sparse convolution's choice between strips and window batches
(csrc/sparse_conv_plan.h, ``choose_layout``; its third layout, one window per pixel, is timed
through the op by ``bench_sparse_conv.py --cpp-layouts``).

    python benchmarks/bench_conv_layouts.py            # CPU, fp32, 2 threads

For each channel count C and tile size T (output pixels), the same number of output tiles is
convolved (3x3, no padding, channels_last) three ways, and each time is divided by the dense
convolution's time for as many output pixels (a square map, padding 1):

    strip, L tiles per segment   segments of L tiles side by side in one image T + 2 rows tall:
                                 k - 1 = 2 junk output columns per segment
    windows                      one (T + 2) x (T + 2) window per tile, the windows a batch:
                                 no junk output

Ratios > 1 are what a layout costs per useful output pixel over the dense convolution.
"""
from __future__ import annotations

import argparse
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--channels", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--tiles", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--segments", type=int, nargs="+", default=[1, 2, 4], help="tiles per strip segment")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
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
