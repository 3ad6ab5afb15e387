"""The random state of every rank, saved in checkpoints so that a resumed run draws what an uninterrupted
run would have drawn (masks, dropout, drop-path): together with the data stream's position this makes
resume exact, not just statistically equivalent.

Each rank draws its own numbers (seeded from (seed, rank), as facebookresearch/mae main_pretrain.py seeds
``seed + rank``), so the checkpoint holds one state per rank, gathered to the rank that writes it.
"""

import random

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn


def capture() -> dict:
    # numpy's key array is stored as a tensor: checkpoints must load with torch.load(weights_only=True)
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_rank(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)  # also seeds every CUDA device


class RandomStateCheckpoint(Callback):
    """Seeds each rank at the start of a new run; saves every rank's state and puts it back on resume."""

    def __init__(self, seed: int):
        self.seed = seed
        self._loaded: list[dict] | None = None

    @property
    def state_key(self) -> str:
        return "RandomStateCheckpoint"

    def state_dict(self) -> dict:
        # Called on every rank while a checkpoint is assembled, so a collective is safe here.
        mine = capture()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states: list = [None] * dist.get_world_size()
            dist.all_gather_object(states, mine)
        else:
            states = [mine]
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict) -> None:
        self._loaded = state_dict.get("ranks")

    def on_train_start(self, trainer, pl_module) -> None:
        # Applied here, after restoring and the sanity check, right before the first step draws.
        rank, world = trainer.global_rank, trainer.world_size
        if self._loaded is None:
            seed_rank(self.seed, rank)
            return
        if len(self._loaded) != world:
            rank_zero_warn(
                f"The checkpoint holds the random state of {len(self._loaded)} rank(s); this run has {world}. "
                "Reseeding each rank from (seed, rank, step): the run continues statistically equivalent, "
                "not identical to an uninterrupted one."
            )
            seed_rank(self.seed + 1_000_003 * trainer.global_step, rank)
        else:
            restore(self._loaded[rank])
        self._loaded = None
