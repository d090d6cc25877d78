"""`yoda-sparse upscale IN... --out DIR --checkpoint CKPT`: super-resolve image files.

Any image size works: the LR image is padded (reflect) so that its HR size is a multiple of
the UNet's, sampled, and the result cropped back to scale x the input size.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

MIN_LR_SIDE = 8  # below this the bicubic conditioning carries almost no information


def add_upscale_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="LR image files")
    p.add_argument("--out", required=True, help="output folder (must exist unless --make-dirs)")
    p.add_argument("--checkpoint", required=True, help="checkpoint written by `yoda-sparse train`")
    p.add_argument("--attention", default=None, help="attention method (default: the checkpoint's)")
    p.add_argument("--attention-weights", default=None, help="local weights file for a DINO attention method")
    p.add_argument("--lower-bound", type=float, default=None, help="eq. 9's l (default: the checkpoint's)")
    p.add_argument("--steps", type=int, default=None, help="respace sampling to this many steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dense", action="store_true", help="plain dense sampling (no YODA masking)")
    p.add_argument("--scale", type=int, default=None, help="expected scale; must match the checkpoint")
    p.add_argument("--save-attention", action="store_true", help="also write NAME_attention.png")
    p.add_argument("--save-masks", action="store_true", help="also write NAME_masks.png (mask over time)")
    p.add_argument("--make-dirs", action="store_true", help="create --out if missing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")


def _lr_multiple(size_multiple: int, scale: int) -> int:
    # the HR size (LR * scale) must be a multiple of the UNet's size multiple
    return size_multiple // math.gcd(size_multiple, scale)


def upscale_from_args(args) -> int:
    from dataclasses import replace

    from tqdm.auto import tqdm

    from .attention import get_attention
    from .diffusion import load_diffusion
    from .imageio import ImageError, bicubic_upscale, load_image, pad_to_multiple, save_image

    out = Path(args.out)
    if not out.is_dir():
        if args.make_dirs:
            out.mkdir(parents=True, exist_ok=True)
        else:
            raise ImageError(f"output folder {out} does not exist (create it or pass --make-dirs)")
    diff, config, extra = load_diffusion(args.checkpoint, map_location=args.device)
    if args.scale is not None and args.scale != diff.scale:
        raise ValueError(f"--scale {args.scale} does not match the checkpoint's scale {diff.scale}")
    if args.lower_bound is not None:
        diff.yoda = replace(diff.yoda, lower_bound=args.lower_bound)
    method = args.attention or diff.yoda.attention
    extractor = None
    if not args.dense and not method:
        print("the checkpoint was trained dense and --attention names no map: sampling dense", file=sys.stderr)
    elif not args.dense:
        kwargs = {"weights": args.attention_weights} if args.attention_weights else {}
        extractor = get_attention(method, **kwargs).to(args.device)
    multiple = _lr_multiple(int(getattr(diff.model, "size_multiple", 1)), diff.scale)
    paths = [Path(p) for p in args.inputs]
    for path in tqdm(paths, disable=args.no_progress or len(paths) == 1, desc="images"):
        lr, notes = load_image(path)
        for note in notes:
            print(f"{path}: {note}", file=sys.stderr)
        h, w = lr.shape[-2:]
        if min(h, w) < MIN_LR_SIDE:
            raise ImageError(f"{path}: image is {w}x{h}, smaller than the minimum {MIN_LR_SIDE}x{MIN_LR_SIDE}")
        lr_p, (h0, w0) = pad_to_multiple(lr[None].to(args.device), multiple)
        attn = None
        if extractor is not None:
            attn = extractor(bicubic_upscale(lr_p, diff.scale))
        g = torch.Generator().manual_seed(args.seed)
        res = diff.sample(lr_p, attn, steps=args.steps, generator=g, progress=not args.no_progress)
        sr = res.images[..., : h0 * diff.scale, : w0 * diff.scale]
        stem = path.stem
        save_image(sr[0].cpu(), out / f"{stem}_x{diff.scale}.png")
        msg = f"{path} -> {out / f'{stem}_x{diff.scale}.png'}"
        if attn is not None:
            msg += f"  (update ratio {100 * float(res.update_ratio[0]):.1f}%)"
            if args.save_attention:
                save_image(attn[0, :, : h0 * diff.scale, : w0 * diff.scale].expand(3, -1, -1).cpu(), out / f"{stem}_attention.png")
            if args.save_masks:
                from .masking import MaskSchedule
                from .plots import save_mask_strip

                ms = MaskSchedule(attn, len(diff.schedule), diff.yoda.lower_bound, timesteps=res.timesteps, size=attn.shape[-2:])
                save_mask_strip(ms.masks()[:, 0, :, : h0 * diff.scale, : w0 * diff.scale].cpu(), out / f"{stem}_masks.png")
        print(msg)
    return 0
