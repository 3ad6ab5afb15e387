"""Fixed sine-cosine position code of a feature map (DETR's, Carion et al. 2020), as SAM 2 uses it.

Follows facebookresearch/sam2 sam2/modeling/position_encoding.py:PositionEmbeddingSine (normalised positions,
scale 2*pi). The module holds no parameters or buffers, so a checkpoint has no entries for it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """(B, C, H, W) map -> (B, num_pos_feats, H, W) float32 code: the first half encodes the row, the second the
    column; within each half even channels are sines and odd channels cosines of a geometric frequency ladder."""

    def __init__(self, num_pos_feats: int, temperature: float = 10000.0, normalize: bool = True,
                 scale: float | None = None) -> None:
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even (half for rows, half for columns), got {num_pos_feats}")
        if scale is not None and not normalize:
            raise ValueError("scale only applies to normalised positions: pass normalize=True")
        self.num_pos_feats = num_pos_feats // 2
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def _encode(self, positions: Tensor) -> Tensor:
        """1-D positions (N,) -> (N, num_pos_feats): sin at even channels, cos at odd ones, a frequency per pair."""
        index = torch.arange(self.num_pos_feats, dtype=torch.float32, device=positions.device)
        dim_t = self.temperature ** (2 * (index // 2) / self.num_pos_feats)
        angles = positions[:, None] / dim_t
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    @torch.no_grad()
    def grid(self, height: int, width: int, device: torch.device | str | None = None) -> Tensor:
        """The (num_pos_feats * 2, height, width) code of an height x width grid."""
        rows = torch.arange(1, height + 1, dtype=torch.float32, device=device)
        cols = torch.arange(1, width + 1, dtype=torch.float32, device=device)
        if self.normalize:
            # Positions 1..n divided by n (+eps as upstream), so every grid size spans (0, scale].
            rows = rows / (rows[-1:] + 1e-6) * self.scale
            cols = cols / (cols[-1:] + 1e-6) * self.scale
        pos_y = self._encode(rows)[:, None, :].expand(height, width, -1)
        pos_x = self._encode(cols)[None, :, :].expand(height, width, -1)
        return torch.cat((pos_y, pos_x), dim=-1).permute(2, 0, 1)

    def forward(self, x: Tensor) -> Tensor:
        code = self.grid(x.shape[-2], x.shape[-1], device=x.device)
        return code[None].repeat(x.shape[0], 1, 1, 1)
