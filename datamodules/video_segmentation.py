"""Video object segmentation clips for SAM 2 training (Ravi et al. 2024): video shards, image shards as 1-frame clips.

A training sample becomes a clip of ``num_frames`` consecutive annotated frames of one video (optionally reversed
in time) and up to ``max_objects`` of the objects visible in its first frame, as facebookresearch/sam2
training/dataset/vos_sampler.py:RandomUniformSampler draws them. A video shard holds frames ``NNN.jpg`` and, for
its annotated frames, instance-id maps ``NNN.mask.png`` (0 background, i object i): ``make_shards --format video``
and the synthetic world's video split write them. An image sample (``jpg`` + ``mask.png``: ``make_shards --format
coco``, SA-1B / COCO style) is a video of one annotated frame, trained on as a 1-frame clip.

Batch (``batch_contract``): ``frames`` (B, T, 3, S, S) uint8 on the host, float and normalised with the ImageNet
mean and std on the device; ``frame_masks`` (B, T, S, S) uint8; ``frame_valid`` (B, T) bool; ``key``. In
``frame_masks`` the clip's objects are 1..K, K <= max_objects, numbered in the order of their ids in the shard,
every one of them present in frame 0 (where SAM 2 prompts them); other objects are 0. An object absent from a later
frame (occluded, out of view) is kept and has no pixel there: a trainer reads the number of objects as
``frame_masks[:, 0].amax((-2, -1))`` and object k's presence in frame t as ``(frame_masks[:, t] == k).any()``. K is
0 only when every selected object is too small to survive the resize to S (a trainer skips such a clip).

Augmentation, the same random geometry for every frame and mask of a clip, in the order of the sam2.1 MOSE
fine-tuning config (sam2/configs/sam2.1_training/sam2.1_hiera_b+_MOSE_finetune.yaml ``vos.train_transforms``):
horizontal flip; RandomAffine (degrees 25, shear 20, image bilinear, masks nearest, fill with the mean colour),
skipped when an object of the first frame would leave the picture; square resize to S; ColorJitter over the
clip (brightness 0.1, contrast 0.03, saturation 0.03); RandomGrayscale p 0.05 over the clip; ColorJitter per frame
(0.1, 0.05, 0.05); the normalisation runs on the device. All random draws come from torch's generator, which the
stream seeds per sample (``streams.ResampledShardStream``), so a resumed stream reproduces its clips.

Validation: whole videos, every frame, no random transform (resize only), objects of the first frame (which must
be annotated, as semi-supervised VOS starts from it), for J&F; videos differ in length, so validation batches hold
one video (B = 1, T = the video's frame count). ``frame_valid`` is False on frames without an annotation (their
masks are 0). J&F is then measured at S x S.

Mixing: with ``image_shards`` each training batch is, with probability ``image_prob``, a batch of 1-frame clips from
them, else a batch of video clips (SAM 2 trains on SA-1B images and videos, one dataset per batch:
facebookresearch/sam2 training/dataset/sam2_datasets.py:TorchTrainMixedDataset). The choice is seeded from
(seed, epoch, rank, batch), so a resume continues both streams exactly.
"""

from __future__ import annotations

import io
import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from . import IMAGENET_MEAN, IMAGENET_STD
from .captions import _fields, frame_fields
from .sharded import DataConfig, ShardedDataModule, resolve_shards
from .shards import expand_shards
from .streams import ResampledShardStream, ShardLoader, ShardReader, _decode_image, derive_seed

__all__ = ["SYNTHETIC_VIDEO_SEGMENTATION", "ClipAugment", "MixedClipLoader", "MixedClipStream", "VideoClipTransform",
           "VideoSegmentationDataConfig", "VideoSegmentationDataModule", "WholeVideoTransform", "check_sample",
           "check_video_shards", "colour_jitter", "frame_pairs", "random_affine"]

