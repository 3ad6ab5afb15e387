"""A guard against non-finite losses: skip the step, count it, stop after too many in a row.

A NaN loss would turn every weight into NaN at the optimizer step, and the next checkpoint would save
them. The training step hands its loss to the guard (``guard_step``; every method's shared step in
trainers/method.py does); if it is NaN or infinite on any rank, the step is skipped on
every rank: the batch is consumed and the step counts toward max_steps (the schedule moves on), but the
weights and optimizer state are untouched. After ``max_consecutive`` bad steps in a row the run stops
with a checkpoint; since the bad steps changed nothing, it holds the weights and optimizer state from
before the first of them.

Two ways to skip, chosen when training starts:

- On the device, without waiting for it (fused Adam/AdamW, the default optimizer of every pretraining recipe):
  the ranks' "bad" flags are combined by an all-reduce on the device and handed to the fused kernel as
  ``found_inf``, the argument torch's GradScaler uses to skip a step (torch/optim/adam.py: the kernel
  returns early and the step count is rolled back). Backward still runs on the NaN loss; its gradients
  are dropped. The counts live on the device and are read every ``check_every_n_steps`` steps, so the
  step itself never waits on the GPU. Once the limit is reached, every further step is skipped as well
  until that read, so the saved weights are still those from before the first bad step.
- On the host (other optimizers, DeepSpeed, fp16 with a loss scaler, which owns ``found_inf``): the
  flag is read at once, one device-to-host read per step, and every rank returns None from
  ``training_step``, which makes Lightning skip backward and the optimizer step together.
"""

import logging
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy

from trainers.checkpoint import CHECKPOINT_DIR
from trainers.cluster import max_over_ranks, max_over_ranks_on_device

log = logging.getLogger(__name__)

# Returning None is how the host-side guard skips a step; Lightning warns about it as if it were a mistake.
warnings.filterwarnings("ignore", message=r".*`training_step` returned `None`")


def guard_step(trainer, output):
    """The training step's return value through the run's non-finite guard, if it has one (``NonFiniteLossGuard.check``).
    Every method's step calls this (trainers/method.py); a LightningModule of one's own can too."""
    for callback in trainer.callbacks:
        if isinstance(callback, NonFiniteLossGuard):
            return callback.check(trainer, output)
    return output


