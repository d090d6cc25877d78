"""GPU benchmark of the YODA ops: eager reference vs torch.compile(reference) vs the Triton
backend vs the CUDA extension ("cuda_ext", when built), side by side in one run.

Ops timed (batch {1,4,16} x 3 x {128,256,512}^2 by default):
  * yoda_step with explicit noise (noise tensor read; lr_noise = noise),
  * yoda_step with in-kernel noise (seed/offset; the reference draws it with torch),
  * masked L1 loss forward + backward (grad for pred only, as in training: target = noise).

Timing, two ways: ``triton.testing.do_bench`` medians (20th/80th percentiles) of single calls
from Python, which include the host's launch overhead where it exceeds the device work; and
the device time alone, from a CUDA graph of the calls on K rotating input sets (see
:func:`graph_ms`). Bandwidth: the bytes each op must move over the device time, and its
fraction of the bandwidth of a plain device-to-device ``copy_`` of a large tensor measured in
the same run. Byte models:
  * yoda_step: every input read once and the output written once (z, eps, x_bar, noise ->
    out; no noise with in-kernel noise; the bool mask once per pixel). The kernels read z and
    eps only where the mask is set and x_bar only where it is not, so with a mask they may
    move less than this; but DRAM moves whole sectors, and a coherent mask's edges cut most
    of them, so the dense count is the honest floor to compare with a copy;
  * masked L1 forward + backward: the forward reads pred and target everywhere (a NaN anywhere
    must reach the loss) and the mask; the backward reads them again and writes grad_pred. Two
    separate calls cannot move less: the backward needs either the inputs or a saved per-element
    sign, which costs the forward a write and the backward a read of the same size.

Backends are called with the public op's validated arguments (``yoda_sparse.ops.select(...)
.fn``), so every column pays the same (no) validation overhead.

Usage:  python benchmarks/bench_gpu_ops.py [--dtype float32] [--active 0.7] [--out FILE]
Needs a CUDA device; prints a markdown table naming the GPU.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

DTYPES = ("float32", "float16", "bfloat16")
DEVICE = "cuda"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="image dtype (default float32)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16], help="batch sizes (default 1 4 16)")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512], help="square image sides (default 128 256 512)")
    p.add_argument("--channels", type=int, default=3, help="channels (default 3)")
    p.add_argument("--active", type=float, default=0.7, help="fraction of active pixels in the mask (default 0.7, the paper's update ratio)")
    p.add_argument("--ops", nargs="+", default=["step_noise", "step_seed", "l1"], choices=["step_noise", "step_seed", "l1"], help="ops to time")
    p.add_argument("--backends", nargs="+", default=["eager", "compile", "triton", "cuda_ext"], choices=["eager", "compile", "triton", "cuda_ext"])
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup in ms (default 25)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms (default 100)")
    p.add_argument("--max-sets", type=int, default=64, help="most input sets rotated in the device timing (default 64)")
    p.add_argument("--out", type=str, default=None, help="also write the markdown report to this file (atomically)")
    args = p.parse_args(argv)
    if not 0.0 <= args.active <= 1.0:
        p.error(f"--active must be in [0, 1], got {args.active}")
    return args


# ------------------------------------------------------------------------------------ inputs
def make_mask(B, H, W, active, device, gen):
    """A spatially coherent bool mask with about ``active`` of the pixels set (a blurred
    random field thresholded at its quantile), like eq. 9's attention-derived masks."""
    import torch
    import torch.nn.functional as F

    field = torch.rand((B, 1, H // 8 + 1, W // 8 + 1), generator=gen, device=device)
    field = F.interpolate(field, size=(H, W), mode="bilinear", align_corners=False)
    if active >= 1.0:
        return torch.ones((B, 1, H, W), dtype=torch.bool, device=device)
    if active <= 0.0:
        return torch.zeros((B, 1, H, W), dtype=torch.bool, device=device)
    thr = torch.quantile(field.flatten(1).float(), 1.0 - active, dim=1).view(B, 1, 1, 1)
    return field > thr


def graph_ms(torch, calls, reps=10):
    """Device time per call: the calls (one per input set) captured in one CUDA graph, the
    graph replayed ``reps`` times, the median replay over len(calls). Host-side overhead
    (Python, dispatch, autograd bookkeeping) is left out, and rotating the input sets keeps
    the data from being served by the L2 cache."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in calls:
            f()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return sorted(times)[len(times) // 2] / len(calls)


def copy_bandwidth(torch, do_bench, nbytes=1 << 30):
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), quantiles=[0.5, 0.2, 0.8])[0]
    return 2 * nbytes / (ms * 1e-3)


# ------------------------------------------------------------------------------------ cases
def step_cases(torch, ops, reference, args, B, C, H, W, dtype, in_kernel_noise, gen):
    """{backend: zero-arg callable} for one yoda_step shape, plus the bytes it must move."""
    from yoda_sparse.schedule import NoiseSchedule

    dev = DEVICE
    shape = (B, C, H, W)
    z = torch.randn(shape, device=dev, dtype=dtype, generator=gen)
    eps = torch.randn(shape, device=dev, dtype=dtype, generator=gen)
    x_bar = torch.randn(shape, device=dev, dtype=dtype, generator=gen)
    noise = None if in_kernel_noise else torch.randn(shape, device=dev, dtype=dtype, generator=gen)
    mask = make_mask(B, H, W, args.active, dev, gen)
    sched = NoiseSchedule.linear(500).respace(200)
    coeffs = ops.step_coefficients(sched, 100)
    seed, offset = (1234, 0) if in_kernel_noise else (None, 0)
    call = (z, eps, x_bar, mask, noise, None, seed, offset, coeffs, True, (-1.0, 1.0))

    def ref_dense(z, eps, x_bar, mask, noise):
        return reference.yoda_step_from_coefficients(z, eps, x_bar, mask, noise, noise, clip_x0=True, clip_range=(-1.0, 1.0), **coeffs)

    fns, skipped = {}, {}
    if "eager" in args.backends:
        if in_kernel_noise:  # the compiled counterpart's function, uncompiled (default generator:
            # unlike the reference backend's private torch.Generator, it can be graph-captured)
            fns["eager"] = lambda: ref_dense(z, eps, x_bar, mask, torch.randn_like(z))
        else:
            ref_fn = ops.select("yoda_step", *call, backend="reference").fn
            fns["eager"] = lambda: ref_fn(*call)
    if "compile" in args.backends:
        if in_kernel_noise:  # inductor's own in-graph RNG: the fair compiled counterpart
            compiled = torch.compile(lambda z, eps, x_bar, mask: ref_dense(z, eps, x_bar, mask, torch.randn_like(z)))
            fns["compile"] = lambda: compiled(z, eps, x_bar, mask)
        else:
            compiled = torch.compile(ref_dense)
            fns["compile"] = lambda: compiled(z, eps, x_bar, mask, noise)
    for name in ("triton", "cuda_ext"):
        if name in args.backends:
            fn, reason = _backend("yoda_step", name, call, ops)
            if fn is None:
                skipped[name] = reason
            else:
                fns[name] = fn
    es = z.element_size()
    n, pixels = z.numel(), B * H * W
    nbytes = es * n * (4 if in_kernel_noise else 5) + pixels  # z, eps, x_bar[, noise] -> out; mask
    return fns, skipped, nbytes


def l1_cases(torch, ops, reference, args, B, C, H, W, dtype, gen):
    dev = DEVICE
    shape = (B, C, H, W)
    pred = torch.randn(shape, device=dev, dtype=dtype, generator=gen).requires_grad_()
    target = torch.randn(shape, device=dev, dtype=dtype, generator=gen)
    mask = make_mask(B, H, W, args.active, dev, gen)
    call = (pred, target, mask, "all")

    def fwd_bwd(loss_fn):
        def run():
            (g,) = torch.autograd.grad(loss_fn(pred, target, mask, "all"), pred)
            return g
        return run

    fns, skipped = {}, {}
    if "eager" in args.backends:
        fns["eager"] = fwd_bwd(ops.select("masked_l1_loss", *call, backend="reference").fn)
    if "compile" in args.backends:
        fns["compile"] = fwd_bwd(torch.compile(reference.masked_l1_loss))
    for name in ("triton", "cuda_ext"):
        if name in args.backends:
            fn, reason = _backend("masked_l1_loss", name, call, ops)
            if fn is None:
                skipped[name] = reason
            else:
                fns[name] = fwd_bwd(fn)
    es = pred.element_size()
    nbytes = es * pred.numel() * 5 + 2 * B * H * W  # fwd: pred, target, mask; bwd: the same + grad_pred
    return fns, skipped, nbytes


def _backend(op, name, call, ops):
    """(callable, None) or (None, why it can't run) for backend ``name`` of ``op``."""
    by_name = {b.name: b for b in ops.backends(op)}
    if name not in by_name:
        return None, "not registered"
    reason = by_name[name].why_not(*call)
    if reason is not None:
        return None, reason
    fn = by_name[name].fn
    if op == "yoda_step":
        return (lambda: fn(*call)), None
    return fn, None


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu_ops: no CUDA device available (torch.cuda.is_available() is False); "
              "this benchmark only runs on a GPU.", file=sys.stderr)
        return 2
    import triton
    from triton.testing import do_bench

    import yoda_sparse.ops as ops
    from yoda_sparse.ops import reference

    for knob in ("recompile_limit", "cache_size_limit"):  # names differ across torch versions
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
    dtype = getattr(torch, args.dtype)
    device_name = torch.cuda.get_device_name()
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    copy_bw = copy_bandwidth(torch, do_bench)

    l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
    lines = [
        f"# yoda-sparse GPU op benchmark — {device_name}",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}; dtype {args.dtype}; "
        f"C = {args.channels}; mask active fraction {args.active:.2f} (spatially coherent); "
        f"device-to-device copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write of a 1 GiB tensor); "
        f"L2 {l2_bytes >> 20} MiB.",
        "",
        "Two times per cell. **call ms**: `do_bench` median (p20–p80) of one call from Python, L2 flushed "
        "before each, so it includes the host's launch overhead whenever that exceeds the device "
        "work (small shapes; the loss's autograd). **device µs**: the calls on K rotating input sets "
        "(K·bytes ≥ 3× L2) captured in one CUDA graph, median replay / K: the GPU time alone. GB/s and "
        "% copy use the device time and the bytes the op must move (byte models in "
        "benchmarks/bench_gpu_ops.py); speedups are eager / this, for each time.",
        "",
    ]
    titles = {
        "step_noise": "yoda_step, explicit noise",
        "step_seed": "yoda_step, in-kernel noise (seed/offset)",
        "l1": "masked L1 loss, forward + backward",
    }
    t_start = time.time()
    for op in args.ops:
        lines += [
            f"## {titles[op]}", "",
            "| shape | backend | call ms (p20–p80) | speedup | device µs | speedup | GB/s | % copy |",
            "|---|---|---|---|---|---|---|---|",
        ]
        notes = {}
        for B in args.batches:
            for S in args.sizes:
                shape = (B, args.channels, S, S)

                def make():
                    if op == "l1":
                        return l1_cases(torch, ops, reference, args, *shape, dtype, gen)
                    return step_cases(torch, ops, reference, args, *shape, dtype, op == "step_seed", gen)

                fns, skipped, nbytes = make()
                n_sets = max(1, min(args.max_sets, math.ceil(3 * l2_bytes / nbytes)))
                sets = [fns] + [make()[0] for _ in range(n_sets - 1)]
                for name, reason in skipped.items():
                    notes.setdefault(name, reason)
                eager = {}
                for name, fn in fns.items():
                    fn()  # compile / build / warm caches outside the timing
                    torch.cuda.synchronize()
                    med, lo, hi = do_bench(fn, warmup=args.warmup, rep=args.rep, quantiles=[0.5, 0.2, 0.8])
                    try:
                        dev = graph_ms(torch, [fs[name] for fs in sets])
                    except Exception as exc:  # report, keep going
                        dev = None
                        notes.setdefault(f"{name} (device time)", f"CUDA-graph capture failed: {type(exc).__name__}: {str(exc)[:200]}")
                        torch.cuda.synchronize()
                    if name == "eager":
                        eager = {"call": med, "dev": dev}
                    sp_call = f"{eager['call'] / med:.2f}x" if eager.get("call") else "–"
                    if dev is None:
                        dev_cells = "– | – | – | –"
                    else:
                        gbs = nbytes / (dev * 1e-3) / 1e9
                        sp_dev = f"{eager['dev'] / dev:.2f}x" if eager.get("dev") else "–"
                        dev_cells = f"{dev * 1e3:.1f} | {sp_dev} | {gbs:.0f} | {100 * gbs * 1e9 / copy_bw:.0f}%"
                    lines.append(f"| {B}x{args.channels}x{S}x{S} | {name} | {med:.4f} ({lo:.4f}–{hi:.4f}) | {sp_call} | {dev_cells} |")
                    print(lines[-1], flush=True)
                del fns, sets
                torch.cuda.empty_cache()
        for name, reason in notes.items():
            lines.append(f"\n{name} not measured: {reason}")
        lines.append("")
    lines.append(f"Total benchmark wall time {time.time() - t_start:.0f} s.")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        _write_atomically(args.out, report)
    return 0


def _write_atomically(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".bench_gpu_ops.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


if __name__ == "__main__":
    sys.exit(main())