BILINEAR, NEAREST = InterpolationMode.BILINEAR, InterpolationMode.NEAREST
# The MOSE fine-tuning config's augmentation (sam2/configs/sam2.1_training/sam2.1_hiera_b+_MOSE_finetune.yaml).
FLIP_PROB = 0.5
"""RandomHorizontalFlip's default p (facebookresearch/sam2 training/dataset/transforms.py:RandomHorizontalFlip)."""
AFFINE_DEGREES = 25.0
AFFINE_SHEAR = 20.0
AFFINE_FILL = (123, 116, 103)
"""RandomAffine's image_mean default: the ImageNet mean in 0..255, what the image is filled with outside it."""
CLIP_JITTER = (0.1, 0.03, 0.03)
"""ColorJitter over the clip (consistent_transform): brightness, contrast, saturation; no hue."""
FRAME_JITTER = (0.1, 0.05, 0.05)
"""ColorJitter per frame (consistent_transform False): brightness, contrast, saturation; no hue."""
GRAYSCALE_PROB = 0.05
MAX_WINDOW_TRIES = 1000
"""Windows drawn before a video counts as having no object to track (vos_sampler.py MAX_RETRIES)."""
PREFLIGHT_SAMPLES = 4
"""Samples of the first shard of each set that ``check_video_shards`` reads before training."""
MASK_SUFFIX = ".mask.png"


@dataclass
class VideoSegmentationDataConfig(DataConfig):
    """Shards and loader (as every recipe), plus the clip, the objects per clip, the augmentation and the mix."""

    image_size: int = 128
    """Side S of the square frames and masks (SAM 2: 1024; the tiny default model: 128)."""
    batch_size: int = 4
    """Clips per batch on each device (SAM 2's MOSE fine-tuning: 1 per GPU at 1024 px)."""
    shuffle_buffer: int = 64
    """Samples held in each worker's shuffle buffer. A video sample holds every frame's bytes (a MOSE video tens of
    MB), so this is far below the image datamodules' 1000."""
    num_frames: int = 8
    """Consecutive annotated frames per training clip (SAM 2: 8). Every training video needs at least this many."""
    max_objects: int = 3
    """Objects per clip at most, drawn from those visible in its first frame (sam2.1 MOSE fine-tuning: 3)."""
    max_object_area: float = 1.0
    """Objects covering more than this fraction of a clip's first frame are never drawn. SAM trains without SA-1B's
    masks over 90% of the image (Kirillov et al. 2023, appendix A): 0.9. 1.0 keeps every object, as sam2 does."""
    reverse_time_prob: float = 0.0
    """Probability that a training clip runs backwards in time (vos_sampler.RandomUniformSampler's default 0.0,
    which the sam2.1 MOSE config keeps)."""
    hflip: bool = True
    """Random horizontal flip of the whole clip (p 0.5)."""
    affine: bool = True
    """RandomAffine of the whole clip: rotation up to 25 degrees, shear up to 20."""
    colour: bool = True
    """ColorJitter over the clip and per frame, and RandomGrayscale (p 0.05) over the clip."""
    image_shards: str | None = None
    """Image instance-mask shards (``jpg`` + ``mask.png``: make_shards --format coco, SA-1B / COCO style) mixed into
    training as batches of 1-frame clips, same forms as train_shards. None: videos only. An epoch keeps the length
    of the video stream's (batches_per_epoch, else the train_shards index). To train on images alone, point
    train_shards at them with --data.num_frames 1 (or set image_prob 1)."""
    image_prob: float = 0.5
    """With image_shards: the probability that a training batch is a batch of images rather than of videos."""

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = {"num_frames": self.num_frames >= 1, "max_objects": 1 <= self.max_objects <= 255,
                  "max_object_area": 0.0 < self.max_object_area <= 1.0,
                  "reverse_time_prob": 0.0 <= self.reverse_time_prob <= 1.0, "image_prob": 0.0 < self.image_prob <= 1.0}
        wanted = {"num_frames": ">= 1", "max_objects": "in 1..255 (uint8 masks)", "max_object_area": "in (0, 1]",
                  "reverse_time_prob": "in [0, 1]", "image_prob": "in (0, 1]"}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"VideoSegmentationDataConfig.{name} must be {wanted[name]}, got "
                                 f"{getattr(self, name)} (--data.{name})")
        if self.decode != "host":
            raise ValueError("VideoSegmentationDataConfig.decode must be 'host': clips decode their frames and masks "
                             f"in the loader workers (got {self.decode!r}; --data.decode host)")


