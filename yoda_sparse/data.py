"""Training pairs from image folders: random HR crops, their bicubic LR, and a deterministic order.

Every random choice is a pure function of ``(seed, epoch, index)`` (crops and flips) or of
``(seed, epoch)`` (the order), each drawn from its own freshly seeded ``torch.Generator``.
Nothing depends on the global RNGs, on how many DataLoader workers there are or on how many
samples were drawn before: the sample stream of a run is fixed by its seed alone, so a resumed
run (or a DDP rank, or a worker process) can recompute any part of it from a step number.

* :class:`ImageFolderPairs` -- the dataset: ``pairs.sample(index, epoch) -> dict(hr, lr)``.
* :class:`SampleStream` -- the order: an endless stream of ``(epoch, index)`` keys, each epoch a
  seeded permutation, sharded across DDP ranks like ``DistributedSampler``;
  ``stream.batch_keys(step, batch_size)`` is the batch a rank trains on at ``step``.
* :func:`attention_for_batch` -- YODA's attention maps for a batch, computed in the training
  loop (batched, on the training device) from the bicubic-upsampled LR crop, the same input
  the maps get at evaluation time.

Images smaller than the crop (short side < ``crop_size``) are an error that names the file
(raised when the dataset is built), not skipped: a silently smaller dataset is harder to notice
than a message.  Crop them out of the folder or lower ``crop_size``.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

__all__ = [
    "IMAGE_SUFFIXES",
    "find_images",
    "mix_seed",
    "ImageFolderPairs",
    "SampleStream",
    "collate_pairs",
    "batch_iterator",
    "attention_for_batch",
]

#: File suffixes (lower case) taken as images when a folder is searched.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def mix_seed(*parts) -> int:
    """A 63-bit seed from any printable parts (stable across processes and Python runs,
    unlike ``hash``)."""
    text = ":".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def _generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*parts))


def find_images(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Image files under ``paths`` (folders searched recursively, files taken as given).

    Folder contents are sorted by their path relative to the folder, so the list (and with it
    every seeded order) is the same on every machine.  Hidden files and folders (name starting
    with ".") are skipped.  Raises FileNotFoundError for a missing path and ValueError when no
    image is found.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ValueError("data: expected at least one image folder or file, got an empty list")
    found: list[Path] = []
    for item in paths:
        p = Path(item)
        if p.is_dir():
            inside = []
            for q in p.rglob("*"):
                rel = q.relative_to(p)
                if any(part.startswith(".") for part in rel.parts):
                    continue
                if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES:
                    inside.append((rel.as_posix(), q))
            found += [q for _, q in sorted(inside)]
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"data: {str(p)!r} does not exist")
    if not found:
        raise ValueError(f"data: no image files ({', '.join(IMAGE_SUFFIXES)}) found in "
                         f"{[str(p) for p in paths]}")
    return found


def _check_positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return v


class ImageFolderPairs(torch.utils.data.Dataset):
    """HR crops and their bicubic LR images from image files.

    Args:
        root: a folder (searched recursively for png/jpg/jpeg/bmp/tif/tiff/webp), an image
            file, or a list of either (see :func:`find_images`).
        scale: SR factor; LR crops are ``crop_size // scale`` pixels.
        crop_size: side of the square HR crop; must be a multiple of ``scale``.  Every image's
            short side must be at least ``crop_size`` (else ValueError naming the file).
        augment: random horizontal flips (probability 1/2); without it crops are still random.
        rotate90: also rotate by a random multiple of 90 degrees (only with ``augment``).
        cache: keep every decoded image in memory (loaded once, when the dataset is built);
            without it each sample decodes its file again.
        seed: base seed of the crop/flip choices (see :meth:`sample`).

    ``pairs.sample(index, epoch)`` (also ``pairs[(epoch, index)]``, and ``pairs[index]`` for the
    epoch set with :meth:`set_epoch`) returns ``{"hr": [3, crop, crop], "lr": [3, crop/s,
    crop/s]}``, float32 in [0, 1].  LR = :func:`yoda_sparse.imageio.bicubic_downscale` of the
    augmented HR crop.  No attention map: see :func:`attention_for_batch`.
    """

    def __init__(self, root, scale: int, crop_size: int, *, augment: bool = True, rotate90: bool = False,
                 cache: bool = True, seed: int = 0):
        from .imageio import load_image

        self.scale = _check_positive_int("scale", scale)
        self.crop_size = _check_positive_int("crop_size", crop_size)
        if crop_size % scale:
            raise ValueError(f"crop_size must be a multiple of scale={scale}, got {crop_size} "
                             f"(e.g. {max(scale, crop_size - crop_size % scale)})")
        self.augment = bool(augment)
        self.rotate90 = bool(rotate90)
        self.cache = bool(cache)
        self.seed = int(seed)
        self.epoch = 0
        self.paths = find_images(root)
        self._images: list[torch.Tensor] | None = [] if self.cache else None
        self.sizes: list[tuple[int, int]] = []
        for p in self.paths:
            if self.cache:
                img, _ = load_image(p)  # ImageError (a ValueError) names the file
                self._images.append(img)
                h, w = img.shape[-2:]
            else:
                h, w = self._header_size(p, load_image)
            if min(h, w) < crop_size:
                raise ValueError(f"data: image {str(p)!r} is {w}x{h}, smaller than crop_size={crop_size}; "
                                 f"remove it or use a crop of at most {min(h, w)}")
            self.sizes.append((int(h), int(w)))

    @staticmethod
    def _header_size(path: Path, load_image) -> tuple[int, int]:
        # The header is enough to know the size (EXIF rotation swaps h and w, which does not
        # matter for a square crop); a file Pillow can't open gets load_image's full message.
        from PIL import Image

        try:
            with Image.open(path) as im:
                w, h = im.size
            return h, w
        except Exception:
            img, _ = load_image(path)  # raises ImageError naming the file if unreadable
            return tuple(img.shape[-2:])

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """The epoch used by ``pairs[index]`` (keys ``(epoch, index)`` carry their own)."""
        self.epoch = int(epoch)

    def image(self, index: int) -> torch.Tensor:
        """The whole decoded image ``index`` as float32 [3, H, W] in [0, 1]."""
        if self._images is not None:
            return self._images[index]
        from .imageio import load_image

        return load_image(self.paths[index])[0]

    def __getitem__(self, key):
        if isinstance(key, tuple):
            epoch, index = key
            return self.sample(int(index), int(epoch))
        return self.sample(int(key), self.epoch)

    def sample(self, index: int, epoch: int) -> dict:
        """The training pair for image ``index`` in ``epoch``: a pure function of
        ``(seed, epoch, index)``."""
        from .imageio import bicubic_downscale

        if not 0 <= index < len(self.paths):
            raise IndexError(f"index {index} out of range for {len(self.paths)} images")
        g = _generator("crop", self.seed, epoch, index)
        img = self.image(index)
        h, w = img.shape[-2:]  # the decoded size (EXIF rotation may swap the header's)
        c = self.crop_size
        top = int(torch.randint(0, h - c + 1, (1,), generator=g))
        left = int(torch.randint(0, w - c + 1, (1,), generator=g))
        flip = bool(torch.randint(0, 2, (1,), generator=g))
        turns = int(torch.randint(0, 4, (1,), generator=g))
        hr = img[:, top:top + c, left:left + c]
        if self.augment:
            if flip:
                hr = hr.flip(-1)
            if self.rotate90 and turns:
                hr = torch.rot90(hr, turns, dims=(-2, -1))
        hr = hr.contiguous()
        return {"hr": hr, "lr": bicubic_downscale(hr, self.scale).contiguous()}


def collate_pairs(items: Iterable[dict]) -> dict:
    """Stack a list of ``{"hr", "lr"[, "attn"]}`` samples into a batch dict."""
    items = list(items)
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class SampleStream:
    """The endless, deterministic sample order of one rank: ``(epoch, index)`` keys.

    Epoch ``e`` is a permutation of ``range(num_items)`` drawn from ``(seed, e)`` (identity
    order when ``shuffle=False``), padded by wrapping around to a multiple of ``world_size``
    and dealt out round-robin, so rank ``r`` gets ``perm[r::world_size]`` (as
    ``torch.utils.data.DistributedSampler`` does).  A rank's stream is its epoch-0 share, then
    its epoch-1 share, ...; batches run on across epoch boundaries, so every step has a full
    batch however small the dataset.  Step ``s`` with per-rank batch ``B`` takes stream
    positions ``[s*B, (s+1)*B)``; hence the data position of a run is its step number.
    """

    def __init__(self, num_items: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.num_items = _check_positive_int("num_items", num_items)
        self.world_size = _check_positive_int("world_size", world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank!r}")
        self.rank = int(rank)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.per_rank = math.ceil(num_items / world_size)
        self._cached: tuple[int, list[int]] | None = None

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's indices in ``epoch`` (``per_rank`` of them)."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        n = self.num_items
        if self.shuffle:
            order = torch.randperm(n, generator=_generator("order", self.seed, epoch)).tolist()
        else:
            order = list(range(n))
        total = self.per_rank * self.world_size
        padded = (order * math.ceil(total / n))[:total]
        mine = padded[self.rank::self.world_size]
        self._cached = (epoch, mine)
        return mine

    def position(self, step: int, batch_size: int) -> dict:
        """Where the stream stands before ``step``: ``{"epoch", "offset", "consumed"}``."""
        consumed = int(step) * int(batch_size)
        return {"epoch": consumed // self.per_rank, "offset": consumed % self.per_rank, "consumed": consumed}

    def batch_keys(self, step: int, batch_size: int) -> list[tuple[int, int]]:
        """The ``(epoch, index)`` keys of this rank's batch at ``step``."""
        keys = []
        for p in range(step * batch_size, (step + 1) * batch_size):
            epoch, offset = divmod(p, self.per_rank)
            keys.append((epoch, self.epoch_indices(epoch)[offset]))
        return keys

    def batches(self, start_step: int, batch_size: int) -> Iterator[list[tuple[int, int]]]:
        """Endless batches of keys from ``start_step`` on (a DataLoader ``batch_sampler``)."""
        step = int(start_step)
        while True:
            yield self.batch_keys(step, batch_size)
            step += 1


