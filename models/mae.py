"""Masked autoencoder (He et al., CVPR 2022), faithful to facebookresearch/mae models_mae.py.

The encoder is our timm-compatible :class:`~models.vit.VisionTransformer` (fixed sin-cos position table, no head);
it sees only the kept patches. The decoder parameters keep the reference names (``decoder_embed``,
``mask_token``, ``decoder_pos_embed``, ``decoder_blocks``, ``decoder_norm``, ``decoder_pred``), so a reference
checkpoint maps onto this module by prefixing its encoder keys with ``encoder.``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .complexity import Complexity, mae_complexity
from .pos_embed import sincos_2d_pos_embed
from .registry import build_with_overrides, register_model
from .vit import VisionTransformer, ViTConfig, make_blocks

__all__ = ["MAEConfig", "MaskedAutoencoderViT", "patchify", "unpatchify", "random_masking", "mae_loss"]


# -- pure functions ----------------------------------------------------------------------------------------------
def patchify(imgs: Tensor, p: int) -> Tensor:
    """(N, C, H, W) -> (N, L, p*p*C) with L = (H/p)*(W/p) in row-major order and (row, col, channel) inside a patch.

    Same layout as models_mae.py (``nchpwq -> nhwpqc``); needs a square image with a side divisible by p.
    """
    n, c, h, w = imgs.shape
    if h != w or h % p:
        raise ValueError(f"patchify needs a square image with side divisible by {p}, got {h}x{w}.")
    g = h // p
    x = imgs.reshape(n, c, g, p, g, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, g * g, p * p * c)


def unpatchify(x: Tensor, p: int, in_chans: int = 3) -> Tensor:
    """(N, L, p*p*C) -> (N, C, H, W); the exact inverse of :func:`patchify` (square images only)."""
    n, length, dim = x.shape
    g = int(round(length**0.5))
    if g * g != length or dim != p * p * in_chans:
        raise ValueError(
            f"unpatchify got {length} patches of {dim} values; needs a square number of patches of "
            f"p*p*in_chans = {p * p * in_chans} values."
        )
    x = x.reshape(n, g, g, p, p, in_chans)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, in_chans, g * p, g * p)


def random_masking(x: Tensor, mask_ratio: float, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Keep a random subset of tokens per sample (models_mae.py random_masking).

    x: (N, L, D). Keeps ``len_keep = int(L * (1 - mask_ratio))`` tokens (truncation: 196 -> 49 at 0.75), namely
    those with the smallest ``noise`` (default U(0, 1) of shape (N, L)), in ascending-noise order.
    Returns ``x_kept`` (N, len_keep, D), ``mask`` (N, L) float32 with 0 = kept, 1 = removed, in the original token
    order, and ``ids_restore`` (N, L) that undoes the shuffle (``gather(shuffled, ids_restore)`` = original order).
    """
    n, length, d = x.shape
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
    len_keep = int(length * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    elif noise.shape != (n, length):
        raise ValueError(f"noise must have shape (N, L) = {(n, length)}, got {tuple(noise.shape)}.")
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    # float32 so that mask sums stay exact under low-precision autocast
    mask = torch.ones(n, length, device=x.device, dtype=torch.float32)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_restore


def mae_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix_loss: bool) -> Tensor:
    """Mean squared error over removed patches only (models_mae.py forward_loss).

    pred, target: (N, L, p*p*C) with ``target = patchify(imgs)``; mask: (N, L), 1 = removed. With ``norm_pix_loss``
    each target patch becomes ``(t - mean) / sqrt(var + 1e-6)`` with the unbiased variance over its p*p*C values.
    Computed in float32.

    mask_ratio = 0 (no removed patch) is undefined in the reference (0/0 = NaN). Here the denominator is clamped
    to 1, so the loss is exactly 0 and still connected to ``pred`` (its gradient is zero), and training steps
    without masking stay finite.
    """
    pred, target, mask = pred.float(), target.float(), mask.float()
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as torch.var in the reference
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # (N, L)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


