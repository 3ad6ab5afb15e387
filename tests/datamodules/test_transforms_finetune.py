"""Fine-tuning and linear-probe transforms (facebookresearch/mae util/datasets.py:build_transform, which
main_finetune.py uses, and the transforms in main_linprobe.py:main)."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from datamodules.transforms import (finetune_train_transform, linear_probe_train_transform, posterize,
                                    rand_augment)

# timm's "inc1" op set (auto_augment.py _RAND_INCREASING_TRANSFORMS): 15 ops, magnitude-increasing variants
INCREASING = {"AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
              "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
              "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


def _sample():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    return {"__key__": "k", "jpg": image, "cls": b"3"}


def test_finetune_transform_is_rrc_flip_randaugment_then_uint8():
    transform = finetune_train_transform(32)
    out = transform(_sample())
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 32, 32) and out["label"] == 3
    crop, flip, augment, to_tensor = transform.image_transform.transforms
    assert isinstance(crop, v2.RandomResizedCrop) and crop.scale == (0.08, 1.0)
    assert crop.interpolation == InterpolationMode.BICUBIC and tuple(crop.size) == (32, 32)
    assert isinstance(flip, v2.RandomHorizontalFlip) and flip.p == 0.5
    # rand-m9-mstd0.5-inc1: two ops per image, magnitude 9 with std 0.5, from the increasing set
    assert augment.num_layers == 2 and {op.name for op in augment.ops} == INCREASING
    assert {(op.magnitude, op.magnitude_std, op.prob) for op in augment.ops} == {(9, 0.5, 0.5)}
    hparams = augment.ops[0].hparams
    # timm create_transform: translate 45% of the side, fill with round(255 * ImageNet mean), bicubic
    assert hparams["translate_const"] == int(32 * 0.45) == 14
    assert hparams["img_mean"] == (124, 116, 104)
    assert hparams["interpolation"] == Image.BICUBIC
    assert isinstance(to_tensor, v2.PILToTensor)
    pickle.dumps(transform)  # loader workers receive it pickled


def test_linear_probe_transform_and_turning_randaugment_off():
    transform = linear_probe_train_transform(24)
    crop, flip, to_tensor = transform.image_transform.transforms
    assert crop.scale == (0.08, 1.0) and crop.interpolation == InterpolationMode.BICUBIC
    assert transform(_sample())["image"].shape == (3, 24, 24)
    assert len(finetune_train_transform(24, "").image_transform.transforms) == 3
    with pytest.raises(ValueError, match="must start with 'rand'"):
        finetune_train_transform(24, "original")


def test_posterize_to_zero_bits_is_black_as_with_the_pillow_the_reference_used():
    image = _sample()["jpg"]
    assert np.asarray(posterize(image, 0)).max() == 0
    assert np.array_equal(np.asarray(posterize(image, 8)), np.asarray(image))
    assert set(np.unique(np.asarray(posterize(image, 1)))) <= {0, 128}
    # a magnitude drawn at 10 asks PosterizeIncreasing for 4 - int(10 / 10 * 4) = 0 bits
    op = next(op for op in rand_augment("rand-m9-mstd0.5-inc1", 32).ops if op.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0.0
    assert np.asarray(op(image)).max() == 0