class _KeyBatches(torch.utils.data.Sampler):
    """``SampleStream.batches`` as a Sampler for ``DataLoader(batch_sampler=...)``."""

    def __init__(self, stream: SampleStream, start_step: int, batch_size: int):
        self.stream, self.start_step, self.batch_size = stream, int(start_step), int(batch_size)

    def __iter__(self):
        return self.stream.batches(self.start_step, self.batch_size)


def batch_iterator(pairs: ImageFolderPairs, stream: SampleStream, start_step: int, batch_size: int, *,
                   num_workers: int = 0, pin_memory: bool = False) -> Iterator[dict]:
    """Endless batches ``{"hr": [B,3,H,W], "lr": [B,3,h,w]}`` from ``start_step`` on.

    With ``num_workers > 0`` a DataLoader decodes in worker processes; the batches are the same
    as with ``num_workers=0`` because each sample depends only on its key.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers!r}")
    if num_workers == 0:
        def gen():
            for keys in stream.batches(start_step, batch_size):
                yield collate_pairs(pairs[k] for k in keys)
        return gen()
    loader = torch.utils.data.DataLoader(
        pairs, batch_sampler=_KeyBatches(stream, start_step, batch_size), num_workers=num_workers,
        collate_fn=collate_pairs, pin_memory=pin_memory, persistent_workers=False)
    return iter(loader)


def attention_for_batch(extractor: Callable[[torch.Tensor], torch.Tensor], lr: torch.Tensor, scale: int) -> torch.Tensor:
    """YODA attention maps ``[B,1,H,W]`` in [0, 1] for a batch of LR crops ``[B,3,h,w]``.

    The extractor sees the bicubic-upsampled LR crop
    (:func:`yoda_sparse.imageio.bicubic_upscale`, clamped to [0, 1]) -- never the HR crop, which
    does not exist at sampling time -- exactly as evaluation and sampling compute it.
    """
    from .imageio import bicubic_upscale

    with torch.no_grad():
        return extractor(bicubic_upscale(lr, scale)).float()
