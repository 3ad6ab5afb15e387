"""SAM 2 training (Ravi et al. 2024) with the reference's interactive prompt simulation, and SAM's interactive image
training loop (Kirillov et al. 2023), as one Prism method.

Video mode (``SAM2ModelConfig.mode="video"``) trains SAM 2 on clips as facebookresearch/sam2
training/model/sam2.py:SAM2Train does: per batch, a GT mask prompt or (``prob_to_use_pt_input``) a click or a box on
1..2 initial conditioning frames (frame 0 among them), then every frame tracked from the memory bank, initial
conditioning frames first, the rest in time order; on 1..2 frames (the conditioning frames and a random other) the
prediction is corrected by 7 clicks drawn from its errors, each fed back with the previous step's low-resolution
logits (SAM2Train._iter_correct_pt_sampling). Every decoder step of every frame is supervised with
:func:`trainers.sam_loss.sam2_loss`; nothing is detached, so the loss back-propagates through the whole clip.

Image mode (``mode="image"``) is SAM's loop on single images (1-frame clips), on SAM 2's image path or on a
``sam_vit_*`` model: a click or a box, 8 correction clicks from the errors and two refinement passes without a new
click (one at a random slot among the clicks, one at the end): 11 supervised steps, three candidate masks for the
first prompt, one mask afterwards (Kirillov et al. 2023, appendix A).

The per-batch decisions (points or mask, how many and which frames, box or click, clicks from GT) come from a host
numpy generator seeded with (seed, global step, micro-batch): every rank draws the same ones without any
communication, a resumed run draws them again, and no decision waits for the device. The clicks themselves and the
box noise are drawn on the device from torch's generator, as upstream.

The batch is the video-segmentation contract (``frames``, ``frame_masks``, ``frame_valid``). The objects of clip b
are its ids 1..K_b; this module reads K_b on the host in ``on_before_batch_transfer`` (before the masks reach the
device), so building the O = sum K_b objects of a batch never synchronises with the device.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from timm.layers import LayerNorm as TimmLayerNorm
from torch import Tensor, nn
from torchvision.utils import make_grid, save_image

import models
from batch_contract import IMAGENET_MEAN, IMAGENET_STD
from evaluation.boundary import boundary_iou
from evaluation.vos import (PROMPT_AGREEMENT_WARNING, VideoScores, evaluate_video, mean_pairwise_iou,
                            region_similarity_torch)
from models.sam.image_encoder import _official_key as official_encoder_key
from models.sam.sam import SAM, official_sam_state
from models.sam.sam import _official_encoder_key as official_sam_encoder_key
from models.sam.sam2 import SAM2, SAM2_CONFIGS, FrameFeatures, MemoryBank, StepOutput, official_sam2_state
from models.sam.tracking import track_video
from trainers.build import TrainerConfig
from trainers.checkpoint import AtomicCheckpointIO
from trainers.distributed import gather_objects
from trainers.handoff import load_into
from trainers.method import Method, as_config
from trainers.optim import OptimConfig, build_optimizer, build_warmup_cosine, vit_layer_id, warmup_step_decay_factor
from trainers.sam_init import init_sam_from_vit, read_vit
from trainers.sam_loss import LOSS_KEYS, MOSE_WEIGHTS, StepPrediction, global_num_objects, sam2_loss
from trainers.sam_prompts import (
    get_next_point,
    sample_box_points,
    sample_one_point_from_error_center,
    sample_random_points_from_errors,
)

__all__ = ["SAM2ModelConfig", "SAM2PromptConfig", "SAM2OptimConfig", "PromptPlan", "draw_video_plan",
           "draw_image_plan", "object_counts", "object_targets", "model_parts", "sam2_param_groups", "SAM2Training",
           "VOSPanelLogger", "find_unused_parameters", "OBJECTS_KEY", "report_prompt_blindness", "CLICK_READING_RUN"]

MODES = ("video", "image")
CLICK_READING_RUN = ("python -m recipes.sam2_train --model.mode image --data.num_frames 1 --data.batch_size 4 "
                     "--trainer.max_steps 6000")
"""A SAM 2 nano run from scratch that learns to read its clicks on the synthetic world (31 to 43 minutes on 2 CPU cores:
one-click masks of different objects overlapping by 14%), where the 500-step video default does not."""
PARTS = ("image_encoder", "prompt_encoder", "memory", "decoder")
# Parameter-name prefixes of each part (a prefix ending without "." is a whole parameter's name).
_SAM2_PARTS = {
    "image_encoder": ("image_encoder.",),
    "prompt_encoder": ("sam_prompt_encoder.",),
    "decoder": ("sam_mask_decoder.",),
    "memory": ("memory_attention.", "memory_encoder.", "maskmem_tpos_enc", "no_mem_embed", "no_mem_pos_enc",
               "no_obj_ptr", "no_obj_embed_spatial", "mask_downsample.", "obj_ptr_proj.", "obj_ptr_tpos_proj."),
}
_SAM_PARTS = {"image_encoder": ("image_encoder.",), "prompt_encoder": ("prompt_encoder.",),
              "decoder": ("mask_decoder.",)}
OBJECTS_KEY = "objects_per_clip"
"""Batch entry this module adds on the host: the number of objects K_b of each clip, as Python ints."""
SAM_WEIGHTS: Mapping[str, float] = {"loss_mask": 20.0, "loss_dice": 1.0, "loss_iou": 1.0, "loss_class": 0.0}
"""SAM: focal and dice at 20:1 and the IoU head's squared error (Kirillov et al. 2023); it has no object score."""
LAYER_NORMS = (nn.LayerNorm, TimmLayerNorm)
"""Module classes whose parameters never decay: exactly torch's LayerNorm (sam2's configs name
``torch.nn.LayerNorm``), and timm's LayerNorm, the same op that timm's Hiera trunk uses where sam2's Hiera has
torch's. Channel norms of NCHW maps (LayerNorm2d, a class of its own in sam2) decay, as upstream."""

CLICKS_SCORED = (1, 5)
"""Validation on images: the IoU after this many clicks (SAM 2's SA-23 figures are after 1 and 5)."""
IMAGE_METRICS = {"1_click": "mIoU_1_click", "5_clicks": "mIoU_5_clicks", "box": "mIoU_box",
                 "boundary_iou": "image_boundary_iou", "prompt_agreement": "prompt_agreement_1_click"}
