"""SAM 2's interactive, streaming video predictor and semi-supervised video object segmentation on it.

    predictor = VideoPredictor(models.create("sam2.1_hiera_tiny").eval())   # load_official_sam2(...) first
    predictor.init_state("video_jpegs/")                  # or a list / (T, H, W, 3) array of uint8 RGB frames
    predictor.add_points(0, obj_id=1, points=[[210, 350]], labels=[1])
    predictor.add_box(0, obj_id=2, box=[300, 0, 500, 400])
    for frame_idx, obj_ids, logits in predictor.propagate():    # logits (objects, 1, H, W) at the video's size
        masks = logits > 0
    predictor.add_points(40, obj_id=1, points=[[82, 410]], labels=[0])   # a correction click, then again:
    for frame_idx, obj_ids, logits in predictor.propagate(start=40): ...

Follows facebookresearch/sam2 sam2/sam2_video_predictor.py:SAM2VideoPredictor: every object is tracked on its own
(batch 1) with its own :class:`~models.sam.sam2.MemoryBank`; a prompt first yields masks without memory, and the
next :meth:`VideoPredictor.propagate` encodes the memory of every prompted frame before tracking
(SAM2VideoPredictor.propagate_in_video_preflight). The memory features are kept at bfloat16 precision, as upstream
stores them (in float32 tensors here, so that the bank reads like any other). The state lives in this object, never
in the model, which only computes.

Semi-supervised VOS as facebookresearch/sam2 tools/vos_inference.py runs it: :func:`segment_video` (a video's objects
from their annotated masks, :func:`vos_prompts`), :func:`save_vos_pngs` (palette PNGs, per frame or per object).

Not carried over: upstream's hole filling of output masks (``fill_hole_area``, which needs its compiled extension
and is off in its VOS evaluation), offloading to the CPU, and removing single objects (:meth:`VideoPredictor.reset`
starts over).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .image_predictor import IMAGENET_MEAN, IMAGENET_STD, LOW_RES_LOGIT_CLAMP
from .sam2 import NO_OBJ_SCORE, SAM2, FrameFeatures, FrameMemory, MemoryBank, StepOutput, _non_overlapping

__all__ = ["DAVIS_PALETTE", "JPEG_SUFFIXES", "VideoFrames", "VideoPredictor", "jpeg_frame_paths", "save_vos_pngs",
           "segment_video", "vos_prompts"]

JPEG_SUFFIXES = (".jpg", ".jpeg", ".JPG", ".JPEG")
"""Frame files of a video folder, named by their frame number (``00000.jpg``), as sam2 reads them."""


def jpeg_frame_paths(folder: str | Path) -> list[Path]:
    """The JPEG frames of a video folder in frame order (their stems are frame numbers)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of JPEG frames")
    paths = [p for p in folder.iterdir() if p.suffix in JPEG_SUFFIXES]
    if not paths:
        raise FileNotFoundError(f"no JPEG frames ({', '.join(JPEG_SUFFIXES)}) in {folder}")
    try:
        return sorted(paths, key=lambda p: int(p.stem))
    except ValueError:
        raise ValueError(f"{folder}: frame files must be named by their frame number (00000.jpg, 00001.jpg, ...), "
                         f"got {sorted(p.name for p in paths)[:3]}") from None


