"""A LightningDataModule over WebDataset shards: resampled training stream, finite validation stream.

The streams and the loader live in ``datamodules/streams.py``; this module validates the config and
the shard specs before training, sizes the epoch, and normalises images on the device.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from . import IMAGENET_MEAN, IMAGENET_STD
from .device_decode import decode_batch, device_transform
from .shards import expand_shards
from .streams import CorruptDataError, FiniteShardStream, ResampledShardStream, ShardLoader, finite_split
from .transforms import normalize_on_device

__all__ = ["CorruptDataError", "DataConfig", "ShardedDataModule", "resolve_shards"]


@dataclass
class DataConfig:
    train_shards: str | None = None
    """Training shards: path, directory, glob, {000..099} braces, fsspec URL, or several joined with '::'.
    None: the built-in synthetic world (the recipe writes it and fills this in)."""
    val_shards: str | None = None
    """Validation shards, same forms as train_shards. None: no validation."""
    batch_size: int = 32
    """Samples per batch on each device (the global batch is batch_size x world size x accumulation)."""
    num_workers: int = 2
    """DataLoader worker processes per device; 0 reads in the training process."""
    image_size: int = 64
    """Side of the square images the transforms produce, in pixels."""
    shuffle_buffer: int = 1000
    """Samples held in each worker's shuffle buffer; 0 or 1 turns sample shuffling off."""
    batches_per_epoch: int | None = None
    """Training batches per rank per epoch. None: num_samples // (batch_size x world size) from the
    shard index ({prefix}-index.json next to the shards); an error if there is no index."""
    val_batches: int | None = None
    """Cap on validation batches per rank. None: read every validation shard once."""
    max_corrupt_fraction: float = 0.01
    """Fail when more than this fraction of the samples read from a shard are corrupt (bad image,
    missing key, unreadable tar member); below it, corrupt samples are skipped and counted."""
    min_samples_for_corrupt_check: int = 100
    """Samples to read from a shard before max_corrupt_fraction is enforced (avoids failing on the
    first bad sample of a shard)."""
    decode: Literal["host", "device"] = "host"
    """Where images are decoded. host: loader workers decode with PIL and crop (any transform). device: workers
    read only the JPEG header and draw the crop; the batch's JPEGs are decoded on the training device (batched
    nvJPEG on CUDA) and cropped and resized there, for trainers whose GPU step outruns the CPU (MAE
    pre-training). Needs a geometry-only transform (MAE train, linear probe, eval), not fine-tuning's RandAugment."""

    def __post_init__(self) -> None:
        positive = {"batch_size": self.batch_size, "image_size": self.image_size}
        positive |= {"batches_per_epoch": self.batches_per_epoch, "val_batches": self.val_batches}
        for name, value in positive.items():
            if value is not None and value < 1:
                raise ValueError(f"DataConfig.{name} must be >= 1, got {value} (--data.{name})")
        for name in ("num_workers", "shuffle_buffer", "min_samples_for_corrupt_check"):
            if getattr(self, name) < 0:
                raise ValueError(f"DataConfig.{name} must be >= 0, got {getattr(self, name)} (--data.{name})")
        if self.decode not in ("host", "device"):
            raise ValueError(f"DataConfig.decode must be 'host' or 'device', got {self.decode!r} (--data.decode)")
        if not 0.0 <= self.max_corrupt_fraction < 1.0:
            raise ValueError(
                f"DataConfig.max_corrupt_fraction must be in [0, 1), got {self.max_corrupt_fraction} "
                "(--data.max_corrupt_fraction)"
            )


def resolve_shards(cfg: DataConfig) -> list[list[str]]:
    """Fill in the built-in synthetic world (built once and cached) when no training shards are given, and
    expand every spec: a spec that matches nothing fails here, named, before any model or Trainer is built.
    Returns the expanded training and (if any) validation shard lists."""
    if cfg.train_shards is None:
        from .synthetic import ensure_synthetic_world  # lazy: rendering tools are only needed for the default

        world = ensure_synthetic_world()
        cfg.train_shards, cfg.val_shards = world.train_shards, cfg.val_shards or world.val_shards
    return [expand_shards(spec) for spec in (cfg.train_shards, cfg.val_shards) if spec]


# ----------------------------------------------------------------------------------------------------
# The datamodule


