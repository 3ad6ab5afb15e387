"""Video label propagation on frozen patch features: the semi-supervised video object segmentation protocol of
space-time correspondence (Jabri et al. 2020, "Space-Time Correspondence as a Contrastive Random Walk") as DINO
evaluates it (Caron et al. 2021, §4.2 and facebookresearch/dino eval_video_segmentation.py), used by Perception
Encoder to score spatial features (Bolya et al. 2025, the frozen-feature tracking results on DAVIS).

The first frame's labels (background and one channel per object) are given at the feature grid. Each later frame's
labels are a weighted vote of the labels of its context: the first frame and the ``context`` frames before it,
whose labels are the earlier predictions (soft). A target token's weights are exp(cos / temperature) to every
context token within ``radius`` patches (a square neighbourhood), kept for its ``topk`` largest and normalised to
sum to one. The soft labels are upsampled bilinearly to pixels, each channel is rescaled to [0, 1], and the argmax
is the predicted segmentation. DINO's defaults: temperature 0.1, top-5, 7 context frames, neighbourhood 12 patches
(at 480p with 8-px patches).

    soft = propagate_labels(features, first_labels)          # features (T, C, h, w), first_labels (K+1, h, w)
    ids = propagate_segmentation(features, first_ids, patch)  # first_ids (H, W) -> predicted ids (T, H, W)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["neighbourhood_mask", "propagate_labels", "propagate_segmentation", "one_hot_at_grid",
           "rescale_channels"]


def neighbourhood_mask(height: int, width: int, radius: int | None, device=None) -> Tensor:
    """(h*w, h*w) bool: token j is within ``radius`` patches of token i along both axes (a square window, as DINO's
    ``restrict_neighborhood``); None: every pair."""
    if radius is None:
        return torch.ones(height * width, height * width, dtype=torch.bool, device=device)
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    near_rows = (rows[:, None] - rows[None, :]).abs() <= radius
    near_cols = (cols[:, None] - cols[None, :]).abs() <= radius
    return near_rows & near_cols


def _vote(target: Tensor, sources: list[Tensor], labels: list[Tensor], allowed: Tensor, topk: int,
          temperature: float) -> Tensor:
    """Soft labels (K+1, h*w) of the target's tokens (C, h*w) from the context tokens and their labels."""
    keys = F.normalize(torch.cat(sources, dim=1), dim=0)  # (C, n*h*w)
    query = F.normalize(target, dim=0)  # (C, h*w)
    weights = torch.exp(keys.T @ query / temperature)  # (n*h*w context tokens, h*w targets)
    weights = weights * allowed.repeat(len(sources), 1)
    kept = weights.topk(min(topk, weights.shape[0]), dim=0).values.amin(dim=0, keepdim=True)
    weights = torch.where(weights >= kept, weights, torch.zeros_like(weights))
    weights = weights / weights.sum(dim=0, keepdim=True)
    return torch.cat(labels, dim=1) @ weights  # (K+1, n*h*w) @ (n*h*w, h*w)


@torch.no_grad()
def propagate_labels(features: Tensor, first_labels: Tensor, *, topk: int = 5, context: int = 7,
                     radius: int | None = 12, temperature: float = 0.1) -> Tensor:
    """Soft labels (T, K+1, h, w) of every frame: frame 0's are ``first_labels``; frame t's are voted from frame 0
    and frames max(1, t - context) .. t - 1 (their own propagated labels).

    features: (T, C, h, w) patch features of the frames; first_labels: (K+1, h, w) frame 0's labels at the grid
    (one-hot, background first)."""
    num_frames, channels, height, width = features.shape
    if first_labels.shape[-2:] != (height, width):
        raise ValueError(f"propagate_labels: first_labels {tuple(first_labels.shape)} must be (K+1, {height}, "
                         f"{width}), the feature grid")
    tokens = features.float().flatten(2)  # (T, C, h*w)
    allowed = neighbourhood_mask(height, width, radius, features.device)
    labels = [first_labels.float().flatten(1)]
    for t in range(1, num_frames):
        recent = list(range(max(1, t - context), t))
        sources = [tokens[0]] + [tokens[i] for i in recent]
        labels.append(_vote(tokens[t], sources, [labels[0]] + [labels[i] for i in recent], allowed, topk,
                            temperature))
    return torch.stack(labels).view(num_frames, -1, height, width)


def one_hot_at_grid(ids: Tensor, num_objects: int, grid: tuple[int, int]) -> Tensor:
    """(H, W) integer ids (0 background, 1..K objects) -> (K+1, h, w) one-hot labels at the feature grid, resized
    nearest-neighbour as DINO reads the first frame's annotation."""
    small = F.interpolate(ids[None, None].float(), size=grid, mode="nearest")[0, 0].long()
    return F.one_hot(small.clamp(0, num_objects), num_objects + 1).permute(2, 0, 1).float()


def rescale_channels(labels: Tensor) -> Tensor:
    """Each channel of (..., K+1, H, W) soft labels min-max rescaled to [0, 1] where its maximum is positive (DINO's
    ``norm_mask``, applied before the argmax)."""
    low = labels.amin(dim=(-2, -1), keepdim=True)
    high = labels.amax(dim=(-2, -1), keepdim=True)
    rescaled = (labels - low) / (high - low).clamp_min(1e-12)
    return torch.where(high > 0, rescaled, labels)


@torch.no_grad()
def propagate_segmentation(features: Tensor, first_ids: Tensor, patch_size: int, **options) -> Tensor:
    """Predicted instance ids (T, H, W) of every frame, frame 0 = ``first_ids`` (H, W), H = h * patch_size; the
    soft labels of ``propagate_labels(**options)`` upsampled bilinearly, rescaled per channel, argmaxed."""
    num_objects = int(first_ids.max())
    grid = tuple(features.shape[-2:])
    soft = propagate_labels(features, one_hot_at_grid(first_ids, num_objects, grid), **options)
    size = (grid[0] * patch_size, grid[1] * patch_size)
    full = F.interpolate(soft, size=size, mode="bilinear", align_corners=False)
    ids = rescale_channels(full).argmax(dim=1)
    ids[0] = first_ids
    return ids
