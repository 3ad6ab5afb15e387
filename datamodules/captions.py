"""Image-text and video-text pairs for contrastive pre-training (CLIP; Perception Encoder, Bolya et al. 2025).

A training sample becomes ``image`` (uint8, normalised on the device) or ``frames``, plus its caption as ``text``,
``text_tokens`` and ``text_mask`` (tokenised in the loader workers with ``datamodules.text.CaptionTokenizer``); a
validation sample also keeps its ``label`` when it has one, for zero-shot classification with the class names of
``zero_shot_classes``. The caption is the sample's ``txt``, else the ``caption`` of its json.

Images: training crops with RandomResizedCrop(scale=(min_crop_scale, 1)) and no flip (open_clip
src/open_clip/transform.py trains with scale (0.9, 1) and no flip: a caption may say "left" or "right");
validation squashes the whole image to image_size x image_size without a crop, as PE evaluates
(perception_models core/vision_encoder/transforms.py get_image_transform, center_crop=False). Both resample
bilinearly ("We used bilinear during training", same file) and PE normalises with mean = std = 0.5.

Videos: a sample holds frames ``000.jpg``, ``001.jpg``, ... (make_shards --format video, the synthetic world's
video split) and a caption; T = ``video_frames`` of its N frames are taken at ``int(i (N - 1) / (T - 1))``, evenly
from the first to the last (PE's video benchmark sampling), repeating frames when N < T.

Progressive resolution (PE trains at 98 -> 154 -> 224 -> the final size): the loader always produces the final
``image_size`` and ``CaptionDataModule`` resizes the training batch on the device to ``ResolutionSchedule.size_at``
of the trainer's global step, so a resumed run is at the right size with no state of its own.
"""

from __future__ import annotations

import io
import itertools
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as TF

from .classification import classes_beside
from .sharded import DataConfig, ShardedDataModule, resolve_shards
from .shards import expand_shards
from .streams import ShardReader, json_members
from .text import PE_CORE_CONTEXT, CaptionTokenizer
from .transforms import CROP_RATIO

__all__ = ["PE_MEAN", "PE_STD", "SYNTHETIC_CAPTIONS", "SYNTHETIC_VIDEOS", "CaptionDataConfig", "CaptionDataModule",
           "CaptionSampleTransform", "ResolutionSchedule", "VideoCaptionSampleTransform", "caption_datamodule",
           "caption_of", "check_caption_shards", "frame_indices", "video_caption_datamodule", "zero_shot_classes"]

# PE normalises with mean = std = 0.5 (perception_models core/vision_encoder/transforms.py).
PE_MEAN = (0.5, 0.5, 0.5)
PE_STD = (0.5, 0.5, 0.5)
BILINEAR = InterpolationMode.BILINEAR
CLIP_CROP_SCALE = 0.9
"""open_clip's training crop: RandomResizedCrop scale (0.9, 1.0) (src/open_clip/transform.py AugmentationCfg)."""
_FRAME_FIELD = re.compile(r"(\d+)\.jpg")
FIRST_FRAME = "000.jpg"


