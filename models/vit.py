"""Vision Transformer built from timm's ``PatchEmbed`` and ``Block``, with timm-compatible parameter names.

``timm.create_model("vit_base_patch16_224", num_classes=0)`` loads our state_dict strictly and vice versa, so
exported weights work in timm and other tools. Attention runs through
``torch.nn.functional.scaled_dot_product_attention`` (timm ``Attention`` with ``fused_attn`` forced on).
With ``stem="conv"`` the patch projection is the ViT_C convolutional stem (:mod:`models.conv_stem`), still named
``patch_embed`` so layer-wise lr decay and weight handoff treat it as the embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from .complexity import Complexity, vit_complexity
from .conv_stem import ConvStem
from .pos_embed import sincos_2d_pos_embed
from .pycls_complexity import stem_counter
from .registry import build_with_overrides, register_model

__all__ = ["ViTConfig", "VisionTransformer", "make_blocks"]


@dataclass
class ViTConfig:
    """Architecture of a plain ViT (pre-norm blocks, cls token, GELU MLP)."""

    img_size: int = 224
    """Side of the square input image in pixels."""
    patch_size: int = 16
    """Side of a square patch in pixels; img_size must be divisible by it."""
    in_chans: int = 3
    """Number of input image channels."""
    embed_dim: int = 768
    """Token width d."""
    depth: int = 12
    """Number of transformer blocks."""
    num_heads: int = 12
    """Attention heads per block; embed_dim must be divisible by it."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of embed_dim."""
    qkv_bias: bool = True
    """Bias on the fused qkv projection."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate of the last block; rises linearly from 0 over the blocks (timm, MAE fine-tuning)."""
    num_classes: int = 0
    """Classifier outputs; 0 means no head (forward returns the pooled features)."""
    global_pool: Literal["token", "avg"] = "token"
    """'token': final norm, then cls token. 'avg': patch-token mean, then fc_norm (no final norm), as MAE FT."""
    pos_embed: Literal["learned", "sincos"] = "learned"
    """'learned': trainable table. 'sincos': fixed 2-D sin-cos table (frozen), as the MAE encoder."""
    ln_eps: float = 1e-6
    """LayerNorm epsilon (1e-6 in the MAE factories and timm ViTs)."""
    stem: Literal["patchify", "conv"] = "patchify"
    """'patchify': one conv with kernel = stride = patch_size (ViT). 'conv': the ViT_C stack of strided convs
    (Xiao et al. 2021, pycls ViTStemConv), set by stem_kernels / stem_strides / stem_dims."""
    stem_kernels: tuple[int, ...] = ()
    """Conv stem only: odd kernel size per layer (ViT_C: 3 for every layer but the last 1x1)."""
    stem_strides: tuple[int, ...] = ()
    """Conv stem only: stride per layer; their product must equal patch_size."""
    stem_dims: tuple[int, ...] = ()
    """Conv stem only: output channels per layer; the last must equal embed_dim."""

    def __post_init__(self) -> None:
        self.stem_kernels, self.stem_strides, self.stem_dims = (
            tuple(self.stem_kernels), tuple(self.stem_strides), tuple(self.stem_dims)
        )  # config files give lists
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}.")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}.")
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {self.global_pool!r}.")
        if self.pos_embed not in ("learned", "sincos"):
            raise ValueError(f"pos_embed must be 'learned' or 'sincos', got {self.pos_embed!r}.")
        if self.pos_embed == "sincos" and self.embed_dim % 4:
            raise ValueError(f"pos_embed='sincos' needs embed_dim divisible by 4, got {self.embed_dim}.")
        self._check_stem()

    def _check_stem(self) -> None:
        layers = (self.stem_kernels, self.stem_strides, self.stem_dims)
        if self.stem == "patchify":
            if any(layers):
                raise ValueError("stem_kernels / stem_strides / stem_dims are only used with stem='conv'; set "
                                 "stem='conv' or leave them empty.")
            return
        if self.stem != "conv":
            raise ValueError(f"stem must be 'patchify' or 'conv', got {self.stem!r}.")
        if not self.stem_dims or len({len(x) for x in layers}) != 1:
            raise ValueError(f"stem='conv' needs one kernel, stride and dim per layer; got kernels "
                             f"{self.stem_kernels}, strides {self.stem_strides}, dims {self.stem_dims}.")
        if any(k < 1 or k % 2 == 0 for k in self.stem_kernels) or any(s < 1 for s in self.stem_strides):
            raise ValueError(f"Conv stem kernels must be odd and strides positive, got kernels "
                             f"{self.stem_kernels}, strides {self.stem_strides}.")
        if math.prod(self.stem_strides) != self.patch_size:
            raise ValueError(f"Conv stem strides {self.stem_strides} multiply to {math.prod(self.stem_strides)}, "
                             f"not patch_size {self.patch_size}; the stem must downsample by exactly one patch.")
        if self.stem_dims[-1] != self.embed_dim:
            raise ValueError(f"Conv stem's last dim {self.stem_dims[-1]} must equal embed_dim {self.embed_dim}.")


