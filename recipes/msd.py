"""Minimal Sample Distance between an augmentation policy and each corruption, and its relation to the
corruption error (Mintun, Kirillov & Xie, NeurIPS 2021).

    python -m recipes.msd --init_from runs/mae_prepretrain                   # synthetic world, a few minutes
    python -m recipes.msd --init_from RUN --augmentation augmix-m5-w3-d1 --errors_from runs/eval_robustness
    python -m recipes.msd --init_from RUN --images 100 --augmentation_samples 100000 --corruption_samples 100

Features are the checkpoint's pre-logits features (the paper: a clean-trained network's penultimate layer)
on a fixed set of unaugmented training images. The corruption errors come from an eval_robustness run
(--errors_from) or are measured here. Writes msd.json, msd.md and msd_vs_error.png to --run_dir.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
from scipy.stats import spearmanr
from tqdm import tqdm

from datamodules.classification import EvalDataConfig, prepare_eval_data
from datamodules.image_sets import load_image_set
from evaluation.corruptions import parse_names
from evaluation.msd import (CorruptionDistribution, augmentation_policy, distance_of_means,
                            minimal_sample_distance, transform_features)
from evaluation.robustness import RobustnessResult, evaluate_robustness
from recipes.cli import run_command
from trainers.eval_model import EvalModelConfig, load_eval_model
from trainers.run import compute_begins, save_config


@dataclass
class Config:
    init_from: str
    """The feature network: a run dir (any Prism recipe), .ckpt, DeepSpeed dir or .safetensors export."""
    run_dir: str = "runs/msd"
    """Where msd.json, msd.md, msd_vs_error.png and config.yaml are written."""
    seed: int = 0
    """Seed of the augmentation and corruption draws."""
    augmentation: str = "rand-m9-mstd0.5-inc1"
    """The augmentation distribution: 'crop_flip' (random resized crop + flip), a timm RandAugment string
    ('rand-m9-mstd0.5-inc1'), AutoAugment ('original', 'v0'), AugMix ('augmix-m5-w3-d1'), or
    'corruption:<name>' (a corruption at a random severity)."""
    corruptions: str = "all"
    """Comma-separated corruption names or families: 'all', 'imagenet_c', 'imagenet_c_bar', 'fog', ..."""
    images: int = 32
    """Unaugmented training images whose mean feature is a transform's feature (paper: 100)."""
    augmentation_samples: int = 48
    """Sampled augmentations the minimum runs over (paper: 100,000; its notebook: 1,000)."""
    corruption_samples: int = 8
    """Sampled corruptions (severity uniform over 1..5) whose mean feature is the target (paper: 100)."""
    errors_from: str | None = None
    """An eval_robustness run dir (or its robustness.json) with this model's corruption errors; None measures
    them here on --data.eval_images images."""
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    """The feature network and, if it has no head, the linear head fitted for measuring errors."""
    data: EvalDataConfig = field(default_factory=lambda: EvalDataConfig(eval_images=64))
    """Training images (the fixed set and a head fit) and evaluation images (errors)."""

    def __post_init__(self):
        for name in ("images", "augmentation_samples", "corruption_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")


