"""DINO attention maps (paper Sec. 4.2.1, Table 1): ViT-S/8 self-attention and ResNet-50 "heads".

Both extractors produce six raw per-head maps on the backbone's grid (:meth:`head_maps`,
``[B, 6, h, w]``, non-negative), then: bilinear resize to the input's H x W, per-head min-max to
[0, 1], aggregation (one head, AVG = mean over the six heads, MAX = elementwise max over them,
the paper's best choice), and a final per-image min-max.

Input size (the policy of DINO's ``visualize_attention.py``).  Each image is first resized
(bilinear, antialiased, as torchvision's ``Resize``): ``input_size=224`` (the default; DINO was
trained on 224 x 224 crops) makes its short side 224 and its long side
``int(224 * long / short)``, as ``Resize(224)`` does; a pair ``(h, w)`` resizes to exactly that;
``None`` keeps the image's size, except that a side shorter than one patch (8 pixels, ViT only) is
enlarged to 8.  The ViT then takes the top-left crop whose sides are multiples of its patch size 8,
as DINO does (nothing is stretched to a multiple), and interpolates its position embedding to that
patch grid with DINO's own formula (:func:`interpolate_pos_embed`), so its maps equal DINO's at any
size.  The maps cover the crop; the strip it left out (under 8 backbone pixels at the bottom and
the right) takes the values of the nearest covered row or column when the maps are resized to the
image.  Images are normalised with the ImageNet mean/std DINO was trained with.

ViT-S/8 (timm ``vit_small_patch8_224``, DINO weights ``vit_small_patch8_224.dino``): the
attention of the CLS query over the patch keys in the *last* block, for each of its 6 heads:
``softmax(q_cls . k^T * scale)`` computed from the last block's ``norm1`` -> ``qkv``
(recomputed here, because timm's fused attention never materialises the probabilities).  The
tokens are built here rather than by timm's ``forward_features``, because timm resamples the
position embedding differently from DINO at any grid but the trained 28 x 28 one.
The CLS row is taken after the softmax over all tokens, CLS included, as in DINO's
``visualize_attention.py``.

ResNet-50 (timm ``resnet50`` = torchvision layout, DINO weights ``dino_resnet50_pretrain.pth``).
A CNN has no attention heads and the paper gives no recipe, so "head" k is defined as
*activation-based spatial attention* (Zagoruyko & Komodakis, 2017) of one sixth of the
features: the 2048 post-ReLU channels of the last stage (``layer4``, stride 32) are split into
6 contiguous groups (342, 342, 341, 341, 341, 341 channels) and each group is reduced to one
spatial map by its channel mean.  Why this recipe:

- It needs no labels, gradients or classifier (DINO's backbone has none, so Grad-CAM/CAM are
  out) and uses the same last-stage semantics the ViT's last block carries.
- It mirrors the ViT, whose 6 heads each own a contiguous 64-dim slice of the 384-dim
  embedding: each ResNet "head" likewise sees a fixed slice of the representation, so the heads
  differ (as in the paper's Fig. 3) while AVG of the raw group maps is, up to the group sizes,
  the classic full-channel activation map.
- It is deterministic and cheap (one forward pass), and MAX over groups marks a location when
  any group of features fires there, which gives the broad coverage the paper reports for
  ResNet-50 MAX (~70% of pixel updates, Fig. 4).

Channel order in a CNN is arbitrary, so the individual groups carry no meaning of their own;
only AVG/MAX are recommended for use, as in the paper.
"""
from __future__ import annotations

import abc
import math
from typing import Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import AttentionExtractor, check_images, minmax_normalize, register_attention, resize_to
from .weights import build_for_loading, load_backbone_weights, load_state_dict_file, resolve_pretrained

__all__ = ["DinoViTAttention", "DinoResNetAttention", "aggregate_heads", "interpolate_pos_embed", "NUM_HEADS"]

NUM_HEADS = 6
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DINO_VITS8_HF_REPO = "timm/vit_small_patch8_224.dino"
DINO_VITS8_URL = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"
DINO_RESNET50_URL = "https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth"

Heads = Union[int, str]
InputSize = Union[None, int, Tuple[int, int]]


def _check_heads(heads) -> Heads:
    if isinstance(heads, str) and heads in ("avg", "max"):
        return heads
    if isinstance(heads, int) and not isinstance(heads, bool) and 0 <= heads < NUM_HEADS:
        return heads
    raise ValueError(f"heads must be an int in [0, {NUM_HEADS - 1}], 'avg' or 'max', got {heads!r}")


