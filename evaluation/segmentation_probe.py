"""A linear segmentation probe on frozen patch features, scored by mean IoU.

The dense linear-probe protocol (DINOv2, Oquab et al. 2023, §7.4 "linear"; the Perception Encoder ADE20k linear
probe, Bolya et al. 2025): one linear layer maps each patch token to class logits, the logits are upsampled
bilinearly to the pixels, and the argmax is scored against the pixel labels. Here the layer is fitted on the
training patches by :func:`evaluation.linear_head.fit_linear_head` (L-BFGS logistic regression to convergence, a
deterministic "brief training"), each patch labelled with the class covering most of its pixels.

    probe = fit_segmentation_probe(train_features, train_labels, num_classes=2)   # (N, C, h, w), (N, H, W)
    miou = mean_iou(predict_segmentation(probe, test_features, (H, W)), test_labels, num_classes=2)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evaluation.linear_head import fit_linear_head

__all__ = ["patch_majority_labels", "fit_segmentation_probe", "predict_segmentation", "mean_iou"]


def patch_majority_labels(labels: Tensor, grid: tuple[int, int], num_classes: int) -> Tensor:
    """(N, H, W) pixel classes -> (N, h, w): the class covering most of each patch's pixels (H = h * patch)."""
    one_hot = F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(one_hot, grid).argmax(dim=1)


def fit_segmentation_probe(features: Tensor, labels: Tensor, num_classes: int, weight_decay: float = 1e-4,
                           max_iter: int = 200) -> nn.Linear:
    """A linear layer (C -> num_classes) fitted on every patch of (N, C, h, w) frozen features, each patch labelled
    by the majority class of its pixels in (N, H, W) ``labels``. Callable from validation, which runs under
    inference mode: the solver differentiates its objective, so it runs outside it on copies."""
    with torch.inference_mode(False), torch.enable_grad():
        targets = patch_majority_labels(labels, tuple(features.shape[-2:]), num_classes).flatten().clone()
        tokens = features.detach().float().permute(0, 2, 3, 1).flatten(0, 2).clone()  # (N*h*w, C)
        return fit_linear_head(tokens, targets, num_classes, weight_decay=weight_decay, max_iter=max_iter)


@torch.no_grad()
def predict_segmentation(probe: nn.Linear, features: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, C, h, w) features -> (N, H, W) classes: patch logits upsampled bilinearly to ``size``, argmax."""
    logits = probe(features.float().permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(dim=1)


def mean_iou(pred: Tensor, target: Tensor, num_classes: int) -> float:
    """Mean over classes present in ``target`` or ``pred`` of |pred = c and target = c| / |pred = c or target = c|,
    accumulated over every pixel of the set (not per image), in percent."""
    ious = []
    for c in range(num_classes):
        p, t = pred == c, target == c
        union = (p | t).sum()
        if union > 0:
            ious.append((p & t).sum().double() / union)
    return 100.0 * float(torch.stack(ious).mean()) if ious else float("nan")
