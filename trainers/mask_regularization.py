"""Mask regularisation for contrastive pretraining, the last step of Perception Encoder's recipe (Bolya et al. 2025,
§2.1): a small part of each batch is seen a second time with most of its patches blanked, and the tower is asked to
produce at the blanked patches the features it produces for the intact image (a MaskFeat-style target, Wei et al.
2022, with the model's own features in place of HOG).

PE's training code is not released, so the details are this module's:
- the images: the first ``fraction`` of the batch (0.0625 in the paper-scale configs), at least one; the batch
  is shuffled, so these are random images, and they also take part in the contrastive loss unmasked;
- the mask: exactly ``round(ratio * N)`` of an image's N patches, chosen uniformly, set to zero in the normalised
  image (the data's mean colour). PE's patch embedding has no bias, so a blanked patch enters the tower as its
  position embedding alone: a mask token that adds no parameter, and the model's architecture and export stay
  PE's;
- the target: the final patch tokens of the intact image, from the pass the contrastive loss already makes,
  without gradient. Both sides are standardised per channel over each image's tokens first (data2vec's instance
  normalisation of its targets, Baevski et al. 2022): with the model as its own teacher, raw features can meet the
  target by sharing one large component across every token, which the loss would reward and which collapses the
  patch features; standardised, only what differs between patches counts. The loss is the mean over blanked
  patches of ``1 - cos(masked, intact)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def random_patch_mask(images: int, grid: tuple[int, int], ratio: float, device: torch.device | str = "cpu",
                      generator: torch.Generator | None = None) -> Tensor:
    """(images, H*W) booleans, True at exactly ``round(ratio * H*W)`` (at least 1) uniformly chosen patches per row.
    Drawn on ``device`` without a host sync."""
    patches = grid[0] * grid[1]
    blanked = max(1, round(ratio * patches))
    noise = torch.rand(images, patches, device=device, generator=generator)
    mask = torch.zeros(images, patches, dtype=torch.bool, device=device)
    return mask.scatter_(1, noise.argsort(dim=1)[:, :blanked], True)


def blank_patches(images: Tensor, mask: Tensor, patch_size: int) -> Tensor:
    """``images`` (B, C, H, W) with the patches where ``mask`` (B, H/p * W/p) is True set to zero."""
    batch, _, height, width = images.shape
    grid = mask.view(batch, 1, height // patch_size, width // patch_size)
    pixels = grid.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)
    return images.masked_fill(pixels, 0.0)


def masked_feature_loss(patch_features: Callable[[Tensor], Tensor], images: Tensor, intact: Tensor,
                        patch_size: int, fraction: float, ratio: float) -> Tensor:
    """The regulariser for one batch.

    Args:
        patch_features: images -> the tower's final patch tokens (B, N, width), with gradients.
        images: the batch the tower saw (B, C, H, W); intact: its patch tokens from that pass (B, N, width).
        patch_size: the tower's patch size; fraction, ratio: of the batch, of each image's patches.
    """
    count = max(1, round(fraction * images.shape[0]))
    grid = (images.shape[-2] // patch_size, images.shape[-1] // patch_size)
    mask = random_patch_mask(count, grid, ratio, device=images.device)
    predicted = standardise_over_tokens(patch_features(blank_patches(images[:count], mask, patch_size)))
    target = standardise_over_tokens(intact[:count].detach())
    return (1 - F.cosine_similarity(predicted[mask], target[mask], dim=-1)).mean()


def standardise_over_tokens(tokens: Tensor) -> Tensor:
    """(B, N, C) -> each channel at zero mean and unit variance over an image's N tokens, in fp32."""
    return F.instance_norm(tokens.float().transpose(1, 2)).transpose(1, 2)
