"""SAM 2 memory: memory attention conditions the current frame on past frames, the memory encoder writes a frame.

Follows facebookresearch/sam2 sam2/modeling/memory_attention.py:MemoryAttention (with MemoryAttentionLayer and
sam2/modeling/sam/transformer.py:RoPEAttention) and sam2/modeling/memory_encoder.py:MemoryEncoder (with
MaskDownSampler, Fuser and CXBlock). Submodule names equal the reference ones, so the ``memory_attention.*`` and
``memory_encoder.*`` entries of an official SAM 2 / 2.1 checkpoint load strictly once the prefix is dropped.

The interfaces differ from upstream's, the numbers do not:

- :class:`MemoryAttention` takes and returns batch-first tokens ``(B, N, C)``; upstream's module is sequence-first
  ``(N, B, C)`` (its layers are batch-first inside).
- The token grid ``(H, W)`` is an argument. Upstream rebuilds its rotary angles for a square grid whenever the token
  count differs from its configured ``feat_sizes``, which mis-rotates a non-square grid without an error; here a
  grid that does not match the token count is an error, and any ``H x W`` grid is rotated correctly.
- Rotary encoding rotates consecutive channel pairs with real cos / sin, equal to upstream's complex product
  (sam2/modeling/position_encoding.py:apply_rotary_enc).
- :class:`MemoryEncoder` returns ``(features, pos)`` instead of ``{"vision_features", "vision_pos_enc": [pos]}``.

Mask preprocessing lives outside the encoder, as upstream: sam2/modeling/sam2_base.py:SAM2Base._encode_new_memory
takes the sigmoid of the high-resolution mask logits (or binarises them for masks that come from point prompts at
inference), multiplies by ``sigmoid_scale_for_mem_enc`` (20 in SAM 2.1), adds ``sigmoid_bias_for_mem_enc`` (-10)
and calls the encoder with ``skip_mask_sigmoid=True``. :func:`mask_for_memory` is that step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d  # channel LayerNorm of NCHW maps, eps 1e-6 as SAM's
from torch import Tensor, nn

from .mask_decoder import Attention
from .position_encoding import PositionEmbeddingSine

__all__ = [
    "MemoryAttentionConfig",
    "MemoryAttention",
    "MemoryAttentionLayer",
    "RoPEAttention",
    "compute_axial_rope",
    "apply_rope",
    "MemoryEncoderConfig",
    "MemoryEncoder",
    "MaskDownSampler",
    "CXBlock",
    "Fuser",
    "mask_for_memory",
    "SIGMOID_SCALE_FOR_MEM_ENC",
    "SIGMOID_BIAS_FOR_MEM_ENC",
]

SIGMOID_SCALE_FOR_MEM_ENC = 20.0
"""SAM 2.1's scale of mask probabilities before the memory encoder (sam2.1_hiera_*.yaml)."""
SIGMOID_BIAS_FOR_MEM_ENC = -10.0
"""SAM 2.1's bias added after the scale, so a probability in [0, 1] enters the encoder as [-10, 10]."""


# --------------------------------------------------------------------------------------------------------------
# 2-D axial rotary position encoding
# --------------------------------------------------------------------------------------------------------------


