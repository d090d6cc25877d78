"""The run folder of ``yoda-sparse train``: its checkpoint scheme and the RNG states saved in it.

Output folder ``OUT`` (only rank 0 writes)::

    OUT/ckpt-000123/checkpoint.safetensors   model + EMA + model config + schedule/YODA settings
    OUT/ckpt-000123/train-state.pt           optimizer, step, every rank's RNG states, data position, config
    OUT/ckpt-000123/complete.json            written last: step and file sizes
    OUT/latest                               one line, "ckpt-000123": the checkpoint to resume from
    OUT/checkpoint-latest.safetensors        the newest model file (a hard link or copy), for eval/upscale
    OUT/log.jsonl  OUT/config.json

Checkpoint scheme (a kill at any moment leaves a consistent pair to resume from):
1. both files are written into a fresh hidden folder ``OUT/.ckpt-000123.tmp-PID`` (each file
   itself atomically: temp file, flush, fsync, ``os.replace``), then ``complete.json``;
2. the folder is renamed to ``OUT/ckpt-000123`` (one atomic rename: the pair appears whole);
3. ``OUT/latest`` is replaced atomically (temp file + ``os.replace``) to name it;
4. ``checkpoint-latest.safetensors`` is replaced atomically, then all but the newest
   ``keep_checkpoints`` folders are deleted (never the one ``latest`` names).
Resume reads only ``latest`` and the folder it names.  A kill before step 3 leaves ``latest``
on the previous folder; leftover temp folders and folders newer than ``latest`` are removed when
a run resumes.  If ``latest`` is missing or names an incomplete folder (not produced by this
code), the newest complete folder is used, with a warning.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .atomic import atomic_write, fsync_dir

__all__ = ["find_latest_checkpoint", "write_checkpoint", "write_atomic", "clean_leftovers", "rng_state", "set_rng_state"]

STATE_FORMAT = 1
LATEST = "latest"
MODEL_FILE = "checkpoint.safetensors"
STATE_FILE = "train-state.pt"
DONE_FILE = "complete.json"
LATEST_MODEL = "checkpoint-latest.safetensors"
DONE_FILE = "complete.json"
_CKPT_RE = re.compile(r"^ckpt-(\d{6,})$")


# ------------------------------------------------------------------------------ RNG states
def rng_state(device: torch.device) -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict, device: torch.device) -> None:
    random.setstate(_as_tuple(st["python"]))
    n = st["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(st["torch"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ------------------------------------------------------------------------------ checkpoints
def _ckpt_name(step: int) -> str:
    return f"ckpt-{step:06d}"


def _ckpt_step(path: Path) -> int | None:
    m = _CKPT_RE.match(path.name)
    return int(m.group(1)) if m else None


def _is_complete(folder: Path) -> bool:
    done = folder / DONE_FILE
    if not done.is_file():
        return False
    try:
        info = json.loads(done.read_text())
        return all((folder / name).is_file() and (folder / name).stat().st_size == size
                   for name, size in info["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _complete_folders(out: Path) -> list[tuple[int, Path]]:
    found = []
    for p in out.iterdir() if out.is_dir() else ():
        s = _ckpt_step(p)
        if s is not None and p.is_dir() and _is_complete(p):
            found.append((s, p))
    return sorted(found)


def find_latest_checkpoint(out_dir) -> Path | None:
    """The checkpoint folder a resume of ``out_dir`` starts from (see the module docstring),
    or None when there is none."""
    out = Path(out_dir)
    pointer = out / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        target = out / name
        if _CKPT_RE.match(name) and target.is_dir() and _is_complete(target):
            return target
        warnings.warn(f"{pointer} names {name!r}, which is not a complete checkpoint folder; "
                      f"falling back to the newest complete one", RuntimeWarning, stacklevel=2)
    folders = _complete_folders(out)
    return folders[-1][1] if folders else None


def write_atomic(path: Path, data: bytes | Callable) -> None:
    with atomic_write(path) as f:
        if callable(data):
            data(f)
        else:
            f.write(data)


def write_checkpoint(out: Path, step: int, *, diffusion, model_config, ema: nn.Module, extra: dict,
                      state: dict, keep: int) -> Path:
    """Write the checkpoint pair of ``step`` following the module docstring's scheme."""
    name = _ckpt_name(step)
    tmp = out / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    diffusion.save(tmp / MODEL_FILE, model_config, ema=ema, extra=extra)
    write_atomic(tmp / STATE_FILE, lambda f: torch.save(state, f))
    sizes = {n: (tmp / n).stat().st_size for n in (MODEL_FILE, STATE_FILE)}
    write_atomic(tmp / DONE_FILE, json.dumps({"step": step, "files": sizes}).encode())
    fsync_dir(tmp)
    final = out / name
    if final.exists():  # left by a killed run after a resume from an older checkpoint
        stale = out / f".{name}.stale-{os.getpid()}"
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(out)
    write_atomic(out / LATEST, (name + "\n").encode())
    _publish_latest_model(final / MODEL_FILE, out / LATEST_MODEL)
    for s, p in _complete_folders(out)[:-keep]:
        if s < step:
            shutil.rmtree(p, ignore_errors=True)
    return final


def _publish_latest_model(src: Path, dst: Path) -> None:
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:  # no hard links on this filesystem
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)
    fsync_dir(dst.parent)


def clean_leftovers(out: Path, latest: Path | None, log) -> None:
    """Remove temp folders/files of killed runs and checkpoints newer than ``latest``."""
    for p in out.iterdir():
        if p.name.startswith(".ckpt-") and (".tmp-" in p.name or ".stale-" in p.name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
            p.unlink(missing_ok=True)
    if latest is not None:
        cut = _ckpt_step(latest)
        for p in out.iterdir():
            s = _ckpt_step(p)
            if s is not None and s > cut and p.is_dir():
                log(f"removing {p.name}: newer than {LATEST} ({latest.name}), left by a run killed while checkpointing")
                shutil.rmtree(p, ignore_errors=True)
