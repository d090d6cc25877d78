"""Loading backbone weights: a local file, or the hub with a fast offline check.

Local files (``weights=/path``):

- ``.safetensors`` via ``safetensors.torch.load_file``; anything else (``.pth``, ``.pt``,
  ``.bin``) via ``torch.load(map_location="cpu", weights_only=True)``.
- Containers are unwrapped: a dict holding ``teacher`` (DINO's full training checkpoint; the
  teacher is what DINO evaluates), ``student``, ``state_dict``, ``model`` or ``model_ema``.
- Common prefixes are stripped: ``module.`` (DDP), ``backbone.`` (DINO's MultiCropWrapper),
  ``_orig_mod.`` (torch.compile), ``encoder.``.
- Keys of a classification / projection head the backbone does not have (``head.*`` of DINO's
  projection head, ``fc.*`` of a torchvision ResNet) are dropped.  Any other missing or
  unexpected key, or a shape mismatch, is a ValueError listing the first few offenders.

Hub (``weights=None, pretrained=True``): the local caches are looked at first (the Hugging Face
cache, then torch.hub's ``checkpoints/`` folder).  If the file is in neither, the hub is used
only when it can be reached: ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set, or a TCP connect
to the hub host that does not succeed within ``connect_timeout`` (1 s), raises
:class:`WeightsUnavailableError` at once instead of sitting through the hub client's retries.
"""
from __future__ import annotations

import os
import pickle
import socket
import threading
import time
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlparse

import torch
import torch.nn as nn

__all__ = [
    "WeightsUnavailableError",
    "load_state_dict_file",
    "clean_state_dict",
    "load_backbone_weights",
    "build_for_loading",
    "resolve_pretrained",
    "hub_offline_reasons",
]

_CONTAINER_KEYS = ("teacher", "student", "state_dict", "model", "model_ema")
_STRIP_PREFIXES = ("module.", "backbone.", "_orig_mod.", "encoder.")
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were requested but are neither cached nor downloadable."""


def load_state_dict_file(path) -> Dict[str, torch.Tensor]:
    """Read a state dict (``.safetensors``, ``.pth``, ``.pt``, ``.bin``) onto the CPU."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"weights must be an existing file, got {path!r} (not found)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return dict(load_file(path, device="cpu"))
        except Exception as e:  # safetensors raises its own SafetensorError on a bad header
            raise ValueError(f"weights file {path!r} is not a readable safetensors file ({_first_line(e)})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # not a pickle of tensors at all
            detail = str(e).split("WeightsUnpickler error:")[-1].strip()
            raise ValueError(f"weights file {path!r} is corrupt or not a torch.save file ({_first_line(detail)})") from None
        raise ValueError(
            f"weights file {path!r} holds more than tensors and can't be read with "
            f"weights_only=True (e.g. DINO's full training checkpoint stores argparse args); "
            f"extract the backbone state dict first, e.g. torch.save(ckpt['teacher'], 'backbone.pth'). "
            f"Detail: {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # e.g. a truncated zip archive
        raise ValueError(f"weights file {path!r} is corrupt or not a torch.save file ({_first_line(e)})") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"weights file {path!r} must hold a state dict, got {type(obj).__name__}")
    return _unwrap(obj, path)


def _first_line(e) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else type(e).__name__


def _unwrap(obj: Mapping, path: str) -> Dict[str, torch.Tensor]:
    for _ in range(3):  # e.g. {"model": {"state_dict": {...}}}
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        for key in _CONTAINER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        else:
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"weights file {path!r} holds no tensors at the top level or under "
                         f"any of {_CONTAINER_KEYS}; top-level keys: {list(obj)[:8]}")
    return tensors