# ----------------------------------------------------------------------------------------------------
# Reading a sample's frames and masks (raw WebDataset fields: bytes)


def frame_pairs(sample: dict) -> list[tuple[str, str | None]]:
    """(frame field, mask field or None) of every frame in time order; an image sample (``jpg``, ``mask.png``) is a
    video of one frame."""
    fields = frame_fields(sample)
    if not fields and "jpg" in sample:
        return [("jpg", "mask.png" if "mask.png" in sample else None)]
    pairs = [(field, field[: -len(".jpg")] + MASK_SUFFIX) for field in fields]
    return [(field, mask if mask in sample else None) for field, mask in pairs]


def _where(sample: dict) -> str:
    return f"Sample {sample.get('__key__')!r} of shard {sample.get('__url__', '?')}"


def _no_frames(sample: dict) -> ValueError:
    return ValueError(f"{_where(sample)} has no frames (fields {_fields(sample)}; expected 000.jpg, 000.mask.png, ... "
                      "or jpg + mask.png). Write video shards with `python -m datamodules.make_shards --format video` "
                      "and image shards with `--format coco`.")


def _too_short(sample: dict, annotated: int, num_frames: int) -> ValueError:
    image = "jpg" in sample and not frame_fields(sample)
    if image and not annotated:
        return ValueError(f"{_where(sample)} is an image without its mask.png (fields {_fields(sample)}): write image "
                          "shards with `python -m datamodules.make_shards --format coco`.")
    hint = " It is an image sample: image shards go in --data.image_shards (1-frame clips)." if image else ""
    return ValueError(
        f"{_where(sample)} has {annotated} annotated frame(s), fewer than a training clip's {num_frames} "
        f"(--data.num_frames {num_frames}): SAM 2 trains on {num_frames} consecutive annotated frames. Lower "
        f"--data.num_frames to {max(annotated, 1)}, or drop this video from the shards.{hint}")


def _size_mismatch(sample: dict, frame: str, frame_size: tuple[int, int], mask: str,
                   mask_size: tuple[int, int]) -> ValueError:
    return ValueError(
        f"{_where(sample)}: mask {mask} is {mask_size[0]}x{mask_size[1]} but its frame {frame} is "
        f"{frame_size[0]}x{frame_size[1]} (width x height); a mask must label its frame pixel for pixel. Re-write "
        "the shard (make_shards --format video skips such videos as mask_size_mismatch).")


def _decode(sample: dict, field: str) -> Image.Image:
    try:
        return _decode_image(field, sample[field])  # a frame as RGB, a mask.png in its own mode (ids)
    except Exception as exc:  # any decoder error: name the sample and the field
        raise ValueError(f"{_where(sample)}: {field} does not decode ({type(exc).__name__}: {exc}). Re-write this "
                         "shard.") from exc


def _ids(sample: dict, field: str) -> np.ndarray:
    """The instance-id map (H, W) of a mask field."""
    ids = np.asarray(_decode(sample, field))
    if ids.ndim != 2:
        raise ValueError(f"{_where(sample)}: {field} has shape {ids.shape}; a mask is a one-channel instance-id map "
                         "(0 background, i object i), as make_shards writes it.")
    return ids


def _objects(ids: np.ndarray) -> list[int]:
    return [int(i) for i in np.unique(ids) if i != 0]


def _binary(ids: np.ndarray, objects: Sequence[int]) -> torch.Tensor:
    """(K, H, W) uint8 0/1 masks of ``objects`` in an id map: each object goes through the transforms on its own, as
    in the reference (an id map cannot be resampled bilinearly)."""
    if not objects:
        return torch.zeros((0, *ids.shape), dtype=torch.uint8)
    return torch.from_numpy(np.stack([ids == i for i in objects])).to(torch.uint8)


