"""ViT_C: the convolutional stem of "Early Convolutions Help Transformers See Better" (Xiao et al., NeurIPS 2021).

The stem replaces the 16x16 patchify conv with a few strided 3x3 convs (BN + ReLU) and a final 1x1 conv to the
token width, as facebookresearch/pycls models/vit.py ``ViTStemConv`` (the same stem is SWAG's
``conv_stem_layers``). It sits at ``VisionTransformer.patch_embed`` and exposes what timm's ``PatchEmbed`` does.

Registered pairs (pycls branch ``vitconfigs``, configs/vitconv_baselines; methods.md §4.1): ``vitp_{1,4,18,36}gf``
(patchify) and ``vitc_{1,4,18,36}gf`` (conv stem, **one block fewer** so that FLOPs match).
"""

from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor, nn

from .registry import build_with_overrides, register_model
from .vit import VisionTransformer, ViTConfig

__all__ = ["ConvStem"]


class ConvStem(nn.Module):
    """(B, C, H, W) -> (B, L, D): strided convs, L = (H / p)^2 tokens in row-major order, p = prod(strides).

    Layers before the last: conv (k, stride s, padding (k-1)/2, no bias) -> BatchNorm -> ReLU. Last: conv with a
    bias to D, no norm or activation. pycls hard-codes 3x3 for the non-last layers; here the given kernels are
    used (all ViT_C configs give 3).
    """

    def __init__(self, img_size: int, in_chans: int, kernels: Sequence[int], strides: Sequence[int],
                 dims: Sequence[int]) -> None:
        super().__init__()
        p = math.prod(strides)
        if img_size % p:
            raise ValueError(f"img_size {img_size} is not divisible by the conv stem's total stride {p}.")
        # the attributes timm's PatchEmbed has and our ViT / MAE code reads
        self.img_size = (img_size, img_size)
        self.patch_size = (p, p)
        self.grid_size = (img_size // p, img_size // p)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        w_in = in_chans
        for i, (k, s, w_out) in enumerate(zip(kernels, strides, dims)):
            last = i == len(dims) - 1
            layers.append(nn.Conv2d(w_in, w_out, k, stride=s, padding=(k - 1) // 2, bias=last))
            if not last:
                layers += [nn.BatchNorm2d(w_out), nn.ReLU(inplace=True)]
            w_in = w_out
        self.proj = nn.Sequential(*layers)
        self.init_weights()

    @property
    def convs(self) -> list[nn.Conv2d]:
        return [m for m in self.proj if isinstance(m, nn.Conv2d)]

    def init_weights(self) -> None:
        """pycls ``init_weights_vit`` for the stem (methods.md §4.1): each 3x3 conv normal(sqrt(2 / out_channels)),
        the last 1x1 normal(sqrt(1 / out_channels)) with a zero bias, BatchNorm (1, 0)."""
        *hidden, last = self.convs
        for conv in hidden:
            nn.init.normal_(conv.weight, std=math.sqrt(2.0 / conv.out_channels))
        nn.init.normal_(last.weight, std=math.sqrt(1.0 / last.out_channels))
        nn.init.zeros_(last.bias)
        for m in self.proj:
            if isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()  # weight 1, bias 0, fresh running stats

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"Input is {tuple(x.shape[-2:])} but the conv stem was built for {self.img_size}; "
                             "resize the images or build the model with img_size set to their size.")
        return self.proj(x).flatten(2).transpose(1, 2)


# -- registered sizes (methods.md §4.1 table; mlp 576 = 3 x 192 -> mlp_ratio 3) ------------------------------------
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
