"""A guard against non-finite losses: skip the step, count it, stop after too many in a row.

A NaN loss would turn every weight into NaN at the optimizer step, and the next checkpoint would save
them. The guard looks at the loss before backward: if it is NaN or infinite on any rank, every rank
returns None from ``training_step``, which makes Lightning skip backward and the optimizer step together
(no rank waits in a gradient all-reduce the others skipped). The step still counts toward max_steps and
the schedule moves on: the batch is consumed, the weights are untouched. After ``max_consecutive`` bad
steps in a row the run stops with a checkpoint; since the bad steps changed nothing, it holds the weights
and optimizer state from before the first of them.

Checking costs one device-to-host read of a scalar per step.
"""

import logging
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy

from trainers.checkpoint import CHECKPOINT_DIR
from trainers.cluster import max_over_ranks

log = logging.getLogger(__name__)

# Returning None is how the guard skips a step; Lightning warns about it as if it were a mistake.
warnings.filterwarnings("ignore", message=r".*`training_step` returned `None`")


class NonFiniteLossError(RuntimeError):
    """The loss stayed NaN/inf for too many steps in a row (or once, where a step cannot be skipped)."""


class NonFiniteLossGuard(Callback):
    def __init__(self, run_dir: str | Path, max_consecutive: int = 5):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.checkpoint_dir = Path(run_dir) / CHECKPOINT_DIR
        self.max_consecutive = max_consecutive
        self.skipped = 0
        """Steps skipped in this process's fit, in total."""
        self.consecutive = 0
        self.first_bad_step: int | None = None
        self.stopped: Path | None = None
        """The checkpoint written when the guard stopped the run."""
        self._bad_this_step = False

    def on_fit_start(self, trainer, pl_module) -> None:
        original = pl_module.training_step

        def guarded_training_step(*args, **kwargs):
            output = original(*args, **kwargs)
            loss = output["loss"] if isinstance(output, dict) else output
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

        pl_module.training_step = guarded_training_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
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
        if self.consecutive < self.max_consecutive:
            return
        self.stopped = self.checkpoint_dir / f"before-nonfinite-step-{self.first_bad_step:06d}.ckpt"
        trainer.save_checkpoint(self.stopped)
        if hasattr(trainer.checkpoint_callback, "note_saved"):
            trainer.checkpoint_callback.note_saved(step)
        trainer.should_stop = True
        log.error(
            "Stopping: the loss was NaN or infinite for %d steps in a row (steps %d to %d), all skipped. %s holds the "
            "weights and optimizer state from before step %d. Lower the learning rate, enable gradient clipping "
            "(--trainer.gradient_clip_val) or check the data of those steps; rerunning the command resumes after "
            "the bad batches.", self.consecutive, self.first_bad_step, step - 1, self.stopped, self.first_bad_step,
        )

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