# -- model -------------------------------------------------------------------------------------------------------
@dataclass
class MAEConfig:
    """MAE: ViT encoder on visible patches + light transformer decoder that predicts the removed pixels."""

    img_size: int = 224
    """Side of the square input image in pixels."""
    patch_size: int = 16
    """Side of a square patch in pixels; img_size must be divisible by it."""
    in_chans: int = 3
    """Number of input image channels."""
    embed_dim: int = 768
    """Encoder token width."""
    depth: int = 12
    """Encoder blocks."""
    num_heads: int = 12
    """Encoder attention heads."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of the token width (encoder and decoder)."""
    qkv_bias: bool = True
    """Bias on the encoder's qkv projection (the decoder always has one, as the reference)."""
    drop_path_rate: float = 0.0
    """Encoder stochastic depth (the reference pretrains without; kept for experiments)."""
    ln_eps: float = 1e-6
    """LayerNorm epsilon (1e-6 in the reference factories; the reference class default is 1e-5)."""
    decoder_embed_dim: int = 512
    """Decoder token width."""
    decoder_depth: int = 8
    """Decoder blocks."""
    decoder_num_heads: int = 16
    """Decoder attention heads."""
    mask_ratio: float = 0.75
    """Fraction of patches removed; the encoder keeps int(L * (1 - mask_ratio))."""
    norm_pix_loss: bool = True
    """Regress per-patch normalised pixels (the paper's recipe; the reference code defaults to False)."""

    def encoder_config(self) -> ViTConfig:
        """The encoder as a headless ViT with the fixed sin-cos table (fine-tuning swaps in a learned one)."""
        return ViTConfig(
            img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans, embed_dim=self.embed_dim,
            depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
            drop_path_rate=self.drop_path_rate, num_classes=0, global_pool="token", pos_embed="sincos",
            ln_eps=self.ln_eps,
        )

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}.")
        if self.decoder_embed_dim % self.decoder_num_heads or self.decoder_embed_dim % 4:
            raise ValueError(
                f"decoder_embed_dim {self.decoder_embed_dim} must be divisible by decoder_num_heads "
                f"{self.decoder_num_heads} and by 4 (sin-cos table)."
            )
        self.encoder_config()  # validates the encoder fields


