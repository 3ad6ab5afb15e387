"""Minimal Sample Distance between an augmentation distribution and a corruption (Mintun, Kirillov & Xie,
NeurIPS 2021; facebookresearch/augmentation-corruption minimal_sample_distance.ipynb,
experiments/feature_corrupt_error.py).

- Transform feature: f(t) = mean over a fixed image set D_S (100 unaugmented training images in the paper)
  of the feature f^(t(x)) of a network trained on clean data (its penultimate layer).
- MSD(p_a, p_c) = min over sampled augmentations a of || f(a) - mean over sampled corruptions c of f(c) ||_2.
  It is asymmetric: a minimum on the augmentation side, a mean on the corruption side.
- The baseline the reference code calls "MMD" is the distance of the means, || mean_a f(a) - mean_c f(c) ||_2,
  not a kernel MMD.

Every transform here is ``sample_parameters(rng)`` + a deterministic ``apply(image, params)``, so one sampled
augmentation or corruption is applied to all of D_S. Random PIL augmentation policies (timm's RandAugment,
AutoAugment, AugMix, a crop + flip) become such transforms by re-seeding Python's, numpy's and torch's
generators with the sampled seed before each image: the ops they draw do not depend on the image, so every
image gets the same ops and magnitudes.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from evaluation.corruptions import SEVERITIES, get_corruption
from evaluation.corruptions.base import new_seed

FeatureExtractor = Callable[[np.ndarray], Tensor]
"""uint8 images (B, H, W, 3) -> features (B, D)."""


class Transform(Protocol):
    def sample_parameters(self, rng: np.random.Generator) -> dict[str, Any]: ...
    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray: ...


# ---- distances ---------------------------------------------------------------------------------------------

def minimal_sample_distance(augmentation_features: Tensor, corruption_features: Tensor) -> float:
    """min_a || f(a) - mean_c f(c) ||_2 for transform features (A, D) and (C, D)."""
    target = corruption_features.double().mean(dim=0)
    return float((augmentation_features.double() - target).norm(dim=1).min())


def distance_of_means(augmentation_features: Tensor, corruption_features: Tensor) -> float:
    """|| mean_a f(a) - mean_c f(c) ||_2: the reference code's "MMD" baseline."""
    return float((augmentation_features.double().mean(0) - corruption_features.double().mean(0)).norm())


# ---- transform features --------------------------------------------------------------------------------------

def transform_feature(extract: FeatureExtractor, images: np.ndarray, transform: Transform,
                      params: Mapping[str, Any], batch_size: int = 128) -> Tensor:
    """f(t): the mean feature (D,) of ``images`` (uint8 (N, H, W, 3)) under one sampled transform."""
    total = None
    for i in range(0, len(images), batch_size):
        batch = np.stack([transform.apply(image, params) for image in images[i:i + batch_size]])
        summed = extract(batch).double().sum(dim=0).cpu()
        total = summed if total is None else total + summed
    return total / len(images)


def transform_features(extract: FeatureExtractor, images: np.ndarray, transform: Transform, samples: int,
                       rng: np.random.Generator, batch_size: int = 128, progress: Callable | None = None) -> Tensor:
    """(samples, D): transform features of ``samples`` independent draws of ``transform``."""
    out = []
    for _ in range(samples):
        out.append(transform_feature(extract, images, transform, transform.sample_parameters(rng), batch_size))
        if progress is not None:
            progress()
    return torch.stack(out)


# ---- the transforms ---------------------------------------------------------------------------------------

class CorruptionDistribution:
    """A corruption with its severity drawn uniformly from ``severities`` (the corruption's distribution p_c)."""

    def __init__(self, name: str, severities: Sequence[int] = SEVERITIES):
        self.corruption = get_corruption(name)
        self.severities = tuple(severities)

    def sample_parameters(self, rng: np.random.Generator) -> dict[str, Any]:
        severity = int(rng.choice(self.severities))
        return {"severity": severity, **self.corruption.sample_parameters(severity, rng)}

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        return self.corruption.apply(image, params)


class SeededAugmentation:
    """A random PIL -> PIL augmentation as a seed + a deterministic application (see the module docstring)."""

    def __init__(self, augment: Callable[[Image.Image], Image.Image], name: str = ""):
        self.augment, self.name = augment, name

    def sample_parameters(self, rng: np.random.Generator) -> dict[str, Any]:
        return {"seed": new_seed(rng)}

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        with _seeded(params["seed"]):
            out = self.augment(Image.fromarray(image))
        out = np.asarray(out.convert("RGB") if isinstance(out, Image.Image) else out, dtype=np.uint8)
        if out.shape != image.shape:
            raise ValueError(f"augmentation {self.name!r} changed the image from {image.shape} to {out.shape}; "
                             "it must keep the size (crop policies must resize back)")
        return out


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


POLICY_HELP = ("'crop_flip' (random resized crop + flip: the clean training augmentation), a timm RandAugment "
               "string ('rand-m9-mstd0.5-inc1'), AutoAugment ('original', 'v0'), AugMix ('augmix-m5-w3-d1'), "
               "or 'corruption:<name>' (an ImageNet-C / C-bar corruption at a random severity)")


def augmentation_policy(name: str, size: int) -> Transform:
    """The augmentation distribution called ``name`` on ``size`` x ``size`` images (the names: POLICY_HELP)."""
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
    from torchvision.transforms import v2

    hparams = {"translate_const": int(size * 0.45), "img_mean": (124, 116, 104)}  # timm create_transform defaults
    if name.startswith("corruption:"):
        return CorruptionDistribution(name.split(":", 1)[1])
    if name == "crop_flip":
        return SeededAugmentation(v2.Compose([v2.RandomResizedCrop(size, antialias=True),
                                              v2.RandomHorizontalFlip()]), name)
    if name.startswith("rand"):
        return SeededAugmentation(rand_augment_transform(name, hparams), name)
    if name.startswith("augmix"):
        return SeededAugmentation(augment_and_mix_transform(name, hparams), name)
    if name.split("-")[0] in ("original", "originalr", "v0", "v0r", "3a"):
        return SeededAugmentation(auto_augment_transform(name, hparams), name)
    raise ValueError(f"unknown augmentation policy {name!r}: use {POLICY_HELP}")
