"""Image and prompt transforms of SAM's image path: resize the longest side, normalise, pad; map masks back.

    from models.sam.transforms import LongestSideTransform
    tf = LongestSideTransform(1024, SAM_PIXEL_MEAN, SAM_PIXEL_STD)
    x, input_size, original_size = tf.preprocess(image)       # (1, 3, 1024, 1024), resized (h, w), original (H, W)
    coords = tf.scale_coords(points, original_size)           # pixel (x, y) of the original -> of the resized image
    masks = tf.postprocess_masks(low_res_logits, input_size, original_size)

Follows facebookresearch/segment-anything segment_anything/utils/transforms.py:ResizeLongestSide and
segment_anything/modeling/sam.py:Sam.preprocess / Sam.postprocess_masks. The reference resizes uint8 images with
PIL's bilinear filter (through torchvision's ``to_pil_image`` and ``resize``), and so does :func:`resize_image`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = [
    "SAM_PIXEL_MEAN", "SAM_PIXEL_STD", "LongestSideTransform", "resize_longest_side_size", "resize_image",
    "preprocess", "scale_coords", "scale_boxes", "postprocess_masks",
]

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
"""Per-channel RGB mean on the 0-255 scale (ImageNet's mean times 255), as segment_anything/build_sam.py."""
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
"""Per-channel RGB std on the 0-255 scale (ImageNet's std times 255)."""

def resize_longest_side_size(height: int, width: int, target: int) -> tuple[int, int]:
    """(h, w) with the longer side scaled to ``target`` and the aspect ratio kept, each side rounded half up
    (segment_anything/utils/transforms.py:ResizeLongestSide.get_preprocess_shape)."""
    scale = target * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """(C, H, W) image -> (C, h, w) at ``size`` = (h, w), bilinear with antialiasing.

    uint8 images go through PIL's ``Image.resize(..., BILINEAR)``, the reference's path (torchvision's
    ``to_pil_image`` then ``resize``), so the pixels are the reference's; torch's own antialiased uint8
    interpolation differs from PIL by a grey level on some pixels. Floating images (a batched device path) use
    torch's antialiased bilinear interpolation, which the reference's tensor path also uses.
    """
    if image.dtype == torch.uint8:
        pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
        resized = np.asarray(pil.resize((size[1], size[0]), Image.BILINEAR))
        return torch.from_numpy(resized.copy()).permute(2, 0, 1).to(image.device)
    if not image.is_floating_point():
        raise TypeError(f"resize_image takes uint8 or floating images, got {image.dtype}")
    return F.interpolate(image[None], size, mode="bilinear", align_corners=False, antialias=True)[0]


def as_chw(image: np.ndarray | Tensor | Image.Image) -> Tensor:
    """numpy HWC (SamPredictor's layout), a PIL image (SAM2ImagePredictor takes those) or torch CHW -> torch CHW,
    sharing memory where possible."""
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"numpy images are HWC with 3 channels, got shape {image.shape}")
        return torch.as_tensor(np.ascontiguousarray(image)).permute(2, 0, 1)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"torch images are CHW with 3 channels, got shape {tuple(image.shape)}")
    return image


def preprocess(
    image: np.ndarray | Tensor,
    image_size: int,
    pixel_mean: Sequence[float] = SAM_PIXEL_MEAN,
    pixel_std: Sequence[float] = SAM_PIXEL_STD,
    device: torch.device | str | None = None,
) -> tuple[Tensor, tuple[int, int], tuple[int, int]]:
    """An RGB image on the 0-255 scale -> (1, 3, image_size, image_size) float32 model input.

    ``image`` is a numpy HWC array or a torch CHW tensor, uint8 (resized exactly as the reference's PIL path) or
    float. The longer side is resized to ``image_size``, the pixels normalised, and the bottom and right padded
    with zeros after normalisation (segment_anything/modeling/sam.py:Sam.preprocess), so that pixel coordinates
    of the resized image are coordinates of the model input.

    Returns the input, ``input_size`` (the resized (h, w), i.e. the unpadded region) and ``original_size``.
    """
    chw = as_chw(image)
    if device is not None:
        chw = chw.to(device)
    original_size = (int(chw.shape[-2]), int(chw.shape[-1]))
    input_size = resize_longest_side_size(*original_size, image_size)
    if min(input_size) < 1:
        raise ValueError(f"a {original_size} image has a side under one pixel once resized to {image_size}")
    resized = resize_image(chw, input_size).float()
    mean = torch.tensor(pixel_mean, dtype=torch.float32, device=resized.device).view(-1, 1, 1)
    std = torch.tensor(pixel_std, dtype=torch.float32, device=resized.device).view(-1, 1, 1)
    x = (resized - mean) / std
    x = F.pad(x, (0, image_size - input_size[1], 0, image_size - input_size[0]))
    return x[None], input_size, original_size


