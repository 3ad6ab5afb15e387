"""The network an evaluation recipe measures: any Prism checkpoint as a classifier and a feature extractor.

The architecture is read from the source run's config.yaml unless given (an MAE run's ``mae_vit_*`` becomes
its encoder ``vit_*``). A checkpoint without a classifier for the evaluation's classes (MAE, SWAG's hashtag
head, a linear probe run's separate head) gets a linear head fitted on the fly: logistic regression on the
frozen pre-logits features of training images (evaluation/linear_head.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

import models
from datamodules import IMAGENET_MEAN, IMAGENET_STD
from datamodules.image_sets import load_image_set
from datamodules.sharded import resolve_shards
from evaluation.linear_head import fit_linear_head
from recipes.finetune import ClassificationDataConfig, prepare_data
from trainers.classification import classifier_kwargs
from trainers.handoff import classifier_name, init_backbone


@dataclass
class EvalModelConfig:
    name: str | None = None
    """Registered backbone name; None reads it from the init_from run's config.yaml (model.name, with an MAE
    model's encoder, mae_vit_* -> vit_*)."""
    global_pool: str = "token"
    """ViTs: 'token' (cls token after the final norm, MAE's linear probe features) or 'avg'."""
    head_fit_images: int = 1024
    """Training images whose frozen features fit a linear head when the checkpoint has none for these classes."""
    batch_size: int = 64
    """Images per forward pass."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu' or 'cuda'."""


class EvalModel:
    """A classifier (timm-style: forward_features / forward_head) run on uint8 (B, H, W, 3) numpy images."""

    def __init__(self, network: nn.Module, device: torch.device):
        self.network, self.device = network.eval().to(device), device
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        self.autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")

    def _inputs(self, images: np.ndarray) -> Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        return (x.permute(0, 3, 1, 2).float() / 255 - self.mean) / self.std

    @torch.no_grad()
    def features(self, images: np.ndarray) -> Tensor:
        """Pre-logits features (B, D): the penultimate layer."""
        with self.autocast:
            return self.network.forward_head(self.network.forward_features(self._inputs(images)),
                                             pre_logits=True).float()

    @torch.no_grad()
    def classify(self, images: np.ndarray) -> Tensor:
        with self.autocast:
            return self.network(self._inputs(images)).float()

    def corruption_workers(self, requested: int | None) -> int:
        """--data.num_workers, with None resolved for this model's device."""
        if requested is not None:
            return requested
        return 0 if self.device.type == "cpu" else min(8, max(1, (os.cpu_count() or 2) - 1))

    def features_of(self, images: np.ndarray, batch_size: int) -> Tensor:
        return torch.cat([self.features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def source_model_name(init_from: str) -> str:
    """model.name from the config.yaml of the run that holds ``init_from`` (a run dir or a file inside one)."""
    path = Path(init_from).resolve()
    for folder in [path, *path.parents][:4]:
        config = folder / "config.yaml"
        if config.is_file():
            name = ((yaml.safe_load(config.read_text()) or {}).get("model") or {}).get("name")
            if name:
                return name.removeprefix("mae_")
    raise ValueError(f"Cannot tell which model {init_from} holds: no config.yaml with model.name in it or its "
                     "parents. Pass --model.name (e.g. vit_tiny_patch8).")


def load_eval_model(init_from: str, cfg: EvalModelConfig, num_classes: int, image_size: int,
                    train_shards: list[str]) -> EvalModel:
    """Build the backbone, load ``init_from`` into it, and fit a linear head if it has none for ``num_classes``."""
    name = cfg.name or source_model_name(init_from)
    network = models.create(**classifier_kwargs(name, num_classes, image_size, cfg.global_pool))
    lines = init_backbone(network, init_from)
    for line in lines:
        rank_zero_info(line)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if cfg.device == "auto" else cfg.device)
    model = EvalModel(network, device)
    # init_backbone reports a head it had to create: the source has no classifier for these classes.
    if any(line.startswith("head: new") for line in lines):
        fit = load_image_set(train_shards, image_size, cfg.head_fit_images, desc="head-fitting images")
        if (fit.labels < 0).any():
            raise ValueError("Fitting a linear head needs labelled training shards (a 'cls' field in each sample)")
        features = model.features_of(fit.images, cfg.batch_size)
        head = fit_linear_head(features.cpu(), torch.from_numpy(fit.labels), num_classes)
        network.get_submodule(classifier_name(network)).load_state_dict(head.state_dict())
        train_acc = 100.0 * float((head(features.cpu()).argmax(1).numpy() == fit.labels).mean())
        rank_zero_info(f"head: fitted a linear head (logistic regression, L-BFGS) on the frozen features of "
                       f"{len(fit)} training images; training accuracy {train_acc:.1f}%")
    return model


@dataclass
class EvalDataConfig:
    train_shards: str | None = None
    """Labelled training shards, read only to fit a linear head when the checkpoint has none. None: the
    built-in synthetic world (filled in, with val_shards)."""
    val_shards: str | None = None
    """The evaluation images' shards (labelled)."""
    image_size: int = 64
    """Side of the evaluated images: resize the short side to size / 0.875, center crop (ImageNet-C: 224)."""
    num_classes: int | None = None
    """Classes of the labels; None: classes.json next to the train shards, or 10 for the synthetic world."""
    eval_images: int | None = 128
    """Evaluate the first N images of val_shards (None: all; ImageNet-C uses the 50,000 of IN-1k val)."""
    num_workers: int | None = None
    """Processes that corrupt images while the model runs (0: in turn, in this process). None: 0 when the model
    runs on the CPU (both would share the same cores), else one per CPU core up to 8. Results do not depend on
    it: the corruption parameters are drawn in this process."""

    def __post_init__(self):
        for name in ("image_size", "eval_images", "num_classes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--data.{name} must be >= 1, got {value}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"--data.num_workers must be >= 0, got {self.num_workers}")


def prepare_eval_data(data: EvalDataConfig) -> tuple[int, list[str], list[str]]:
    """Fill in the synthetic world, check the shard specs; returns (num_classes, train shards, val shards)."""
    classification = ClassificationDataConfig(train_shards=data.train_shards, val_shards=data.val_shards,
                                              image_size=data.image_size, num_classes=data.num_classes)
    num_classes = prepare_data(classification)
    shards = resolve_shards(classification)
    if len(shards) < 2:
        raise ValueError("Evaluation needs --data.val_shards (labelled images to evaluate on).")
    data.train_shards, data.val_shards = classification.train_shards, classification.val_shards
    return num_classes, shards[0], shards[1]


def parse_names(spec: str, choices: dict[str, tuple[str, ...]]) -> list[str]:
    """'all', a family name, or comma-separated names and families -> corruption names, in order, once each."""
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        out += choices.get(part, (part,))
    return list(dict.fromkeys(out))