def _id_map(masks: torch.Tensor) -> torch.Tensor:
    """(..., K, H, W) 0/1 -> (..., H, W) uint8 ids 1..K; where resampling made two objects overlap, the later wins."""
    if masks.shape[-3] == 0:
        return torch.zeros((*masks.shape[:-3], *masks.shape[-2:]), dtype=torch.uint8)
    ids = torch.arange(1, masks.shape[-3] + 1, dtype=torch.uint8).view(-1, 1, 1)
    return (masks.bool() * ids).amax(dim=-3)


def _renumber_by_first_frame(ids: torch.Tensor) -> torch.Tensor:
    """(T, H, W) ids -> the objects present in frame 0 as 1..K in id order, every other id 0."""
    present = ids[0].unique()
    present = present[present > 0].long()
    table = torch.zeros(256, dtype=torch.uint8)
    table[present] = torch.arange(1, len(present) + 1, dtype=torch.uint8)
    return table[ids.long()]


def _resize(frames: list[Image.Image], masks: torch.Tensor, size: int) -> tuple[list[Image.Image], torch.Tensor]:
    """Square resize; the masks bilinearly with rounding, as RandomResizeAPI resizes its uint8 segments
    (facebookresearch/sam2 training/dataset/transforms.py:resize, F.resize with its default interpolation)."""
    square = [size, size]
    frames = [TF.resize(frame, square, BILINEAR, antialias=True) for frame in frames]
    return frames, TF.resize(masks, square, BILINEAR, antialias=True)


# ----------------------------------------------------------------------------------------------------
# Augmentation (a class, not a closure, so that it pickles for the loader workers)


class ClipAugment:
    """Flip, affine, colour: one random draw for the clip, except the per-frame ColorJitter.

    ``frames`` are PIL RGB images of one size, ``masks`` (T, K, H, W) uint8 0/1 with the objects of frame 0 present
    there. The resize to the model size sits between geometry and colour (``VideoClipTransform``), as in the config.
    """

    def __init__(self, hflip: bool = True, affine: bool = True, colour: bool = True):
        self.hflip, self.affine, self.colour = hflip, affine, colour

    def geometry(self, frames: list[Image.Image], masks: torch.Tensor) -> tuple[list[Image.Image], torch.Tensor]:
        if self.hflip and torch.rand(()) < FLIP_PROB:
            frames, masks = [TF.hflip(frame) for frame in frames], masks.flip(-1)
        if self.affine:
            frames, masks = random_affine(frames, masks)
        return frames, masks

    def colours(self, frames: list[Image.Image]) -> list[Image.Image]:
        if not self.colour:
            return frames
        frames = colour_jitter(frames, CLIP_JITTER, consistent=True)
        if torch.rand(()) < GRAYSCALE_PROB:
            frames = [TF.rgb_to_grayscale(frame, num_output_channels=3) for frame in frames]
        return colour_jitter(frames, FRAME_JITTER, consistent=False)


def random_affine(frames: list[Image.Image], masks: torch.Tensor) -> tuple[list[Image.Image], torch.Tensor]:
    """One random rotation and shear for the clip; left out (the clip unchanged) when an object of frame 0 would leave
    the picture: facebookresearch/sam2 training/dataset/transforms.py:RandomAffine with consistent_transform and its
    default num_tentatives of 1."""
    width, height = frames[0].size
    params = T.RandomAffine.get_params([-AFFINE_DEGREES, AFFINE_DEGREES], None, None,
                                       [-AFFINE_SHEAR, AFFINE_SHEAR], [width, height])
    moved = TF.affine(masks, *params, interpolation=NEAREST, fill=0.0)
    if moved.shape[1] and bool((moved[0].flatten(1).amax(1) == 0).any()):
        return frames, masks
    return [TF.affine(frame, *params, interpolation=BILINEAR, fill=list(AFFINE_FILL)) for frame in frames], moved


