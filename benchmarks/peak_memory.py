"""Peak resident memory of `yoda-sparse upscale` on large and odd-shaped images, with the
estimate that `upscale` checks before it starts (yoda_sparse.memory).

Each case runs in a fresh Python process: it imports everything, records its peak RSS
(``getrusage``: the baseline of an idle process with torch loaded), runs the command line on a
random image of the given size, and reports the peak RSS again; "run" is the difference.

Usage:  python benchmarks/peak_memory.py [--case WxH[:ATTENTION[:TILE[:OVERLAP]]]]... [--steps 1]
        [--checkpoint FILE] [--threads N] [--json FILE]
Default cases: 3000x20 (the checkpoint's attention method, default tiles) and 2048x2048
(gaussian attention: the edge method's hole closing, whose radius grows with the image, takes
hours on an 8192x8192 output).  ATTENTION "dense" samples without a map, empty the checkpoint's;
TILE 0 disables tiling; TILE and OVERLAP are output pixels (defaults: upscale's).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = ROOT / "yoda_sparse" / "checkpoints" / "sr3_yoda_demo.safetensors"


def _child(argv) -> int:
    """In the fresh process: estimate, baseline, run, peak; one JSON line on stdout."""
    import resource
    import time

    import torch

    threads, argv = int(argv[0]), argv[1:]
    torch.set_num_threads(threads)
    import skimage.feature  # noqa: F401  (imported by the edge method: part of the baseline)

    from yoda_sparse.cli import build_parser, main
    from yoda_sparse.diffusion import load_diffusion
    from yoda_sparse.imageio import load_image
    from yoda_sparse.memory import estimate_sample_memory
    from yoda_sparse.tiling import default_overlap

    args = build_parser().parse_args(argv)
    diff, _, _ = load_diffusion(args.checkpoint)
    lr, _ = load_image(args.inputs[0])
    method = None if args.dense else (args.attention or diff.yoda.attention)
    overlap = args.tile_overlap if args.tile_overlap is not None else default_overlap(args.tile, diff.scale)
    est = estimate_sample_memory(diff, tuple(lr.shape[-2:]), attention=method, tile=args.tile or None,
                                 overlap=overlap if args.tile else 0, save=True)
    scale = diff.scale
    del diff, lr
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    rc = main(argv)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(rc=rc, baseline=base, peak=peak, run=peak - base, estimate=est.total, seconds=seconds,
                          scale=scale)))
    return 0


def run_case(case: str, *, steps: int, checkpoint: Path, threads: int, workdir: Path) -> dict:
    import torch

    from yoda_sparse.imageio import save_image

    size, _, rest = case.partition(":")
    attention, _, rest = rest.partition(":")
    tile, _, overlap = rest.partition(":")
    w, h = (int(v) for v in size.lower().split("x"))
    img = workdir / f"in_{w}x{h}.png"
    if not img.exists():
        g = torch.Generator().manual_seed(0)
        save_image(torch.rand(3, h, w, generator=g), img)
    out = workdir / f"out_{case.replace(':', '_')}"
    out.mkdir(exist_ok=True)
    argv = ["upscale", str(img), "--out", str(out), "--checkpoint", str(checkpoint), "--steps", str(steps),
            "--no-progress", "--overwrite"]
    if attention == "dense":
        argv.append("--dense")
    elif attention:
        argv += ["--attention", attention]
    if tile:
        argv += ["--tile", tile]
    if overlap:
        argv += ["--tile-overlap", overlap]
    proc = subprocess.run([sys.executable, __file__, "--child", str(threads), *argv], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"case {case} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    res = json.loads(lines[-1])
    res.update(case=case, width=w, height=h, output=f"{res['scale'] * w}x{res['scale'] * h}", attention=attention or "checkpoint's",
               tile=(tile or "default") + (f" / {overlap}" if overlap else ""), steps=steps, log=proc.stdout.strip().splitlines()[0])
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", action="append", help="WxH[:ATTENTION[:TILE[:OVERLAP]]] of the LR input (repeatable)")
    p.add_argument("--steps", type=int, default=1, help="sampling steps (memory does not depend on them; default 1)")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--threads", type=int, default=2, help="torch threads in each run (default 2)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    cases = args.case or ["3000x20", "2048x2048:gaussian"]
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"CPU: {cpu}, {os.cpu_count()} cores; {args.threads} torch threads; {args.steps} step(s)")
    print("| input (LR) | output | attention | tile | baseline RSS | peak RSS | run (peak - baseline) | estimate | time |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            r = run_case(case, steps=args.steps, checkpoint=args.checkpoint, threads=args.threads, workdir=Path(tmp))
            results.append(r)
            mb = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
            print(f"| {r['width']}x{r['height']} | {r['output']} | {r['attention']} | {r['tile']} | {mb(r['baseline'])} | "
                  f"{mb(r['peak'])} | {mb(r['run'])} | {mb(r['estimate'])} | {r['seconds']:.0f} s |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(cpu=cpu, results=results), indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(_child(sys.argv[2:]))
    sys.exit(main())
