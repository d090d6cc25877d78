"""Image files and resampling: load/save, bicubic LR generation, padding, bundled test images.

Tensors are float32 ``[3, H, W]`` (or ``[B, 3, H, W]``) in [0, 1], channels first, RGB.

* :func:`load_image` reads any format Pillow reads, converts to RGB and reports every
  conversion in a list of notes (nothing is converted silently).  Alpha is composited over
  white (what an image viewer shows; the RGB under fully transparent pixels is often
  undefined); a fully opaque alpha channel is just dropped.  16-bit files are scaled by 65535;
  16-bit *colour* PNGs are decoded with torchvision and 16-bit colour TIFFs with tifffile,
  because Pillow would silently reduce them to 8 bits.
* :func:`save_image` quantises with round-half-to-even (``torch.round``) to 8 bits and writes
  atomically (temp file in the same folder, fsync, ``os.replace``).
* :func:`bicubic_downscale` defines the LR image: antialiased bicubic (close to MATLAB's
  ``imresize``), clamped to [0, 1] -- the clamp is part of the definition, since an LR image
  is an image.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_write as _atomic_write

__all__ = [
    "ImageError",
    "load_image",
    "save_image",
    "atomic_write",
    "bicubic_downscale",
    "bicubic_upscale",
    "crop_to_multiple",
    "pad_to_multiple",
    "unpad",
    "bundled_image_paths",
    "bundled_images",
    "bundled_faces",
]

_RANGE_TOL = 1e-3


class ImageError(ValueError):
    """An image file can't be read or written; the message names the path."""


# --------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_write(path, *, make_dirs: bool = False, overwrite: bool = True) -> Iterator:
    """:func:`yoda_sparse.atomic.atomic_write` (binary), with a missing parent folder reported
    as :class:`ImageError` unless ``make_dirs=True``; ``overwrite=False`` refuses to replace an
    existing file (FileExistsError)."""
    path = Path(path)
    if not make_dirs and not path.parent.is_dir():
        raise ImageError(f"cannot write {path}: folder {path.parent} does not exist (pass make_dirs=True to create it)")
    with _atomic_write(path, make_dirs=make_dirs, overwrite=overwrite) as f:
        yield f


# --------------------------------------------------------------------------- loading
def _rawmode(im) -> str:
    tile = getattr(im, "tile", None) or []
    if not tile:
        return ""
    args = tile[0].args if hasattr(tile[0], "args") else tile[0][3]
    if isinstance(args, tuple):
        args = args[0] if args else ""
    return args if isinstance(args, str) else ""


def _read_high_depth_colour(path: Path, fmt: str) -> np.ndarray | None:
    """uint16 HWC array of a 16-bit colour PNG/TIFF, or None if no decoder is installed."""
    if fmt == "PNG" and importlib.util.find_spec("torchvision") is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision>=0.29 points to torchcodec
            try:
                from torchvision.io import ImageReadMode, decode_png, read_file
            except ImportError:  # decoders removed from a future torchvision
                return None
            t = decode_png(read_file(str(path)), mode=ImageReadMode.UNCHANGED)
        if t.dtype != torch.uint16:
            return None
        return t.permute(1, 2, 0).contiguous().to(torch.int32).numpy().astype(np.uint16)
    if fmt == "TIFF" and importlib.util.find_spec("tifffile") is not None:
        import tifffile

        a = tifffile.imread(str(path), key=0)
        return a if a.dtype == np.uint16 and a.ndim == 3 else None
    return None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _composite_alpha(rgb: np.ndarray, alpha: np.ndarray, notes: list[str]) -> np.ndarray:
    """rgb [H,W,3], alpha [H,W] float64 in [0,1] -> rgb composited over white."""
    if alpha.min() >= 1.0:
        notes.append("opaque alpha channel dropped")
        return rgb
    notes.append("alpha channel composited over white")
    return rgb * alpha[..., None] + (1.0 - alpha[..., None])


