"""What the converters share: reading a foreign checkpoint safely, renaming its keys with
shape checks, and writing the yoda-sparse checkpoint."""
from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

# Buffers the public GaussianDiffusion classes register (SR3's and SRDiff's): the schedule,
# which the converters read to check it, never weights.
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
})


def read_torch_file(path) -> object:
    """Load a ``.pth``/``.ckpt`` with ``torch.load(weights_only=True)`` (tensors, dicts, lists,
    numbers, strings only), or a ``.safetensors`` file; anything that needs code is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise ValueError(f"path: {str(path)!r} is not a readable safetensors file ({e})") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        needs = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
        if needs:
            raise ValueError(
                f"path: {str(path)!r} is a pickle that needs code to load (it names {needs.group(1)}), and "
                f"yoda-sparse only reads checkpoints with torch.load(weights_only=True). Re-save just the "
                f"weights where the code that made it runs, e.g. torch.save(model.state_dict(), 'weights.pth')"
            ) from None
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", msg, re.S)
        detail = " ".join(reason.group(1).split()) if reason else msg.strip().splitlines()[0]
        raise ValueError(f"path: {str(path)!r} is not a readable torch checkpoint ({detail})") from None
    except Exception as e:
        raise ValueError(f"path: {str(path)!r} is not a readable torch checkpoint ({type(e).__name__}: {e})") from None


def tensor_dict(obj, what: str) -> dict[str, torch.Tensor]:
    """``obj`` as a flat {name: tensor} dict; a clear error naming ``what`` otherwise."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{what}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{what}: expected a state dict of tensors, but entries {bad[:5]} are not "
                         f"(a training-state file rather than weights?)")
    return dict(obj)


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Entries under ``prefix`` with the prefix removed (others dropped)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def fold_weight_norm(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Replace ``X.weight_g`` / ``X.weight_v`` pairs (torch.nn.utils.weight_norm, dim 0) by
    ``X.weight = g * v / ||v||`` (norm over all but dim 0). Returns (state, folded names)."""
    out = dict(state)
    folded = []
    for key in sorted(k for k in state if k.endswith(".weight_g")):
        base = key[: -len("_g")]
        v_key = base + "_v"
        if v_key not in state:
            raise ValueError(f"state dict: {key!r} has no matching {v_key!r} (a weight-norm pair)")
        g, v = state[key].to(torch.float64), state[v_key].to(torch.float64)
        dims = tuple(range(1, v.dim()))
        out[base] = (g * v / torch.linalg.vector_norm(v, dim=dims, keepdim=True)).to(state[v_key].dtype)
        del out[key], out[v_key]
        folded.append(base)
    return out, folded


def rename_checked(source: dict[str, torch.Tensor], key_map: dict[str, str], expected: Mapping[str, torch.Tensor],
                   *, what: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """``{our_key: source[their_key]}`` for every ``our_key -> their_key`` of ``key_map``.

    ``expected`` holds tensors (meta ones do) of the target model; a key missing from the
    source, or a shape that differs, raises a ValueError naming the key (as the file spells it:
    ``prefix`` + key) and both shapes.
    """
    missing = [prefix + theirs for ours, theirs in key_map.items() if theirs not in source]
    if missing:
        raise ValueError(f"{what}: the checkpoint lacks {len(missing)} keys this layout needs, e.g. {missing[:5]}")
    out = {}
    for ours, theirs in key_map.items():
        got, want = tuple(source[theirs].shape), tuple(expected[ours].shape)
        if got != want:
            raise ValueError(f"{what}: key {prefix + theirs!r} (yoda-sparse {ours!r}) has shape {got} in the checkpoint, "
                             f"but the model expects {want}")
        out[ours] = source[theirs]
    return out


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_converted(out, state: dict[str, torch.Tensor], cfg, *, family: str, schedule: dict | None, yoda, preprocess,
                   codebase: str, checkpoint, notes: list[str]) -> dict:
    """Write a converted checkpoint (safetensors, atomically) with where it came from; returns
    the converters' summary dict (config, schedule, notes, out)."""
    from ..models import save_checkpoint

    src = Path(checkpoint) if isinstance(checkpoint, (str, Path)) else None
    extra = {
        "family": family, "schedule": schedule, "yoda": yoda.to_dict(), "preprocess": preprocess.to_dict(),
        "converted_from": {"codebase": codebase, "file": src.name if src else None,
                           "sha256": sha256_of(src) if src else None, "trained_with_yoda": False, "notes": notes},
    }
    save_checkpoint(out, state, cfg, extra=extra)
    return {"config": cfg.to_dict(), "schedule": schedule, "notes": notes, "out": str(out)}


def schedule_from_buffers(betas: torch.Tensor | None, what: str, *, expect=None) -> dict | None:
    """The ScheduleSettings dict that reproduces a public model's float32 ``betas`` buffer.

    ``expect`` (a ScheduleSettings) is tried first; then linear (fit from the ends) and cosine;
    otherwise the betas are stored explicitly. None when there is no buffer.
    """
    from ..diffusion import ScheduleSettings

    if betas is None:
        return None
    b = betas.detach().to(torch.float64).reshape(-1)
    T = b.numel()
    candidates = [expect] if expect is not None else []
    # the float32 ends read back as the short decimals they were written as (1e-06, not 9.99999997e-07)
    start, end = (float(f"{float(v):.7g}") for v in (b[0], b[-1]))
    candidates += [ScheduleSettings("linear", T, start, end) if T > 1 else None, ScheduleSettings("cosine", T)]
    for cand in candidates:
        if cand is None or cand.timesteps != T:
            continue
        try:
            built = cand.build().betas
        except ValueError:
            continue
        # the buffers are float32 copies of float64 values
        if torch.allclose(built, b, rtol=1e-6, atol=1e-9):
            return cand.to_dict()
    return ScheduleSettings("explicit", T, betas=tuple(float(x) for x in b)).to_dict()
