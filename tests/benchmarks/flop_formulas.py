"""Closed-form FLOP counts of ViT and MAE, written out independently of models/complexity.py, as an oracle for the
models' own counts (which the benchmark reports). Matmuls only, 1 multiply-add = 2 FLOPs; LayerNorm, GELU,
softmax and biases are under 1% and left out.

ViT (Dosovitskiy et al., arXiv 2010.11929): a pre-LN block on N tokens of width d with MLP ratio m costs
8Nd^2 (qkv and output projections) + 4mNd^2 (MLP) + 4N^2d (QK^T and AV). MAE (He et al., arXiv 2111.06377; layout
of facebookresearch/mae models_mae.py): the encoder embeds all P patches but runs its blocks on the kept ones plus
the cls token, N_e = int(P (1 - r)) + 1 (random_masking keeps int(L (1 - mask_ratio))); the decoder embeds N_e
tokens into d', runs its blocks on P + 1 tokens and predicts 3p^2 pixels per token.
"""

from torch import nn


def vit_block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> float:
    return 8 * tokens * dim**2 + 4 * mlp_ratio * tokens * dim**2 + 4 * tokens**2 * dim


def vit_forward_flops(img_size: int, patch_size: int, dim: int, depth: int, mlp_ratio: float = 4.0,
                      in_chans: int = 3, num_classes: int = 0) -> float:
    """Patch embedding 2 P (3p^2) d, L blocks on P + 1 tokens, and the classifier 2 d K."""
    patches = (img_size // patch_size) ** 2
    return (2 * patches * in_chans * patch_size**2 * dim + depth * vit_block_flops(patches + 1, dim, mlp_ratio)
            + 2 * dim * num_classes)


def mae_forward_flops(img_size: int, patch_size: int, dim: int, depth: int, mask_ratio: float = 0.75,
                      decoder_dim: int = 512, decoder_depth: int = 8, mlp_ratio: float = 4.0,
                      in_chans: int = 3) -> tuple[float, float]:
    """(encoder, decoder) forward FLOPs of one image."""
    patches = (img_size // patch_size) ** 2
    visible = int(patches * (1 - mask_ratio)) + 1
    pixels = in_chans * patch_size**2
    encoder = 2 * patches * pixels * dim + depth * vit_block_flops(visible, dim, mlp_ratio)
    decoder = (2 * visible * dim * decoder_dim + decoder_depth * vit_block_flops(patches + 1, decoder_dim, mlp_ratio)
               + 2 * (patches + 1) * decoder_dim * pixels)
    return encoder, decoder


def formula_forward_flops(model: nn.Module) -> float | None:
    """The formulas above for ``model``, from the numbers of its config; None for models they do not cover (conv
    stems, CNNs)."""
    c = getattr(model, "cfg", None)
    if c is not None and hasattr(c, "decoder_embed_dim"):
        return sum(mae_forward_flops(c.img_size, c.patch_size, c.embed_dim, c.depth, c.mask_ratio,
                                     c.decoder_embed_dim, c.decoder_depth, c.mlp_ratio, c.in_chans))
    if c is not None and hasattr(c, "embed_dim") and getattr(c, "stem", "patchify") == "patchify":
        return vit_forward_flops(c.img_size, c.patch_size, c.embed_dim, c.depth, c.mlp_ratio, c.in_chans,
                                 c.num_classes)
    return None
