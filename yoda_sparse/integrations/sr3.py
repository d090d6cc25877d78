"""Convert checkpoints of the public SR3 re-implementation
(Janspiry/Image-Super-Resolution-via-Iterative-Refinement) into yoda-sparse checkpoints.

Its ``I<iter>_E<epoch>_gen.pth`` is a plain state dict of the GaussianDiffusion module: the UNet
under ``denoise_fn.`` plus the schedule buffers (``betas``, ``alphas_cumprod``, ...). The UNet
keeps every layer in flat ``downs`` / ``mid`` / ``ups`` lists; yoda-sparse's ``SR3UNet`` keeps
blocks and resampling apart. The weights map one to one (no reshapes):

    downs.0                              -> input_conv
    downs.k (ResnetBlocWithAttn)         -> down_blocks.<level>.<j>   (res_block.* -> res.*, attn.* -> attn.*)
    downs.k (Downsample)                 -> downsamples.<level>
    mid.0 / mid.1                        -> mid_blocks.0 / mid_blocks.1
    ups.k (ResnetBlocWithAttn / Upsample)-> up_blocks.<j>.<b> / upsamples.<j>
    noise_level_mlp.1 / .3               -> noise_embed.mlp.0 / .2
    final_conv.block.0 / .3              -> output.0 / output.2
    inside a block: block1.block.0 / .3 -> norm1 / conv1, block2.block.0 / .3 -> norm2 / conv2,
                    noise_func.noise_func.0 -> emb_proj, res_conv -> skip

Fidelity: the public code feeds sqrt(gamma) in [0, 1] to the sinusoid unscaled
(``noise_level_scale=1``) and makes x_up with PIL's bicubic (``upsample="pil_bicubic"``); both
are stored in the converted checkpoint. Its training schedule (linear, 2000 steps,
1e-6..1e-2 in the published configs) is read from the config or the ``betas`` buffer.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ._checkpoints import SCHEDULE_BUFFERS, read_torch_file, rename_checked, save_converted, schedule_from_buffers, strip_prefix, tensor_dict

__all__ = ["convert_sr3", "sr3_state_dict", "sr3_key_map", "read_sr3_json_config", "SR3_SOURCE"]

SR3_SOURCE = "Janspiry/Image-Super-Resolution-via-Iterative-Refinement"

_BLOCK_SUFFIXES = {  # yoda-sparse ResAttnBlock -> public ResnetBlocWithAttn
    "res.norm1.": "res_block.block1.block.0.",
    "res.conv1.": "res_block.block1.block.3.",
    "res.norm2.": "res_block.block2.block.0.",
    "res.conv2.": "res_block.block2.block.3.",
    "res.emb_proj.": "res_block.noise_func.noise_func.0.",
    "res.skip.": "res_block.res_conv.",
    "attn.norm.": "attn.norm.",
    "attn.qkv.": "attn.qkv.",
    "attn.out.": "attn.out.",
}


def sr3_key_map(model) -> dict[str, str]:
    """{yoda-sparse key: public key} for every entry of ``model.state_dict()`` (an SR3UNet)."""
    prefixes = [("input_conv.", "downs.0.", None), ("noise_embed.mlp.0.", "noise_level_mlp.1.", None),
                ("noise_embed.mlp.2.", "noise_level_mlp.3.", None), ("output.0.", "final_conv.block.0.", None),
                ("output.2.", "final_conv.block.3.", None)]
    k = 1
    for i, blocks in enumerate(model.down_blocks):
        for j in range(len(blocks)):
            prefixes.append((f"down_blocks.{i}.{j}.", f"downs.{k}.", _BLOCK_SUFFIXES))
            k += 1
        if i < len(model.downsamples):
            prefixes.append((f"downsamples.{i}.", f"downs.{k}.", None))
            k += 1
    for j in range(len(model.mid_blocks)):
        prefixes.append((f"mid_blocks.{j}.", f"mid.{j}.", _BLOCK_SUFFIXES))
    k = 0
    for j, blocks in enumerate(model.up_blocks):
        for b in range(len(blocks)):
            prefixes.append((f"up_blocks.{j}.{b}.", f"ups.{k}.", _BLOCK_SUFFIXES))
            k += 1
        if j < len(model.upsamples):
            prefixes.append((f"upsamples.{j}.", f"ups.{k}.", None))
            k += 1
    out = {}
    for key in model.state_dict():
        for ours, theirs, inner in prefixes:
            if not key.startswith(ours):
                continue
            rest = key[len(ours):]
            if inner is None:
                out[key] = theirs + rest
            else:
                for a, b in inner.items():
                    if rest.startswith(a):
                        out[key] = theirs + b + rest[len(a):]
                        break
            break
        if key not in out:  # a layer this map does not know: a bug here, not in the user's file
            raise RuntimeError(f"no public SR3 name for yoda-sparse key {key!r}")
    return out


def read_sr3_json_config(path) -> dict:
    """The public code's JSON config (``//`` comments allowed, as its own parser allows)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: {str(path)!r} does not exist or is not a file")
    text = "".join(line.split("//")[0] + "\n" for line in path.read_text().splitlines())
    try:
        opt = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"config: {str(path)!r} is not JSON (after removing // comments): {e}") from None
    try:
        model = opt["model"]
        unet = model["unet"]
        diffusion = model["diffusion"]
    except (KeyError, TypeError):
        raise ValueError(f"config: {str(path)!r} lacks model.unet / model.diffusion: not an SR3 config of "
                         f"{SR3_SOURCE}") from None
    return opt


