"""The layers of a sparse UNet step: convolution, residual block, self-attention, each run
dense (whole maps, as the model computes them) or sparse (only the active tiles of its level,
through :func:`yoda_sparse.ops.sparse_conv2d`, cached values elsewhere).

Every layer output is a *map* held across steps in the engine's cache under the layer's name:
a dense run replaces it, a sparse run updates its active tiles in place. Maps are
channels_last, the layout the CPU and GPU convolutions are fastest in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..models.layers import ResBlock, SelfAttention
from .norm import group_stats, norm_params
from .plan import LevelPlan

__all__ = ["StepContext", "UnsupportedLayerError"]

_ACTIVATIONS = {nn.SiLU: "silu", nn.Mish: "mish"}


class UnsupportedLayerError(ValueError):
    """The model has a layer the sparse engine cannot run; the message names it."""


def activation_name(module: nn.Module, where: str) -> str | None:
    if isinstance(module, nn.Identity):
        return None
    for cls, name in _ACTIVATIONS.items():
        if isinstance(module, cls):
            return name
    raise UnsupportedLayerError(f"{where}: activation {type(module).__name__} is not supported by the sparse "
                                f"engine (SiLU, Mish or Identity)")


def _act(x: torch.Tensor, name: str | None) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    if name == "mish":
        return F.mish(x)
    return x


class StepContext:
    """One step of the engine: the level plans, and the layer primitives that follow them."""

    def __init__(self, engine, plans: list[LevelPlan]):
        self.engine = engine
        self.plans = plans
        self.maps = engine.maps

    # ------------------------------------------------------------------ norm statistics
    def _stats(self, name: str, norm: nn.GroupNorm, x, x2, dense: bool, plan: LevelPlan | None = None) -> ops.NormParams:
        eng = self.engine
        if eng.norm_stats == "frozen" and not dense and name in eng.frozen_stats:
            mean, rstd = eng.frozen_stats[name]
        else:
            weight = plan.stat_weights() if not dense and plan is not None else None
            mean, rstd = group_stats(x, x2, norm.num_groups, norm.eps, weight)
            if eng.norm_stats == "frozen" and dense:
                eng.frozen_stats[name] = (mean, rstd)
        return norm_params(norm, mean, rstd, x.dtype)

    # ------------------------------------------------------------------ convolution
    def conv(self, name: str, conv: nn.Module, x: torch.Tensor, level: int, *, x2=None, norm: nn.Module | None = None,
             act: str | None = None, out_act: str | None = None, add=None, residual=None,
             upsample: int = 1) -> torch.Tensor:
        """``out_act(conv(up(act(norm(cat(x, x2)))))) + add + residual`` at ``level`` (the
        output's level): the whole map when the level runs dense, else its active tiles."""
        plan = self.plans[level]
        weight = self.engine.weight(conv)
        transposed = isinstance(conv, nn.ConvTranspose2d)
        if isinstance(norm, nn.Identity):
            norm = None
        if norm is not None and not isinstance(norm, nn.GroupNorm):
            raise UnsupportedLayerError(f"{name}: normalization {type(norm).__name__} is not supported (GroupNorm)")
        if plan.dense or name not in self.maps:
            inp = x if x2 is None else torch.cat([x, x2], dim=1)
            if norm is not None:
                if self.engine.norm_stats == "frozen":
                    p = self._stats(name, norm, x, x2, dense=True)
                    inp = ops.sparse_conv_reference.group_norm_apply(inp, p.mean, p.rstd, p.weight, p.bias)
                else:
                    inp = F.group_norm(inp, norm.num_groups, norm.weight, norm.bias, norm.eps)
            inp = _act(inp, act)
            if upsample > 1:
                inp = F.interpolate(inp, scale_factor=upsample, mode="nearest")
            if transposed:
                y = F.conv_transpose2d(inp, weight, conv.bias, conv.stride, conv.padding, conv.output_padding)
            else:
                y = conv._conv_forward(inp, weight, conv.bias)
            y = _act(y, out_act)
            if add is not None:
                y = y + add[:, :, None, None].to(y.dtype)
            if residual is not None:
                y = y + residual
            y = y.contiguous(memory_format=torch.channels_last)
            self.maps[name] = y
            return y
        out = self.maps[name]
        params = self._stats(name, norm, x, x2, dense=False, plan=plan) if norm is not None else None
        ops.sparse_conv2d(
            x, weight, conv.bias, plan.tiles, out, count=plan.count, tile=plan.tile, stride=conv.stride[0],
            padding=conv.padding[0], padding_mode="zeros" if transposed else conv.padding_mode, upsample=upsample,
            transposed=transposed, x2=x2, norm=params, act=act, out_act=out_act,
            add=None if add is None else add.to(out.dtype), residual=residual, backend=self.engine.backend)
        return out

    # ------------------------------------------------------------------ residual block
    def resblock(self, name: str, block: ResBlock, x: torch.Tensor, emb: torch.Tensor, level: int,
                 x2: torch.Tensor | None = None) -> torch.Tensor:
        """yoda_sparse.models.layers.ResBlock (eval mode: dropout is the identity)."""
        if block.affine_embedding:
            raise UnsupportedLayerError(f"{name}: ResBlock with affine_embedding (FiLM) is not supported by the "
                                        f"sparse engine; run this model with engine='dense'")
        act = activation_name(block.act, f"{name}.act")
        e = block.emb_proj(block.emb_act(emb))  # [B, C_out], the time embedding's per-channel add
        if isinstance(block.skip, nn.Identity):
            if x2 is not None:
                raise UnsupportedLayerError(f"{name}: a concatenated input needs a 1x1 skip convolution")
            skip = x
        else:
            skip = self.conv(f"{name}.skip", block.skip, x, level, x2=x2)
        if block.pre_activation:  # SR3: h = conv1(act(norm1(x))) + e; out = conv2(act(norm2(h))) + skip
            h = self.conv(f"{name}.conv1", block.conv1, x, level, x2=x2, norm=block.norm1, act=act, add=e)
            return self.conv(f"{name}.conv2", block.conv2, h, level, norm=block.norm2, act=act, residual=skip)
        # SRDiff: h = act(norm1(conv1(x))) + act(e); out = act(norm2(conv2(h))) + skip
        if not (isinstance(block.norm1, nn.Identity) and isinstance(block.norm2, nn.Identity)):
            raise UnsupportedLayerError(f"{name}: conv-first ResBlock with GroupNorm (norm_groups > 0) is not "
                                        f"supported by the sparse engine (SRDiff's published models have none)")
        h = self.conv(f"{name}.conv1", block.conv1, x, level, x2=x2, out_act=act, add=e)
        return self.conv(f"{name}.conv2", block.conv2, h, level, out_act=act, residual=skip)

    # ------------------------------------------------------------------ self-attention
    def attention(self, name: str, attn: SelfAttention, x: torch.Tensor, level: int) -> torch.Tensor:
        """Spatial self-attention with queries from the level's active tiles and keys/values
        over all positions (cached ones where inactive); the whole map when dense."""
        plan = self.plans[level]
        norm = attn.norm
        if not isinstance(norm, nn.GroupNorm):
            raise UnsupportedLayerError(f"{name}: attention without GroupNorm is not supported")
        B, C, H, W = x.shape
        heads = attn.num_heads
        d = C // heads
        qkv_name, out_name = f"{name}.qkv", f"{name}.out"
        # q, k, v projections: a 1x1 convolution of the normalised input (cached for k, v)
        qkv = self.conv(qkv_name, attn.qkv, x, level, norm=norm)
        w_out = self.engine.weight(attn.out)[:, :, 0, 0]
        if plan.dense or out_name not in self.maps:
            q, k, v = (qkv.reshape(B, 3, heads, d, H * W)[:, i].transpose(-1, -2) for i in range(3))
            o = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, d]
            o = o.transpose(-1, -2).reshape(B, C, H * W)
            y = x.reshape(B, C, H * W) + torch.einsum("oc,bcn->bon", w_out, o) + attn.out.bias.view(1, C, 1)
            out = y.view(B, C, H, W).contiguous(memory_format=torch.channels_last)
            self.maps[out_name] = out
            return out
        out = self.maps[out_name]
        pix = plan.pixel_mask()
        for b in range(B):
            idx = pix[b].nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            # pixel-major rows [HW, channels] (views of the channels_last maps): q, k and v with
            # unit stride along the head dimension, which SDPA's flash kernel needs (strided
            # ones sent it to the math path: two MKL bmm and a softmax, 1.4x slower here)
            rows = qkv[b].permute(1, 2, 0).reshape(H * W, 3 * C)
            q = rows[idx, :C].view(-1, heads, d).transpose(0, 1)  # [heads, Nq, d]
            k = rows[:, C:2 * C].unflatten(1, (heads, d)).transpose(0, 1)  # [heads, HW, d]
            v = rows[:, 2 * C:].unflatten(1, (heads, d)).transpose(0, 1)
            o = F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0))[0]
            o = o.transpose(0, 1).reshape(-1, C)  # [Nq, C]
            x_rows = x[b].permute(1, 2, 0).reshape(H * W, C)
            out_rows = out[b].permute(1, 2, 0).view(H * W, C)  # a view: written in place
            out_rows[idx] = x_rows[idx] + F.linear(o, w_out, attn.out.bias)
        return out

    def res_attn(self, name: str, block, x: torch.Tensor, emb: torch.Tensor, level: int, x2=None) -> torch.Tensor:
        """ResAttnBlock: a ResBlock, then SelfAttention when the block has one."""
        h = self.resblock(f"{name}.res", block.res, x, emb, level, x2=x2)
        if block.attn is not None:
            h = self.attention(f"{name}.attn", block.attn, h, level)
        return h
