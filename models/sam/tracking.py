"""Semi-supervised video object segmentation with SAM 2: the objects' masks on one frame, tracked through the video.

    from models.sam.tracking import track_video
    logits = track_video(model, frames, first_masks)   # frames (T, 3, S, S) normalised, first_masks (O, S, S)
    masks = logits > 0                                 # (T, O, S, S)

As facebookresearch/sam2 evaluates a model during training (training/model/sam2.py:SAM2Train.forward_tracking in
eval mode with its eval defaults: a mask prompt, no clicks, one initial conditioning frame): the given masks are
the prompt of the start frame, which SAM 2 takes as that frame's output (``use_mask_input_as_output_without_sam``)
and encodes into the memory; every later frame (earlier, in reverse) is tracked from the memory bank alone, all
objects batched. The model runs in eval mode, so its eval-only flags apply as its config sets them (memory stride,
pointers of the past only, binarised click masks, non-overlapping memories).

Unlike sam2's interactive ``SAM2VideoPredictor``, which keeps memories in bfloat16 and encodes the start frame's
memory from its upsampled low-resolution logits, the memories here are float and the start frame's is encoded
from the prompt mask itself, as the training-time evaluation does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sam2 import NO_OBJ_SCORE, SAM2, FrameFeatures, MemoryBank

__all__ = ["track_video"]


def _expand(features: FrameFeatures, objects: int) -> FrameFeatures:
    """One frame's features (batch 1) as the features of ``objects`` objects (views, no copy)."""
    def grow(x: Tensor) -> Tensor:
        return x.expand(objects, *x.shape[1:])

    high_res = None if features.high_res_features is None else tuple(grow(x) for x in features.high_res_features)
    return FrameFeatures(grow(features.vision_features), grow(features.vision_pos_enc), high_res)


def _frames_kept(model: SAM2) -> int:
    """How many frames back a tracked frame's memory can still be read: its spatial memory for num_maskmem
    strided steps, its pointer for max_obj_ptrs_in_encoder frames."""
    cfg = model.cfg
    return max(cfg.max_obj_ptrs_in_encoder, (cfg.num_maskmem + 1) * cfg.memory_temporal_stride_for_eval + 1)


def _check(model: SAM2, frames: Tensor, first_masks: Tensor, start: int) -> None:
    side = model.cfg.image_size
    if frames.ndim != 4 or tuple(frames.shape[1:]) != (3, side, side):
        raise ValueError(f"frames must be (T, 3, {side}, {side}), got {tuple(frames.shape)}")
    if first_masks.ndim != 3 or tuple(first_masks.shape[1:]) != (side, side) or first_masks.shape[0] < 1:
        raise ValueError(f"first_masks must be (O, {side}, {side}) with O >= 1, got {tuple(first_masks.shape)}")
    if not 0 <= start < frames.shape[0]:
        raise ValueError(f"start must be a frame of the video (0..{frames.shape[0] - 1}), got {start}")


@torch.no_grad()
def track_video(model: SAM2, frames: Tensor, first_masks: Tensor, *, start: int = 0, reverse: bool = False,
                output_device: torch.device | str | None = None) -> Tensor:
    """Mask logits of O objects on every frame of a video, given their masks on frame ``start``.

    frames: (T, 3, S, S) normalised as the model expects (ImageNet mean and std), S = the model's image size.
    first_masks: (O, S, S) masks of the objects on frame ``start`` (bool, or nonzero = object).
    start: the prompted frame; tracking runs forwards to the last frame, or with ``reverse`` backwards to frame 0.
    output_device: where the (T, O, S, S) result is kept (default: the frames' device); "cpu" bounds the device
        memory of long videos at full resolution.

    Returns (T, O, S, S) float32 logits (> 0: the object): the prompt frame's are the mask itself as +-10 logits,
    frames outside the tracked range are ``NO_OBJ_SCORE``. Image features are computed one frame at a time, and
    memories that can no longer be read are dropped, so memory does not grow with the video's length. The model is
    put in eval mode for the call and returned to its previous mode.
    """
    _check(model, frames, first_masks, start)
    num_frames, objects, side = frames.shape[0], first_masks.shape[0], model.cfg.image_size
    out = torch.full((num_frames, objects, side, side), NO_OBJ_SCORE, dtype=torch.float32,
                     device=frames.device if output_device is None else output_device)
    order = range(start, -1, -1) if reverse else range(start, num_frames)
    prompt = (first_masks != 0).float()[:, None]
    window = _frames_kept(model)
    was_training = model.training
    model.eval()
    try:
        bank = MemoryBank()
        for i, t in enumerate(order):
            features = _expand(model.forward_image(frames[t : t + 1]), objects)
            step, bank = model.track_step(t, features, bank, mask_input=prompt if i == 0 else None,
                                          is_init_cond_frame=i == 0, num_frames=num_frames, reverse=reverse)
            out[t] = step.high_res_masks[:, 0].to(out.device, torch.float32)
            recent = {f: m for f, m in bank.non_cond_frames.items() if abs(f - t) < window}
            bank = MemoryBank(bank.cond_frames, recent)
    finally:
        model.train(was_training)
    return out