def load_image(path) -> tuple[torch.Tensor, list[str]]:
    """Read an image file as float32 RGB ``[3, H, W]`` in [0, 1], plus notes on conversions.

    Grayscale (1, L, I;16, I, F), palette, CMYK/YCbCr/LAB/HSV and alpha images are converted
    to RGB and a note says so; alpha is composited over white (dropped if fully opaque);
    16-bit data are divided by 65535, 8-bit by 255; an EXIF orientation tag is applied; only
    the first frame of a multi-frame file is read.  Missing, unreadable or corrupt files raise
    :class:`ImageError` with a one-line message naming the path.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    notes: list[str] = []
    try:
        with Image.open(path) as im:
            fmt = im.format or ""
            if getattr(im, "n_frames", 1) > 1:
                notes.append(f"first of {im.n_frames} frames read")
            raw = _rawmode(im)
            if im.mode in ("RGB", "RGBA") and ";16" in raw:
                # Decode (at 8 bits) with Pillow first: it validates the stream, whereas
                # torchvision's libpng decoder crashes the process on some corrupt files.
                im.load()
                try:
                    a16 = _read_high_depth_colour(path, fmt)
                except Exception as e:  # torchvision raises RuntimeError, tifffile its own errors
                    raise ImageError(f"cannot read image {path}: corrupt or truncated 16-bit {fmt} ({_first_line(e)})") from None
                if a16 is not None:
                    if im.getexif().get(0x0112, 1) not in (1, None):
                        notes.append("EXIF orientation ignored (16-bit colour file)")
                    arr = a16.astype(np.float64) / 65535.0
                    notes.append(f"16-bit {'RGBA' if arr.shape[-1] == 4 else 'RGB'} scaled by 1/65535")
                    if arr.shape[-1] == 4:
                        arr = _composite_alpha(arr[..., :3], arr[..., 3], notes)
                    elif arr.shape[-1] != 3:
                        raise ImageError(f"cannot read image {path}: unsupported 16-bit layout with {arr.shape[-1]} channels")
                    return _to_tensor(arr), notes
                notes.append("16-bit colour image read at 8 bits (no 16-bit decoder installed for this format)")
            im.load()
            orient = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
            if orient not in (1, None):
                im = ImageOps.exif_transpose(im)
                notes.append(f"EXIF orientation {orient} applied")
            arr = _pil_to_rgb(im, notes, path, raw)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"cannot read image {path}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"cannot read image {path}: is a directory") from None
    except PermissionError:
        raise ImageError(f"cannot read image {path}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot read image {path}: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot read image {path}: corrupt or truncated ({_first_line(e)})") from None
    return _to_tensor(arr), notes


def _pil_to_rgb(im, notes: list[str], path: Path, rawmode: str = "") -> np.ndarray:
    """PIL image (any mode) -> float64 HWC RGB in [0, 1]; ``rawmode`` is the file's pixel
    layout (read before ``load()``), which tells 16-bit "I" data from 32-bit."""
    mode = im.mode
    if mode == "P" or mode == "PA":
        has_alpha = mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
        notes.append(f"palette image converted to {im.mode}")
        mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.float64) / 255.0
    if mode == "RGBA":
        a = np.asarray(im, dtype=np.float64) / 255.0
        return _composite_alpha(a[..., :3], a[..., 3], notes)
    if mode in ("L", "1", "LA", "La"):
        if mode == "La":
            im = im.convert("LA")
        a = np.asarray(im.convert("L") if mode == "1" else im, dtype=np.float64) / 255.0
        notes.append("1-bit image converted to RGB" if mode == "1" else "grayscale converted to RGB")
        if a.ndim == 3:  # LA
            return _composite_alpha(np.repeat(a[..., :1], 3, axis=-1), a[..., 1], notes)
        return np.repeat(a[..., None], 3, axis=-1)
    if mode.startswith("I;16") or mode == "I":
        if mode == "I" and "16" not in rawmode:
            raise ImageError(f"cannot read image {path}: 32-bit integer pixels (mode I, {rawmode or 'unknown layout'}) "
                             f"have no defined range")
        a = np.asarray(im).astype(np.float64)
        notes.append(f"16-bit grayscale ({mode}) scaled by 1/65535 and converted to RGB")
        return np.repeat((a / 65535.0)[..., None], 3, axis=-1)
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ImageError(f"cannot read image {path}: float values must lie in [0, 1], got [{np.nanmin(a):.4g}, {np.nanmax(a):.4g}]")
        notes.append("32-bit float grayscale converted to RGB")
        return np.repeat(a[..., None], 3, axis=-1)
    if mode in ("RGBa", "RGBX"):
        notes.append(f"{mode} converted to RGB")
        return _pil_to_rgb(im.convert("RGBA" if mode == "RGBa" else "RGB"), notes, path, rawmode)
    notes.append(f"{mode} converted to RGB")
    return np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).to(torch.float32)


# --------------------------------------------------------------------------- saving
def _check_image_tensor(img, name: str) -> torch.Tensor:
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(img).__name__}")
    if not img.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor in [0, 1], got {img.dtype}")
    if torch.isnan(img).any():
        raise ValueError(f"{name} contains NaN")
    if img.numel():
        lo, hi = img.min().item(), img.max().item()
        if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
            raise ValueError(f"{name} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    return img


def _quantise(img: torch.Tensor, rows: int = 256) -> np.ndarray:
    """uint8 [H, W, 3] of ``round(255 * img)`` ([3, H, W] in range), ``rows`` rows at a time
    so that a large image needs no float64 copy of itself."""
    _, H, W = img.shape
    arr = np.empty((H, W, 3), dtype=np.uint8)
    for r in range(0, H, rows):
        q = torch.round(img[:, r:r + rows].detach().to(torch.float64).cpu() * 255.0).clamp_(0, 255)  # clamp: no-op after the range check
        arr[r:r + rows] = q.to(torch.uint8).permute(1, 2, 0).numpy()
    return arr


def save_image(img: torch.Tensor, path, *, make_dirs: bool = False, quality: int = 95, overwrite: bool = True) -> Path:
    """Write ``img`` ([3,H,W] or [1,3,H,W] float in [0,1]) as an 8-bit RGB file, atomically.

    Values are quantised as ``round(255 * x)`` (values up to 1e-3 outside [0, 1] round into
    range; anything further out is an error).  The format follows the suffix (.png, .jpg,
    .jpeg, .bmp, .tif, .webp, ...; JPEG/WebP use ``quality``).  ``overwrite=False`` refuses to
    replace an existing file (:class:`ImageError`).  Returns the path written.
    """
    from PIL import Image

    path = Path(path)
    _check_image_tensor(img, "img")
    if img.dim() == 4 and img.shape[0] == 1:
        img = img[0]
    if img.dim() != 3 or img.shape[0] != 3:
        raise ValueError(f"img must have shape [3, H, W] or [1, 3, H, W], got {tuple(img.shape)}")
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ImageError(f"cannot write {path}: unknown image suffix {path.suffix!r} (use .png or .jpg)")
    pil = Image.fromarray(_quantise(img))  # uint8 [H, W, 3] -> mode RGB
    kwargs = {"quality": int(quality)} if fmt in ("JPEG", "WEBP") else {}
    try:
        with atomic_write(path, make_dirs=make_dirs, overwrite=overwrite) as f:
            pil.save(f, format=fmt, **kwargs)
    except ImageError:
        raise
    except FileExistsError:
        raise ImageError(f"cannot write {path}: the file exists (not replaced)") from None
    except OSError as e:
        raise ImageError(f"cannot write {path}: {e}") from None
    return path


# --------------------------------------------------------------------------- resampling
def _check_scale(scale) -> int:
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    return scale


def _as_4d(img: torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(img).__name__}")
    if img.dim() == 3:
        return img.unsqueeze(0), True
    if img.dim() == 4:
        return img, False
    raise ValueError(f"{name} must have shape [C, H, W] or [B, C, H, W], got {tuple(img.shape)}")


def bicubic_downscale(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """LR image of ``hr`` ([C,H,W] or [B,C,H,W] float in [0,1]): antialiased bicubic
    downsampling by the integer ``scale`` (torch's ``antialias=True`` bicubic, close to MATLAB
    ``imresize``), clamped to [0, 1].  H and W must be multiples of ``scale`` (use
    :func:`crop_to_multiple`)."""
    scale = _check_scale(scale)
    _check_image_tensor(hr, "hr")
    x, squeeze = _as_4d(hr, "hr")
    H, W = x.shape[-2:]
    if H % scale or W % scale:
        raise ValueError(f"hr size {H}x{W} is not a multiple of scale={scale}; crop it with crop_to_multiple(hr, {scale})")
    y = F.interpolate(x, size=(H // scale, W // scale), mode="bicubic", antialias=True, align_corners=False)
    y = y.clamp(0, 1)
    return y[0] if squeeze else y


def bicubic_upscale(lr: torch.Tensor, scale: int, *, clamp: bool = True) -> torch.Tensor:
    """Bicubic upsampling of ``lr`` ([C,H,W] or [B,C,H,W] float in [0,1]) by the integer
    ``scale`` (the x_up the models condition on).  Bicubic overshoots near edges; the result is
    clamped to [0, 1] unless ``clamp=False`` (as an 8-bit resized image would be)."""
    scale = _check_scale(scale)
    _check_image_tensor(lr, "lr")
    x, squeeze = _as_4d(lr, "lr")
    H, W = x.shape[-2:]
    y = F.interpolate(x, size=(H * scale, W * scale), mode="bicubic", align_corners=False)
    if clamp:
        y = y.clamp(0, 1)
    return y[0] if squeeze else y


def crop_to_multiple(img: torch.Tensor, multiple: int) -> torch.Tensor:
    """Crop the bottom/right of ``img`` [..., H, W] so H and W are multiples of ``multiple``
    (the SR "modcrop")."""
    multiple = _check_scale(multiple)
    H, W = img.shape[-2:]
    h, w = H - H % multiple, W - W % multiple
    if h == 0 or w == 0:
        raise ValueError(f"img size {H}x{W} is smaller than multiple={multiple}")
    return img[..., :h, :w]


def pad_to_multiple(img: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad the bottom/right of ``img`` ([C,H,W] or [B,C,H,W]) to multiples of ``multiple``.

    Reflect padding, or replicate padding when the image is too small to reflect (a pad of at
    least the image size).  Returns ``(padded, (H, W))``; :func:`unpad` undoes it.
    """
    multiple = _check_scale(multiple)
    x, squeeze = _as_4d(img, "img")
    H, W = x.shape[-2:]
    ph, pw = (-H) % multiple, (-W) % multiple
    if ph or pw:
        mode = "reflect" if ph < H and pw < W else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return (x[0] if squeeze else x), (H, W)


