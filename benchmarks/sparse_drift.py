"""Quality drift of the sparse engine against the dense engine: the same YODA run (checkpoint,
attention, seed) sampled by both, on crops of held-out images; mean RGB PSNR against HR for each,
and SSIM (the library's ``metrics.ssim``: on Y, the scale's border cropped), and the PSNR of each
sparse output against the dense one.

Usage:  python benchmarks/sparse_drift.py [--checkpoint FILE] [--steps 20 100] [--crop 128]
        [--images coffee chelsea] [--config NAME=JSON ...] [--out FILE.md]

Images are the bundled held-out ones (scikit-image's coffee and chelsea; the demo checkpoints
never saw them), cut into non-overlapping ``crop`` x ``crop`` tiles (18 at 128). Each
``--config`` is a name and the sparse engine's options as JSON, e.g.
``current='{"norm_stats": "current"}'``; the default compares the group-norm statistics
policies. Every level runs sparse (``cost_model`` 2.0) unless a config says otherwise, so the
measurement is of the approximation, not of the cost model's choices.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = ROOT / "yoda_sparse" / "checkpoints" / "sr3_yoda_demo.safetensors"
DEFAULT_CONFIGS = ('current={"norm_stats": "current"}', 'probed={"norm_stats": "probed"}', "auto={}")


def crops(names, size: int) -> list[torch.Tensor]:
    from yoda_sparse.imageio import bundled_images

    loaders = bundled_images()
    out = []
    for name in names:
        if name not in loaders:
            raise SystemExit(f"--images: unknown image {name!r} (bundled: {', '.join(sorted(loaders))})")
        img = loaders[name]()
        _, H, W = img.shape
        out += [img[:, i:i + size, j:j + size] for i in range(0, H - size + 1, size) for j in range(0, W - size + 1, size)]
    return out


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return -10 * math.log10(float(((a - b) ** 2).mean()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--steps", type=int, nargs="+", default=[20, 100])
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--images", nargs="+", default=["coffee", "chelsea"])
    p.add_argument("--attention", default=None, help="default: the checkpoint's")
    p.add_argument("--config", action="append", default=None, metavar="NAME=JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the markdown table here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from yoda_sparse.diffusion import load_diffusion
    from yoda_sparse.imageio import bicubic_downscale, bicubic_upscale
    from yoda_sparse.metrics import ssim
    from yoda_sparse.upscale import build_extractor

    configs = []
    for item in args.config or DEFAULT_CONFIGS:
        name, sep, opts = item.partition("=")
        if not sep:
            raise SystemExit(f"--config: expected NAME=JSON, got {item!r}")
        options = {"cost_model": 2.0, **json.loads(opts or "{}")}
        configs.append((name, options))
    diff, config, extra = load_diffusion(args.checkpoint)
    method = args.attention or (extra or {}).get("yoda", {}).get("attention") or "edge"
    extractor = build_extractor(method, None, torch.device("cpu"))
    images = crops(args.images, args.crop)
    lines = [f"{config.name}, {len(images)} crops of {args.crop}x{args.crop} ({', '.join(args.images)}), "
             f"x{diff.scale}, attention {method}, seed {args.seed} for every crop; RGB PSNR, SSIM on Y",
             "", "| steps | engine | PSNR vs HR (vs dense) | SSIM vs HR (vs dense) | PSNR(sparse, dense) |",
             "|---|---|---|---|---|"]
    for steps in args.steps:
        vs_hr = {"dense": []} | {name: [] for name, _ in configs}
        ssim_hr = {name: [] for name in vs_hr}
        vs_dense = {name: [] for name, _ in configs}
        for k, hr in enumerate(images):
            hr = hr[None]
            lr = bicubic_downscale(hr, diff.scale)
            attn = extractor(bicubic_upscale(lr, diff.scale))
            runs = [("dense", "dense", None)] + [(name, "sparse", opts) for name, opts in configs]
            out = {}
            for name, engine, opts in runs:
                g = torch.Generator().manual_seed(args.seed)  # the same seed for every crop and engine
                out[name] = diff.sample(lr, attn, steps=steps, generator=g, progress=False, engine=engine,
                                        engine_options=opts).images
                vs_hr[name].append(psnr(out[name], hr))
                ssim_hr[name].append(float(ssim(out[name], hr, scale=diff.scale)))
            for name, _ in configs:
                vs_dense[name].append(psnr(out[name], out["dense"]))
            print(f"[drift] {steps} steps: {k + 1}/{len(images)} crops", file=sys.stderr, flush=True)
        mean = {n: sum(v) / len(v) for n, v in vs_hr.items()}
        mean_ssim = {n: sum(v) / len(v) for n, v in ssim_hr.items()}
        lines.append(f"| {steps} | dense engine | {mean['dense']:.3f} | {mean_ssim['dense']:.4f} | - |")
        for name, opts in configs:
            lines.append(f"| {steps} | sparse {name} `{json.dumps(opts)}` | {mean[name]:.3f} "
                         f"({mean[name] - mean['dense']:+.3f}) | {mean_ssim[name]:.4f} "
                         f"({mean_ssim[name] - mean_ssim['dense']:+.4f}) | "
                         f"{sum(vs_dense[name]) / len(vs_dense[name]):.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
