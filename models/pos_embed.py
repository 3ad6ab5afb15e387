"""Position-embedding tables: the fixed 2-D sin-cos table of MAE and resizing of learned tables.

Layout follows facebookresearch/mae util/pos_embed.py (get_2d_sincos_pos_embed, interpolate_pos_embed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sincos_1d", "sincos_2d_pos_embed", "interpolate_pos_embed"]


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """``[sin(pos * w_k) | cos(pos * w_k)]`` with ``w_k = 10000^(-k / (dim/2))``, k < dim/2. Shape (len(pos), dim).

    Sines and cosines are concatenated, not interleaved (mae util/pos_embed.py).
    """
    if dim % 2:
        raise ValueError(f"sincos_1d needs an even dim, got {dim}.")
    k = torch.arange(dim // 2, dtype=torch.float64, device=positions.device)
    omega = 1.0 / 10000 ** (k / (dim / 2))  # (dim/2,)
    angles = positions.to(torch.float64).reshape(-1, 1) * omega  # (L, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d_pos_embed(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False) -> Tensor:
    """Fixed 2-D sin-cos table, float32, shape (H*W, D) or (1 + H*W, D) with a leading zero row for the cls token.

    Tokens are in row-major order (index = row * W + col), as patch_embed flattens them. The first D/2 dims encode
    the column and the last D/2 the row: the reference builds ``meshgrid(grid_w, grid_h)`` and embeds ``grid[0]``
    (the column) first. Computed in float64 on the CPU (the reference uses numpy float64), then cast.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}.")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    rows = torch.arange(gh, dtype=torch.float64, device="cpu").repeat_interleave(gw)  # (H*W,) row of each token
    cols = torch.arange(gw, dtype=torch.float64, device="cpu").repeat(gh)  # (H*W,) column of each token
    table = torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64, device="cpu"), table], dim=0)
    return table.to(torch.float32)


def interpolate_pos_embed(
    pos_embed: Tensor,
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    old_grid: tuple[int, int] | None = None,
) -> Tensor:
    """Resize a (1, prefix + H*W, D) table to ``new_grid`` = (H', W') with bicubic interpolation.

    Prefix (cls) tokens are kept unchanged, as mae util/pos_embed.py does; ``align_corners=False``. ``old_grid``
    defaults to a square grid inferred from the token count. Returns the input unchanged when the grid is the same.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, prefix + H*W, D), got {tuple(pos_embed.shape)}.")
    num_patches = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = int(round(num_patches**0.5))
        if side * side != num_patches:
            raise ValueError(
                f"pos_embed has {num_patches} patch tokens (after {num_prefix_tokens} prefix tokens), which is not a "
                "square grid; pass old_grid=(H, W)."
            )
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != num_patches:
        raise ValueError(f"old_grid {old_grid} does not hold the {num_patches} patch tokens of pos_embed.")
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    if tuple(old_grid) == new_grid:
        return pos_embed
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    grid = patches.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # (1, D, H, W)
    # bicubic needs float32+; resize in float32 and return the caller's dtype
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False).to(pos_embed.dtype)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)
    return torch.cat([prefix, patches], dim=1)
