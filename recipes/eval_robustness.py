"""Corruption robustness of a checkpoint: top-1 error under the 15 ImageNet-C and 10 ImageNet-C-bar
corruptions at 5 severities, per corruption, per severity and overall.

    python -m recipes.eval_robustness --init_from runs/mae_prepretrain      # synthetic world, a few minutes
    python -m recipes.eval_robustness --init_from runs/finetune --corruptions imagenet_c_bar --severities 3
    python -m recipes.eval_robustness --init_from RUN --data.val_shards 'in1k/val-*.tar' \
        --data.train_shards 'in1k/train-*.tar' --data.image_size 224 --data.eval_images null

A checkpoint without a classifier for the data's classes (MAE) gets a linear head fitted on its frozen
features first. Writes <run_dir>/robustness.json and robustness.md and prints the table.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import lightning as L

from datamodules.classification import EvalDataConfig, prepare_eval_data
from datamodules.image_sets import load_image_set
from evaluation.corruptions import SEVERITIES, get_corruption, parse_names
from evaluation.robustness import RobustnessResult, evaluate_robustness
from recipes.cli import run_command
from trainers.eval_model import EvalModelConfig, load_eval_model
from trainers.run import compute_begins, save_config


@dataclass
class Config:
    init_from: str
    """The checkpoint to evaluate: a run dir (any Prism recipe), .ckpt, DeepSpeed dir or .safetensors export."""
    run_dir: str = "runs/eval_robustness"
    """Where robustness.json, robustness.md and config.yaml are written."""
    seed: int = 0
    """Seed of the corruption draws (each corruption x severity has its own stream) and of the head fit."""
    corruptions: str = "all"
    """Comma-separated corruption names or families: 'all', 'imagenet_c', 'imagenet_c_bar', 'fog', ..."""
    severities: list[int] = field(default_factory=lambda: list(SEVERITIES))
    """Severities to evaluate, from 1..5."""
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    """The network and, if it has no head, the linear head's fit."""
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """Evaluation images (and training images for a head fit)."""

    def __post_init__(self):
        bad = [s for s in self.severities if s not in SEVERITIES]
        if bad or not self.severities:
            raise ValueError(f"--severities must be a non-empty list from {list(SEVERITIES)}, got {self.severities}")


def main(cfg: Config, config_yaml: str = "") -> RobustnessResult:
    run_dir = Path(cfg.run_dir).resolve()
    L.seed_everything(cfg.seed, verbose=False)
    names = parse_names(cfg.corruptions)
    for name in names:
        get_corruption(name)  # an unknown name fails now, before the model loads
    num_classes, train_shards, val_shards = prepare_eval_data(cfg.data)
    model = load_eval_model(cfg.init_from, cfg.model, num_classes, cfg.data.image_size,
                            partial(load_image_set, train_shards, cfg.data.image_size, desc="head-fitting images"))
    images = load_image_set(val_shards, cfg.data.image_size, cfg.data.eval_images, desc="evaluation images")
    workers = model.corruption_workers(cfg.data.num_workers)
    print(f"Evaluating {cfg.init_from} on {len(images)} images at {cfg.data.image_size}px: {len(names)} corruptions "
          f"x severities {cfg.severities} (model on {model.device}, {workers} corruption worker processes)")
    compute_begins()
    started = time.perf_counter()
    result = evaluate_robustness(model.classify, images.images, images.labels, names, cfg.severities,
                                 seed=cfg.seed, batch_size=cfg.model.batch_size, workers=workers)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config_yaml, run_dir)
    (run_dir / "robustness.json").write_text(result.to_json())
    (run_dir / "robustness.md").write_text(result.table() + "\n")
    print(result.table())
    summary = {"clean error": result.clean_error,
               **{f"{f} mean error": result.overall(f) for f in ("imagenet_c", "imagenet_c_bar")
                  if f in result.families.values()}}
    print(json.dumps({k: round(v, 2) for k, v in summary.items()}))
    print(f"Took {time.perf_counter() - started:.0f} s. Results: {run_dir / 'robustness.json'}, "
          f"{run_dir / 'robustness.md'}")
    return result


if __name__ == "__main__":
    run_command(main, Config, __doc__)
