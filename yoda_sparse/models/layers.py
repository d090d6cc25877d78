"""Building blocks shared by the SR3 UNet and the SRDiff conditional UNet.

Everything here is a plain ``nn.Module`` made of ``Conv2d`` / ``GroupNorm`` / ``Linear`` so that
the sparse executor (``yoda_sparse.sparse``) can walk a UNet and replace its convolutions with
tile-gathering ones without knowing about the model family.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "sinusoidal_embedding",
    "NoiseLevelEmbedding",
    "ResBlock",
    "SelfAttention",
    "ResAttnBlock",
    "Downsample",
    "Upsample",
    "make_activation",
]


def make_activation(name: str) -> nn.Module:
    """``"silu"`` (SR3's Swish) or ``"mish"`` (SRDiff)."""
    if name == "silu":
        return nn.SiLU()
    if name == "mish":
        return nn.Mish()
    raise ValueError(f"activation: expected 'silu' or 'mish', got {name!r}")


def sinusoidal_embedding(values: torch.Tensor, dim: int, scale: float = 1.0,
                         max_period: float = 10000.0, freq_shift: int = 0) -> torch.Tensor:
    """Transformer-style sinusoidal encoding of a batch of scalars.

    Args:
        values: [B] float or integer tensor (diffusion step t, or SR3's continuous sqrt(gamma)).
        dim: even embedding width.
        scale: multiplies ``values`` first; SR3's noise level lives in [0, 1], so a scale of
            ~1000 spreads it over the same phase range an integer step would have.
        max_period: lowest frequency is 1 / max_period.
        freq_shift: 0 (this library's and SR3's ``f_k = max_period ** (-k / half)``) or 1
            (DDPM's and SRDiff's ``f_k = max_period ** (-k / (half - 1))``, whose lowest
            frequency is exactly 1 / max_period), half = dim // 2.

    Returns:
        [B, dim] float32 tensor ``cat(sin(v * f_k), cos(v * f_k))`` with
        ``f_k = max_period ** (-k / (dim // 2 - freq_shift))``, k = 0 .. dim//2 - 1.
    """
    if dim <= 0 or dim % 2:
        raise ValueError(f"dim: expected a positive even embedding width, got {dim}")
    if values.dim() != 1:
        raise ValueError(f"values: expected a 1-D tensor [B], got shape {tuple(values.shape)}")
    if freq_shift not in (0, 1):
        raise ValueError(f"freq_shift: expected 0 or 1, got {freq_shift!r}")
    half = dim // 2
    if half - freq_shift < 1:
        raise ValueError(f"dim: {dim} is too small for freq_shift={freq_shift} (needs dim // 2 > {freq_shift})")
    # float32 even under autocast/bf16 models: bf16 cannot resolve t*f for t ~ 1000.
    if freq_shift == 0:
        exponent = torch.arange(half, dtype=torch.float32, device=values.device) / half
        freqs = torch.exp(-math.log(max_period) * exponent)
    else:
        # the operations of the DDPM/SRDiff reference code, in its order, so that converted
        # SRDiff models embed their timesteps to the last bit as SRDiff does
        freqs = torch.exp(torch.arange(half, device=values.device) * -(math.log(max_period) / (half - freq_shift)))
    args = values.to(torch.float32)[:, None] * (scale * freqs)[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class NoiseLevelEmbedding(nn.Module):
    """Sinusoidal encoding of a [B] conditioning scalar followed by a 2-layer MLP.

    ``Linear(dim, hidden) -> act -> Linear(hidden, out_dim)``; the result is added (through a
    per-block Linear) in every ResBlock. ``freq_shift`` as in :func:`sinusoidal_embedding`.
    """

    def __init__(self, dim: int, hidden_dim: int, out_dim: int, scale: float = 1.0,
                 activation: str = "silu", freq_shift: int = 0):
        super().__init__()
        if freq_shift not in (0, 1):
            raise ValueError(f"freq_shift: expected 0 or 1, got {freq_shift!r}")
        self.dim = dim
        self.scale = float(scale)
        self.freq_shift = int(freq_shift)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden_dim),
            make_activation(activation),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        emb = sinusoidal_embedding(values, self.dim, scale=self.scale, freq_shift=self.freq_shift)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """Residual block with an additive (or FiLM) embedding.

    ``pre_activation=True`` (SR3):  h = conv1(drop0(act(norm1(x)))); h += W e;
                                    h = conv2(drop(act(norm2(h)))).
    ``pre_activation=False`` (SRDiff): h = act(norm1(conv1(x))); h += W act(e);
                                       h = act(norm2(conv2(drop(h)))).
    Output is h + skip(x), skip a 1x1 conv when the channel count changes.

    ``norm_groups=0`` disables normalization (SRDiff's published setting). With
    ``affine_embedding`` the projection yields (gamma, beta) and h = (1 + gamma) h + beta.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, *, dropout: float = 0.0,
                 norm_groups: int = 32, activation: str = "silu", pre_activation: bool = True,
                 padding_mode: str = "zeros", affine_embedding: bool = False,
                 activate_embedding: bool = False):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a value in [0, 1), got {dropout}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.pre_activation = pre_activation
        self.affine_embedding = affine_embedding
        norm_in, norm_out = (in_channels, out_channels) if pre_activation else (out_channels, out_channels)
        self.norm1 = _group_norm(norm_groups, norm_in)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, padding_mode=padding_mode)
        self.norm2 = _group_norm(norm_groups, norm_out)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, padding_mode=padding_mode)
        self.act = make_activation(activation)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.emb_act = make_activation(activation) if activate_embedding else nn.Identity()
        self.emb_proj = nn.Linear(emb_dim, out_channels * (2 if affine_embedding else 1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def _add_embedding(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        e = self.emb_proj(self.emb_act(emb)).to(h.dtype)[:, :, None, None]
        if self.affine_embedding:
            gamma, beta = e.chunk(2, dim=1)
            return h * (1 + gamma) + beta
        return h + e

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.pre_activation:
            h = self.conv1(self.act(self.norm1(x)))
            h = self._add_embedding(h, emb)
            h = self.conv2(self.dropout(self.act(self.norm2(h))))
        else:
            h = self.act(self.norm1(self.conv1(x)))
            h = self._add_embedding(h, emb)
            h = self.act(self.norm2(self.conv2(self.dropout(h))))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    """Spatial self-attention over all H*W positions, residual.

    GroupNorm -> 1x1 conv to q,k,v (no bias) -> softmax(q k^T / sqrt(head_dim)) v -> 1x1 conv.
    SR3 uses a single head (scale 1/sqrt(C)).
    """

    def __init__(self, channels: int, num_heads: int = 1, norm_groups: int = 32):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads: {num_heads} does not divide channels={channels}")
        self.num_heads = num_heads
        self.norm = _group_norm(norm_groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=False)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        heads = self.num_heads
        qkv = self.qkv(self.norm(x)).reshape(b, 3, heads, c // heads, h * w)
        # [B, heads, HW, d] for scaled_dot_product_attention; contiguous, since the fused
        # (flash / memory-efficient) kernels need a unit stride in d and otherwise the math
        # path materialises the [HW, HW] scores (14 GB at 60000 positions)
        q, k, v = (qkv[:, i].transpose(-1, -2).contiguous() for i in range(3))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.out(out)


class ResAttnBlock(nn.Module):
    """A ResBlock optionally followed by SelfAttention (SR3's ``ResnetBlocWithAttn``)."""

    def __init__(self, res: ResBlock, attn: SelfAttention | None = None):
        super().__init__()
        self.res = res
        self.attn = attn

    @property
    def out_channels(self) -> int:
        return self.res.out_channels

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x)
        return x


class Downsample(nn.Module):
    """Halve H and W with a 3x3 stride-2 conv (padding 1; H, W must be even)."""

    def __init__(self, channels: int, padding_mode: str = "zeros"):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1, padding_mode=padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W.

    ``mode="nearest_conv"`` (SR3): nearest-neighbour x2 then a 3x3 conv.
    ``mode="transposed"`` (SRDiff): ConvTranspose2d(kernel 4, stride 2, padding 1).
    """

    def __init__(self, channels: int, mode: str = "nearest_conv", padding_mode: str = "zeros"):
        super().__init__()
        self.mode = mode
        if mode == "nearest_conv":
            self.conv = nn.Conv2d(channels, channels, 3, padding=1, padding_mode=padding_mode)
        elif mode == "transposed":
            self.conv = nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1)
        else:
            raise ValueError(f"mode: expected 'nearest_conv' or 'transposed', got {mode!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "nearest_conv":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


def _group_norm(groups: int, channels: int) -> nn.Module:
    if groups == 0:
        return nn.Identity()
    if groups < 0 or channels % groups:
        raise ValueError(f"norm_groups: expected 0 (no norm) or a divisor of {channels} channels, got {groups}")
    return nn.GroupNorm(groups, channels)
