"""The step programs: SR3's and SRDiff's UNet forward passes written against the sparse layer
primitives (:class:`yoda_sparse.sparse.layers.StepContext`), layer for layer as the models'
own ``forward`` methods compute them, so that an all-dense step reproduces the model.
"""
from __future__ import annotations

import torch

from ..models.sr3 import SR3UNet
from ..models.srdiff import SRDiffUNet
from .layers import StepContext, UnsupportedLayerError, activation_name

__all__ = ["sr3_step", "srdiff_step", "unet_of", "level_sizes"]


def unet_of(model) -> torch.nn.Module:
    """The UNet the engine runs: an SR3UNet, or an SRDiff model's ``unet``."""
    if isinstance(model, SR3UNet):
        return model
    unet = getattr(model, "unet", model)
    if isinstance(unet, SRDiffUNet):
        return unet
    raise UnsupportedLayerError(f"model: the sparse engine runs yoda_sparse's SR3UNet and SRDiff models, "
                                f"got {type(model).__name__}")


def level_sizes(unet, H: int, W: int) -> list[tuple[int, int]]:
    return [(H >> lvl, W >> lvl) for lvl in range(len(unet.down_blocks))]


def sr3_step(ctx: StepContext, unet: SR3UNet, x_up: torch.Tensor, z: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
    """eps for cat(x_up, z) at noise level sqrt(gamma) [B]; mirrors SR3UNet.forward."""
    emb = unet.noise_embed(noise_level)
    h = ctx.conv("input", unet.input_conv, x_up, 0, x2=z)
    skips = [h]
    levels = len(unet.down_blocks)
    for i, blocks in enumerate(unet.down_blocks):
        for j, blk in enumerate(blocks):
            h = ctx.res_attn(f"down{i}.{j}", blk, h, emb, i)
            skips.append(h)
        if i < len(unet.downsamples):
            h = ctx.conv(f"down{i}.downsample", unet.downsamples[i].conv, h, i + 1)
            skips.append(h)
    for j, blk in enumerate(unet.mid_blocks):
        h = ctx.res_attn(f"mid{j}", blk, h, emb, levels - 1)
    for j, blocks in enumerate(unet.up_blocks):
        lvl = levels - 1 - j
        for k, blk in enumerate(blocks):
            h = ctx.res_attn(f"up{j}.{k}", blk, h, emb, lvl, x2=skips.pop())
        if j < len(unet.upsamples):
            up = unet.upsamples[j]
            if up.mode != "nearest_conv":
                raise UnsupportedLayerError(f"upsamples.{j}: mode {up.mode!r} in an SR3 UNet")
            h = ctx.conv(f"up{j}.upsample", up.conv, h, lvl - 1, upsample=2)
    norm, act, conv = unet.output
    return ctx.conv("output", conv, h, 0, norm=norm, act=activation_name(act, "output.1"))


def srdiff_step(ctx: StepContext, unet: SRDiffUNet, z: torch.Tensor, t: torch.Tensor, cond_hr: torch.Tensor) -> torch.Tensor:
    """eps for the residual state z at step t [B], given the projected condition cond_hr
    (``unet.cond_proj(cond)``, constant over a run); mirrors SRDiffUNet.forward."""
    # as SRDiffUNet.forward: a network trained on SRDiff's 0..T-1 steps sees t - 1
    emb = unet.time_embed(t - 1 if getattr(unet, "timestep_zero_based", False) else t)
    h = z
    skips = []
    levels = len(unet.down_blocks)
    for i, blocks in enumerate(unet.down_blocks):
        for j, blk in enumerate(blocks):
            h = ctx.resblock(f"down{i}.{j}", blk, h, emb, i)
        if i == 0:
            # the condition joins after level 0's blocks: a whole-map add (one pass, SRDiff only)
            h = (h + cond_hr).contiguous(memory_format=torch.channels_last)
            ctx.maps["down0.cond"] = h
        skips.append(h)
        if i < len(unet.downsamples):
            h = ctx.conv(f"down{i}.downsample", unet.downsamples[i].conv, h, i + 1)
    for j, blk in enumerate(unet.mid_blocks):
        h = ctx.resblock(f"mid{j}", blk, h, emb, levels - 1)
    for j, blocks in enumerate(unet.up_blocks):
        lvl = levels - 1 - j
        skip = skips.pop()
        for k, blk in enumerate(blocks):
            h = ctx.resblock(f"up{j}.{k}", blk, h, emb, lvl, x2=skip if k == 0 else None)
        up = unet.upsamples[j]
        if up.mode != "transposed":
            raise UnsupportedLayerError(f"upsamples.{j}: mode {up.mode!r} in an SRDiff UNet")
        h = ctx.conv(f"up{j}.upsample", up.conv, h, lvl - 1)
    conv3, norm, act, conv1 = unet.output
    a = activation_name(act, "output.2")
    if not isinstance(norm, torch.nn.Identity):
        raise UnsupportedLayerError("output.1: GroupNorm after the output convolution is not supported by the "
                                    "sparse engine (SRDiff's published models have none)")
    h = ctx.conv("output.0", conv3, h, 0, out_act=a)
    return ctx.conv("output.3", conv1, h, 0)
