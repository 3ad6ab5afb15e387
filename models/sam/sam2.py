"""SAM 2 / SAM 2.1 (Ravi et al. 2024): the promptable video segmentation model assembled from :mod:`models.sam`.

    import models
    model = models.create("sam2.1_hiera_tiny")           # random weights; "sam2.1_hiera_nano" runs on a CPU
    load_official_sam2(model, "sam2.1_hiera_tiny.pt")    # the official checkpoint, mapped onto timm's trunk
    bank = MemoryBank()
    for t, image in enumerate(frames):                   # image (B, 3, 1024, 1024), ImageNet-normalised
        features = model.forward_image(image)
        out, bank = model.track_step(t, features, bank, points=points if t == 0 else None,
                                     point_labels=labels if t == 0 else None,
                                     is_init_cond_frame=t == 0, num_frames=len(frames))
        out.high_res_masks                               # (B, 1, 1024, 1024) mask logits

Follows facebookresearch/sam2 sam2/modeling/sam2_base.py:SAM2Base with the flags of
sam2/configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml (and sam2/configs/sam2/ for SAM 2.0). Top-level parameter names
are SAM2Base's, so an official checkpoint maps onto this module by identity except for the image encoder's trunk
(:func:`official_sam2_state`).

The memory of a video is not kept in the module: :class:`MemoryBank` is passed into :meth:`SAM2.track_step` and
a new bank comes back, so several videos (or several passes over one, as in correction-click training) can be
tracked with one model, and a module state dict never changes while tracking. All tensors are batch-first; the
batch holds the B objects (or videos) tracked together.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import register_config
from .checkpoints import model_state, require_exact_fit
from .image_encoder import SAM2_ENCODERS, SAM2ImageEncoder, SAM2ImageEncoderConfig, official_image_encoder_state
from .mask_decoder import MLP, MaskDecoder, MaskDecoderConfig
from .memory import MemoryAttention, MemoryAttentionConfig, MemoryEncoder, MemoryEncoderConfig, mask_for_memory
from .prompt_encoder import PromptEncoder, PromptEncoderConfig

__all__ = [
    "SAM2Config", "SAM2_CONFIGS", "SAM2", "FrameFeatures", "FrameMemory", "MemoryBank", "StepOutput",
    "select_closest_cond_frames", "sine_code_1d", "official_sam2_state", "detect_sam2_version", "load_official_sam2",
    "NO_OBJ_SCORE",
]

NO_OBJ_SCORE = -1024.0
"""Mask logit written over every pixel of a frame whose object score is not positive (sigmoid ~ 0)."""
BACKBONE_STRIDE = 16
"""Stride of the image features the heads and the memory work on (every SAM 2 size)."""
MASK_AS_OUTPUT_SCALE, MASK_AS_OUTPUT_BIAS = 20.0, -10.0
"""A binary mask prompt taken as the output becomes logits -10 / +10 (sigmoid 4.5e-5 / 1 - 4.5e-5)."""
_VERSION_2_1_KEYS = ("no_obj_embed_spatial", "obj_ptr_tpos_proj.")
"""State-dict entries that only SAM 2.1 has (a key equal to or starting with each)."""


@dataclass(frozen=True)
class SAM2Config:
    """SAM 2 model: the sub-module configs and SAM2Base's flags. Defaults are SAM 2.1-T
    (sam2/configs/sam2.1/sam2.1_hiera_t.yaml with build_sam.py:build_sam2's dynamic-multimask decoder settings).

    Flags that act inside the mask decoder (use_high_res_features_in_sam, iou_prediction_use_sigmoid,
    pred_obj_scores, pred_obj_scores_mlp, use_multimask_token_for_obj_ptr, multimask_min_pt_num,
    multimask_max_pt_num) are fields of ``mask_decoder`` only, so that they cannot disagree; the image size is
    ``image_encoder.img_size``. The flags that tell SAM 2.0 from 2.1 follow ``version``.
    """

    image_encoder: SAM2ImageEncoderConfig = field(default_factory=SAM2ImageEncoderConfig)
    """Hiera trunk and FPN neck; its ``img_size`` is the model's square input side and its ``d_model`` the width
    of every head."""
    prompt_encoder: PromptEncoderConfig = field(default_factory=PromptEncoderConfig)
    """Point / box / mask prompt encoder; embed_dim = d_model, grid = img_size / 16, input size = img_size."""
    mask_decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)
    """Two-way mask decoder with the SAM 2 head flags (object score, high-resolution features, multimask rule)."""
    memory_attention: MemoryAttentionConfig = field(default_factory=MemoryAttentionConfig)
    """Conditions the current frame's features on the memory bank; d_model = image d_model."""
    memory_encoder: MemoryEncoderConfig = field(default_factory=MemoryEncoderConfig)
    """Turns a frame's features and predicted mask into memory; out_dim = memory_attention.memory_dim."""
    version: str = "2.1"
    """SAM 2.0 or 2.1. 2.1 adds a temporal position code (signed, projected by ``obj_ptr_tpos_proj``) to the object
    pointers and ``no_obj_embed_spatial`` to memories of frames without the object; 2.0 has neither."""
    num_maskmem: int = 7
    """Spatial memories a frame attends to: the conditioning frames plus up to num_maskmem - 1 previous frames.
    0 turns the memory off (single images)."""
    sigmoid_scale_for_mem_enc: float = 20.0
    """The predicted mask enters the memory encoder as sigmoid(logits) * scale + bias ..."""
    sigmoid_bias_for_mem_enc: float = -10.0
    """... with this bias."""
    binarize_mask_from_pts_for_mem_enc: bool = False
    """In eval, masks predicted from clicks enter the memory as hard 0 / 1 before the scale and bias (sam2's video
    predictor turns this on, the configs leave it off)."""
    use_mask_input_as_output_without_sam: bool = True
    """A mask prompt is taken as the frame's output (a ground-truth mask); the heads only make its pointer."""
    max_cond_frames_in_attn: int = -1
    """Conditioning frames in the memory at most (the temporally closest ones); -1: all of them."""
    directly_add_no_mem_embed: bool = True
    """An initial conditioning frame adds ``no_mem_embed`` to its features instead of running memory attention
    over a single dummy memory token."""
    multimask_output_in_sam: bool = True
    """Three candidate masks when the click count is within the decoder's multimask_{min,max}_pt_num ..."""
    multimask_output_for_tracking: bool = True
    """... on tracked frames too, not only on initial conditioning frames."""
    memory_temporal_stride_for_eval: int = 1
    """In eval, previous-frame memories are taken every this many frames (the last frame always)."""
    non_overlap_masks_for_mem_enc: bool = False
    """In eval, each pixel keeps only the highest-scoring object of the batch before memory encoding."""
    use_obj_ptrs_in_encoder: bool = True
    """Memory attention also attends to object pointers (projected decoder output tokens) of other frames."""
    max_obj_ptrs_in_encoder: int = 16
    """Object pointers from at most this many frames (capped by the clip length)."""
    only_obj_ptrs_in_the_past_for_eval: bool = True
    """In eval, pointers of conditioning frames after the current one (before it, in reverse) are left out."""
    fixed_no_obj_ptr: bool = True
    """A frame without the object gets exactly ``no_obj_ptr`` as its pointer (otherwise it is added)."""
    soft_no_obj_ptr: bool = False
    """Mix ``no_obj_ptr`` in by the object probability instead of a hard 0 / 1 on the object score's sign."""
    use_mlp_for_obj_ptr_proj: bool = True
    """The pointer projection is a 3-layer MLP instead of one Linear layer."""

    def __post_init__(self) -> None:
        if self.version not in ("2.0", "2.1"):
            raise ValueError(f"version must be '2.0' or '2.1', got {self.version!r}")
        d, side = self.image_encoder.d_model, self.image_encoder.img_size
        grid = side // BACKBONE_STRIDE
        widths = {"prompt_encoder.embed_dim": self.prompt_encoder.embed_dim,
                  "mask_decoder.transformer_dim": self.mask_decoder.transformer_dim,
                  "memory_attention.d_model": self.memory_attention.d_model,
                  "memory_encoder.in_dim": self.memory_encoder.in_dim}
        wrong = [f"{k} {v}" for k, v in widths.items() if v != d]
        if tuple(self.prompt_encoder.image_embedding_size) != (grid, grid):
            wrong.append(f"prompt_encoder.image_embedding_size {self.prompt_encoder.image_embedding_size}")
        if tuple(self.prompt_encoder.input_image_size) != (side, side):
            wrong.append(f"prompt_encoder.input_image_size {self.prompt_encoder.input_image_size}")
        if self.memory_encoder.mask_total_stride != BACKBONE_STRIDE:
            wrong.append(f"memory_encoder.mask_total_stride {self.memory_encoder.mask_total_stride}")
        if wrong:
            raise ValueError(f"SAM2Config: image encoder d_model {d} at {side} px (grid {grid}) does not fit "
                             + ", ".join(wrong))
        self._check_memory_flags()

    def _check_memory_flags(self) -> None:
        d, mem = self.image_encoder.d_model, self.memory_dim
        if self.memory_attention.memory_dim != self.memory_encoder.out_dim:
            raise ValueError(f"memory_attention.memory_dim {self.memory_attention.memory_dim} != "
                             f"memory_encoder.out_dim {self.memory_encoder.out_dim}")
        if self.use_obj_ptrs_in_encoder and d % mem:
            raise ValueError(f"object pointers of width {d} split into tokens of the memory width {mem}: it must "
                             "divide d_model")
        if not self.directly_add_no_mem_embed and mem != d:
            raise ValueError("without directly_add_no_mem_embed the no-memory token is a memory token of width "
                             f"d_model: memory_dim {mem} must equal d_model {d}")
        if self.fixed_no_obj_ptr and not (self.mask_decoder.pred_obj_scores and self.use_obj_ptrs_in_encoder):
            raise ValueError("fixed_no_obj_ptr needs mask_decoder.pred_obj_scores and use_obj_ptrs_in_encoder")

    @property
    def image_size(self) -> int:
        """Square input side in pixels."""
        return self.image_encoder.img_size

    @property
    def d_model(self) -> int:
        """Width of the image features, prompt tokens and object pointers."""
        return self.image_encoder.d_model

    @property
    def memory_dim(self) -> int:
        """Width of the memory tokens."""
        return self.memory_encoder.out_dim

    @property
    def add_tpos_enc_to_obj_ptrs(self) -> bool:
        """SAM 2.1: object pointers carry a sine code of their frame distance."""
        return self.version == "2.1"

    @property
    def proj_tpos_enc_in_obj_ptrs(self) -> bool:
        """SAM 2.1: that code is d_model wide and projected to the memory width by ``obj_ptr_tpos_proj``."""
        return self.version == "2.1"

    @property
    def use_signed_tpos_enc_to_obj_ptrs(self) -> bool:
        """SAM 2.1: conditioning frames after the current one get negative distances."""
        return self.version == "2.1"

    @property
    def no_obj_embed_spatial(self) -> bool:
        """SAM 2.1: a learned vector is added to the memory of frames predicted without the object."""
        return self.version == "2.1"


def _size_config(encoder: str, version: str = "2.1", **memory_attention: Any) -> SAM2Config:
    """A SAM 2 config whose heads and memory fit the image encoder ``encoder`` of :data:`SAM2_ENCODERS`."""
    enc = SAM2_ENCODERS[encoder]
    d, side, mem = enc.d_model, enc.img_size, memory_attention.pop("memory_dim", 64)
    grid = side // BACKBONE_STRIDE
    return SAM2Config(
        image_encoder=enc,
        prompt_encoder=PromptEncoderConfig(embed_dim=d, image_embedding_size=(grid, grid),
                                           input_image_size=(side, side)),
        mask_decoder=MaskDecoderConfig(transformer_dim=d),
        memory_attention=MemoryAttentionConfig(d_model=d, memory_dim=mem, **memory_attention),
        memory_encoder=MemoryEncoderConfig(in_dim=d, out_dim=mem),
        version=version,
    )


_OFFICIAL_SIZES = ("tiny", "small", "base_plus", "large")
SAM2_CONFIGS: dict[str, SAM2Config] = {
    **{f"sam2.1_hiera_{s}": _size_config(f"sam2_hiera_{s}") for s in _OFFICIAL_SIZES},
    **{f"sam2_hiera_{s}": _size_config(f"sam2_hiera_{s}", version="2.0") for s in _OFFICIAL_SIZES},
    # CPU-sized: 128 px, width 64, memory width 32 (each pointer split into two memory tokens, four in the official
    # sizes); the decoder keeps SAM2Base's fixed head settings (8 heads, MLP 2048) so sam2 can build the same model.
    "sam2.1_hiera_nano": _size_config("sam2_hiera_nano", memory_dim=32, num_layers=2, dim_feedforward=256),
}
"""Registered SAM 2 models by name: the official checkpoints' names (``sam2.1_hiera_*`` are SAM 2.1,
``sam2_hiera_*`` SAM 2.0) and the CPU-sized ``sam2.1_hiera_nano``."""


# --------------------------------------------------------------------------------------------------------------
# State passed between frames
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameFeatures:
    """A frame's image features, computed once per frame and reused for every prompt and correction click
    (sam2_base.py:SAM2Base.forward_image and _prepare_backbone_features). h = w = image_size / 16."""

    vision_features: Tensor
    """(B, d_model, h, w) stride-16 features."""
    vision_pos_enc: Tensor
    """(B, d_model, h, w) their sine position code."""
    high_res_features: tuple[Tensor, Tensor] | None
    """Stride-4 and stride-8 neck outputs after the decoder's conv_s0 / conv_s1: (B, d/8, 4h, 4w) and
    (B, d/4, 2h, 2w); None when the decoder does not use them."""

    @property
    def batch_size(self) -> int:
        return self.vision_features.shape[0]

    def select(self, index: int | slice | Tensor) -> FrameFeatures:
        """The features of some batch entries (e.g. one frame out of images encoded as (T * B) at once); an int
        keeps the batch dimension."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        high_res = None if self.high_res_features is None else tuple(x[index] for x in self.high_res_features)
        return FrameFeatures(self.vision_features[index], self.vision_pos_enc[index], high_res)


@dataclass(frozen=True)
class FrameMemory:
    """What later frames read of a tracked frame (sam2's per-frame output dict, reduced to the memory)."""

    features: Tensor
    """(B, memory_dim, h, w) memory features."""
    pos: Tensor
    """(B, memory_dim, h, w) their spatial position code."""
    obj_ptr: Tensor
    """(B, d_model) object pointer."""
    object_score_logits: Tensor
    """(B, 1) object-present logit."""


@dataclass(frozen=True)
class MemoryBank:
    """The memory of one batch of tracked objects, by frame index: conditioning (prompted) frames, which every
    later frame attends to, and the other tracked frames, of which only the most recent are read.

    Immutable by convention: :meth:`with_frame` returns a new bank and leaves this one as it was, so a bank can be
    kept and tracked from again (e.g. to rerun a frame with another prompt). With memory stride 1, tracked frames
    more than max(num_maskmem, max_obj_ptrs_in_encoder) - 1 frames back are never read again.
    """

    cond_frames: Mapping[int, FrameMemory] = field(default_factory=dict)
    """Conditioning frames, in the order they were added."""
    non_cond_frames: Mapping[int, FrameMemory] = field(default_factory=dict)
    """Tracked frames without prompts."""

    def with_frame(self, frame_idx: int, memory: FrameMemory, *, conditioning: bool) -> MemoryBank:
        """A bank with ``memory`` stored for ``frame_idx`` (replacing what the frame held in either part)."""
        cond = {t: m for t, m in self.cond_frames.items() if t != frame_idx}
        non_cond = {t: m for t, m in self.non_cond_frames.items() if t != frame_idx}
        (cond if conditioning else non_cond)[frame_idx] = memory
        return MemoryBank(cond, non_cond)

    def __len__(self) -> int:
        return len(self.cond_frames) + len(self.non_cond_frames)


@dataclass(frozen=True)
class StepOutput:
    """Predictions for one frame. M = 3 with multimask output, else 1; (H, W) = image size, (h, w) = grid."""

    low_res_multimasks: Tensor
    """(B, M, 4h, 4w) mask logits of every candidate; NO_OBJ_SCORE where the object score is not positive."""
    high_res_multimasks: Tensor
    """(B, M, H, W) the same, bilinearly upsampled to the image."""
    multimask_ious: Tensor
    """(B, M) predicted IoU of every candidate."""
    low_res_masks: Tensor
    """(B, 1, 4h, 4w) the chosen mask: the candidate with the highest predicted IoU."""
    high_res_masks: Tensor
    """(B, 1, H, W) the chosen mask at image size (what the memory encodes)."""
    ious: Tensor
    """(B, 1) predicted IoU of the chosen mask."""
    object_score_logits: Tensor
    """(B, 1) object-present logit."""
    obj_ptr: Tensor
    """(B, d_model) object pointer of the chosen mask."""
    maskmem_features: Tensor | None = None
    """(B, memory_dim, h, w) the frame's memory, once encoded."""
    maskmem_pos_enc: Tensor | None = None
    """(B, memory_dim, h, w) its position code."""

    def memory(self) -> FrameMemory:
        """The part of this output that later frames read; needs the memory encoded."""
        if self.maskmem_features is None or self.maskmem_pos_enc is None:
            raise ValueError("this output has no memory yet: encode it with SAM2.with_memory first")
        return FrameMemory(self.maskmem_features, self.maskmem_pos_enc, self.obj_ptr, self.object_score_logits)


def select_closest_cond_frames(frame_idx: int, cond_frames: Mapping[int, FrameMemory], max_frames: int
                               ) -> tuple[dict[int, FrameMemory], dict[int, FrameMemory]]:
    """Split the conditioning frames into those the memory attends to and the rest (which may still serve as
    previous-frame memories). With ``max_frames`` -1 or enough room all are selected; otherwise the nearest one
    before ``frame_idx``, the nearest at or after it, then the nearest others until ``max_frames`` (ties in bank
    order), as facebookresearch/sam2 sam2/modeling/sam2_utils.py:select_closest_cond_frames."""
    if max_frames == -1 or len(cond_frames) <= max_frames:
        return dict(cond_frames), {}
    if max_frames < 2:
        raise ValueError(f"max_cond_frames_in_attn must be -1 or at least 2, got {max_frames}")
    chosen = [max((t for t in cond_frames if t < frame_idx), default=None),
              min((t for t in cond_frames if t >= frame_idx), default=None)]
    chosen = [t for t in chosen if t is not None]
    rest = sorted((t for t in cond_frames if t not in chosen), key=lambda t: abs(t - frame_idx))
    chosen += rest[:max_frames - len(chosen)]
    selected = {t: cond_frames[t] for t in chosen}
    return selected, {t: m for t, m in cond_frames.items() if t not in selected}


def _previous_memory_frame(frame_idx: int, frames_back: int, stride: int, reverse: bool) -> int:
    """The frame that serves as the memory ``frames_back`` steps before ``frame_idx`` (after, in reverse): the
    adjacent frame for one step; otherwise the nearest multiple of ``stride`` at least two frames away, moved
    ``frames_back - 2`` further strides (sam2_base.py:SAM2Base._prepare_memory_conditioned_features)."""
    if frames_back == 1:
        return frame_idx + 1 if reverse else frame_idx - 1
    if reverse:
        return -(-(frame_idx + 2) // stride) * stride + (frames_back - 2) * stride
    return ((frame_idx - 2) // stride) * stride - (frames_back - 2) * stride


def sine_code_1d(positions: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """(N,) positions -> (N, dim): sines of a geometric frequency ladder, then the cosines of the same
    frequencies (sam2/modeling/sam2_utils.py:get_1d_sine_pe)."""
    half = dim // 2
    index = torch.arange(half, dtype=torch.float32, device=positions.device)
    angles = positions[:, None] / temperature ** (2 * (index // 2) / half)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------


class SAM2(nn.Module):
    """SAM 2 with explicit memory. Per frame: :meth:`forward_image` once, then :meth:`track_step`; or its pieces
    for correction clicks: :meth:`prepare_memory_conditioned_features` once, :meth:`forward_sam_heads` per click
    (``mask_input`` = the previous ``low_res_masks``), :meth:`with_memory` and :meth:`MemoryBank.with_frame`."""

    def __init__(self, cfg: SAM2Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or SAM2Config()
        d, mem = cfg.d_model, cfg.memory_dim
        self.image_encoder = SAM2ImageEncoder(cfg.image_encoder)
        self.sam_prompt_encoder = PromptEncoder(cfg.prompt_encoder)
        self.sam_mask_decoder = MaskDecoder(cfg.mask_decoder)
        self.memory_attention = MemoryAttention(cfg.memory_attention)
        self.memory_encoder = MemoryEncoder(cfg.memory_encoder)
        self.maskmem_tpos_enc = nn.Parameter(torch.zeros(cfg.num_maskmem, 1, 1, mem))
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, d))
        self.no_mem_pos_enc = nn.Parameter(torch.zeros(1, 1, d))
        if cfg.mask_decoder.pred_obj_scores and cfg.use_obj_ptrs_in_encoder:
            self.no_obj_ptr = nn.Parameter(torch.zeros(1, d))
        else:
            self.register_parameter("no_obj_ptr", None)
        if cfg.no_obj_embed_spatial:
            self.no_obj_embed_spatial = nn.Parameter(torch.zeros(1, mem))
        else:
            self.register_parameter("no_obj_embed_spatial", None)
        if cfg.use_obj_ptrs_in_encoder:
            # Brings a mask prompt (image size, 0 / 1) to the stride-4 logit input of the decoder, which then
            # yields the pointer of a mask taken as output.
            self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
            self.obj_ptr_proj = MLP(d, d, d, 3) if cfg.use_mlp_for_obj_ptr_proj else nn.Linear(d, d)
        else:
            self.obj_ptr_proj = nn.Identity()
        self.obj_ptr_tpos_proj = nn.Linear(d, mem) if cfg.proj_tpos_enc_in_obj_ptrs else nn.Identity()
        for param in (self.maskmem_tpos_enc, self.no_mem_embed, self.no_mem_pos_enc, self.no_obj_ptr,
                      self.no_obj_embed_spatial):
            if param is not None:
                nn.init.trunc_normal_(param, std=0.02)

    def forward(self, *args, **kwargs):
        raise NotImplementedError("SAM2 runs per frame: call forward_image, then track_step (or its pieces)")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the image encoder's trunk blocks in the backward pass instead of storing their activations."""
        self.image_encoder.set_grad_checkpointing(enable)

    # -- image features --------------------------------------------------------------------------------------

    def forward_image(self, images: Tensor) -> FrameFeatures:
        """(B, 3, S, S) normalised images, S = image_size -> their :class:`FrameFeatures`. The high-resolution
        maps go through conv_s0 / conv_s1 here, once per image rather than once per click."""
        side = self.cfg.image_size
        if images.ndim != 4 or tuple(images.shape[-2:]) != (side, side):
            raise ValueError(f"images must be (B, 3, {side}, {side}), got {tuple(images.shape)}")
        out = self.image_encoder(images)
        high_res = None
        if self.cfg.mask_decoder.use_high_res_features:
            fpn = out["backbone_fpn"]
            high_res = self.sam_mask_decoder.project_high_res_features(fpn[0], fpn[1])
        return FrameFeatures(out["vision_features"], out["vision_pos_enc"][-1], high_res)

    # -- memory attention ------------------------------------------------------------------------------------

    def prepare_memory_conditioned_features(self, frame_idx: int, features: FrameFeatures, bank: MemoryBank, *,
                                            is_init_cond_frame: bool, num_frames: int,
                                            reverse: bool = False) -> Tensor:
        """The frame's (B, d_model, h, w) features after attending to the memory bank; an initial conditioning
        frame reads no memory (sam2_base.py:SAM2Base._prepare_memory_conditioned_features)."""
        cfg, feats = self.cfg, features.vision_features
        batch, channels, height, width = feats.shape
        if cfg.num_maskmem == 0:
            return feats
        if is_init_cond_frame and cfg.directly_add_no_mem_embed:
            return feats + self.no_mem_embed.reshape(1, channels, 1, 1)
        if is_init_cond_frame:
            # One dummy memory token, so that the attention is not over an empty memory.
            memory = self.no_mem_embed.expand(batch, 1, -1)
            memory_pos, num_ptr_tokens = self.no_mem_pos_enc.expand(batch, 1, -1), 0
        else:
            memory, memory_pos, num_ptr_tokens = self._gather_memory(frame_idx, bank, batch, num_frames, reverse)
        curr = feats.flatten(2).transpose(1, 2)
        curr_pos = features.vision_pos_enc.flatten(2).transpose(1, 2)
        out = self.memory_attention(curr, curr_pos, memory, memory_pos, num_ptr_tokens, grid=(height, width))
        return out.transpose(1, 2).reshape(batch, channels, height, width)

    def _gather_memory(self, frame_idx: int, bank: MemoryBank, batch: int, num_frames: int,
                       reverse: bool) -> tuple[Tensor, Tensor, int]:
        """Memory tokens (B, F*h*w + P, memory_dim), their codes, and P: the spatial memories of the selected
        conditioning frames and previous frames, then the object-pointer tokens."""
        if not bank.cond_frames:
            raise ValueError(f"frame {frame_idx} is tracked (not an initial conditioning frame) but the memory bank "
                             "has no conditioning frame: prompt a frame first")
        selected, unselected = select_closest_cond_frames(frame_idx, bank.cond_frames, self.cfg.max_cond_frames_in_attn)
        memory, memory_pos = [], []
        for t_pos, frame in self._memory_frames(frame_idx, bank, selected, unselected, reverse):
            memory.append(frame.features.flatten(2).transpose(1, 2))
            # Temporal code: conditioning frames share index num_maskmem - 1, the previous frame has index 0.
            tpos = self.maskmem_tpos_enc[self.cfg.num_maskmem - t_pos - 1]
            memory_pos.append(frame.pos.flatten(2).transpose(1, 2) + tpos)
        num_ptr_tokens = 0
        pointers = self._pointer_tokens(frame_idx, bank, selected, unselected, batch, num_frames, reverse)
        if pointers is not None:
            memory.append(pointers[0])
            memory_pos.append(pointers[1])
            num_ptr_tokens = pointers[0].shape[1]
        return torch.cat(memory, dim=1), torch.cat(memory_pos, dim=1), num_ptr_tokens

    def _memory_frames(self, frame_idx: int, bank: MemoryBank, selected: Mapping[int, FrameMemory],
                       unselected: Mapping[int, FrameMemory], reverse: bool) -> list[tuple[int, FrameMemory]]:
        """(t_pos, memory) of every spatial memory: the selected conditioning frames at t_pos 0, then the frames
        num_maskmem - 1 ... 1 steps back at t_pos 1 ... num_maskmem - 1; frames not in the bank are skipped."""
        frames = [(0, memory) for memory in selected.values()]
        stride = 1 if self.training else self.cfg.memory_temporal_stride_for_eval
        for t_pos in range(1, self.cfg.num_maskmem):
            t = _previous_memory_frame(frame_idx, self.cfg.num_maskmem - t_pos, stride, reverse)
            memory = bank.non_cond_frames.get(t, unselected.get(t))
            if memory is not None:
                frames.append((t_pos, memory))
        return frames

    def _pointer_tokens(self, frame_idx: int, bank: MemoryBank, selected: Mapping[int, FrameMemory],
                        unselected: Mapping[int, FrameMemory], batch: int, num_frames: int,
                        reverse: bool) -> tuple[Tensor, Tensor] | None:
        """Object-pointer tokens (B, P, memory_dim) and their temporal codes, or None without pointers: the
        selected conditioning frames' pointers, then those of up to max_obj_ptrs - 1 frames before this one, each
        d_model pointer split into d_model / memory_dim tokens that share its code."""
        cfg = self.cfg
        if not cfg.use_obj_ptrs_in_encoder:
            return None
        max_ptrs = min(num_frames, cfg.max_obj_ptrs_in_encoder)
        sign = -1 if reverse else 1
        cond = selected
        if not self.training and cfg.only_obj_ptrs_in_the_past_for_eval:
            cond = {t: m for t, m in selected.items() if (t >= frame_idx if reverse else t <= frame_idx)}
        entries = [((frame_idx - t) * sign if cfg.use_signed_tpos_enc_to_obj_ptrs else abs(frame_idx - t), m.obj_ptr)
                   for t, m in cond.items()]
        for distance in range(1, max_ptrs):
            t = frame_idx - sign * distance
            if t < 0 or t >= num_frames:
                break
            memory = bank.non_cond_frames.get(t, unselected.get(t))
            if memory is not None:
                entries.append((distance, memory.obj_ptr))
        if not entries:
            return None
        distances, pointers = zip(*entries)
        pointers = torch.stack(pointers, dim=1)
        split = cfg.d_model // cfg.memory_dim
        tokens = pointers.reshape(batch, len(entries) * split, cfg.memory_dim)
        code = self._pointer_code(distances, max_ptrs - 1, pointers)
        return tokens, code.repeat_interleave(split, dim=0).unsqueeze(0).expand(batch, -1, -1)

    def _pointer_code(self, distances: tuple[int, ...], max_distance: int, like: Tensor) -> Tensor:
        """(P, memory_dim) temporal code of pointers ``distances`` frames away; zeros in SAM 2.0."""
        cfg = self.cfg
        if not cfg.add_tpos_enc_to_obj_ptrs:
            return like.new_zeros(len(distances), cfg.memory_dim)
        # A host-to-device copy that does not wait for queued device work. A one-frame clip has no distance to
        # normalise by (sam2 divides by zero there); its single pointer is at distance 0.
        positions = torch.tensor(distances, dtype=torch.float32)
        if like.is_cuda:  # a pageable source would make the copy wait for the queued device work after all
            positions = positions.pin_memory()
        positions = positions.to(like.device, non_blocking=True)
        dim = cfg.d_model if cfg.proj_tpos_enc_in_obj_ptrs else cfg.memory_dim
        return self.obj_ptr_tpos_proj(sine_code_1d(positions / max(max_distance, 1), dim))

    # -- SAM heads ---------------------------------------------------------------------------------------------

    def use_multimask(self, is_init_cond_frame: bool, num_points: int) -> bool:
        """Whether a frame with ``num_points`` prompt points (box corners count) gets three candidate masks."""
        return (self.cfg.multimask_output_in_sam and (is_init_cond_frame or self.cfg.multimask_output_for_tracking)
                and self.sam_mask_decoder.wants_multimask(num_points))

    def forward_sam_heads(self, pix_feat: Tensor, high_res_features: tuple[Tensor, Tensor] | None, *,
                          points: Tensor | None = None, point_labels: Tensor | None = None,
                          mask_input: Tensor | None = None, multimask_output: bool = False) -> StepOutput:
        """Prompt encoder and mask decoder on (B, d_model, h, w) features (sam2_base.py:SAM2Base._forward_sam_heads).

        points (B, N, 2) pixel (x, y) in the model's input image, point_labels (B, N) in {-1, 0, 1, 2, 3} (2 / 3:
        box corners); mask_input (B, 1, *, *) logits, resized to the decoder's 4h x 4w prompt if needed. Without
        points a single padding point is used."""
        batch = pix_feat.shape[0]
        if (points is None) != (point_labels is None):
            raise ValueError("points and point_labels must be given together")
        if points is None:
            points = pix_feat.new_zeros(batch, 1, 2, dtype=torch.float32)
            point_labels = torch.full((batch, 1), -1, dtype=torch.int32, device=pix_feat.device)
        mask_size = self.sam_prompt_encoder.mask_input_size
        if mask_input is not None and tuple(mask_input.shape[-2:]) != mask_size:
            mask_input = F.interpolate(mask_input.float(), size=mask_size, mode="bilinear", align_corners=False,
                                       antialias=True)
        sparse, dense = self.sam_prompt_encoder(points, point_labels, boxes=None, masks=mask_input)
        masks, ious, tokens, scores = self.sam_mask_decoder(
            pix_feat, self.sam_prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=multimask_output,
            repeat_image=False, high_res_features=high_res_features)
        if self.cfg.mask_decoder.pred_obj_scores:
            # The mask is a hard choice between object and no object, as the memory will see it.
            masks = torch.where(scores[:, :, None, None] > 0, masks, NO_OBJ_SCORE)
        masks = masks.float()
        return self._choose_mask(masks, ious, tokens, scores)

    def _choose_mask(self, masks: Tensor, ious: Tensor, tokens: Tensor, scores: Tensor) -> StepOutput:
        """The candidate with the highest predicted IoU, its pointer and the upsampled masks."""
        side = self.cfg.image_size
        high_res = F.interpolate(masks, size=(side, side), mode="bilinear", align_corners=False)
        token = tokens[:, 0]
        if masks.shape[1] > 1:
            best = ious.argmax(dim=-1)
            rows = torch.arange(masks.shape[0], device=masks.device)
            low, high, iou = masks[rows, best, None], high_res[rows, best, None], ious[rows, best, None]
            if tokens.shape[1] > 1:
                token = tokens[rows, best]
        else:
            low, high, iou = masks, high_res, ious
        appearing = scores.sigmoid() if self.cfg.soft_no_obj_ptr else (scores > 0).float()
        obj_ptr = self._mix_no_object(self.obj_ptr_proj(token), appearing)
        return StepOutput(masks, high_res, ious, low, high, iou, scores, obj_ptr)

    def _mix_no_object(self, obj_ptr: Tensor, appearing: Tensor) -> Tensor:
        """Pointer of a frame whose object is present with weight ``appearing`` (B, 1): no_obj_ptr where absent."""
        if not self.cfg.mask_decoder.pred_obj_scores or self.no_obj_ptr is None:
            return obj_ptr
        if self.cfg.fixed_no_obj_ptr:
            obj_ptr = appearing * obj_ptr
        return obj_ptr + (1 - appearing) * self.no_obj_ptr

    def use_mask_as_output(self, pix_feat: Tensor, high_res_features: tuple[Tensor, Tensor] | None,
                           mask: Tensor) -> StepOutput:
        """A (B, 1, H, W) binary mask prompt taken as the frame's output: logits -10 / +10, IoU 1, object score
        +10 if any pixel is set (else -10); the pointer comes from the decoder run on the mask alone
        (sam2_base.py:SAM2Base._use_mask_as_output)."""
        mask = mask.float()
        high_res = mask * MASK_AS_OUTPUT_SCALE + MASK_AS_OUTPUT_BIAS
        low_res = F.interpolate(high_res, size=(high_res.shape[-2] // 4, high_res.shape[-1] // 4), mode="bilinear",
                                align_corners=False, antialias=True)
        ious = mask.new_ones(mask.shape[0], 1)
        if self.cfg.use_obj_ptrs_in_encoder:
            obj_ptr = self.forward_sam_heads(pix_feat, high_res_features,
                                             mask_input=self.mask_downsample(mask)).obj_ptr
        else:
            obj_ptr = mask.new_zeros(mask.shape[0], self.cfg.d_model)
        appearing = (mask.flatten(1) > 0).any(dim=1, keepdim=True).float()
        scores = MASK_AS_OUTPUT_SCALE * appearing + MASK_AS_OUTPUT_BIAS
        obj_ptr = self._mix_no_object(obj_ptr, appearing)
        return StepOutput(low_res, high_res, ious, low_res, high_res, ious, scores, obj_ptr)

    # -- memory encoder ----------------------------------------------------------------------------------------

    def encode_new_memory(self, features: FrameFeatures, high_res_masks: Tensor, object_score_logits: Tensor, *,
                          is_mask_from_pts: bool) -> tuple[Tensor, Tensor]:
        """A frame's memory (features and position code, (B, memory_dim, h, w) each) from its raw image features
        and its chosen (B, 1, H, W) mask logits (sam2_base.py:SAM2Base._encode_new_memory)."""
        cfg = self.cfg
        if cfg.non_overlap_masks_for_mem_enc and not self.training:
            high_res_masks = _non_overlapping(high_res_masks)
        binarize = cfg.binarize_mask_from_pts_for_mem_enc and is_mask_from_pts and not self.training
        masks = mask_for_memory(high_res_masks, binarize, cfg.sigmoid_scale_for_mem_enc, cfg.sigmoid_bias_for_mem_enc)
        feats, pos = self.memory_encoder(features.vision_features, masks, skip_mask_sigmoid=True)
        if self.no_obj_embed_spatial is not None:
            absent = 1 - (object_score_logits > 0).float()
            feats = feats + absent[:, :, None, None] * self.no_obj_embed_spatial[:, :, None, None]
        return feats, pos

    def with_memory(self, features: FrameFeatures, output: StepOutput, *, is_mask_from_pts: bool) -> StepOutput:
        """``output`` with the memory of its chosen mask encoded."""
        feats, pos = self.encode_new_memory(features, output.high_res_masks, output.object_score_logits,
                                            is_mask_from_pts=is_mask_from_pts)
        return dataclasses.replace(output, maskmem_features=feats, maskmem_pos_enc=pos)

    # -- one frame -----------------------------------------------------------------------------------------------

    def predict_frame(self, frame_idx: int, features: FrameFeatures, state: MemoryBank, *, points: Tensor | None = None,
                point_labels: Tensor | None = None, mask_input: Tensor | None = None, is_init_cond_frame: bool,
                num_frames: int, reverse: bool = False, prev_mask_logits: Tensor | None = None,
                multimask_output: bool | None = None) -> StepOutput:
        """A frame's masks without encoding its memory (sam2_base.py:SAM2Base._track_step); arguments as
        :meth:`track_step`."""
        if mask_input is not None and self.cfg.use_mask_input_as_output_without_sam:
            return self.use_mask_as_output(features.vision_features, features.high_res_features, mask_input)
        pix_feat = self.prepare_memory_conditioned_features(frame_idx, features, state,
                                                            is_init_cond_frame=is_init_cond_frame,
                                                            num_frames=num_frames, reverse=reverse)
        if prev_mask_logits is not None:
            if points is None or mask_input is not None:
                raise ValueError("prev_mask_logits go with new points and without a mask_input")
            mask_input = prev_mask_logits
        if multimask_output is None:
            num_points = 0 if point_labels is None else point_labels.shape[1]
            multimask_output = self.use_multimask(is_init_cond_frame, num_points)
        return self.forward_sam_heads(pix_feat, features.high_res_features, points=points,
                                      point_labels=point_labels, mask_input=mask_input,
                                      multimask_output=multimask_output)

    def track_step(self, frame_idx: int, features: FrameFeatures, state: MemoryBank, *,
                   points: Tensor | None = None, point_labels: Tensor | None = None, mask_input: Tensor | None = None,
                   is_init_cond_frame: bool, num_frames: int, reverse: bool = False, run_memory_encoder: bool = True,
                   prev_mask_logits: Tensor | None = None, multimask_output: bool | None = None,
                   conditioning: bool | None = None) -> tuple[StepOutput, MemoryBank]:
        """Segment frame ``frame_idx`` of a ``num_frames`` clip and add its memory to the bank
        (sam2_base.py:SAM2Base.track_step).

        features: :meth:`forward_image` of the frame. points (B, N, 2) pixel (x, y) with point_labels (B, N)
        (0 / 1 negative / positive click, 2 / 3 box corners), or mask_input (B, 1, H, W) binary: the frame's
        prompts, if any. is_init_cond_frame: a prompted frame that does not read the memory. reverse: tracking
        backwards in time. prev_mask_logits: (B, 1, 4h, 4w) low-resolution logits of an earlier prediction, fed
        with new points. multimask_output: None applies the configured click rule. conditioning: store the frame
        as a conditioning frame (default: is_init_cond_frame).

        Returns the output and the bank with this frame; without run_memory_encoder (or with num_maskmem 0) the
        frame's memory is not encoded and the bank is returned unchanged.
        """
        out = self.predict_frame(frame_idx, features, state, points=points, point_labels=point_labels,
                           mask_input=mask_input, is_init_cond_frame=is_init_cond_frame, num_frames=num_frames,
                           reverse=reverse, prev_mask_logits=prev_mask_logits, multimask_output=multimask_output)
        if not run_memory_encoder or self.cfg.num_maskmem == 0:
            return out, state
        out = self.with_memory(features, out, is_mask_from_pts=points is not None)
        conditioning = is_init_cond_frame if conditioning is None else conditioning
        return out, state.with_frame(frame_idx, out.memory(), conditioning=conditioning)


def _non_overlapping(masks: Tensor) -> Tensor:
    """Where another object of the batch scores higher, clamp an object's logits to at most -10
    (sam2_base.py:SAM2Base._apply_non_overlapping_constraints)."""
    if masks.shape[0] == 1:
        return masks
    best = masks.argmax(dim=0, keepdim=True)
    keep = best == torch.arange(masks.shape[0], device=masks.device)[:, None, None, None]
    return torch.where(keep, masks, masks.clamp(max=-10.0))


# --------------------------------------------------------------------------------------------------------------
# Official checkpoints
# --------------------------------------------------------------------------------------------------------------


def detect_sam2_version(state: Mapping[str, Any]) -> str:
    """"2.1" if the SAM 2 state dict (or checkpoint ``{"model": state}``) has SAM 2.1's ``no_obj_embed_spatial``
    and ``obj_ptr_tpos_proj``, "2.0" if it has neither."""
    state = model_state(state)
    found = [any(k == key or k.startswith(key) for k in state) for key in _VERSION_2_1_KEYS]
    if all(found):
        return "2.1"
    if not any(found):
        return "2.0"
    have, lack = (k.rstrip(".") for k in (_VERSION_2_1_KEYS if found[0] else _VERSION_2_1_KEYS[::-1]))
    raise ValueError(f"state dict has SAM 2.1's {have} but not {lack}: neither a SAM 2.0 nor a SAM 2.1 checkpoint")


def _registry_name(cfg: SAM2Config, version: str) -> str:
    """The registered name of ``cfg``'s size in ``version``, or a pattern where that size has none."""
    size = cfg.image_encoder.trunk.removeprefix("sam2_hiera_")
    name = f"{'sam2.1' if version == '2.1' else 'sam2'}_hiera_{size}"
    return name if name in SAM2_CONFIGS else f"{'sam2.1' if version == '2.1' else 'sam2'}_hiera_*"


def official_sam2_state(checkpoint_state: Mapping[str, Any], model: SAM2) -> dict[str, Tensor]:
    """An official SAM 2 / 2.1 checkpoint (the file's ``{"model": state}`` or the state) under ``model``'s keys,
    ready for a strict ``load_state_dict``: the image encoder through
    :func:`~models.sam.image_encoder.official_image_encoder_state`, every other entry by its name.

    Raises ValueError if the checkpoint is of the other SAM 2 version than ``model.cfg.version`` (saying how to
    build the matching model) or names any tensor that is missing, unexpected or of another shape."""
    state = model_state(checkpoint_state)
    file_version, model_version = detect_sam2_version(state), model.cfg.version
    if file_version != model_version:
        raise ValueError(
            f"the checkpoint is SAM {file_version} but the model is built as SAM {model_version}: build "
            f"{_registry_name(model.cfg, file_version)} instead, or set version='{file_version}' "
            f"(--model.version {file_version})")
    mapped = {f"image_encoder.{k}": v for k, v in official_image_encoder_state(state, model.image_encoder).items()}
    mapped.update((k, v) for k, v in state.items() if not k.startswith("image_encoder."))
    require_exact_fit(mapped, model.state_dict(), f"this SAM {model_version} model")
    return mapped


def load_official_sam2(model: SAM2, path: str | os.PathLike) -> SAM2:
    """Load an official ``sam2*.pt`` file into ``model`` strictly (a model built on the meta device takes the
    checkpoint's tensors as they are) and return it."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assign = any(t.is_meta for t in model.state_dict().values())
    model.load_state_dict(official_sam2_state(checkpoint, model), strict=True, assign=assign)
    return model


# --------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------


for _name, _cfg in SAM2_CONFIGS.items():
    register_config(_name, SAM2, _cfg, f"SAM {_cfg.version} on {_cfg.image_encoder.trunk}, {_cfg.image_size} px")