def colour_jitter(frames: list[Image.Image], strength: tuple[float, float, float],
                  consistent: bool) -> list[Image.Image]:
    """ColorJitter (brightness, contrast, saturation; no hue) in torchvision's random order, drawn once for the clip
    or once per frame (facebookresearch/sam2 training/dataset/transforms.py:ColorJitter)."""
    ranges = [[max(0.0, 1 - s), 1 + s] for s in strength]
    params = T.ColorJitter.get_params(*ranges, None) if consistent else None
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    out = []
    for frame in frames:
        order, *factors = params if consistent else T.ColorJitter.get_params(*ranges, None)
        for fn in order.tolist():
            if fn < 3:  # 3 is hue, off
                frame = adjust[fn](frame, factors[fn])
        out.append(frame)
    return out


# ----------------------------------------------------------------------------------------------------
# Sample transforms


class VideoClipTransform:
    """Raw video (or image) sample -> a training clip: ``{"frames": uint8 (T, 3, S, S), "frame_masks": uint8
    (T, S, S), "frame_valid": bool (T,), "key"}`` with T = ``num_frames`` (see the module docstring)."""

    def __init__(self, size: int, num_frames: int, max_objects: int, reverse_time_prob: float = 0.0,
                 augment: ClipAugment | None = None, max_object_area: float = 1.0):
        self.size, self.num_frames, self.max_objects = size, num_frames, max_objects
        self.max_object_area = max_object_area
        self.reverse_time_prob = reverse_time_prob
        self.augment = augment or ClipAugment(False, False, False)

    def __call__(self, sample: dict) -> dict:
        window, first_ids = self._window(sample)
        frames, ids = [], []
        for i, (frame_field, mask_field) in enumerate(window):
            frames.append(_decode(sample, frame_field))
            ids.append(first_ids if i == 0 else _ids(sample, mask_field))
            if ids[-1].shape != frames[-1].size[::-1]:
                raise _size_mismatch(sample, frame_field, frames[-1].size, mask_field, ids[-1].shape[::-1])
        objects = self._small_enough(first_ids)  # none left: a clip without objects, which trains nothing
        chosen = sorted(objects[i] for i in torch.randperm(len(objects))[: self.max_objects].tolist())
        masks = torch.stack([_binary(frame_ids, chosen) for frame_ids in ids])  # (T, K, H, W)
        frames, masks = self.augment.geometry(frames, masks)
        frames, masks = _resize(frames, masks, self.size)
        frames = self.augment.colours(frames)
        return {"frames": torch.stack([TF.pil_to_tensor(frame) for frame in frames]),
                "frame_masks": _renumber_by_first_frame(_id_map(masks)),
                "frame_valid": torch.ones(len(frames), dtype=torch.bool), "key": sample["__key__"]}

    def _small_enough(self, ids: np.ndarray) -> list[int]:
        objects = _objects(ids)
        if self.max_object_area >= 1.0:
            return objects
        areas = np.bincount(ids.ravel(), minlength=max(objects, default=0) + 1)
        return [k for k in objects if areas[k] <= self.max_object_area * ids.size]

    def _window(self, sample: dict) -> tuple[list[tuple[str, str]], np.ndarray]:
        """``num_frames`` consecutive annotated frames (reversed with ``reverse_time_prob``) whose first shows an
        object, and that first frame's id map (vos_sampler.RandomUniformSampler.sample)."""
        annotated = [pair for pair in frame_pairs(sample) if pair[1] is not None]
        if not annotated:
            raise _no_frames(sample) if not frame_pairs(sample) else _too_short(sample, 0, self.num_frames)
        if len(annotated) < self.num_frames:
            raise _too_short(sample, len(annotated), self.num_frames)
        decoded: dict[str, np.ndarray] = {}
        for _ in range(MAX_WINDOW_TRIES):
            start = int(torch.randint(len(annotated) - self.num_frames + 1, ()))
            window = annotated[start : start + self.num_frames]
            if torch.rand(()) < self.reverse_time_prob:
                window = window[::-1]
            first = window[0][1]
            if first not in decoded:
                decoded[first] = _ids(sample, first)
            if _objects(decoded[first]):
                return window, decoded[first]
        raise ValueError(f"{_where(sample)}: no object in the first frame of {MAX_WINDOW_TRIES} clips drawn from its "
                         f"{len(annotated)} annotated frames ({len(decoded)} of them looked at): a clip needs an "
                         "object to track. Drop this video from the shards.")


