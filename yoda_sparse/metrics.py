"""Image-quality metrics as reported by the paper: PSNR, SSIM, LPIPS, plus the colour shift.

Convention (the SR literature's, as in SR3/SRDiff/SRFlow and BasicSR evaluations):

* Inputs are float RGB in [0, 1] (``data_range=1``): torch ``[B,3,H,W]`` / ``[3,H,W]``
  (channels first) or numpy ``[H,W,3]`` / ``[B,H,W,3]`` (channels last).  Integer arrays,
  NaNs and values more than 1e-3 outside [0, data_range] are errors; nothing is clamped.
* ``y_channel=True`` (default): PSNR/SSIM on the luma of ITU-R BT.601 YCbCr,
  ``Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255`` for R, G, B in [0, 1], so Y lies in
  [16/255, 235/255]; the peak is still 1 (= 255 on the 8-bit scale), as in BasicSR.  Y is
  not rounded.  ``y_channel=False``: PSNR from the MSE over all three channels, SSIM
  averaged over channels.
* Border crop: ``crop_border`` pixels are dropped on every side before measuring;
  ``crop_border`` defaults to ``scale`` (0 when neither is given).
* No quantisation by default: the model's float output is measured as is.  ``quantize=True``
  first rounds both images to 8 bits (``round(255 x) / 255``), which reproduces numbers
  computed from saved 8-bit PNGs.
* SSIM: Wang et al. 2004 with an 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03,
  population covariances, mean over the "valid" region (window fully inside the image) --
  identical to ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=1)`` and MATLAB's ``ssim_index``.
  Computed in float64 with torch.
* LPIPS (:class:`LPIPSMetric`): the ``lpips`` package (v0.1 linear layers), inputs mapped
  [0,1] -> [-1,1], RGB, no crop.

Every metric returns one float64 value per image: a CPU tensor of shape [B] (B = 1 for a
single image).
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "psnr",
    "ssim",
    "rgb_to_y",
    "colour_shift",
    "ColourShift",
    "LPIPSMetric",
    "LPIPSUnavailable",
    "try_lpips",
    "cached_backbone_path",
]

_RANGE_TOL = 1e-3
_Y_OFFSET = 16.0
_Y_WEIGHTS = (65.481, 128.553, 24.966)
_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_SSIM_K1, _SSIM_K2 = 0.01, 0.03


# --------------------------------------------------------------------------- input checks
def _check_data_range(data_range) -> float:
    dr = float(data_range)
    if not np.isfinite(dr) or dr <= 0:
        raise ValueError(f"data_range must be a positive number, got {data_range!r}")
    return dr


def _as_batch(x, name: str, data_range: float) -> torch.Tensor:
    """Validate one image argument and return it as float64 [B, C, H, W] in [0, 1] units."""
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{name} must be a floating-point array in [0, {data_range:g}], got dtype {x.dtype} "
                            f"(convert integer images with x / 255)")
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise ValueError(f"{name} must be a numpy array [H, W, C] or [B, H, W, C], got shape {x.shape}")
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    elif isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor in [0, {data_range:g}], got {x.dtype} "
                            f"(convert integer images with x / 255)")
        t = x.detach()
        if t.dim() == 3:
            t = t.unsqueeze(0)
        if t.dim() != 4:
            raise ValueError(f"{name} must be a tensor [C, H, W] or [B, C, H, W], got shape {tuple(x.shape)}")
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    t = t.to(torch.float64)
    if data_range != 1.0:
        t = t / data_range
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")
    lo, hi = t.min().item(), t.max().item()
    if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise ValueError(f"{name} must lie in [0, {data_range:g}], got values in "
                         f"[{lo * data_range:.4g}, {hi * data_range:.4g}] (no clamping is done)")
    return t


def _check_pair(sr, hr, data_range) -> tuple[torch.Tensor, torch.Tensor]:
    dr = _check_data_range(data_range)
    a = _as_batch(sr, "sr", dr)
    b = _as_batch(hr, "hr", dr)
    if a.shape != b.shape:
        raise ValueError(f"sr and hr must have the same shape, got sr {tuple(a.shape)} and hr {tuple(b.shape)} "
                         f"(as [B, C, H, W])")
    return a, b.to(a.device)


def _resolve_crop(scale, crop_border) -> int:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int) or scale < 1):
        raise ValueError(f"scale must be a positive integer or None, got {scale!r}")
    if crop_border is None:
        return scale if scale is not None else 0
    if isinstance(crop_border, bool) or not isinstance(crop_border, int) or crop_border < 0:
        raise ValueError(f"crop_border must be a non-negative integer or None, got {crop_border!r}")
    return crop_border


def rgb_to_y(img: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma of RGB [B,3,H,W] in [0,1]: ``(16 + 65.481 R + 128.553 G + 24.966 B) / 255``,
    returned as [B,1,H,W] in [16/255, 235/255] (same dtype)."""
    if img.dim() != 4 or img.shape[1] != 3:
        raise ValueError(f"img must have shape [B, 3, H, W], got {tuple(img.shape)}")
    w = torch.tensor(_Y_WEIGHTS, dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
    return (_Y_OFFSET + (img * w).sum(dim=1, keepdim=True)) / 255.0


def _prepare(sr, hr, scale, crop_border, y_channel, data_range, quantize, min_size=1):
    a, b = _check_pair(sr, hr, data_range)
    border = _resolve_crop(scale, crop_border)
    if quantize:
        a = torch.round(a * 255.0) / 255.0
        b = torch.round(b * 255.0) / 255.0
    if y_channel:
        if a.shape[1] != 3:
            raise ValueError(f"y_channel=True needs 3-channel RGB images, got {a.shape[1]} channels (pass y_channel=False)")
        a, b = rgb_to_y(a), rgb_to_y(b)
    H, W = a.shape[-2:]
    if H - 2 * border < min_size or W - 2 * border < min_size:
        raise ValueError(f"images of size {H}x{W} are too small for crop_border={border}: "
                         f"need at least {min_size}x{min_size} pixels after cropping")
    if border:
        a = a[..., border:H - border, border:W - border]
        b = b[..., border:H - border, border:W - border]
    return a, b


# --------------------------------------------------------------------------- PSNR / SSIM
def psnr(sr, hr, *, scale: int | None = None, crop_border: int | None = None, y_channel: bool = True,
         data_range: float = 1.0, quantize: bool = False) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image: ``10 log10(1 / MSE)`` (peak = data_range).

    Args:
        sr, hr: float images in [0, data_range], torch [B,3,H,W]/[3,H,W] or numpy HWC/BHWC.
        scale: SR scale factor; the default ``crop_border``.
        crop_border: pixels dropped on every side (default ``scale``, else 0).
        y_channel: measure on BT.601 Y (default) or on RGB (MSE over all channels).
        data_range: the inputs' peak value (1.0 for [0, 1] images).
        quantize: round both images to 8 bits first (default False).

    Returns float64 CPU tensor [B]; identical images give ``inf``.  See the module docstring.
    """
    a, b = _prepare(sr, hr, scale, crop_border, y_channel, data_range, quantize)
    mse = (a - b).pow(2).mean(dim=(1, 2, 3))
    return (10.0 * torch.log10(1.0 / mse)).cpu()


def _gaussian_window(size: int, sigma: float, dtype, device) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def ssim(sr, hr, *, scale: int | None = None, crop_border: int | None = None, y_channel: bool = True,
         data_range: float = 1.0, quantize: bool = False) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004), float64 CPU tensor [B].

    11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, population (co)variances, mean
    over the positions where the window lies inside the (cropped) image; RGB mode averages
    the per-channel SSIMs.  Arguments as :func:`psnr`; identical images give 1.0.  Images
    must be at least 11x11 after cropping.
    """
    a, b = _prepare(sr, hr, scale, crop_border, y_channel, data_range, quantize, min_size=_SSIM_WINDOW)
    B, C = a.shape[:2]
    g = _gaussian_window(_SSIM_WINDOW, _SSIM_SIGMA, a.dtype, a.device)
    n = 5 * C
    wh = g.view(1, 1, 1, -1).repeat(n, 1, 1, 1)
    wv = g.view(1, 1, -1, 1).repeat(n, 1, 1, 1)
    # One grouped, separable, "valid" convolution filters all five statistics at once.
    stats = torch.cat([a, b, a * a, b * b, a * b], dim=1)
    f = F.conv2d(F.conv2d(stats, wh, groups=n), wv, groups=n)
    ux, uy, uxx, uyy, uxy = f.split(C, dim=1)
    vx = uxx - ux * ux
    vy = uyy - uy * uy
    vxy = uxy - ux * uy
    c1, c2 = _SSIM_K1 ** 2, _SSIM_K2 ** 2  # (K * L)^2 with L = 1 after normalisation
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(2, 3)).mean(dim=1).cpu()


