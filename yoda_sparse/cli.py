"""`yoda-sparse` command line: demo, masks, train, eval, upscale, bench, info, convert.

Errors print as one line on stderr with a non-zero exit; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_demo(args) -> int:
    from .demo import mask_demo, sr_demo

    out = Path(args.out)
    dino = {}
    if args.dino_weights:
        dino["dino_resnet50_max" if args.dino_arch == "resnet50" else "dino_vits8_max"] = args.dino_weights
    mask_demo(out, image=args.image, lower_bound=args.lower_bound, dino_weights=dino)
    ckpt = Path(args.checkpoint) if args.checkpoint else _default_demo_checkpoint()
    if ckpt is None:
        print("[sr] no demo checkpoint found; skipping the super-resolution part", file=sys.stderr)
        return 0
    sr_demo(out, ckpt, image=args.sr_image, steps=args.steps, size=args.size, seed=args.seed)
    if args.timing_size > 0:
        from .demo import timing_demo

        timing_demo(image=args.sr_image, size=args.timing_size, steps=args.timing_steps, seed=args.seed)
    return 0


def _default_demo_checkpoint() -> Path | None:
    folder = Path(__file__).parent / "checkpoints"
    preferred = folder / "demo-best.txt"  # names the better of the two demo checkpoints
    if preferred.exists():
        path = folder / preferred.read_text().strip()
        if path.exists():
            return path
    found = sorted(folder.glob("*.safetensors")) if folder.exists() else []
    return found[0] if found else None


def _cmd_masks(args) -> int:
    from .demo import mask_demo

    dino = {}
    if args.dino_weights:
        dino["dino_resnet50_max" if args.dino_arch == "resnet50" else "dino_vits8_max"] = args.dino_weights
    mask_demo(Path(args.out), image=args.image, lower_bound=args.lower_bound, dino_weights=dino)
    return 0


def _cmd_info(args) -> int:
    import torch

    from . import __version__, ops

    print(f"yoda-sparse {__version__}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    for op, rows in ops.describe().items():
        print(f"{op}:")
        for name, state in rows:
            print(f"  {name:>10s}: {state}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, naming the flag (``error: yoda-sparse upscale: argument
    --steps: must be a positive integer, got '0'``), exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .argtypes import open_unit_float, positive_int

    p = _Parser(prog="yoda-sparse", description="Area-masked diffusion super-resolution (YODA).")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    def mask_args(q):
        q.add_argument("--out", default="out/demo", help="output folder (created)")
        q.add_argument("--image", default="astronaut", help="bundled image for the mask demo")
        q.add_argument("--lower-bound", type=open_unit_float, default=0.2)
        q.add_argument("--dino-weights", help="local DINO weights file: adds the DINO MAX map to the demo")
        q.add_argument("--dino-arch", choices=["resnet50", "vits8"], default="resnet50")

    d = sub.add_parser("demo", help="the README's main job: masks, then dense vs YODA super-resolution")
    mask_args(d)
    d.add_argument("--checkpoint", help="demo checkpoint (default: the better bundled one)")
    d.add_argument("--sr-image", default="coffee", help="held-out bundled image for the SR part")
    d.add_argument("--steps", type=positive_int, default=100, help="respace sampling to this many steps (default 100)")
    d.add_argument("--size", type=positive_int, default=128, help="HR size of the SR demo's centre crop")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--timing-size", type=int, default=256,
                   help="image side for timing the published SR3 architecture dense vs sparse (0: skip)")
    d.add_argument("--timing-steps", type=int, default=20, help="sampling steps of that timing")
    d.set_defaults(func=_cmd_demo)

    m = sub.add_parser("masks", help="attention maps, mask schedule and update ratios on a bundled image")
    mask_args(m)
    m.set_defaults(func=_cmd_masks)

    i = sub.add_parser("info", help="versions and which op backends are available")
    i.set_defaults(func=_cmd_info)

    for name, module, help_ in (
        ("train", "train", "train SR3/SRDiff (+YODA) on image folders"),
        ("eval", "evaluate", "PSNR/SSIM/LPIPS, update ratio and refined-area curves of a checkpoint"),
        ("upscale", "upscale", "super-resolve image files with a checkpoint"),
        ("bench", "bench", "dense vs sparse YODA sampling time on this device"),
    ):
        q = sub.add_parser(name, help=help_)
        mod = __import__(f"yoda_sparse.{module}", fromlist=["add_arguments"])
        getattr(mod, f"add_{name}_arguments")(q)
        q.set_defaults(func=getattr(mod, f"{name}_from_args"))

    from .integrations.convert_cli import add_convert_arguments, convert_from_args

    c = sub.add_parser("convert", help="convert a public SR3 or SRDiff checkpoint into a yoda-sparse checkpoint")
    add_convert_arguments(c)
    c.set_defaults(func=convert_from_args)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None:
        # the `yoda-sparse` command owns its process: keep freed memory for reuse, so the
        # UNet's activations do not page-fault every step (0.3-0.6 s of system time per dense
        # SR3 step on the CPU; yoda_sparse.allocator). Calls from Python leave malloc alone.
        from .allocator import keep_freed_memory

        keep_freed_memory()
    try:
        rc = args.func(args)
        return int(rc or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for users, the traceback with --debug
        if args.debug:
            raise
        msg = str(exc).strip().splitlines()
        print(f"error: {msg[0] if msg else type(exc).__name__}" + (" (more with --debug)" if len(msg) > 1 else ""), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
