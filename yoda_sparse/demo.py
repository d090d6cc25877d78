"""The README's main job.

1. Masks: on a bundled image, compute the attention map of each method, the mask schedule of
   a 500 -> 200 step run, print the pixel-update ratio per method and write a PNG of the mask
   over time.
2. Super-resolution: with the bundled demo checkpoint, upscale a held-out image dense, with
   YODA on the dense engine and with YODA on the sparse engine (the UNet computed only on each
   step's active tiles); print the times, the update ratio and PSNR/SSIM against the HR
   image, and write a side-by-side PNG (LR | bicubic | SR dense | SR YODA | HR | mask).
3. Timing at scale: the demo model is far too small for sparsity to pay (its layers are a few
   microseconds of work; overheads dominate), so the published SR3 16->128 architecture
   (97.8 M parameters, random weights: timing only) is timed dense and sparse on the same
   masks, same seed.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .attention import get_attention
from .masking import MaskSchedule
from .schedule import NoiseSchedule

CLASSICAL_METHODS = ("gaussian", "edge", "sift")
DEMO_IMAGE = "astronaut"


def _demo_image(name: str, size: int) -> torch.Tensor:
    from .imageio import bundled_images

    images = bundled_images()
    if name not in images:
        raise ValueError(f"image must be one of {sorted(images)}, got {name!r}")
    img = images[name]()
    # centre square crop, then resize to the demo size
    _, h, w = img.shape
    s = min(h, w)
    img = img[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return F.interpolate(img[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def mask_demo(out_dir: Path, *, image: str = DEMO_IMAGE, size: int = 128, scale: int = 4, lower_bound: float = 0.2,
              T: int = 500, steps: int = 200, dino_weights: dict[str, str] | None = None, log=print) -> dict[str, float]:
    """Update ratio per attention method for one bundled image; writes masks_over_time.png."""
    from .imageio import bicubic_downscale, bicubic_upscale
    hr = _demo_image(image, size)
    x_up = bicubic_upscale(bicubic_downscale(hr, scale), scale)
    timesteps = NoiseSchedule.linear(T).respace(steps).timesteps.flip(0)
    methods: list[tuple[str, dict]] = [(m, {}) for m in CLASSICAL_METHODS]
    for name, path in (dino_weights or {}).items():
        methods.append((name, {"weights": path}))
    ratios, strips = {}, {}
    log(f"[masks] {image} {size}x{size} (x{scale} LR upsampled), T={T} respaced to {steps} steps, lower bound {lower_bound}")
    for name, kwargs in methods:
        extractor = get_attention(name, **kwargs)
        attn = extractor(x_up)
        sched = MaskSchedule(attn, T, lower_bound, timesteps=timesteps)
        ratios[name] = float(sched.update_ratio.mean())
        strips[name] = sched
        log(f"[masks] {name:>22s}: pixel-update ratio {100 * ratios[name]:5.1f}%  "
            f"(closed form mean(min(1, M+l)) = {100 * float((attn + lower_bound).clamp(max=1).mean()):5.1f}%)")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "masks_over_time.png"
    _save_masks_over_time(hr[0], strips, path)
    log(f"[masks] wrote {path} (one row per method, white = updated at that step)")
    return ratios


def _save_masks_over_time(image: torch.Tensor, schedules: dict, path: Path, n: int = 8) -> None:
    """One row per method: the method's name, then its mask at n evenly spaced steps."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    from .imageio import atomic_write
    from .plots import mask_strip

    font = ImageFont.load_default()
    rows = []
    for name, sched in schedules.items():
        labels = [f"t={int(t)}" for t in sched.timesteps.tolist()]
        strip = mask_strip(sched.masks()[:, 0].cpu(), n, labels=labels)
        head = Image.new("RGB", (strip.shape[1], 16), (255, 255, 255))
        ImageDraw.Draw(head).text((2, 2), f"{name}: update ratio {100 * float(sched.update_ratio.mean()):.1f}%", fill=(0, 0, 0), font=font)
        rows += [np.asarray(head), strip]
    thumb = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    width = max(r.shape[1] for r in rows)
    pad = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0)), constant_values=255)  # noqa: E731
    canvas = np.concatenate([pad(thumb)] + [pad(r) for r in rows], axis=0)
    with atomic_write(path) as f:
        Image.fromarray(canvas).save(f, format="PNG")


