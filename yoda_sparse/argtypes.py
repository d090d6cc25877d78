"""argparse value types that refuse out-of-range values (argparse names the flag in the error,
e.g. ``argument --steps: must be a positive integer, got '0'``), and the command line's checks
of folders and devices, which name the option they check."""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import tempfile
from pathlib import Path

__all__ = ["positive_int", "non_negative_int", "open_unit_float", "check_output_folder", "check_device"]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def open_unit_float(text: str) -> float:
    """A number strictly between 0 and 1 (eq. 9's lower bound)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text!r}") from None
    if not (math.isfinite(value) and 0 < value < 1):
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text!r}")
    return value


def check_output_folder(path, *, option: str = "--out", make: bool = True, make_hint: str | None = None) -> Path:
    """The output folder, created (with ``make``) and shown to be writable by creating and
    removing a file in it, so that a read-only folder fails before any work is done."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{option} {out} is not a folder")
    if not out.is_dir():
        if not make:
            raise ValueError(f"{option} folder {out} does not exist" + (f" ({make_hint})" if make_hint else ""))
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"{option} folder {out} cannot be created: {e.strerror or e}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
    except OSError as e:
        raise ValueError(f"{option} folder {out} is not writable: {e.strerror or e}") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return out


def check_device(text: str, *, option: str = "--device"):
    """``torch.device(text)``, refused unless that device exists here."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{option} must name a device such as cpu or cuda:0, got {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {text}: no CUDA device is available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {text}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"{option} must be cpu or cuda[:N], got {text!r}")
    return device