"""Validation on images: record entry -> logged name (val/...), in percent: each the mean over objects, except the
prompt agreement, the mean over images of two or more objects (``evaluation.vos.mean_pairwise_iou`` of their
one-click masks)."""

# This module reads the objects per clip on the host before the batch moves (on_before_batch_transfer) while the
# datamodule normalises frames after it; Lightning warns that the two hooks live in different objects.
warnings.filterwarnings("ignore", message=r".*overridden `on_before_batch_transfer` in `LightningModule`")


# ---- configs -----------------------------------------------------------------------------------------------------


@dataclass
class SAM2ModelConfig:
    name: str = "sam2.1_hiera_nano"
    """Registered model: a SAM 2 (``sam2.1_hiera_*``, ``sam2_hiera_*``) or, in image mode, a SAM (``sam_vit_*``)."""
    version: str | None = None
    """SAM 2 only: "2.0" or "2.1" to build the size as that version (an official 2.0 checkpoint needs "2.0");
    None: the registered name's."""
    mode: str = "video"
    """"video": SAM 2's clip training with tracking and corrections; "image": SAM's interactive loop on single
    images (1-frame clips: --data.num_frames 1), for SAM 2's image path or a sam_vit_* model."""
    freeze: list[str] = field(default_factory=list)
    """Parts that do not train: any of image_encoder, prompt_encoder, memory (memory attention and encoder, memory
    embeddings, pointer projections), decoder. Every parameter of a named part is left out of the optimizer."""
    grad_checkpointing: bool = False
    """Recompute the image encoder's blocks in the backward pass instead of storing their activations (smaller
    GPUs; the loss and gradients are the same)."""
    drop_path_rate: float = 0.0
    """Stochastic depth of the image encoder's blocks (sam2.1 MOSE fine-tuning: 0.1 on Hiera-B+)."""
    multimask_output_for_tracking: bool | None = None
    """SAM 2 only (a SAM ignores it): three candidate masks on tracked frames too (the choice by predicted IoU), in
    training and in evaluation. None: the registered model's setting (True, as every official config). A model
    trained from scratch can do without its memory when it is True: each candidate learns one of a clip's objects
    and the loss trains the best candidate of each object, so nothing ties a tracked object to its memory."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"model.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        unknown = sorted(set(self.freeze) - set(PARTS))
        if unknown:
            raise ValueError(f"model.freeze: unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
        if self.is_sam and self.mode != "image":
            raise ValueError(f"{self.name} is a SAM (image model): it trains in --model.mode image only")
        if self.is_sam and ("memory" in self.freeze or self.version is not None):
            raise ValueError(f"{self.name} is a SAM: it has no memory and no SAM 2 version (model.freeze / "
                             "model.version)")

    @property
    def is_sam(self) -> bool:
        """A SAM 1 model (``sam_vit_*``)."""
        return self.name.startswith("sam_vit_")

    def build(self) -> SAM | SAM2:
        if self.is_sam:
            return models.create(self.name, drop_path_rate=self.drop_path_rate)
        if self.name not in SAM2_CONFIGS:
            raise ValueError(f"model.name {self.name!r} is neither a SAM 2 ({', '.join(SAM2_CONFIGS)}) nor a SAM "
                             "(sam_vit_*)")
        overrides = {"image_encoder": dataclasses.replace(SAM2_CONFIGS[self.name].image_encoder,
                                                          drop_path_rate=self.drop_path_rate)}
        if self.version is not None:
            overrides["version"] = self.version
        if self.multimask_output_for_tracking is not None:
            overrides["multimask_output_for_tracking"] = self.multimask_output_for_tracking
        return models.create(self.name, **overrides)


@dataclass
class SAM2PromptConfig:
    """Prompt simulation; defaults are sam2's MOSE fine-tuning (configs/sam2.1_training/
    sam2.1_hiera_b+_MOSE_finetune.yaml, SAM2Train's ``*_for_train`` arguments)."""

    prob_to_use_pt_input: float = 0.5
    """Probability that a batch is prompted with clicks or boxes rather than ground-truth masks."""
    prob_to_use_box_input: float = 0.5
    """Of point-prompted conditioning frames, the probability of a box instead of one click."""
    num_init_cond_frames: int = 2
    """Initial conditioning (prompted) frames, frame 0 always among them."""
    rand_init_cond_frames: bool = True
    """Draw 1..num_init_cond_frames of them per batch."""
    num_frames_to_correct: int = 2
    """Frames that receive correction clicks (with point prompts): the conditioning frames and random others."""
    rand_frames_to_correct: bool = True
    """Draw (number of conditioning frames)..num_frames_to_correct of them per batch."""
    add_all_frames_to_correct_as_cond: bool = True
    """A corrected frame becomes a conditioning frame of the memory."""
    num_correction_pt_per_frame: int = 7
    """Correction clicks per corrected frame: 8 supervised decoder steps there, 1 on other frames."""
    prob_to_sample_from_gt: float = 0.1
    """Probability that a correction click is drawn from the ground truth alone (as against an empty prediction)
    rather than from the prediction's errors."""
    image_clicks: int = 8
    """Image mode: correction clicks after the first prompt (SAM: 8, plus 2 refinement passes: 11 steps)."""

    def __post_init__(self) -> None:
        for name in ("prob_to_use_pt_input", "prob_to_use_box_input", "prob_to_sample_from_gt"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"prompts.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.num_init_cond_frames < 1 or self.num_frames_to_correct < self.num_init_cond_frames:
            raise ValueError("prompts: need 1 <= num_init_cond_frames <= num_frames_to_correct, got "
                             f"{self.num_init_cond_frames} and {self.num_frames_to_correct}")
        if self.num_correction_pt_per_frame < 0 or self.image_clicks < 1:
            raise ValueError("prompts.num_correction_pt_per_frame must be >= 0 and prompts.image_clicks >= 1")


@dataclass
class SAM2OptimConfig(OptimConfig):
    lr: float | None = 1e-3
    """Peak learning rate of everything but the image encoder (absolute: sam2 does not scale by batch; MOSE
    fine-tuning: 5e-6 at 8 clips). Training the CPU-sized default from scratch needs far more."""
    vision_lr_ratio: float = 0.6
    """The image encoder's rate relative to lr (MOSE fine-tuning: vision_lr 3e-6 against base_lr 5e-6)."""
    layer_decay: float = 0.9
    """Layer-wise rate decay of the trunk: block i trains at layer_decay^(L - i) of the vision rate, the patch
    embedding at layer_decay^(L + 1); position embeddings and the neck at the full vision rate."""
    weight_decay: float = 0.1
    """AdamW weight decay; none on biases and LayerNorm parameters (sam2's ``*bias*`` and torch.nn.LayerNorm)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (sam2 builds torch.optim.AdamW with its defaults)."""
    warmup_steps: int = 20
    """Linear warmup from 0, in optimizer steps (MOSE fine-tuning: none)."""
    min_lr: float = 1e-4
    """End of the cosine decay (sam2: a tenth of the start, for every group alike)."""
    lr_milestones: list[int] = field(default_factory=list)
    """Optimizer steps at which the rate drops tenfold after warmup, instead of the cosine (SAM: 60000 and 86666 of
    90000). Empty: cosine to min_lr."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.layer_decay <= 1 or self.vision_lr_ratio < 0:
            raise ValueError(f"optim.layer_decay must be in (0, 1] and optim.vision_lr_ratio >= 0, got "
                             f"{self.layer_decay} and {self.vision_lr_ratio}")


# ---- per-batch decisions ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptPlan:
    """What a batch is prompted with; every object of the batch follows it."""

    use_points: bool
    """Clicks or boxes on the conditioning frames (else their ground-truth masks, and no corrections)."""
    init_cond_frames: tuple[int, ...]
    """Initial conditioning frames in processing order: frame 0 first."""
    box_frames: tuple[int, ...] = ()
    """Conditioning frames prompted with a box instead of a click."""
    frames_to_correct: tuple[int, ...] = ()
    """Frames that receive correction clicks."""
    from_gt: Mapping[int, tuple[bool, ...]] = field(default_factory=dict)
    """Per corrected frame, per correction click: drawn from the ground truth alone (else from the errors)."""
    refine_at: int | None = None
    """Image mode: the click slot that is a refinement pass without a new click (one more follows the clicks)."""

    def processing_order(self, num_frames: int) -> list[int]:
        """Conditioning frames first, then the others in time order (SAM2Train.forward_tracking)."""
        return list(self.init_cond_frames) + [t for t in range(num_frames) if t not in self.init_cond_frames]


def draw_video_plan(rng: np.random.Generator, cfg: SAM2PromptConfig, num_frames: int) -> PromptPlan:
    """The decisions of one clip batch, drawn in the order SAM2Train.prepare_prompt_inputs draws them (then the
    from-GT draws of the correction clicks in processing order, as _iter_correct_pt_sampling makes them). A 1-frame
    clip (an image) is always point-prompted and corrected on its frame."""
    single = num_frames == 1
    p_points = 1.0 if single else cfg.prob_to_use_pt_input
    n_init = 1 if single else cfg.num_init_cond_frames
    n_correct = 1 if single else cfg.num_frames_to_correct
    use_points = bool(rng.random() < p_points)
    if cfg.rand_init_cond_frames and n_init > 1:
        n_init = int(rng.integers(1, n_init, endpoint=True))
    n_init = min(n_init, num_frames)
    if use_points and cfg.rand_frames_to_correct and n_correct > n_init:
        n_correct = int(rng.integers(n_init, n_correct, endpoint=True))
    init = [0] + rng.choice(range(1, num_frames), n_init - 1, replace=False).tolist()
    boxes = tuple(t for t in init if use_points and rng.random() < cfg.prob_to_use_box_input)
    rest = [t for t in range(num_frames) if t not in init]
    correct: list[int] = []
    if use_points:
        extra = min(max(n_correct - n_init, 0), len(rest))
        correct = init + (rng.choice(rest, extra, replace=False).tolist() if extra else [])
    plan = PromptPlan(use_points, tuple(init), boxes, tuple(correct))
    from_gt = {}
    for t in plan.processing_order(num_frames):
        if t in correct:
            from_gt[t] = tuple(bool(cfg.prob_to_sample_from_gt > 0 and rng.random() < cfg.prob_to_sample_from_gt)
                               for _ in range(cfg.num_correction_pt_per_frame))
    return dataclasses.replace(plan, from_gt=from_gt)


def draw_image_plan(rng: np.random.Generator, cfg: SAM2PromptConfig) -> PromptPlan:
    """Image mode: a box or a click first, and the slot among the clicks of the extra refinement pass."""
    box = bool(rng.random() < cfg.prob_to_use_box_input)
    return PromptPlan(True, (0,), (0,) if box else (), (0,), {}, int(rng.integers(cfg.image_clicks)))


# ---- objects of a batch ------------------------------------------------------------------------------------------


def object_counts(frame_masks: Tensor) -> list[int]:
    """K_b of each clip: its largest id in frame 0 (objects are numbered 1..K_b there). Reads the masks' values, so
    call it where they are on the host."""
    return [int(k) for k in frame_masks[:, 0].amax(dim=(-2, -1)).tolist()]


def object_targets(frame_masks: Tensor, counts: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(T, O, S, S) boolean masks of the O = sum(counts) objects of a batch, clip by clip, and the (O,) clip index
    of each object. Built with device ops from the host counts: no value is read back."""
    device = frame_masks.device
    targets, clips = [], []
    for b, count in enumerate(counts):
        if count:
            ids = torch.arange(1, count + 1, dtype=frame_masks.dtype, device=device)
            targets.append(frame_masks[b][:, None] == ids[:, None, None])  # (T, K_b, S, S)
            clips.append(torch.full((count,), b, dtype=torch.long, device=device))
    return torch.cat(targets, dim=1), torch.cat(clips)


# ---- parameters --------------------------------------------------------------------------------------------------


def model_parts(model: nn.Module) -> dict[str, list[str]]:
    """The parameter names of each part (``PARTS``) of a SAM 2 or SAM; raises if a parameter belongs to none."""
    table = _SAM_PARTS if isinstance(model, SAM) else _SAM2_PARTS
    parts: dict[str, list[str]] = {part: [] for part in table}
    for name, _ in model.named_parameters():
        part = next((p for p, prefixes in table.items()
                     if any(name == x or (x.endswith(".") and name.startswith(x)) for x in prefixes)), None)
        if part is None:
            raise ValueError(f"parameter {name!r} of {type(model).__name__} belongs to no part of {list(table)}")
        parts[part].append(name)
    return parts


def _no_decay_names(model: nn.Module) -> set[str]:
    """sam2's weight-decay exceptions: names matching ``*bias*`` and the parameters of LayerNorm modules."""
    names = {n for n, _ in model.named_parameters() if fnmatch.fnmatchcase(n, "*bias*")}
    for module_name, module in model.named_modules():
        if type(module) in LAYER_NORMS:
            names |= {f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters(recurse=False)}
    return names


def _encoder_lr_scale(model: nn.Module, name: str, layer_decay: float) -> float:
    """Layer decay inside the image encoder. SAM 2 (sam2 training/optimizer.py:layer_decay_param_modifier on
    ``image_encoder.trunk``, Hiera.get_layer_id): ids 0 patch embedding, i + 1 block i, L + 1 the rest, scale
    layer_decay^(L + 1 - id), position embeddings overridden to 1. SAM: MAE's rule (``vit_layer_id``)."""
    encoder = name.removeprefix("image_encoder.")
    if isinstance(model, SAM):
        depth = len(model.image_encoder.blocks)
        return layer_decay ** (depth + 1 - vit_layer_id(encoder, depth))
    if not encoder.startswith("trunk.model."):
        return 1.0
    trunk = encoder.removeprefix("trunk.model.")
    depth = len(model.image_encoder.trunk.model.blocks)
    if "pos_embed" in trunk:
        return 1.0
    layer = 0 if trunk.startswith("patch_embed.") else (
        int(trunk.split(".")[1]) + 1 if trunk.startswith("blocks.") else depth + 1)
    return layer_decay ** (depth + 1 - layer)


def sam2_param_groups(model: nn.Module, weight_decay: float, layer_decay: float,
                      vision_lr_ratio: float) -> list[dict]:
    """AdamW groups as sam2's MOSE fine-tuning builds them: ``lr_scale`` = 1 outside the image encoder, and
    vision_lr_ratio x the layer-decay scale inside it; weight decay except for ``_no_decay_names``. Frozen
    parameters are left out. One group per (scale, decay), in a fixed order."""
    no_decay = _no_decay_names(model)
    groups: dict[tuple[float, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale = 1.0
        if name.startswith("image_encoder."):
            scale = vision_lr_ratio * _encoder_lr_scale(model, name, layer_decay)
        spared = name in no_decay
        group = groups.setdefault((scale, spared), {"params": [], "weight_decay": 0.0 if spared else weight_decay,
                                                    "lr_scale": scale})
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


# ---- the method --------------------------------------------------------------------------------------------------


class _Prediction(NamedTuple):
    """One decoder step for the O objects: all candidates at full resolution (what the loss sees) and the chosen
    mask (what the next step sees)."""

    multimasks: Tensor  # (O, M, S, S) float32 logits
    ious: Tensor  # (O, M)
    scores: Tensor  # (O, 1) object-score logits
    low_res: Tensor  # (O, 1, s, s) chosen logits, fed back as the next mask prompt
    high_res: Tensor  # (O, 1, S, S) chosen logits

    @classmethod
    def of(cls, out: StepOutput) -> _Prediction:
        return cls(out.high_res_multimasks, out.multimask_ious, out.object_score_logits, out.low_res_masks,
                   out.high_res_masks)

    def supervised(self) -> StepPrediction:
        return StepPrediction(self.multimasks.float(), self.ious.float(), self.scores.float())


class SAM2Training(Method):
    """Args:
        model: ``SAM2ModelConfig`` (or its fields); prompts: ``SAM2PromptConfig``; optim: ``SAM2OptimConfig``.
        lr: the peak rate of the non-encoder parameters; total_steps: the schedule's length in optimizer steps.
        seed: seeds the per-batch decisions, with the global step.
    """

    batch_keys = ("frames", "frame_masks", "frame_valid")

    def __init__(self, model: SAM2ModelConfig | dict | None = None, prompts: SAM2PromptConfig | dict | None = None,
                 optim: SAM2OptimConfig | dict | None = None, lr: float = 1e-3, total_steps: int = 1,
                 seed: int = 0):
        super().__init__(as_config(SAM2OptimConfig, optim), lr, total_steps)
        self.model_cfg = as_config(SAM2ModelConfig, model)
        self.prompts = as_config(SAM2PromptConfig, prompts)
        self.seed = seed
        self.record_hparams(model=self.model_cfg, prompts=self.prompts, optim=self.optim_cfg, lr=lr,
                            total_steps=total_steps, seed=seed)
        self.model = self.model_cfg.build()
        self.is_sam2 = isinstance(self.model, SAM2)
        self.loss_weights = MOSE_WEIGHTS if self.is_sam2 else SAM_WEIGHTS
        parts = model_parts(self.model)
        for part in self.model_cfg.freeze:
            for name in parts[part]:
                self.model.get_parameter(name).requires_grad_(False)
        if self.model_cfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.flops_per_sample = None
        self._plan_at = (-1, 0)  # (global step, micro-batches drawn at it)
        self._reported_prompt_blindness = False
        self._losses: dict[str, Tensor] = {}
        self._val: list[dict] = []
        self.vos_examples: tuple[Tensor, Tensor, Tensor, str] | None = None
        """After a validation: this rank's first video (frames, GT ids, predicted ids, key) on the CPU."""
        self.vos_table: str | None = None
        """After a validation: per video and object J&F, J, F (CSV, every rank's videos)."""

    @property
    def image_size(self) -> int:
        return self.model.cfg.image_size

    # -- the batch ---------------------------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch, dataloader_idx: int = 0):
        if isinstance(batch, dict) and isinstance(batch.get("frame_masks"), Tensor) and OBJECTS_KEY not in batch:
            batch[OBJECTS_KEY] = object_counts(batch["frame_masks"])  # still on the host: no device sync
        return batch

    def _objects(self, batch) -> list[int]:
        """K_b per clip: from the host (``on_before_batch_transfer``), else read off the masks (a plain loop)."""
        counts = batch.get(OBJECTS_KEY)
        return list(counts) if counts is not None else object_counts(batch["frame_masks"])

    def _check_batch(self, frames: Tensor, frame_masks: Tensor) -> None:
        side = self.image_size
        if frames.ndim != 5 or tuple(frames.shape[-3:]) != (3, side, side):
            raise ValueError(f"frames must be (B, T, 3, {side}, {side}) for {self.model_cfg.name}, got "
                             f"{tuple(frames.shape)}: set --data.image_size {side}")
        if tuple(frame_masks.shape) != (*frames.shape[:2], side, side):
            raise ValueError(f"frame_masks {tuple(frame_masks.shape)} do not match frames {tuple(frames.shape)}")
        if self.model_cfg.mode == "image" and frames.shape[1] != 1:
            raise ValueError(f"model.mode image trains on single images, got clips of {frames.shape[1]} frames: "
                             "set --data.num_frames 1")

    # -- training ------------------------------------------------------------------------------------------------
    def prompt_plan(self, num_frames: int, step: int | None = None, micro_batch: int = 0) -> PromptPlan:
        """The decisions for a batch at optimizer ``step`` (default: the current one); the same on every rank."""
        rng = np.random.default_rng([self.seed, self.global_step if step is None else step, micro_batch])
        if self.model_cfg.mode == "image":
            return draw_image_plan(rng, self.prompts)
        return draw_video_plan(rng, self.prompts, num_frames)

    def _next_plan(self, num_frames: int) -> PromptPlan:
        step = self.global_step
        micro = self._plan_at[1] if self._plan_at[0] == step else 0
        self._plan_at = (step, micro + 1)
        return self.prompt_plan(num_frames, step, micro)

    def simulate(self, batch) -> tuple[list[list[StepPrediction]], Tensor, int]:
        """The supervised predictions of a batch (per frame, per decoder step), the (T, O, S, S) targets and O."""
        frames, frame_masks = batch["frames"], batch["frame_masks"]
        self._check_batch(frames, frame_masks)
        counts = self._objects(batch)
        if sum(counts) == 0:
            return [], frame_masks.new_zeros(0, dtype=torch.bool), 0
        targets, clips = object_targets(frame_masks, counts)
        plan = self._next_plan(frames.shape[1])
        if self.model_cfg.mode == "image":
            return [self._image_steps(frames[:, 0], targets[0, :, None], clips, plan)], targets[:1], sum(counts)
        features = self.model.forward_image(frames.flatten(0, 1))  # the encoder once over every frame
        return self._track_clip(features, clips, targets[:, :, None], plan), targets, sum(counts)

    def compute_loss(self, batch) -> Tensor:
        steps, targets, count = self.simulate(batch)
        normaliser = global_num_objects(count, batch["frames"].device)  # every rank joins this all-reduce
        if count == 0:  # no object in any clip of this rank: a zero loss that reaches every trained weight
            zero = self._zero_reaching_every_weight()
            self._losses = {key: zero.detach() for key in LOSS_KEYS}
            return zero
        losses = sam2_loss(steps, targets, normaliser, self.loss_weights, iou_use_l1=self.is_sam2)
        self._losses = {key: losses[key].detach() for key in LOSS_KEYS}
        if not losses["core_loss"].requires_grad:
            # Every frame was a ground-truth mask prompt (1-frame clips, or 2 frames both conditioning): the outputs
            # are the masks themselves and nothing was predicted, so nothing learns from this batch.
            return losses["core_loss"] + self._zero_reaching_every_weight()
        return losses["core_loss"]

    def _zero_reaching_every_weight(self) -> Tensor:
        """0, with a gradient path to every trained weight, so that backward and DDP's reduction run as usual."""
        return sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0

    def training_metrics(self) -> dict[str, Tensor]:
        """The loss terms (detached; SAM's object-score term, weighted 0, is left out)."""
        return {f"train/{key}": value for key, value in self._losses.items() if self.loss_weights[key]}

    def _track_clip(self, features: FrameFeatures, clips: Tensor, gt: Tensor,
                    plan: PromptPlan) -> list[list[StepPrediction]]:
        """SAM2Train.forward_tracking: each frame's decoder steps (``_frame_steps``), its final mask encoded into the
        memory, conditioning frames and corrected frames (``add_all_frames_to_correct_as_cond``) kept as such.
        ``features`` of the B*T frames, ``clips`` (O,) the clip of each object, ``gt`` (T, O, 1, S, S) bool."""
        num_frames, bank, steps = gt.shape[0], MemoryBank(), {}
        for t in plan.processing_order(num_frames):
            frame = features.select(clips * num_frames + t)
            outs, points = self._frame_steps(t, frame, bank, gt[t], plan, num_frames)
            final = self.model.with_memory(frame, outs[-1], is_mask_from_pts=points is not None)
            conditioning = t in plan.init_cond_frames or (
                self.prompts.add_all_frames_to_correct_as_cond and t in plan.frames_to_correct)
            bank = bank.with_frame(t, final.memory(), conditioning=conditioning)
            steps[t] = [_Prediction.of(out).supervised() for out in outs]
        return [steps[t] for t in range(num_frames)]

    def _frame_steps(self, t: int, frame: FrameFeatures, bank: MemoryBank, gt: Tensor, plan: PromptPlan,
                     num_frames: int) -> tuple[list[StepOutput], Tensor | None]:
        """One frame: its prompt or tracking step, then its correction clicks (SAM2Train.track_step and
        _iter_correct_pt_sampling); returns the outputs and the frame's points (None: no click reached it)."""
        model, init = self.model, t in plan.init_cond_frames
        if init and not plan.use_points:  # a ground-truth mask prompt is the frame's output
            return [model.use_mask_as_output(frame.vision_features, frame.high_res_features, gt.float())], None
        points = labels = None
        if init:
            points, labels = (sample_box_points(gt) if t in plan.box_frames
                              else sample_random_points_from_errors(gt, None))
        pix = model.prepare_memory_conditioned_features(t, frame, bank, is_init_cond_frame=init,
                                                        num_frames=num_frames)
        out = model.forward_sam_heads(pix, frame.high_res_features, points=points, point_labels=labels,
                                      multimask_output=model.use_multimask(init, 0 if labels is None else
                                                                           labels.shape[1]))
        outs = [out]
        for from_gt in plan.from_gt.get(t, ()):
            new_points, new_labels = get_next_point(gt, None if from_gt else out.high_res_masks > 0, "uniform")
            points = new_points if points is None else torch.cat([points, new_points], dim=1)
            labels = new_labels if labels is None else torch.cat([labels, new_labels], dim=1)
            out = model.forward_sam_heads(pix, frame.high_res_features, points=points, point_labels=labels,
                                          mask_input=out.low_res_masks,
                                          multimask_output=model.use_multimask(init, labels.shape[1]))
            outs.append(out)
        return outs, points

    def _image_steps(self, images: Tensor, gt: Tensor, clips: Tensor, plan: PromptPlan) -> list[StepPrediction]:
        """SAM's interactive loop on (B, 3, S, S) images for the O objects (``gt`` (O, 1, S, S)): the first prompt
        with three candidates, then ``image_clicks`` clicks from the errors and two refinement passes, each with the
        previous chosen logits as the mask prompt and a single mask."""
        predict = self._image_predictor(images, clips)
        box = sample_box_points(gt)[0] if plan.box_frames else None
        clicks = None if plan.box_frames else sample_random_points_from_errors(gt, None)
        out = predict(box, clicks, None, True)
        steps = [out]
        actions = ["click"] * self.prompts.image_clicks
        actions.insert(plan.refine_at, "refine")
        for action in actions + ["refine"]:
            if action == "click":
                clicks = _append_clicks(clicks, sample_random_points_from_errors(gt, out.high_res > 0))
            out = predict(box, clicks, out.low_res, False)
            steps.append(out)
        return [step.supervised() for step in steps]

    def _image_predictor(self, images: Tensor, clips: Tensor) -> Callable[..., _Prediction]:
        """(box corners (O, 2, 2) or None, clicks (points, labels) or None, mask logits or None, multimask) ->
        the step's :class:`_Prediction`, on SAM 2's image path (features + no-memory embedding) or SAM's."""
        model = self.model
        if self.is_sam2:
            frame = model.forward_image(images).select(clips)
            pix = model.prepare_memory_conditioned_features(0, frame, MemoryBank(), is_init_cond_frame=True,
                                                            num_frames=1)

            def sam2_step(box, clicks, mask, multimask):
                parts = ([] if box is None else [(box, _box_labels(box))]) + ([] if clicks is None else [clicks])
                points = torch.cat([p for p, _ in parts], 1)
                labels = torch.cat([lbl for _, lbl in parts], 1)
                return _Prediction.of(model.forward_sam_heads(pix, frame.high_res_features, points=points,
                                                              point_labels=labels, mask_input=mask,
                                                              multimask_output=multimask))
            return sam2_step
        embeddings = model.encode_image(images)[clips]

        def sam_step(box, clicks, mask, multimask):
            points, labels = (None, None) if clicks is None else clicks
            low, ious = model.decode(embeddings, points, labels, None if box is None else box.flatten(1), mask,
                                     multimask)
            return _choose(low.float(), ious, self.image_size)
        return sam_step

    # -- optimizer -----------------------------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        o = self.optim_cfg
        return sam2_param_groups(self.model, o.weight_decay, o.layer_decay, o.vision_lr_ratio)

    def configure_optimizers(self):
        """Warmup then cosine (sam2), or warmup then tenfold drops at ``lr_milestones`` (SAM)."""
        o = self.optim_cfg
        optimizer = build_optimizer(self.param_groups(), o, self.lr)
        if o.lr_milestones:
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: warmup_step_decay_factor(step, o.warmup_steps, o.lr_milestones))
        else:
            scheduler = build_warmup_cosine(optimizer, o, self.lr, self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- validation ----------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val, self.vos_examples = [], None

    def validation_step(self, batch, batch_idx):
        """Videos: each tracked from its frame-0 masks (``track_video``), scored with J, F and Boundary IoU on its
        annotated frames but the first and last (DAVIS). Images (image mode, or 1-frame clips such as image shards
        validated in video mode): interactive clicks and the exact box (``_score_image``)."""
        counts = self._objects(batch)
        for b, count in enumerate(counts):
            if not count:
                continue
            frames, masks = batch["frames"][b], batch["frame_masks"][b]
            ids = torch.arange(1, count + 1, dtype=masks.dtype, device=masks.device)
            gt = masks[:, None] == ids[:, None, None]  # (T, K, S, S)
            key = batch["key"][b] if "key" in batch else f"{batch_idx}/{b}"
            if self.model_cfg.mode == "image" or frames.shape[0] == 1:
                record, first_click = self._score_image(frames[0], gt[0, :, None])
                self._val.append(record)
                pred = first_click[None]
            else:
                pred = track_video(self.model, frames, gt[0], output_device="cpu") > 0
                self._val.append(self._score_video(key, gt.cpu(), pred, batch["frame_valid"][b].cpu()))
            if self.vos_examples is None:  # the frames scored: an image-mode model on a video scores its first
                scored = len(pred)
                self.vos_examples = (frames[:scored].float().cpu(), _id_map(gt[:scored].cpu()), _id_map(pred.cpu()),
                                     key)

    def _score_video(self, key: str, gt: Tensor, pred: Tensor, valid: Tensor) -> dict:
        """J and F per object (evaluation.vos, DAVIS protocol) and the Boundary IoU of each scored (object, frame)."""
        frames = valid.nonzero().flatten()
        gt, pred = gt[frames].transpose(0, 1), pred[frames].transpose(0, 1)  # (K, Tv, S, S)
        scores = evaluate_video({k: g.numpy() for k, g in enumerate(gt)}, {k: p.numpy() for k, p in enumerate(pred)},
                                skip_first_and_last=len(frames) >= 3)
        biou = [boundary_iou(gt[k, idx], pred[k, idx]) for k, idx in
                ((k, torch.as_tensor(f, dtype=torch.long)) for k, f in scores.frames.items())]
        return {"key": key, "scores": scores, "boundary_iou": torch.cat(biou).tolist() if biou else []}

    def _score_image(self, image: Tensor, gt: Tensor) -> tuple[dict, Tensor]:
        """IoU after 1 and after 5 clicks and after the exact box, and the Boundary IoU after one click, of the O
        objects in ``gt`` (O, 1, S, S); and the (O, S, S) masks after one click. The clicks follow the protocol of
        SAM's point evaluation (Kirillov et al. 2023, §7.1 and appendix D.1): each at the centre of the largest
        error region, the first with three candidates of which the best-scored is kept, later ones with all the
        clicks so far, the previous logits as the mask prompt and a single mask, as SAM trains (appendix A). With two
        or more objects, also how much the one-click masks of different objects agree (``prompt_agreement``): a SAM
        trained from scratch can lower its loss by answering every click with the image's salient objects, one per
        candidate mask, without reading the click."""
        predict = self._image_predictor(image[None], torch.zeros(gt.shape[0], dtype=torch.long, device=gt.device))
        out, clicks, masks_after = None, None, {}
        for n in range(1, CLICKS_SCORED[-1] + 1):
            new = sample_one_point_from_error_center(gt, None if out is None else out.high_res > 0)
            clicks = _append_clicks(clicks, new)
            out = predict(None, clicks, None if out is None else out.low_res, out is None)
            if n in CLICKS_SCORED:
                masks_after[n] = out.high_res[:, 0] > 0
        box = predict(sample_box_points(gt, noise=0)[0], None, None, True)
        first = masks_after[CLICKS_SCORED[0]]
        record = {f"{n}_click{'s' if n > 1 else ''}": region_similarity_torch(gt[:, 0], pred).tolist()
                  for n, pred in masks_after.items()}
        record |= {"box": region_similarity_torch(gt[:, 0], box.high_res[:, 0] > 0).tolist(),
                   "boundary_iou": boundary_iou(gt[:, 0], first).tolist()}
        if len(first) > 1:  # the objects are disjoint: near 0 when the model reads its clicks
            record["prompt_agreement"] = [mean_pairwise_iou(first).item()]
        return record, first.cpu()

    def on_validation_epoch_end(self) -> None:
        local, self._val = self._val, []
        gathered = gather_objects(local)
        images = [record for record in gathered if "box" in record]
        means = {}
        for name, logged in IMAGE_METRICS.items():  # every rank holds the same gathered numbers
            values = [v for record in images for v in record.get(name, ())]
            if values:
                means[name] = float(np.mean(values))
                self.log(f"val/{logged}", 100.0 * means[name], prog_bar=name == "1_click")
        if self.global_step > 0 and not self._reported_prompt_blindness:  # once a run, once it has trained
            self._reported_prompt_blindness = report_prompt_blindness(means.get("prompt_agreement"))
        videos = [record for record in gathered if "scores" in record]
        if not videos:
            return
        metrics = _vos_metrics(videos)
        self.vos_table = metrics.pop("table")
        for name, value in metrics.items():
            self.log(f"val/{name}", value, prog_bar=name == "J&F")

    # -- weights in and out --------------------------------------------------------------------------------------
    def init_from(self, source) -> list[str]:
        """An official checkpoint (sam2's ``{"model": state}``, e.g. sam2.1_hiera_base_plus.pt, or SAM's
        sam_vit_b_01ec64.pth; SAM 2.0 files need --model.version 2.0), an export of this method, or an earlier
        Prism run (run directory or .ckpt) of the same model; or, for a SAM, an MAE pre-trained ViT (an MAE run, its
        encoder export, facebookresearch/mae's mae_pretrain_vit_*.pth) into the image encoder's trunk
        (trainers.sam_init)."""
        vit = read_vit(source)
        if vit is not None:
            return init_sam_from_vit(self.model, vit, self.model_cfg.name)
        path = Path(source)
        if path.is_file() and path.suffix in (".pt", ".pth"):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            if "state_dict" not in checkpoint:
                official = (official_sam2_state(checkpoint, self.model) if self.is_sam2
                            else official_sam_state(checkpoint, self.model))
                self.model.load_state_dict(official, strict=True)
                return [f"Initialised {self.model_cfg.name} from the official checkpoint {source}"]
        load_into(self.model, source, prefix="model.")
        return [f"Initialised {self.model_cfg.name} from the Prism run {source}"]

    def export(self, out_dir: Path, **metadata) -> dict[str, Path]:
        """The weights in the official layout: sam2's ``{"model": state}`` (``sam2.build_sam.build_sam2(config,
        ckpt_path=...)`` loads it) or segment-anything's state dict (``build_sam_vit_b(checkpoint=...)``)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.is_sam2:
            path = out_dir / f"{self.model_cfg.name}.pt"
            checkpoint = {"model": official_sam2_checkpoint_state(self.model),
                          "prism": {"model": self.model_cfg.name, "version": self.model.cfg.version, **metadata}}
            AtomicCheckpointIO().save_checkpoint(checkpoint, path)
            return {"sam2": path}
        path = out_dir / f"{self.model_cfg.name}.pth"
        AtomicCheckpointIO().save_checkpoint(official_sam_checkpoint_state(self.model), path)
        return {"sam": path}


def report_prompt_blindness(agreement: float | None) -> bool:
    """On the console, a model whose one-click masks of an image's different objects mostly coincide (``agreement``,
    their mean IoU over images, above :data:`evaluation.vos.PROMPT_AGREEMENT_WARNING`; None: no image had two
    objects): its mIoU figures measure saliency, not prompting. Whether it was reported."""
    if agreement is None or agreement <= PROMPT_AGREEMENT_WARNING:
        return False
    rank_zero_info(f"\nThe model answers clicks on different objects of an image with nearly the same masks (they "
                   f"overlap by {100 * agreement:.0f}% IoU on average): it does not read its clicks "
                   "yet. From scratch on images of few objects it can lower its loss by putting the salient objects in "
                   "its three candidate masks, whatever was clicked. Thousands of steps in image mode "
                   f"({CLICK_READING_RUN}), images with more objects, or an official checkpoint (--init_from) get "
                   "past that.")
    return True


def _box_labels(box: Tensor) -> Tensor:
    """Labels 2, 3 of (O, 2, 2) box corners given as points."""
    return torch.tensor([2, 3], dtype=torch.int32, device=box.device).expand(box.shape[0], 2)


def _choose(low: Tensor, ious: Tensor, side: int) -> _Prediction:
    """SAM's decoder output as a step: every candidate upsampled, the highest predicted IoU chosen; no object score
    (zeros, weighted 0 in the loss)."""
    high = F.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)
    best = ious.argmax(dim=-1)
    rows = torch.arange(low.shape[0], device=low.device)
    return _Prediction(high, ious, ious.new_zeros(low.shape[0], 1), low[rows, best, None], high[rows, best, None])


def _append_clicks(clicks: tuple[Tensor, Tensor] | None, new: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """(points (O, N, 2), labels (O, N)) with the new clicks after the earlier ones."""
    if clicks is None:
        return new
    return torch.cat([clicks[0], new[0]], 1), torch.cat([clicks[1], new[1]], 1)


def _id_map(masks: Tensor) -> Tensor:
    """(T, K, S, S) bool -> (T, S, S) uint8 ids 1..K (the later object where two overlap), 0 background."""
    ids = torch.arange(1, masks.shape[1] + 1, dtype=torch.uint8).view(1, -1, 1, 1)
    return (masks.to(torch.uint8) * ids).amax(dim=1)


def _vos_metrics(records: list[dict]) -> dict:
    """Global J, F (means over every object of every video, as the DAVIS and SA-V evaluators average), J&F, Boundary
    IoU (mean over every scored object and frame), the counts, and the per-video table."""
    videos: dict[str, VideoScores] = {r["key"]: r["scores"] for r in records}
    j = [v for s in videos.values() for v in s.j_mean.values()]
    f = [v for s in videos.values() for v in s.f_mean.values()]
    biou = [v for r in records for v in r["boundary_iou"]]
    metrics = {"J": float(np.mean(j)) if j else float("nan"), "F": float(np.mean(f)) if f else float("nan")}
    metrics["J&F"] = (metrics["J"] + metrics["F"]) / 2
    metrics |= {"boundary_iou": 100.0 * float(np.mean(biou)) if biou else float("nan"), "videos": float(len(videos)),
                "objects": float(len(j))}
    lines = ["video,object,J&F,J,F"] + [f"{name},{k},{s.jf_mean[k]:.1f},{s.j_mean[k]:.1f},{s.f_mean[k]:.1f}"
                                        for name, s in videos.items() for k in s.j_mean]
    return {**metrics, "table": "\n".join(lines) + "\n"}


# ---- official layouts --------------------------------------------------------------------------------------------


def official_sam2_checkpoint_state(model: SAM2) -> dict[str, Tensor]:
    """The model's state under sam2's key names (the inverse of ``official_sam2_state``, checked by mapping it
    back)."""
    state = {(official_encoder_key(k.removeprefix("image_encoder.")) if k.startswith("image_encoder.") else k):
             v.detach().cpu() for k, v in model.state_dict().items()}
    official_sam2_state(state, model)  # raises if any name does not map back
    return state


def official_sam_checkpoint_state(model: SAM) -> dict[str, Tensor]:
    """The model's state under segment-anything's key names (the inverse of ``official_sam_state``)."""
    state = {official_sam_encoder_key(k): v.detach().cpu() for k, v in model.state_dict().items()}
    official_sam_state(state, model)
    return state


def find_unused_parameters(trainer: TrainerConfig) -> TrainerConfig:
    """SAM 2's prompt paths differ from batch to batch (mask or points; the decoder's no-memory path never trains),
    so DDP must look for parameters without a gradient, as sam2 configures it (``find_unused_parameters: True``):
    a DDP run (``ddp``, or ``auto`` on more than one device) becomes ``ddp_find_unused_parameters_true``."""
    devices = trainer.devices if trainer.devices != "auto" else (torch.cuda.device_count() or 1)
    several = trainer.num_nodes > 1 or int(devices) > 1
    if trainer.strategy == "ddp" or (trainer.strategy == "auto" and several):
        return dataclasses.replace(trainer, strategy="ddp_find_unused_parameters_true")
    return trainer


# ---- W&B panel ---------------------------------------------------------------------------------------------------

_PALETTE = torch.tensor([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                         [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]]) / 255.0


def overlay(image: Tensor, ids: Tensor, alpha: float = 0.6) -> Tensor:
    """(3, S, S) image in [0, 1] with each object of the (S, S) id map blended in its palette colour."""
    colours = _PALETTE[(ids.long() - 1) % len(_PALETTE)].permute(2, 0, 1)
    return torch.where(ids[None] > 0, (1 - alpha) * image + alpha * colours, image)


class VOSPanelLogger(Callback):
    """After each validation, the method's ``vos_examples`` as a W&B image panel ``val/vos_overlays`` and
    ``<out_dir>/vos-stepNNNNNN.png``: a few frames of one validation video, ground truth on top, prediction below;
    the per-video J&F table beside it as ``vos-stepNNNNNN.csv``."""

    def __init__(self, out_dir: str | Path, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, num_frames: int = 4):
        self.out_dir = Path(out_dir)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.num_frames = num_frames
        self.last_path: Path | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        examples = getattr(pl_module, "vos_examples", None)
        if not trainer.is_global_zero or examples is None or trainer.sanity_checking:
            return
        frames, gt, pred, key = examples
        shown = torch.linspace(0, len(frames) - 1, min(self.num_frames, len(frames))).round().long().tolist()
        images = [(frames[t] * self.std + self.mean).clamp(0, 1) for t in shown]
        rows = [overlay(image, gt[t]) for image, t in zip(images, shown)]
        rows += [overlay(image, pred[t]) for image, t in zip(images, shown)]
        grid = make_grid(rows, nrow=len(shown), padding=2)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.last_path = self.out_dir / f"vos-step{trainer.global_step:06d}.png"
        save_image(grid, self.last_path)
        if getattr(pl_module, "vos_table", None):
            self.last_path.with_suffix(".csv").write_text(pl_module.vos_table)
        caption = f"{key}: frames {shown}; top ground truth, bottom prediction"
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("val/vos_overlays", [grid], step=trainer.global_step, caption=[caption])