@dataclass
class CaptionDataConfig(DataConfig):
    """Shards and loader (as every recipe), plus the caption context, the video clip length and the train crop."""

    context_length: int = PE_CORE_CONTEXT
    """Tokens per caption, start and end tokens included; longer captions are cut (PE-Core T/S/B/L: 32, G: 72)."""
    video_frames: int = 8
    """Frames taken from each video, evenly from its first to its last (video_caption_datamodule only)."""
    min_crop_scale: float = CLIP_CROP_SCALE
    """Smallest area fraction of the training RandomResizedCrop (the crop keeps most of the image, so the caption
    still describes it). 0.9 is open_clip's CLIP training default (scale (0.9, 1.0)); 1.0 resizes the whole image
    with only the aspect ratio jittered."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.context_length < 3:
            raise ValueError(f"CaptionDataConfig.context_length must be >= 3 (start token, a word, end token), got "
                             f"{self.context_length} (--data.context_length; PE-Core uses {PE_CORE_CONTEXT})")
        if self.video_frames < 1:
            raise ValueError(f"CaptionDataConfig.video_frames must be >= 1, got {self.video_frames} "
                             "(--data.video_frames)")
        if not 0 < self.min_crop_scale <= 1:
            raise ValueError(f"CaptionDataConfig.min_crop_scale must be in (0, 1], got {self.min_crop_scale} "
                             "(--data.min_crop_scale)")
        if self.decode != "host":
            # decode="device" ships only the image out of the workers (device_decode.DeviceDecodeTransform).
            raise ValueError("CaptionDataConfig.decode must be 'host': caption samples carry their tokens with the "
                             f"image, which decode='device' does not (got {self.decode!r}; --data.decode host)")


# ----------------------------------------------------------------------------------------------------
# Reading a sample's caption, label and frames (raw WebDataset fields: bytes unless decoded by the reader)


def _meta(sample: dict) -> dict:
    meta = sample.get("json")
    if isinstance(meta, (bytes, str)):
        meta = json.loads(meta)
    return meta if isinstance(meta, dict) else {}


def caption_of(sample: dict) -> str | None:
    """The sample's caption: its ``txt``, else its json's ``caption``; None when it has neither (or only blanks)."""
    text = sample.get("txt")
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    if not (isinstance(text, str) and text.strip()):
        text = _meta(sample).get("caption")
    return text.strip() if isinstance(text, str) and text.strip() else None


def label_of(sample: dict) -> int | None:
    """The sample's class: its ``cls``, else its json's ``label``; None when it has neither."""
    if "cls" in sample:
        return int(sample["cls"])
    label = _meta(sample).get("label")
    return label if isinstance(label, int) else None


def frame_fields(sample: dict) -> list[str]:
    """The frame fields of a video sample (``000.jpg``, ``001.jpg``, ...) in frame order."""
    return sorted((k for k in sample if _FRAME_FIELD.fullmatch(k)), key=lambda k: int(k.split(".")[0]))


def frame_indices(num_frames: int, clip_length: int) -> list[int]:
    """Indices of ``clip_length`` frames of a video of ``num_frames``: ``int(i (N - 1) / (T - 1))``, evenly from the
    first frame to the last; with fewer frames than the clip needs, the formula repeats frames."""
    if num_frames < 1 or clip_length < 1:
        raise ValueError(f"frame_indices needs a frame and a clip length >= 1, got {num_frames} and {clip_length}")
    if clip_length == 1:
        return [0]
    return [int(i * (num_frames - 1) / (clip_length - 1)) for i in range(clip_length)]


def _fields(sample: dict, shown: int = 8) -> str:
    """The sample's field names for an error message; a long video's hundreds of frames are cut."""
    fields = sorted(k for k in sample if not k.startswith("__"))
    return str(fields) if len(fields) <= shown else f"{fields[:shown]} and {len(fields) - shown} more"


def _no_caption(sample: dict) -> ValueError:
    fields = _fields(sample)
    return ValueError(
        f"Sample {sample.get('__key__')!r} of shard {sample.get('__url__', '?')} has no caption: no 'txt' field and "
        f"no 'caption' in its json (its fields: {fields}). Contrastive training needs one per sample: write the shards "
        "with `python -m datamodules.make_shards --format captions`, or add a .txt (or a json 'caption') per sample.")


def _decode_frame(sample: dict, field: str) -> Image.Image:
    data = sample[field]
    if isinstance(data, Image.Image):  # the reader decodes FIRST_FRAME, a required key
        return data
    try:
        with io.BytesIO(data) as stream:
            image = Image.open(stream)
            image.load()
    except Exception as exc:  # any decoder error: name the sample and the frame
        raise ValueError(f"Sample {sample.get('__key__')!r} of shard {sample.get('__url__', '?')}: frame {field} "
                         f"does not decode ({type(exc).__name__}: {exc}). Re-write this shard.") from exc
    return image.convert("RGB")


# ----------------------------------------------------------------------------------------------------
# Sample transforms (classes, not closures, so that they pickle for the loader workers)


class _Tokenized:
    """Holds a CaptionTokenizer built where it is used: a worker builds its own instead of unpickling 2 MB of BPE."""

    def __init__(self, context_length: int, with_label: bool):
        self.context_length = context_length
        self.with_label = with_label
        self._tokenizer: CaptionTokenizer | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None}

    def _text_fields(self, sample: dict) -> dict:
        text = caption_of(sample)
        if text is None:
            raise _no_caption(sample)
        if self._tokenizer is None:
            self._tokenizer = CaptionTokenizer(self.context_length)
        tokens, mask = self._tokenizer(text)
        out = {"text": text, "text_tokens": tokens[0], "text_mask": mask[0]}
        label = label_of(sample) if self.with_label else None
        if label is not None:
            out["label"] = label
        return out


class CaptionSampleTransform(_Tokenized):
    """Decoded image-text sample -> ``{"image": uint8 (3, H, W), "text", "text_tokens" int64 (L,), "text_mask" bool
    (L,), "label" (with_label and the sample has one), "key"}``."""

    def __init__(self, image_transform: Callable, context_length: int = PE_CORE_CONTEXT, with_label: bool = False):
        super().__init__(context_length, with_label)
        self.image_transform = image_transform

    def __call__(self, sample: dict) -> dict:
        out = {"image": self.image_transform(sample["jpg"]).as_subclass(torch.Tensor), **self._text_fields(sample)}
        out["key"] = sample["__key__"]
        return out


class VideoCaptionSampleTransform(_Tokenized):
    """Decoded video-text sample -> ``{"frames": uint8 (T, 3, size, size), "text", "text_tokens", "text_mask",
    "label" (with_label and the sample has one), "key"}``.

    Training (``min_crop_scale`` set) draws one RandomResizedCrop for the clip, so that every frame shows the same
    region; evaluation squashes each frame to size x size. Only the T frames taken are decoded.
    """

    def __init__(self, size: int, clip_length: int, context_length: int = PE_CORE_CONTEXT,
                 min_crop_scale: float | None = None, with_label: bool = False):
        super().__init__(context_length, with_label)
        self.size = size
        self.clip_length = clip_length
        self.min_crop_scale = min_crop_scale

    def __call__(self, sample: dict) -> dict:
        text = self._text_fields(sample)  # first: a sample without a caption fails before any frame is decoded
        fields = frame_fields(sample)
        indices = frame_indices(len(fields), self.clip_length)
        decoded = {i: _decode_frame(sample, fields[i]) for i in dict.fromkeys(indices)}  # a repeat decodes once
        size = [self.size, self.size]
        if self.min_crop_scale is None:
            resized = {i: TF.resize(image, size, BILINEAR, antialias=True) for i, image in decoded.items()}
        else:
            box = RandomResizedCrop.get_params(decoded[0], [self.min_crop_scale, 1.0], list(CROP_RATIO))
            resized = {i: TF.resized_crop(image, *box, size, BILINEAR, antialias=True) for i, image in decoded.items()}
        resized = {i: TF.pil_to_tensor(image) for i, image in resized.items()}
        out = {"frames": torch.stack([resized[i] for i in indices]), **text}
        out["key"] = sample["__key__"]
        return out


def caption_train_pil_transform(size: int, min_crop_scale: float = CLIP_CROP_SCALE) -> v2.Compose:
    """PIL image -> uint8 ``(3, size, size)``: RandomResizedCrop(scale=(min_crop_scale, 1), bilinear), no flip."""
    return v2.Compose([v2.RandomResizedCrop(size, scale=(min_crop_scale, 1.0), interpolation=BILINEAR, antialias=True),
                       v2.PILToTensor()])


def squash_pil_transform(size: int) -> v2.Compose:
    """PIL image -> uint8 ``(3, size, size)``: the whole image resized (bilinear) to a square, no crop (PE eval)."""
    return v2.Compose([v2.Resize((size, size), interpolation=BILINEAR, antialias=True), v2.PILToTensor()])


# ----------------------------------------------------------------------------------------------------
# Progressive resolution


@dataclass(frozen=True)
class ResolutionSchedule:
    """Training image side by optimizer step: ``stages`` are ``(first step, size)`` pairs, the first at step 0,
    steps strictly increasing (PE-Core: 98 -> 154 -> 224 -> the final size, Bolya et al. 2025)."""

    stages: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        stages = tuple((int(step), int(size)) for step, size in self.stages)
        object.__setattr__(self, "stages", stages)
        if not stages:
            raise ValueError("ResolutionSchedule needs at least one (step, size) stage, e.g. [(0, 224)]")
        if stages[0][0] != 0:
            raise ValueError(f"ResolutionSchedule: the first stage must start at step 0, got {stages[0]}; "
                             "otherwise the size before it is undefined")
        steps = [step for step, _ in stages]
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError(f"ResolutionSchedule: stage steps must be strictly increasing, got {steps}")
        bad = [size for _, size in stages if size < 1]
        if bad:
            raise ValueError(f"ResolutionSchedule: sizes must be >= 1 pixel, got {bad} in {list(stages)}")

    def size_at(self, step: int) -> int:
        """The image side of optimizer step ``step`` (the size of the last stage started at or before it)."""
        return next(size for start, size in reversed(self.stages) if start <= step)

    def check_fits(self, image_size: int) -> None:
        """The loader makes ``image_size`` images and the schedule only shrinks them: no stage may be larger."""
        larger = [(step, size) for step, size in self.stages if size > image_size]
        if larger:
            raise ValueError(f"ResolutionSchedule stage(s) {larger} are larger than --data.image_size {image_size}, "
                             "the size the loader produces: set --data.image_size to the final (largest) size.")


def resize_on_device(images: torch.Tensor, size: int) -> torch.Tensor:
    """``(..., 3, H, W)`` -> ``(..., 3, size, size)``, bilinear with antialiasing, in the input's dtype.

    Computed in float32: the batch may already be in the precision's dtype (bf16), and resampling is linear with
    weights summing to one, so resizing normalised images equals normalising resized ones.
    """
    lead = images.shape[:-3]
    flat = images.reshape(-1, *images.shape[-3:]).float()  # (N, 3, H, W)
    out = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.to(images.dtype).reshape(*lead, *out.shape[-3:])


class CaptionDataModule(ShardedDataModule):
    """ShardedDataModule that, with a ``resolution_schedule``, resizes the training ``image`` / ``frames`` on the device
    to ``resolution_schedule.size_at(trainer.global_step)``. Validation (and anything outside training) keeps the
    loader's full ``image_size``. The size depends on the global step alone, which a checkpoint restores."""

    def __init__(self, cfg: CaptionDataConfig, *args, resolution_schedule: ResolutionSchedule | None = None,
                 **kwargs):
        super().__init__(cfg, *args, **kwargs)
        if resolution_schedule is not None:
            resolution_schedule.check_fits(cfg.image_size)
        self.resolution_schedule = resolution_schedule

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # After normalisation and the precision plugin's cast: resize_on_device keeps the dtype it is given.
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        if self.resolution_schedule is None or self.trainer is None or not self.trainer.training:
            return batch
        size = self.resolution_schedule.size_at(self.trainer.global_step)
        for key in ("image", "frames"):
            value = batch.get(key) if isinstance(batch, dict) else None
            if isinstance(value, torch.Tensor) and tuple(value.shape[-2:]) != (size, size):
                batch[key] = resize_on_device(value, size)
        return batch


