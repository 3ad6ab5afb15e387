"""Task transforms: a decoded WebDataset sample (dict with a PIL image under ``"jpg"``) -> batch entries.

Images leave the host as uint8 ``(3, H, W)`` tensors and are converted to float and normalised on the
device (``normalize_on_device``, called from the datamodule's ``on_after_batch_transfer``): the copy is
4x smaller and the GPU does the arithmetic for free.

Geometric augmentation runs on the PIL image (as facebookresearch/mae main_pretrain.py does) and only
then becomes a tensor, so the bicubic resampling is PIL's. Geometry-only transforms also carry a description of what
they do (``SampleTransform.geometry``), from which ``--data.decode device`` redoes them on the training device
(``datamodules/device_decode.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import ImageOps
from torchvision.transforms import InterpolationMode, v2

from . import IMAGENET_MEAN

BICUBIC = InterpolationMode.BICUBIC

# MAE pre-training augmentation: RandomResizedCrop(224, scale=(0.2, 1.0), bicubic) + horizontal flip
# (He et al. 2022; facebookresearch/mae main_pretrain.py). Aspect ratio range is torchvision's default.
MAE_CROP_SCALE = (0.2, 1.0)
# Fine-tuning and linear probing crop harder: scale (0.08, 1), torchvision's default (mae main_finetune.py via
# timm create_transform; main_linprobe.py RandomResizedCrop(224, interpolation=3)).
FINETUNE_CROP_SCALE = (0.08, 1.0)
# MAE fine-tuning's RandAugment (FINETUNE.md): 2 ops, magnitude 9 with std 0.5, the "increasing" op set.
RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
# torchvision RandomResizedCrop's default aspect-ratio range, which every crop above uses.
CROP_RATIO = (3 / 4, 4 / 3)


# ----------------------------------------------------------------------------------------------------
# Geometry descriptions: what a geometry-only image transform does, in numbers, so that the datamodule can run
# it elsewhere (decode="device": the crop is drawn in the loader worker, decode and resampling run on the GPU).


@dataclass(frozen=True)
class RandomResizedCropFlip:
    """RandomResizedCrop(size, scale, ratio, bicubic, antialias) then a horizontal flip with probability
    ``flip_p``, the crop drawn as torchvision draws it (RandomResizedCrop.get_params)."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = CROP_RATIO
    flip_p: float = 0.5


@dataclass(frozen=True)
class ResizeCenterCrop:
    """Resize the short side to ``resize`` (bicubic, antialias), then crop the central ``size`` x ``size``."""

    size: int
    resize: int


Geometry = RandomResizedCropFlip | ResizeCenterCrop


def eval_resize_size(size: int) -> int:
    """Short side to resize to before the center crop: ``int(size / crop_pct)``.

    crop_pct = 224/256 for size <= 224, else 1.0 (facebookresearch/mae util/datasets.py build_transform).
    """
    crop_pct = 224 / 256 if size <= 224 else 1.0
    return int(size / crop_pct)


def _image_to_uint8() -> v2.Transform:
    # PILToTensor keeps uint8 and returns a plain tensor (no float conversion, no scaling).
    return v2.PILToTensor()


def mae_train_pil_transform(size: int) -> v2.Compose:
    """The image part of the MAE train transform: PIL image -> uint8 ``(3, size, size)`` tensor."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=MAE_CROP_SCALE, interpolation=BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
            _image_to_uint8(),
        ]
    )


def rand_augment(config: str, size: int, mean: Sequence[float] = IMAGENET_MEAN):
    """timm's RandAugment on PIL images with the settings timm's ``create_transform`` gives it (which MAE
    fine-tuning uses): translations up to 45% of the side, fill with the mean colour, bicubic resampling."""
    from timm.data.auto_augment import posterize as timm_posterize  # lazy: timm is only needed for fine-tuning
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.transforms import str_to_pil_interp

    if not config.startswith("rand"):
        raise ValueError(f"RandAugment config {config!r} must start with 'rand', e.g. {RAND_AUGMENT!r} "
                         "(timm auto_augment syntax); use an empty string to turn it off.")
    hparams = {"translate_const": int(size * 0.45), "img_mean": tuple(min(255, round(255 * m)) for m in mean),
               "interpolation": str_to_pil_interp("bicubic")}
    augment = rand_augment_transform(config, hparams)
    for op in augment.ops:
        if op.aug_fn is timm_posterize:
            op.aug_fn = posterize
    return augment


def posterize(image, bits_to_keep: int, **_):
    """timm's posterize op, also at 0 bits: a magnitude drawn above 9.5 ("mstd0.5") asks PosterizeIncreasing for
    0 bits, which Pillow >= 12 refuses; older Pillow, as the reference ran with, masks every bit: a black image."""
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return image.point(lambda _: 0)
    return ImageOps.posterize(image, bits_to_keep)


def finetune_train_pil_transform(size: int, rand_augment_config: str | None = RAND_AUGMENT) -> v2.Compose:
    """MAE fine-tuning's host-side augmentation: RandomResizedCrop(size, (0.08, 1), bicubic) + flip +
    RandAugment -> uint8 ``(3, size, size)``. Normalisation and random erasing follow on the device
    (timm applies erasing after Normalize too, so it erases in normalised units)."""
    steps = [v2.RandomResizedCrop(size, scale=FINETUNE_CROP_SCALE, interpolation=BICUBIC, antialias=True),
             v2.RandomHorizontalFlip()]
    if rand_augment_config:
        steps.append(rand_augment(rand_augment_config, size))
    return v2.Compose([*steps, _image_to_uint8()])


def linear_probe_train_pil_transform(size: int) -> v2.Compose:
    """MAE linear probing's augmentation: RandomResizedCrop(size, (0.08, 1), bicubic) + flip -> uint8."""
    return finetune_train_pil_transform(size, rand_augment_config=None)


