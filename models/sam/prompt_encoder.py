"""SAM / SAM 2 prompt encoder: points, boxes and a low-resolution mask turned into decoder inputs.

Follows facebookresearch/sam2 sam2/modeling/sam/prompt_encoder.py:PromptEncoder and
facebookresearch/segment-anything segment_anything/modeling/prompt_encoder.py:PromptEncoder. Submodule and buffer
names equal the reference ones, so ``sam_prompt_encoder.*`` (SAM 2) or ``prompt_encoder.*`` (SAM 1) checkpoint
entries load strictly once the prefix is dropped.

Sparse prompts become one token each: a random-Fourier position code of the pixel centre plus a learned type
embedding. Dense prompts (a mask at 4x the embedding grid) are downscaled by a small conv stack; without a mask a
single learned ``no_mask_embed`` is broadcast over the grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.layers import LayerNorm2d  # channel LayerNorm of NCHW maps, eps 1e-6 as SAM's
from torch import Tensor, nn

__all__ = ["PositionEmbeddingRandom", "PromptEncoder", "PromptEncoderConfig"]

# Point labels used by both SAM generations; SAM 2 also feeds box corners as points with labels 2 and 3.
NOT_A_POINT = -1
BOX_TOP_LEFT = 2
BOX_BOTTOM_RIGHT = 3


@dataclass
class PromptEncoderConfig:
    """Prompt encoder hyper-parameters; defaults are SAM 2.1's (sam2/modeling/sam2_base.py:_build_sam_heads)."""

    embed_dim: int = 256
    """Token width; equals the mask decoder's transformer_dim (SAM 2: the FPN neck's d_model)."""
    image_embedding_size: tuple[int, int] = (64, 64)
    """(h, w) of the image embedding grid: image_size // backbone stride 16."""
    input_image_size: tuple[int, int] = (1024, 1024)
    """(H, W) of the padded encoder input in pixels; point and box coordinates are divided by it."""
    mask_in_chans: int = 16
    """Channels after the mask conv stack's second conv; the first conv has mask_in_chans // 4."""
    box_corner_point_labels: bool = True
    """SAM 2: points labelled 2 / 3 get the top-left / bottom-right corner embeddings, so a box can travel as two
    points (sam2/sam2_image_predictor.py:SAM2ImagePredictor._predict). SAM 1 adds no type embedding for them."""

    @classmethod
    def sam1(cls, **overrides) -> PromptEncoderConfig:
        """segment-anything's setting (segment_anything/build_sam.py:_build_sam): same sizes, no point labels 2/3."""
        return cls(**{"box_corner_point_labels": False, **overrides})


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of 2D positions in [0, 1]^2 (sam2/modeling/position_encoding.py).

    PE(c) = [sin x, cos x] with x = 2 pi (2 c - 1) G and G ~ N(0, 1) of shape (2, num_pos_feats). G is a buffer
    (not a parameter) but is stored in checkpoints, so loading one restores the exact frequencies.
    """

    def __init__(self, num_pos_feats: int = 64) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))

    def encode(self, coords: Tensor) -> Tensor:
        """(..., 2) normalised (x, y) -> (..., 2 * num_pos_feats)."""
        proj = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        proj = (2 * math.pi) * proj
        return torch.cat([proj.sin(), proj.cos()], dim=-1)

    def forward(self, size: tuple[int, int]) -> Tensor:
        """Codes of the cell centres (i + 0.5) / size of an (h, w) grid, as (C, h, w)."""
        h, w = size
        gauss = self.positional_encoding_gaussian_matrix
        ys = (torch.arange(h, device=gauss.device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=gauss.device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1)
        return self.encode(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Pixel (x, y) coordinates (B, N, 2) of an image of (H, W) -> (B, N, C)."""
        scale = coords.new_tensor([image_size[1], image_size[0]])
        return self.encode((coords / scale).float())


