"""`yoda-sparse upscale IN... --out DIR --checkpoint CKPT`: super-resolve image files.

Any image size works: the LR image is padded (reflect) so that its HR size is a multiple of
the UNet's, sampled (in overlapping tiles when the output is larger than ``--tile``, see
:mod:`yoda_sparse.tiling`), and the result cropped back to scale x the input size.

Everything that can be checked is checked before the first image is sampled: the options, the
output folder (it must be writable), every input (it must decode and be large enough), the
output names (distinct; an existing file is an error unless ``--overwrite``) and the peak
memory of each run (refused, naming ``--tile``, when it would not fit).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from .argtypes import check_device, check_output_folder, non_negative_int, open_unit_float, positive_int
from .bench import add_engine_arguments, engine_options_from_args
from .tiling import DEFAULT_OVERLAP, DEFAULT_TILE, default_overlap

MIN_LR_SIDE = 8  # below this the bicubic conditioning carries almost no information


def add_upscale_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="LR image files")
    p.add_argument("--out", required=True, help="output folder (must exist unless --make-dirs)")
    p.add_argument("--checkpoint", required=True, help="checkpoint written by `yoda-sparse train`")
    p.add_argument("--attention", default=None, help="attention method (default: the checkpoint's)")
    p.add_argument("--attention-weights", default=None, help="local weights file for a DINO attention method")
    p.add_argument("--lower-bound", type=open_unit_float, default=None, help="eq. 9's l (default: the checkpoint's)")
    p.add_argument("--steps", type=positive_int, default=None, help="respace sampling to this many steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dense", action="store_true", help="plain dense sampling (no YODA masking)")
    p.add_argument("--scale", type=positive_int, default=None, help="expected scale; must match the checkpoint")
    p.add_argument("--tile", type=non_negative_int, default=DEFAULT_TILE,
                   help=f"sample outputs larger than TILE x TILE pixels in overlapping tiles of that size "
                        f"(default {DEFAULT_TILE}; 0: never tile)")
    p.add_argument("--tile-overlap", type=non_negative_int, default=None,
                   help=f"output pixels that neighbouring tiles share and blend (default {DEFAULT_OVERLAP}, or a "
                        f"quarter of a tile under {4 * DEFAULT_OVERLAP})")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (default: an error)")
    p.add_argument("--save-attention", action="store_true", help="also write NAME_attention.png")
    p.add_argument("--save-masks", action="store_true", help="also write NAME_masks.png (mask over time)")
    p.add_argument("--make-dirs", action="store_true", help="create --out if missing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    add_engine_arguments(p)


def _lr_multiple(size_multiple: int, scale: int) -> int:
    # the HR size (LR * scale) must be a multiple of the UNet's size multiple
    return size_multiple // math.gcd(size_multiple, scale)


def output_stems(paths) -> list[str]:
    """One distinct output stem per input path: the file's stem, or, where several inputs
    share it, the stem prefixed by as many parent folders as tell them apart (``a/pic.png``,
    ``b/pic.png`` -> ``a_pic``, ``b_pic``), and suffixed by the extension where only that
    differs (``pic.png``, ``pic.jpg`` -> ``pic_png``, ``pic_jpg``).  The same file given
    twice, or names that still clash, are a ValueError naming them."""
    paths = [Path(p) for p in paths]
    resolved = [p.resolve() for p in paths]
    seen = {}
    for p, r in zip(paths, resolved):
        if r in seen:
            raise ValueError(f"inputs: {seen[r]} and {p} are the same file")
        seen[r] = p
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        groups.setdefault(p.stem, []).append(i)
    stems = [p.stem for p in paths]
    for idx in groups.values():
        if len(idx) == 1:
            continue
        parents = [resolved[i].parent.parts[1:] for i in idx]  # without the root
        folders = len(set(parents))
        tails = [""] * len(idx)
        if folders > 1:  # the fewest trailing folder names that tell the folders apart
            for depth in range(1, max(len(x) for x in parents) + 1):
                tails = ["_".join(x[-depth:]) for x in parents]
                if len(set(tails)) == folders:
                    break
        for i, tail in zip(idx, tails):
            stems[i] = f"{tail}_{paths[i].stem}" if tail else paths[i].stem
        same = [i for i in idx if sum(stems[j] == stems[i] for j in idx) > 1]
        for i in same:  # inputs of one folder that differ only in their extension
            stems[i] = f"{stems[i]}_{paths[i].suffix.lstrip('.').lower()}"
    clash: dict[str, list[Path]] = {}
    for p, s in zip(paths, stems):
        clash.setdefault(s, []).append(p)
    bad = {s: ps for s, ps in clash.items() if len(ps) > 1}
    if bad:
        s, ps = next(iter(bad.items()))
        raise ValueError(f"inputs: {', '.join(map(str, ps))} would all be written as {s}_*.png; rename one of them")
    return stems


def build_extractor(method: str, weights, device, *, names=("--attention", "--attention-weights")):
    """The attention extractor of ``method`` (with a local ``weights`` file, or None); errors
    name the options ``names`` (method, weights) and the file."""
    from .attention import get_attention, list_attention

    method_name, weights_name = names
    if method not in list_attention():
        raise ValueError(f"{method_name} must be one of {', '.join(list_attention())}, got {method!r}")
    if weights is None:
        return get_attention(method).to(device)
    try:
        return get_attention(method, weights=weights).to(device)
    except TypeError as e:
        if "weights" in str(e):
            raise ValueError(f"{weights_name}: attention method {method!r} takes no weights file") from None
        raise
    except Exception as e:  # a corrupt or mismatched file: name the option and the file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{weights_name} {weights}: cannot load it for {method!r}: {first}") from None


def check_steps(diff, steps, option: str = "--steps") -> None:
    T = len(diff.schedule)
    if steps is not None and steps > T:
        raise ValueError(f"{option} must be at most the checkpoint's {T} training steps, got {steps}")


def upscale_from_args(args) -> int:
    from dataclasses import replace

    from tqdm.auto import tqdm

    from .diffusion import load_diffusion
    from .imageio import ImageError, bicubic_upscale, load_image, pad_to_multiple, save_image
    from .memory import check_memory, estimate_sample_memory
    from .tiling import check_tiling, sample_tiled

    out = check_output_folder(args.out, make=args.make_dirs, make_hint="create it or pass --make-dirs")
    device = check_device(args.device)
    diff, config, extra = load_diffusion(args.checkpoint, map_location=device)
    if args.scale is not None and args.scale != diff.scale:
        raise ValueError(f"--scale {args.scale} does not match the checkpoint's scale {diff.scale}")
    check_steps(diff, args.steps)
    if args.lower_bound is not None:
        diff.yoda = replace(diff.yoda, lower_bound=args.lower_bound)
    overlap = 0
    if args.tile:
        overlap = args.tile_overlap if args.tile_overlap is not None else default_overlap(args.tile, diff.scale)
        check_tiling(diff, args.tile, overlap, names=("--tile", "--tile-overlap"))
    elif args.tile_overlap is not None:
        raise ValueError("--tile-overlap: --tile 0 samples without tiles")
    method = args.attention or diff.yoda.attention
    extractor = None
    if not args.dense and not method:
        print("the checkpoint was trained dense and --attention names no map: sampling dense", file=sys.stderr)
    elif not args.dense:
        extractor = build_extractor(method, args.attention_weights, device)
    elif args.attention_weights:
        raise ValueError("--attention-weights: --dense sampling uses no attention map")
    multiple = _lr_multiple(int(getattr(diff.model, "size_multiple", 1)), diff.scale)

    # every output, checked before anything is sampled
    paths = [Path(p) for p in args.inputs]
    stems = output_stems(paths)
    s = diff.scale
    targets = []
    for stem in stems:
        files = {"sr": out / f"{stem}_x{s}.png"}
        if extractor is not None and args.save_attention:
            files["attention"] = out / f"{stem}_attention.png"
        if extractor is not None and args.save_masks:
            files["masks"] = out / f"{stem}_masks.png"
        targets.append(files)
    if not args.overwrite:
        existing = [f for files in targets for f in files.values() if f.exists()]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise ValueError(f"--out: {existing[0]} exists{more}; pass --overwrite to replace")
    # every input decodes, is large enough, and its run fits in memory
    for path in paths:
        lr, _ = load_image(path)
        h, w = lr.shape[-2:]
        if min(h, w) < MIN_LR_SIDE:
            raise ImageError(f"{path}: image is {w}x{h}, smaller than the minimum {MIN_LR_SIDE}x{MIN_LR_SIDE}")
        hp, wp = -(-h // multiple) * multiple, -(-w // multiple) * multiple
        est = estimate_sample_memory(diff, (hp, wp), device=device, attention=method if extractor else None,
                                     tile=args.tile or None, overlap=overlap, save=True,
                                     save_masks=args.save_masks)
        check_memory(est, device, what=f"upscaling {path} ({w}x{h} -> {w * s}x{h * s})",
                     hint=_memory_hint(diff, (hp, wp), args, device, method if extractor else None))
        del lr

    for path, files in tqdm(list(zip(paths, targets)), disable=args.no_progress or len(paths) == 1, desc="images"):
        lr, notes = load_image(path)
        for note in notes:
            print(f"{path}: {note}", file=sys.stderr)
        lr_p, (h0, w0) = pad_to_multiple(lr[None].to(device), multiple)
        del lr
        attn = None
        if extractor is not None:
            attn = extractor(bicubic_upscale(lr_p, s))
        g = torch.Generator().manual_seed(args.seed)
        engine = dict(engine=args.engine, engine_options=engine_options_from_args(args) or None)
        if args.tile:
            res = sample_tiled(diff, lr_p, attn, tile=args.tile, overlap=overlap, steps=args.steps,
                               generator=g, progress=not args.no_progress, **engine)
        else:
            res = diff.sample(lr_p, attn, steps=args.steps, generator=g, progress=not args.no_progress, **engine)
        sr = res.images[..., : h0 * s, : w0 * s]
        save_image(sr[0].cpu(), files["sr"], overwrite=args.overwrite)
        del sr
        msg = f"{path} -> {files['sr']}"
        if res.extras.get("tiles", 1) > 1:
            msg += f"  ({res.extras['tiles']} tiles)"
        if attn is not None:
            msg += f"  (update ratio {100 * float(res.update_ratio[0]):.1f}%)"
            if args.save_attention:
                save_image(attn[0, :, : h0 * s, : w0 * s].expand(3, -1, -1).cpu(), files["attention"],
                           overwrite=args.overwrite)
            if args.save_masks:
                _save_masks(diff, attn, res.timesteps, (h0 * s, w0 * s), files["masks"])
        del res
        print(msg)
    return 0


def _save_masks(diff, attn, timesteps, size, path) -> None:
    """The mask strip of 8 evenly spaced steps, built for those steps only (all S masks of a
    large image would not fit in memory)."""
    import numpy as np

    from .masking import MaskSchedule
    from .plots import save_mask_strip

    S = timesteps.numel()
    idx = sorted(set(np.linspace(0, S - 1, min(8, S)).round().astype(int).tolist()))
    H, W = attn.shape[-2:]
    ms = MaskSchedule(attn, len(diff.schedule), diff.yoda.lower_bound, timesteps=timesteps[idx],
                      size=(H, W))
    save_mask_strip(ms.masks()[:, 0, :, : size[0], : size[1]].cpu(), path)


def _memory_hint(diff, lr_size, args, device, method) -> str:
    """The option that makes the run fit: the largest smaller ``--tile`` whose estimate fits,
    or a note that the whole-image buffers alone do not fit."""
    from .memory import available_memory, estimate_sample_memory
    from .tiling import tile_multiple

    avail = available_memory(device)
    m = tile_multiple(diff)
    start = args.tile or max(lr_size) * diff.scale
    tile = (start // 2) // m * m
    while tile >= m:
        if args.tile_overlap is None:
            overlap = default_overlap(tile, diff.scale)
        else:
            overlap = min(args.tile_overlap, tile // 2) // diff.scale * diff.scale
        est = estimate_sample_memory(diff, lr_size, device=device, attention=method, tile=tile, overlap=overlap,
                                     save=True, save_masks=args.save_masks)
        if avail is None or est.total <= avail:
            extra = f" --tile-overlap {overlap}" if args.tile_overlap not in (None, overlap) else ""
            return f"pass --tile {tile}{extra} to sample in smaller tiles"
        tile = (tile // 2) // m * m
    return ("the image's own buffers (attention map, output) do not fit even with the smallest tiles: "
            "use a smaller image" + (" or drop --save-masks" if args.save_masks else ""))
