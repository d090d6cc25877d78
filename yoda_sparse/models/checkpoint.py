"""Self-describing safetensors checkpoints.

File layout: model tensors under their ``state_dict`` names, EMA tensors (optional) under
``ema.<name>``. The safetensors header metadata (str -> str) holds JSON strings:

    format_version  "1"
    config          json(config.to_dict())      -- rebuilds the model with build_model
    extra           json(extra dict)            -- schedule and YODA settings of the training run
    has_ema         "true" | "false"

Writes are atomic: a temp file in the target folder, flushed and fsync'ed, then os.replace.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_path
from .configs import ModelConfig, build_model, config_from_dict

__all__ = ["FORMAT_VERSION", "save_checkpoint", "load_checkpoint", "read_checkpoint_metadata"]

FORMAT_VERSION = 1
EMA_PREFIX = "ema."
_FAMILY_NAMES = {"sr3": "SR3", "srdiff": "SRDiff"}


def _state_of(obj: nn.Module | Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        state = obj.state_dict()
    elif isinstance(obj, Mapping):
        state = dict(obj)
    else:
        raise TypeError(f"{what}: expected an nn.Module or a state dict, got {type(obj).__name__}")
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{what}: entry {k!r} is a {type(v).__name__}, not a tensor")
        if v.device.type == "meta":
            raise ValueError(f"{what}: entry {k!r} is on the meta device and has no data to save")
        # safetensors refuses shared or non-contiguous storage: give each tensor its own copy.
        out[k] = v.detach().to("cpu").contiguous().clone()
    return out


def save_checkpoint(path: str | os.PathLike, model: nn.Module, config: ModelConfig,
                    extra: dict[str, Any] | None = None,
                    ema: nn.Module | Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write ``model`` (and ``ema`` weights under ``ema.``) with ``config`` and ``extra`` to ``path``.

    Args:
        path: destination file (conventionally ``*.safetensors``); its folder must exist.
        model: the network whose ``state_dict`` is saved.
        config: the SR3Config / SRDiffConfig that builds ``model``.
        extra: JSON-serializable dict carried verbatim (schedule, YODA attention method, lower
            bound, lr_branch reading, whether the model sees M(t)*z_t, ...).
        ema: an EMA copy of the model (module or state dict with the same keys), or None.
    Returns:
        the path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if not hasattr(config, "to_dict") or getattr(config, "family", None) not in _FAMILY_NAMES:
        raise TypeError(f"config: expected an SR3Config or SRDiffConfig, got {type(config).__name__}")
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise TypeError(f"extra: expected a dict or None, got {type(extra).__name__}")
    try:
        extra_json = json.dumps(extra, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra: must be JSON-serializable: {e}") from None
    tensors = _state_of(model, "model")
    clash = sorted(k for k in tensors if k.startswith(EMA_PREFIX))
    if clash and ema is not None:
        raise ValueError(f"model: parameter names {clash[:5]} collide with the EMA prefix {EMA_PREFIX!r}")
    if ema is not None:
        ema_state = _state_of(ema, "ema")
        if set(ema_state) != set(tensors):
            diff = sorted(set(ema_state) ^ set(tensors))
            raise ValueError(f"ema: keys differ from the model's: {diff[:5]}")
        tensors.update({EMA_PREFIX + k: v for k, v in ema_state.items()})
    metadata = {
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "extra": extra_json,
        "has_ema": "true" if ema is not None else "false",
    }
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


def _read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"path: checkpoint {str(path)!r} does not exist or is not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own SafetensorError on a bad header
        raise ValueError(f"path: {str(path)!r} is not a readable safetensors checkpoint ({e})") from None
    for key in ("format_version", "config"):
        if key not in meta:
            raise ValueError(f"path: {str(path)!r} is a safetensors file without yoda-sparse "
                             f"metadata (missing {key!r})")
    if meta["format_version"] != str(FORMAT_VERSION):
        raise ValueError(f"path: {str(path)!r} has checkpoint format_version {meta['format_version']!r}; "
                         f"this version reads {FORMAT_VERSION}")
    return meta


def read_checkpoint_metadata(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """``(config, extra)`` of a checkpoint, without reading its tensors."""
    path = Path(path)
    meta = _read_metadata(path)
    try:
        config = config_from_dict(json.loads(meta["config"]))
        extra = json.loads(meta.get("extra", "{}"))
    except (ValueError, TypeError) as e:
        raise ValueError(f"path: {str(path)!r} has an invalid config/extra in its metadata: {e}") from None
    return config, extra


def load_checkpoint(path: str | os.PathLike, expected_family: str | None = None,
                    map_location: str | torch.device = "cpu",
                    use_ema: bool = False) -> tuple[nn.Module, ModelConfig, dict[str, Any]]:
    """Rebuild the model stored at ``path`` and load its weights strictly.

    Args:
        path: file written by ``save_checkpoint``.
        expected_family: "sr3" / "srdiff" to refuse the other family, or None.
        map_location: device for the loaded model.
        use_ema: load the ``ema.`` weights instead of the raw ones (error if there are none).
    Returns:
        ``(model, config, extra)``; the model is in eval mode, in the stored floating dtype when
        all stored floating tensors share one.
    """
    from safetensors.torch import load_file

    if expected_family not in (None, *_FAMILY_NAMES):
        raise ValueError(f"expected_family: expected None, 'sr3' or 'srdiff', got {expected_family!r}")
    path = Path(path)
    config, extra = read_checkpoint_metadata(path)
    if expected_family is not None and config.family != expected_family:
        raise ValueError(f"path: {str(path)!r}: checkpoint is an {_FAMILY_NAMES[config.family]} model "
                         f"({config.name}), expected {expected_family}")
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:
        raise ValueError(f"path: {str(path)!r} is not a readable safetensors checkpoint ({e})") from None
    ema_keys = {k for k in tensors if k.startswith(EMA_PREFIX)}
    if use_ema:
        if not ema_keys:
            raise ValueError(f"use_ema: checkpoint {str(path)!r} holds no EMA weights")
        state = {k[len(EMA_PREFIX):]: v for k, v in tensors.items() if k in ema_keys}
    else:
        state = {k: v for k, v in tensors.items() if k not in ema_keys}
    model = build_model(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"path: {str(path)!r} does not match config {config.name!r}: "
                         f"{len(missing)} missing keys {missing[:5]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:5]}")
    bad = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items()
           if v.shape != expected[k].shape]
    if bad:
        raise ValueError(f"path: {str(path)!r}: tensor shapes differ from config {config.name!r} "
                         f"(name, stored, expected): {bad[:5]}")
    # Keep the stored precision: a bf16 checkpoint gives a bf16 model rather than a silent cast.
    float_dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(float_dtypes) == 1:
        model.to(float_dtypes.pop())
    model.load_state_dict(state, strict=True)
    model.to(map_location)
    model.eval()
    return model, config, extra