def unpad(img: torch.Tensor, size) -> torch.Tensor:
    """Undo :func:`pad_to_multiple`: crop [..., H', W'] back to ``size = (H, W)``."""
    h, w = (int(s) for s in size)
    if h > img.shape[-2] or w > img.shape[-1]:
        raise ValueError(f"size {h}x{w} is larger than img {img.shape[-2]}x{img.shape[-1]}")
    return img[..., :h, :w]


# --------------------------------------------------------------------------- bundled images
# Photographs that ship inside installed wheels (no download).  Synthetic images (logos,
# checkerboards, text pages) are left out: they say little about SR quality.
_SKIMAGE_FILES = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "camera": "camera.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "motorcycle_left": "motorcycle_left.png",
    "motorcycle_right": "motorcycle_right.png",
    "retina": "retina.jpg",
    "coins": "coins.png",
    "moon": "moon.png",
    "brick": "brick.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
}
_MATPLOTLIB_FILES = {"grace_hopper": "grace_hopper.jpg"}
_SKLEARN_FILES = {"china": "china.jpg", "flower": "flower.jpg"}
_LFW_FACES = 100  # lfw_subset.npy: the first 100 of 200 crops are faces, the rest background


def _package_dir(name: str) -> Path | None:
    # find_spec does not import the package (importing sklearn/matplotlib costs seconds).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def bundled_image_paths() -> dict[str, Path]:
    """Name -> file of every bundled photograph present in this environment: scikit-image's
    data (astronaut, chelsea, coffee, rocket, camera, hubble_deep_field, ...), matplotlib's
    sample data (grace_hopper) and, if installed, scikit-learn's sample images (china,
    flower).  Only files that exist are listed."""
    out: dict[str, Path] = {}
    sources = [("skimage", Path("data"), _SKIMAGE_FILES), ("matplotlib", Path("mpl-data/sample_data"), _MATPLOTLIB_FILES),
               ("sklearn", Path("datasets/images"), _SKLEARN_FILES)]
    for pkg, sub, files in sources:
        root = _package_dir(pkg)
        if root is None:
            continue
        for name, fname in files.items():
            p = root / sub / fname
            if p.is_file():
                out[name] = p
    return out


