"""Atomic file writes: a temp file in the destination folder, flushed and fsynced, then
renamed over the destination (``os.replace``), then the folder fsynced so the rename is
durable.  A failure at any point leaves the old file untouched and removes the temp file.
Temp files are created with mode 0o666 filtered by the umask (like a plain ``open``), not
mkstemp's 0600; the mode is set again once the writer is done, since a writer that replaces
the file by name (as safetensors' ``save_file`` does) creates it anew.

``overwrite=False`` publishes the file only if ``path`` does not exist (a hard link, which
fails on an existing name, then the temp name is removed): :class:`FileExistsError` otherwise,
even when another process creates ``path`` meanwhile.
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


def _umask() -> int:
    """The process umask, read from /proc where it can be (os.umask can only be read by
    setting it, which would change it for other threads for a moment)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} exists (not replaced)") from None
    except OSError:  # no hard links on this filesystem: check, then rename (a narrow race)
        if os.path.lexists(path):
            raise FileExistsError(f"{path} exists (not replaced)") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _check_parent(path: Path, make_dirs: bool) -> Path:
    parent = path.parent
    if not parent.is_dir():
        if not make_dirs:
            raise FileNotFoundError(f"cannot write {path}: folder {parent} does not exist")
        parent.mkdir(parents=True, exist_ok=True)
    return parent


@contextlib.contextmanager
def atomic_path(path, *, make_dirs: bool = False, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp path for a writer that takes a file name (e.g. safetensors' save_file);
    once the block ends without error the file is fsynced and renamed to ``path`` (with
    ``overwrite=False``: published only if ``path`` does not exist, see the module docstring)."""
    path = Path(path)
    parent = _check_parent(path, make_dirs)
    tmp = parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        _publish(tmp, path, overwrite)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(parent)


@contextlib.contextmanager
def atomic_write(path, *, make_dirs: bool = False, mode: str = "wb", overwrite: bool = True) -> Iterator:
    """Yield a file object (binary by default, ``mode="w"`` for text) whose contents replace
    ``path`` atomically when the block ends without error (``overwrite=False``: see
    :func:`atomic_path`)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    with atomic_path(path, make_dirs=make_dirs, overwrite=overwrite) as tmp:
        with open(tmp, mode) as f:
            yield f
            f.flush()
