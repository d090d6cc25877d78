"""Named model configurations and ``build_model``.

A config is a frozen dataclass that holds every layout field, so ``build_model(config)`` alone
rebuilds a model and a checkpoint carrying ``config.to_dict()`` is self-describing.
Parameter counts quoted below were measured with ``sum(p.numel() for p in model.parameters())``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Union

from torch import nn

__all__ = [
    "SR3Config",
    "SRDiffConfig",
    "ModelConfig",
    "config_from_dict",
    "get_model_config",
    "list_model_configs",
    "build_model",
]


class _ConfigMixin:
    family: str
    name: str

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict (tuples become lists)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Inverse of ``to_dict``; unknown keys raise a ValueError listing them."""
        if not isinstance(data, dict):
            raise TypeError(f"data: expected a dict, got {type(data).__name__}")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{cls.__name__}.from_dict: unknown fields {unknown}; "
                             f"known fields are {sorted(names)}")
        kwargs = {}
        for k, v in data.items():
            kwargs[k] = tuple(v) if isinstance(v, list) else v
        return cls(**kwargs)

    @property
    def lr_size(self) -> int:
        """Low-resolution side length at ``image_size`` (image_size // scale)."""
        return self.image_size // self.scale  # type: ignore[attr-defined]

    def _check_common(self, expected_family: str) -> None:
        if self.family != expected_family:
            raise ValueError(f"family: a {type(self).__name__} must have family={expected_family!r}, "
                             f"got {self.family!r}")
        for name in ("inner_channels", "res_blocks", "scale", "image_size", "in_channels", "out_channels"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        mults = getattr(self, "channel_mults")
        if not mults or not all(isinstance(m, int) and m > 0 for m in mults):
            raise ValueError(f"channel_mults: expected a non-empty tuple of positive ints, got {mults!r}")
        if self.image_size % self.scale:  # type: ignore[attr-defined]
            raise ValueError(f"image_size: {self.image_size} is not a multiple of scale={self.scale}")  # type: ignore[attr-defined]
        if not 0.0 <= self.dropout < 1.0:  # type: ignore[attr-defined]
            raise ValueError(f"dropout: expected a value in [0, 1), got {self.dropout}")  # type: ignore[attr-defined]


@dataclass(frozen=True)
class SR3Config(_ConfigMixin):
    """SR3 UNet layout (see ``yoda_sparse.models.sr3``).

    ``attn_resolutions`` are pixel resolutions at ``image_size`` (SR3's convention).
    ``noise_level_scale`` multiplies sqrt(gamma) in [0, 1] before the sinusoidal encoding.
    ``scale`` is the SR factor: LR side = image_size // scale; x_up is upsampled to image_size.
    """

    name: str
    channel_mults: tuple[int, ...]
    res_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float
    image_size: int
    scale: int
    family: str = "sr3"
    in_channels: int = 6
    out_channels: int = 3
    inner_channels: int = 64
    attn_heads: int = 1
    mid_attention: bool = True
    norm_groups: int = 32
    noise_level_scale: float = 1000.0
    affine_embedding: bool = False

    def __post_init__(self) -> None:
        self._check_common("sr3")


@dataclass(frozen=True)
class SRDiffConfig(_ConfigMixin):
    """SRDiff layout (see ``yoda_sparse.models.srdiff``) plus its diffusion settings.

    ``res_rescale``, ``schedule`` and ``timesteps`` are not used by the network; they travel
    with it so the diffusion layer reconstructs the training setup: the target is the residual
    (hr - lr_up) * res_rescale, cosine schedule, 100 steps.

    Fidelity to the SRDiff code (set by ``yoda-sparse convert srdiff``; the defaults are what
    yoda-sparse's own SRDiff models use): ``embedding_freq_shift=1`` gives the timestep sinusoid
    SRDiff's frequencies ``1e4^(-k/(half-1))`` instead of ``1e4^(-k/half)``;
    ``timestep_zero_based`` feeds the network t - 1 (SRDiff counts timesteps 0..T-1) for this
    library's 1..T.
    """

    name: str
    channel_mults: tuple[int, ...]
    image_size: int
    scale: int
    family: str = "srdiff"
    in_channels: int = 3
    out_channels: int = 3
    inner_channels: int = 64
    res_blocks: int = 2
    rrdb_channels: int = 32
    rrdb_blocks: int = 8
    rrdb_growth: int = 16
    dropout: float = 0.0
    norm_groups: int = 0
    activation: str = "mish"
    padding_mode: str = "reflect"
    freeze_encoder: bool = False
    res_rescale: float = 2.0
    schedule: str = "cosine"
    timesteps: int = 100
    embedding_freq_shift: int = 0
    timestep_zero_based: bool = False

    def __post_init__(self) -> None:
        self._check_common("srdiff")
        if self.embedding_freq_shift not in (0, 1) or isinstance(self.embedding_freq_shift, bool):
            raise ValueError(f"embedding_freq_shift: expected 0 or 1, got {self.embedding_freq_shift!r}")
        if not isinstance(self.timestep_zero_based, bool):
            raise ValueError(f"timestep_zero_based: expected a bool, got {self.timestep_zero_based!r}")
        if self.activation not in ("silu", "mish"):
            raise ValueError(f"activation: expected 'silu' or 'mish', got {self.activation!r}")
        if self.padding_mode not in ("zeros", "reflect"):
            raise ValueError(f"padding_mode: expected 'zeros' or 'reflect', got {self.padding_mode!r}")
        if self.timesteps < 1:
            raise ValueError(f"timesteps: expected >= 1, got {self.timesteps}")


ModelConfig = Union[SR3Config, SRDiffConfig]

_CONFIGS: dict[str, ModelConfig] = {}


def _register(config: ModelConfig) -> ModelConfig:
    _CONFIGS[config.name] = config
    return config


# --- SR3 -------------------------------------------------------------------------------------
#: 16x16 -> 128x128 faces (public SR3 FFHQ/CelebA-HQ layout): 97,807,491 parameters.
SR3_16_128 = _register(SR3Config(
    name="sr3_16_128", channel_mults=(1, 2, 4, 8, 8), res_blocks=2, attn_resolutions=(16,),
    dropout=0.2, image_size=128, scale=8))
#: 64x64 -> 256x256: 27,436,547 parameters. Dropout 0.2 as in the public SR3 configs that use
#: this (1,1,2,2,4,4) layout; the small face datasets YODA trains on overfit without it.
SR3_64_256 = _register(SR3Config(
    name="sr3_64_256", channel_mults=(1, 1, 2, 2, 4, 4), res_blocks=2, attn_resolutions=(16,),
    dropout=0.2, image_size=256, scale=4))
#: 64x64 -> 512x512: 155,334,339 parameters (no attention on any level; the middle block keeps
#: its attention as in the public code). 16 norm groups.
SR3_64_512 = _register(SR3Config(
    name="sr3_64_512", channel_mults=(1, 2, 4, 8, 16), res_blocks=1, attn_resolutions=(),
    dropout=0.0, norm_groups=16, image_size=512, scale=8))
#: CPU-sized, 16 ch, attention at the 8px level of a 32px image: 263,091 parameters.
SR3_TINY = _register(SR3Config(
    name="sr3_tiny", inner_channels=16, channel_mults=(1, 2, 2), res_blocks=1,
    attn_resolutions=(8,), dropout=0.0, norm_groups=8, image_size=32, scale=4))
#: CPU-sized, 32 ch: 3,026,979 parameters.
SR3_SMALL = _register(SR3Config(
    name="sr3_small", inner_channels=32, channel_mults=(1, 2, 2, 4), res_blocks=1,
    attn_resolutions=(8,), dropout=0.1, norm_groups=16, image_size=64, scale=4))

# --- SRDiff ----------------------------------------------------------------------------------
#: DF2K x4 as released with SRDiff (configs/diffsr_df2k4x.yaml): hidden 64, mults (1,2,3,4)
#: (the base config's (1,2,2,4) is overridden for DF2K), RRDB nf 32, 8 blocks, gc = nf // 2 = 16,
#: 160px HR patches. 13,205,411 parameters (RRDB encoder 1,450,144 + UNet 11,755,267).
SRDIFF_DF2K_X4 = _register(SRDiffConfig(
    name="srdiff_df2k_x4", channel_mults=(1, 2, 3, 4), image_size=160, scale=4))
#: CelebA x8 (configs/diffsr_celeb.yaml): base layout, mults (1,2,2,4), 20x20 -> 160x160.
#: 11,995,939 parameters (encoder 1,450,144 + UNet 10,545,795).
SRDIFF_CELEBA_X8 = _register(SRDiffConfig(
    name="srdiff_celeba_x8", channel_mults=(1, 2, 2, 4), image_size=160, scale=8))
#: CPU-sized x4: 16 ch, RRDB nf 8 x 2 blocks: 283,035 parameters.
SRDIFF_TINY = _register(SRDiffConfig(
    name="srdiff_tiny", inner_channels=16, channel_mults=(1, 2, 2), rrdb_channels=8,
    rrdb_blocks=2, rrdb_growth=8, image_size=32, scale=4))
#: CPU-sized x4: 32 ch, RRDB nf 16 x 5 blocks: 2,833,859 parameters.
SRDIFF_SMALL = _register(SRDiffConfig(
    name="srdiff_small", inner_channels=32, channel_mults=(1, 2, 2, 4), rrdb_channels=16,
    rrdb_blocks=5, rrdb_growth=16, image_size=64, scale=4))


def list_model_configs(family: str | None = None) -> list[str]:
    """Names of the registered configs, optionally only those of ``family`` ("sr3"/"srdiff")."""
    if family not in (None, "sr3", "srdiff"):
        raise ValueError(f"family: expected None, 'sr3' or 'srdiff', got {family!r}")
    return [n for n, c in _CONFIGS.items() if family is None or c.family == family]


def get_model_config(name: str) -> ModelConfig:
    """The registered config called ``name`` (frozen; use ``dataclasses.replace`` to vary it)."""
    try:
        return _CONFIGS[name]
    except KeyError:
        raise ValueError(f"name: unknown model config {name!r}; known: {sorted(_CONFIGS)}") from None


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Rebuild a config of either family from ``to_dict()`` output (dispatches on ``family``)."""
    if not isinstance(data, dict):
        raise TypeError(f"data: expected a dict, got {type(data).__name__}")
    family = data.get("family")
    if family == "sr3":
        return SR3Config.from_dict(data)
    if family == "srdiff":
        return SRDiffConfig.from_dict(data)
    raise ValueError(f"data['family']: expected 'sr3' or 'srdiff', got {family!r}")


def build_model(config: ModelConfig | str, device=None) -> nn.Module:
    """Instantiate the model for a config or a registered config name.

    ``device`` (e.g. ``torch.device("meta")``) is passed to the default-device context so large
    models can be built without allocating memory.
    """
    import torch

    from .sr3 import SR3UNet
    from .srdiff import SRDiff

    if isinstance(config, str):
        config = get_model_config(config)
    if isinstance(config, SR3Config):
        cls = SR3UNet
    elif isinstance(config, SRDiffConfig):
        cls = SRDiff
    else:
        raise TypeError(f"config: expected SR3Config, SRDiffConfig or a config name, got {type(config).__name__}")
    if device is None:
        return cls.from_config(config)
    with torch.device(device):
        return cls.from_config(config)
