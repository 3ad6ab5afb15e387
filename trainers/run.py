"""One run of a method, the same for every recipe: build the Trainer, print the derived numbers, start or resume,
initialise from an earlier stage, fit, decide the outcome, validate once more where asked, reload fp32 weights
under sharded strategies, export, close W&B and print where everything is.

A recipe supplies its config, the method (built from the learning rate, which depends on the world size), the
datamodule and what it exports; ``run`` does the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from trainers.build import STRATEGIES, build_trainer, uses_gpu
from trainers.callbacks import ThroughputLogger
from trainers.checkpoint import bring_last_up_to_date, find_resume_checkpoint
from trainers.guards import NonFiniteLossGuard
from trainers.handoff import load_into
from trainers.lightning_compat import wandb_run_started
from trainers.method import Method
from trainers.optim import LARSConfig, effective_batch, resolve_lr
from trainers.preemption import PreemptionHandler
from trainers.threads import configure_cpu_threads


_compute_started = False


def compute_begins() -> None:
    """Marks the end of a command's input checks: an error raised before it is bad input, which the recipes' entry
    point (``recipes.cli.run_command``) reports in one line; one raised after it is a failure, shown with its
    traceback."""
    global _compute_started
    _compute_started = True


def compute_started() -> bool:
    return _compute_started


@dataclass
class Export:
    """What ``export`` gets after a finished fit: where to write, the step reached, the final validation metrics."""

    dir: Path
    step: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class FitOutcome:
    finished: bool
    """Training reached max_steps."""
    message: str
    exit_code: int
    """What the process should exit with: 0 when finished or stopped for preemption, 1 when the guard stopped it."""


def run(cfg, config_yaml: str, method: Callable[[float], Method], datamodule: L.LightningDataModule, *,
        headline: str, export: Callable[[Method, Export], dict], callbacks: Sequence[Callback] = (),
        validate: bool = False, report: Sequence[str] = ()) -> dict:
    """Train ``method(lr)`` as ``cfg`` says (a recipe config with ``run_dir``, ``seed``, ``init_from``, ``data``,
    ``optim``, ``trainer`` and ``logging``). ``validate``: evaluate once more after a finished fit; ``report``: the
    validation metrics (without ``val/``) to print. Returns what was printed (rank 0; {} elsewhere and when the
    run stopped early)."""
    run_dir = Path(cfg.run_dir).resolve()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    peak = get_available_flops(torch.device("cuda"), torch.bfloat16) if uses_gpu(cfg.trainer) else None
    throughput = ThroughputLogger(cfg.data.batch_size, cfg.trainer.log_every_n_steps, None, peak)
    trainer = build_trainer(cfg.trainer, cfg.logging, run_dir, callbacks=[throughput, *callbacks],
                            batch_size_per_device=cfg.data.batch_size, seed=cfg.seed, validates_after_fit=validate)
    rank_zero_info(configure_cpu_threads(cfg.data.num_workers, trainer.num_devices, cfg.trainer.cpu_threads))
    eff_batch = effective_batch(cfg.data.batch_size, cfg.trainer.accumulate_grad_batches, trainer.world_size)
    module = method(resolve_lr(cfg.optim, eff_batch))
    throughput.flops_per_sample = module.flops_per_sample
    rank_zero_info(describe(headline, module, cfg, trainer))

    resume = start_run(trainer, run_dir, config_yaml)
    if resume is None and cfg.init_from:
        rank_zero_info("\n  ".join(module.init_from(cfg.init_from)))
    elif resume is None and getattr(module, "warn_without_init", None):
        rank_zero_warn(module.warn_without_init)
    compute_begins()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)

    outcome = fit_outcome(trainer)
    if not outcome.finished:  # preempted, or stopped by the guard: nothing to evaluate or export yet
        close_wandb(trainer)  # first: a requeue kills this job's processes, W&B's writer among them
        for callback in trainer.callbacks:
            if isinstance(callback, PreemptionHandler):
                callback.requeue_if_asked(trainer)
        outcome = fit_outcome(trainer)  # again: its message says whether the job was requeued
        rank_zero_info(outcome.message)
        if outcome.exit_code:
            raise SystemExit(outcome.exit_code)
        return {}
    if validate and cfg.trainer.strategy.startswith("deepspeed"):
        # Lightning's teardown after fit moved the module to the CPU; DeepSpeed's inference engine moves ZeRO-3's
        # persistent (small, unpartitioned) parameters back only if told, and they would meet CUDA inputs there.
        module.to(trainer.strategy.root_device)
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0] if validate else {}
    if not trainer.is_global_zero:
        return {}
    checkpoint = Path(trainer.checkpoint_callback.last_model_path or find_resume_checkpoint(run_dir))
    trained = module
    if STRATEGIES[cfg.trainer.strategy]:  # DeepSpeed/FSDP: live weights are bf16 or shards, the checkpoint is fp32
        trained = load_into(type(module)(**module.hparams), checkpoint)
    outputs = {"run_dir": run_dir, "checkpoint": checkpoint,
               **export(trained, Export(run_dir / "export", trainer.global_step, metrics))}
    for name in report:
        if f"val/{name}" in metrics:
            outputs[name] = round(float(metrics[f"val/{name}"]), 3)
    outputs["wandb"] = close_wandb(trainer)
    print_outputs(outcome, outputs)
    return outputs


def describe(headline: str, module: Method, cfg, trainer: L.Trainer) -> str:
    """The numbers a run derives, printed once at start (as facebookresearch/mae main_pretrain.py does)."""
    o, t = cfg.optim, cfg.trainer
    eff_batch = effective_batch(cfg.data.batch_size, t.accumulate_grad_batches, trainer.world_size)
    params = sum(p.numel() for p in module.parameters())
    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    flops = f", {module.flops_per_sample / 1e9:.2f} GFLOPs/image per training step" if module.flops_per_sample else ""
    if isinstance(o, LARSConfig):
        name, details = "", f", LARS momentum {o.momentum}, weight decay {o.weight_decay}"
    else:
        name = f"{getattr(o, 'name', 'adamw')} "
        details = f", layer decay {o.layer_decay}" if hasattr(o, "layer_decay") else ""
    return (f"{headline}: {params / 1e6:.1f}M params ({trained:,} trained){flops}\n"
            f"effective batch {eff_batch} = {cfg.data.batch_size} per device x {t.accumulate_grad_batches} "
            f"accumulation x {trainer.world_size} devices\n"
            f"{name}lr {module.lr:.3e} = blr {o.blr:.3e} x {eff_batch} / 256"
            + (" (overridden by optim.lr)" if o.lr is not None else "")
            + f"{details}; {o.warmup_steps} warmup steps of {t.max_steps}, precision {trainer.precision}")


def fit_outcome(trainer: L.Trainer) -> FitOutcome:
    """Why ``fit`` returned: finished, stopped by a signal (resume later), or stopped by the non-finite guard."""
    for callback in trainer.callbacks:
        if isinstance(callback, NonFiniteLossGuard) and callback.stopped is not None:
            return FitOutcome(False, f"Stopped at step {trainer.global_step}: non-finite loss (see above); the "
                                     f"state before the first bad step is in {callback.stopped}.", 1)
        if isinstance(callback, PreemptionHandler) and callback.stopped_at is not None:
            then = ("the requeued job resumes from it" if callback.requeued
                    else "rerun the same command (or resubmit the sbatch script) to resume from it")
            return FitOutcome(False, f"Stopped by a signal at step {callback.stopped_at}: saved {callback.checkpoint}; "
                                     f"{then}.", 0)
    if trainer.global_step < (trainer.max_steps or 0):
        return FitOutcome(False, f"Stopped at step {trainer.global_step} of {trainer.max_steps}.", 1)
    return FitOutcome(True, f"Done at step {trainer.global_step}.", 0)


def close_wandb(trainer: L.Trainer) -> Path | None:
    """Finish this run's W&B run (rank 0 holds it), so that a next recipe in this process opens its own instead
    of appending to this one; returns its directory."""
    wandb = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger) and wandb_run_started(logger)]
    if not trainer.is_global_zero or not wandb:
        return None
    directory = Path(wandb[0].experiment.dir).parent
    wandb[0].experiment.finish()
    trainer.loggers = [logger for logger in trainer.loggers if not isinstance(logger, WandbLogger)]
    return directory


def save_config(yaml_text: str, run_dir: Path) -> Path:
    """Write the resolved config; a rerun keeps the previous one as config.N.yaml so nothing is lost."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    if path.exists() and path.read_text() != yaml_text:
        n = 1
        while (run_dir / f"config.{n}.yaml").exists():
            n += 1
        path.rename(run_dir / f"config.{n}.yaml")
    path.write_text(yaml_text)
    return path


def start_run(trainer: L.Trainer, run_dir: Path, config_yaml: str) -> Path | None:
    """Where ``fit`` starts: the run directory's newest complete checkpoint, or None for a new run. Rank 0
    records the config and repairs a ``last.ckpt`` that a kill left one save behind."""
    resume = find_resume_checkpoint(run_dir)
    if trainer.is_global_zero:
        save_config(config_yaml, run_dir)
        if resume:
            bring_last_up_to_date(run_dir, resume)
        rank_zero_info(f"Resuming from {resume}" if resume else f"Starting a new run in {run_dir}")
    return resume


def print_outputs(outcome: FitOutcome, outputs: dict) -> None:
    """How every run ends: why it stopped and where everything is."""
    print(f"\n{outcome.message}")
    width = max([14, *map(len, outputs)])
    for name, value in outputs.items():
        print(f"  {name:<{width}} {value}")
    print(f"  upload the W&B run with: wandb sync {outputs['wandb']}")