class VideoFrames:
    """A video's frames, read and preprocessed one at a time when asked for: a folder of JPEGs stays on disk.

    Each frame is resized to the model's square input with PIL's default filter and normalised with the ImageNet
    mean and std, as sam2/utils/misc.py:load_video_frames does (an array of frames takes the same PIL path)."""

    def __init__(self, frames: str | Path | Sequence[np.ndarray] | np.ndarray, image_size: int) -> None:
        self.image_size = image_size
        self.paths: list[Path] | None = None
        self.arrays: Sequence[np.ndarray] | None = None
        if isinstance(frames, (str, Path)):
            self.paths = jpeg_frame_paths(frames)
            with Image.open(self.paths[0]) as first:
                self.width, self.height = first.size
        else:
            self.arrays = frames
            if len(frames) == 0:
                raise ValueError("a video needs at least one frame")
            self.height, self.width = self._check(np.asarray(frames[0]), 0).shape[:2]

    def __len__(self) -> int:
        return len(self.paths if self.paths is not None else self.arrays)

    def _check(self, frame: np.ndarray, index: int) -> np.ndarray:
        if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frame {index}: frames are (H, W, 3) uint8 RGB, got {frame.shape} {frame.dtype}")
        return frame

    def _pil(self, index: int) -> Image.Image:
        if self.paths is not None:
            with Image.open(self.paths[index]) as image:
                return image.convert("RGB")
        return Image.fromarray(self._check(np.asarray(self.arrays[index]), index))

    def __getitem__(self, index: int) -> Tensor:
        """Frame ``index`` as the model's (3, S, S) float32 input."""
        image = self._pil(index)
        if image.size != (self.width, self.height):
            raise ValueError(f"frame {index} is {image.size[0]}x{image.size[1]}, frame 0 {self.width}x{self.height}: "
                             "every frame of a video has one size")
        side = self.image_size
        pixels = np.asarray(image.resize((side, side))) / 255.0
        x = torch.from_numpy(pixels).permute(2, 0, 1).float()
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(-1, 1, 1)
        return (x - mean) / std


@dataclass
class _ObjectState:
    """Everything the predictor knows of one object."""

    bank: MemoryBank = field(default_factory=MemoryBank)
    """Memories of its prompted (conditioning) and tracked frames."""
    masks: dict[int, Tensor] = field(default_factory=dict)
    """(1, 1, 4h, 4w) low-resolution logits of every frame in ``bank``."""
    pending: dict[bool, dict[int, StepOutput]] = field(default_factory=lambda: {True: {}, False: {}})
    """Outputs of prompts whose memory is not encoded yet, by whether their frame becomes a conditioning frame."""
    points: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    """Clicks (1, N, 2) in input-frame pixels and labels (1, N) per frame, for clicks added to earlier ones."""
    tracked: dict[int, bool] = field(default_factory=dict)
    """Frames it was tracked on (a prompted frame counts once propagation passed it), and whether in reverse."""

    def has_prompt(self) -> bool:
        return bool(self.bank.cond_frames or self.pending[True] or self.pending[False])


