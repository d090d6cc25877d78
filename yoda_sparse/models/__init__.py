"""Denoising networks: the SR3 UNet and SRDiff (RRDB encoder + conditional UNet).

    SR3UNet.forward(cat(x_up, z_t) [B,6,H,W], sqrt_gamma [B]) -> eps [B,3,H,W]
    SRDiff.encode(lr [B,3,h,w]) -> cond;  SRDiff.denoise(z_t [B,3,H,W], t [B], cond) -> eps

Build from a named config with ``build_model("sr3_16_128")``; save and reload with
``save_checkpoint`` / ``load_checkpoint`` (safetensors, config and run settings in the header).
"""

from .checkpoint import FORMAT_VERSION, load_checkpoint, read_checkpoint_metadata, save_checkpoint
from .configs import (
    ModelConfig,
    SR3Config,
    SRDiffConfig,
    build_model,
    config_from_dict,
    get_model_config,
    list_model_configs,
)
from .layers import (
    Downsample,
    NoiseLevelEmbedding,
    ResAttnBlock,
    ResBlock,
    SelfAttention,
    Upsample,
    sinusoidal_embedding,
)
from .sr3 import SR3UNet
from .srdiff import RRDB, RRDBEncoder, SRDiff, SRDiffUNet

__all__ = [
    "SR3UNet", "SRDiff", "SRDiffUNet", "RRDBEncoder", "RRDB",
    "SR3Config", "SRDiffConfig", "ModelConfig",
    "build_model", "get_model_config", "list_model_configs", "config_from_dict",
    "save_checkpoint", "load_checkpoint", "read_checkpoint_metadata", "FORMAT_VERSION",
    "sinusoidal_embedding", "NoiseLevelEmbedding", "ResBlock", "SelfAttention", "ResAttnBlock",
    "Downsample", "Upsample",
]