def clean_state_dict(state_dict: Mapping[str, torch.Tensor],
                     prefixes: Sequence[str] = _STRIP_PREFIXES) -> Dict[str, torch.Tensor]:
    """Strip leading wrapper prefixes (repeatedly, e.g. ``module.backbone.``) from every key."""
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _few(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def build_for_loading(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build ``factory()`` on the meta device when every tensor of it will come from a state
    dict: random initialisation is skipped (timm's ViT init alone takes ~1.5 s on a CPU).
    Falls back to a normal build if the model can't be built on meta or has non-persistent
    buffers (which a state dict would not fill)."""
    try:
        with torch.device("meta"):
            model = factory()
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return factory()
    saved = set(model.state_dict())
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    if any(n not in saved for n in names):
        return factory()
    return model


def load_backbone_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                          source: str = "state_dict",
                          drop_prefixes: Sequence[str] = ("head.", "fc.")) -> None:
    """Load ``state_dict`` into ``model`` strictly, after cleaning prefixes and dropping the
    head keys the model does not have.  Raises ValueError on missing / unexpected keys or
    shape mismatches, naming a few of each and ``source``.  Tensors are loaded in the model's
    dtypes (e.g. a float16 file into a float32 model); a model on the meta device (see
    :func:`build_for_loading`) gets the file's tensors assigned."""
    sd = clean_state_dict(state_dict)
    own = model.state_dict()
    sd = {k: v for k, v in sd.items()
          if k in own or not any(k.startswith(p) for p in drop_prefixes)}
    missing = set(own) - set(sd)
    unexpected = set(sd) - set(own)
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_few(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches ({'; '.join(shapes[:3])})")
        raise ValueError(f"weights from {source} do not fit {type(model).__name__}: "
                         + "; ".join(parts))
    on_meta = any(t.is_meta for t in own.values())
    sd = {k: v.to(dtype=own[k].dtype, device="cpu" if on_meta else own[k].device).contiguous()
          for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=on_meta)
    if on_meta and any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        raise RuntimeError(f"{type(model).__name__} still has uninitialised (meta) tensors after "
                           f"loading {source}")


# ---------------------------------------------------------------------------------------------
# Hub
# ---------------------------------------------------------------------------------------------

def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hf_cache_dir() -> Optional[str]:
    # Read the environment at call time (huggingface_hub.constants froze it at import).
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None  # huggingface_hub's default


def _hf_cached(repo_id: str, filenames: Sequence[str]) -> Optional[str]:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for fn in filenames:
        p = try_to_load_from_cache(repo_id, fn, cache_dir=_hf_cache_dir())
        if isinstance(p, str) and os.path.isfile(p):
            return p
    return None


def _torch_hub_file(url: str) -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def _reachable(urls: Sequence[str], timeout: float) -> Dict[str, bool]:
    """Whether a TCP connection to each url's host opens within ``timeout`` seconds, probed in
    parallel.  Threads bound the wait: the DNS lookup has no timeout of its own."""
    ok: Dict[str, bool] = {u: False for u in urls}

    def probe(u):
        host, port = _host_port(u)
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok[u] = True
        except (OSError, UnicodeError):
            pass

    threads = [threading.Thread(target=probe, args=(u,), daemon=True) for u in urls]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return dict(ok)


def _host_port(url: str) -> Tuple[str, int]:
    u = urlparse(url)
    return u.hostname or "", u.port or (80 if u.scheme == "http" else 443)


def hub_offline_reasons(urls: Sequence[str], connect_timeout: float = 1.0) -> Dict[str, Optional[str]]:
    """For each url: why its host can't be used now (offline env var, or no TCP connect within
    ``connect_timeout`` s), or None if it can.  Takes at most about ``connect_timeout``."""
    for var in _OFFLINE_ENV:
        if _env_true(var):
            return {u: f"{var} is set" for u in urls}
    up = _reachable(urls, connect_timeout)
    return {u: None if up[u] else "%s:%d is unreachable (no TCP connect within %g s)"
            % (_host_port(u) + (connect_timeout,)) for u in urls}


def resolve_pretrained(*, what: str, hf_repo: Optional[str] = None,
                       hf_filenames: Sequence[str] = ("model.safetensors", "pytorch_model.bin"),
                       url: Optional[str] = None, connect_timeout: float = 1.0) -> str:
    """Local path of the pretrained weights for ``what``, downloading only if the hub answers.

    Looks in the Hugging Face cache (``hf_repo``), then torch.hub's checkpoint folder (``url``'s
    file name); otherwise downloads from the first reachable of the HF hub and ``url``.
    Raises :class:`WeightsUnavailableError` (a RuntimeError) within about ``connect_timeout``
    seconds when nothing is cached and no source is reachable (the hosts are probed in
    parallel; an offline environment variable skips the probe).
    """
    if hf_repo:
        p = _hf_cached(hf_repo, hf_filenames)
        if p:
            return p
    if url and os.path.isfile(_torch_hub_file(url)):
        return _torch_hub_file(url)

    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    sources = ([endpoint] if hf_repo else []) + ([url] if url else [])
    why_not = hub_offline_reasons(sources, connect_timeout)
    reasons = []
    if hf_repo:
        why = why_not[endpoint]
        if why is None:
            from huggingface_hub import hf_hub_download

            last = None
            for fn in hf_filenames:
                try:
                    return hf_hub_download(hf_repo, fn, cache_dir=_hf_cache_dir())
                except Exception as e:  # noqa: BLE001 - try the next file name / source
                    last = e
            why = f"download failed: {type(last).__name__}: {last}"
        reasons.append(f"Hugging Face hub ({hf_repo}): {why}")
    if url:
        why = why_not[url]
        if why is None:
            dst = _torch_hub_file(url)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                torch.hub.download_url_to_file(url, dst, progress=False)
                return dst
            except Exception as e:  # noqa: BLE001
                why = f"download failed: {type(e).__name__}: {e}"
        reasons.append(f"{url}: {why}")

    cache_hint = []
    if hf_repo:
        cache_hint.append(f"`hf download {hf_repo}` into the Hugging Face cache")
    if url:
        cache_hint.append(f"copy {os.path.basename(urlparse(url).path)} to {_torch_hub_file(url)}")
    raise WeightsUnavailableError(
        f"pretrained {what} weights are not cached and can't be downloaded ("
        + "; ".join(reasons) + "). Fix: pass weights=/path/to/file (.pth/.pt/.safetensors), or "
        "connect to the internet / pre-populate the cache ("
        + " or ".join(cache_hint) + "); pretrained=False gives random weights.")
