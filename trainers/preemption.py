"""Preemption: SIGUSR1 -> checkpoint, requeue, stop; SIGTERM -> checkpoint, stop.

SLURM sends SIGUSR1 a set time before the job's limit (``#SBATCH --signal=USR1@90``) and SIGTERM when it
preempts or cancels a job. Lightning's own handler saves inside the signal handler, that is in the middle
of whatever the process was doing (an optimizer step, a collective another rank is not in), and its SIGTERM
handler broadcasts from inside a handler too. Here a handler only records the signal; at the next step
boundary the ranks agree (a MAX all-reduce, so a signal seen by any rank counts), every rank takes part in
one checkpoint, and the run stops cleanly.

The agreement never makes a step wait for the GPU. With several ranks on GPUs the all-reduce is queued on the
device at one check, its result copied to pinned host memory behind it, and read at the next check (waiting
at most for the work queued before it, one check interval ago); every rank reads the same result at the same
step, so they stop together, one check interval after the signal. One rank, or ranks on the CPU, agree at once.
"""

import logging
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from trainers.checkpoint import CHECKPOINT_DIR
from trainers.cluster import max_over_ranks, requeue, slurm_allocation
from trainers.lightning_compat import disable_sigterm_broadcast

log = logging.getLogger(__name__)

_NONE, _TERMINATE, _REQUEUE = 0, 1, 2  # ordered: a requeue request wins over a plain stop


class PreemptionHandler(Callback):
    def __init__(self, run_dir: str | Path, check_every_n_steps: int = 1):
        self.checkpoint_dir = Path(run_dir) / CHECKPOINT_DIR
        self.check_every_n_steps = max(1, check_every_n_steps)
        self._received = _NONE
        self._previous: dict[int, object] = {}
        self.stopped_at: int | None = None
        """The step saved when a signal stopped the run; None when it ran to the end."""
        self.requeued = False
        self._want_requeue = False
        self.checkpoint: Path | None = None
        self._in_flight: tuple[torch.Tensor, torch.cuda.Event] | None = None
        # Installed now so that a signal during start-up is remembered instead of killing the process
        # (SIGUSR1's default action is to terminate).
        self._install()

    # -- signals -------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self._received = max(self._received, _REQUEUE if signum == signal.SIGUSR1 else _TERMINATE)

    def _install(self) -> None:
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            try:
                current = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: leave signals alone
                return
            self._previous.setdefault(signum, current)

    # Lightning installs its SIGTERM handler when fit starts; take it back before any step runs.
    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._install()

    def on_train_start(self, trainer, pl_module) -> None:
        self._install()
        # Lightning's own per-step SIGTERM broadcast is a host-device sync per step; its SIGTERM handler is replaced
        # above, so the flag it broadcasts is always 0, and the agreement below covers both signals.
        disable_sigterm_broadcast(trainer)

    def teardown(self, trainer, pl_module, stage) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous.clear()

    # -- the step boundary ---------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.stopped_at is not None or trainer.global_step % self.check_every_n_steps:
            return
        action = self._agreed(trainer)
        if action == _NONE:
            return
        step = trainer.global_step
        self.checkpoint = self._hpc_path()
        trainer.save_checkpoint(self.checkpoint)  # every rank takes part; rank 0 writes
        if trainer.is_global_zero:
            for older in self.checkpoint_dir.glob("hpc_ckpt_*.ckpt"):
                if older != self.checkpoint:
                    older.unlink(missing_ok=True)  # only once the new one is complete
        if hasattr(trainer.checkpoint_callback, "note_saved"):
            trainer.checkpoint_callback.note_saved(step)
        self.stopped_at = step
        self._want_requeue = action == _REQUEUE
        trainer.should_stop = True
        what = "SIGUSR1 (time limit near)" if action == _REQUEUE else "SIGTERM"
        log.warning("Received %s: saved %s at step %d; stopping.", what, self.checkpoint, step)

    def _agreed(self, trainer) -> int:
        """The strongest signal any rank had received by the previous check (by this one where nothing waits)."""
        device = trainer.strategy.root_device
        if trainer.world_size == 1 or not dist.is_initialized() or device.type != "cuda":
            return max_over_ranks(trainer, self._received)
        agreed = _NONE
        if self._in_flight is not None:
            host, done = self._in_flight
            done.synchronize()
            agreed = int(host.item())  # pinned host memory: no device access
        flag = torch.full((1,), self._received, dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        host = torch.empty(1, dtype=torch.int32, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._in_flight = (host, done)
        return agreed

    def _hpc_path(self) -> Path:
        numbers = [int(p.stem.rsplit("_", 1)[-1]) for p in self.checkpoint_dir.glob("hpc_ckpt_*.ckpt")
                   if p.stem.rsplit("_", 1)[-1].isdigit()]
        return self.checkpoint_dir / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"

    def requeue_if_asked(self, trainer) -> None:
        """After a stop on SIGUSR1 inside a SLURM job, requeue the job (rank 0). Call it once the W&B run is
        closed (trainers/run.py does): the requeue kills this job's processes, W&B's writer among them, and
        what it had not written yet would be lost."""
        if self.stopped_at is None or not trainer.is_global_zero or not self._want_requeue:
            return
        alloc = slurm_allocation()
        if alloc is None:
            log.warning("SIGUSR1 outside a SLURM job: checkpoint saved, nothing to requeue. Rerun the same "
                        "command to resume.")
            return
        self.requeued, message = requeue(alloc.job_id)
        if self.requeued:
            log.warning("Requeued SLURM job %s; it resumes from %s.", alloc.job_id, self.checkpoint)
        else:
            log.error("Requeueing SLURM job %s failed: %s. Resubmit the same sbatch script to resume from %s.",
                      alloc.job_id, message, self.checkpoint)
