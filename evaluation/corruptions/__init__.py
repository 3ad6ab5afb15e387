"""Image corruptions for robustness evaluation: the 15 of ImageNet-C and the 10 of ImageNet-C-bar, 5 severities each.

Every corruption is ``sample_parameters(severity, rng)`` + a deterministic ``apply(image, params)`` (see
``base``). Names follow the reference repositories (hendrycks/robustness ``imagenet_c/corruptions.py``,
facebookresearch/augmentation-corruption ``imagenet_c_bar``), including their spellings.
"""

from __future__ import annotations

import numpy as np

from . import imagenet_c, imagenet_c_bar  # noqa: F401  (importing registers the corruptions)
from .base import SEVERITIES, Corruption, check_image, check_severity, get_corruption, names

IMAGENET_C: tuple[str, ...] = names("imagenet_c")
IMAGENET_C_BAR: tuple[str, ...] = names("imagenet_c_bar")


def corrupt(image: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Corrupt one uint8 (H, W, 3) image with a fresh draw of corruption ``name`` at ``severity`` (1..5)."""
    return get_corruption(name)(check_image(image), check_severity(severity), rng)


__all__ = ["IMAGENET_C", "IMAGENET_C_BAR", "SEVERITIES", "Corruption", "corrupt", "get_corruption", "names"]
