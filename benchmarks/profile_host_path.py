"""Host time per call of the public ops through one backend, against the eager reference, and
where it goes (cProfile). Small images (1x3x128x128), so the device work is a few µs and the
time per call is the host's: Python, the dispatcher, torch.library's custom-op layers, launches.

For Triton it also times the triton_op path, the one torch.compile takes, which eager calls
skip (see yoda_sparse/ops/triton_backend.py).

Usage:  python benchmarks/profile_host_path.py [--backend triton] [--device cuda] [--calls 100]
(on a CPU with TRITON_INTERPRET=1 the Triton kernels are interpreted, so only the profile's
shape means anything there, not its times).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from yoda_sparse import NoiseSchedule, ops


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="triton", help="backend to profile (default triton)")
    p.add_argument("--device", default="cuda", help="device of the tensors (default cuda)")
    p.add_argument("--calls", type=int, default=100, help="calls per timing (default 100)")
    p.add_argument("--top", type=int, default=35, help="profile rows printed (default 35)")
    args = p.parse_args(argv)
    dev = args.device
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    pred = torch.randn(1, 3, 128, 128, device=dev, requires_grad=True)
    target = torch.randn(1, 3, 128, 128, device=dev)
    mask = torch.rand(1, 1, 128, 128, device=dev) > 0.3
    sched = NoiseSchedule.linear(100)

    def loss_fwd_bwd(backend):
        (g,) = torch.autograd.grad(ops.masked_l1_loss(pred, target, mask, "all", backend=backend), pred)
        return g

    def loss_fwd(backend):
        with torch.no_grad():
            return ops.masked_l1_loss(pred, target, mask, "all", backend=backend)

    def step(backend):
        with torch.no_grad():
            return ops.yoda_step(target, target, target, mask, 40, sched, seed=1, offset=0, backend=backend)

    def per_call(fn, backend):
        for _ in range(5):
            fn(backend)
        sync()
        t = time.perf_counter()
        for _ in range(args.calls):
            fn(backend)
        sync()
        return (time.perf_counter() - t) / args.calls * 1e6

    cases = [("loss fwd+bwd", loss_fwd_bwd), ("loss fwd (no grad)", loss_fwd), ("step, in-kernel noise", step)]
    for name, fn in cases:
        for backend in (args.backend, "reference"):
            print(f"{name:22s} {backend:16s} {per_call(fn, backend):8.1f} µs/call", flush=True)
        if args.backend == "triton":  # the same kernels through the triton_ops, as under torch.compile
            from yoda_sparse.ops import triton_backend

            fast_path = triton_backend._runs_eagerly
            triton_backend._runs_eagerly = lambda *tensors: False
            try:
                print(f"{name:22s} {'triton (op path)':16s} {per_call(fn, 'triton'):8.1f} µs/call", flush=True)
            finally:
                triton_backend._runs_eagerly = fast_path

    for name, fn in cases[::2]:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            fn(args.backend)
        sync()
        prof.disable()
        for order in ("tottime", "cumulative"):
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats(order).print_stats(args.top)
            print(f"{'=' * 30} {name}, {args.backend}, by {order}\n{out.getvalue()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