def compute_axial_rope(dim: int, height: int, width: int, theta: float = 10000.0,
                       device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin, each ``(height * width, dim // 2)`` float32, of the axial rotary angles of a row-major grid.

    Token ``t`` sits at column ``x = t mod width`` and row ``y = t div width``. Channel pair ``j < dim / 4`` turns by
    ``x * f_j`` and pair ``dim / 4 + j`` by ``y * f_j``, with ``f_j = theta ** (-4 j / dim)``: the x and y halves
    share one frequency ladder (sam2/modeling/position_encoding.py:compute_axial_cis, whose ``end_x`` is the width).
    """
    if dim % 4:
        raise ValueError(f"axial RoPE needs a head dimension divisible by 4 (x and y pairs), got {dim}")
    if height < 1 or width < 1:
        raise ValueError(f"grid must be at least 1 x 1, got {height} x {width}")
    exponents = torch.arange(0, dim, 4, device=device)[: dim // 4].float() / dim
    freqs = 1.0 / (theta**exponents)
    tokens = torch.arange(height * width, device=device)
    cols = (tokens % width).float()
    rows = torch.div(tokens, width, rounding_mode="floor").float()
    angles = torch.cat([torch.outer(cols, freqs), torch.outer(rows, freqs)], dim=-1)
    return angles.cos(), angles.sin()


def _rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (2i, 2i+1) of ``x`` (..., N, D) by the angles whose cos / sin are (N, D/2).

    Computed in float32 whatever the input dtype (as upstream, which rotates ``x.float()``), then cast back.
    """
    even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def apply_rope(q: Tensor, k: Tensor, rope: tuple[Tensor, Tensor], repeat_k: bool = False,
               num_k_exclude: int = 0) -> tuple[Tensor, Tensor]:
    """Rotate queries ``(B, heads, Nq, D)`` and keys ``(B, heads, Nk, D)`` by ``rope`` = (cos, sin) of Nq positions.

    The last ``num_k_exclude`` keys (SAM 2's object-pointer tokens) keep their values. With ``repeat_k`` the keys
    before them are ``Nk' / Nq`` frames of the query grid, each rotated like the queries (memory of several past
    frames); without it there must be exactly Nq of them. Returns new tensors; the inputs are not modified.
    """
    cos, sin = rope
    num_pos = cos.shape[0]
    if q.shape[-2] != num_pos:
        raise ValueError(f"{q.shape[-2]} queries but rotary angles for {num_pos} grid positions")
    num_k_rope = k.shape[-2] - num_k_exclude
    if num_k_exclude < 0 or num_k_rope < 0:
        raise ValueError(f"cannot exclude {num_k_exclude} of {k.shape[-2]} keys from the rotation")
    q = _rotate_pairs(q, cos, sin)
    if num_k_rope == 0:
        return q, k
    if repeat_k:
        if num_k_rope % num_pos:
            raise ValueError(f"{num_k_rope} rotated keys are not whole frames of {num_pos} grid positions")
        reps = num_k_rope // num_pos
        cos, sin = cos.repeat(reps, 1), sin.repeat(reps, 1)
    elif num_k_rope != num_pos:
        raise ValueError(f"{num_k_rope} rotated keys for {num_pos} grid positions; pass repeat_k for several frames")
    rotated = _rotate_pairs(k[..., :num_k_rope, :], cos, sin)
    return q, torch.cat([rotated, k[..., num_k_rope:, :]], dim=-2)


# --------------------------------------------------------------------------------------------------------------
# Memory attention
# --------------------------------------------------------------------------------------------------------------


@dataclass
class MemoryAttentionConfig:
    """Memory attention hyper-parameters; defaults are SAM 2.1's (sam2/configs/sam2.1/sam2.1_hiera_*.yaml)."""

    d_model: int = 256
    """Width of the current-frame tokens and of every attention (upstream's downsample_rate is 1)."""
    memory_dim: int = 64
    """Width of the memory tokens (the memory encoder's out_dim; object pointers are split to this width)."""
    num_layers: int = 4
    """Pre-norm layers (self-attention, cross-attention, MLP), followed by a final LayerNorm."""
    num_heads: int = 1
    """Attention heads of both attentions; RoPE rotates each head's d_model / num_heads channels."""
    dim_feedforward: int = 2048
    """Hidden width of the MLP."""
    dropout: float = 0.1
    """Dropout on the attention weights, the MLP hidden layer and the three residual branches (training only)."""
    activation: str = "relu"
    """MLP activation: ``"relu"`` or ``"gelu"``."""
    rope_theta: float = 10000.0
    """Base of the rotary frequency ladder."""
    pos_enc_at_input: bool = True
    """Add 0.1 x the current-frame position code to the input tokens once, before the first layer."""
    pos_enc_at_attn: bool = False
    """Add the current-frame position code to the self-attention queries and keys in every layer."""
    pos_enc_at_cross_attn_keys: bool = True
    """Add the memory position code to the cross-attention keys in every layer."""
    pos_enc_at_cross_attn_queries: bool = False
    """Add the current-frame position code to the cross-attention queries in every layer."""

    def __post_init__(self) -> None:
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        if (self.d_model // self.num_heads) % 4:
            raise ValueError(f"head dimension {self.d_model // self.num_heads} must be divisible by 4 for 2-D RoPE")
        if self.activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {self.activation!r}")


class RoPEAttention(Attention):
    """Multi-head attention with 2-D axial RoPE on queries and keys (sam2/modeling/sam/transformer.py:RoPEAttention).

    Batch-first tokens: q (B, Nq, dim), k and v (B, Nk, kv_dim). ``repeat_k`` lets the keys span several frames of
    the query grid (cross-attention to memories).
    """

    def __init__(self, dim: int, num_heads: int, kv_dim: int | None = None, dropout: float = 0.0,
                 repeat_k: bool = False) -> None:
        super().__init__(dim, num_heads, kv_dim=kv_dim, dropout=dropout)
        self.repeat_k = repeat_k

    def forward(self, q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor], num_k_exclude: int = 0) -> Tensor:
        q, k, v = self.heads(q, k, v)
        q, k = apply_rope(q, k, rope, repeat_k=self.repeat_k, num_k_exclude=num_k_exclude)
        return self.attend(q, k, v)


class MemoryAttentionLayer(nn.Module):
    """Pre-norm self-attention, cross-attention to the memory, MLP (memory_attention.py:MemoryAttentionLayer)."""

    def __init__(self, cfg: MemoryAttentionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.self_attn = RoPEAttention(d, cfg.num_heads, dropout=cfg.dropout)
        self.cross_attn_image = RoPEAttention(d, cfg.num_heads, kv_dim=cfg.memory_dim, dropout=cfg.dropout,
                                              repeat_k=True)
        self.linear1 = nn.Linear(d, cfg.dim_feedforward)
        self.dropout = nn.Dropout(cfg.dropout)
        self.linear2 = nn.Linear(cfg.dim_feedforward, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(cfg.dropout) for _ in range(3))
        self.activation = F.relu if cfg.activation == "relu" else F.gelu

    def forward(self, tgt: Tensor, memory: Tensor, query_pos: Tensor, memory_pos: Tensor,
                rope: tuple[Tensor, Tensor], num_k_exclude: int) -> Tensor:
        cfg = self.cfg
        x = self.norm1(tgt)
        qk = x + query_pos if cfg.pos_enc_at_attn else x
        tgt = tgt + self.dropout1(self.self_attn(qk, qk, x, rope))

        x = self.norm2(tgt)
        q = x + query_pos if cfg.pos_enc_at_cross_attn_queries else x
        k = memory + memory_pos if cfg.pos_enc_at_cross_attn_keys else memory
        tgt = tgt + self.dropout2(self.cross_attn_image(q, k, memory, rope, num_k_exclude=num_k_exclude))

        x = self.linear2(self.dropout(self.activation(self.linear1(self.norm3(tgt)))))
        return tgt + self.dropout3(x)


class MemoryAttention(nn.Module):
    """Current-frame tokens attend to themselves and to the memory bank (memory_attention.py:MemoryAttention).

    All tensors are batch-first:

    - ``curr``, ``curr_pos``: (B, H*W, d_model), the current frame's stride-16 features and their position code,
      tokens in row-major order of the ``grid`` (H, W);
    - ``memory``, ``memory_pos``: (B, F*H*W + P, memory_dim), F past frames' memories (each H*W tokens, same grid
      and order) followed by P = ``num_obj_ptr_tokens`` object-pointer tokens, which are not rotated.

    Returns (B, H*W, d_model), after the final LayerNorm.
    """

    def __init__(self, cfg: MemoryAttentionConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = MemoryAttentionConfig() if cfg is None else cfg
        self.layers = nn.ModuleList([MemoryAttentionLayer(cfg) for _ in range(cfg.num_layers)])
        self.norm = nn.LayerNorm(cfg.d_model)

    def _check(self, curr: Tensor, curr_pos: Tensor, memory: Tensor, memory_pos: Tensor, num_obj_ptr_tokens: int,
               grid: tuple[int, int]) -> None:
        height, width = grid
        if curr.ndim != 3 or curr.shape[1] != height * width:
            raise ValueError(f"curr must be (B, H*W, C) for grid {height}x{width}, got {tuple(curr.shape)}")
        if curr_pos.shape != curr.shape or memory_pos.shape != memory.shape:
            raise ValueError("curr_pos and memory_pos must have the shapes of curr and memory")
        if memory.ndim != 3 or memory.shape[0] != curr.shape[0]:
            raise ValueError(f"memory must be (B, N, C) with curr's batch size, got {tuple(memory.shape)}")
        spatial = memory.shape[1] - num_obj_ptr_tokens
        if num_obj_ptr_tokens < 0 or spatial < 0 or spatial % (height * width):
            raise ValueError(f"{memory.shape[1]} memory tokens minus {num_obj_ptr_tokens} object pointers are not "
                             f"whole frames of the {height}x{width} grid")

    def forward(self, curr: Tensor, curr_pos: Tensor, memory: Tensor, memory_pos: Tensor, num_obj_ptr_tokens: int,
                grid: tuple[int, int]) -> Tensor:
        self._check(curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens, grid)
        head_dim = self.cfg.d_model // self.cfg.num_heads
        rope = compute_axial_rope(head_dim, grid[0], grid[1], self.cfg.rope_theta, device=curr.device)
        x = curr + 0.1 * curr_pos if self.cfg.pos_enc_at_input else curr
        for layer in self.layers:
            x = layer(x, memory, curr_pos, memory_pos, rope, num_k_exclude=num_obj_ptr_tokens)
        return self.norm(x)


# --------------------------------------------------------------------------------------------------------------
# Memory encoder
# --------------------------------------------------------------------------------------------------------------


def mask_for_memory(mask_logits: Tensor, binarize: bool = False, scale: float = SIGMOID_SCALE_FOR_MEM_ENC,
                    bias: float = SIGMOID_BIAS_FOR_MEM_ENC) -> Tensor:
    """High-resolution mask logits -> the encoder's mask input, for ``MemoryEncoder(..., skip_mask_sigmoid=True)``.

    sigmoid (or a hard 0/1 threshold at logit 0, which SAM 2 uses at inference for masks from point prompts),
    then ``* scale + bias`` (sam2/modeling/sam2_base.py:SAM2Base._encode_new_memory).
    """
    probs = (mask_logits > 0).to(mask_logits.dtype) if binarize else torch.sigmoid(mask_logits)
    return probs * scale + bias


@dataclass
class MemoryEncoderConfig:
    """Memory encoder hyper-parameters; defaults are SAM 2.1's (sam2/configs/sam2.1/sam2.1_hiera_*.yaml)."""

    in_dim: int = 256
    """Width of the image features (stride 16) and of the downsampled mask they are summed with."""
    out_dim: int = 64
    """Width of the memory features and of their position code (a 1x1 projection when it differs from in_dim)."""
    mask_kernel_size: int = 3
    """Kernel of each mask downsampling conv."""
    mask_stride: int = 2
    """Stride of each mask downsampling conv; each one multiplies the channels by mask_stride ** 2."""
    mask_padding: int = 1
    """Padding of each mask downsampling conv."""
    mask_total_stride: int = 16
    """Mask resolution / feature resolution; must be a power of mask_stride (16 = 2**4: four convs)."""
    fuser_layers: int = 2
    """ConvNeXt blocks that fuse features and mask."""
    fuser_kernel_size: int = 7
    """Depthwise kernel of the ConvNeXt blocks (odd; 'same' padding)."""
    layer_scale_init: float = 1e-6
    """Initial ConvNeXt layer scale; 0 or less: no layer scale parameter."""
    pos_temperature: float = 10000.0
    """Temperature of the sine position code."""

    def __post_init__(self) -> None:
        if self.mask_stride < 2 or self.mask_stride**self.mask_layers != self.mask_total_stride:
            raise ValueError(f"mask_total_stride {self.mask_total_stride} is not a power of mask_stride "
                             f"{self.mask_stride} (>= 2)")
        if self.fuser_kernel_size % 2 == 0:
            raise ValueError(f"fuser_kernel_size must be odd, got {self.fuser_kernel_size}")

    @property
    def mask_layers(self) -> int:
        """Number of strided convs in the mask downsampler: log base mask_stride of mask_total_stride."""
        stride, layers = 1, 0
        while self.mask_stride > 1 and stride < self.mask_total_stride:
            stride, layers = stride * self.mask_stride, layers + 1
        return layers


class MaskDownSampler(nn.Module):
    """(B, 1, H*s, W*s) mask -> (B, embed_dim, H, W): strided conv, LayerNorm2d, GELU per step, then a 1x1 conv.

    sam2/modeling/memory_encoder.py:MaskDownSampler; channels grow by stride**2 per step (1, 4, 16, 64, 256).
    """

    def __init__(self, embed_dim: int, kernel_size: int, stride: int, padding: int, num_layers: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        chans = 1
        for _ in range(num_layers):
            out = chans * stride**2
            layers += [nn.Conv2d(chans, out, kernel_size, stride=stride, padding=padding), LayerNorm2d(out),
                       nn.GELU()]
            chans = out
        layers.append(nn.Conv2d(chans, embed_dim, kernel_size=1))
        self.encoder = nn.Sequential(*layers)

    def forward(self, masks: Tensor) -> Tensor:
        return self.encoder(masks)


class CXBlock(nn.Module):
    """ConvNeXt block (Liu et al. 2022): depthwise conv, LayerNorm, 4x MLP, layer scale, residual.

    sam2/modeling/memory_encoder.py:CXBlock, channels-last MLP as nn.Linear (upstream's parameter layout).
    """

    def __init__(self, dim: int, kernel_size: int = 7, layer_scale_init: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init)) if layer_scale_init > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(self.dwconv(x)).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = self.gamma * y
        return x + y.permute(0, 3, 1, 2)


class Fuser(nn.Module):
    """A stack of ConvNeXt blocks (memory_encoder.py:Fuser without its optional, unused input projection)."""

    def __init__(self, dim: int, num_layers: int, kernel_size: int, layer_scale_init: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList([CXBlock(dim, kernel_size, layer_scale_init) for _ in range(num_layers)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nn.Module):
    """A frame's image features and mask -> its memory features and their position code.

    sam2/modeling/memory_encoder.py:MemoryEncoder. ``pix_feat`` (B, in_dim, H, W) are the stride-16 image features,
    ``masks`` (B, 1, H * mask_total_stride, W * mask_total_stride) the mask input. With ``skip_mask_sigmoid``
    the masks are used as given (SAM 2 passes :func:`mask_for_memory`'s scaled probabilities); otherwise they are
    logits and go through a sigmoid first. Returns features (B, out_dim, H, W) and the sine position code of the
    same shape, in the features' dtype.
    """

    def __init__(self, cfg: MemoryEncoderConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = MemoryEncoderConfig() if cfg is None else cfg
        self.mask_downsampler = MaskDownSampler(cfg.in_dim, cfg.mask_kernel_size, cfg.mask_stride, cfg.mask_padding,
                                                cfg.mask_layers)
        self.pix_feat_proj = nn.Conv2d(cfg.in_dim, cfg.in_dim, kernel_size=1)
        self.fuser = Fuser(cfg.in_dim, cfg.fuser_layers, cfg.fuser_kernel_size, cfg.layer_scale_init)
        self.out_proj = (nn.Conv2d(cfg.in_dim, cfg.out_dim, kernel_size=1) if cfg.out_dim != cfg.in_dim
                         else nn.Identity())
        self.position_encoding = PositionEmbeddingSine(cfg.out_dim, temperature=cfg.pos_temperature)

    def forward(self, pix_feat: Tensor, masks: Tensor, skip_mask_sigmoid: bool = False) -> tuple[Tensor, Tensor]:
        stride = self.cfg.mask_total_stride
        height, width = pix_feat.shape[-2:]
        expected = (pix_feat.shape[0], 1, height * stride, width * stride)
        if tuple(masks.shape) != expected:
            raise ValueError(f"masks must be {expected} for features "
                             f"{tuple(pix_feat.shape)}, got {tuple(masks.shape)}")
        if not skip_mask_sigmoid:
            masks = torch.sigmoid(masks)
        x = self.pix_feat_proj(pix_feat) + self.mask_downsampler(masks)
        x = self.out_proj(self.fuser(x))
        return x, self.position_encoding(x).to(x.dtype)
