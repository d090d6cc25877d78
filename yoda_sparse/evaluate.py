"""`yoda-sparse eval`: PSNR/SSIM/LPIPS of a checkpoint on HR images, the pixel-update ratio
and the refined-area-over-time curve (the paper's Figs. 4-5), as JSON, CSV and PNG plots.

Metric conventions are those of :mod:`yoda_sparse.metrics` (Y channel, ``scale``-pixel border
crop, as in the SR literature).  LPIPS needs its AlexNet backbone: pass ``--lpips-backbone``
or have torchvision's weights in the torch hub cache; otherwise the report says
"LPIPS unavailable: <reason>" and the other metrics are still computed.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from .atomic import atomic_write

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="+", help="HR image files or folders (LR made by bicubic downscaling)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--attention", default=None, help="attention method for YODA sampling (default: the checkpoint's)")
    p.add_argument("--attention-weights", default=None)
    p.add_argument("--ratio-methods", default="gaussian,edge,sift",
                   help="comma-separated extra methods whose update ratio / refined area are plotted (no sampling)")
    p.add_argument("--lower-bound", type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--dense", action="store_true", help="also evaluate dense sampling")
    p.add_argument("--crop", type=int, default=None, help="centre-crop HR images to this size (default: the model's image size)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many images")
    p.add_argument("--lpips-backbone", default=None, help="torchvision AlexNet state_dict file for LPIPS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


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


def _centre_crop(img: torch.Tensor, size: int, multiple: int) -> torch.Tensor:
    _, h, w = img.shape
    s = min(size, h, w)
    s -= s % multiple
    if s < multiple:
        raise ValueError(f"image of {w}x{h} is smaller than the minimum {multiple}x{multiple}")
    top, left = (h - s) // 2, (w - s) // 2
    return img[:, top:top + s, left:left + s]


def _write_atomic(path: Path, text: str) -> None:
    with atomic_write(path, mode="w") as f:
        f.write(text)


def evaluate(checkpoint, data, out_dir, *, attention=None, attention_weights=None, ratio_methods=("gaussian", "edge", "sift"),
             lower_bound=None, steps=None, dense=False, crop=None, limit=None, lpips_backbone=None, seed=0, device="cpu",
             log=print) -> dict:
    from .attention import get_attention
    from .diffusion import load_diffusion
    from .imageio import bicubic_downscale, bicubic_upscale, load_image
    from .masking import MaskSchedule
    from .metrics import colour_shift, psnr, ssim, try_lpips
    from .plots import plot_refined_area, plot_update_ratio

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    diff, config, extra = load_diffusion(checkpoint, map_location=device)
    if lower_bound is not None:
        diff.yoda = replace(diff.yoda, lower_bound=lower_bound)
    method = attention or diff.yoda.attention
    kwargs = {"weights": attention_weights} if attention_weights else {}
    extractors = {}
    if method:
        extractors[method] = get_attention(method, **kwargs).to(device)
    for m in ratio_methods:
        if m and m not in extractors:
            extractors[m] = get_attention(m).to(device)
    lpips_metric, lpips_reason = try_lpips(backbone_weights=lpips_backbone, device=device)
    if lpips_metric is None:
        log(f"LPIPS unavailable: {lpips_reason}")
    # HR crops must be divisible by the scale and by the UNet's size multiple
    multiple = math.lcm(int(getattr(diff.model, "size_multiple", 1)), diff.scale)
    size = crop or int(getattr(config, "image_size", 128))
    T = len(diff.schedule)
    sched = diff.schedule if steps is None else diff.schedule.respace(steps)
    timesteps = sched.timesteps.flip(0)
    runs = (["yoda"] if method else []) + (["dense"] if dense or not method else [])

    rows, curves, ratios = [], {m: [] for m in extractors}, {m: [] for m in extractors}
    paths = collect_images(data)[:limit]
    for k, path in enumerate(paths):
        hr, _ = load_image(path)
        hr = _centre_crop(hr, size, multiple)[None].to(device)
        lr = bicubic_downscale(hr, diff.scale)
        x_up = bicubic_upscale(lr, diff.scale)
        maps = {m: e(x_up) for m, e in extractors.items()}
        for m, a in maps.items():
            ms = MaskSchedule(a, T, diff.yoda.lower_bound, timesteps=timesteps)
            ratios[m].append(float(ms.update_ratio[0]))
            curves[m].append(ms.active_fraction[:, 0].cpu())
        for run in runs:
            g = torch.Generator().manual_seed(seed + k)
            res = diff.sample(lr, maps[method] if run == "yoda" else None, steps=steps, generator=g, progress=False)
            sr = res.images
            row = dict(image=str(path), run=run, psnr=float(psnr(sr, hr, scale=diff.scale)[0]),
                       ssim=float(ssim(sr, hr, scale=diff.scale)[0]), update_ratio=float(res.update_ratio[0]),
                       colour_shift=float(colour_shift(sr, hr)[0].abs().mean()))
            row["lpips"] = float(lpips_metric(sr, hr)[0]) if lpips_metric is not None else None
            rows.append(row)
            log(f"[{k + 1}/{len(paths)}] {path.name} {run}: PSNR {row['psnr']:.2f} SSIM {row['ssim']:.4f}"
                + (f" LPIPS {row['lpips']:.4f}" if row["lpips"] is not None else "")
                + f" update ratio {100 * row['update_ratio']:.1f}%")
        rows.append(dict(image=str(path), run="bicubic", psnr=float(psnr(x_up.clamp(0, 1), hr, scale=diff.scale)[0]),
                         ssim=float(ssim(x_up.clamp(0, 1), hr, scale=diff.scale)[0]), update_ratio=None,
                         colour_shift=float(colour_shift(x_up.clamp(0, 1), hr)[0].abs().mean()),
                         lpips=float(lpips_metric(x_up.clamp(0, 1), hr)[0]) if lpips_metric is not None else None))

    summary = {}
    for run in sorted({r["run"] for r in rows}):
        sel = [r for r in rows if r["run"] == run]
        summary[run] = {key: (sum(r[key] for r in sel) / len(sel) if sel[0][key] is not None else None)
                        for key in ("psnr", "ssim", "lpips", "update_ratio", "colour_shift")}
    report = dict(checkpoint=str(checkpoint), model=config.name, family=diff.family, scale=diff.scale, attention=method,
                  lower_bound=diff.yoda.lower_bound, steps=len(sched), images=len(paths),
                  metric_convention="PSNR/SSIM on the Y channel (BT.601), border of `scale` pixels cropped",
                  lpips=None if lpips_metric is not None else f"LPIPS unavailable: {lpips_reason}",
                  summary=summary, update_ratio_by_method={m: sum(v) / len(v) for m, v in ratios.items() if v}, per_image=rows)
    _write_atomic(out / "results.json", json.dumps(report, indent=2))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["image", "run", "psnr", "ssim", "lpips", "update_ratio", "colour_shift"])
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(out / "results.csv", buf.getvalue())
    if ratios:
        plot_update_ratio(ratios, out / "update_ratio.png")
        plot_refined_area({m: torch.stack(c).numpy() for m, c in curves.items()}, timesteps.numpy(), out / "refined_area.png")
    for run, s in summary.items():
        log(f"{run:>8s}: " + "  ".join(f"{k} {v:.4f}" for k, v in s.items() if v is not None))
    log(f"wrote {out / 'results.json'}, results.csv, update_ratio.png, refined_area.png")
    return report


def eval_from_args(args) -> int:
    evaluate(args.checkpoint, args.data, args.out, attention=args.attention, attention_weights=args.attention_weights,
             ratio_methods=[m.strip() for m in args.ratio_methods.split(",") if m.strip()], lower_bound=args.lower_bound,
             steps=args.steps, dense=args.dense, crop=args.crop, limit=args.limit, lpips_backbone=args.lpips_backbone,
             seed=args.seed, device=args.device)
    return 0
