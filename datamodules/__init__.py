"""Data: WebDataset pipelines, transforms, the synthetic world and shard converters.

What a datamodule's batches hold is the batch contract (``batch_contract``: keys, dtypes and shapes), which the
methods in ``trainers`` read too.
"""

from batch_contract import IMAGENET_MEAN, IMAGENET_STD, Batch

__all__ = ["Batch", "IMAGENET_MEAN", "IMAGENET_STD"]
