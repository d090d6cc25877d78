"""Atomic file writes: a temp file in the destination folder, flushed and fsynced, then
renamed over the destination (``os.replace``), then the folder fsynced so the rename is
durable.  A failure at any point leaves the old file untouched and removes the temp file.
Temp files are created with mode 0o666 filtered by the umask (like a plain ``open``), not
mkstemp's 0600.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "atomic_write", "fsync_dir"]


def fsync_dir(folder) -> None:
    """Make renames inside ``folder`` durable (a no-op where the platform can't)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_parent(path: Path, make_dirs: bool) -> Path:
    parent = path.parent
    if not parent.is_dir():
        if not make_dirs:
            raise FileNotFoundError(f"cannot write {path}: folder {parent} does not exist")
        parent.mkdir(parents=True, exist_ok=True)
    return parent


@contextlib.contextmanager
def atomic_path(path, *, make_dirs: bool = False) -> Iterator[Path]:
    """Yield a temp path for a writer that takes a file name (e.g. safetensors' save_file);
    once the block ends without error the file is fsynced and renamed to ``path``."""
    path = Path(path)
    parent = _check_parent(path, make_dirs)
    tmp = parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(parent)


@contextlib.contextmanager
def atomic_write(path, *, make_dirs: bool = False, mode: str = "wb") -> Iterator:
    """Yield a file object (binary by default, ``mode="w"`` for text) whose contents replace
    ``path`` atomically when the block ends without error."""
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    with atomic_path(path, make_dirs=make_dirs) as tmp:
        with open(tmp, mode) as f:
            yield f
            f.flush()