class WholeVideoTransform:
    """Raw video sample -> the whole video for evaluation: every frame resized to S x S, no random transform, the
    objects of frame 0 as 1..K; ``frame_valid`` marks the annotated frames (the others' masks are 0)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, sample: dict) -> dict:
        pairs = frame_pairs(sample)
        if not pairs:
            raise _no_frames(sample)
        if pairs[0][1] is None:
            raise _first_frame_unannotated(sample, pairs[0][0])
        objects: list[int] | None = None
        frames, masks = [], []
        for frame_field, mask_field in pairs:
            frame = _decode(sample, frame_field)
            if mask_field is None:
                ids = np.zeros(frame.size[::-1], np.uint8)
            else:
                ids = _ids(sample, mask_field)
                if ids.shape != frame.size[::-1]:
                    raise _size_mismatch(sample, frame_field, frame.size, mask_field, ids.shape[::-1])
            objects = _objects(ids)[:255] if objects is None else objects  # the first frame's
            (frame,), binary = _resize([frame], _binary(ids, objects), self.size)  # frame by frame: bounded memory
            frames.append(TF.pil_to_tensor(frame))
            masks.append(_id_map(binary))
        return {"frames": torch.stack(frames), "frame_masks": _renumber_by_first_frame(torch.stack(masks)),
                "frame_valid": torch.tensor([mask is not None for _, mask in pairs]), "key": sample["__key__"]}


def _first_frame_unannotated(sample: dict, frame: str) -> ValueError:
    return ValueError(f"{_where(sample)}: the first frame {frame} has no mask; evaluation prompts the objects of the "
                      "first frame, so a validation video needs its first frame annotated.")


# ----------------------------------------------------------------------------------------------------
# Mixing video and image batches


class MixedClipStream:
    """Two training streams (videos, images) cut into one epoch of ``batches_per_epoch`` batches: batch j comes from
    the image stream with probability ``image_prob``, drawn from (seed, epoch, rank). Each stream yields exactly
    the batches it is asked for in an epoch, so ``skip_batches`` resumes both where they stood."""

    def __init__(self, video: ResampledShardStream, image: ResampledShardStream, image_prob: float,
                 batches_per_epoch: int):
        self.streams = (video, image)
        self.image_prob = image_prob
        self.batches_per_epoch = batches_per_epoch
        self.seed = video.seed  # also seeds the image stream, apart from the video one
        self.epoch = -1
        self.skip_batches = 0
        self.set_epoch(0)

    @property
    def seed(self) -> int:
        return self.streams[0].seed

    @seed.setter
    def seed(self, seed: int) -> None:
        # ShardedDataModule.load_state_dict sets the checkpoint's seed here. Own seeds keep the two streams'
        # augmentations apart (their n-th samples would otherwise draw the same numbers).
        self.streams[0].seed, self.streams[1].seed = seed, derive_seed("image clips", seed)

    def kinds(self, epoch: int) -> list[int]:
        """0 (video) or 1 (image) for each batch of ``epoch`` on this rank."""
        rng = random.Random(derive_seed("clip kinds", self.seed, epoch, self.streams[0].rank))
        return [int(rng.random() < self.image_prob) for _ in range(self.batches_per_epoch)]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip_batches = 0  # a resume's skip belongs to the epoch it was recorded in
        self.epoch = epoch
        kinds = self.kinds(epoch)
        for kind, stream in enumerate(self.streams):
            stream.set_epoch(epoch)
            stream.batches_per_epoch = kinds.count(kind)


class MixedClipLoader:
    """The loader of a ``MixedClipStream``: a ``ShardLoader`` per stream (each with ``num_workers`` processes, started
    at its first batch), read in the epoch's order of kinds. Like ShardLoader it is its own sampler, so that
    Lightning's ``set_epoch`` reaches the streams."""

    batch_sampler = None

    def __init__(self, stream: MixedClipStream, num_workers: int):
        self.stream = stream
        self.loaders = [ShardLoader(s, num_workers) for s in stream.streams]

    @property
    def sampler(self) -> MixedClipLoader:
        return self

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def __len__(self) -> int:
        return self.stream.batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        return self._batches()  # lazy, as ShardLoader: nothing starts before the first batch is asked for

    def _batches(self) -> Iterator[dict]:
        kinds = self.stream.kinds(self.stream.epoch)
        skip = min(self.stream.skip_batches, len(kinds))
        for kind, stream in enumerate(self.stream.streams):
            stream.skip_batches = kinds[:skip].count(kind)  # what each stream already gave this epoch
        self.stream.skip_batches = 0  # a resume skips within its first epoch only
        batches: list[Iterator[dict] | None] = [None, None]
        for kind in kinds[skip:]:
            if batches[kind] is None:
                batches[kind] = iter(self.loaders[kind])
            yield next(batches[kind])


