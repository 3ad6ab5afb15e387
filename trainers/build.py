"""The Trainer factory: strategy, precision, loggers, checkpoints and callbacks from two typed configs."""

import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.loggers import WandbLogger

from trainers.callbacks import DataPosition, DestroyProcessGroup, SpeedOptions, StepCheckpoint
from trainers.checkpoint import CHECKPOINT_DIR, AtomicCheckpointIO, written_atomically
from trainers.cluster import check_allocation, slurm_plugins
from trainers.guards import NonFiniteLossGuard
from trainers.metrics_csv import ResumableCSVLogger, TrimMetricsOnResume
from trainers.preemption import PreemptionHandler
from trainers.random_state import RandomStateCheckpoint
from trainers.strategies import DEEPSPEED, build_strategy
from trainers.strategies import NAMES as STRATEGY_NAMES

# The shard loaders are resumable mid-epoch through the datamodule's state (datamodules/sharded.py), which
# Lightning cannot see; its warning that they are not would mislead.
warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended")

# Strategies by name (built by trainers/strategies.py). DeepSpeed and FSDP need CUDA: Lightning refuses them on the CPU.
STRATEGIES = {name: name in DEEPSPEED or name == "fsdp" for name in STRATEGY_NAMES}
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "64-true")


@dataclass
class TrainerConfig:
    max_steps: int = 300
    """Optimizer steps to train for. A rerun in the same run_dir with a larger value continues."""
    devices: int | str = "auto"
    """Devices (GPUs, or CPU processes) per node; "auto" takes every visible GPU, or 1 CPU process."""
    num_nodes: int = 1
    """Number of nodes."""
    accelerator: str = "auto"
    """"auto" (GPU when there is one), "gpu" or "cpu"."""
    strategy: str = "auto"
    """One of: auto, ddp, ddp_find_unused_parameters_true, deepspeed_stage_{1,2,3}, deepspeed_stage_{2,3}_offload, fsdp."""
    precision: str | None = None
    """Lightning precision; None picks bf16-mixed on GPU and 32-true on CPU."""
    checkpoint_every_n_steps: int = 100
    """Save a checkpoint every N optimizer steps (and always at the end)."""
    keep_last_n_checkpoints: int = 2
    """How many step checkpoints to keep besides last.ckpt."""
    val_every_n_steps: int = 100
    """Run validation every N optimizer steps."""
    log_every_n_steps: int = 10
    """Log training metrics every N steps."""
    gradient_clip_val: float | None = None
    """Clip the gradient norm to this value; None: no clipping (as MAE pretraining)."""
    accumulate_grad_batches: int = 1
    """Micro-batches per optimizer step."""
    deterministic: bool = False
    """Use deterministic algorithms (slower; for exact reproduction)."""
    max_nonfinite_steps: int = 5
    """Skip a step whose loss is NaN/inf; stop (with a checkpoint) after this many in a row. 0 turns the guard off."""
    signal_check_every_n_steps: int = 1
    """Steps between checks (one tiny all-reduce) for SIGUSR1/SIGTERM; the run saves and stops at the next check."""
    cpu_threads: int | None = None
    """torch intra-op threads per training process. None: the cores this process may use minus its loader workers
    (at least 1; trainers/threads.py). 1 on a machine shared with other jobs."""
    compile: bool = False
    """torch.compile the model before the first step (see BENCHMARKS.md for where it pays)."""
    channels_last: bool = False
    """Run convolutions in the channels-last layout (conv models such as RegNet; see BENCHMARKS.md)."""

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"Unknown trainer.strategy {self.strategy!r}. Choose one of: {', '.join(STRATEGIES)}."
            )
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"Unknown trainer.precision {self.precision!r}. Choose one of: {', '.join(PRECISIONS)}.")
        if self.max_nonfinite_steps < 0:
            raise ValueError(f"trainer.max_nonfinite_steps must be >= 0, got {self.max_nonfinite_steps}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"trainer.cpu_threads must be >= 1 (or unset), got {self.cpu_threads}")
        for name in ("max_steps", "num_nodes", "checkpoint_every_n_steps", "accumulate_grad_batches",
                     "signal_check_every_n_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.devices, str) and self.devices != "auto":
            raise ValueError(f'trainer.devices must be a positive integer or "auto", got {self.devices!r}')


@dataclass
class LoggingConfig:
    project: str = "prism"
    """W&B project."""
    online: bool = False
    """Stream to the W&B servers. Default offline: the run is written under <run_dir>/wandb; `wandb sync` uploads it."""
    name: str | None = None
    """W&B run name; default: the run directory's name."""
    group: str | None = None
    """W&B group (the stages of one pipeline share a group)."""
    image_every_n_steps: int = 100
    """Render image panels (e.g. MAE reconstructions) every N steps; 0 disables them."""


def uses_gpu(cfg: TrainerConfig) -> bool:
    return cfg.accelerator == "gpu" or (cfg.accelerator == "auto" and torch.cuda.is_available())


def resolve_precision(cfg: TrainerConfig) -> str:
    if cfg.precision is not None:
        return cfg.precision
    return "bf16-mixed" if uses_gpu(cfg) else "32-true"


def wandb_run_id(run_dir: Path) -> str:
    """A W&B id tied to the run directory, so that every rerun (and SLURM requeue) continues one run.

    The first run records it in the run directory, so a moved directory keeps its id.
    """
    id_file = run_dir / "wandb" / "run_id"
    if id_file.exists():
        return id_file.read_text().strip()
    stem = re.sub(r"[^A-Za-z0-9_-]", "-", run_dir.name)[:40] or "run"
    run_id = f"{stem}-{hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]}"
    # Every rank of a new run gets here at once: renamed into place, so that none reads a half-written (empty) id
    with written_atomically(id_file) as tmp:
        tmp.write_text(run_id + "\n")
    return run_id


def check_devices(cfg: TrainerConfig) -> int | str:
    """The devices per node, checked against the allocation and the machine before anything waits on other ranks."""
    devices = check_allocation(cfg.devices, cfg.num_nodes)
    if STRATEGIES[cfg.strategy] and not uses_gpu(cfg):
        raise ValueError(
            f"trainer.strategy={cfg.strategy!r} needs CUDA GPUs and none is in use here. "
            "On the CPU use --trainer.strategy ddp (or auto)."
        )
    if cfg.accelerator == "gpu" and not torch.cuda.is_available():
        raise ValueError("trainer.accelerator='gpu' but no CUDA GPU is visible; use 'auto' or 'cpu'.")
    if uses_gpu(cfg):
        torch.set_float32_matmul_precision("high")  # TF32 for whatever still runs in fp32
    return devices


def wandb_logger(logging: LoggingConfig, run_dir: Path) -> WandbLogger:
    """Offline unless asked otherwise, one run id per run directory (resumed, never duplicated)."""
    return WandbLogger(project=logging.project, name=logging.name or run_dir.name, group=logging.group,
                       save_dir=str(run_dir), id=wandb_run_id(run_dir), offline=not logging.online, resume="allow")


def step_checkpoints(cfg: TrainerConfig, run_dir: Path) -> StepCheckpoint:
    """last.ckpt plus the newest ``keep_last_n_checkpoints`` step-NNNNNN.ckpt, every ``checkpoint_every_n_steps``."""
    return StepCheckpoint(dirpath=run_dir / CHECKPOINT_DIR, filename="step-{step:06d}", auto_insert_metric_name=False,
                          every_n_train_steps=cfg.checkpoint_every_n_steps, save_last=True,
                          save_top_k=cfg.keep_last_n_checkpoints, monitor="step", mode="max",
                          enable_version_counter=False)


def build_trainer(cfg: TrainerConfig, logging: LoggingConfig, run_dir: str | Path, callbacks=(), *,
                  batch_size_per_device: int, seed: int = 0, validates_after_fit: bool = False) -> L.Trainer:
    """The Trainer for a run directory, with the fault-tolerance callbacks every run gets: preemption
    (signals -> checkpoint -> requeue), per-rank random state in checkpoints, the non-finite loss guard.

    ``batch_size_per_device`` is the loader's batch: DeepSpeed needs it and cannot read it from our
    pre-batched loaders (PL#19460). ``validates_after_fit``: ``trainer.validate`` follows a finished fit, so the
    process group stays up for it."""
    run_dir = Path(run_dir)
    devices = check_devices(cfg)
    fault_tolerance = [RandomStateCheckpoint(seed), PreemptionHandler(run_dir, cfg.signal_check_every_n_steps),
                       DataPosition()]
    if cfg.max_nonfinite_steps:
        fault_tolerance.append(NonFiniteLossGuard(run_dir, cfg.max_nonfinite_steps, cfg.log_every_n_steps))
    precision = resolve_precision(cfg)
    strategy = build_strategy(cfg.strategy, batch_size_per_device=batch_size_per_device, precision=precision,
                              accumulate_grad_batches=cfg.accumulate_grad_batches,
                              gradient_clip_val=cfg.gradient_clip_val)
    plugins = slurm_plugins()
    # DeepSpeed writes checkpoint directories itself and takes no CheckpointIO plugin
    if not cfg.strategy.startswith("deepspeed"):
        plugins.append(AtomicCheckpointIO())
    return L.Trainer(
        default_root_dir=str(run_dir),
        accelerator=cfg.accelerator,
        devices=devices,
        num_nodes=cfg.num_nodes,
        strategy=strategy,
        precision=precision,
        max_steps=cfg.max_steps,
        max_epochs=-1,
        val_check_interval=cfg.val_every_n_steps,
        check_val_every_n_epoch=None,
        log_every_n_steps=cfg.log_every_n_steps,
        gradient_clip_val=cfg.gradient_clip_val,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        deterministic=cfg.deterministic,
        logger=[wandb_logger(logging, run_dir), ResumableCSVLogger(save_dir=str(run_dir))],
        # The bar reads the logged loss back from the device when it redraws: at the logging cadence, not every step.
        callbacks=[step_checkpoints(cfg, run_dir), LearningRateMonitor(logging_interval="step"),
                   DestroyProcessGroup(keep_after_finished_fit=validates_after_fit),
                   TQDMProgressBar(refresh_rate=cfg.log_every_n_steps), SpeedOptions(cfg.compile, cfg.channels_last),
                   *callbacks,
                   TrimMetricsOnResume(),
                   *fault_tolerance],
        plugins=plugins,
        num_sanity_val_steps=1,
    )