class PromptEncoder(nn.Module):
    """Embeds point / box / mask prompts into sparse tokens (B, n, d) and a dense map (B, d, h, w)."""

    def __init__(self, cfg: PromptEncoderConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or PromptEncoderConfig()
        self.cfg = cfg
        self.embed_dim = cfg.embed_dim
        self.image_embedding_size = tuple(cfg.image_embedding_size)
        self.input_image_size = tuple(cfg.input_image_size)
        self.mask_input_size = (4 * self.image_embedding_size[0], 4 * self.image_embedding_size[1])
        self.pe_layer = PositionEmbeddingRandom(cfg.embed_dim // 2)
        # index 0 / 1: negative / positive click; 2 / 3: top-left / bottom-right box corner
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, cfg.embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, cfg.embed_dim)
        hidden = cfg.mask_in_chans
        # indices 0, 1, 3, 4, 6 carry the weights, as in the reference nn.Sequential
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, hidden // 4, kernel_size=2, stride=2),
            LayerNorm2d(hidden // 4),
            nn.GELU(),
            nn.Conv2d(hidden // 4, hidden, kernel_size=2, stride=2),
            LayerNorm2d(hidden),
            nn.GELU(),
            nn.Conv2d(hidden, cfg.embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, cfg.embed_dim)

    def get_dense_pe(self) -> Tensor:
        """Position code of every embedding cell, (1, d, h, w): the ``image_pe`` input of the mask decoder."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def embed_points(self, points: Tensor, labels: Tensor, pad: bool) -> Tensor:
        """(B, N, 2) pixel coords + (B, N) labels -> (B, N [+1], d).

        ``pad`` appends a point (0, 0) labelled -1; the reference does this whenever no box follows, so that the
        token count (and the attention context) matches training. Label -1 drops the position code entirely.
        """
        points = points + 0.5  # pixel centre
        labels = labels.to(points.dtype)
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), NOT_A_POINT)], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        absent = (labels == NOT_A_POINT).unsqueeze(-1)
        emb = torch.where(absent, torch.zeros_like(emb) + self.not_a_point_embed.weight, emb)
        typed = (0, 1, 2, 3) if self.cfg.box_corner_point_labels else (0, 1)
        for label in typed:
            emb = torch.where((labels == label).unsqueeze(-1), emb + self.point_embeddings[label].weight, emb)
        return emb

    def embed_boxes(self, boxes: Tensor) -> Tensor:
        """(B, 4) pixel boxes (x0, y0, x1, y1) -> (B, 2, d): one token per corner."""
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_types = torch.cat([self.point_embeddings[BOX_TOP_LEFT].weight,
                                  self.point_embeddings[BOX_BOTTOM_RIGHT].weight], dim=0)
        return emb + corner_types

    def embed_masks(self, masks: Tensor) -> Tensor:
        """(B, 1, 4h, 4w) mask logits -> (B, d, h, w)."""
        return self.mask_downscaling(masks)

    def forward(
        self,
        points: Tensor | None = None,
        labels: Tensor | None = None,
        boxes: Tensor | None = None,
        masks: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Sparse tokens (B, n, d), points first then box corners, and dense embeddings (B, d, h, w).

        points (B, N, 2) with labels (B, N) in {-1, 0, 1} (SAM 2 also 2, 3), boxes (B, 4), masks (B, 1, 4h, 4w);
        any may be None. With no prompt at all the batch size is 1 and there are no sparse tokens.
        """
        if (points is None) != (labels is None):
            raise ValueError("points and labels must be given together.")
        batch = next((t.shape[0] for t in (points, boxes, masks) if t is not None), 1)
        weight = self.no_mask_embed.weight
        sparse = [weight.new_empty(batch, 0, self.embed_dim)]
        if points is not None:
            sparse.append(self.embed_points(points, labels, pad=boxes is None))
        if boxes is not None:
            sparse.append(self.embed_boxes(boxes))
        if masks is not None:
            dense = self.embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = weight.reshape(1, -1, 1, 1).expand(batch, -1, h, w)
        return torch.cat(sparse, dim=1), dense