def _layout_from_config(opt: dict, where: str) -> dict:
    model = opt["model"]
    which = model.get("which_model_G", "sr3")
    if which != "sr3":
        raise ValueError(f"config: {where} has which_model_G={which!r}; only the 'sr3' network is supported "
                         f"(the 'ddpm' one has a different block layout)")
    if not model["diffusion"].get("conditional", True):
        raise ValueError(f"config: {where} is an unconditional model (diffusion.conditional=false); super-resolution needs a conditional one")
    u = model["unet"]
    attn_res = u.get("attn_res") or ()
    attn_res = (attn_res,) if isinstance(attn_res, int) else attn_res
    layout = dict(
        in_channels=int(u.get("in_channel", 6)), out_channels=int(u.get("out_channel", 3)),
        inner_channels=int(u.get("inner_channel", 32)), norm_groups=int(u.get("norm_groups") or 32),
        channel_mults=tuple(int(m) for m in u.get("channel_multiplier", (1, 2, 4, 8, 8))),
        attn_resolutions=tuple(int(r) for r in attn_res), res_blocks=int(u.get("res_blocks", 3)),
        dropout=float(u.get("dropout", 0)), image_size=int(model["diffusion"]["image_size"]),
    )
    scale = None
    for phase in ("train", "val"):
        d = (opt.get("datasets") or {}).get(phase) or {}
        if "l_resolution" in d and "r_resolution" in d:
            lo, hi = int(d["l_resolution"]), int(d["r_resolution"])
            if hi % lo:
                raise ValueError(f"config: {where} datasets.{phase}: r_resolution {hi} is not a multiple of l_resolution {lo}")
            scale = hi // lo
            break
    layout["scale"] = scale
    sched = (model.get("beta_schedule") or {}).get("train")
    layout["schedule"] = sched
    return layout