# ----------------------------------------------------------------------------------------------------
# Factories


def caption_datamodule(cfg: CaptionDataConfig, seed: int = 0, mean: Sequence[float] = PE_MEAN,
                       std: Sequence[float] = PE_STD,
                       resolution_schedule: ResolutionSchedule | None = None) -> CaptionDataModule:
    """Image-text shards -> batches of ``image``, ``text``, ``text_tokens``, ``text_mask``, ``key`` (+ ``label`` in
    validation when the samples have one). Call ``check_caption_shards(cfg)`` first to fail before any compute."""
    train = CaptionSampleTransform(caption_train_pil_transform(cfg.image_size, cfg.min_crop_scale), cfg.context_length)
    val = CaptionSampleTransform(squash_pil_transform(cfg.image_size), cfg.context_length, with_label=True)
    return CaptionDataModule(cfg, train, val, seed=seed, mean=mean, std=std, required_keys=("jpg",),
                             resolution_schedule=resolution_schedule)


def video_caption_datamodule(cfg: CaptionDataConfig, seed: int = 0, mean: Sequence[float] = PE_MEAN,
                             std: Sequence[float] = PE_STD,
                             resolution_schedule: ResolutionSchedule | None = None) -> CaptionDataModule:
    """Video-text shards -> batches of ``frames`` (``cfg.video_frames`` per video), ``text``, ``text_tokens``,
    ``text_mask``, ``key`` (+ ``label`` in validation when the samples have one). Call
    ``check_caption_shards(cfg, video=True)`` first."""
    size, frames, context = cfg.image_size, cfg.video_frames, cfg.context_length
    train = VideoCaptionSampleTransform(size, frames, context, min_crop_scale=cfg.min_crop_scale)
    val = VideoCaptionSampleTransform(size, frames, context, with_label=True)
    # A video without its first frame is skipped and counted as corrupt, as an image without its jpg is.
    return CaptionDataModule(cfg, train, val, seed=seed, mean=mean, std=std, required_keys=(FIRST_FRAME,),
                             resolution_schedule=resolution_schedule)


