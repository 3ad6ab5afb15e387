"""The Trainer factory: strategy, precision, loggers, checkpoints and callbacks from two typed configs."""

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from trainers.callbacks import DestroyProcessGroup, StepCheckpoint
from trainers.checkpoint import CHECKPOINT_DIR, AtomicCheckpointIO

# Strategies by name. DeepSpeed and FSDP need CUDA: Lightning refuses them on the CPU.
STRATEGIES = {
    "auto": False,
    "ddp": False,
    "ddp_find_unused_parameters_true": False,
    "deepspeed_stage_1": True,
    "deepspeed_stage_2": True,
    "deepspeed_stage_2_offload": True,
    "deepspeed_stage_3": True,
    "deepspeed_stage_3_offload": True,
    "fsdp": True,
}
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

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"Unknown trainer.strategy {self.strategy!r}. Choose one of: {', '.join(STRATEGIES)}."
            )
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"Unknown trainer.precision {self.precision!r}. Choose one of: {', '.join(PRECISIONS)}.")
        for name in ("max_steps", "num_nodes", "checkpoint_every_n_steps", "accumulate_grad_batches"):
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
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id + "\n")
    return run_id


def build_trainer(cfg: TrainerConfig, logging: LoggingConfig, run_dir: str | Path, callbacks=()) -> L.Trainer:
    run_dir = Path(run_dir)
    if STRATEGIES[cfg.strategy] and not uses_gpu(cfg):
        raise ValueError(
            f"trainer.strategy={cfg.strategy!r} needs CUDA GPUs and none is in use here. "
            "On the CPU use --trainer.strategy ddp (or auto)."
        )
    if cfg.accelerator == "gpu" and not torch.cuda.is_available():
        raise ValueError("trainer.accelerator='gpu' but no CUDA GPU is visible; use 'auto' or 'cpu'.")
    if uses_gpu(cfg):
        torch.set_float32_matmul_precision("high")  # TF32 for whatever still runs in fp32

    wandb_logger = WandbLogger(
        project=logging.project,
        name=logging.name or run_dir.name,
        group=logging.group,
        save_dir=str(run_dir),
        id=wandb_run_id(run_dir),
        offline=not logging.online,
        resume="allow",
    )
    csv_logger = CSVLogger(save_dir=str(run_dir), name="", version="csv")
    checkpoints = StepCheckpoint(
        dirpath=run_dir / CHECKPOINT_DIR,
        filename="step-{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=cfg.checkpoint_every_n_steps,
        save_last=True,
        save_top_k=cfg.keep_last_n_checkpoints,
        monitor="step",
        mode="max",
        enable_version_counter=False,
    )
    return L.Trainer(
        default_root_dir=str(run_dir),
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=resolve_precision(cfg),
        max_steps=cfg.max_steps,
        max_epochs=-1,
        val_check_interval=cfg.val_every_n_steps,
        check_val_every_n_epoch=None,
        log_every_n_steps=cfg.log_every_n_steps,
        gradient_clip_val=cfg.gradient_clip_val,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        deterministic=cfg.deterministic,
        logger=[wandb_logger, csv_logger],
        callbacks=[checkpoints, LearningRateMonitor(logging_interval="step"), DestroyProcessGroup(), *callbacks],
        # DeepSpeed writes checkpoint directories itself and takes no CheckpointIO plugin
        plugins=[] if cfg.strategy.startswith("deepspeed") else [AtomicCheckpointIO()],
        num_sanity_val_steps=1,
    )