def _layout_from_state(state: dict[str, torch.Tensor]) -> dict:
    """Infer the UNet layout from the weights (norm groups and image size are not in them)."""
    if "downs.0.weight" not in state:
        raise ValueError("state dict: expected an SR3 UNet with key 'downs.0.weight' (the input conv)")
    inner, in_ch = state["downs.0.weight"].shape[:2]
    levels = []  # (mult, blocks, attention)
    cur = []
    k = 1
    while True:
        blk = f"downs.{k}.res_block.block1.block.3.weight"
        if blk in state:
            cout = state[blk].shape[0]
            if cout % inner:
                raise ValueError(f"state dict: {blk!r} has {cout} output channels, not a multiple of the {inner} inner channels")
            cur.append((cout // inner, f"downs.{k}.attn.qkv.weight" in state))
        elif f"downs.{k}.conv.weight" in state:
            levels.append(cur)
            cur = []
        else:
            break
        k += 1
    levels.append(cur)
    if any(not lv for lv in levels):
        raise ValueError("state dict: a level of 'downs' has no ResnetBlocWithAttn: not an SR3 UNet layout")
    counts = {len(lv) for lv in levels}
    if len(counts) != 1:
        raise ValueError(f"state dict: levels have different numbers of blocks {[len(lv) for lv in levels]}")
    mults = []
    attn_levels = []
    for i, lv in enumerate(levels):
        if len({m for m, _ in lv}) != 1 or len({a for _, a in lv}) != 1:
            raise ValueError(f"state dict: level {i} mixes block widths or attention: {lv}")
        mults.append(lv[0][0])
        if lv[0][1]:
            attn_levels.append(i)
    if "final_conv.block.3.weight" not in state:
        raise ValueError("state dict: expected 'final_conv.block.3.weight' (the output conv of an SR3 UNet)")
    return dict(in_channels=int(in_ch), inner_channels=int(inner), out_channels=int(state["final_conv.block.3.weight"].shape[0]),
                channel_mults=tuple(mults), res_blocks=counts.pop(), attn_levels=tuple(attn_levels),
                mid_attention="mid.0.attn.qkv.weight" in state)


def _unet_state(obj, what: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], str]:
    """(UNet weights, schedule buffers, the UNet's key prefix in the file) of a public SR3 file
    (generator state dict or UNet alone)."""
    if isinstance(obj, dict) and "optimizer" in obj and ("iter" in obj or "epoch" in obj):
        raise ValueError(f"{what}: this is the optimizer state (I*_E*_opt.pth); pass the matching *_gen.pth")
    if isinstance(obj, dict) and "state_dict" in obj and "global_step" in obj:
        raise ValueError(f"{what}: this looks like an SRDiff trainer checkpoint; use `yoda-sparse convert srdiff`")
    state = tensor_dict(obj, what)
    prefix = ""
    if any(k.startswith("module.") for k in state):
        state = strip_prefix(state, "module.")  # saved from DataParallel
        prefix = "module."
    buffers = {k: v for k, v in state.items() if k in SCHEDULE_BUFFERS}
    if any(k.startswith("denoise_fn.") for k in state):
        prefix += "denoise_fn."
        unet = strip_prefix(state, "denoise_fn.")
        other = sorted(k for k in state if not k.startswith("denoise_fn.") and k not in SCHEDULE_BUFFERS)
        if other:
            raise ValueError(f"{what}: unexpected keys beside 'denoise_fn.*' and the schedule buffers: {other[:5]}")
    elif "downs.0.weight" in state:
        unet = {k: v for k, v in state.items() if k not in SCHEDULE_BUFFERS}
    else:
        raise ValueError(f"{what}: not an SR3 checkpoint of {SR3_SOURCE}: expected keys 'denoise_fn.downs.0.weight', "
                         f"'denoise_fn.noise_level_mlp.1.weight', ... (or the UNet's own 'downs.0.weight', ...); "
                         f"found keys like {sorted(state)[:5]}")
    return unet, buffers, prefix


def sr3_state_dict(checkpoint, *, config=None, scale: int | None = None, image_size: int | None = None,
                   norm_groups: int | None = None, notes: list | None = None):
    """(SR3Config, yoda-sparse state dict, schedule dict or None) of a public SR3 checkpoint.

    checkpoint: a path or an already loaded state dict. ``config``: the public JSON config (path
    or parsed dict); without it the layout is read from the weights, and ``scale`` is required
    (``norm_groups`` defaults to 32, the public default, ``image_size`` to 2**(levels-1) * scale).
    """
    from ..models import SR3Config, build_model

    notes = notes if notes is not None else []
    what = f"checkpoint {str(checkpoint)!r}" if isinstance(checkpoint, (str, Path)) else "checkpoint"
    obj = read_torch_file(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    unet, buffers, prefix = _unet_state(obj, what)
    inferred = _layout_from_state(unet)
    sched = None
    if config is not None:
        opt = read_sr3_json_config(config) if isinstance(config, (str, Path)) else config
        layout = _layout_from_config(opt, str(config) if isinstance(config, (str, Path)) else "the config")
        sched = layout.pop("schedule")
        if scale is not None and layout["scale"] is not None and scale != layout["scale"]:
            raise ValueError(f"scale: {scale} contradicts the config's l_resolution/r_resolution ({layout['scale']})")
        layout["scale"] = scale or layout["scale"]
        if image_size is not None:
            layout["image_size"] = image_size
        if norm_groups is not None:
            layout["norm_groups"] = norm_groups
        for name in ("in_channels", "inner_channels", "out_channels", "channel_mults", "res_blocks"):
            if layout[name] != inferred[name]:
                raise ValueError(f"config: unet {name} is {layout[name]} but the checkpoint's weights have {inferred[name]}")
    else:
        if scale is None:
            raise ValueError("scale: the SR factor is not stored in the weights; pass scale (--scale) or the public JSON config")
        levels = len(inferred["channel_mults"])
        layout = {k: inferred[k] for k in ("in_channels", "inner_channels", "out_channels", "channel_mults", "res_blocks")}
        layout["scale"] = scale
        layout["norm_groups"] = 32 if norm_groups is None else norm_groups
        if norm_groups is None:
            widths = sorted({layout["inner_channels"] * m for m in layout["channel_mults"]})
            if any(w % 32 for w in widths):
                raise ValueError(f"norm_groups: not stored in the weights, and the public default 32 does not divide "
                                 f"the widths {widths}; pass norm_groups (--norm-groups) or the public JSON config")
            notes.append("norm_groups is not stored in the weights: assumed 32 (the public default; its 64->512 config uses 16)")
        layout["image_size"] = image_size or (2 ** (levels - 1)) * (scale or 1)
        layout["attn_resolutions"] = tuple(layout["image_size"] // 2 ** i for i in inferred["attn_levels"])
        layout["dropout"] = 0.0
    if layout["scale"] is None:
        raise ValueError("scale: the SR factor is not stored in the weights; pass scale (--scale) or the public JSON config")
    if layout["in_channels"] != 2 * layout["out_channels"]:
        raise ValueError(f"checkpoint: the UNet takes {layout['in_channels']} channels and predicts {layout['out_channels']}; "
                         f"super-resolution needs cat(x_up, z_t), i.e. twice as many in as out")
    if not inferred["mid_attention"]:
        raise ValueError("checkpoint: the middle block has no attention ('mid.0.attn.*'), unlike every public SR3 UNet")
    cfg = SR3Config(name="sr3_converted", noise_level_scale=1.0, mid_attention=True, **layout)
    model = build_model(cfg, device="meta")
    want_attn = tuple(i for i, r in enumerate(cfg.image_size // 2 ** i for i in range(len(cfg.channel_mults)))
                      if r in set(cfg.attn_resolutions))
    if want_attn != inferred["attn_levels"]:
        raise ValueError(f"config: attention on levels {list(want_attn)} (attn_res {list(cfg.attn_resolutions)} at "
                         f"image_size {cfg.image_size}) but the checkpoint has it on levels {list(inferred['attn_levels'])}")
    key_map = sr3_key_map(model)
    state = rename_checked(unet, key_map, model.state_dict(), what=what, prefix=prefix)
    extra_keys = sorted(prefix + k for k in set(unet) - set(key_map.values()))
    if extra_keys:
        raise ValueError(f"{what}: keys {extra_keys[:5]} have no place in an SR3 UNet of this layout")
    expect = None
    if sched is not None:
        from ..diffusion import ScheduleSettings

        kind = sched.get("schedule")
        if kind in ("linear", "cosine"):
            expect = ScheduleSettings(kind, int(sched["n_timestep"]), float(sched.get("linear_start", 1e-6)),
                                      float(sched.get("linear_end", 1e-2)))
            if kind == "cosine":
                expect = ScheduleSettings("cosine", int(sched["n_timestep"]))
    schedule = schedule_from_buffers(buffers.get("betas"), what, expect=expect)
    if schedule is None and expect is not None:
        schedule = expect.to_dict()
    if schedule is None:
        notes.append("no schedule in the file or a config: the public default (linear, 2000 steps, 1e-6..1e-2) is assumed")
        from ..diffusion import ScheduleSettings

        schedule = ScheduleSettings("linear", 2000, 1e-6, 1e-2).to_dict()
    elif expect is not None and schedule != expect.to_dict():
        notes.append(f"the file's betas differ from the config's beta_schedule.train {sched}: the file's are used")
    return cfg, state, schedule


def convert_sr3(checkpoint, out, *, config=None, scale: int | None = None, image_size: int | None = None,
                norm_groups: int | None = None, attention: str | None = None, lower_bound: float = 0.2,
                upsample: str = "pil_bicubic") -> dict:
    """Write a yoda-sparse checkpoint (safetensors, atomically) for a public SR3 ``*_gen.pth``.

    The result loads with :func:`yoda_sparse.diffusion.load_diffusion` and samples dense, or
    with YODA where an attention method is named (here as ``attention``, or at sampling time).
    Returns a summary dict (config, schedule, notes).
    """
    from ..diffusion import Preprocess, YodaSettings

    notes: list[str] = []
    yoda = YodaSettings(attention=attention, lower_bound=lower_bound)
    pre = Preprocess(upsample=upsample)
    cfg, state, schedule = sr3_state_dict(checkpoint, config=config, scale=scale, image_size=image_size,
                                          norm_groups=norm_groups, notes=notes)
    return save_converted(out, state, cfg, family="sr3", schedule=schedule, yoda=yoda, preprocess=pre,
                          codebase=SR3_SOURCE, checkpoint=checkpoint, notes=notes)
