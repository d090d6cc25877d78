"""Attention maps M for YODA (paper Sec. 3.1 and Table 1).

An extractor maps the bicubic-upsampled LR batch ``images`` (float ``[B, 3, H, W]``, RGB in
[0, 1]) to ``[B, 1, H, W]`` float32 maps in [0, 1], min-max normalised per image::

    from yoda_sparse.attention import get_attention
    attn = get_attention("dino_resnet50_max", weights="dino_resnet50_pretrain.pth").to(device)
    M = attn(x_up)

Names (:func:`list_attention`): ``dino_vits8_head0`` .. ``dino_vits8_head5``, ``dino_vits8_avg``,
``dino_vits8_max``, ``dino_resnet50_head0`` .. ``dino_resnet50_head5``, ``dino_resnet50_avg``,
``dino_resnet50_max`` (the paper's choice), ``gaussian``, ``edge``, ``sift``.
"""
from .base import (
    AttentionExtractor,
    check_images,
    get_attention,
    list_attention,
    minmax_normalize,
    register_attention,
    resize_to,
)
from .dino import NUM_HEADS, DinoResNetAttention, DinoViTAttention, aggregate_heads
from .classical import EdgeAttention, GaussianAttention, SIFTAttention
from .weights import WeightsUnavailableError, load_backbone_weights, load_state_dict_file

__all__ = [
    "AttentionExtractor",
    "get_attention",
    "list_attention",
    "register_attention",
    "DinoViTAttention",
    "DinoResNetAttention",
    "GaussianAttention",
    "EdgeAttention",
    "SIFTAttention",
    "aggregate_heads",
    "NUM_HEADS",
    "check_images",
    "minmax_normalize",
    "resize_to",
    "WeightsUnavailableError",
    "load_state_dict_file",
    "load_backbone_weights",
]
