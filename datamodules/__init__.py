"""Data: WebDataset pipelines, transforms, the synthetic world and shard converters.

The batch dict is the contract between ``datamodules`` and ``trainers``. A LightningModule sees a
batch after ``on_after_batch_transfer`` has run on the device, so images are already float and
normalised there; on the host they travel as uint8 (4x less copy traffic).

=============  ======================================  ===========================================
key            type / shape (as the module sees it)    meaning
=============  ======================================  ===========================================
``image``      float32 ``(B, 3, H, W)``                RGB, normalised with the datamodule's
                                                       ``mean``/``std``
``label``      int64 ``(B,)``                          class index (synthetic world: primary shape)
``hashtags``   list of ``B`` lists of str              weak labels, noisy (SWAG)
``text``       list of ``B`` str                       caption
``masks``      uint8 ``(B, H, W)``                     instance-id map, 0 = background
``frames``     float32 ``(B, T, 3, H, W)``             video frames, normalised like ``image``
``prompts``    dict                                    point / box prompts (SAM)
``key``        list of ``B`` str                       WebDataset ``__key__`` of each sample
=============  ======================================  ===========================================
"""

from typing import TypedDict

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Batch(TypedDict, total=False):
    image: torch.Tensor
    label: torch.Tensor
    hashtags: list[list[str]]
    text: list[str]
    masks: torch.Tensor
    frames: torch.Tensor
    prompts: dict
    key: list[str]
