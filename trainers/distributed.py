"""Collectives the methods share outside the training step."""

from __future__ import annotations

import torch.distributed as dist


def gather_objects(local: list) -> list:
    """Every rank's picklable records, concatenated in rank order; every rank must call it (validation only: one
    collective per epoch). Without a process group, or with one rank, ``local`` itself."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    parts: list[list | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return [record for part in parts for record in part]
