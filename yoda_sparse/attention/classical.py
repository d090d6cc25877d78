"""Classical (non-DL) attention maps, the baselines of the paper's Table 1.

- ``gaussian``: a centred 2-D Gaussian ("the essential parts of an image are centred").
- ``edge``: Canny edges whose near neighbours are joined into regions ("adjacent and near edges
  are connected to create defined regions"), softened by a Gaussian blur.
- ``sift``: 2-D Gaussians around SIFT keypoints.

``edge`` and ``sift`` run per image on the CPU with numpy/scikit-image (float64) on the
luminance of the image (``skimage.color.rgb2gray``) and return float32 tensors on the input's
device.  Sizes given as fractions are fractions of the image's short side, so a setting means
the same thing at every resolution.  All maps are min-max normalised per image by the base class
(a constant map, e.g. no edges or no keypoints, becomes all zeros).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .base import AttentionExtractor, register_attention

__all__ = ["GaussianAttention", "EdgeAttention", "SIFTAttention"]


def _positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _gray_batch(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] tensor -> [B, H, W] float64 luminance (ITU-R 709, as skimage.rgb2gray)."""
    from skimage.color import rgb2gray

    rgb = images.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).contiguous().numpy()
    return np.stack([rgb2gray(im) for im in rgb]) if len(rgb) else np.zeros((0,) + rgb.shape[1:3])


def _to_tensor(maps: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32)).unsqueeze(1).to(like.device)


class GaussianAttention(AttentionExtractor):
    """Centred 2-D Gaussian, independent of the image content.

    ``sigma``: standard deviation as a fraction of each side (default 0.25: sigma_y = 0.25 H,
    sigma_x = 0.25 W), centred at ((H-1)/2, (W-1)/2).  After min-max the centre is 1 and the
    farthest corners 0.
    """

    name = "gaussian"

    def __init__(self, sigma: float = 0.25):
        super().__init__()
        self.sigma = _positive(sigma, "sigma")

    def compute(self, images: torch.Tensor) -> torch.Tensor:
        B, _, H, W = images.shape
        kw = dict(dtype=torch.float32, device=images.device)
        y = (torch.arange(H, **kw) - (H - 1) / 2) / (self.sigma * H)
        x = (torch.arange(W, **kw) - (W - 1) / 2) / (self.sigma * W)
        g = torch.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2))
        return g.expand(B, 1, H, W)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, sigma={self.sigma}"


class EdgeAttention(AttentionExtractor):
    """Canny edges joined into soft regions.

    Steps per image: ``skimage.feature.canny(gray, canny_sigma, low_threshold,
    high_threshold)`` (thresholds are absolute gradient magnitudes for gray values in [0, 1];
    the defaults 0.05 / 0.1 keep the edges of blurry, bicubic-upsampled images), a binary
    closing with a disk of radius ``join_radius`` (joins edges closer than about twice that),
    hole filling (closed contours become filled regions), then a Gaussian blur with
    ``blur_sigma`` to make the map soft.  ``join_radius`` and ``blur_sigma`` are fractions of
    the short side (at least 1 pixel).  An image without edges gives an all-zero map.
    """

    name = "edge"

    def __init__(self, canny_sigma: float = 1.0, low_threshold: float = 0.05,
                 high_threshold: float = 0.1, join_radius: float = 0.03, blur_sigma: float = 0.02):
        super().__init__()
        self.canny_sigma = _positive(canny_sigma, "canny_sigma")
        self.low_threshold = _positive(low_threshold, "low_threshold")
        self.high_threshold = _positive(high_threshold, "high_threshold")
        if self.low_threshold > self.high_threshold:
            raise ValueError(f"low_threshold must be <= high_threshold, got {low_threshold!r} > "
                             f"{high_threshold!r}")
        self.join_radius = _positive(join_radius, "join_radius")
        self.blur_sigma = _positive(blur_sigma, "blur_sigma")

    def edge_regions(self, gray: np.ndarray) -> np.ndarray:
        """Soft region map (float64, [0, 1], not normalised) of one ``[H, W]`` gray image."""
        from scipy import ndimage as ndi
        from skimage.feature import canny
        from skimage.morphology import disk

        edges = canny(gray, sigma=self.canny_sigma, low_threshold=self.low_threshold,
                      high_threshold=self.high_threshold)
        if not edges.any():
            return np.zeros(gray.shape)
        short = min(gray.shape)
        r = max(1, int(round(self.join_radius * short)))
        # Pad so that the closing treats the outside as background without eroding the border.
        padded = np.pad(edges, r)
        closed = ndi.binary_closing(padded, structure=disk(r))[r:-r, r:-r]
        regions = ndi.binary_fill_holes(closed)
        sigma = max(1.0, self.blur_sigma * short)
        return ndi.gaussian_filter(regions.astype(np.float64), sigma=sigma, mode="nearest")

    def compute(self, images: torch.Tensor) -> torch.Tensor:
        return _to_tensor(np.stack([self.edge_regions(g) for g in _gray_batch(images)]), images)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, canny_sigma={self.canny_sigma}, thresholds=("
                f"{self.low_threshold}, {self.high_threshold}), join_radius={self.join_radius}, "
                f"blur_sigma={self.blur_sigma}")


