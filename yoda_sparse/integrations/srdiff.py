"""Convert checkpoints of the official SRDiff code (LeiaLi/SRDiff) into yoda-sparse checkpoints.

Its ``model_ckpt_steps_N.ckpt`` is a pickle ``{'global_step', 'optimizer_states',
'state_dict': {'model': {...}}}`` (plain containers and tensors: it loads with
``torch.load(weights_only=True)``); the model dict holds the conditional UNet under
``denoise_fn.``, the RRDB encoder under ``rrdb.`` and the schedule buffers. Key map:

    rrdb.conv_first / trunk_conv                 -> encoder.first_conv / trunk_conv
    rrdb.RRDB_trunk.n.RDBr.convc                 -> encoder.blocks.n.blocks.(r-1).convs.(c-1)
    rrdb.upconv*, HRconv, conv_last              -> dropped (the RRDBNet's pretraining head)
    denoise_fn.cond_proj, mlp.0 / mlp.2          -> unet.cond_proj, unet.time_embed.mlp.0 / .2
    denoise_fn.downs.i.0/1, downs.i.2.conv.1     -> unet.down_blocks.i.0/1, unet.downsamples.i.conv
    denoise_fn.mid_block1 / mid_block2           -> unet.mid_blocks.0 / .1
    denoise_fn.ups.j.0/1, ups.j.2.conv.0         -> unet.up_blocks.j.0/1, unet.upsamples.j.conv
    denoise_fn.final_conv.0.block.1 / final_conv.1 -> unet.output.0 / unet.output.3
    inside a block: block1.block.1 / block2.block.1 -> conv1 / conv2, mlp.1 -> emb_proj, res_conv -> skip

Fidelity options stored with the converted model: SRDiff's sinusoid uses frequencies
``1e4^(-k/(half-1))`` (``embedding_freq_shift=1``), its network sees the 0-based timestep
(``timestep_zero_based``), and its x_up is MATLAB's bicubic imresize of the LR image scaled by
255/256 (its data code divides the 8-bit LR by 256 before resizing; ``Preprocess.input_scale``).
Weight-normalised convs (``use_wn``) are folded into plain weights.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ._checkpoints import (
    SCHEDULE_BUFFERS, fold_weight_norm, read_torch_file, rename_checked, save_converted, schedule_from_buffers, strip_prefix, tensor_dict,
)

__all__ = ["convert_srdiff", "srdiff_state_dict", "srdiff_key_map", "SRDIFF_SOURCE", "SRDIFF_INPUT_SCALE"]

SRDIFF_SOURCE = "LeiaLi/SRDiff"
#: SRDiff's data code makes x_up from the 8-bit LR divided by 256 (not 255).
SRDIFF_INPUT_SCALE = 255.0 / 256.0

_RES_SUFFIXES = {  # yoda-sparse ResBlock (pre_activation=False) -> public ResnetBlock
    "conv1.": "block1.block.1.",
    "conv2.": "block2.block.1.",
    "norm1.": "block1.block.2.",
    "norm2.": "block2.block.2.",
    "emb_proj.": "mlp.1.",
    "skip.": "res_conv.",
}
_HEAD = ("rrdb.upconv1.", "rrdb.upconv2.", "rrdb.upconv3.", "rrdb.HRconv.", "rrdb.conv_last.")


def srdiff_key_map(model) -> dict[str, str]:
    """{yoda-sparse key: public key} for every entry of ``model.state_dict()`` (an SRDiff)."""
    out = {}
    for key in model.state_dict():
        theirs = _public_key(key)
        if theirs is None:
            raise RuntimeError(f"no public SRDiff name for yoda-sparse key {key!r}")
        out[key] = theirs
    return out


def _public_key(key: str) -> str | None:
    m = re.fullmatch(r"encoder\.blocks\.(\d+)\.blocks\.(\d+)\.convs\.(\d+)\.(\w+)", key)
    if m:
        n, r, c, p = m.groups()
        return f"rrdb.RRDB_trunk.{n}.RDB{int(r) + 1}.conv{int(c) + 1}.{p}"
    fixed = {"encoder.first_conv.": "rrdb.conv_first.", "encoder.trunk_conv.": "rrdb.trunk_conv.",
             "unet.cond_proj.": "denoise_fn.cond_proj.", "unet.time_embed.mlp.0.": "denoise_fn.mlp.0.",
             "unet.time_embed.mlp.2.": "denoise_fn.mlp.2.", "unet.output.0.": "denoise_fn.final_conv.0.block.1.",
             "unet.output.3.": "denoise_fn.final_conv.1."}
    for ours, theirs in fixed.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    m = re.fullmatch(r"unet\.downsamples\.(\d+)\.conv\.(\w+)", key)
    if m:
        return f"denoise_fn.downs.{m.group(1)}.2.conv.1.{m.group(2)}"
    m = re.fullmatch(r"unet\.upsamples\.(\d+)\.conv\.(\w+)", key)
    if m:
        return f"denoise_fn.ups.{m.group(1)}.2.conv.0.{m.group(2)}"
    m = re.fullmatch(r"unet\.(down_blocks|up_blocks|mid_blocks)\.(\d+)(?:\.(\d+))?\.(.+)", key)
    if m:
        group, i, b, rest = m.groups()
        if group == "mid_blocks":
            if b is not None:
                rest = f"{b}.{rest}"
            block = f"denoise_fn.mid_block{int(i) + 1}."
        else:
            block = f"denoise_fn.{'downs' if group == 'down_blocks' else 'ups'}.{i}.{b}."
        for a, t in _RES_SUFFIXES.items():
            if rest.startswith(a):
                return block + t + rest[len(a):]
    return None


def _model_state(obj, what: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "state_dict" in obj:
        inner = obj["state_dict"]
        if isinstance(inner, dict) and "model" in inner:
            return tensor_dict(inner["model"], f"{what} ['state_dict']['model']")
        raise ValueError(f"{what}: expected ['state_dict']['model'] (SRDiff's trainer layout), found "
                         f"['state_dict'] keys {sorted(inner)[:5] if isinstance(inner, dict) else type(inner).__name__}")
    if isinstance(obj, dict) and any(isinstance(k, str) and k.startswith("denoise_fn.noise_level_mlp.") for k in obj):
        raise ValueError(f"{what}: this looks like an SR3 checkpoint (denoise_fn.noise_level_mlp.*); use `yoda-sparse convert sr3`")
    state = tensor_dict(obj, what)
    if not any(k.startswith("denoise_fn.") for k in state):
        raise ValueError(f"{what}: not an SRDiff checkpoint of {SRDIFF_SOURCE}: expected "
                         f"{{'global_step', 'optimizer_states', 'state_dict': {{'model': {{'denoise_fn.*', 'rrdb.*', ...}}}}}} "
                         f"or the model state dict itself; found keys like {sorted(state)[:5]}")
    return state


def _layout(state: dict[str, torch.Tensor], what: str) -> dict:
    def need(key):
        if key not in state:
            raise ValueError(f"{what}: expected key {key!r} of an SRDiff model")
        return state[key]

    hidden = need("denoise_fn.mlp.0.weight").shape[1]
    mults = []
    i = 0
    while f"denoise_fn.downs.{i}.0.block1.block.1.weight" in state:
        width = state[f"denoise_fn.downs.{i}.0.block1.block.1.weight"].shape[0]
        if width % hidden:
            raise ValueError(f"{what}: level {i} has width {width}, not a multiple of hidden_size {hidden}")
        mults.append(width // hidden)
        i += 1
    if len(mults) < 2:
        raise ValueError(f"{what}: expected at least two UNet levels 'denoise_fn.downs.<i>.0.block1.block.1.weight', found {len(mults)}")
    nf = need("rrdb.conv_first.weight").shape[0]
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"rrdb\.RRDB_trunk\.(\d+)\.", k))})
    if not blocks:
        raise ValueError(f"{what}: no 'rrdb.RRDB_trunk.<n>.*' keys: SRDiff without its RRDB encoder (use_rrdb=False) is not supported")
    gc = need("rrdb.RRDB_trunk.0.RDB1.conv1.weight").shape[0]
    k = need("denoise_fn.cond_proj.weight").shape[2]
    if k % 2:
        raise ValueError(f"{what}: cond_proj has an odd kernel {k}; SRDiff's is 2 * sr_scale")
    return dict(inner_channels=int(hidden), channel_mults=tuple(mults), rrdb_channels=int(nf), rrdb_blocks=len(blocks),
                rrdb_growth=int(gc), scale=k // 2)


def srdiff_state_dict(checkpoint, *, res_rescale: float = 2.0, timesteps: int | None = None, notes: list | None = None):
    """(SRDiffConfig, yoda-sparse state dict, schedule dict) of an SRDiff checkpoint (path or loaded object)."""
    from ..diffusion import ScheduleSettings
    from ..models import SRDiffConfig, build_model

    notes = notes if notes is not None else []
    what = f"checkpoint {str(checkpoint)!r}" if isinstance(checkpoint, (str, Path)) else "checkpoint"
    obj = read_torch_file(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    state = _model_state(obj, what)
    if any(k.startswith("denoise_fn.mid_attn.") for k in state):
        raise ValueError(f"{what}: has 'denoise_fn.mid_attn.*' (SRDiff's use_attn=True, a linear attention in the middle), "
                         f"which yoda-sparse's SRDiff UNet does not have")
    if any(k.startswith("denoise_fn.up_proj.") for k in state):
        raise ValueError(f"{what}: has 'denoise_fn.up_proj.*' (SRDiff's up_input=True), which yoda-sparse's SRDiff UNet does not have")
    state, folded = fold_weight_norm(state)
    if folded:
        notes.append(f"folded weight norm of {len(folded)} convs (use_wn=True) into plain weights")
    layout = _layout(state, what)
    betas = state.get("betas")
    T = int(betas.numel()) if betas is not None else None
    if timesteps is not None and T is not None and timesteps != T:
        raise ValueError(f"timesteps: {timesteps} contradicts the checkpoint's {T}-step schedule buffers")
    T = T or timesteps or 100
    mults = layout["channel_mults"]
    multiple = 2 ** (len(mults) - 1)
    image_size = 160 if 160 % layout["scale"] == 0 and 160 % multiple == 0 else layout["scale"] * multiple
    cfg = SRDiffConfig(name="srdiff_converted", image_size=image_size, res_rescale=float(res_rescale), timesteps=T,
                       embedding_freq_shift=1, timestep_zero_based=True, **layout)
    model = build_model(cfg, device="meta")
    key_map = srdiff_key_map(model)
    out = rename_checked(state, key_map, model.state_dict(), what=what)
    head = sorted(k for k in state if k.startswith(_HEAD))
    if head:
        notes.append(f"dropped the RRDBNet's pretraining head ({len(head)} tensors: upconv*, HRconv, conv_last): SRDiff never conditions on it")
    used = set(key_map.values()) | set(head) | SCHEDULE_BUFFERS
    left = sorted(k for k in state if k not in used)
    if left:
        raise ValueError(f"{what}: keys {left[:5]} have no place in an SRDiff model of this layout")
    schedule = schedule_from_buffers(betas, what, expect=ScheduleSettings("cosine", T))
    if schedule is None:
        notes.append(f"no schedule buffers in the file: SRDiff's default cosine schedule of {T} steps is assumed")
        schedule = ScheduleSettings("cosine", T).to_dict()
    return cfg, out, schedule


def convert_srdiff(checkpoint, out, *, res_rescale: float = 2.0, timesteps: int | None = None,
                   attention: str | None = None, lower_bound: float = 0.2, upsample: str = "matlab_bicubic",
                   input_scale: float = SRDIFF_INPUT_SCALE) -> dict:
    """Write a yoda-sparse checkpoint (safetensors, atomically) for an SRDiff ``.ckpt``.

    ``res_rescale`` is SRDiff's hparam of that name (2.0 in its published configs; not in the
    file). Returns a summary dict (config, schedule, notes).
    """
    from ..diffusion import Preprocess, YodaSettings

    notes: list[str] = []
    yoda = YodaSettings(attention=attention, lower_bound=lower_bound)
    pre = Preprocess(upsample=upsample, input_scale=input_scale)
    cfg, state, schedule = srdiff_state_dict(checkpoint, res_rescale=res_rescale, timesteps=timesteps, notes=notes)
    return save_converted(out, state, cfg, family="srdiff", schedule=schedule, yoda=yoda, preprocess=pre,
                          codebase=SRDIFF_SOURCE, checkpoint=checkpoint, notes=notes)
