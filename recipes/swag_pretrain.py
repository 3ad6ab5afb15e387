"""SWAG-style weakly-supervised pretraining on hashtags (Singh et al. 2022), the second stage of MAWS (2023).

    python -m recipes.swag_pretrain                  # tiny ViT on the built-in synthetic world, minutes on a CPU
    python -m recipes.swag_pretrain --config recipes/configs/swag_vit_huge_ig.yaml --help

Counts the hashtag vocabulary once per run dir (hashtag_vocab.json), resumes on a rerun (a finished run does not
train again) and exports the backbone without its head to <run_dir>/export/encoder.safetensors (timm keys for ViTs).
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.utilities import rank_zero_info

import models
from datamodules.hashtags import (VOCABULARY_FILE, HashtagDataConfig, ensure_vocabulary, hashtag_datamodule,
                                  zero_shot_class_map)
from datamodules.sharded import resolve_shards
from recipes.cli import parse_config, start_run
from trainers.build import STRATEGIES, LoggingConfig, TrainerConfig, build_trainer, finished_fit, print_outputs, uses_gpu
from trainers.callbacks import ThroughputLogger
from trainers.checkpoint import find_resume_checkpoint
from trainers.handoff import init_backbone, load_into
from trainers.optim import effective_batch, resolve_lr
from trainers.weakly_supervised import WeaklySupervisedPretraining, WSPModelConfig, WSPOptimConfig, export_trunk


@dataclass
class EvalConfig:
    class_hashtags: str = "names"
    """Zero-shot class -> hashtags: "names" maps each class (names from the shards' json "class_name" or a
    classes.json beside them) to the hashtag spelled like it; or a JSON file {class name: [hashtags]} in label order."""
    prior_power: float = 1.0
    """Calibration toward a uniform prior: hashtag probabilities are divided by prior^power (0: none)."""
    reduce: Literal["sum", "max"] = "sum"
    """How a class combines the calibrated probabilities of its hashtags."""


@dataclass
class Config:
    run_dir: str = "runs/swag_pretrain"
    """Run directory: config, vocabulary, checkpoints, W&B run and exported weights. Reusing it resumes."""
    seed: int = 0
    """Seed of weights, data order and resampling."""
    init_from: str | None = None
    """Start a new run from an earlier stage's weights (e.g. an MAE run dir, as MAWS does); the hashtag head
    starts fresh. Ignored when run_dir already has a checkpoint."""
    model: WSPModelConfig = field(default_factory=WSPModelConfig)
    """The backbone."""
    data: HashtagDataConfig = field(default_factory=HashtagDataConfig)
    """Shards, batch, loader, hashtag vocabulary and class balancing."""
    optim: WSPOptimConfig = field(default_factory=WSPOptimConfig)
    """Optimizer and the warmup + cosine schedule."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Devices, strategy, precision, steps and checkpoint cadence."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """W&B."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Zero-shot classification through the hashtag head."""


def main(cfg: Config, config_yaml: str = "") -> dict:
    run_dir = Path(cfg.run_dir).resolve()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model_kwargs = {"name": cfg.model.name, "img_size": cfg.data.image_size, "drop_path_rate": cfg.model.drop_path_rate}
    with torch.device("meta"):
        models.create(**model_kwargs, num_classes=1)  # a typo fails before any data or compute

    resolve_shards(cfg.data)  # the synthetic world unless shards are given; a spec matching nothing fails here

    peak = get_available_flops(torch.device("cuda"), torch.bfloat16) if uses_gpu(cfg.trainer) else None
    throughput = ThroughputLogger(cfg.data.batch_size, cfg.trainer.log_every_n_steps, None, peak)
    trainer = build_trainer(cfg.trainer, cfg.logging, run_dir, callbacks=[throughput],
                            batch_size_per_device=cfg.data.batch_size, seed=cfg.seed)

    d = cfg.data
    vocab = ensure_vocabulary(run_dir / VOCABULARY_FILE, d, trainer.is_global_zero)  # rank 0 writes, others wait
    datamodule = hashtag_datamodule(d, vocab, seed=cfg.seed)

    eff_batch = effective_batch(d.batch_size, cfg.trainer.accumulate_grad_batches, trainer.world_size)
    lr = resolve_lr(cfg.optim, eff_batch)
    model_kwargs["num_classes"] = len(vocab)
    module = WeaklySupervisedPretraining(
        model_kwargs, asdict(cfg.optim), lr, cfg.trainer.max_steps, zero_shot_class_map(vocab, cfg.eval.class_hashtags),
        {"prior_power": cfg.eval.prior_power, "reduce": cfg.eval.reduce}, vocab.tags,
        torch.tensor(vocab.training_prior(d.balance_power)))
    throughput.flops_per_sample = module.flops_per_sample
    rank_zero_info(
        f"SWAG {cfg.model.name} @ {d.image_size}px, {len(vocab)} hashtags: {module.num_params / 1e6:.1f}M params, "
        f"{module.flops_per_sample / 1e9:.2f} GFLOPs/image per training step\neffective batch "
        f"{eff_batch} = {d.batch_size} per device x {cfg.trainer.accumulate_grad_batches} accumulation x "
        f"{trainer.world_size} devices\n"
        f"{cfg.optim.name} lr {lr:.3e} = blr {cfg.optim.blr:.3e} x {eff_batch} / 256"
        + (" (overridden by optim.lr)" if cfg.optim.lr is not None else "")
        + f"; {cfg.optim.warmup_steps} warmup steps of {cfg.trainer.max_steps}, precision {trainer.precision}")

    resume = start_run(trainer, run_dir, config_yaml)
    if cfg.init_from and resume is None:
        report = init_backbone(module.model, cfg.init_from, reset_head=True)  # hashtag heads never carry over
        rank_zero_info("\n  ".join([f"Initialised the backbone from {cfg.init_from}:", *report]))
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)

    outcome = finished_fit(trainer)
    if outcome is None:  # preempted or stopped by the guard: nothing to evaluate or export yet
        return {}
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0] if d.val_shards else {}
    if not trainer.is_global_zero:
        return {}
    checkpoint = Path(trainer.checkpoint_callback.last_model_path or find_resume_checkpoint(run_dir))
    model = module.model
    if STRATEGIES[cfg.trainer.strategy]:  # DeepSpeed/FSDP: live weights are bf16 or shards, the checkpoint is fp32
        model = load_into(models.create(**model_kwargs, num_classes=len(vocab)), checkpoint, prefix="model.")
    outputs = {
        "run_dir": run_dir,
        "checkpoint": checkpoint,
        "encoder": export_trunk(model, model_kwargs, run_dir / "export" / "encoder.safetensors",
                                step=trainer.global_step, source=cfg.model.name, num_hashtags=len(vocab)),
        **{name: metrics.get(f"val/{name}") for name in ("precision@1", "precision@5", "zero_shot_top1")},
        "wandb": Path(trainer.loggers[0].experiment.dir).parent,
    }
    print_outputs(outcome, outputs)
    return outputs


if __name__ == "__main__":
    main(*parse_config(Config, description=__doc__))