# --------------------------------------------------------------------------- colour shift
class ColourShift(NamedTuple):
    """``per_channel``: float64 [B, C], mean(sr_c) - mean(hr_c) (positive: SR too bright in
    channel c); ``mean_abs``: float64 [B], the mean over channels of its absolute value."""

    per_channel: torch.Tensor
    mean_abs: torch.Tensor


def colour_shift(sr, hr, *, data_range: float = 1.0) -> ColourShift:
    """Per-image, per-channel shift of the mean colour of ``sr`` against ``hr`` (the colour
    shift the paper observes for SR3 trained with small batches), in [0, 1] units.  Inputs as
    :func:`psnr`; no crop."""
    a, b = _check_pair(sr, hr, data_range)
    d = a.mean(dim=(2, 3)) - b.mean(dim=(2, 3))
    return ColourShift(d.cpu(), d.abs().mean(dim=1).cpu())


# --------------------------------------------------------------------------- LPIPS
class LPIPSUnavailable(Exception):
    """LPIPS can't be built here (package missing, no backbone weights, unreadable file); the
    message is a one-line reason."""


# torchvision's file names for the ImageNet weights lpips would download (torch.hub cache).
_BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


def cached_backbone_path(net: str = "alex") -> Path:
    """Where torchvision caches the backbone's ImageNet weights: ``<torch.hub dir>/checkpoints/<file>``
    (honours ``TORCH_HOME``).  The file may not exist."""
    if net not in _BACKBONE_FILES:
        raise ValueError(f"net must be one of {sorted(_BACKBONE_FILES)}, got {net!r}")
    return Path(torch.hub.get_dir()) / "checkpoints" / _BACKBONE_FILES[net]


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