def aggregate_heads(maps: torch.Tensor, heads: Heads) -> torch.Tensor:
    """Combine per-head maps ``[B, 6, H, W]`` into ``[B, 1, H, W]``: one head, ``"avg"`` (mean
    over heads) or ``"max"`` (elementwise max over heads)."""
    heads = _check_heads(heads)
    if heads == "avg":
        return maps.mean(dim=1, keepdim=True)
    if heads == "max":
        return maps.amax(dim=1, keepdim=True)
    return maps[:, heads:heads + 1]


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: Tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """A ViT position embedding ``[1, prefix + n*n, C]`` for a ``grid = (gh, gw)`` of patches, as
    DINO's ``VisionTransformer.interpolate_pos_encoding`` computes it.

    At the trained square grid (n x n, 28 x 28 for ViT-S/8 at 224) it is returned unchanged.
    Elsewhere the n x n patch part is resampled bicubically (align_corners=False, no antialias)
    with the *scale factors* ``((gh + 0.1) / n, (gw + 0.1) / n)`` rather than an output size: torch
    then samples output row i at input row ``(i + 0.5) * n / (gh + 0.1) - 0.5``, and that is what
    DINO's maps are made with (the 0.1 keeps ``floor(n * scale)`` from falling below gh).  timm's
    ``resample_abs_pos_embed`` asks for the output size (and antialiases): the same at the trained
    grid, different elsewhere (tests/fixtures/dino_vits8/README.md has the measured differences).
    The prefix (CLS) part is kept.  Computed in float32 at least; returns
    ``[1, prefix + gh*gw, C]`` in pos_embed's dtype.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape [1, tokens, C], got {tuple(pos_embed.shape)}")
    gh, gw = (int(g) for g in grid)
    if gh < 1 or gw < 1:
        raise ValueError(f"grid must hold two positive ints, got {grid!r}")
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n = math.isqrt(patches.shape[1])
    if n * n != patches.shape[1]:
        raise ValueError(f"pos_embed must hold a square grid of patch positions after {num_prefix_tokens} "
                         f"prefix token(s), got {patches.shape[1]} positions")
    if (gh, gw) == (n, n):
        return pos_embed
    dim = patches.shape[-1]
    square = patches.reshape(1, n, n, dim).permute(0, 3, 1, 2)
    square = square.to(torch.promote_types(square.dtype, torch.float32))  # no bicubic for float16 on CPU
    resampled = F.interpolate(square, scale_factor=((gh + 0.1) / n, (gw + 0.1) / n), mode="bicubic",
                              align_corners=False).to(pos_embed.dtype)
    if tuple(resampled.shape[-2:]) != (gh, gw):  # cannot happen for grids up to thousands of patches
        raise RuntimeError(f"position embedding resampled to {tuple(resampled.shape[-2:])}, expected {(gh, gw)}")
    return torch.cat([prefix, resampled.permute(0, 2, 3, 1).reshape(1, gh * gw, dim)], dim=1)


class _DinoHeadsAttention(AttentionExtractor):
    """Shared machinery: build backbone, load weights, preprocess, per-head -> one map.

    Args:
        heads: which map to return: head index 0..5, ``"avg"`` or ``"max"``.
        weights: path to a local state dict (``.pth``/``.pt``/``.safetensors``).  It takes
            precedence over ``pretrained``.
        pretrained: with ``weights=None``, True takes DINO's weights from a local cache or the
            hub (raising :class:`~yoda_sparse.attention.weights.WeightsUnavailableError` within
            about a second when offline); False keeps timm's random initialisation.
        input_size: what images are resized to before the backbone: an int is the short side
            (torchvision's ``Resize(int)``), a pair (h, w) is exact, None keeps the image's size;
            the ViT then crops to multiples of 8 (see the module docstring).
    """

    family = ""          # registry prefix, e.g. "dino_vits8"
    size_multiple = 1    # the backbone input is cropped to multiples of this (the ViT patch size)

    def __init__(self, heads: Heads = "max", *, weights=None, pretrained: bool = True,
                 input_size: InputSize = 224):
        super().__init__()
        self.heads = heads
        self.input_size = self._check_input_size(input_size)
        # Find the weights before building anything, so that the offline error comes at once.
        state_dict = source = None
        if weights is not None:
            state_dict, source = load_state_dict_file(weights), f"weights={weights!s}"
        elif pretrained:
            source = self._resolve_pretrained()
            state_dict = load_state_dict_file(source)
        if state_dict is None:
            self.model = self._build_model()
        else:
            self.model = build_for_loading(self._build_model)
            load_backbone_weights(self.model, state_dict, source=source)
        self.model.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    @property
    def heads(self) -> Heads:
        """The map returned: head index, ``"avg"`` or ``"max"``.  Settable, so that one loaded
        backbone can serve every variant; ``name`` follows it."""
        return self._heads

    @heads.setter
    def heads(self, value: Heads) -> None:
        self._heads = _check_heads(value)
        self.name = f"{self.family}_{value if isinstance(value, str) else f'head{value}'}"

    # -- subclass hooks ------------------------------------------------------------------------
    @abc.abstractmethod
    def _build_model(self) -> nn.Module:
        """The randomly initialised backbone."""

    @abc.abstractmethod
    def _resolve_pretrained(self) -> str:
        """Local path of the pretrained weights (cache or download), or WeightsUnavailableError."""

    @abc.abstractmethod
    def _grid_head_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Raw ``[B, 6, h, w]`` maps for a preprocessed (resized, normalised) batch."""

    # -- shared --------------------------------------------------------------------------------
    def _check_input_size(self, input_size: InputSize) -> InputSize:
        m = self.size_multiple

        def side(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= m

        if input_size is None:
            return None
        if side(input_size):
            return input_size
        if isinstance(input_size, (tuple, list)) and len(input_size) == 2 and all(side(v) for v in input_size):
            return (int(input_size[0]), int(input_size[1]))
        raise ValueError(f"input_size must be None, an int >= {m} (the short side) or a pair (h, w) of "
                         f"ints >= {m}, got {input_size!r}")

    def resized_size(self, height: int, width: int) -> Tuple[int, int]:
        """The (h, w) an image of ``height x width`` is resized to (before any crop)."""
        if self.input_size is None:
            m = self.size_multiple
            return max(height, m), max(width, m)
        if isinstance(self.input_size, tuple):
            return self.input_size
        s = self.input_size
        if height <= width:  # torchvision's Resize(int): the long side is truncated
            return s, int(s * width / height)
        return int(s * height / width), s

    def backbone_size(self, height: int, width: int) -> Tuple[int, int]:
        """The (h, w) the backbone sees for an image of ``height x width``: the resized size,
        cropped down to multiples of the patch size (ViT)."""
        m = self.size_multiple
        h, w = self.resized_size(height, width)
        return h - h % m, w - w % m

    def _preprocess(self, images: torch.Tensor) -> torch.Tensor:
        H, W = images.shape[-2:]
        h, w = self.resized_size(H, W)
        x = images.to(self.mean.dtype)  # float32 unless the extractor was cast (e.g. .half())
        if (h, w) != (H, W):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        ch, cw = self.backbone_size(H, W)
        x = x[..., :ch, :cw]  # DINO's crop: top-left, to multiples of the patch size
        # the constants in x's dtype (the float32 buffers would round them for a float64 extractor)
        mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1).to(x) for v in (IMAGENET_MEAN, IMAGENET_STD))
        return (x - mean) / std

    def maps_to_image(self, maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Resize backbone-grid maps ``[B, C, gh, gw]`` (over the cropped backbone input) to the
        image's ``height x width``: the crop's region gets the maps, the cropped-off strip the
        nearest covered row/column."""
        rh, rw = self.resized_size(height, width)
        ch, cw = self.backbone_size(height, width)
        if (ch, cw) != (rh, rw):
            maps = F.pad(resize_to(maps, (ch, cw)), (0, rw - cw, 0, rh - ch), mode="replicate")
        return resize_to(maps, (height, width))

    @torch.no_grad()
    def head_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Raw per-head maps ``[B, 6, h, w]`` (float32, >= 0, not normalised) on the backbone
        grid (ViT: one value per 8 x 8 patch of the cropped input, as DINO's
        ``get_last_selfattention``; ResNet: input/32, rounded up) for ``images``
        ``[B, 3, H, W]`` in [0, 1]; :meth:`backbone_size` gives the backbone's input size."""
        check_images(images)
        dev = self.mean.device
        if images.device != dev:
            raise ValueError(f"images is on {images.device} but {self.name} is on {dev}; "
                             f"move one of them (extractor.to(images.device))")
        return self._grid_head_maps(self._preprocess(images)).float()

    def compute(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.maps_to_image(self.head_maps(images), *images.shape[-2:])
        return aggregate_heads(minmax_normalize(maps), self.heads)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, input_size={self.input_size!r}"


class DinoViTAttention(_DinoHeadsAttention):
    """DINO ViT-S/8 last-block CLS self-attention; ``heads`` = 0..5, ``"avg"`` or ``"max"``.

    ``weights``: path to a ``.pth``/``.pt``/``.safetensors`` state dict with timm key names
    (DINO's official ``dino_deitsmall8_pretrain.pth`` uses the same names and loads as is;
    ``module.``/``backbone.`` prefixes and DINO-head keys are handled).  ``weights=None,
    pretrained=True`` takes ``timm/vit_small_patch8_224.dino`` from the HF cache or hub (or
    DINO's file from the torch.hub cache / URL), failing fast when offline;
    ``pretrained=False`` leaves timm's random initialisation.
    """

    family = "dino_vits8"
    size_multiple = 8

    def _build_model(self) -> nn.Module:
        import timm

        model = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0,
                                  dynamic_img_size=True)
        # guards against a changed timm config: the token layout below is DINO's
        layout = (model.blocks[-1].attn.num_heads, getattr(model, "num_prefix_tokens", 1),
                  getattr(model, "no_embed_class", False), tuple(model.pos_embed.shape))
        if layout != (NUM_HEADS, 1, False, (1, 785, 384)):
            raise RuntimeError(f"vit_small_patch8_224 is not laid out as DINO's ViT-S/8 (heads, prefix tokens, "
                               f"no_embed_class, pos_embed shape): got {layout}")
        return model

    def _resolve_pretrained(self) -> str:
        return resolve_pretrained(what="DINO ViT-S/8", hf_repo=DINO_VITS8_HF_REPO, url=DINO_VITS8_URL)

    def _last_block_input(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, 1 + gh*gw, C]`` entering the last block, built as DINO's
        ``prepare_tokens``: patch embedding, CLS token, position embedding interpolated DINO's way."""
        model = self.model
        identity = nn.Identity()
        feats = model.patch_embed.proj(x)                     # [B, C, gh, gw]
        B, _, gh, gw = feats.shape
        tokens = getattr(model.patch_embed, "norm", identity)(feats.flatten(2).transpose(1, 2))
        tokens = torch.cat([model.cls_token.expand(B, -1, -1), tokens], dim=1)
        tokens = tokens + interpolate_pos_embed(model.pos_embed, (gh, gw)).to(tokens.dtype)
        for name in ("pos_drop", "patch_drop", "norm_pre"):   # identities in eval mode
            tokens = getattr(model, name, identity)(tokens)
        for block in model.blocks[:-1]:
            tokens = block(tokens)
        return tokens

    def _grid_head_maps(self, x: torch.Tensor) -> torch.Tensor:
        last = self.model.blocks[-1]
        tokens = last.norm1(self._last_block_input(x))        # [B, N, C]
        attn = last.attn
        B, N, _ = tokens.shape
        qkv = attn.qkv(tokens).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]                                  # [B, heads, N, d]
        q = getattr(attn, "q_norm", nn.Identity())(q)
        k = getattr(attn, "k_norm", nn.Identity())(k)
        logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)   # CLS query: [B, heads, 1, N]
        # softmax in float32 at least (float16 logits overflow), float64 stays float64
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)[:, :, 0]
        gh, gw = x.shape[-2] // 8, x.shape[-1] // 8
        return probs[:, :, 1:].reshape(B, attn.num_heads, gh, gw)


