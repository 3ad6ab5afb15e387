"""Per-sample forward cost of a model, from its config alone (no module is built).

Counting conventions (written down because tools disagree, cf. facebookresearch/fvcore#112):

* ``flops``: matmul FLOPs with 1 multiply-add = 2 FLOPs, as open_clip and MFU accounting count them.
  LayerNorm, GELU, softmax, biases and additions are left out (< 1% for ViTs). They reproduce the image-tower
  GFLOPs of mlfoundations/open_clip docs/model_profile.csv (ViT-B-16 35.13 at 224) to 0.01 GF; MAE applies them to
  the token counts of facebookresearch/mae models_mae.py:MaskedAutoencoderViT (see :func:`mae_complexity`)::

      block(N, d)  = 8 N d^2 + 4 m N d^2 + 4 N^2 d    (qkv 6Nd^2, out proj 2Nd^2, MLP 4mNd^2, QK^T and AV 4N^2 d)
      patch embed  = 2 P (C p^2) d                      (always on all P patches, also in MAE)
      head         = 2 d K                              (K classes, 0 without a head)

* ``params``: every parameter element, frozen ones included (the fixed sin-cos tables of MAE count).
* ``activations``: the number of output elements of conv and linear layers plus the attention score
  matrix, as facebookresearch/pycls counts them (pycls/models/blocks.py ``*_cx`` and
  ``MultiheadAttention.complexity``, pycls/models/vit.py ``ViT.complexity``): patchify ``P d``, per
  block ``3dN`` (qkv) + ``hN^2`` (scores) + ``dN`` (AV) + ``dN`` (out proj) + ``mdN + dN`` (MLP), head ``K``.
  Norms and elementwise ops count 0. This reproduces pycls' ViT_P table (e.g. ViT_P-18GF: 23.90 M).

Training costs about 3x the forward (no recompute counted): see :attr:`Complexity.train_flops`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["Complexity", "block_complexity", "vit_complexity", "mae_complexity"]


@dataclass(frozen=True)
class Complexity:
    """Forward cost of one sample."""

    flops: int
    """Matmul FLOPs of one forward pass (1 multiply-add = 2 FLOPs)."""
    params: int
    """Number of parameter elements, frozen ones included."""
    activations: int
    """Output elements of conv/linear layers and attention score maps (pycls counting)."""

    def __add__(self, other: Complexity) -> Complexity:
        return Complexity(self.flops + other.flops, self.params + other.params, self.activations + other.activations)

    @property
    def train_flops(self) -> int:
        """Forward + backward estimate, 3x the forward (PaLM/Megatron MFU convention)."""
        return 3 * self.flops


class _EncoderFields(Protocol):
    img_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    qkv_bias: bool


def _hidden(dim: int, mlp_ratio: float) -> int:
    return int(dim * mlp_ratio)  # timm Block: hidden_features = int(dim * mlp_ratio)


def _linear(n_in: int, n_out: int, tokens: int, bias: bool = True) -> Complexity:
    return Complexity(2 * tokens * n_in * n_out, n_in * n_out + (n_out if bias else 0), tokens * n_out)


def block_complexity(tokens: int, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = True) -> Complexity:
    """One pre-norm transformer block (timm ``Block``) on ``tokens`` tokens of width ``dim``."""
    hidden = _hidden(dim, mlp_ratio)
    norms = Complexity(0, 2 * 2 * dim, 0)  # norm1, norm2: weight + bias each
    qkv = _linear(dim, 3 * dim, tokens, bias=qkv_bias)
    # QK^T and AV: 2 matmuls of N x N x d multiply-adds each (summed over heads); scores h*N^2, AV output d*N
    attn = Complexity(2 * 2 * tokens * tokens * dim, 0, num_heads * tokens * tokens + tokens * dim)
    proj = _linear(dim, dim, tokens)
    mlp = _linear(dim, hidden, tokens) + _linear(hidden, dim, tokens)
    return norms + qkv + attn + proj + mlp


def _patch_embed(cfg: _EncoderFields) -> tuple[Complexity, int]:
    num_patches = (cfg.img_size // cfg.patch_size) ** 2
    patch_dim = cfg.in_chans * cfg.patch_size**2
    return _linear(patch_dim, cfg.embed_dim, num_patches), num_patches  # conv k = stride = p is a per-patch linear


def vit_complexity(cfg: _EncoderFields, num_tokens: int | None = None) -> Complexity:
    """A :class:`~models.vit.VisionTransformer` forward.

    ``num_tokens``: tokens that run through the blocks, cls included; defaults to all patches + 1. The patch
    embedding always runs on all patches (as in MAE, where masking comes after it).
    """
    embed, num_patches = _patch_embed(cfg)
    n = num_patches + 1 if num_tokens is None else num_tokens
    d = cfg.embed_dim
    tokens_params = Complexity(0, d + (num_patches + 1) * d, 0)  # cls_token + pos_embed
    blocks = block_complexity(n, d, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias)
    total = embed + tokens_params + Complexity(blocks.flops * cfg.depth, blocks.params * cfg.depth,
                                               blocks.activations * cfg.depth)
    total += Complexity(0, 2 * d, 0)  # final norm, or fc_norm with avg pooling (timm drops `norm` then)
    num_classes = getattr(cfg, "num_classes", 0)
    if num_classes:
        total += _linear(d, num_classes, 1)
    return total


def mae_complexity(cfg) -> Complexity:
    """A :class:`~models.mae.MaskedAutoencoderViT` forward at ``cfg.mask_ratio`` (facebookresearch/mae models_mae.py).

    Encoder: patch embed on all P patches + blocks on ``int(P (1 - r)) + 1`` tokens. Decoder: embed of those
    tokens, blocks on P + 1 tokens, prediction of ``C p^2`` values for P + 1 tokens (cls is dropped afterwards).
    """
    num_patches = (cfg.img_size // cfg.patch_size) ** 2
    n_enc = int(num_patches * (1 - cfg.mask_ratio)) + 1
    encoder = vit_complexity(cfg, num_tokens=n_enc)  # cfg has no num_classes: no head
    dd, n_dec = cfg.decoder_embed_dim, num_patches + 1
    embed = _linear(cfg.embed_dim, dd, n_enc)
    tokens_params = Complexity(0, dd + n_dec * dd, 0)  # mask_token + decoder_pos_embed (frozen)
    block = block_complexity(n_dec, dd, cfg.decoder_num_heads, cfg.mlp_ratio, True)
    blocks = Complexity(block.flops * cfg.decoder_depth, block.params * cfg.decoder_depth,
                        block.activations * cfg.decoder_depth)
    norm = Complexity(0, 2 * dd, 0)
    pred = _linear(dd, cfg.in_chans * cfg.patch_size**2, n_dec)
    return encoder + embed + tokens_params + blocks + norm + pred
