"""Figures: pixel-update ratios (paper Fig. 4), refined area over the run (Fig. 5), mask strips
and side-by-side comparisons.

matplotlib (a bare ``Figure`` on the Agg canvas; pyplot is never touched) and PIL are
imported inside the functions, so ``import yoda_sparse``
stays fast.  Ratios and areas are passed as fractions in [0, 1] (what
``MaskSchedule.update_ratio`` / ``active_fraction`` return) and drawn in %.  Every file is
written atomically (temp file in the same folder, then ``os.replace``); a missing folder is an
error unless ``make_dirs=True``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .imageio import atomic_write

__all__ = ["plot_update_ratio", "plot_refined_area", "mask_strip", "save_mask_strip", "side_by_side"]


def _figure(figsize):
    # A bare Figure on the Agg canvas: no pyplot, so no global backend switch and no figure
    # registry to leak into (safe inside notebooks and threads).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _save_figure(fig, path, make_dirs: bool) -> Path:
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in fig.canvas.get_supported_filetypes():
        raise ValueError(f"path must end in a figure format such as .png, .pdf or .svg, got {str(path)!r}")
    with atomic_write(path, make_dirs=make_dirs) as f:
        fig.savefig(f, format=fmt, dpi=150, bbox_inches="tight")
    return path


def _save_array(arr: np.ndarray, path, make_dirs: bool) -> Path:
    from PIL import Image

    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"path must end in an image suffix such as .png, got {str(path)!r}")
    with atomic_write(path, make_dirs=make_dirs) as f:
        Image.fromarray(arr).save(f, format=fmt)
    return path


def _fractions(values, name: str) -> np.ndarray:
    a = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf")
    if a.min() < 0 or a.max() > 1:
        raise ValueError(f"{name} must be fractions in [0, 1] (plotted as %), got values in [{a.min():.4g}, {a.max():.4g}]")
    return a


def plot_update_ratio(ratios: dict, path, *, title: str | None = None, make_dirs: bool = False) -> Path:
    """Fig. 4 style: per method, the distribution of per-image pixel-update ratios in %.

    ``ratios``: method name -> per-image update ratios, fractions in [0, 1] (list, array or
    tensor).  Each method gets a box (quartiles, whiskers at 1.5 IQR) with its mean marked
    and written above it.  Writes ``path`` (PNG, or the format of its suffix).
    """
    if not ratios:
        raise ValueError("ratios must name at least one method")
    names = list(ratios)
    data = [100.0 * _fractions(ratios[k], f"ratios[{k!r}]").reshape(-1) for k in names]
    fig, ax = _figure((max(3.5, 1.2 * len(names) + 1.5), 3.5))
    ax.boxplot(data, showmeans=True, meanprops=dict(marker="D", markerfacecolor="white", markeredgecolor="black"))
    ax.set_xticks(range(1, len(names) + 1), names, rotation=20 if len(names) > 3 else 0)
    for i, d in enumerate(data, start=1):
        ax.annotate(f"{d.mean():.1f}%", (i, d.max()), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_ylabel("pixel updates (% of dense diffusion)")
    ax.set_ylim(0, 110)
    ax.axhline(100, color="gray", lw=0.8, ls="--")
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    return _save_figure(fig, path, make_dirs)


def plot_refined_area(curves: dict, timesteps, path, *, title: str | None = None, make_dirs: bool = False) -> Path:
    """Fig. 5 style: refined (active) area in % against the sampling timestep.

    ``curves``: name -> active fractions in [0, 1], shape [S] (one run) or [N, S] (N images:
    mean line with a +-1 std band), e.g. ``MaskSchedule.active_fraction.T``.  ``timesteps``:
    the S timesteps of the run (e.g. 500 ... 1); the x axis runs from high t to low t, the
    direction of sampling.
    """
    if not curves:
        raise ValueError("curves must name at least one method")
    ts = np.asarray(timesteps.detach().cpu() if isinstance(timesteps, torch.Tensor) else timesteps, dtype=np.float64).reshape(-1)
    fig, ax = _figure((5, 3.5))
    for name, c in curves.items():
        a = 100.0 * _fractions(c, f"curves[{name!r}]")
        if a.ndim == 1:
            a = a[None]
        if a.ndim != 2 or a.shape[1] != ts.size:
            raise ValueError(f"curves[{name!r}] must have shape [S] or [N, S] with S = len(timesteps) = {ts.size}, "
                             f"got {a.shape}")
        mean = a.mean(0)
        (line,) = ax.plot(ts, mean, label=name)
        if a.shape[0] > 1:
            sd = a.std(0)
            ax.fill_between(ts, np.clip(mean - sd, 0, 100), np.clip(mean + sd, 0, 100), color=line.get_color(), alpha=0.2)
    if ts.size > 1 and ts[0] > ts[-1]:
        ax.invert_xaxis()  # sampling goes from T down to 0: read left to right
    elif ts.size > 1:
        ax.set_xlim(ts.max(), ts.min())
    ax.set_xlabel("timestep t (sampling runs T -> 0)")
    ax.set_ylabel("refined area (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save_figure(fig, path, make_dirs)


def _mask_stack(masks) -> np.ndarray:
    """[S,1,H,W] / [S,H,W] / list of [1,H,W] or [H,W] -> float64 [S,H,W] in [0, 1]."""
    if isinstance(masks, (list, tuple)):
        if not masks:
            raise ValueError("masks is empty")
        masks = [m.detach().cpu() if isinstance(m, torch.Tensor) else torch.as_tensor(np.asarray(m)) for m in masks]
        shapes = {tuple(m.shape) for m in masks}
        if len(shapes) != 1:
            raise ValueError(f"masks must all have the same shape, got {sorted(shapes)}")
        masks = torch.stack(masks)
    elif isinstance(masks, np.ndarray):
        masks = torch.from_numpy(masks)
    elif isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu()
    else:
        raise TypeError(f"masks must be a tensor, array or list, got {type(masks).__name__}")
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.dim() != 3:
        raise ValueError(f"masks must have shape [S, 1, H, W] or [S, H, W] (for MaskSchedule.masks() [S,B,1,H,W] "
                         f"pass masks[:, b]), got {tuple(masks.shape)}")
    m = masks.to(torch.float64).numpy()
    if m.size == 0 or not np.isfinite(m).all() or m.min() < 0 or m.max() > 1:
        raise ValueError("masks must be boolean or hold values in [0, 1]")
    return m


def _label_height(font) -> int:
    from PIL import Image, ImageDraw

    box = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), "Ag0", font=font)
    return box[3] - box[1] + 6


def mask_strip(masks, n: int = 8, *, labels: bool | Sequence[str] = False, gap: int = 2) -> np.ndarray:
    """``n`` evenly spaced steps of a run's masks side by side: uint8 RGB [H', W', 3].

    Active pixels are white, inactive black (float masks as gray levels).  ``labels``: False
    for none, True for the step index ("step i"), or one string per step of ``masks`` (e.g.
    the timesteps) of which the chosen ones are written above their panels.
    """
    from PIL import Image, ImageDraw, ImageFont

    m = _mask_stack(masks)
    S, H, W = m.shape
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    idx = sorted(set(np.linspace(0, S - 1, min(n, S)).round().astype(int).tolist()))
    if labels is True:
        text = [f"step {i}" for i in idx]
    elif labels is False or labels is None:
        text = None
    else:
        labels = list(labels)
        if len(labels) != S:
            raise ValueError(f"labels must have one entry per step ({S}), got {len(labels)}")
        text = [str(labels[i]) for i in idx]
    font = ImageFont.load_default()
    top = _label_height(font) if text else 0
    k = len(idx)
    canvas = Image.new("RGB", (k * W + (k - 1) * gap, H + top), (128, 128, 128))
    draw = ImageDraw.Draw(canvas)
    for j, i in enumerate(idx):
        panel = Image.fromarray(np.round(m[i] * 255).astype(np.uint8)).convert("RGB")
        x = j * (W + gap)
        canvas.paste(panel, (x, top))
        if text:
            draw.rectangle((x, 0, x + W - 1, top - 1), fill=(255, 255, 255))
            draw.text((x + 2, 2), text[j], fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def save_mask_strip(masks, path, n: int = 8, *, labels: bool | Sequence[str] = False, gap: int = 2,
                    make_dirs: bool = False) -> Path:
    """Write :func:`mask_strip` to ``path`` (PNG) atomically; returns the path."""
    return _save_array(mask_strip(masks, n, labels=labels, gap=gap), path, make_dirs)


def side_by_side(images: Sequence, labels: Sequence[str] | None, path, *, height: int | None = None,
                 gap: int = 4, make_dirs: bool = False) -> Path:
    """Write the images ([3,H,W] float in [0,1] tensors) side by side into one PNG, each scaled
    to the same ``height`` (default: the tallest), with its label above it.

    Upscaling uses nearest-neighbour (an LR image keeps its visible pixels); downscaling uses
    bicubic.  ``labels`` is None or one string per image.
    """
    from PIL import Image, ImageDraw, ImageFont

    if not images:
        raise ValueError("images must not be empty")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"labels must have one entry per image ({len(images)}), got {len(labels)}")
    pils = []
    for i, img in enumerate(images):
        if not isinstance(img, torch.Tensor) or not img.is_floating_point():
            raise TypeError(f"images[{i}] must be a floating-point tensor [3, H, W] in [0, 1]")
        t = img.detach().cpu()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"images[{i}] must have shape [3, H, W], got {tuple(img.shape)}")
        lo, hi = t.min().item(), t.max().item()
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"images[{i}] must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
        arr = torch.round(t.to(torch.float64) * 255).clamp(0, 255).to(torch.uint8)  # clamp: no-op after the check
        arr = arr.expand(3, -1, -1).permute(1, 2, 0).contiguous().numpy()
        pils.append(Image.fromarray(arr))
    h = int(height) if height is not None else max(p.height for p in pils)
    if h < 1:
        raise ValueError(f"height must be positive, got {height!r}")
    resized = []
    for p in pils:
        w = max(1, round(p.width * h / p.height))
        if (w, h) != p.size:
            p = p.resize((w, h), Image.Resampling.NEAREST if h > p.height else Image.Resampling.BICUBIC)
        resized.append(p)
    font = ImageFont.load_default()
    top = _label_height(font) if labels is not None else 0
    total_w = sum(p.width for p in resized) + gap * (len(resized) - 1)
    canvas = Image.new("RGB", (total_w, h + top), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for j, p in enumerate(resized):
        canvas.paste(p, (x, top))
        if labels is not None:
            draw.text((x + 2, 2), str(labels[j]), fill=(0, 0, 0), font=font)
        x += p.width + gap
    return _save_array(np.asarray(canvas), path, make_dirs)