class VideoPredictor:
    """Prompt objects on any frame of a video, track them through it, correct and track again
    (sam2/sam2_video_predictor.py:SAM2VideoPredictor, per-object state).

    non_overlap_masks: each output pixel keeps only its highest-scoring object (the others' logits clamped to at
        most -10), as for DAVIS-style single-PNG outputs; the memory never sees this.
    clear_non_cond_mem_around_input: when a prompt is added to the memory (and when propagation passes a prompted
        frame), forget the object's tracked memories within num_maskmem x memory stride frames of it.
    add_all_frames_to_correct_as_cond: a prompt on a frame already tracked makes it a conditioning frame; otherwise
        it replaces the frame's tracked memory, and a later propagation over that frame tracks it again.
    The model is used as it is: put it in eval mode first. Whether masks from clicks enter the memory binarised
    is the model's ``binarize_mask_from_pts_for_mem_enc`` (sam2's video predictor build turns it on).
    """

    def __init__(self, model: SAM2, *, non_overlap_masks: bool = False, clear_non_cond_mem_around_input: bool = False,
                 add_all_frames_to_correct_as_cond: bool = False) -> None:
        self.model = model
        self.non_overlap_masks = non_overlap_masks
        self.clear_non_cond_mem_around_input = clear_non_cond_mem_around_input
        self.add_all_frames_to_correct_as_cond = add_all_frames_to_correct_as_cond
        self.video: VideoFrames | None = None
        self._objects: dict[Hashable, _ObjectState] = {}
        self._cached: tuple[int, FrameFeatures] | None = None
        self._memory_pos: Tensor | None = None

    # -- the video ---------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def init_state(self, frames: str | Path | Sequence[np.ndarray] | np.ndarray) -> None:
        """Start on a video: a folder of JPEG frames (``00000.jpg`` ...), or (H, W, 3) uint8 RGB frames (a list or
        a (T, H, W, 3) array). Frames are read and encoded when first needed; the latest frame's features are kept,
        so that every object on a frame, and every click on it, reuses them."""
        self.video = VideoFrames(frames, self.model.cfg.image_size)
        self._cached = None
        self.reset()

    @property
    def num_frames(self) -> int:
        return len(self._require_video())

    @property
    def video_size(self) -> tuple[int, int]:
        """(H, W) of the video: the size of every output mask."""
        video = self._require_video()
        return video.height, video.width

    @property
    def obj_ids(self) -> list[Hashable]:
        """Ids of the prompted objects, in the order they were first prompted (the order of the outputs)."""
        return list(self._objects)

    def reset(self) -> None:
        """Forget every object, prompt and tracked frame; the video and its cached features stay."""
        self._objects = {}

    def _require_video(self) -> VideoFrames:
        if self.video is None:
            raise RuntimeError("start on a video with .init_state(frames) first")
        return self.video

    def _check_frame(self, frame_idx: int) -> int:
        if not 0 <= frame_idx < self.num_frames:
            raise IndexError(f"frame {frame_idx} is not in this {self.num_frames}-frame video")
        return int(frame_idx)

    def _features(self, frame_idx: int) -> FrameFeatures:
        if self._cached is None or self._cached[0] != frame_idx:
            image = self._require_video()[frame_idx]
            if self.device.type == "cuda":
                image = image.pin_memory()  # a copy from pageable memory would wait for the queued device work
            self._cached = (frame_idx, self.model.forward_image(image.to(self.device, non_blocking=True)[None]))
        return self._cached[1]

    # -- prompts -----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def add_points(self, frame_idx: int, obj_id: Hashable, points, labels,
                   clear_old: bool = True) -> tuple[int, list[Hashable], Tensor]:
        """Clicks on object ``obj_id`` in frame ``frame_idx``: points (N, 2) pixel (x, y) of the video, labels (N,)
        1 positive / 0 negative. With ``clear_old`` False they are added to the frame's earlier clicks.

        Returns (frame_idx, obj_ids, logits (objects, 1, H, W)) of the frame (SAM2VideoPredictor.add_new_points)."""
        coords = torch.as_tensor(np.asarray(points, dtype=np.float32)).reshape(-1, 2)
        labels = torch.as_tensor(np.asarray(labels, dtype=np.int32)).reshape(-1)
        if coords.shape[0] != labels.shape[0] or not len(labels):
            raise ValueError(f"give at least one point and one label per point: {coords.shape[0]} points, "
                             f"{labels.shape[0]} labels")
        return self._add_clicks(frame_idx, obj_id, coords, labels, clear_old)

    @torch.inference_mode()
    def add_box(self, frame_idx: int, obj_id: Hashable, box, points=None,
                labels=None) -> tuple[int, list[Hashable], Tensor]:
        """A box (x0, y0, x1, y1) in video pixels on object ``obj_id``, with optional clicks; it replaces the frame's
        earlier clicks, since SAM 2 reads a box as two corner points ahead of any click."""
        corners = torch.as_tensor(np.asarray(box, dtype=np.float32)).reshape(2, 2)
        coords = torch.cat([corners, torch.as_tensor(np.asarray(points if points is not None else np.zeros((0, 2)),
                                                                 dtype=np.float32)).reshape(-1, 2)])
        extra = np.asarray(labels if labels is not None else [], dtype=np.int32).reshape(-1)
        if len(extra) != coords.shape[0] - 2:
            raise ValueError(f"give one label per point: {coords.shape[0] - 2} points, {len(extra)} labels")
        labels = torch.cat([torch.tensor([2, 3], dtype=torch.int32), torch.as_tensor(extra)])
        return self._add_clicks(frame_idx, obj_id, coords, labels, clear_old=True)

    @torch.inference_mode()
    def add_mask(self, frame_idx: int, obj_id: Hashable, mask) -> tuple[int, list[Hashable], Tensor]:
        """A binary mask (H, W) of object ``obj_id`` on frame ``frame_idx``, taken as the frame's output; it is
        resized to the model's input with antialiasing and cut at 0.5 (SAM2VideoPredictor.add_new_mask)."""
        frame_idx = self._check_frame(frame_idx)
        mask = torch.as_tensor(np.asarray(mask)).bool()
        if mask.ndim != 2:
            raise ValueError(f"a mask prompt is (H, W), got shape {tuple(mask.shape)}")
        mask = mask[None, None].float().to(self.device)
        side = self.model.cfg.image_size
        if tuple(mask.shape[-2:]) != (side, side):
            mask = F.interpolate(mask, (side, side), mode="bilinear", align_corners=False, antialias=True)
            mask = (mask >= 0.5).float()
        state = self._objects.setdefault(obj_id, _ObjectState())
        state.points.pop(frame_idx, None)
        return self._prompt(frame_idx, state, mask=mask)

    def _add_clicks(self, frame_idx: int, obj_id: Hashable, coords: Tensor, labels: Tensor,
                    clear_old: bool) -> tuple[int, list[Hashable], Tensor]:
        frame_idx = self._check_frame(frame_idx)
        height, width = self.video_size
        # video pixels -> input-frame pixels, in float32 and in the reference's order (divide, then multiply)
        coords = coords / torch.tensor([width, height], dtype=torch.float32) * self.model.cfg.image_size
        coords, labels = coords[None].to(self.device), labels[None].to(self.device)
        state = self._objects.setdefault(obj_id, _ObjectState())
        if not clear_old and frame_idx in state.points:
            old_coords, old_labels = state.points[frame_idx]
            coords, labels = torch.cat([old_coords, coords], 1), torch.cat([old_labels, labels], 1)
        state.points[frame_idx] = (coords, labels)
        return self._prompt(frame_idx, state, points=(coords, labels))

    def _prompt(self, frame_idx: int, state: _ObjectState, *, points: tuple[Tensor, Tensor] | None = None,
                mask: Tensor | None = None) -> tuple[int, list[Hashable], Tensor]:
        """The object's output on a prompted frame, without memory yet; new clicks also read the frame's latest
        output (clamped to +-32) as a mask prompt."""
        initial = frame_idx not in state.tracked
        conditioning = initial or self.add_all_frames_to_correct_as_cond
        previous = None
        if points is not None:
            earlier = state.pending[conditioning].get(frame_idx)
            previous = earlier.low_res_masks if earlier is not None else state.masks.get(frame_idx)
            if previous is not None:
                previous = previous.clamp(-LOW_RES_LOGIT_CLAMP, LOW_RES_LOGIT_CLAMP)
        out = self.model.predict_frame(
            frame_idx, self._features(frame_idx), state.bank, points=None if points is None else points[0],
            point_labels=None if points is None else points[1], mask_input=mask, is_init_cond_frame=initial,
            num_frames=self.num_frames, reverse=state.tracked.get(frame_idx, False), prev_mask_logits=previous)
        state.pending[conditioning][frame_idx] = out
        return frame_idx, self.obj_ids, self._frame_output(frame_idx, conditioning)

    def _frame_output(self, frame_idx: int, conditioning: bool) -> Tensor:
        """(objects, 1, H, W) logits of every object on a frame, from its newest output there; NO_OBJ_SCORE for an
        object without one (SAM2VideoPredictor._consolidate_temp_output_across_obj)."""
        height, width = self.video_size
        masks = []
        for state in self._objects.values():
            low = state.pending[conditioning].get(frame_idx)
            low = low.low_res_masks if low is not None else state.masks.get(frame_idx)
            if low is None:
                masks.append(torch.full((1, 1, height, width), NO_OBJ_SCORE, device=self.device))
            else:
                masks.append(F.interpolate(low, (height, width), mode="bilinear", align_corners=False))
        masks = torch.cat(masks)
        return _non_overlapping(masks) if self.non_overlap_masks else masks

    # -- memory ------------------------------------------------------------------------------------------------

    def _frame_memory(self, features: Tensor, pos: Tensor, out: StepOutput) -> FrameMemory:
        """What the bank keeps of a frame: its memory features at bfloat16 precision (upstream stores them in
        bfloat16) and one shared position code, the same for every frame."""
        if self._memory_pos is None or self._memory_pos.shape != pos.shape or self._memory_pos.device != pos.device:
            self._memory_pos = pos
        features = features.to(torch.bfloat16).to(features.dtype)
        return FrameMemory(features, self._memory_pos, out.obj_ptr, out.object_score_logits)

    def _commit_prompts(self, state: _ObjectState) -> None:
        """Encode the memory of the object's pending prompts (from their low-resolution masks, upsampled, as masks
        from clicks) and add them to its bank; a frame with a conditioning memory keeps only that one
        (SAM2VideoPredictor.propagate_in_video_preflight)."""
        side = self.model.cfg.image_size
        for conditioning in (True, False):
            for frame_idx, out in state.pending[conditioning].items():
                if not conditioning and frame_idx in state.bank.cond_frames:
                    continue
                high_res = F.interpolate(out.low_res_masks, (side, side), mode="bilinear", align_corners=False)
                features, pos = self.model.encode_new_memory(self._features(frame_idx), high_res,
                                                             out.object_score_logits, is_mask_from_pts=True)
                if self.clear_non_cond_mem_around_input:
                    self._clear_around(state, frame_idx)
                state.bank = state.bank.with_frame(frame_idx, self._frame_memory(features, pos, out),
                                                   conditioning=conditioning)
                state.masks[frame_idx] = out.low_res_masks
            state.pending[conditioning].clear()

    def _clear_around(self, state: _ObjectState, frame_idx: int) -> None:
        """Forget the object's tracked memories within num_maskmem x stride frames of a prompted frame, so that
        tracking does not read the appearance the prompt corrected (SAM2VideoPredictor
        ._clear_non_cond_mem_around_input, for one object)."""
        reach = self.model.cfg.memory_temporal_stride_for_eval * self.model.cfg.num_maskmem
        near = [t for t in state.bank.non_cond_frames if abs(t - frame_idx) <= reach and t != frame_idx]
        if near:
            kept = {t: m for t, m in state.bank.non_cond_frames.items() if t not in near}
            state.bank = MemoryBank(state.bank.cond_frames, kept)
            for t in near:
                state.masks.pop(t, None)

    # -- tracking ----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def propagate(self, start: int | None = None, max_frames: int | None = None, reverse: bool = False,
                  obj_ids: Sequence[Hashable] | None = None) -> Iterator[tuple[int, list[Hashable], Tensor]]:
        """Track the objects frame by frame, yielding (frame_idx, obj_ids, logits (objects, 1, H, W)) as each
        frame is done (SAM2VideoPredictor.propagate_in_video).

        start: the first frame (default: the earliest prompted frame); max_frames: frames after it to track (all by
        default); reverse: backwards in time. obj_ids: the objects to track (default: every prompted object).
        Prompted frames yield their prompt's output; every other frame is tracked and its memory replaced."""
        ids = self.obj_ids if obj_ids is None else list(obj_ids)
        if not ids:
            raise ValueError("no object has a prompt: add points, a box or a mask first")
        for obj_id in ids:
            if obj_id not in self._objects or not self._objects[obj_id].has_prompt():
                raise ValueError(f"object {obj_id} has no prompt on any frame: add points, a box or a mask first")
        for state in self._objects.values():
            self._commit_prompts(state)
        states = [self._objects[obj_id] for obj_id in ids]
        if start is None:
            start = min(t for state in states for t in state.bank.cond_frames)
        start = self._check_frame(start)
        max_frames = self.num_frames if max_frames is None else max_frames
        if reverse:
            order = range(start, max(start - max_frames, 0) - 1, -1) if start > 0 else range(0)
        else:
            order = range(start, min(start + max_frames, self.num_frames - 1) + 1)
        return self._propagate(order, ids, states, reverse)

    @torch.inference_mode()
    def _propagate(self, order: range, ids: list[Hashable], states: list[_ObjectState],
                   reverse: bool) -> Iterator[tuple[int, list[Hashable], Tensor]]:
        height, width = self.video_size
        for frame_idx in order:
            low = torch.cat([self._track(state, frame_idx, reverse) for state in states])
            masks = F.interpolate(low, (height, width), mode="bilinear", align_corners=False)
            yield frame_idx, ids, _non_overlapping(masks) if self.non_overlap_masks else masks

    def _track(self, state: _ObjectState, frame_idx: int, reverse: bool) -> Tensor:
        """One object on one frame: its prompt's output on a conditioning frame, else tracked from its memory (the
        new memory replacing what the frame held). Returns (1, 1, 4h, 4w) logits."""
        state.tracked[frame_idx] = reverse
        if frame_idx in state.bank.cond_frames:
            if self.clear_non_cond_mem_around_input:
                self._clear_around(state, frame_idx)
            return state.masks[frame_idx]
        features = self._features(frame_idx)
        out = self.model.predict_frame(frame_idx, features, state.bank, is_init_cond_frame=False,
                                       num_frames=self.num_frames, reverse=reverse)
        memory, pos = self.model.encode_new_memory(features, out.high_res_masks, out.object_score_logits,
                                                   is_mask_from_pts=False)
        state.bank = state.bank.with_frame(frame_idx, self._frame_memory(memory, pos, out), conditioning=False)
        state.masks[frame_idx] = out.low_res_masks
        return out.low_res_masks


