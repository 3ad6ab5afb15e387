"""ViT_C / ViT_P pairs of "Early Convolutions Help Transformers See Better" (Xiao et al., NeurIPS 2021).

Registered pairs, as facebookresearch/pycls branch ``vitconfigs``
``configs/vitconv_baselines/vit/ViT-{P,C}-{1.0,4.0,18,36}GF_adamw_*.yaml`` define them: ``vitp_{1,4,18,36}gf``
(patchify) and ``vitc_{1,4,18,36}gf`` (the conv stem of :class:`models.conv_stem.ConvStem`, **one block fewer**
so that FLOPs match).
"""

from __future__ import annotations

from .conv_stem import ConvStem
from .registry import build_with_overrides, register_model
from .vit import VisionTransformer, ViTConfig

__all__ = ["ConvStem"]  # re-exported: the stem of the models registered here


# -- registered sizes (the vitconfigs yaml files above; MLP_DIM 576 = 3 x 192 -> mlp_ratio 3) ---------------------
# name: (embed_dim, patchify depth, heads, mlp_ratio, stem strides, stem dims); the conv twin has depth - 1
_STRIDES_SHORT = (2, 2, 2, 2, 1)
_STRIDES_LONG = (2, 2, 1, 2, 1, 2, 1)
_SIZES = {
    "1gf": (192, 12, 3, 3.0, _STRIDES_SHORT, (24, 48, 96, 192, 192)),
    "4gf": (384, 12, 6, 3.0, _STRIDES_SHORT, (48, 96, 192, 384, 384)),
    "18gf": (768, 12, 12, 4.0, _STRIDES_LONG, (64, 128, 128, 256, 256, 512, 768)),
    "36gf": (1024, 14, 16, 4.0, _STRIDES_LONG, (64, 128, 128, 256, 256, 512, 1024)),
}


def _config(size: str, conv: bool) -> ViTConfig:
    d, depth, heads, mlp_ratio, strides, dims = _SIZES[size]
    base = ViTConfig(patch_size=16, embed_dim=d, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio)
    if not conv:
        return base
    kernels = (3,) * (len(dims) - 1) + (1,)
    return ViTConfig(patch_size=16, embed_dim=d, depth=depth - 1, num_heads=heads, mlp_ratio=mlp_ratio,
                     stem="conv", stem_kernels=kernels, stem_strides=strides, stem_dims=dims)


def _build(size: str, conv: bool, overrides: dict) -> VisionTransformer:
    return build_with_overrides(VisionTransformer, _config(size, conv), overrides)


@register_model
def vitp_1gf(**overrides) -> VisionTransformer:
    """ViT_P-1GF: patchify 16, 192 wide, 12 blocks, 3 heads, MLP 576."""
    return _build("1gf", False, overrides)


@register_model
def vitc_1gf(**overrides) -> VisionTransformer:
    """ViT_C-1GF: conv stem (24, 48, 96, 192, 192), 192 wide, 11 blocks, 3 heads, MLP 576."""
    return _build("1gf", True, overrides)


@register_model
def vitp_4gf(**overrides) -> VisionTransformer:
    """ViT_P-4GF: patchify 16, 384 wide, 12 blocks, 6 heads, MLP 1152."""
    return _build("4gf", False, overrides)


@register_model
def vitc_4gf(**overrides) -> VisionTransformer:
    """ViT_C-4GF: conv stem (48, 96, 192, 384, 384), 384 wide, 11 blocks, 6 heads, MLP 1152."""
    return _build("4gf", True, overrides)


@register_model
def vitp_18gf(**overrides) -> VisionTransformer:
    """ViT_P-18GF: patchify 16, 768 wide, 12 blocks, 12 heads, MLP 3072 (= ViT-B/16)."""
    return _build("18gf", False, overrides)


@register_model
def vitc_18gf(**overrides) -> VisionTransformer:
    """ViT_C-18GF: 7-layer conv stem to 768, 11 blocks, 12 heads, MLP 3072."""
    return _build("18gf", True, overrides)


@register_model
def vitp_36gf(**overrides) -> VisionTransformer:
    """ViT_P-36GF: patchify 16, 1024 wide, 14 blocks, 16 heads, MLP 4096."""
    return _build("36gf", False, overrides)


@register_model
def vitc_36gf(**overrides) -> VisionTransformer:
    """ViT_C-36GF: 7-layer conv stem to 1024, 13 blocks, 16 heads, MLP 4096."""
    return _build("36gf", True, overrides)