def sr_demo(out_dir: Path, checkpoint: Path, *, image: str, steps: int | None, size: int = 128, seed: int = 0,
            log=print) -> dict:
    """Dense vs YODA on one held-out image (centre crop of ``size`` HR pixels) with a demo checkpoint."""
    from .diffusion import load_diffusion
    from .imageio import bicubic_downscale, bicubic_upscale
    from .metrics import psnr, ssim
    from .plots import side_by_side

    diff, config, extra = load_diffusion(checkpoint)
    hr = _demo_image(image, size)
    lr = bicubic_downscale(hr, diff.scale)
    bicubic = bicubic_upscale(lr, diff.scale)
    method = diff.yoda.attention or "gaussian"
    extractor = get_attention(method, **extra.get("attention_kwargs", {}))
    attn = extractor(bicubic)
    diff.sample(lr, attn, steps=2, progress=False)  # warm-up: first-call costs stay out of the timings
    diff.sample(lr, attn, steps=2, progress=False, engine="sparse")
    results = {}
    for label, a, engine in (("dense", None, "dense"), ("yoda", attn, "dense"), ("yoda sparse", attn, "sparse")):
        g = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        res = diff.sample(lr, a, steps=steps, generator=g, progress=False, engine=engine)
        dt = time.perf_counter() - t0
        results[label] = dict(seconds=dt, update_ratio=float(res.update_ratio.mean()),
                              psnr=float(psnr(res.images, hr, scale=diff.scale)[0]),
                              ssim=float(ssim(res.images, hr, scale=diff.scale)[0]), images=res.images)
    results["bicubic"] = dict(psnr=float(psnr(bicubic, hr, scale=diff.scale)[0]), ssim=float(ssim(bicubic, hr, scale=diff.scale)[0]))
    log(f"[sr] {config.name} ({diff.family}) x{diff.scale}, {image} {size}x{size}, attention {method}, "
        f"{steps or len(diff.schedule)} steps")
    for label in ("bicubic", "dense", "yoda", "yoda sparse"):
        r = results[label]
        timing = f"  {r['seconds']:6.2f} s  update ratio {100 * r['update_ratio']:5.1f}%" if "seconds" in r else ""
        log(f"[sr] {label:>11s}: PSNR {r['psnr']:6.2f} dB  SSIM {r['ssim']:.4f}{timing}")
    sparse_vs_dense = psnr(results["yoda sparse"]["images"], results["yoda"]["images"], scale=diff.scale)[0]
    log(f"[sr] sparse engine vs dense engine (same YODA run, same seed): time ratio "
        f"{results['yoda sparse']['seconds'] / results['yoda']['seconds']:.2f}, PSNR between them "
        f"{float(sparse_vs_dense):.1f} dB (this {config.name} model is too small for sparsity to pay: see the "
        f"timing of the published architecture below)")
    mask_img = attn[0].expand(3, -1, -1)
    side_by_side([lr[0], bicubic[0], results["dense"]["images"][0], results["yoda"]["images"][0], hr[0], mask_img],
                 ["LR", "bicubic", "SR dense", "SR YODA", "HR", f"attention ({method})"], out_dir / "sr_side_by_side.png")
    log(f"[sr] wrote {out_dir / 'sr_side_by_side.png'}")
    return results


def timing_demo(*, image: str, size: int = 256, steps: int = 20, seed: int = 0, log=print) -> dict:
    """Dense vs sparse YODA sampling time of the published SR3 16->128 architecture (random
    weights) on one image's edge-attention masks, measured here, side by side."""
    from .bench import BenchConfig, run_bench

    cfg = BenchConfig(model="sr3_16_128", size=size, batch=1, steps=steps, sources=(f"edge:{image}",),
                      seed=seed, progress=False, memory=False)
    log(f"[timing] the published SR3 16->128 architecture (97.8 M parameters, random weights: timing only), "
        f"{size}x{size}, {steps} steps, edge attention of {image}, this machine:")
    res = run_bench(cfg, log=lambda m: log(m.replace("[bench]", "[timing]")))
    run = res["runs"][0]
    log(f"[timing] sparse engine: {run['sparse']['seconds']:.1f} s vs dense {run['dense']['seconds']:.1f} s "
        f"(time ratio {run['time_ratio']:.2f} at update ratio {run['update_ratio']:.2f}); "
        f"`yoda-sparse bench` times other sizes, masks and models")
    return res