# ----------------------------------------------------------------------------------------------------
# Checks before compute, and class names for zero-shot


def _first_sample(url: str) -> dict | None:
    reader = ShardReader(required_keys=(), max_corrupt_fraction=0.0, min_samples_for_corrupt_check=1 << 30)
    samples = reader.tar_samples(reader.finite_urls([url]))
    try:
        return next(samples, None)
    finally:
        samples.close()


def _check_first_sample(url: str, name: str, video: bool) -> None:
    sample = _first_sample(url)
    if sample is None:
        raise ValueError(f"--data.{name}: shard {url} holds no readable sample. Check it with `tar tf {url}`.")
    fields = _fields(sample)
    if video and not frame_fields(sample):
        raise ValueError(
            f"--data.{name}: the first sample of {url} ({sample.get('__key__')!r}) has no video frames (fields "
            f"{fields}; expected 000.jpg, 001.jpg, ...). Point --data.{name} at video shards (`python -m "
            "datamodules.make_shards --format video`, or the synthetic world's video split), or use "
            "caption_datamodule for image-text shards.")
    if not video and "jpg" not in sample:
        hint = " It looks like a video shard: use video_caption_datamodule." if frame_fields(sample) else ""
        raise ValueError(f"--data.{name}: the first sample of {url} ({sample.get('__key__')!r}) has no 'jpg' image "
                         f"(fields {fields}).{hint}")
    if caption_of(sample) is None:
        raise ValueError(
            f"--data.{name}: the first sample of {url} ({sample.get('__key__')!r}) has no caption: no 'txt' field and "
            f"no 'caption' in its json (fields {fields}). Contrastive training needs a caption per sample: write the "
            f"shards with `python -m datamodules.make_shards --format captions` (image path + caption table), or "
            f"point --data.{name} at caption shards.")