class MaskedAutoencoderViT(nn.Module):
    """MAE with a timm-compatible encoder (``self.encoder``) and the reference decoder."""

    def __init__(self, cfg: MAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionTransformer(cfg.encoder_config())
        num_patches = self.encoder.num_patches
        dd = cfg.decoder_embed_dim
        self.decoder_embed = nn.Linear(cfg.embed_dim, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, dd), requires_grad=False)
        self.decoder_blocks = make_blocks(dd, cfg.decoder_depth, cfg.decoder_num_heads, cfg.mlp_ratio, True, cfg.ln_eps)
        self.decoder_norm = nn.LayerNorm(dd, eps=cfg.ln_eps)
        self.decoder_pred = nn.Linear(dd, cfg.patch_size**2 * cfg.in_chans)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """models_mae.py initialize_weights: sin-cos tables, xavier Linear and patch conv weight, normal(0.02)
        tokens, LN (1, 0); the patch conv bias stays at PyTorch's Conv2d default, as there."""
        self.encoder.init_weights("mae")
        grid = self.encoder.patch_embed.grid_size
        self.decoder_pos_embed.copy_(sincos_2d_pos_embed(self.cfg.decoder_embed_dim, grid, cls_token=True)[None])
        nn.init.normal_(self.mask_token, std=0.02)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(_init_mae_module)

    def forward_encoder(self, imgs: Tensor, mask_ratio: float, noise: Tensor | None = None):
        """(N, C, H, W) -> latent (N, 1 + len_keep, D), mask (N, L), ids_restore (N, L). No mask token enters."""
        x = self.encoder.embed_patches(imgs)  # (N, L, D), position added before masking
        x, mask, ids_restore = random_masking(x, mask_ratio, noise)  # (N, len_keep, D)
        x = self.encoder.prepend_cls(x)  # (N, 1 + len_keep, D)
        return self.encoder.forward_tokens(x), mask, ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """latent (N, 1 + len_keep, D) -> per-patch pixel predictions (N, L, p*p*C)."""
        x = self.decoder_embed(latent)  # (N, 1 + len_keep, Dd)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)  # (N, L - len_keep, Dd)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)  # shuffled order: kept first
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # original order
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed  # (N, 1 + L, Dd)
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:]  # drop cls

    def forward(
        self, imgs: Tensor, mask_ratio: float | None = None, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """imgs (N, C, H, W) -> (loss, pred (N, L, p*p*C), mask (N, L) with 1 = removed)."""
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = mae_loss(pred, patchify(imgs, self.cfg.patch_size), mask, self.cfg.norm_pix_loss)
        return loss, pred, mask

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The encoder weights with timm ``VisionTransformer`` keys (``cls_token``, ``pos_embed``, ``blocks.0...``)."""
        return self.encoder.state_dict()

    def no_weight_decay(self) -> set[str]:
        """Only the frozen sin-cos tables.

        The reference pretraining (main_pretrain.py: timm ``add_weight_decay`` without a skip list) exempts only
        1-D tensors and biases, so ``encoder.cls_token`` and ``mask_token`` *are* decayed; we keep that.
        """
        return {"encoder.pos_embed", "decoder_pos_embed"}

    def complexity(self) -> Complexity:
        """Per-sample forward cost at ``cfg.mask_ratio`` (see :mod:`models.complexity`)."""
        return mae_complexity(self.cfg)


def _init_mae_module(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)  # includes the fused qkv, as the reference
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# -- registered sizes ------------------------------------------------------------------------------------------------
# encoder (embed_dim, depth, num_heads), decoder (dim, depth, heads). Base and up: the reference's 512 x 8 x 16
# decoder (models_mae.py). Tiny and small decoders are ours (the paper has no tiny/small MAE): sized so the
# decoder stays cheaper than the encoder on CPU-sized experiments.
_SIZES = {
    "tiny": ((192, 12, 3), (128, 4, 4)),
    "small": ((384, 12, 6), (256, 4, 8)),
    "base": ((768, 12, 12), (512, 8, 16)),
    "large": ((1024, 24, 16), (512, 8, 16)),
    "huge": ((1280, 32, 16), (512, 8, 16)),
    "2b": ((2560, 24, 32), (512, 8, 16)),
    "6p5b": ((4096, 32, 32), (512, 8, 16)),
}


def _mae(size: str, patch: int, overrides: dict) -> MaskedAutoencoderViT:
    (d, depth, heads), (dd, ddepth, dheads) = _SIZES[size]
    cfg = MAEConfig(
        patch_size=patch, embed_dim=d, depth=depth, num_heads=heads,
        decoder_embed_dim=dd, decoder_depth=ddepth, decoder_num_heads=dheads,
    )
    return build_with_overrides(MaskedAutoencoderViT, cfg, overrides)


@register_model
def mae_vit_tiny_patch16(**overrides) -> MaskedAutoencoderViT:
    """MAE ViT-Ti/16; decoder 128 wide, 4 blocks, 4 heads (ours, not in the paper)."""
    return _mae("tiny", 16, overrides)


@register_model
def mae_vit_tiny_patch14(**overrides) -> MaskedAutoencoderViT:
    """MAE ViT-Ti/14; decoder 128 wide, 4 blocks, 4 heads (ours, not in the paper)."""
    return _mae("tiny", 14, overrides)


@register_model
def mae_vit_tiny_patch8(**overrides) -> MaskedAutoencoderViT:
    """MAE ViT-Ti/8; decoder 128 wide, 4 blocks, 4 heads (ours, not in the paper)."""
    return _mae("tiny", 8, overrides)


@register_model
def mae_vit_small_patch16(**overrides) -> MaskedAutoencoderViT:
    """MAE ViT-S/16; decoder 256 wide, 4 blocks, 8 heads (ours, not in the paper)."""
    return _mae("small", 16, overrides)


@register_model
def mae_vit_small_patch14(**overrides) -> MaskedAutoencoderViT:
    """MAE ViT-S/14; decoder 256 wide, 4 blocks, 8 heads (ours, not in the paper)."""
    return _mae("small", 14, overrides)


@register_model(aliases=("mae_vit_base_patch16_dec512d8b",))
def mae_vit_base_patch16(**overrides) -> MaskedAutoencoderViT:
    """MAE ViT-B/16 with the reference 512 x 8-block decoder."""
    return _mae("base", 16, overrides)


@register_model
def mae_vit_base_patch14(**overrides) -> MaskedAutoencoderViT:
    """MAE ViT-B/14 with the reference 512 x 8-block decoder."""
    return _mae("base", 14, overrides)


@register_model(aliases=("mae_vit_large_patch16_dec512d8b",))
def mae_vit_large_patch16(**overrides) -> MaskedAutoencoderViT:
    """MAE ViT-L/16 with the reference 512 x 8-block decoder."""
    return _mae("large", 16, overrides)


@register_model
def mae_vit_large_patch14(**overrides) -> MaskedAutoencoderViT:
    """MAE ViT-L/14 with the reference 512 x 8-block decoder."""
    return _mae("large", 14, overrides)


@register_model
def mae_vit_huge_patch16(**overrides) -> MaskedAutoencoderViT:
    """MAE ViT-H/16 with the reference 512 x 8-block decoder."""
    return _mae("huge", 16, overrides)


@register_model(aliases=("mae_vit_huge_patch14_dec512d8b",))
def mae_vit_huge_patch14(**overrides) -> MaskedAutoencoderViT:
    """MAE ViT-H/14 with the reference 512 x 8-block decoder."""
    return _mae("huge", 14, overrides)


@register_model
def mae_vit_2b_patch14(**overrides) -> MaskedAutoencoderViT:
    """MAE ViT-2B/14 (MAWS pre-pretraining) with the reference 512 x 8-block decoder."""
    return _mae("2b", 14, overrides)


@register_model
def mae_vit_6p5b_patch14(**overrides) -> MaskedAutoencoderViT:
    """MAE ViT-6.5B/14 (MAWS pre-pretraining) with the reference 512 x 8-block decoder. Build on meta to inspect."""
    return _mae("6p5b", 14, overrides)
