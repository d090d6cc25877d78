"""`yoda-sparse convert sr3|srdiff FILE`: a public SR3 / SRDiff checkpoint -> yoda-sparse safetensors."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="source", required=True)

    def common(q):
        q.add_argument("file", help="the public checkpoint (.pth / .ckpt, read with torch.load(weights_only=True))")
        q.add_argument("--out", help="output .safetensors (default: FILE's name with .safetensors, beside it)")
        q.add_argument("--force", action="store_true", help="replace --out if it exists")
        q.add_argument("--attention", default=None,
                       help="attention method to store as the default for YODA sampling (default: none, i.e. "
                            "sample dense unless one is named at sampling time)")
        q.add_argument("--lower-bound", type=float, default=0.2, help="eq. 9's l to store (default 0.2)")

    s = sub.add_parser("sr3", help="Janspiry/Image-Super-Resolution-via-Iterative-Refinement *_gen.pth")
    common(s)
    s.add_argument("--config", help="the public JSON config the model was trained with (layout, scale, schedule)")
    s.add_argument("--scale", type=int, help="SR factor (needed without --config: the weights do not hold it)")
    s.add_argument("--image-size", type=int, help="training HR size (places attn_res; default from --config)")
    s.add_argument("--norm-groups", type=int, help="GroupNorm groups (default from --config, else 32)")
    s.add_argument("--upsample", default="pil_bicubic", help="how x_up is made (default pil_bicubic, as the SR3 code)")

    d = sub.add_parser("srdiff", help="LeiaLi/SRDiff model_ckpt_steps_N.ckpt")
    common(d)
    d.add_argument("--res-rescale", type=float, default=2.0, help="SRDiff's res_rescale hparam (default 2.0, as published)")
    d.add_argument("--timesteps", type=int, help="diffusion steps, when the file has no schedule buffers (default 100)")
    d.add_argument("--upsample", default="matlab_bicubic", help="how x_up is made (default matlab_bicubic, as SRDiff's code)")
    d.add_argument("--input-scale", type=float, default=None,
                   help="LR scale before upsampling (default 255/256, as SRDiff's data code)")


def convert_from_args(args) -> int:
    from ..attention import list_attention
    from . import convert_sr3, convert_srdiff
    from .srdiff import SRDIFF_INPUT_SCALE

    src = Path(args.file)
    out = Path(args.out) if args.out else src.with_suffix(".safetensors")
    if out.resolve() == src.resolve():
        raise ValueError(f"--out: {out} is the input file")
    if out.exists() and not args.force:
        raise FileExistsError(f"--out: {out} exists (pass --force to replace it)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out: folder {out.parent} does not exist")
    if args.attention is not None and args.attention not in list_attention():
        raise ValueError(f"--attention: unknown method {args.attention!r}; known: {', '.join(list_attention())}")
    if args.source == "sr3":
        summary = convert_sr3(src, out, config=args.config, scale=args.scale, image_size=args.image_size,
                              norm_groups=args.norm_groups, attention=args.attention, lower_bound=args.lower_bound,
                              upsample=args.upsample)
    else:
        summary = convert_srdiff(src, out, res_rescale=args.res_rescale, timesteps=args.timesteps,
                                 attention=args.attention, lower_bound=args.lower_bound, upsample=args.upsample,
                                 input_scale=SRDIFF_INPUT_SCALE if args.input_scale is None else args.input_scale)
    cfg, sched = summary["config"], summary["schedule"]
    layout = ", ".join(f"{k}={v}" for k, v in cfg.items() if k not in ("name", "family"))
    print(f"{src} -> {out}")
    print(f"  {cfg['family']}: {layout}")
    print(f"  schedule: {sched['kind']}, {sched['timesteps']} steps")
    for note in summary["notes"]:
        print(f"  note: {note}")
    return 0
