"""CPU benchmark of the YODA ops: eager reference vs torch.compile(reference) vs the C++ backend.

Times, side by side in one run, for batch {1,4,16} x 3 x {128,256,512}^2 (float32, a bool
mask with ~70% active pixels, the paper's update ratio):

* ``yoda_step`` with explicit noise tensors (noise = lr_noise),
* ``yoda_step`` with in-kernel noise (cpp: Philox from (seed, offset); eager reference: a seeded
  torch.Generator + randn; compiled reference: ``torch.randn_like`` inside the compiled graph),
* ``masked_l1_loss`` forward + backward (gradient w.r.t. pred, normalize="all").

Reports the median wall time per call, the achieved bandwidth (the bytes the op must move /
time; formulas below) and the speedup vs the eager reference, with the CPU model, the torch
version and the thread count.  Eager and cpp go through the public ``yoda_sparse.ops`` entry
points (validation and dispatch included); the compiled reference compiles the reference
function itself (first call, excluded from the timing, compiles).

    python benchmarks/bench_cpu_ops.py --out benchmarks/cpu_results.md
    python benchmarks/bench_cpu_ops.py --batches 1 4 --sizes 128 256 --no-compile
    python benchmarks/bench_cpu_ops.py --ops l1 --no-compile
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from yoda_sparse import NoiseSchedule, ops
from yoda_sparse.ops import cpp_backend, reference

# All default shapes are timed (none skipped: the slowest cell, eager at 16x3x512x512, takes
# ~0.5 s a call); --max-elements skips larger ones and the report lists them.
IMPLS = ("eager", "compile", "cpp")
OPS = {"step_noise": "yoda_step noise", "step_seed": "yoda_step in-kernel noise", "l1": "masked_l1 fwd+bwd"}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def median_seconds(fns: dict, *, min_reps: int, budget_s: float, max_reps: int = 50) -> dict:
    """Median wall time of each fn, timed in interleaved rounds (one call of each per round), so
    that a change of machine load during the measurement hits every implementation alike."""
    for fn in fns.values():
        fn()
        fn()  # warm-up: compiles, allocator, thread pool
    times = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_reps and (rounds < min_reps or time.perf_counter() - start < budget_s * len(fns)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: statistics.median(ts) for name, ts in times.items()}


class Case:
    """Inputs and the three implementations of one (op, shape)."""

    def __init__(self, op: str, shape, schedule: NoiseSchedule, t: int, compiled: dict):
        B, C, H, W = shape
        self.op, self.shape = op, shape
        g = torch.Generator().manual_seed(0)
        rand = lambda: torch.randn(shape, generator=g)  # noqa: E731
        mask = torch.rand(B, 1, H, W, generator=g) < 0.7
        n, es, pixels = B * C * H * W, 4, B * H * W
        if op == "masked_l1 fwd+bwd":
            pred, target = rand().requires_grad_(), rand()
            self.bytes = 5 * n * es + 2 * pixels  # fwd: pred, target, mask; bwd: pred, target, mask -> grad_pred

            def run(fn):
                def call():
                    pred.grad = None
                    fn(pred, target, mask, "all").backward()
                return call

            self.fns = {
                "eager": run(lambda *a: ops.masked_l1_loss(*a, backend="reference")),
                "compile": run(compiled["loss"]) if compiled else None,
                "cpp": run(lambda *a: ops.masked_l1_loss(*a, backend="cpp")),
            }
            return
        z, eps, x_bar = rand(), rand(), rand()
        coeffs = ops.step_coefficients(schedule, t)
        if op == "yoda_step noise":
            noise = rand()
            self.bytes = 5 * n * es + pixels  # z, eps, x_bar, noise, mask -> out
            self.fns = {
                "eager": lambda: ops.yoda_step(z, eps, x_bar, mask, t, schedule, noise=noise, backend="reference"),
                "compile": lambda: compiled["step_noise"](z, eps, x_bar, mask, noise, coeffs),
                "cpp": lambda: ops.yoda_step(z, eps, x_bar, mask, t, schedule, noise=noise, backend="cpp"),
            }
        else:
            self.bytes = 4 * n * es + pixels  # z, eps, x_bar, mask -> out (noise made in registers)
            self.fns = {
                "eager": lambda: ops.yoda_step(z, eps, x_bar, mask, t, schedule, seed=7, offset=0, backend="reference"),
                "compile": lambda: compiled["step_seed"](z, eps, x_bar, mask, coeffs),
                "cpp": lambda: ops.yoda_step(z, eps, x_bar, mask, t, schedule, seed=7, offset=0, backend="cpp"),
            }


def compiled_references() -> dict:
    def step_noise(z, eps, x_bar, mask, noise, coeffs):
        return reference.yoda_step_from_coefficients(z, eps, x_bar, mask, noise, noise, clip_x0=False, **coeffs)

    def step_seed(z, eps, x_bar, mask, coeffs):
        noise = torch.randn_like(z)
        return reference.yoda_step_from_coefficients(z, eps, x_bar, mask, noise, noise, clip_x0=False, **coeffs)

    return {
        "loss": torch.compile(reference.masked_l1_loss),
        "step_noise": torch.compile(step_noise),
        "step_seed": torch.compile(step_seed),
    }


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def section(threads: int, args, schedule, t, compiled, impls) -> list[str]:
    """Time every (op, shape) with ``threads`` intra-op threads: one markdown table."""
    torch.set_num_threads(threads)
    load_before, began = load_average(), time.time()
    rows, skipped, speedups = [], [], {}
    for op in (OPS[key] for key in args.ops):
        for B in args.batches:
            for S in args.sizes:
                shape = (B, args.channels, S, S)
                if math.prod(shape) > args.max_elements:
                    skipped.append(f"{op} {'x'.join(map(str, shape))}")
                    continue
                case = Case(op, shape, schedule, t, compiled)
                times = median_seconds({i: case.fns[i] for i in impls}, min_reps=5, budget_s=args.budget)
                for impl in impls:
                    speedup = times["eager"] / times[impl]
                    rows.append((op, "x".join(map(str, shape)), impl, times[impl] * 1e3,
                                 case.bytes / times[impl] / 1e9, speedup))
                    speedups.setdefault((op, impl), []).append(speedup)
                print(f"threads {threads} {op:26s} {'x'.join(map(str, shape)):14s} "
                      + "  ".join(f"{i} {times[i] * 1e3:8.2f} ms" for i in impls), flush=True)
    lines = [
        "",
        f"### torch.set_num_threads({threads})",
        "",
        f"Load average before/after: {load_before} / {load_average()}; {time.time() - began:.0f} s.",
        "",
        "| op | shape | impl | median ms | GB/s | speedup vs eager |",
        "|---|---|---|---:|---:|---:|",
    ]
    lines += [f"| {op} | {shape} | {impl} | {ms:.3f} | {gbs:.2f} | {sp:.2f}x |" for op, shape, impl, ms, gbs, sp in rows]
    lines += ["", "Speedup vs eager, geometric mean (min..max) over shapes:", ""]
    for (op, impl), values in speedups.items():
        if impl == "eager":
            continue
        gmean = math.exp(sum(math.log(v) for v in values) / len(values))
        lines.append(f"- {op}, {impl}: {gmean:.2f}x ({min(values):.2f}x..{max(values):.2f}x)")
    if skipped:
        lines += ["", f"Skipped (over --max-elements {args.max_elements}): " + ", ".join(skipped)]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the markdown report to this file")
    parser.add_argument("--threads", type=int, nargs="+", default=[2],
                        help="torch.set_num_threads value(s); one table per value (default 2)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--max-elements", type=int, default=16 * 3 * 512 * 512,
                        help="skip shapes with more elements (default: none of the defaults is skipped)")
    parser.add_argument("--ops", nargs="+", choices=tuple(OPS), default=list(OPS),
                        help="which ops to time (default all): step_noise = yoda_step with noise tensors, step_seed ="
                        " yoda_step with in-kernel noise, l1 = masked_l1_loss forward + backward")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timed calls per cell (min 5 calls)")
    args = parser.parse_args(argv)

    reason = cpp_backend.ensure_loaded()
    if reason is not None:
        print(f"error: the C++ backend is unavailable: {reason}", file=sys.stderr)
        return 1
    schedule, t = NoiseSchedule.linear(200), 100
    compiled = {} if args.no_compile else compiled_references()
    impls = [i for i in IMPLS if not (args.no_compile and i == "compile")]
    lines = [
        "## CPU: yoda-sparse ops, eager reference vs torch.compile(reference) vs C++ backend",
        "",
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical CPUs visible)",
        f"- torch {torch.__version__}, Python {platform.python_version()}, float32, mask bool ~70% active",
        "- median of >= 5 calls per cell (>= {:g} s per cell), the implementations timed in interleaved rounds;"
        " eager and cpp through the public ops (validation + dispatch), compile = torch.compile of the reference"
        " function (compile time excluded)".format(args.budget),
        "- GB/s = bytes the op must move / time: step with noise 5N*4 + BHW (z, eps, x_bar, noise, mask -> out);"
        " step with in-kernel noise 4N*4 + BHW; loss fwd+bwd 5N*4 + 2BHW (pred, target, mask; then pred,"
        " target, mask -> grad_pred); N = B*C*H*W",
    ]
    for threads in args.threads:
        lines += section(threads, args, schedule, t, compiled, impls)
    report = "\n".join(lines) + "\n"
    print()
    print(report)
    if args.out:
        write_atomic(args.out, report)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
