"""SRDiff (Li et al. 2022, "SRDiff: Single Image Super-Resolution with Diffusion Probabilistic
Models"): an RRDB LR encoder plus a conditional UNet that predicts the noise of the diffused
residual r = (y - x_up) * res_rescale.

Split in two so a sampler runs the encoder once per image and the UNet once per step:
    cond = model.encode(lr)              # [B, rrdb_channels * n_feats, h, w]
    eps  = model.denoise(z_t, t, cond)   # per step
    model(z_t, t, lr) == model.denoise(z_t, t, model.encode(lr))

Layout in the public SRDiff code's arrangement (L = len(channel_mults), C = inner_channels):
    encoder: 3x3 conv 3->nf, rrdb_blocks x RRDB(nf, gc), trunk 3x3 conv; the condition is the
        concatenation of every third trunk feature (features 3, 6, ..., and the final
        ``first + trunk_conv(.)`` feature), all at LR resolution
    cond_proj: ConvTranspose2d to C channels at HR resolution (kernel 2*scale, stride scale)
    down level i: res_blocks x ResBlock (the first 3->C on level 0); on level 0 the projected
        condition is added after the blocks; stride-2 conv except on the last level
    middle: ResBlock, ResBlock
    up level i = L-1 .. 1: concat the level-i features, res_blocks x ResBlock to the level i-1
        width, transposed-conv x2
    output: conv block C->C, 1x1 conv C->3
ResBlocks are conv-first (conv, [GroupNorm], act) with reflection padding; the published models
use no normalization and Mish.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .layers import Downsample, NoiseLevelEmbedding, ResBlock, Upsample, make_activation

if TYPE_CHECKING:
    from .configs import SRDiffConfig

__all__ = ["ResidualDenseBlock", "RRDB", "RRDBEncoder", "SRDiffUNet", "SRDiff"]


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs (growth ``gc``), LeakyReLU(0.2), residual scaled 0.2 (ESRGAN)."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(nf + k * gc, gc if k < 4 else nf, 3, padding=1) for k in range(5))
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for k, conv in enumerate(self.convs):
            out = conv(torch.cat(feats, dim=1))
            if k < 4:
                feats.append(self.act(out))
        return x + 0.2 * out


class RRDB(nn.Module):
    """Residual-in-residual dense block: three ResidualDenseBlocks, residual scaled 0.2."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.blocks = nn.Sequential(*(ResidualDenseBlock(nf, gc) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.blocks(x)


class RRDBEncoder(nn.Module):
    """LR encoder: ``forward(lr [B, 3, h, w] in [-1, 1]) -> cond [B, out_channels, h, w]``.

    The condition is the concatenation of trunk features 3, 6, 9, ... (1-based) where the last
    one, number ``num_blocks + 1``, is ``first_conv(lr) + trunk_conv(rrdb_out)``; this keeps
    ``(num_blocks + 1) // 3`` features of ``nf`` channels each, as SRDiff does. The RRDBNet SR
    head used to pretrain this encoder is not part of it (SRDiff never uses it to condition).
    """

    def __init__(self, in_channels: int = 3, nf: int = 32, num_blocks: int = 8, gc: int = 16):
        super().__init__()
        if num_blocks < 2:
            raise ValueError(f"rrdb_blocks: expected >= 2 (the condition takes every third "
                             f"feature of num_blocks + 1), got {num_blocks}")
        self.first_conv = nn.Conv2d(in_channels, nf, 3, padding=1)
        self.blocks = nn.ModuleList(RRDB(nf, gc) for _ in range(num_blocks))
        self.trunk_conv = nn.Conv2d(nf, nf, 3, padding=1)
        self.keep = tuple(range(2, num_blocks + 1, 3))  # 0-based indices into the num_blocks+1 features
        self.out_channels = nf * len(self.keep)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        first = self.first_conv((lr + 1) / 2)  # the RRDB was trained on [0, 1] inputs
        feats = []
        h = first
        for blk in self.blocks:
            h = blk(h)
            feats.append(h)
        feats.append(first + self.trunk_conv(h))
        return torch.cat([feats[i] for i in self.keep], dim=1)


