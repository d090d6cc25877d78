"""`yoda-sparse eval`: PSNR/SSIM/LPIPS of a checkpoint on HR images, the pixel-update ratio
and the refined-area-over-time curve (the paper's Figs. 4-5), as JSON, CSV and PNG plots.

Metric conventions are those of :mod:`yoda_sparse.metrics` (Y channel, ``scale``-pixel border
crop, as in the SR literature).  LPIPS needs its AlexNet backbone: pass ``--lpips-backbone``
or have torchvision's weights in the torch hub cache; otherwise the report says
"LPIPS unavailable: <reason>" and the other metrics are still computed.

Checks come first: the options, the output folder (created, and it must be writable; existing
results are an error unless ``--overwrite``) and every image (it must decode and hold the
``--crop``) are checked before anything is sampled.  Bad images are skipped: each is logged,
listed under ``skipped`` in results.json with the reason, and the others are evaluated; the exit
status is then 1 unless ``--skip-bad``.  If sampling fails midway, the finished images' results
are written (``"complete": false``) before the error is reported.  results.json records the
crop used.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import torch

from .argtypes import open_unit_float, positive_int
from .atomic import atomic_write
from .bench import add_engine_arguments, engine_options_from_args

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="+", help="HR image files or folders (LR made by bicubic downscaling)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--attention", default=None, help="attention method for YODA sampling (default: the checkpoint's)")
    p.add_argument("--attention-weights", default=None)
    p.add_argument("--ratio-methods", default="gaussian,edge,sift",
                   help="comma-separated extra methods whose update ratio / refined area are plotted (no sampling)")
    p.add_argument("--lower-bound", type=open_unit_float, default=None)
    p.add_argument("--steps", type=positive_int, default=None)
    p.add_argument("--dense", action="store_true", help="also evaluate dense sampling")
    p.add_argument("--crop", type=positive_int, default=None,
                   help="centre-crop HR images to CROP x CROP, a multiple of the scale and the UNet's size multiple "
                        "(default: the model's image size); smaller images are skipped")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first LIMIT images found")
    p.add_argument("--skip-bad", action="store_true",
                   help="exit 0 although unreadable or too small images were skipped (they are listed in results.json "
                        "either way)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out (default: an error)")
    p.add_argument("--lpips-backbone", default=None, help="torchvision AlexNet state_dict file for LPIPS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_engine_arguments(p)


def collect_images(items) -> list[Path]:
    paths = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            paths.append(p)
        else:
            raise FileNotFoundError(f"data path {p} does not exist")
    if not paths:
        raise ValueError(f"no images found in {list(items)}")
    return paths


def _centre_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    _, h, w = img.shape
    top, left = (h - size) // 2, (w - size) // 2
    return img[:, top:top + size, left:left + size]


OUTPUT_FILES = ("results.json", "results.csv", "update_ratio.png", "refined_area.png")
_API_NAMES = {"crop": "crop", "limit": "limit", "steps": "steps", "out": "out_dir", "attention": "attention",
              "attention_weights": "attention_weights", "overwrite": "overwrite=True", "device": "device",
              "ratio_methods": "ratio_methods"}
CLI_NAMES = {"crop": "--crop", "limit": "--limit", "steps": "--steps", "out": "--out", "attention": "--attention",
             "attention_weights": "--attention-weights", "overwrite": "--overwrite", "device": "--device",
             "ratio_methods": "--ratio-methods"}


def _positive_or_none(name: str, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive integer or None, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return value


def validate_images(paths, size: int, crop_name: str = "crop"):
    """Decode every image and check it holds a ``size`` x ``size`` crop: (good paths, bad
    entries ``{"image", "reason"}``).  Nothing is kept in memory."""
    from .imageio import ImageError, load_image

    good, bad = [], []
    for path in paths:
        try:
            img, _ = load_image(path)
        except ImageError as e:
            bad.append(dict(image=str(path), reason=str(e)))
            continue
        h, w = img.shape[-2:]
        if min(h, w) < size:
            bad.append(dict(image=str(path), reason=f"{path}: image is {w}x{h}, smaller than the {size}x{size} crop "
                                                    f"({crop_name} {size})"))
        else:
            good.append(path)
    return good, bad


def _write_atomic(path: Path, text: str, overwrite: bool) -> None:
    with atomic_write(path, mode="w", overwrite=overwrite) as f:
        f.write(text)


def _write_tables(out: Path, report: dict, rows: list, overwrite: bool) -> None:
    _write_atomic(out / "results.json", json.dumps(report, indent=2), overwrite)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["image", "run", "psnr", "ssim", "lpips", "update_ratio", "colour_shift"])
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(out / "results.csv", buf.getvalue(), overwrite)


def evaluate(checkpoint, data, out_dir, *, attention=None, attention_weights=None, ratio_methods=("gaussian", "edge", "sift"),
             lower_bound=None, steps=None, dense=False, crop=None, limit=None, lpips_backbone=None, seed=0, device="cpu",
             overwrite=False, log=print, option_names=None, engine="auto", engine_options=None) -> dict:
    """Evaluate ``checkpoint`` on the HR images of ``data`` and write results.json/.csv and the
    plots into ``out_dir``; returns the report (results.json's content).

    Every option and input is checked before anything is sampled.  Images that can't be read
    or are smaller than the crop are skipped, logged, and listed under ``skipped`` in the
    report; the others are evaluated.  If a run fails midway, the results finished so far are
    written (``complete: false``) before the error propagates.  ``crop``: side of the centre
    crop (a multiple of the scale and the UNet's size multiple; default the model's
    ``image_size``); ``limit``: evaluate only the first ``limit`` images found.  Existing
    results in ``out_dir`` are an error unless ``overwrite``.  ``option_names`` maps the
    argument names to what messages call them (the CLI passes its flags). ``engine`` and
    ``engine_options`` go to the YODA runs' ``sample`` (dense runs stay dense).
    """
    from .argtypes import check_device, check_output_folder
    from .diffusion import load_diffusion
    from .imageio import bicubic_downscale, bicubic_upscale, load_image
    from .masking import MaskSchedule
    from .memory import check_memory, estimate_sample_memory
    from .metrics import colour_shift, psnr, ssim, try_lpips
    from .plots import plot_refined_area, plot_update_ratio
    from .upscale import build_extractor, check_steps

    names = {**_API_NAMES, **(option_names or {})}
    crop = _positive_or_none(names["crop"], crop)
    limit = _positive_or_none(names["limit"], limit)
    steps = _positive_or_none(names["steps"], steps)
    device = check_device(str(device), option=names["device"])
    diff, config, extra = load_diffusion(checkpoint, map_location=device)
    check_steps(diff, steps, names["steps"])
    if lower_bound is not None:
        diff.yoda = replace(diff.yoda, lower_bound=lower_bound)
    # HR crops must be divisible by the scale and by the UNet's size multiple
    multiple = math.lcm(int(getattr(diff.model, "size_multiple", 1)), diff.scale)
    size = crop or int(getattr(config, "image_size", 128))
    if size % multiple:
        raise ValueError(f"{names['crop']} must be a multiple of {multiple} for this model (scale {diff.scale}, UNet "
                         f"size multiple {getattr(diff.model, 'size_multiple', 1)}), got {size}")
    method = attention or diff.yoda.attention
    extractors = {}
    if method:
        extractors[method] = build_extractor(method, attention_weights, device,
                                             names=(names["attention"], names["attention_weights"]))
    elif attention_weights is not None:
        raise ValueError(f"{names['attention_weights']}: no attention method to load it for (the checkpoint was "
                         f"trained dense; name one with {names['attention']})")
    for m in ratio_methods:
        if m and m not in extractors:
            extractors[m] = build_extractor(m, None, device, names=(names["ratio_methods"], ""))
    runs = (["yoda"] if method else []) + (["dense"] if dense or not method else [])
    paths = collect_images(data)
    if limit is not None:
        paths = paths[:limit]
    good, skipped = validate_images(paths, size, names["crop"])
    for b in skipped:
        log(f"skipping {b['reason']}")
    if not good:
        raise ValueError(f"none of the {len(paths)} images can be evaluated: {skipped[0]['reason']}")
    out = check_output_folder(out_dir, option=names["out"])
    if not overwrite:
        existing = [out / f for f in OUTPUT_FILES if (out / f).exists()]
        if existing:
            raise ValueError(f"{names['out']}: {existing[0]} exists; pass {names['overwrite']} to replace the results")
    check_memory(estimate_sample_memory(diff, (size // diff.scale,) * 2, device=device, attention=method),
                 device, what=f"sampling a {size}x{size} crop", hint=f"use a smaller {names['crop']}")

    lpips_metric, lpips_reason = try_lpips(backbone_weights=lpips_backbone, device=device)
    if lpips_metric is None:
        log(f"LPIPS unavailable: {lpips_reason}")
    T = len(diff.schedule)
    sched = diff.schedule if steps is None else diff.schedule.respace(steps)
    timesteps = sched.timesteps.flip(0)

    rows, curves, ratios = [], {m: [] for m in extractors}, {m: [] for m in extractors}
    index = {p: k for k, p in enumerate(paths)}  # seeds follow the image's place among all found

    def report(complete: bool) -> dict:
        summary = {}
        for run in sorted({r["run"] for r in rows}):
            sel = [r for r in rows if r["run"] == run]
            summary[run] = {key: (sum(r[key] for r in sel) / len(sel) if sel[0][key] is not None else None)
                            for key in ("psnr", "ssim", "lpips", "update_ratio", "colour_shift")}
        return dict(checkpoint=str(checkpoint), model=config.name, family=diff.family, scale=diff.scale, attention=method,
                    lower_bound=diff.yoda.lower_bound, steps=len(sched), crop=size,
                    images=len({r["image"] for r in rows}), complete=complete, skipped=skipped,
                    metric_convention="PSNR/SSIM on the Y channel (BT.601), border of `scale` pixels cropped",
                    lpips=None if lpips_metric is not None else f"LPIPS unavailable: {lpips_reason}",
                    summary=summary, update_ratio_by_method={m: sum(v) / len(v) for m, v in ratios.items() if v},
                    per_image=rows)

    try:
        for n, path in enumerate(good):
            k = index[path]
            hr, _ = load_image(path)
            hr = _centre_crop(hr, size)[None].to(device)
            lr = bicubic_downscale(hr, diff.scale)
            x_up = bicubic_upscale(lr, diff.scale)
            maps = {m: e(x_up) for m, e in extractors.items()}
            image_rows = []
            for run in runs:
                g = torch.Generator().manual_seed(seed + k)
                res = diff.sample(lr, maps[method] if run == "yoda" else None, steps=steps, generator=g, progress=False,
                                  **(dict(engine=engine, engine_options=engine_options) if run == "yoda" else {}))
                sr = res.images
                row = dict(image=str(path), run=run, psnr=float(psnr(sr, hr, scale=diff.scale)[0]),
                           ssim=float(ssim(sr, hr, scale=diff.scale)[0]), update_ratio=float(res.update_ratio[0]),
                           colour_shift=float(colour_shift(sr, hr)[0].abs().mean()))
                row["lpips"] = float(lpips_metric(sr, hr)[0]) if lpips_metric is not None else None
                image_rows.append(row)
                log(f"[{n + 1}/{len(good)}] {path.name} {run}: PSNR {row['psnr']:.2f} SSIM {row['ssim']:.4f}"
                    + (f" LPIPS {row['lpips']:.4f}" if row["lpips"] is not None else "")
                    + f" update ratio {100 * row['update_ratio']:.1f}%")
            bic = x_up.clamp(0, 1)
            image_rows.append(dict(image=str(path), run="bicubic", psnr=float(psnr(bic, hr, scale=diff.scale)[0]),
                                   ssim=float(ssim(bic, hr, scale=diff.scale)[0]), update_ratio=None,
                                   colour_shift=float(colour_shift(bic, hr)[0].abs().mean()),
                                   lpips=float(lpips_metric(bic, hr)[0]) if lpips_metric is not None else None))
            # an image's results count once all of them are in
            for m, a in maps.items():
                ms = MaskSchedule(a, T, diff.yoda.lower_bound, timesteps=timesteps)
                ratios[m].append(float(ms.update_ratio[0]))
                curves[m].append(ms.active_fraction[:, 0].cpu())
            rows.extend(image_rows)
    except BaseException:
        if rows:  # keep what is finished; the error goes on
            _write_tables(out, report(complete=False), rows, overwrite)
            log(f"interrupted: the results of {len({r['image'] for r in rows})} finished images are in {out / 'results.json'}")
        raise

    result = report(complete=True)
    _write_tables(out, result, rows, overwrite)
    if ratios:
        plot_update_ratio(ratios, out / "update_ratio.png")
        plot_refined_area({m: torch.stack(c).numpy() for m, c in curves.items()}, timesteps.numpy(), out / "refined_area.png")
    for run, s in result["summary"].items():
        log(f"{run:>8s}: " + "  ".join(f"{k} {v:.4f}" for k, v in s.items() if v is not None))
    log(f"wrote {out / 'results.json'}, results.csv" + (", update_ratio.png, refined_area.png" if ratios else "")
        + (f"; {len(skipped)} image(s) skipped (listed in results.json)" if skipped else ""))
    return result


def eval_from_args(args) -> int:
    report = evaluate(args.checkpoint, args.data, args.out, attention=args.attention, attention_weights=args.attention_weights,
                      ratio_methods=[m.strip() for m in args.ratio_methods.split(",") if m.strip()],
                      lower_bound=args.lower_bound, steps=args.steps, dense=args.dense, crop=args.crop, limit=args.limit,
                      lpips_backbone=args.lpips_backbone, seed=args.seed, device=args.device, overwrite=args.overwrite,
                      option_names=CLI_NAMES, engine=args.engine, engine_options=engine_options_from_args(args) or None)
    skipped = report["skipped"]
    if skipped and not args.skip_bad:
        print(f"error: {len(skipped)} of {len(skipped) + report['images']} images skipped (listed in results.json; "
              f"--skip-bad accepts this): {skipped[0]['reason']}", file=sys.stderr)
        return 1
    return 0