def eval_pil_transform(size: int) -> v2.Compose:
    """The image part of the eval transform: resize short side, center crop, uint8 tensor."""
    return v2.Compose(
        [
            v2.Resize(eval_resize_size(size), interpolation=BICUBIC, antialias=True),
            v2.CenterCrop(size),
            _image_to_uint8(),
        ]
    )


class SampleTransform:
    """Decoded sample -> ``{"image": uint8 (3, H, W), "label": int (if the sample has "cls"), "key": str}``.

    A class rather than a closure so that the datasets holding it pickle (spawned DataLoader workers).
    ``geometry`` describes ``image_transform`` when it is geometry-only (what ``--data.decode device`` needs);
    None when it does pixel work a crop and resize cannot express (RandAugment).
    """

    def __init__(self, image_transform: Callable, geometry: Geometry | None = None):
        self.image_transform = image_transform
        self.geometry = geometry

    def __call__(self, sample: dict) -> dict:
        out = {"image": self.image_transform(sample["jpg"]).as_subclass(torch.Tensor), "key": sample["__key__"]}
        if "cls" in sample:
            out["label"] = int(sample["cls"])
        return out


def mae_train_transform(size: int) -> Callable[[dict], dict]:
    """Sample -> ``{"image": uint8 (3, size, size), "label": int (if the sample has "cls"), "key": str}``."""
    return SampleTransform(mae_train_pil_transform(size), RandomResizedCropFlip(size, MAE_CROP_SCALE))


def eval_transform(size: int) -> Callable[[dict], dict]:
    """Sample -> same keys as ``mae_train_transform``, deterministic resize + center crop."""
    return SampleTransform(eval_pil_transform(size), ResizeCenterCrop(size, eval_resize_size(size)))


def finetune_train_transform(size: int, rand_augment_config: str | None = RAND_AUGMENT) -> Callable[[dict], dict]:
    """Sample -> ``{"image": uint8, "label", "key"}`` with MAE fine-tuning's augmentation (no erasing: device).
    Without RandAugment (an empty config) it is geometry-only and so also runs under ``--data.decode device``."""
    geometry = None if rand_augment_config else RandomResizedCropFlip(size, FINETUNE_CROP_SCALE)
    return SampleTransform(finetune_train_pil_transform(size, rand_augment_config), geometry)


def linear_probe_train_transform(size: int) -> Callable[[dict], dict]:
    """Sample -> ``{"image": uint8, "label", "key"}`` with MAE linear probing's augmentation."""
    return SampleTransform(linear_probe_train_pil_transform(size), RandomResizedCropFlip(size, FINETUNE_CROP_SCALE))


def normalize_on_device(
    images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 ``(..., 3, H, W)`` in [0, 255] -> float32 ``(x / 255 - mean) / std``, on the tensor's device.

    Works for images ``(B, 3, H, W)`` and video frames ``(B, T, 3, H, W)`` alike.
    """
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"normalize_on_device expects uint8 images, got {images_uint8.dtype}")
    if images_uint8.ndim < 3 or images_uint8.shape[-3] != len(mean):
        raise ValueError(
            f"normalize_on_device expects (..., {len(mean)}, H, W) images, got shape {tuple(images_uint8.shape)}"
        )
    device = images_uint8.device
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)
    # Fold /255 into the affine map: one multiply-add per pixel instead of three ops.
    scale = 1.0 / (255.0 * std_t)
    shift = -mean_t / std_t
    return images_uint8.to(torch.float32) * scale + shift