# -- semi-supervised video object segmentation -----------------------------------------------------------------


def segment_video(model: SAM2, frames: str | Path | Sequence[np.ndarray] | np.ndarray,
                  annotations: Mapping[Hashable, np.ndarray], annotated_frames: Sequence[int], *,
                  later_objects: bool = False, non_overlap: bool = True) -> dict[Hashable, np.ndarray]:
    """Semi-supervised VOS of one video (facebookresearch/sam2 tools/vos_inference.py): the objects of the
    annotations ``annotations[obj]`` (A, H, W), given on the frames ``annotated_frames``, prompted with their masks
    (:func:`vos_prompts`) and tracked to the end; a pixel belongs to an object where its logit is positive.

    Objects on frame 0 are tracked together (vos_inference.py:vos_inference). With ``later_objects`` every object
    is tracked on its own from the first annotated frame that shows it (vos_separate_inference_per_object).
    non_overlap: each pixel goes to its best-scoring object only (one palette PNG per frame, DAVIS); False keeps
    the objects' masks apart (per-object PNGs, SA-V). Returns object id -> (T, H, W) bool masks of the prompted
    objects, False before an object's prompt.
    """
    where = f"{frames}: " if isinstance(frames, (str, Path)) else ""
    try:
        prompts = vos_prompts(annotations, annotated_frames, later_objects)
    except ValueError as err:
        raise ValueError(f"{where}{err}") from None
    if not prompts:
        raise ValueError(f"{where}no object on frame 0 of the annotations (with later_objects, objects are tracked "
                         "from the first annotated frame that shows them)")
    predictor = VideoPredictor(model, non_overlap_masks=non_overlap)
    predictor.init_state(frames)
    shape = (predictor.num_frames, *predictor.video_size)
    masks = {obj_id: np.zeros(shape, dtype=bool) for obj_id in prompts}
    if later_objects:
        _segment_separately(predictor, prompts, masks, non_overlap)
        return masks
    for obj_id, (frame_idx, mask) in prompts.items():
        predictor.add_mask(frame_idx, obj_id, mask)
    for frame_idx, obj_ids, logits in predictor.propagate():
        foreground = (logits[:, 0] > 0).cpu().numpy()
        for i, obj_id in enumerate(obj_ids):
            masks[obj_id][frame_idx] = foreground[i]
    return masks


