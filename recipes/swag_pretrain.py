"""SWAG-style weakly-supervised pretraining on hashtags (Singh et al. 2022), the second stage of MAWS (2023).

    python -m recipes.swag_pretrain                  # tiny ViT on the built-in synthetic world, minutes on a CPU
    python -m recipes.swag_pretrain --config recipes/configs/swag_vit_huge_ig.yaml --help

Counts the hashtag vocabulary once per run dir (hashtag_vocab.json), resumes on a rerun (a finished run does not
train again) and exports the backbone without its head to <run_dir>/export/encoder.safetensors (timm keys for ViTs).
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_only

import models
from datamodules.hashtags import (VOCABULARY_FILE, HashtagDataConfig, ensure_vocabulary, hashtag_datamodule,
                                  zero_shot_class_map)
from datamodules.sharded import resolve_shards
from recipes.cli import run_command
from trainers.build import LoggingConfig, TrainerConfig
from trainers.run import Export, run
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
    d = cfg.data
    model = {"name": cfg.model.name, "img_size": d.image_size, "drop_path_rate": cfg.model.drop_path_rate}
    with torch.device("meta"):
        models.create(**model, num_classes=1)  # a typo fails before any data or compute

    resolve_shards(d)  # the synthetic world unless shards are given; a spec matching nothing fails here
    # Global rank 0 (from the launcher's environment) counts and writes the vocabulary; the other ranks wait for it.
    vocab = ensure_vocabulary(Path(cfg.run_dir) / VOCABULARY_FILE, d, is_writer=rank_zero_only.rank == 0)
    datamodule = hashtag_datamodule(d, vocab, seed=cfg.seed)
    model["num_classes"] = len(vocab)

    def method(lr: float) -> WeaklySupervisedPretraining:
        return WeaklySupervisedPretraining(
            model, cfg.optim, lr, cfg.trainer.max_steps, zero_shot_class_map(vocab, cfg.eval.class_hashtags),
            {"prior_power": cfg.eval.prior_power, "reduce": cfg.eval.reduce}, vocab.tags,
            torch.tensor(vocab.training_prior(d.balance_power)))

    def export(trained: WeaklySupervisedPretraining, out: Export) -> dict:
        return {"encoder": export_trunk(trained.model, model, out.dir / "encoder.safetensors", step=out.step,
                                        source=cfg.model.name, num_hashtags=len(vocab))}

    return run(cfg, config_yaml, method, datamodule, export=export, validate=bool(d.val_shards),
               headline=f"SWAG {cfg.model.name} @ {d.image_size}px, {len(vocab)} hashtags",
               report=("precision@1", "precision@5", "zero_shot_top1"))


if __name__ == "__main__":
    run_command(main, Config, __doc__)
