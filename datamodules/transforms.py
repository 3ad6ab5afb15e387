"""Task transforms: a decoded WebDataset sample (dict with a PIL image under ``"jpg"``) -> batch entries.

Images leave the host as uint8 ``(3, H, W)`` tensors and are converted to float and normalised on the
device (``normalize_on_device``, called from the datamodule's ``on_after_batch_transfer``): the copy is
4x smaller and the GPU does the arithmetic for free.

Geometric augmentation runs on the PIL image (as facebookresearch/mae main_pretrain.py does) and only
then becomes a tensor, so the bicubic resampling is PIL's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import InterpolationMode, v2

BICUBIC = InterpolationMode.BICUBIC

# MAE pre-training augmentation: RandomResizedCrop(224, scale=(0.2, 1.0), bicubic) + horizontal flip
# (He et al. 2022; facebookresearch/mae main_pretrain.py). Aspect ratio range is torchvision's default.
MAE_CROP_SCALE = (0.2, 1.0)


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
    """

    def __init__(self, image_transform: Callable):
        self.image_transform = image_transform

    def __call__(self, sample: dict) -> dict:
        out = {"image": self.image_transform(sample["jpg"]).as_subclass(torch.Tensor), "key": sample["__key__"]}
        if "cls" in sample:
            out["label"] = int(sample["cls"])
        return out


def mae_train_transform(size: int) -> Callable[[dict], dict]:
    """Sample -> ``{"image": uint8 (3, size, size), "label": int (if the sample has "cls"), "key": str}``."""
    return SampleTransform(mae_train_pil_transform(size))


def eval_transform(size: int) -> Callable[[dict], dict]:
    """Sample -> same keys as ``mae_train_transform``, deterministic resize + center crop."""
    return SampleTransform(eval_pil_transform(size))


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