def make_blocks(
    dim: int, depth: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, ln_eps: float, drop_path_rate: float = 0.0
) -> nn.ModuleList:
    """timm pre-norm blocks with stochastic depth rising linearly to ``drop_path_rate`` and fused SDPA attention."""
    rates = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
    norm = partial(nn.LayerNorm, eps=ln_eps)
    blocks = nn.ModuleList(
        Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=rate, norm_layer=norm) for rate in rates
    )
    for block in blocks:
        # timm picks the attention path from TIMM_FUSED_ATTN at import time; we always want SDPA
        block.attn.fused_attn = True
    return blocks


def _init_linear_xavier(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)  # the fused qkv (3d x d) gets one xavier over its full shape
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _init_linear_timm(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class VisionTransformer(nn.Module):
    """ViT whose parameter names match timm's ``VisionTransformer``.

    Token layout: (B, 1 + L, D) with the cls token first; L = (img_size / patch_size)^2 in row-major order.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.num_features = d  # width of forward()'s pooled features without a head, as timm
        if cfg.stem == "conv":
            self.patch_embed = ConvStem(cfg.img_size, cfg.in_chans, cfg.stem_kernels, cfg.stem_strides, cfg.stem_dims)
        else:
            self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, d)
        self.num_patches = self.patch_embed.num_patches
        self.num_prefix_tokens = 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        learned = cfg.pos_embed == "learned"  # the sin-cos table stays a (frozen) Parameter so timm keys match
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, d), requires_grad=learned)
        self.blocks = make_blocks(
            d, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.ln_eps, cfg.drop_path_rate
        )
        avg = cfg.global_pool == "avg"
        # timm (and MAE models_vit.py) drop the final norm when pooling by average and norm after pooling instead
        self.norm = nn.Identity() if avg else nn.LayerNorm(d, eps=cfg.ln_eps)
        self.fc_norm = nn.LayerNorm(d, eps=cfg.ln_eps) if avg else nn.Identity()
        self.head = nn.Linear(d, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights("timm")

    @torch.no_grad()
    def init_weights(self, scheme: Literal["timm", "mae"] = "timm") -> None:
        """Initialise all weights.

        'timm': timm's default ViT init (Linear trunc_normal(0.02), cls normal(1e-6), learned pos trunc_normal(0.02)).
        'mae': facebookresearch/mae models_mae.py initialize_weights (xavier_uniform on every Linear, fused qkv
        included, and on the patch projection weight viewed as (out, in*p*p); the patch projection bias keeps
        PyTorch's Conv2d default; cls normal(0.02)). LayerNorm is (1, 0) in both.
        A conv stem gets the ViT_C init in both (:meth:`models.conv_stem.ConvStem.init_weights`).
        """
        if self.cfg.pos_embed == "sincos":
            grid = self.patch_embed.grid_size
            self.pos_embed.copy_(sincos_2d_pos_embed(self.cfg.embed_dim, grid, cls_token=True).unsqueeze(0))
        conv_stem = self.cfg.stem == "conv"
        if scheme == "mae":
            if not conv_stem:
                # models_mae.py:initialize_weights never touches the conv bias, which keeps the Conv2d constructor's
                # uniform(+-1/sqrt(in*p*p)); redrawing it from that same default makes this a full re-init however
                # the module was initialised or trained before
                self.patch_embed.proj.reset_parameters()
                proj = self.patch_embed.proj.weight
                nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))  # as a Linear, not with conv fan-in/out
            nn.init.normal_(self.cls_token, std=0.02)
            self.apply(_init_linear_xavier)
        elif scheme == "timm":
            if self.cfg.pos_embed == "learned":
                trunc_normal_(self.pos_embed, std=0.02)
            nn.init.normal_(self.cls_token, std=1e-6)
            if not conv_stem:
                self.patch_embed.proj.reset_parameters()
            self.apply(_init_linear_timm)
        else:
            raise ValueError(f"Unknown init scheme {scheme!r}; use 'timm' or 'mae'.")
        if conv_stem:
            self.patch_embed.init_weights()

    # -- pieces reused by the MAE model --------------------------------------------------------------------------
    def embed_patches(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, L, D): patch projection + position embedding of the patch tokens (no cls)."""
        return self.patch_embed(x) + self.pos_embed[:, 1:]

    def prepend_cls(self, x: Tensor) -> Tensor:
        """(B, N, D) -> (B, 1 + N, D) with ``cls_token + pos_embed[:, :1]`` in front."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward_tokens(self, x: Tensor) -> Tensor:
        """(B, N, D) -> (B, N, D): the transformer blocks and the final norm."""
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    # -- timm-style API ------------------------------------------------------------------------------------------
    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, 1 + L, D) normalised tokens (not normalised with avg pooling, as timm)."""
        return self.forward_tokens(self.prepend_cls(self.embed_patches(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, 1 + L, D) -> (B, num_classes), or the pooled (B, D) features without a head / with ``pre_logits``."""
        x = x[:, self.num_prefix_tokens :].mean(dim=1) if self.cfg.global_pool == "avg" else x[:, 0]
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def no_weight_decay(self) -> set[str]:
        """Names exempt from weight decay in fine-tuning (MAE util/lr_decay.py uses timm's list)."""
        return {"pos_embed", "cls_token"}

    def complexity(self, num_tokens: int | None = None) -> Complexity:
        """Per-sample forward FLOPs / params / activations; ``num_tokens`` through the blocks (default all + cls)."""
        total = vit_complexity(self.cfg, num_tokens)
        if self.cfg.stem == "patchify":
            return total
        # vit_complexity counts a patchify stem (2 P C p^2 d FLOPs): swap in the conv stem's cost
        c, p = self.cfg, self.num_patches
        patch_dim = c.in_chans * c.patch_size**2
        patchify = Complexity(2 * p * patch_dim * c.embed_dim, patch_dim * c.embed_dim + c.embed_dim, p * c.embed_dim)
        stem = stem_counter(c).ours()
        return Complexity(total.flops - patchify.flops + stem.flops, total.params - patchify.params + stem.params,
                          total.activations - patchify.activations + stem.activations)


# -- registered sizes ------------------------------------------------------------------------------------------------
# (embed_dim, depth, num_heads): timm / ViT paper sizes; 2B and 6.5B from facebookresearch/maws model_builder.py
_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
    "2b": (2560, 24, 32),
    "6p5b": (4096, 32, 32),
}


def _vit(size: str, patch: int, overrides: dict) -> VisionTransformer:
    d, depth, heads = _SIZES[size]
    return build_with_overrides(
        VisionTransformer, ViTConfig(patch_size=patch, embed_dim=d, depth=depth, num_heads=heads), overrides
    )


@register_model
def vit_tiny_patch16(**overrides) -> VisionTransformer:
    """ViT-Ti/16: 192 wide, 12 blocks, 3 heads."""
    return _vit("tiny", 16, overrides)


@register_model
def vit_tiny_patch14(**overrides) -> VisionTransformer:
    """ViT-Ti/14: 192 wide, 12 blocks, 3 heads."""
    return _vit("tiny", 14, overrides)


@register_model
def vit_tiny_patch8(**overrides) -> VisionTransformer:
    """ViT-Ti/8: 192 wide, 12 blocks, 3 heads (784 tokens at 224)."""
    return _vit("tiny", 8, overrides)


@register_model
def vit_small_patch16(**overrides) -> VisionTransformer:
    """ViT-S/16: 384 wide, 12 blocks, 6 heads."""
    return _vit("small", 16, overrides)


@register_model
def vit_small_patch14(**overrides) -> VisionTransformer:
    """ViT-S/14: 384 wide, 12 blocks, 6 heads."""
    return _vit("small", 14, overrides)


@register_model
def vit_base_patch16(**overrides) -> VisionTransformer:
    """ViT-B/16: 768 wide, 12 blocks, 12 heads."""
    return _vit("base", 16, overrides)


@register_model
def vit_base_patch14(**overrides) -> VisionTransformer:
    """ViT-B/14: 768 wide, 12 blocks, 12 heads."""
    return _vit("base", 14, overrides)


@register_model
def vit_large_patch16(**overrides) -> VisionTransformer:
    """ViT-L/16: 1024 wide, 24 blocks, 16 heads."""
    return _vit("large", 16, overrides)


@register_model
def vit_large_patch14(**overrides) -> VisionTransformer:
    """ViT-L/14: 1024 wide, 24 blocks, 16 heads."""
    return _vit("large", 14, overrides)


@register_model
def vit_huge_patch16(**overrides) -> VisionTransformer:
    """ViT-H/16: 1280 wide, 32 blocks, 16 heads."""
    return _vit("huge", 16, overrides)


@register_model
def vit_huge_patch14(**overrides) -> VisionTransformer:
    """ViT-H/14: 1280 wide, 32 blocks, 16 heads."""
    return _vit("huge", 14, overrides)


@register_model
def vit_2b_patch14(**overrides) -> VisionTransformer:
    """ViT-2B/14 (MAWS): 2560 wide, 24 blocks, 32 heads."""
    return _vit("2b", 14, overrides)


@register_model
def vit_6p5b_patch14(**overrides) -> VisionTransformer:
    """ViT-6.5B/14 (MAWS): 4096 wide, 32 blocks, 32 heads. Build on ``torch.device("meta")`` to inspect it."""
    return _vit("6p5b", 14, overrides)

