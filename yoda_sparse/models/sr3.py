"""SR3 noise-prediction UNet (Saharia et al. 2021, "Image Super-Resolution via Iterative
Refinement"), in the layout of the public PyTorch SR3 re-implementation so that parameter counts
match it.

Input is the channel concatenation (x_up, z_t): the bicubic-upsampled LR image and the noisy HR
estimate, both [B, 3, H, W] in [-1, 1]. The network is conditioned on the continuous noise level
sqrt(gamma) (gamma = alphas_cumprod), not on an integer step, so any respacing of the schedule
at sampling time works without retraining.

Layout (L = len(channel_mults), C = inner_channels):
    input 3x3 conv 6->C
    down level i (resolution image_size / 2**i): res_blocks x [ResBlock (+attn)], then a
        stride-2 conv except on the last level; every output is kept as a skip
    middle: ResBlock+attn, ResBlock
    up level i (reversed): (res_blocks + 1) x [concat skip, ResBlock (+attn)], then nearest
        x2 + conv except on level 0
    output: GroupNorm, SiLU, 3x3 conv C->3
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .layers import Downsample, NoiseLevelEmbedding, ResAttnBlock, ResBlock, SelfAttention, Upsample

if TYPE_CHECKING:
    from .configs import SR3Config

__all__ = ["SR3UNet"]


class SR3UNet(nn.Module):
    """SR3 UNet: ``forward(x [B, in_channels, H, W], noise_level [B]) -> eps [B, out_channels, H, W]``.

    ``H`` and ``W`` must be multiples of ``size_multiple = 2 ** (len(channel_mults) - 1)``.
    Attention resolutions are given in pixels at the training ``image_size`` (as in SR3's
    configs) and are converted to level indices once, so a model trained on 128x128 crops keeps
    attention on the same levels when run on other sizes.
    """

    family = "sr3"

    def __init__(self, *, in_channels: int = 6, out_channels: int = 3, inner_channels: int = 64,
                 channel_mults: tuple[int, ...] = (1, 2, 4, 8, 8), res_blocks: int = 2,
                 attn_resolutions: tuple[int, ...] = (16,), attn_heads: int = 1,
                 mid_attention: bool = True, dropout: float = 0.0, norm_groups: int = 32,
                 noise_level_scale: float = 1000.0, affine_embedding: bool = False,
                 image_size: int = 128):
        super().__init__()
        if not channel_mults:
            raise ValueError("channel_mults: expected at least one level, got ()")
        if res_blocks < 1:
            raise ValueError(f"res_blocks: expected >= 1, got {res_blocks}")
        num_levels = len(channel_mults)
        level_res = [image_size // 2 ** i for i in range(num_levels)]
        unknown = sorted(set(attn_resolutions) - set(level_res))
        if unknown:
            raise ValueError(f"attn_resolutions: {unknown} match no level of a {image_size}px "
                             f"image with {num_levels} levels (level resolutions {level_res})")
        self.attn_levels = tuple(i for i, r in enumerate(level_res) if r in set(attn_resolutions))
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.size_multiple = 2 ** (num_levels - 1)
        emb_dim = inner_channels

        def block(cin: int, cout: int, attn: bool) -> ResAttnBlock:
            res = ResBlock(cin, cout, emb_dim, dropout=dropout, norm_groups=norm_groups,
                           affine_embedding=affine_embedding)
            return ResAttnBlock(res, SelfAttention(cout, attn_heads, norm_groups) if attn else None)

        self.noise_embed = NoiseLevelEmbedding(inner_channels, inner_channels * 4, emb_dim,
                                               scale=noise_level_scale)
        self.input_conv = nn.Conv2d(in_channels, inner_channels, 3, padding=1)

        ch = inner_channels
        skip_channels = [ch]
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for i, mult in enumerate(channel_mults):
            blocks = nn.ModuleList()
            for _ in range(res_blocks):
                blocks.append(block(ch, inner_channels * mult, i in self.attn_levels))
                ch = inner_channels * mult
                skip_channels.append(ch)
            self.down_blocks.append(blocks)
            if i < num_levels - 1:
                self.downsamples.append(Downsample(ch))
                skip_channels.append(ch)

        self.mid_blocks = nn.ModuleList([block(ch, ch, mid_attention), block(ch, ch, False)])

        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for i in reversed(range(num_levels)):
            blocks = nn.ModuleList()
            for _ in range(res_blocks + 1):
                cout = inner_channels * channel_mults[i]
                blocks.append(block(ch + skip_channels.pop(), cout, i in self.attn_levels))
                ch = cout
            self.up_blocks.append(blocks)
            if i > 0:
                self.upsamples.append(Upsample(ch))
        assert not skip_channels

        self.output = nn.Sequential(
            nn.GroupNorm(norm_groups, ch) if norm_groups else nn.Identity(),
            nn.SiLU(),
            nn.Conv2d(ch, out_channels, 3, padding=1),
        )

    @classmethod
    def from_config(cls, config: SR3Config) -> SR3UNet:
        return cls(in_channels=config.in_channels, out_channels=config.out_channels,
                   inner_channels=config.inner_channels, channel_mults=tuple(config.channel_mults),
                   res_blocks=config.res_blocks, attn_resolutions=tuple(config.attn_resolutions),
                   attn_heads=config.attn_heads, mid_attention=config.mid_attention,
                   dropout=config.dropout, norm_groups=config.norm_groups,
                   noise_level_scale=config.noise_level_scale,
                   affine_embedding=config.affine_embedding, image_size=config.image_size)

    def check_input(self, x: torch.Tensor, noise_level: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected [B, {self.in_channels}, H, W] (x_up and z_t concatenated), "
                             f"got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        m = self.size_multiple
        if h % m or w % m:
            raise ValueError(f"x: H and W must be multiples of {m} for {len(self.down_blocks)} "
                             f"levels, got {h}x{w}")
        if noise_level.shape != (x.shape[0],):
            raise ValueError(f"noise_level: expected shape [B]=({x.shape[0]},) of sqrt(gamma) values, "
                             f"got {tuple(noise_level.shape)}")
        if not noise_level.is_floating_point():
            raise TypeError(f"noise_level: expected a float tensor of sqrt(gamma) in [0, 1], "
                            f"got dtype {noise_level.dtype}")

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        """Predict the noise eps in z_t = sqrt(gamma) y + sqrt(1 - gamma) eps.

        Args:
            x: [B, in_channels, H, W], cat(x_up, z_t) along channels.
            noise_level: [B] float, sqrt(gamma) in [0, 1] (SR3 eq. 6's conditioning).
        Returns:
            [B, out_channels, H, W] predicted noise, dtype of ``x``.
        """
        self.check_input(x, noise_level)
        emb = self.noise_embed(noise_level)
        h = self.input_conv(x)
        skips = [h]
        for i, blocks in enumerate(self.down_blocks):
            for blk in blocks:
                h = blk(h, emb)
                skips.append(h)
            if i < len(self.downsamples):
                h = self.downsamples[i](h)
                skips.append(h)
        for blk in self.mid_blocks:
            h = blk(h, emb)
        for j, blocks in enumerate(self.up_blocks):
            for blk in blocks:
                h = blk(torch.cat([h, skips.pop()], dim=1), emb)
            if j < len(self.upsamples):
                h = self.upsamples[j](h)
        return self.output(h)