SYNTHETIC_CAPTIONS = {"train_samples": 16384, "samples_per_shard": 512}
"""The built-in image-text data: a synthetic world (datamodules.synthetic.SyntheticWorldConfig fields) with 16K
captioned training images (2K, the other recipes' default, overfit in a few hundred contrastive steps) and the usual
256 validation images."""
SYNTHETIC_VIDEOS = {"samples_per_shard": 64, "video_samples": 320}
"""The built-in video-text data: a synthetic world whose video split is 5 shards of 64 captioned, labelled videos;
the first 4 train and the last (other scenes) validates."""


def _fill_synthetic_world(cfg: CaptionDataConfig, video: bool) -> None:
    # lazy, as in resolve_shards: only the default needs the rendering tools
    from .synthetic import SyntheticWorldConfig, ensure_synthetic_world

    world = ensure_synthetic_world(SyntheticWorldConfig(**(SYNTHETIC_VIDEOS if video else SYNTHETIC_CAPTIONS)))
    if not video:
        cfg.train_shards, cfg.val_shards = world.train_shards, cfg.val_shards or world.val_shards
        return
    *train, val = expand_shards(world.video_shards)
    cfg.train_shards, cfg.val_shards = "::".join(train), cfg.val_shards or val


def check_caption_shards(cfg: CaptionDataConfig, video: bool = False) -> None:
    """Fail before the model is built when the shards cannot feed contrastive training: the first sample of the first
    training shard (and of the first validation shard) must have a caption and an image (``video``: frames).

    With no ``--data.train_shards`` the built-in synthetic world is filled in: a world with more captioned images
    (``SYNTHETIC_CAPTIONS``), or with ``video`` the video split of a world with videos (``SYNTHETIC_VIDEOS``).
    """
    if cfg.train_shards is None:
        _fill_synthetic_world(cfg, video)
    shards = resolve_shards(cfg)
    _check_first_sample(shards[0][0], "train_shards", video)
    if len(shards) > 1:
        _check_first_sample(shards[1][0], "val_shards", video)