class SRDiffUNet(nn.Module):
    """Conditional noise predictor ``forward(z_t [B,3,H,W], t [B], cond [B,Cc,H/s,W/s]) -> eps``.

    ``t`` is the training timestep in this library's 1..T. ``timestep_zero_based`` embeds
    ``t - 1`` (SRDiff's code counts 0..T-1); ``embedding_freq_shift`` is the sinusoid's
    frequency convention (see :func:`~yoda_sparse.models.layers.sinusoidal_embedding`).
    """

    def __init__(self, *, in_channels: int = 3, out_channels: int = 3, inner_channels: int = 64,
                 channel_mults: tuple[int, ...] = (1, 2, 2, 4), res_blocks: int = 2,
                 cond_channels: int = 96, scale: int = 4, dropout: float = 0.0,
                 norm_groups: int = 0, activation: str = "mish", padding_mode: str = "reflect",
                 embedding_freq_shift: int = 0, timestep_zero_based: bool = False):
        super().__init__()
        if len(channel_mults) < 2:
            raise ValueError(f"channel_mults: expected >= 2 levels, got {tuple(channel_mults)}")
        if res_blocks < 1:
            raise ValueError(f"res_blocks: expected >= 1, got {res_blocks}")
        if scale < 1:
            raise ValueError(f"scale: expected >= 1, got {scale}")
        self.in_channels = in_channels
        self.scale = scale
        self.size_multiple = 2 ** (len(channel_mults) - 1)
        self.timestep_zero_based = bool(timestep_zero_based)
        emb_dim = inner_channels

        def block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout=dropout, norm_groups=norm_groups,
                            activation=activation, pre_activation=False, padding_mode=padding_mode,
                            activate_embedding=True)

        # out = (h - 1) * s - 2 * (s // 2) + k == h * s for k = 2s - s % 2
        self.cond_proj = nn.ConvTranspose2d(cond_channels, inner_channels, 2 * scale - scale % 2,
                                            stride=scale, padding=scale // 2)
        self.time_embed = NoiseLevelEmbedding(inner_channels, inner_channels * 4, emb_dim,
                                              activation=activation, freq_shift=embedding_freq_shift)
        widths = [inner_channels * m for m in channel_mults]
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        ch = in_channels
        for i, w in enumerate(widths):
            self.down_blocks.append(nn.ModuleList(block(ch if k == 0 else w, w) for k in range(res_blocks)))
            ch = w
            if i < len(widths) - 1:
                self.downsamples.append(Downsample(w, padding_mode=padding_mode))
        self.mid_blocks = nn.ModuleList([block(ch, ch), block(ch, ch)])
        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for i in reversed(range(1, len(widths))):
            w = widths[i - 1]
            self.up_blocks.append(nn.ModuleList(block(ch + widths[i] if k == 0 else w, w) for k in range(res_blocks)))
            self.upsamples.append(Upsample(w, mode="transposed"))
            ch = w
        self.output = nn.Sequential(
            nn.Conv2d(ch, ch, 3, padding=1, padding_mode=padding_mode),
            nn.GroupNorm(norm_groups, ch) if norm_groups else nn.Identity(),
            make_activation(activation),
            nn.Conv2d(ch, out_channels, 1),
        )

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, _, hh, ww = z_t.shape
        if z_t.dim() != 4 or z_t.shape[1] != self.in_channels:
            raise ValueError(f"z_t: expected [B, {self.in_channels}, H, W], got shape {tuple(z_t.shape)}")
        m = self.size_multiple
        if hh % m or ww % m:
            raise ValueError(f"z_t: H and W must be multiples of {m} for {len(self.down_blocks)} "
                             f"levels, got {hh}x{ww}")
        if t.shape != (b,):
            raise ValueError(f"t: expected shape [B]=({b},), got {tuple(t.shape)}")
        expected = (b, self.cond_proj.in_channels, hh // self.scale, ww // self.scale)
        if tuple(cond.shape) != expected or hh % self.scale or ww % self.scale:
            raise ValueError(f"cond: expected {list(expected)} (encoder features at LR = z_t size / "
                             f"scale {self.scale}), got {list(cond.shape)} for z_t {hh}x{ww}")
        # t is this library's 1..T; a network trained on SRDiff's 0..T-1 sees t - 1
        emb = self.time_embed(t - 1 if self.timestep_zero_based else t)
        cond_hr = self.cond_proj(cond)
        h = z_t
        skips = []
        for i, blocks in enumerate(self.down_blocks):
            for blk in blocks:
                h = blk(h, emb)
            if i == 0:
                h = h + cond_hr
            skips.append(h)
            if i < len(self.downsamples):
                h = self.downsamples[i](h)
        for blk in self.mid_blocks:
            h = blk(h, emb)
        for j, blocks in enumerate(self.up_blocks):
            h = torch.cat([h, skips.pop()], dim=1)
            for blk in blocks:
                h = blk(h, emb)
            h = self.upsamples[j](h)
        return self.output(h)


class SRDiff(nn.Module):
    """RRDB encoder + conditional UNet.

    ``encode(lr [B, 3, h, w] in [-1, 1]) -> cond [B, rrdb_channels * ((rrdb_blocks + 1) // 3), h, w]``
    ``denoise(z_t [B, 3, h*scale, w*scale], t [B] int or float step, cond) -> eps``
    ``forward(z_t, t, lr) = denoise(z_t, t, encode(lr))``

    z_t is the noisy residual (y - x_up) * res_rescale at step t. With ``freeze_encoder`` the
    encoder's parameters have requires_grad=False and it stays in eval mode through ``train()``.
    """

    family = "srdiff"

    def __init__(self, *, in_channels: int = 3, out_channels: int = 3, inner_channels: int = 64,
                 channel_mults: tuple[int, ...] = (1, 2, 2, 4), res_blocks: int = 2,
                 rrdb_channels: int = 32, rrdb_blocks: int = 8, rrdb_growth: int = 16,
                 scale: int = 4, dropout: float = 0.0, norm_groups: int = 0,
                 activation: str = "mish", padding_mode: str = "reflect",
                 freeze_encoder: bool = False, embedding_freq_shift: int = 0,
                 timestep_zero_based: bool = False):
        super().__init__()
        self.scale = scale
        self.encoder = RRDBEncoder(3, rrdb_channels, rrdb_blocks, rrdb_growth)
        self.unet = SRDiffUNet(in_channels=in_channels, out_channels=out_channels,
                               inner_channels=inner_channels, channel_mults=tuple(channel_mults),
                               res_blocks=res_blocks, cond_channels=self.encoder.out_channels,
                               scale=scale, dropout=dropout, norm_groups=norm_groups,
                               activation=activation, padding_mode=padding_mode,
                               embedding_freq_shift=embedding_freq_shift,
                               timestep_zero_based=timestep_zero_based)
        self.size_multiple = self.unet.size_multiple
        self.freeze_encoder = False
        if freeze_encoder:
            self.set_encoder_frozen(True)

    @classmethod
    def from_config(cls, config: SRDiffConfig) -> SRDiff:
        return cls(in_channels=config.in_channels, out_channels=config.out_channels,
                   inner_channels=config.inner_channels, channel_mults=tuple(config.channel_mults),
                   res_blocks=config.res_blocks, rrdb_channels=config.rrdb_channels,
                   rrdb_blocks=config.rrdb_blocks, rrdb_growth=config.rrdb_growth,
                   scale=config.scale, dropout=config.dropout, norm_groups=config.norm_groups,
                   activation=config.activation, padding_mode=config.padding_mode,
                   freeze_encoder=config.freeze_encoder,
                   embedding_freq_shift=config.embedding_freq_shift,
                   timestep_zero_based=config.timestep_zero_based)

    def set_encoder_frozen(self, frozen: bool) -> None:
        """Freeze (requires_grad False, eval mode) or unfreeze the RRDB encoder."""
        self.freeze_encoder = bool(frozen)
        for p in self.encoder.parameters():
            p.requires_grad_(not frozen)
        self.encoder.train(self.training and not frozen)

    def train(self, mode: bool = True) -> SRDiff:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def encode(self, lr: torch.Tensor) -> torch.Tensor:
        if lr.dim() != 4 or lr.shape[1] != 3:
            raise ValueError(f"lr: expected [B, 3, h, w] in [-1, 1], got shape {tuple(lr.shape)}")
        if self.freeze_encoder:
            with torch.no_grad():
                return self.encoder(lr)
        return self.encoder(lr)

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(z_t, t, cond)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        return self.denoise(z_t, t, self.encode(lr))
