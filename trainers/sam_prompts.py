"""Prompt simulation for SAM 2 training and interactive evaluation (Ravi et al. 2024): a noisy box from a
ground-truth mask, and correction clicks drawn from the errors of the current prediction, following
facebookresearch/sam2 sam2/modeling/sam2_utils.py (sample_box_points, sample_random_points_from_errors,
sample_one_point_from_error_center, get_next_point).

Conventions, as upstream: masks are ``(B, 1, H, W)`` booleans (one object each); points are ``(x, y)`` pixel
coordinates (column, row) in float32; point labels are int32, 1 for a positive click (add this pixel), 0 for a
negative one (remove it), 2 and 3 for the top-left and bottom-right corners of a box.

The training-time samplers (:func:`sample_box_points`, :func:`sample_random_points_from_errors`) draw on the
masks' device and never read a value on the host; they take an optional ``torch.Generator``, and without one they
consume the global generator exactly as upstream does (same shapes, same order), so the same seed gives the same
prompts. :func:`sample_one_point_from_error_center` is for evaluation only: it computes a distance transform on
the CPU.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt
from torch import Tensor

BOX_LABELS = (2, 3)  # top-left, bottom-right corner


def _check_masks(gt: Tensor, pred: Tensor | None) -> Tensor:
    """``pred``, or an empty prediction when it is None, after checking both are (B, 1, H, W) booleans."""
    if pred is None:
        pred = torch.zeros_like(gt)
    if gt.dtype != torch.bool or pred.dtype != torch.bool or gt.ndim != 4 or gt.shape[1] != 1:
        raise ValueError(f"need boolean (B, 1, H, W) masks; got {gt.dtype} {tuple(gt.shape)}")
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in shape")
    return pred


def mask_to_box(masks: Tensor) -> Tensor:
    """(B, 1, 4) int32 ``(x_min, y_min, x_max, y_max)`` of the True pixels of each (B, 1, H, W) mask, inclusive
    (a single pixel at (x, y) gives (x, y, x, y)). An empty mask gives (W, H, -1, -1), as upstream's
    sam2/utils/misc.py:mask_to_box."""
    height, width = masks.shape[-2:]
    masks = masks.bool()
    cols = masks.any(dim=-2)  # (B, 1, W): columns holding a pixel of the object
    rows = masks.any(dim=-1)  # (B, 1, H)
    xs = torch.arange(width, dtype=torch.int32, device=masks.device)
    ys = torch.arange(height, dtype=torch.int32, device=masks.device)
    x_min = torch.where(cols, xs, width).amin(dim=-1)
    x_max = torch.where(cols, xs, -1).amax(dim=-1)
    y_min = torch.where(rows, ys, height).amin(dim=-1)
    y_max = torch.where(rows, ys, -1).amax(dim=-1)
    return torch.stack((x_min, y_min, x_max, y_max), dim=-1)


def sample_box_points(masks: Tensor, noise: float = 0.1, noise_bound: float = 20,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """A box prompt from each (B, 1, H, W) mask: its :func:`mask_to_box`, each coordinate moved by an independent
    uniform offset in ``±min(noise * side, noise_bound)`` pixels (side: the box's x_max - x_min for x, y_max - y_min
    for y; SAM's defaults 0.1 and 20), then clamped into the image, [0, W - 1] x [0, H - 1].

    Returns the corners as points (B, 2, 2) float32, (x, y) top-left then bottom-right, and their labels (B, 2)
    int32, 2 and 3. ``noise=0``: the exact box (nothing drawn, nothing clamped)."""
    batch, _, height, width = masks.shape
    box = mask_to_box(masks).to(torch.float32)  # (B, 1, 4)
    labels = torch.arange(BOX_LABELS[0], BOX_LABELS[1] + 1, dtype=torch.int32, device=masks.device)
    if noise > 0:
        sides = box[..., 2:] - box[..., :2]  # (B, 1, 2): width, height
        reach = (sides * noise).clamp(max=noise_bound).repeat(1, 1, 2)  # per coordinate x, y, x, y
        offsets = 2 * torch.rand(batch, 1, 4, device=masks.device, generator=generator) - 1
        box = box + offsets * reach
        box = torch.stack((box[..., 0::2].clamp(0, width - 1), box[..., 1::2].clamp(0, height - 1)), dim=-1)
    return box.reshape(batch, 2, 2), labels.repeat(batch, 1)


def sample_random_points_from_errors(gt: Tensor, pred: Tensor | None, num_points: int = 1,
                                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``num_points`` independent correction clicks per mask, each uniform over the error region of the prediction:
    a false-negative pixel (in ``gt``, missed by ``pred``) gives a positive click, a false-positive one a negative
    click. Where the prediction is exactly right, the click is a negative one uniform over the background, and
    (0, 0) with label 0 when there is no background either.

    gt, pred: (B, 1, H, W) bool (``pred=None``: an empty prediction). Returns points (B, num_points, 2) float32 (x, y)
    and labels (B, num_points) int32. Uniformity: the argmax of U(0, 1) noise masked to the region, with one noise
    channel for the negative and one for the positive region, as upstream; the (B, num_points, H, W, 2) noise is
    the memory cost."""
    pred = _check_masks(gt, pred)
    if num_points < 0:
        raise ValueError(f"num_points must be >= 0; got {num_points}")
    batch, _, height, width = gt.shape
    false_pos, false_neg = pred & ~gt, gt & ~pred
    exact = (gt == pred).flatten(1).all(dim=1).view(batch, 1, 1, 1)
    regions = torch.stack((false_pos | (exact & ~gt), false_neg), dim=-1)  # (B, 1, H, W, 2): label 0, label 1
    draws = torch.rand(batch, num_points, height, width, 2, device=gt.device, generator=generator)
    flat = (draws * regions).flatten(2).argmax(dim=2)  # (B, num_points): pixel * 2 + label
    labels = (flat % 2).to(torch.int32)
    pixel = flat // 2
    points = torch.stack((pixel % width, pixel // width), dim=-1).to(torch.float32)
    return points, labels


def _region_depth(region: np.ndarray, padding: bool) -> np.ndarray:
    """Euclidean distance of each pixel of ``region`` to the nearest pixel outside it (0 outside), flattened.
    ``padding``: the image border counts as outside. Exact, as OpenCV's distanceTransform with DIST_L2 and
    DIST_MASK_PRECISE that upstream uses."""
    if padding:
        return distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1].reshape(-1)
    return distance_transform_edt(region).reshape(-1)


def sample_one_point_from_error_center(gt: Tensor, pred: Tensor | None,
                                       padding: bool = True) -> tuple[Tensor, Tensor]:
    """One correction click per mask at the centre of the largest error (the RITM click of Sofiiuk et al. 2022,
    saic-vul/ritm_interactive_segmentation isegm/inference/clicker.py): the pixel farthest from the border of the
    false-negative or the false-positive region, whichever reaches farther (the false positive on a tie, so an
    exact prediction gives (0, 0) with label 0); among equally far pixels, the first in row-major order.

    gt, pred: (B, 1, H, W) bool. Returns points (B, 1, 2) float32 (x, y) and labels (B, 1) int32 (1 for a
    false-negative click), on the masks' device. Evaluation only: it copies the masks to the host."""
    pred = _check_masks(gt, pred)
    width = gt.shape[-1]
    false_pos = (pred & ~gt)[:, 0].cpu().numpy()
    false_neg = (gt & ~pred)[:, 0].cpu().numpy()
    points = torch.zeros(gt.shape[0], 1, 2, dtype=torch.float32)
    labels = torch.zeros(gt.shape[0], 1, dtype=torch.int32)
    for b in range(gt.shape[0]):
        depth_fn, depth_fp = _region_depth(false_neg[b], padding), _region_depth(false_pos[b], padding)
        best_fn, best_fp = int(depth_fn.argmax()), int(depth_fp.argmax())
        positive = bool(depth_fn[best_fn] > depth_fp[best_fp])
        index = best_fn if positive else best_fp
        points[b, 0, 0], points[b, 0, 1] = index % width, index // width
        labels[b, 0] = int(positive)
    return points.to(gt.device), labels.to(gt.device)


def get_next_point(gt: Tensor, pred: Tensor | None, method: str,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One correction click per mask: ``"uniform"`` (:func:`sample_random_points_from_errors`, training) or
    ``"center"`` (:func:`sample_one_point_from_error_center`, evaluation; ``generator`` unused)."""
    if method == "uniform":
        return sample_random_points_from_errors(gt, pred, generator=generator)
    if method == "center":
        return sample_one_point_from_error_center(gt, pred)
    raise ValueError(f"unknown point sampling method {method!r}; expected 'uniform' or 'center'")