def _map_backbone(sd: dict, target: dict, path: Path) -> dict:
    """Map a torchvision state_dict (``features.N.*``), a bare ``features`` state_dict
    (``N.*``) or an lpips ``net`` state_dict (``sliceK.N.*``) onto lpips' slices."""
    if isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    out, missing = {}, []
    for key, ref in target.items():
        m = re.fullmatch(r"slice\d+\.(\d+)\.(.+)", key)
        cands = [key] if m is None else [f"features.{m[1]}.{m[2]}", f"{m[1]}.{m[2]}", key]
        src = next((c for c in cands if c in sd), None)
        if src is None:
            missing.append(cands[0])
            continue
        v = sd[src]
        if not isinstance(v, torch.Tensor) or v.shape != ref.shape:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise LPIPSUnavailable(f"backbone weights {path}: {src} has shape {got}, expected {tuple(ref.shape)}")
        out[key] = v.to(ref.dtype)
    if missing:
        raise LPIPSUnavailable(f"backbone weights {path} lack {len(missing)} tensors, e.g. {', '.join(missing[:3])} "
                               f"(expected a torchvision state_dict)")
    return out


class LPIPSMetric:
    """LPIPS distance (Zhang et al. 2018) per image with the ``lpips`` package, never downloading.

    The backbone (``net``: "alex" default, "vgg", "squeeze") is built with random weights
    and then loaded from ``backbone_weights`` -- a local torchvision state_dict file, e.g.
    ``alexnet-owt-7be5be79.pth`` -- or, when that is None, from torchvision's cache
    (:func:`cached_backbone_path`).  The linear layers are lpips' own v0.1 weights, shipped
    in its wheel.  Raises :class:`LPIPSUnavailable` when anything is missing.

    ``metric(sr, hr)`` takes images as :func:`psnr` (RGB in [0, 1], mapped to [-1, 1]) and
    returns float64 CPU tensor [B]; identical images give 0.
    """

    def __init__(self, net: str = "alex", backbone_weights=None, device="cpu", *, version: str = "0.1"):
        if net not in _BACKBONE_FILES:
            raise ValueError(f"net must be one of {sorted(_BACKBONE_FILES)}, got {net!r}")
        try:
            import lpips
        except ImportError as e:
            raise LPIPSUnavailable(f"the lpips package is not installed ({_first_line(e)}); pip install lpips") from None
        if backbone_weights is not None:
            path = Path(backbone_weights)
            if not path.is_file():
                raise LPIPSUnavailable(f"backbone_weights file not found: {path}")
        else:
            path = cached_backbone_path(net)
            if not path.is_file():
                raise LPIPSUnavailable(f"no {net} backbone weights: pass backbone_weights=<torchvision {path.name}> "
                                       f"or put it at {path} (no download is attempted)")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise LPIPSUnavailable(f"cannot read backbone weights {path}: {_first_line(e)}") from None
        if not isinstance(sd, dict):
            raise LPIPSUnavailable(f"backbone weights {path} hold a {type(sd).__name__}, not a state_dict")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torchvision's "pretrained is deprecated" noise
                model = lpips.LPIPS(net=net, version=version, pretrained=True, pnet_rand=True, verbose=False)
        except Exception as e:
            raise LPIPSUnavailable(f"cannot build lpips.LPIPS(net={net!r}): {_first_line(e)}") from None
        model.net.load_state_dict(_map_backbone(sd, model.net.state_dict(), path), strict=True)
        model.eval().requires_grad_(False)
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.net = net
        self.backbone_path = path

    def __call__(self, sr, hr) -> torch.Tensor:
        a, b = _check_pair(sr, hr, 1.0)
        if a.shape[1] != 3:
            raise ValueError(f"LPIPS needs 3-channel RGB images, got {a.shape[1]} channels")
        a = (a * 2 - 1).to(self.device, torch.float32)
        b = (b * 2 - 1).to(self.device, torch.float32)
        try:
            with torch.no_grad():
                d = self.model(a, b)
        except RuntimeError as e:
            if "too small" in str(e):
                raise ValueError(f"images of size {a.shape[-2]}x{a.shape[-1]} are too small for the LPIPS "
                                 f"{self.net} backbone") from None
            raise
        return d.flatten().to(torch.float64).cpu()

    def __repr__(self) -> str:
        return f"LPIPSMetric(net={self.net!r}, backbone_weights={str(self.backbone_path)!r}, device={str(self.device)!r})"


def try_lpips(net: str = "alex", backbone_weights=None, device="cpu"):
    """``(LPIPSMetric, None)`` if LPIPS can be built, else ``(None, reason)`` with a one-line
    reason, so an evaluator can print "LPIPS unavailable: <reason>" and go on."""
    try:
        return LPIPSMetric(net, backbone_weights, device), None
    except LPIPSUnavailable as e:
        return None, str(e)