def main(cfg: Config, config_yaml: str = "") -> dict:
    run_dir = Path(cfg.run_dir).resolve()
    L.seed_everything(cfg.seed, verbose=False)
    names = parse_names(cfg.corruptions)
    corruptions = {name: CorruptionDistribution(name) for name in names}  # unknown names fail here
    augmentation = augmentation_policy(cfg.augmentation, cfg.data.image_size)
    errors = _read_errors(cfg.errors_from, names) if cfg.errors_from else None
    num_classes, train_shards, val_shards = prepare_eval_data(cfg.data)
    model = load_eval_model(cfg.init_from, cfg.model, num_classes, cfg.data.image_size,
                            partial(load_image_set, train_shards, cfg.data.image_size, desc="head-fitting images"))
    fixed = load_image_set(train_shards, cfg.data.image_size, cfg.images, desc="the fixed image set").images
    rng = np.random.default_rng(cfg.seed)
    compute_begins()
    started = time.perf_counter()

    with tqdm(total=cfg.augmentation_samples + cfg.corruption_samples * len(names), desc="transform features") as bar:
        augmented = transform_features(model.features, fixed, augmentation, cfg.augmentation_samples, rng,
                                       cfg.model.batch_size, bar.update)
        table = {}
        for name, corruption in corruptions.items():
            corrupted = transform_features(model.features, fixed, corruption, cfg.corruption_samples, rng,
                                           cfg.model.batch_size, bar.update)
            table[name] = {"family": corruption.corruption.family,
                           "msd": minimal_sample_distance(augmented, corrupted),
                           "distance_of_means": distance_of_means(augmented, corrupted)}
    if errors is None:
        images = load_image_set(val_shards, cfg.data.image_size, cfg.data.eval_images, desc="evaluation images")
        measured = evaluate_robustness(model.classify, images.images, images.labels, names,
                                       seed=cfg.seed, batch_size=cfg.model.batch_size,
                                       workers=model.corruption_workers(cfg.data.num_workers))
        errors = measured.per_corruption()
    for name in names:
        table[name]["error"] = errors[name]

    correlation = {key: _spearman([table[n][key] for n in names], [table[n]["error"] for n in names])
                   for key in ("msd", "distance_of_means")}
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config_yaml, run_dir)
    markdown = _markdown(cfg.augmentation, table, correlation)
    (run_dir / "msd.json").write_text(json.dumps({"augmentation": cfg.augmentation, "corruptions": table,
                                                  "spearman_vs_error": correlation}, indent=2))
    (run_dir / "msd.md").write_text(markdown + "\n")
    _plot(table, cfg.augmentation, run_dir / "msd_vs_error.png")
    print(markdown)
    print(f"Took {time.perf_counter() - started:.0f} s. Results: {run_dir / 'msd.json'}, {run_dir / 'msd.md'}, "
          f"{run_dir / 'msd_vs_error.png'}")
    return {"table": table, "spearman_vs_error": correlation}


def _read_errors(source: str, names: list[str]) -> dict[str, float]:
    path = Path(source)
    path = path / "robustness.json" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"--errors_from {source}: no robustness.json there; run recipes.eval_robustness first")
    errors = RobustnessResult.from_json(path.read_text()).per_corruption()
    missing = [n for n in names if n not in errors]
    if missing:
        raise ValueError(f"--errors_from {path} has no errors for {missing}; evaluate them with "
                         f"recipes.eval_robustness --corruptions {','.join(missing)}, or leave --errors_from out")
    return errors


def _spearman(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None  # undefined for fewer than three points or a constant column
    return float(spearmanr(x, y).statistic)


def _markdown(augmentation: str, table: dict, correlation: dict) -> str:
    rows = [f"Augmentation `{augmentation}`", "", "| corruption | family | MSD | distance of means | error (%) |",
            "|---|---|---:|---:|---:|"]
    for name, row in sorted(table.items(), key=lambda item: item[1]["msd"]):
        rows.append(f"| {name} | {row['family']} | {row['msd']:.3f} | {row['distance_of_means']:.3f} | "
                    f"{row['error']:.1f} |")
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    rows += ["", f"Spearman correlation with the error: MSD {fmt(correlation['msd'])}, distance of means "
                 f"{fmt(correlation['distance_of_means'])}"]
    return "\n".join(rows)


def _plot(table: dict, augmentation: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for family, marker in (("imagenet_c", "o"), ("imagenet_c_bar", "s")):
        rows = {n: r for n, r in table.items() if r["family"] == family}
        if not rows:
            continue
        ax.scatter([r["msd"] for r in rows.values()], [r["error"] for r in rows.values()], marker=marker,
                   label={"imagenet_c": "ImageNet-C", "imagenet_c_bar": "ImageNet-C-bar"}[family])
        for name, r in rows.items():
            ax.annotate(name, (r["msd"], r["error"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel(f"Minimal Sample Distance to {augmentation}")
    ax.set_ylabel("top-1 error under the corruption (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    run_command(main, Config, __doc__)