# ----------------------------------------------------------------------------------------------------
# The datamodule


class VideoSegmentationDataModule(ShardedDataModule):
    """Video (and image) instance-mask shards -> SAM 2 training clips and whole validation videos (module docstring).
    Call ``check_video_shards(cfg)`` first to fill in the synthetic world and fail before any compute."""

    def __init__(self, cfg: VideoSegmentationDataConfig, seed: int = 0, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        augment = ClipAugment(cfg.hflip, cfg.affine, cfg.colour)
        train = VideoClipTransform(cfg.image_size, cfg.num_frames, cfg.max_objects, cfg.reverse_time_prob, augment,
                                   cfg.max_object_area)
        # Frames and masks are decoded in the transforms: a clip decodes only the frames it takes.
        super().__init__(cfg, train, WholeVideoTransform(cfg.image_size), seed=seed, mean=mean, std=std,
                         required_keys=())
        self.image_transform = VideoClipTransform(cfg.image_size, 1, cfg.max_objects, 0.0, augment, cfg.max_object_area)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.val_stream is not None:
            self.val_stream.batch_size = 1  # whole videos differ in length: one per batch
        if stage in (None, "fit") and self.cfg.image_shards is not None:
            video = self.train_stream
            image = ResampledShardStream(
                expand_shards(self.cfg.image_shards), self.image_transform, self.cfg.batch_size, 0,
                shuffle_buffer=self.cfg.shuffle_buffer, rank=video.rank, world_size=video.world_size,
                required_keys=(), max_corrupt_fraction=self.cfg.max_corrupt_fraction,
                min_samples_for_corrupt_check=self.cfg.min_samples_for_corrupt_check)
            self.train_stream = MixedClipStream(video, image, self.cfg.image_prob, self.batches_per_epoch)
            self.train_stream.set_epoch(self._epoch)

    def train_dataloader(self) -> ShardLoader | MixedClipLoader:
        if isinstance(self.train_stream, MixedClipStream):
            return MixedClipLoader(self.train_stream, self.cfg.num_workers)
        return super().train_dataloader()


# ----------------------------------------------------------------------------------------------------
# Checks before compute, and the built-in data


SYNTHETIC_VIDEO_SEGMENTATION = {"video_samples": 544, "samples_per_shard": 32, "video_frames": 8,
                                "train_samples": 32, "val_samples": 32}
"""The built-in data: a synthetic world whose video split is 17 shards of 32 videos of 8 frames with per-frame
instance masks; the first 16 (512 videos) train, the last (other scenes) validates. Its image splits are kept
minimal (the world always writes them). Built in about 6 s at 128 px on 2 cores."""
SYNTHETIC_MAX_VIDEO_SIZE = 256
"""Frames are rendered at image_size up to this side (a 1024 px world takes minutes to render; larger image sizes
upsample the rendered frames)."""


def _fill_synthetic_world(cfg: VideoSegmentationDataConfig) -> None:
    from .synthetic import SyntheticWorldConfig, ensure_synthetic_world  # lazy, as in resolve_shards

    frames = max(SYNTHETIC_VIDEO_SEGMENTATION["video_frames"], cfg.num_frames)
    world = ensure_synthetic_world(SyntheticWorldConfig(**{
        **SYNTHETIC_VIDEO_SEGMENTATION, "video_frames": frames,
        "video_size": min(cfg.image_size, SYNTHETIC_MAX_VIDEO_SIZE)}))
    *train, val = expand_shards(world.video_shards)
    cfg.train_shards, cfg.val_shards = "::".join(train), cfg.val_shards or val


def _leading_samples(url: str, count: int) -> list[dict]:
    reader = ShardReader(required_keys=(), max_corrupt_fraction=0.0, min_samples_for_corrupt_check=1 << 30)
    samples = reader.tar_samples(reader.finite_urls([url]))
    try:
        return list(itertools.islice(samples, count))
    finally:
        samples.close()


def _header_size(sample: dict, field: str) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(sample[field])) as image:  # the header only: no pixels decoded
            return image.size
    except Exception as exc:  # any decoder error: name the sample and the field
        raise ValueError(f"{_where(sample)}: {field} is not an image ({type(exc).__name__}: {exc}). Re-write this "
                         "shard.") from exc