class DinoResNetAttention(_DinoHeadsAttention):
    """DINO ResNet-50 activation "heads" (see the module docstring for the recipe and why);
    ``heads`` = 0..5, ``"avg"`` or ``"max"``.

    ``weights``: path to a torchvision/timm-format ResNet-50 state dict (DINO's official
    ``dino_resnet50_pretrain.pth`` loads as is; ``fc.*`` and ``module.``/``backbone.`` prefixes
    are handled).  ``weights=None, pretrained=True`` takes DINO's file from the torch.hub cache
    or URL, failing fast when offline; ``pretrained=False`` leaves random weights.
    """

    family = "dino_resnet50"
    size_multiple = 1

    def _build_model(self) -> nn.Module:
        import timm

        return timm.create_model("resnet50", pretrained=False, num_classes=0)

    def _resolve_pretrained(self) -> str:
        return resolve_pretrained(what="DINO ResNet-50", url=DINO_RESNET50_URL)

    def _grid_head_maps(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.model.forward_features(x)                # [B, 2048, h, w], post-ReLU
        groups = torch.tensor_split(feats, NUM_HEADS, dim=1)
        return torch.stack([g.mean(dim=1) for g in groups], dim=1)


def _register() -> None:
    from functools import partial

    for cls in (DinoViTAttention, DinoResNetAttention):
        for h in list(range(NUM_HEADS)) + ["avg", "max"]:
            name = f"{cls.family}_{h if isinstance(h, str) else f'head{h}'}"
            register_attention(name, partial(cls, h))


_register()