def _segment_separately(predictor: VideoPredictor, first_masks: Mapping[Hashable, tuple[int, np.ndarray]],
                        masks: dict[Hashable, np.ndarray], non_overlap: bool) -> None:
    """One object at a time; with ``non_overlap`` a running per-pixel best score and its object decide, which is
    the reference's clamp of every other object to <= -10 over the stacked scores (ties go to the earlier
    object), without holding every object's scores."""
    ids = list(first_masks)
    shape = masks[ids[0]].shape
    best = torch.full(shape, NO_OBJ_SCORE) if non_overlap else None
    winner = torch.zeros(shape, dtype=torch.int64) if non_overlap else None
    for i, obj_id in enumerate(ids):
        predictor.reset()
        frame_idx, mask = first_masks[obj_id]
        predictor.add_mask(frame_idx, obj_id, mask)
        for t, _, logits in predictor.propagate(start=frame_idx):
            scores = logits[0, 0].cpu()
            if not non_overlap:
                masks[obj_id][t] = (scores > 0).numpy()
                continue
            better = scores > best[t]
            best[t] = torch.where(better, scores, best[t])
            winner[t] = torch.where(better, i, winner[t])
    if non_overlap:
        for i, obj_id in enumerate(ids):
            masks[obj_id][:] = ((winner == i) & (best > 0)).numpy()


