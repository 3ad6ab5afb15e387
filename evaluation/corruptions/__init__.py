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
FAMILIES: dict[str, tuple[str, ...]] = {"all": IMAGENET_C + IMAGENET_C_BAR, "imagenet_c": IMAGENET_C,
                                        "imagenet_c_bar": IMAGENET_C_BAR}
"""The names a corruption list (``parse_names``) may use for a whole family."""


def corrupt(image: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Corrupt one uint8 (H, W, 3) image with a fresh draw of corruption ``name`` at ``severity`` (1..5)."""
    return get_corruption(name)(check_image(image), check_severity(severity), rng)


def parse_names(spec: str, choices: dict[str, tuple[str, ...]] = FAMILIES) -> list[str]:
    """'all', a family name, or comma-separated names and families -> corruption names, in order, once each."""
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        out += choices.get(part, (part,))
    return list(dict.fromkeys(out))


__all__ = ["FAMILIES", "IMAGENET_C", "IMAGENET_C_BAR", "SEVERITIES", "Corruption", "corrupt", "get_corruption",
           "names", "parse_names"]
