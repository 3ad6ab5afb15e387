"""The contract every corruption keeps, and the registry that names them.

A corruption is split in two, as in facebookresearch/augmentation-corruption (imagenet_c_bar/base.py):
``sample_parameters(severity, rng)`` draws everything random once (plain Python numbers and seeds, no
arrays that depend on the image size), and ``apply(image, params)`` is a deterministic function of the
image and those parameters. One draw can therefore be applied to many images, which is what the Minimal
Sample Distance's transform feature needs, and a corrupted evaluation set is reproducible from its seed.

Images are uint8 numpy arrays of shape (H, W, 3); ``apply`` returns the same shape and dtype. Intermediate
values are clipped to [0, 255] and truncated to uint8, as the reference generators do with ``np.uint8``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import numpy as np

Family = Literal["imagenet_c", "imagenet_c_bar"]
SEVERITIES = (1, 2, 3, 4, 5)


class Corruption:
    """One corruption type. Subclasses set ``name`` and ``family`` and implement the two methods."""

    name: ClassVar[str]
    family: ClassVar[Family]

    def sample_parameters(self, severity: int, rng: np.random.Generator) -> dict[str, Any]:
        """Everything random for one application at ``severity`` (1..5), as plain numbers and seeds."""
        raise NotImplementedError

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        """Corrupt ``image`` (uint8, (H, W, 3)) with ``params``; deterministic, same shape and dtype."""
        raise NotImplementedError

    def __call__(self, image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
        return self.apply(image, self.sample_parameters(check_severity(severity), rng))

    def __repr__(self) -> str:
        return f"<corruption {self.name} ({self.family})>"


_REGISTRY: dict[str, Corruption] = {}


def register(cls: type[Corruption]) -> type[Corruption]:
    """Class decorator: add one instance of ``cls`` to the registry under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"corruption {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def get_corruption(name: str) -> Corruption:
    """The registered corruption called ``name``; an unknown name is an error that suggests close names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown corruption {name!r}.{hint} Known: {', '.join(sorted(_REGISTRY))}") from None


def names(family: Family | None = None) -> tuple[str, ...]:
    """Registered corruption names (of one family, or all), in registration order."""
    return tuple(n for n, c in _REGISTRY.items() if family is None or c.family == family)


def check_severity(severity: int) -> int:
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    return int(severity)


def check_image(image: np.ndarray) -> np.ndarray:
    """Refuse anything but a uint8 (H, W, 3) array, with a message that says how to convert."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}"
        raise ValueError(f"corruptions take uint8 numpy images of shape (H, W, 3); got {got}. "
                         "Convert with np.asarray(pil_image.convert('RGB')).")
    return image


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Clip to [0, 255] and truncate, as the reference generators' ``np.uint8(np.clip(x, 0, 255))``."""
    return np.clip(x, 0, 255).astype(np.uint8)


def new_seed(rng: np.random.Generator) -> int:
    """A seed for the randomness ``apply`` needs at the image's size (noise fields, fractals, sparkles).

    Drawn below 2**31 so that it is a valid seed everywhere (augmentation-corruption#5: 2**32 overflows
    32-bit integers on some platforms).
    """
    return int(rng.integers(0, 2**31 - 1))