def _load_rgb(path: Path) -> torch.Tensor:
    return load_image(path)[0]


def bundled_images() -> dict[str, Callable[[], torch.Tensor]]:
    """Name -> zero-argument loader returning float32 RGB ``[3, H, W]`` in [0, 1] (grayscale
    images such as ``camera`` are replicated to three channels).  See
    :func:`bundled_image_paths`; the tiny LFW faces are in :func:`bundled_faces`."""
    return {name: functools.partial(_load_rgb, p) for name, p in bundled_image_paths().items()}


@functools.lru_cache(maxsize=1)
def _lfw_array() -> np.ndarray | None:
    root = _package_dir("skimage")
    p = None if root is None else root / "data" / "lfw_subset.npy"
    if p is None or not p.is_file():
        return None
    return np.load(p)


def _lfw_face(i: int) -> torch.Tensor:
    a = _lfw_array()[i].astype(np.float64)  # float64 in [0, 1], 25x25 grayscale
    return _to_tensor(np.repeat(a[..., None], 3, axis=-1))


def bundled_faces() -> dict[str, Callable[[], torch.Tensor]]:
    """The 100 LFW face crops shipped with scikit-image (25x25 grayscale, as RGB [3,25,25]
    float32 in [0, 1]): names ``lfw_000`` ... ``lfw_099``.  Empty if scikit-image is absent."""
    a = _lfw_array()
    if a is None:
        return {}
    n = min(_LFW_FACES, a.shape[0])
    return {f"lfw_{i:03d}": functools.partial(_lfw_face, i) for i in range(n)}