class SIFTAttention(AttentionExtractor):
    """2-D Gaussians around SIFT keypoints (``skimage.feature.SIFT().detect``).

    Each keypoint at (row, col) with SIFT scale s contributes ``exp(-d^2 / (2 (sigma_factor
    s)^2))``; the map is the elementwise max over keypoints (so clusters of keypoints do not
    drown isolated ones after normalisation).  ``sigma_factor=3`` makes the blob cover about the
    support of the keypoint's SIFT descriptor (half-width 6 s).  Images where SIFT finds no
    keypoint (flat, or too small for its scale space: skimage raises then) give an all-zero map.
    SIFT detection takes ~0.2 s for a 256 x 256 image on one CPU core.
    """

    name = "sift"

    def __init__(self, sigma_factor: float = 3.0):
        super().__init__()
        self.sigma_factor = _positive(sigma_factor, "sigma_factor")

    def keypoint_map(self, gray: np.ndarray) -> np.ndarray:
        """Max-of-Gaussians map (float64, [0, 1], not normalised) of one ``[H, W]`` gray image."""
        from skimage.feature import SIFT

        H, W = gray.shape
        out = np.zeros((H, W))
        sift = SIFT()
        try:
            sift.detect(gray)
        except (RuntimeError, ValueError, IndexError):
            # skimage raises RuntimeError("SIFT found no features") on flat images and
            # IndexError on images too small for one octave: no keypoints, no attention.
            return out
        for (r, c), s in zip(sift.positions, sift.sigmas):
            sig = self.sigma_factor * float(s)
            rad = int(math.ceil(3 * sig))
            r0, r1 = max(0, int(r) - rad), min(H, int(r) + rad + 2)
            c0, c1 = max(0, int(c) - rad), min(W, int(c) + rad + 2)
            if r0 >= r1 or c0 >= c1:
                continue
            dy = (np.arange(r0, r1) - r)[:, None]
            dx = (np.arange(c0, c1) - c)[None, :]
            blob = np.exp(-(dy ** 2 + dx ** 2) / (2 * sig * sig))
            np.maximum(out[r0:r1, c0:c1], blob, out=out[r0:r1, c0:c1])
        return out

    def compute(self, images: torch.Tensor) -> torch.Tensor:
        return _to_tensor(np.stack([self.keypoint_map(g) for g in _gray_batch(images)]), images)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, sigma_factor={self.sigma_factor}"


register_attention("gaussian", GaussianAttention)
register_attention("edge", EdgeAttention)
register_attention("sift", SIFTAttention)