def check_sample(sample: dict, num_frames: int | None) -> None:
    """What a clip needs of a sample, without decoding its frames: frames, masks the size of their frames, and
    ``num_frames`` annotated frames (training) one of which shows an object, or (``num_frames`` None: validation)
    an annotated first frame with an object in it."""
    pairs = frame_pairs(sample)
    if not pairs:
        raise _no_frames(sample)
    annotated = [(frame, mask) for frame, mask in pairs if mask is not None]
    if num_frames is not None and len(annotated) < num_frames:
        raise _too_short(sample, len(annotated), num_frames)
    for frame, mask in annotated:
        frame_size, mask_size = _header_size(sample, frame), _header_size(sample, mask)
        if frame_size != mask_size:
            raise _size_mismatch(sample, frame, frame_size, mask, mask_size)
    if num_frames is None:
        if pairs[0][1] is None:
            raise _first_frame_unannotated(sample, pairs[0][0])
        if not _objects(_ids(sample, pairs[0][1])):
            raise ValueError(f"{_where(sample)}: no object in its first frame {pairs[0][0]} (its mask "
                             f"{pairs[0][1]} is all background); evaluation tracks the first frame's objects.")
    elif not any(_objects(_ids(sample, mask)) for _, mask in annotated):
        raise ValueError(f"{_where(sample)}: none of its {len(annotated)} annotated frames shows an object (every "
                         "mask is all background); a clip needs an object to track. Drop this video.")


def _check_shards(url: str, name: str, num_frames: int | None) -> None:
    samples = _leading_samples(url, PREFLIGHT_SAMPLES)
    if not samples:
        raise ValueError(f"--data.{name}: shard {url} holds no readable sample. Check it with `tar tf {url}`.")
    for sample in samples:
        try:
            check_sample(sample, num_frames)
        except ValueError as err:
            raise ValueError(f"--data.{name}: {err}") from None


def check_video_shards(cfg: VideoSegmentationDataConfig) -> None:
    """Fail before the model is built when the shards cannot feed SAM 2 training: the first samples of the first
    training, validation and image shard must be clips (``check_sample``). With no ``--data.train_shards`` the
    built-in synthetic video world is filled in (``SYNTHETIC_VIDEO_SEGMENTATION``), validation on its last shard."""
    if cfg.train_shards is None:
        _fill_synthetic_world(cfg)
    shards = resolve_shards(cfg)
    _check_shards(shards[0][0], "train_shards", cfg.num_frames)
    if len(shards) > 1:
        _check_shards(shards[1][0], "val_shards", None)
    if cfg.image_shards is not None:
        _check_shards(expand_shards(cfg.image_shards)[0], "image_shards", 1)
