"""The base class of every method's LightningModule: a method supplies its loss and its parameter groups;
the training step, the optimizer with its warmup + cosine schedule, and the logging of the loss live here once.

A subclass implements

- ``compute_loss(batch) -> Tensor``: the training loss of one batch, without logging (a plain PyTorch loop
  calls the same function: benchmarks/training.py);
- ``param_groups() -> list[dict]``: the optimizer's parameter groups (weight decay, layer-decay ``lr_scale``);
- optionally ``training_metrics()``: more scalars to log with the loss, ``init_from(source)``: how an
  earlier stage's weights initialise the method, and ``after_optimizer_step()``: a change to the weights after
  each step.

and declares ``batch_keys``: the keys of the batch contract (``batch``) that its steps read.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any, ClassVar, TypeVar

import lightning as L
import torch

from trainers.guards import guard_step
from trainers.handoff import init_backbone
from trainers.lightning_compat import logs_this_step
from trainers.optim import ScheduleConfig, build_optimizer, build_warmup_cosine

C = TypeVar("C")


def as_config(config_cls: type[C], value: C | dict | None) -> C:
    """A typed config from itself, its fields as a dict (as checkpoints store them), or None (the defaults)."""
    if value is None:
        return config_cls()
    if isinstance(value, config_cls):
        return value
    if is_dataclass(value):
        raise TypeError(f"Expected a {config_cls.__name__} (or a dict of its fields), got a {type(value).__name__}")
    return config_cls(**value)


def plain(value: Any) -> Any:
    """Hyperparameters as plain values, so that checkpoints load with ``torch.load(weights_only=True)``."""
    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else value


class Method(L.LightningModule):
    """Args (of the subclasses): ``optim``, the optimizer's typed config; ``lr``, the peak learning rate (already
    scaled by the effective batch); ``total_steps``, the length of the schedule in optimizer steps."""

    batch_keys: ClassVar[tuple[str, ...]] = ("image",)
    """The keys of the batch contract that ``compute_loss`` and ``validation_step`` read."""

    def __init__(self, optim: ScheduleConfig | None = None, lr: float = 0.0, total_steps: int = 0):
        super().__init__()
        self.optim_cfg = optim
        self.lr = lr
        self.total_steps = total_steps

    def record_hparams(self, **hparams) -> None:
        """Record the constructor's arguments as plain values (typed configs become dicts)."""
        self.save_hyperparameters({name: plain(value) for name, value in hparams.items()})

    # -- what a method supplies ------------------------------------------------------------------------------
    def compute_loss(self, batch) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement compute_loss(batch)")

    def param_groups(self) -> list[dict]:
        raise NotImplementedError(f"{type(self).__name__} must implement param_groups()")

    def training_metrics(self) -> dict[str, float]:
        """Scalars logged with the loss on the logging steps (host values: logging them costs no device sync)."""
        return {}

    def init_from(self, source) -> list[str]:
        """Initialise from an earlier stage (``trainers.handoff.init_backbone``); returns what was done, in lines."""
        return init_backbone(self.model, source)

    def after_optimizer_step(self) -> None:
        """What the method does to its weights after each optimizer step (PE clamps its temperature). Lightning runs
        it from ``on_before_zero_grad``, which follows every optimizer step; a plain loop calls it itself."""

    def on_before_zero_grad(self, optimizer) -> None:
        self.after_optimizer_step()

    # -- the shared step and optimizer -----------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        loss = self.compute_loss(batch)
        trainer = self.attached_trainer()
        if trainer is None:
            return loss
        # Only the logging steps' values reach the loggers and the progress bar, and each self.log costs about
        # a millisecond of Lightning's result bookkeeping, so the other steps log nothing.
        if logs_this_step(trainer):
            self.log("train/loss", loss, prog_bar=True)
            for name, value in self.training_metrics().items():
                self.log(name, value)
        # A NaN or infinite loss skips this optimizer step on every rank (trainers/guards.py); None (host path)
        # makes Lightning skip backward and the step.
        return guard_step(trainer, loss)

    def attached_trainer(self) -> L.Trainer | None:
        """The Trainer, or None when the module runs on its own (a notebook, a test)."""
        try:
            return self.trainer
        except RuntimeError:  # LightningModule.trainer raises when no Trainer is attached
            return None

    def validation_step(self, batch, batch_idx):
        """The training loss on held-out batches; methods with metrics of their own override this."""
        loss = self.compute_loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch[self.batch_keys[0]]))

    def configure_optimizers(self):
        optimizer = build_optimizer(self.param_groups(), self.optim_cfg, self.lr)
        scheduler = build_warmup_cosine(optimizer, self.optim_cfg, self.lr, self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
