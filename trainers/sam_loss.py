"""The SAM 2 training loss (Ravi et al. 2024), as a pure function of the model's predictions, following
facebookresearch/sam2 training/loss_fns.py:MultiStepMultiMasksAndIous with the SAM 2.1 fine-tuning flags
(``supervise_all_iou``, ``iou_use_l1_loss`` and ``pred_obj_scores`` on).

    losses = sam2_loss(step_outputs, targets, num_objects)
    losses["core_loss"].backward()

``step_outputs[f][s]`` is the :class:`StepPrediction` of correction step ``s`` on frame ``f``: for the O objects
of the local batch, the mask logits ``(O, M, H, W)`` at full (input) resolution, the predicted IoUs ``(O, M)``
(the IoU head's sigmoid outputs) and the object-score logits ``(O, 1)``. ``targets[f]`` is the ``(O, H, W)``
ground truth of frame ``f`` (nonzero = object). ``num_objects`` is the normaliser N: the number of objects in the
local batch (every object of every video), averaged over the ranks and clamped to at least 1
(:func:`global_num_objects`).

For one step, object o and its M candidate masks m (p = sigmoid(logit), g the target, means and sums over the
H*W pixels):

    focal[o, m] = mean(alpha_t * BCE(logit, g) * (1 - p_t)^gamma) / N      alpha = 0.25, gamma = 2
    dice[o, m]  = (1 - (2 * sum(p * g) + 1) / (sum(p) + sum(g) + 1)) / N
    iou[o, m]   = |iou_pred[o, m] - IoU(logit > 0, g > 0)| / N             (squared error when iou_use_l1=False)
    class[o]    = BCE(object_score_logit[o], present[o]) / N               present[o] = any(g[o] > 0)

where IoU = |intersection| / max(|union|, 1) (0 for an empty prediction of an empty target). With M > 1, the mask
and dice terms of object o are those of its best candidate, argmin over m of ``w_mask * focal + w_dice * dice``
(the first on ties), and its IoU term is the mean over the M candidates (``supervise_all_iou``; the best
candidate's otherwise). The mask, dice and IoU terms are multiplied by ``present[o]``: an object absent from the
frame only trains the object score. Each term is summed over the objects, then over the steps and the frames (no
average over either), and

    core_loss = sum_k weights[k] * loss_k      k in loss_mask, loss_dice, loss_iou, loss_class

with :data:`MOSE_WEIGHTS` = 20 / 1 / 1 / 1 by default (sam2's configs/sam2.1_training/
sam2.1_hiera_b+_MOSE_finetune.yaml). A zero weight drops its term from ``core_loss`` entirely, as upstream does.

Nothing here reads a tensor's value on the host, so a training step that calls it never waits for the device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

LOSS_KEYS = ("loss_mask", "loss_dice", "loss_iou", "loss_class")
MOSE_WEIGHTS: Mapping[str, float] = {"loss_mask": 20.0, "loss_dice": 1.0, "loss_iou": 1.0, "loss_class": 1.0}


@dataclass(frozen=True)
class StepPrediction:
    """The prediction for the O objects of one frame after one prompt (the first click, box or mask, or a
    correction click).

    mask_logits: (O, M, H, W) mask logits at the resolution of the targets; M = 1 or the multimask candidates.
    iou_pred: (O, M) predicted IoU of each candidate with the target (probabilities, not logits).
    object_score_logits: (O, 1) logit that the object is visible in the frame.
    """

    mask_logits: Tensor
    iou_pred: Tensor
    object_score_logits: Tensor

    def __post_init__(self):
        if self.mask_logits.ndim != 4 or tuple(self.iou_pred.shape) != tuple(self.mask_logits.shape[:2]):
            raise ValueError(f"StepPrediction needs mask_logits (O, M, H, W) and iou_pred (O, M); got "
                             f"{tuple(self.mask_logits.shape)} and {tuple(self.iou_pred.shape)}")
        if tuple(self.object_score_logits.shape) != (self.mask_logits.shape[0], 1):
            raise ValueError(f"StepPrediction needs object_score_logits (O, 1) = ({self.mask_logits.shape[0]}, 1); got "
                             f"{tuple(self.object_score_logits.shape)}")


def global_num_objects(local_count: int, device: torch.device | str) -> Tensor:
    """The loss normaliser N: ``local_count`` (the objects of every video in this rank's batch), averaged over the
    ranks when torch.distributed is initialised, clamped to at least 1. A 0-d float32 tensor on ``device``, so
    the loss divides by it without the host reading it (upstream takes ``.item()`` of the same number)."""
    count = torch.full((), float(local_count), dtype=torch.float32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp(min=1.0)


def sigmoid_focal_per_mask(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """(O, M): the focal loss (Lin et al. 2017) of each mask, averaged over its pixels; ``targets`` (O, M, H, W)
    in {0, 1}. ``alpha < 0`` disables the class weighting."""
    prob = logits.sigmoid()
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)  # the probability given to the true class
    loss = loss * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.flatten(2).mean(-1)


def dice_per_mask(logits: Tensor, targets: Tensor) -> Tensor:
    """(O, M): the soft dice loss of each mask, with +1 smoothing so that an empty target is matched by an empty
    prediction."""
    prob = logits.sigmoid().flatten(2)
    targets = targets.flatten(2)
    overlap = 2 * (prob * targets).sum(-1)
    return 1 - (overlap + 1) / (prob.sum(-1) + targets.sum(-1) + 1)


def mask_iou(logits: Tensor, targets: Tensor) -> Tensor:
    """(O, M): the IoU of the binarised prediction (logit > 0) with the target (> 0), in ``logits``' dtype; 0 when
    both are empty. Not differentiable: it is the regression target of the IoU head."""
    pred = logits.flatten(2) > 0
    gt = targets.flatten(2) > 0
    inter = (pred & gt).sum(-1)
    union = (pred | gt).sum(-1).clamp(min=1)
    return inter.to(logits.dtype) / union.to(logits.dtype)


def _step_losses(step: StepPrediction, gt: Tensor, present: Tensor, num_objects: Tensor | float,
                 weights: Mapping[str, float], supervise_all_iou: bool, iou_use_l1: bool) -> tuple[Tensor, ...]:
    """The four (already normalised, object-summed) terms of one step. ``gt`` (O, 1, H, W) float in {0, 1};
    ``present`` (O, 1) float."""
    logits = step.mask_logits
    gt = gt.expand_as(logits)
    focal = sigmoid_focal_per_mask(logits, gt) / num_objects
    dice = dice_per_mask(logits, gt) / num_objects
    iou_error = step.iou_pred - mask_iou(logits, gt)
    iou = (iou_error.abs() if iou_use_l1 else iou_error.square()) / num_objects
    if logits.shape[1] > 1:  # only the best candidate learns the mask, as in SAM's ambiguity-aware training
        best = (focal * weights["loss_mask"] + dice * weights["loss_dice"]).argmin(dim=1, keepdim=True)
        focal, dice = focal.gather(1, best), dice.gather(1, best)
        iou = iou.mean(dim=1, keepdim=True) if supervise_all_iou else iou.gather(1, best)
    score = F.binary_cross_entropy_with_logits(step.object_score_logits, present, reduction="none")
    terms = (focal * present, dice * present, iou * present)
    return tuple(term.sum() for term in terms) + (score.mean(dim=1).sum() / num_objects,)


def _check_frames(step_outputs: Sequence[Sequence[StepPrediction]], targets: Sequence[Tensor] | Tensor) -> None:
    if len(step_outputs) == 0 or len(step_outputs) != len(targets):
        raise ValueError(f"sam2_loss needs one list of steps per frame and as many targets; got "
                         f"{len(step_outputs)} frames and {len(targets)} targets")
    for steps, target in zip(step_outputs, targets):
        if len(steps) == 0:
            raise ValueError("sam2_loss needs at least one step per frame")
        for step in steps:
            objects, _, height, width = step.mask_logits.shape
            if tuple(target.shape) != (objects, height, width):
                raise ValueError(f"sam2_loss needs targets (O, H, W) = {(objects, height, width)} for "
                                 f"mask_logits {tuple(step.mask_logits.shape)}; got {tuple(target.shape)}")


def sam2_loss(step_outputs: Sequence[Sequence[StepPrediction]], targets: Sequence[Tensor] | Tensor,
              num_objects: Tensor | float, weights: Mapping[str, float] = MOSE_WEIGHTS,
              supervise_all_iou: bool = True, iou_use_l1: bool = True) -> dict[str, Tensor]:
    """The SAM 2 loss of a clip's predictions; see the module docstring for the formula.

    step_outputs: per frame, the :class:`StepPrediction` of each prompt / correction step on it.
    targets: per frame, the (O, H, W) ground-truth masks (bool or {0, 1}), or one (T, O, H, W) tensor.
    num_objects: the normaliser N, a float or a 0-d tensor (:func:`global_num_objects`).
    weights: the weight of each of ``loss_mask``, ``loss_dice``, ``loss_iou`` and ``loss_class``.

    Returns the four terms (summed over objects, steps and frames, each already divided by N) and ``core_loss``,
    their weighted sum, as 0-d tensors in the logits' dtype (pass float32 logits under bf16 autocast: the IoU
    targets and pixel means are computed in that dtype)."""
    missing = [key for key in LOSS_KEYS if key not in weights]
    if missing:
        raise ValueError(f"sam2_loss needs a weight for each of {LOSS_KEYS}; missing {missing}")
    _check_frames(step_outputs, targets)
    totals: list[Tensor | float] = [0.0] * len(LOSS_KEYS)
    for steps, target in zip(step_outputs, targets):
        dtype = steps[0].mask_logits.dtype
        gt = (target > 0).unsqueeze(1)
        present = gt.flatten(1).any(dim=1, keepdim=True).to(dtype)
        gt = gt.to(dtype)
        for step in steps:
            terms = _step_losses(step, gt, present, num_objects, weights, supervise_all_iou, iou_use_l1)
            totals = [total + term for total, term in zip(totals, terms)]
    losses = dict(zip(LOSS_KEYS, totals))
    core = sum((losses[key] * weights[key] for key in LOSS_KEYS if weights[key] != 0), torch.zeros_like(totals[0]))
    return {**losses, "core_loss": core}
