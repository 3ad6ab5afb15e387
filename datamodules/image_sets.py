"""A fixed set of images read from shards into memory, in the shards' order: what evaluation harnesses take
when they must process every image many times (corruption sweeps, MSD's transform features)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .streams import ShardReader
from .transforms import eval_pil_transform


@dataclass
class ImageSet:
    images: np.ndarray
    """uint8 (N, H, W, 3): resized (short side) and center-cropped, not normalised."""
    labels: np.ndarray
    """int64 (N,): the shards' "cls", -1 where a sample has none."""
    keys: list[str]
    """The samples' keys, in order."""

    def __len__(self) -> int:
        return len(self.keys)


def load_image_set(shards: Sequence[str], size: int, limit: int | None = None, *, desc: str = "images",
                   max_corrupt_fraction: float = 0.01, min_samples_for_corrupt_check: int = 100) -> ImageSet:
    """The first ``limit`` images (all when None) of ``shards`` read in order, with the eval transform
    (resize the short side to size / 0.875, center crop ``size``: the ImageNet-C preparation at 224)."""
    reader = ShardReader(("jpg",), max_corrupt_fraction, min_samples_for_corrupt_check)
    transform = eval_pil_transform(size)
    images, labels, keys = [], [], []
    samples = reader.decode(reader.tar_samples(ShardReader.finite_urls(shards)))
    with tqdm(samples, desc=f"reading {desc}", unit="img", total=limit, leave=False) as progress:
        for sample in progress:
            images.append(transform(sample["jpg"]).permute(1, 2, 0).numpy())
            labels.append(int(sample["cls"]) if "cls" in sample else -1)
            keys.append(sample["__key__"])
            if limit is not None and len(keys) >= limit:
                break
    if not keys:
        raise ValueError(f"No readable image in the shards {list(shards)[:3]}{' ...' if len(shards) > 3 else ''}")
    return ImageSet(np.stack(images), np.asarray(labels, dtype=np.int64), keys)
