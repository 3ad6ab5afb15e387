"""The batch dict: the contract between ``datamodules`` (which produce batches) and ``trainers`` (whose methods
consume them). Dependency-free apart from torch, so that both sides import it and neither imports the other.

A method sees a batch after ``on_after_batch_transfer`` has run on the device: images and frames are float and
normalised there; on the host they travel as uint8 (4x less copy traffic). Each method declares the keys it
reads (``Method.batch_keys``); ``check_batch`` says where a batch breaks the contract.

================  =====================  ====================================  =====================================
key               dtype                  shape (as the method sees it)          meaning
================  =====================  ====================================  =====================================
``image``         float32 / bf16         ``(B, 3, H, W)``                       RGB, normalised with the datamodule's
                                                                                ``mean`` / ``std``
``label``         int64                  ``(B,)``                               class index
``hashtags``      list of B lists of str                                        weak labels, noisy (SWAG)
``text``          list of B str                                                 caption
``text_tokens``   int64                  ``(B, L)``                             tokenised caption, padded to L
``text_mask``     bool                   ``(B, L)``                             True on real tokens, False on padding
``masks``         uint8                  ``(B, H, W)``                          instance-id map, 0 = background
``frames``        float32 / bf16         ``(B, T, 3, H, W)``                    video frames, normalised like image
``frame_masks``   uint8                  ``(B, T, H, W)``                       per-frame instance-id maps
``frame_valid``   bool                   ``(B, T)``                             the frame's annotation exists
``prompts``       dict of tensors        ``points (B, N, 2)`` float (x, y       SAM-style prompts; a point label is 1
                                         pixels), ``point_labels (B, N)``       (foreground), 0 (background) or -1
                                         int64, ``boxes (B, 4)`` float          (padding); boxes are x0, y0, x1, y1
``media``         float32 / bf16         ``(M, 3, S, S)``                       every tile, thumbnail and video frame
                                                                                of the batch, in the order of the
                                                                                image placeholders of input_ids
``input_ids``     int64                  ``(B, L)``                             chat-formatted token ids, right-padded,
                                                                                one image placeholder per visual token
``attention_mask`` bool                  ``(B, L)``                             True on real tokens, False on padding
``labels``        int64                  ``(B, L)``                             the token to predict at each position
                                                                                (-100: none; assistant turns only)
``key``           list of B str                                                 WebDataset ``__key__`` of each sample
================  =====================  ====================================  =====================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

import torch

# The normalisation every datamodule applies to ``image`` and ``frames`` (torchvision's ImageNet statistics); a
# model evaluated outside a datamodule (evaluation.model) must apply the same.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = -100
"""``labels`` at a position without a target (``torch.nn.functional.cross_entropy``'s default ignore_index)."""


class Prompts(TypedDict, total=False):
    points: torch.Tensor
    point_labels: torch.Tensor
    boxes: torch.Tensor


class Batch(TypedDict, total=False):
    image: torch.Tensor
    label: torch.Tensor
    hashtags: list[list[str]]
    text: list[str]
    text_tokens: torch.Tensor
    text_mask: torch.Tensor
    masks: torch.Tensor
    frames: torch.Tensor
    frame_masks: torch.Tensor
    frame_valid: torch.Tensor
    media: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    prompts: Prompts
    key: list[str]


@dataclass(frozen=True)
class TensorKey:
    dtypes: tuple[torch.dtype, ...]
    dims: tuple[str, ...]
    """Names of the dimensions; "B" is the batch, a name used twice in one batch must have one size."""


@dataclass(frozen=True)
class ListKey:
    item: type
    """Type of each of the B items (``list`` for a list per sample)."""


FLOAT = (torch.float32, torch.bfloat16, torch.float16)

KEYS: dict[str, TensorKey | ListKey] = {
    "image": TensorKey(FLOAT, ("B", "C", "H", "W")),
    "label": TensorKey((torch.int64,), ("B",)),
    "hashtags": ListKey(list),
    "text": ListKey(str),
    "text_tokens": TensorKey((torch.int64,), ("B", "L")),
    "text_mask": TensorKey((torch.bool,), ("B", "L")),
    "masks": TensorKey((torch.uint8,), ("B", "H", "W")),
    "frames": TensorKey(FLOAT, ("B", "T", "C", "H", "W")),
    "frame_masks": TensorKey((torch.uint8,), ("B", "T", "H", "W")),
    "frame_valid": TensorKey((torch.bool,), ("B", "T")),
    "media": TensorKey(FLOAT, ("M", "C", "S", "S")),
    "input_ids": TensorKey((torch.int64,), ("B", "L")),
    "attention_mask": TensorKey((torch.bool,), ("B", "L")),
    "labels": TensorKey((torch.int64,), ("B", "L")),
    "key": ListKey(str),
}
PROMPT_KEYS: dict[str, TensorKey] = {
    "points": TensorKey(FLOAT, ("B", "N", "P")),
    "point_labels": TensorKey((torch.int64,), ("B", "N")),
    "boxes": TensorKey(FLOAT, ("B", "X")),
}


def check_batch(batch: dict, keys: tuple[str, ...] | list[str]) -> list[str]:
    """Where ``batch`` breaks the contract for ``keys`` (missing, wrong type, dtype, rank or batch size), in
    sentences; empty when it keeps it. Only the keys asked for are checked."""
    problems: list[str] = []
    sizes: dict[str, int] = {}
    for name in keys:
        if name not in batch:
            problems.append(f"{name!r} is missing (the batch has {sorted(batch)})")
        elif name == "prompts":
            for sub, spec in PROMPT_KEYS.items():
                if sub in batch[name]:
                    problems += _check_tensor(f"prompts.{sub}", batch[name][sub], spec, sizes)
        elif name not in KEYS:
            problems.append(f"{name!r} is not a key of the batch contract ({', '.join(KEYS)}, prompts)")
        elif isinstance(KEYS[name], ListKey):
            problems += _check_list(name, batch[name], KEYS[name], sizes)
        else:
            problems += _check_tensor(name, batch[name], KEYS[name], sizes)
    return problems


def _check_size(where: str, dim: str, size: int, sizes: dict[str, int]) -> list[str]:
    if sizes.setdefault(dim, size) != size:
        return [f"{where}: dimension {dim} is {size}, elsewhere in the batch {sizes[dim]}"]
    return []


def _check_tensor(name: str, value, spec: TensorKey, sizes: dict[str, int]) -> list[str]:
    if not isinstance(value, torch.Tensor):
        return [f"{name!r} should be a tensor, is a {type(value).__name__}"]
    if value.dtype not in spec.dtypes:
        return [f"{name!r} should be {' or '.join(map(str, spec.dtypes))}, is {value.dtype}"]
    if value.ndim != len(spec.dims):
        return [f"{name!r} should have shape ({', '.join(spec.dims)}), has {tuple(value.shape)}"]
    problems: list[str] = []
    for dim, size in zip(spec.dims, value.shape):
        if dim in ("B", "T", "L", "N", "H", "W"):
            problems += _check_size(name, dim, size, sizes)
    return problems


def _check_list(name: str, value, spec: ListKey, sizes: dict[str, int]) -> list[str]:
    if not isinstance(value, (list, tuple)):
        return [f"{name!r} should be a list of {spec.item.__name__}, is a {type(value).__name__}"]
    wrong = [type(v).__name__ for v in value if not isinstance(v, spec.item)]
    if wrong:
        return [f"{name!r} should hold {spec.item.__name__} items, holds {sorted(set(wrong))}"]
    return _check_size(name, "B", len(value), sizes)