def _sample_metas(url: str) -> Iterator[dict]:
    """The parsed ``.json`` of each sample of a shard, read as a stream (images are skipped, not decoded); a json
    that does not parse is skipped (training counts it as corrupt)."""
    for _, raw in json_members(url):
        try:
            meta = json.loads(raw)
        except ValueError:
            continue
        if isinstance(meta, dict):
            yield meta


def _names_in_label_order(by_label: dict[int, str], where: str) -> list[str]:
    missing = sorted(set(range(max(by_label) + 1)) - set(by_label))
    if missing:
        raise ValueError(f"zero-shot class names: {where} names no class for label(s) {missing[:10]} "
                         f"({len(missing)} in all) below the largest label {max(by_label)}. Write a classes.json "
                         "{class name: label} beside the validation shards with every class.")
    return [by_label[label] for label in range(len(by_label))]


def zero_shot_classes(val_shards: str, sample_limit: int = 10_000) -> list[str] | None:
    """Class names in label order for zero-shot classification: from the classes.json beside the first validation
    shard (make_shards --format imagefolder), else from the (label, class_name) pairs in the json of the first
    ``sample_limit`` samples, shards in order (the synthetic world). None when the shards name no classes."""
    shards = expand_shards(val_shards)
    path, mapping = classes_beside(shards[0])
    if mapping:
        return _names_in_label_order({int(label): name for name, label in mapping.items()}, path)
    by_label: dict[int, str] = {}
    metas = (meta for url in shards for meta in _sample_metas(url))
    seen = 0
    try:
        for seen, meta in enumerate(itertools.islice(metas, sample_limit), 1):
            label, name = meta.get("label"), meta.get("class_name")
            if isinstance(label, int) and isinstance(name, str):
                by_label.setdefault(label, name)
    finally:
        metas.close()  # closes the shard being read
    if not by_label:
        return None
    return _names_in_label_order(by_label, f"the json of the first {seen} samples of {val_shards}")