def scale_coords(coords: np.ndarray | Tensor, original_size: tuple[int, int], image_size: int) -> Tensor:
    """Pixel (x, y) coordinates (..., 2) of the original image -> of the resized model input, float32.

    Scaled in float64 and rounded once, as the reference does in numpy before its float32 cast
    (ResizeLongestSide.apply_coords, SamPredictor.predict).
    """
    new_h, new_w = resize_longest_side_size(*original_size, image_size)
    coords = torch.as_tensor(coords).to(torch.float64)
    scale = coords.new_tensor([new_w / original_size[1], new_h / original_size[0]])
    return (coords * scale).to(torch.float32)


def scale_boxes(boxes: np.ndarray | Tensor, original_size: tuple[int, int], image_size: int) -> Tensor:
    """(..., 4) boxes (x0, y0, x1, y1) of the original image -> (N, 4) of the model input: both corners scaled
    by :func:`scale_coords` (ResizeLongestSide.apply_boxes)."""
    boxes = torch.as_tensor(boxes)
    return scale_coords(boxes.reshape(-1, 2, 2), original_size, image_size).reshape(-1, 4)


def postprocess_masks(
    low_res_logits: Tensor, input_size: tuple[int, int], original_size: tuple[int, int], image_size: int
) -> Tensor:
    """(B, C, h, w) decoder logits -> (B, C, H, W) logits of the original image.

    Upsampled bilinearly to the padded input, the padding cropped, then resized to ``original_size``
    (segment_anything/modeling/sam.py:Sam.postprocess_masks): the two steps keep the reference's rounding.
    Thresholding is left to the caller (SAM: logit > 0.0).
    """
    masks = F.interpolate(low_res_logits, (image_size, image_size), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class LongestSideTransform:
    """SAM's image transform bound to one model size: what :class:`models.sam.sam.ImagePredictor` calls.

    Another model's image path (e.g. one that resizes to a square) can hand the predictor any object with the
    same four methods.
    """

    image_size: int = 1024
    """Side of the square model input; the longer image side is resized to it."""
    pixel_mean: tuple[float, ...] = SAM_PIXEL_MEAN
    """Per-channel mean subtracted from 0-255 RGB pixels."""
    pixel_std: tuple[float, ...] = SAM_PIXEL_STD
    """Per-channel std the centred pixels are divided by."""

    def preprocess(self, image: np.ndarray | Tensor, device: torch.device | str | None = None):
        """See :func:`preprocess`."""
        return preprocess(image, self.image_size, self.pixel_mean, self.pixel_std, device)

    def scale_coords(self, coords: np.ndarray | Tensor, original_size: tuple[int, int]) -> Tensor:
        """See :func:`scale_coords`."""
        return scale_coords(coords, original_size, self.image_size)

    def scale_boxes(self, boxes: np.ndarray | Tensor, original_size: tuple[int, int]) -> Tensor:
        """See :func:`scale_boxes`."""
        return scale_boxes(boxes, original_size, self.image_size)

    def postprocess_masks(self, low_res_logits: Tensor, input_size: tuple[int, int],
                          original_size: tuple[int, int]) -> Tensor:
        """See :func:`postprocess_masks`."""
        return postprocess_masks(low_res_logits, input_size, original_size, self.image_size)
