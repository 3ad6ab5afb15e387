"""Task transforms: shapes and dtypes, the crop-area range of MAE's RandomResizedCrop, eval geometry,
and on-device normalisation against hand computations."""

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import IMAGENET_MEAN, IMAGENET_STD
from datamodules.transforms import (
    eval_resize_size,
    eval_transform,
    mae_train_pil_transform,
    mae_train_transform,
    normalize_on_device,
)


def _ramp_image(width: int, height: int, sx: int, sy: int) -> Image.Image:
    """R = sx * x, G = sy * y, B = 0: the colour of a pixel tells where it came from."""
    x = np.arange(width)[None, :].repeat(height, 0)
    y = np.arange(height)[:, None].repeat(width, 1)
    rgb = np.stack([sx * x, sy * y, np.zeros_like(x)], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def _sample(image, **extra):
    return {"__key__": "k0", "jpg": image, **extra}


@pytest.mark.parametrize("size, expected", [(224, 256), (64, 73), (32, 36), (256, 256), (384, 384)])
def test_eval_resize_size(size, expected):
    # int(size / (224/256)) for size <= 224: 224 -> 256, 64 -> int(73.14) = 73, 32 -> int(36.57) = 36;
    # crop_pct = 1 above 224 (facebookresearch/mae util/datasets.py).
    assert eval_resize_size(size) == expected


def test_train_transform_output():
    out = mae_train_transform(16)(_sample(Image.new("RGB", (40, 30), (10, 20, 30)), cls=7))
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 16, 16)
    assert type(out["image"]) is torch.Tensor
    assert out["label"] == 7 and out["key"] == "k0"
    # A flat colour stays that colour under any crop, flip and bicubic resize.
    assert torch.equal(out["image"], torch.tensor([10, 20, 30], dtype=torch.uint8).view(3, 1, 1).expand(3, 16, 16))


def test_transforms_omit_label_without_cls():
    for transform in (mae_train_transform(8), eval_transform(8)):
        out = transform(_sample(Image.new("RGB", (12, 9))))
        assert set(out) == {"image", "key"}


def test_random_resized_crop_area_lies_in_mae_scale_range():
    """Crop a coordinate ramp and read back each crop's width and height from the colours.

    Input 256x256 with R = x, G = y; output 32x32. Away from the border (where bicubic support is
    clipped) the output is the ramp sampled at the crop: output column j sits at x0 + (j + 0.5) w / 32
    - 0.5, so R[24] - R[8] = 16 w / 32 = w / 2 (a flip only changes the sign).
    """
    torch.manual_seed(0)
    transform = mae_train_pil_transform(32)
    image = _ramp_image(256, 256, 1, 1)
    fractions = []
    for _ in range(150):
        out = transform(image).to(torch.float64)
        width = 2 * (out[0, 8:24, 24] - out[0, 8:24, 8]).abs().mean().item()
        height = 2 * (out[1, 24, 8:24] - out[1, 8, 8:24]).abs().mean().item()
        fractions.append(width * height / 256**2)
    # scale=(0.2, 1.0): the area of every crop is 20-100% of the image (uint8 rounding: +-2%).
    assert min(fractions) >= 0.2 - 0.02
    assert max(fractions) <= 1.0 + 0.02
    # ... and the range is used: torchvision's default (0.08, 1) would put ~13% of crops below 0.2;
    # a fixed crop would not spread.
    assert min(fractions) < 0.35 and max(fractions) > 0.85


def test_eval_geometry_on_a_ramp():
    """size 32: short side -> 36 (int(32 * 256/224)), center crop 32.

    Input 108 x 72 (W x H) with R = 2x, G = 3y. Resize scale 36/72 = 0.5 -> 54 x 36; the crop starts at
    left = (54 - 32) / 2 = 11, top = (36 - 32) / 2 = 2. Output pixel (i, j) therefore samples the input at
    x = 2 (11 + j + 0.5) - 0.5 = 22.5 + 2 j and y = 2 (2 + i + 0.5) - 0.5 = 4.5 + 2 i, so (away from the
    crop border, where bicubic support is clipped) R = 45 + 4 j and G = 13.5 + 6 i.
    """
    out = eval_transform(32)(_sample(_ramp_image(108, 72, 2, 3), cls=3))
    image = out["image"]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and out["label"] == 3
    j = torch.arange(8, 24, dtype=torch.float64)
    r = image[0, 8:24, 8:24].to(torch.float64)
    g = image[1, 8:24, 8:24].to(torch.float64)
    assert torch.allclose(r, (45 + 4 * j)[None, :].expand(16, 16), atol=1.0)
    assert torch.allclose(g, (13.5 + 6 * j)[:, None].expand(16, 16), atol=1.0)


def test_eval_transform_is_deterministic():
    image = _ramp_image(50, 40, 3, 4)
    assert torch.equal(eval_transform(16)(_sample(image))["image"], eval_transform(16)(_sample(image))["image"])


def test_normalize_on_device_by_hand():
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2).contiguous()
    out = normalize_on_device(images, IMAGENET_MEAN, IMAGENET_STD)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 2, 2)
    # channel 0: (0/255 - 0.485) / 0.229; channel 1: (51/255 - 0.456) / 0.224 = (0.2 - 0.456) / 0.224;
    # channel 2: (255/255 - 0.406) / 0.225.
    expected = torch.tensor([-0.485 / 0.229, (0.2 - 0.456) / 0.224, (1 - 0.406) / 0.225])
    assert torch.allclose(out[1, :, 1, 0], expected, atol=1e-6)


def test_normalize_on_device_handles_frames():
    frames = torch.full((2, 4, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize_on_device(frames, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    # (1 - 0.5) / std per channel
    assert torch.allclose(out[1, 3, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))


def test_normalize_on_device_rejects_float_and_bad_shapes():
    with pytest.raises(TypeError, match="uint8"):
        normalize_on_device(torch.zeros(1, 3, 2, 2), IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match="shape"):
        normalize_on_device(torch.zeros(1, 4, 2, 2, dtype=torch.uint8), IMAGENET_MEAN, IMAGENET_STD)
