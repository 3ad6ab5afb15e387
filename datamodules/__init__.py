"""Data: WebDataset pipelines, transforms, the synthetic world and shard converters.

What a datamodule's batches hold is the batch contract (``batch_contract``: keys, dtypes and shapes), which the
methods in ``trainers`` read too.
"""

from batch_contract import Batch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = ["Batch", "IMAGENET_MEAN", "IMAGENET_STD"]