def _voc_palette() -> list[int]:
    """The PASCAL VOC colour map (index bits spread over the high bits of R, G, B), which DAVIS annotations use."""
    palette = []
    for index in range(256):
        rgb = [0, 0, 0]
        for shift in range(8):
            for channel in range(3):
                rgb[channel] |= ((index >> (3 * shift + channel)) & 1) << (7 - shift)
        palette += rgb
    return palette


DAVIS_PALETTE = _voc_palette()
"""768 palette entries (R, G, B of colours 0..255) of DAVIS annotation PNGs (tools/vos_inference.py DAVIS_PALETTE):
black background, object 1 dark red, 2 dark green, 3 olive, ..."""


def vos_prompts(masks: Mapping[Hashable, np.ndarray], frames: Sequence[int],
                later_objects: bool = False) -> dict[Hashable, tuple[int, np.ndarray]]:
    """The prompts of semi-supervised VOS from a video's annotations, ``masks[obj]`` (A, H, W) on the annotated
    frames ``frames``: every object on frame 0 with its frame-0 mask (tools/vos_inference.py); with
    ``later_objects``, every object with its mask on the first annotated frame that shows it
    (vos_separate_inference_per_object). Returns object id -> (frame_idx, mask). An object whose masks are empty
    on every annotated frame (an empty per-object folder of the SA-V layout) can be neither prompted nor scored: a
    ValueError names it."""
    prompts, never = {}, []
    for obj_id, obj_masks in masks.items():
        shown = [(int(t), mask) for t, mask in zip(frames, obj_masks) if mask.any()]
        if not shown:
            never.append(obj_id)
        elif later_objects or shown[0][0] == 0:
            prompts[obj_id] = shown[0]
    if never:
        raise ValueError(f"object(s) {', '.join(map(str, never))} have no pixel on any of the {len(frames)} annotated "
                         "frames: remove their annotation folders or fix their masks")
    return prompts