class NonFiniteLossError(RuntimeError):
    """The loss stayed NaN/inf for too many steps in a row (or once, where a step cannot be skipped)."""


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` honours ``found_inf`` on the device. Fused Adam/AdamW do, on CUDA and the CPU.
    Fused SGD also takes the argument, but on the CPU a skipped first step leaves its momentum buffer
    uninitialised (torch 2.x), so it is not trusted."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and bool(optimizer.defaults.get("fused"))


class NonFiniteLossGuard(Callback):
    def __init__(self, run_dir: str | Path, max_consecutive: int = 5, check_every_n_steps: int = 1):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.checkpoint_dir = Path(run_dir) / CHECKPOINT_DIR
        self.max_consecutive = max_consecutive
        self.check_every_n_steps = check_every_n_steps
        self.skipped = 0
        """Steps skipped in this run, in total (as of the last read, on the device path)."""
        self.consecutive = 0
        self.first_bad_step: int | None = None
        self.stopped: Path | None = None
        """The checkpoint written when the guard stopped the run."""
        self.on_device = False
        """Whether steps are skipped on the device (see the module docstring)."""
        self._bad_this_step = False
        self._counts: dict[str, torch.Tensor] = {}
        self._pending: torch.Tensor | None = None
        self._last_step = 0
        self._skipped_at_start = 0
        self._reported = 0

    # -- set-up: on_train_start, once a resumed run's step count and optimizers are restored ----------
    def on_train_start(self, trainer, pl_module) -> None:
        optimizers = trainer.optimizers
        self.on_device = (bool(optimizers) and all(skips_on_device(o) for o in optimizers)
                          and not isinstance(trainer.strategy, DeepSpeedStrategy)
                          and getattr(trainer.precision_plugin, "scaler", None) is None)
        if self.on_device:
            device = trainer.strategy.root_device
            zero = lambda dtype: torch.zeros((), device=device, dtype=dtype)  # noqa: E731
            self._counts = {"skipped": zero(torch.int64), "consecutive": zero(torch.int64),
                            "first_bad": zero(torch.int64), "step": zero(torch.int64), "hold": zero(torch.float32)}
            self._counts["step"].fill_(trainer.global_step)
            self._pending = zero(torch.float32)
            self._last_step = trainer.global_step
            self._skipped_at_start = self._reported = self.skipped

    def check(self, trainer, output):
        """What the training step returns for its loss (``output``): the loss itself (on the device path its
        optimizer step is skipped there if it is bad on any rank), or None when the host path skips the step."""
        return (self._device_guarded if self.on_device else self._host_guarded)(trainer, output)

    @staticmethod
    def _loss(output):
        return output["loss"] if isinstance(output, dict) else output

    # -- the device path ---------------------------------------------------------------------------
    def _device_guarded(self, trainer, output):
        loss = self._loss(output)
        if loss is None:
            return output
        bad = max_over_ranks_on_device(trainer, (~torch.isfinite(loss.detach())).any().float())
        torch.maximum(self._pending, bad, out=self._pending)  # over the micro-batches of one optimizer step
        found_inf = torch.maximum(self._pending, self._counts["hold"])
        for optimizer in trainer.optimizers:
            optimizer.found_inf = found_inf  # read by the fused step after backward
        return output

    def _count_on_device(self) -> None:
        c, bad = self._counts, self._pending.to(torch.int64)
        c["step"] += 1
        c["skipped"] += bad
        c["consecutive"].add_(1).mul_(bad)
        # The first bad step of the run of bad steps that reaches the limit; frozen once the limit holds.
        starts = (c["consecutive"] == 1) & (c["hold"] == 0)
        c["first_bad"].copy_(torch.where(starts, c["step"] - 1, c["first_bad"]))
        c["hold"].copy_(torch.maximum(c["hold"], (c["consecutive"] >= self.max_consecutive).float()))
        self._pending.zero_()

    def _read_device_counts(self, trainer, pl_module) -> None:
        skipped, consecutive, first_bad, hold = torch.stack(
            [self._counts[k].to(torch.int64) for k in ("skipped", "consecutive", "first_bad", "hold")]).tolist()
        total = self._skipped_at_start + int(skipped)
        new, self._reported = total - self._reported, total
        self.skipped, self.consecutive = total, int(consecutive)
        if new:
            pl_module.log("train/skipped_nonfinite_steps", float(self.skipped), rank_zero_only=True)
            log.warning("Non-finite loss: %d step(s) skipped in the last %d (%d in total; stop after %d in a row).",
                        new, self.check_every_n_steps, self.skipped, self.max_consecutive)
        if hold:
            self.first_bad_step = int(first_bad)
            self._stop(trainer, trainer.global_step, self.max_consecutive)

    # -- the host path -----------------------------------------------------------------------------
    def _host_guarded(self, trainer, output):
        loss = self._loss(output)
        if loss is None:
            return output
        self._bad_this_step = bool(max_over_ranks(trainer, ~torch.isfinite(loss.detach()).all()))
        if not self._bad_this_step:
            return output
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            raise NonFiniteLossError(
                f"The loss is {loss.item()} at step {trainer.global_step}. DeepSpeed cannot skip a step, so the "
                f"run stops here before applying it; the newest checkpoint in {self.checkpoint_dir} predates it."
            )
        return None  # Lightning skips backward and the optimizer step

    def _count_on_host(self, trainer, pl_module) -> None:
        if not self._bad_this_step:
            self.consecutive, self.first_bad_step = 0, None
            return
        self._bad_this_step = False
        step = trainer.global_step  # already counts the skipped step
        self.skipped += 1
        self.consecutive += 1
        if self.first_bad_step is None:
            self.first_bad_step = step - 1
        pl_module.log("train/skipped_nonfinite_steps", float(self.skipped), rank_zero_only=True)
        log.warning("Non-finite loss at step %d: step skipped (%d in a row, %d in total; stop after %d in a row).",
                    step - 1, self.consecutive, self.skipped, self.max_consecutive)
        if self.consecutive >= self.max_consecutive:
            self._stop(trainer, step, self.consecutive)

    # -- every step ----------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.on_device:
            self._count_on_host(trainer, pl_module)
            return
        if trainer.global_step == self._last_step:  # a micro-batch without an optimizer step
            return
        self._last_step = trainer.global_step
        self._count_on_device()
        if trainer.global_step % self.check_every_n_steps == 0 or trainer.global_step >= (trainer.max_steps or 0):
            self._read_device_counts(trainer, pl_module)

    def _stop(self, trainer, step: int, in_a_row: int) -> None:
        self.stopped = self.checkpoint_dir / f"before-nonfinite-step-{self.first_bad_step:06d}.ckpt"
        trainer.save_checkpoint(self.stopped)
        if hasattr(trainer.checkpoint_callback, "note_saved"):
            trainer.checkpoint_callback.note_saved(step)
        trainer.should_stop = True
        log.error(
            "Stopping: the loss was NaN or infinite for %d steps in a row from step %d, all skipped (as was every "
            "step after them up to step %d). %s holds the weights and optimizer state from before step %d. Lower "
            "the learning rate, enable gradient clipping (--trainer.gradient_clip_val) or check the data of those "
            "steps; rerunning the command resumes after the bad batches.",
            in_a_row, self.first_bad_step, step - 1, self.stopped, self.first_bad_step,
        )

    def state_dict(self) -> dict:
        if self.on_device and self._counts:  # a checkpoint is a sync point anyway
            self.skipped = self._skipped_at_start + int(self._counts["skipped"].item())
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