class ShardedDataModule(LightningDataModule):
    """WebDataset shards -> batch dicts (see ``datamodules/__init__.py`` for the keys).

    ``required_keys`` are the sample fields without which a sample is skipped as corrupt.
    ``train_sample_filter(raw_sample, epoch) -> bool`` drops training samples before they are decoded (e.g.
    datamodules.hashtags.HashtagResampler); it must be deterministic so that a resume continues exactly.
    ``world_size``/``rank`` may be set on the instance to override what the trainer or
    torch.distributed report (tests, tools that build streams for another rank).

    With ``cfg.decode == "device"`` (see ``datamodules/device_decode.py``) the transforms must describe their
    geometry (``transforms.SampleTransform.geometry``), checked at ``setup()``; the JPEGs are decoded in
    ``on_after_batch_transfer`` on ``decode_device`` when set, else the trainer's device, else the device of the
    batch's tensors (CPU when it has none). A JPEG that fails to decode there is replaced by another sample of its
    batch, warned about with its key, and counted in ``device_decode_failures``; past ``max_corrupt_fraction`` of
    the images decoded (after ``min_samples_for_corrupt_check``) the run stops with CorruptDataError.
    """

    def __init__(
        self,
        cfg: DataConfig,
        train_transform: Callable[[dict], dict],
        val_transform: Callable[[dict], dict],
        seed: int = 0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        required_keys: Sequence[str] = ("jpg",),
        train_sample_filter: Callable[[dict, int], bool] | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.train_transform = train_transform
        self.val_transform = val_transform
        self.seed = seed
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.required_keys = tuple(required_keys)
        self.train_sample_filter = train_sample_filter
        if cfg.decode == "device":  # fail before a Trainer or a W&B run exists
            device_transform(train_transform, "train_transform")
            device_transform(val_transform, "val_transform")
        self.world_size: int | None = None
        self.rank: int | None = None
        self.batches_per_epoch: int | None = None
        self.train_stream: ResampledShardStream | None = None
        self.val_stream: FiniteShardStream | None = None
        self._epoch = 0
        # () -> (epoch, batches done in it) during fit; the trainer side sets it (trainers.callbacks.DataPosition)
        self.training_position: Callable[[], tuple[int, int] | None] | None = None
        self.decode_device: torch.device | None = None
        self.device_decoded = 0
        self.device_decode_failures = 0

    # -- where are we --------------------------------------------------------------------------------
    def _world_and_rank(self) -> tuple[int, int]:
        if self.world_size is not None:
            return self.world_size, self.rank or 0
        if self.trainer is not None:
            return self.trainer.world_size, self.trainer.global_rank
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    # -- setup: every check that can fail does so here, before training --------------------------------
    def setup(self, stage: str | None = None) -> None:
        world, rank = self._world_and_rank()
        common = dict(
            seed=self.seed, rank=rank, world_size=world, required_keys=self.required_keys,
            max_corrupt_fraction=self.cfg.max_corrupt_fraction,
            min_samples_for_corrupt_check=self.cfg.min_samples_for_corrupt_check,
        )
        device = self.cfg.decode == "device"
        if device:
            common["header_only_keys"] = ("jpg",)  # the field SampleTransform reads
        if stage in (None, "fit"):
            shards = self._expand("train_shards", required=True)
            self.batches_per_epoch = self._batches_per_epoch(shards, world)
            readers = world * max(1, self.cfg.num_workers)
            if len(shards) < readers:
                rank_zero_warn(
                    f"{len(shards)} training shard(s) for {world} rank(s) x {max(1, self.cfg.num_workers)} "
                    f"worker(s): every reader samples from all shards (with its own seed), so ranks may see the "
                    f"same samples within an epoch. Write at least {readers} shards to give each its own."
                )
            transform = device_transform(self.train_transform, "train_transform") if device else self.train_transform
            self.train_stream = ResampledShardStream(
                shards, transform, self.cfg.batch_size, self.batches_per_epoch,
                shuffle_buffer=self.cfg.shuffle_buffer, sample_filter=self.train_sample_filter, **common,
            )
            self.train_stream.set_epoch(self._epoch)
            rank_zero_info(
                f"Train data: {len(shards)} shard(s), {self.batches_per_epoch} batches of {self.cfg.batch_size} "
                f"per rank per epoch, {world} rank(s)"
            )
        if stage in (None, "fit", "validate") and self.cfg.val_shards is not None:
            shards = self._expand("val_shards", required=False)
            self._check_finite_split(shards, world)
            transform = device_transform(self.val_transform, "val_transform") if device else self.val_transform
            self.val_stream = FiniteShardStream(shards, transform, self.cfg.batch_size, **common)

    def _expand(self, name: str, required: bool) -> list[str]:
        spec = getattr(self.cfg, name)
        if spec is None and required:
            raise ValueError(
                f"DataConfig.{name} is None at setup(): pass --data.{name} (a shard spec), or let the recipe "
                "fill it in with the synthetic world's shards before the Trainer starts"
            )
        return expand_shards(spec)

    def _check_finite_split(self, shards: list[str], world: int) -> None:
        """Every validation sample is read once whatever the shard count (``streams.finite_split``); what cannot
        work is a rank without a sample, which the shard index shows before training (without an index, the
        loader stops with an error at the first validation instead)."""
        from .shard_writer import read_shard_counts  # lazy, as in _batches_per_epoch

        workers = max(1, self.cfg.num_workers)
        whole = "whole shards" if len(shards) >= world * workers else "samples split across readers"
        rank_zero_info(f"Validation data: {len(shards)} shard(s) for {world} rank(s) x {workers} worker(s): {whole}")
        counts = read_shard_counts(shards)
        if counts is None:
            return
        in_shard = dict(zip(shards, counts))
        per_rank = [sum(piece.count(in_shard[piece.url]) for piece in finite_split(shards, world, rank))
                    for rank in range(world)]
        if min(per_rank) == 0:
            empty = [rank for rank, n in enumerate(per_rank) if n == 0]
            raise ValueError(
                f"val_shards: the shard index counts {sum(counts)} sample(s) in {len(shards)} shard(s) "
                f"({shards[0]}, ...), which leaves rank(s) {empty} of {world} without a validation sample; a rank "
                "without one would stop the others at the end of validation. To fix: run on fewer ranks, point "
                "--data.val_shards at a larger set, or drop --data.val_shards to train without validation."
            )

    def _batches_per_epoch(self, shards: list[str], world: int) -> int:
        if self.cfg.batches_per_epoch is not None:
            return self.cfg.batches_per_epoch
        from .shard_writer import read_index  # lazy: the writer pulls in tools the reader never needs

        num_samples = read_index(shards)
        per_step = self.cfg.batch_size * world
        if num_samples is None:
            raise ValueError(
                f"--data.batches_per_epoch is not set and the shard index is missing for {shards[0]} "
                f"(and {len(shards) - 1} more): expected a '{{prefix}}-index.json' next to the shards "
                "(datamodules.shard_writer writes one). Set --data.batches_per_epoch to the number of batches "
                "per rank per epoch, e.g. num_samples // (batch_size x world size)."
            )
        if num_samples < per_step:
            raise ValueError(
                f"The shard index counts {num_samples} samples, fewer than one step of batch_size "
                f"{self.cfg.batch_size} x {world} rank(s) = {per_step}. Lower --data.batch_size or set "
                "--data.batches_per_epoch explicitly."
            )
        return num_samples // per_step

    # -- loaders -------------------------------------------------------------------------------------
    def train_dataloader(self) -> ShardLoader:
        if self.train_stream is None:
            raise RuntimeError("ShardedDataModule.train_dataloader() before setup('fit')")
        return ShardLoader(self.train_stream, self.cfg.num_workers, length=self.batches_per_epoch)

    def val_dataloader(self) -> ShardLoader | list:
        if self.val_stream is None:
            return []  # no validation shards: Lightning skips validation
        cap = self.cfg.val_batches
        return ShardLoader(self.val_stream, self.cfg.num_workers, length=cap, max_batches=cap)

    # -- device side ---------------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, dict) and isinstance(batch.get("image"), list):  # decode="device": still JPEG bytes
            self._decode_on_device(batch)
        if isinstance(batch, dict):
            for key in ("image", "frames"):
                value = batch.get(key)
                if isinstance(value, torch.Tensor) and value.dtype == torch.uint8:
                    batch[key] = normalize_on_device(value, self.mean, self.std)
        if self.trainer is not None:
            # Lightning casts the batch for the precision before the transfer (training_epoch_loop.py), when the
            # images are still uint8: cast the normalised ones now (DeepSpeed's bf16 takes bf16 inputs).
            batch = self.trainer.precision_plugin.convert_input(batch)
        return batch

    def _decode_device(self, batch: dict) -> torch.device:
        if self.decode_device is not None:
            return torch.device(self.decode_device)
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        tensor = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def _decode_on_device(self, batch: dict) -> None:
        failed = decode_batch(batch, self._decode_device(batch))
        self.device_decoded += len(batch["image"])
        if not failed:
            return
        self.device_decode_failures += len(failed)
        warnings.warn(
            f"decode='device': {len(failed)} image(s) failed to decode on the device and on the host "
            f"(keys {failed}); each was replaced by another sample of its batch. {self.device_decode_failures} "
            f"of {self.device_decoded} so far on this rank.", stacklevel=2,
        )
        too_many = self.device_decode_failures > self.cfg.max_corrupt_fraction * self.device_decoded
        if self.device_decoded >= self.cfg.min_samples_for_corrupt_check and too_many:
            raise CorruptDataError(
                f"decode='device': {self.device_decode_failures} of {self.device_decoded} images failed to decode "
                f"(> max_corrupt_fraction {self.cfg.max_corrupt_fraction:.1%}); latest keys {failed}. Their JPEG "
                "headers parse but their pixels do not: re-write those shards, or raise --data.max_corrupt_fraction."
            )

    # -- checkpoint ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where the training stream stands: the epoch and the batches this rank has trained on in it.

        Every rank trains on the same number of batches, so one count describes all of them; with the
        layout (world size, workers, batch size) it fixes how many samples each (rank, worker) consumed,
        and a resume with the same layout continues the stream exactly.
        """
        epoch, batches_done = self._epoch, 0
        position = self.training_position() if self.training_position is not None else None
        if position is not None:  # during fit: the batches done include the one whose step was just applied
            epoch, batches_done = position
        elif self.train_stream is not None:
            epoch = self.train_stream.epoch
            if self.trainer is not None and self.trainer.training:
                rank_zero_warn(
                    "ShardedDataModule.training_position is not set, so this checkpoint records only the epoch being "
                    "trained, not the batches done in it: a resume from it restarts that epoch's stream. Add the "
                    "callback trainers.callbacks.DataPosition to the Trainer.")
        world, _ = self._world_and_rank()
        return {
            "epoch": epoch,
            "seed": self.seed,
            "batches_done": batches_done,
            "layout": self._layout(world),
        }

    def _layout(self, world: int) -> dict:
        return {"world_size": world, "num_workers": self.cfg.num_workers, "batch_size": self.cfg.batch_size,
                "batches_per_epoch": self.batches_per_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("seed", self.seed) != self.seed:
            rank_zero_warn(
                f"Resuming a data stream seeded with {state_dict['seed']}; this run was given seed {self.seed}. "
                "Using the checkpoint's seed so the stream continues where it was."
            )
            self.seed = state_dict["seed"]
            for stream in (self.train_stream, self.val_stream):
                if stream is not None:
                    stream.seed = self.seed
        self._epoch = int(state_dict.get("epoch", 0))
        if self.train_stream is None:
            return
        self.train_stream.set_epoch(self._epoch)
        batches_done = int(state_dict.get("batches_done", 0))
        saved, now = state_dict.get("layout"), self._layout(self._world_and_rank()[0])
        if batches_done and saved != now:
            changed = ", ".join(f"{k} {saved.get(k) if saved else '?'} -> {v}" for k, v in now.items()
                                if not saved or saved.get(k) != v)
            rank_zero_warn(
                f"Resuming epoch {self._epoch} after {batches_done} batches with a different data layout ({changed}): "
                "the stream cannot continue exactly, so this epoch's stream restarts with the new layout. Training "
                "stays statistically equivalent (shards are drawn with replacement), but not identical to an "
                "uninterrupted run."
            )
            return
        self.train_stream.skip_batches = batches_done
        if batches_done:
            rank_zero_info(f"Data stream: resuming epoch {self._epoch} after batch {batches_done} "
                           f"of {self.batches_per_epoch} (exact: the skipped samples are read but not transformed)")