def save_vos_pngs(folder: str | Path, masks: Mapping[Hashable, np.ndarray], frame_names: Sequence[str], *,
                  per_object: bool = False, palette: Sequence[int] | None = None) -> None:
    """Masks ``masks[obj]`` (T, H, W) as PNGs (tools/vos_inference.py:save_masks_to_dir): per frame one palette PNG
    of object ids (``<folder>/<frame>.png``, smaller ids on top), or with ``per_object`` one 0/1 palette PNG per
    object and frame (``<folder>/<obj:03d>/<frame>.png``, SA-V). The palette defaults to DAVIS's."""
    folder, palette = Path(folder), list(palette or DAVIS_PALETTE)
    shape = next(iter(masks.values())).shape[1:] if masks else None
    for t, name in enumerate(frame_names):
        if per_object:
            pngs = {Path(obj_id if isinstance(obj_id, str) else f"{obj_id:03d}", f"{name}.png"): m[t].astype(np.uint8)
                    for obj_id, m in masks.items()}
        else:
            ids = np.zeros(shape, dtype=np.uint8)
            for obj_id in sorted(masks, reverse=True):
                ids[masks[obj_id][t]] = int(obj_id)
            pngs = {Path(f"{name}.png"): ids}
        for path, pixels in pngs.items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(pixels)
            image.putpalette(palette)
            image.save(folder / path)
