"""The network an evaluation recipe measures: any Prism checkpoint as an ``evaluation.model.EvalModel``.

The architecture is read from the source run's config.yaml unless given (an MAE run's ``mae_vit_*`` becomes
its encoder ``vit_*``). A checkpoint without a classifier for the evaluation's classes (MAE, SWAG's hashtag
head, a linear probe run's separate head) gets a linear head fitted on the fly on the frozen pre-logits
features of training images, which the caller reads (trainers do not read data).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from lightning.pytorch.utilities import rank_zero_info

import models
from evaluation.model import EvalModel, LabelledImages
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
                    head_images: Callable[[int], LabelledImages] | None) -> EvalModel:
    """Build the backbone, load ``init_from`` into it, and fit a linear head if it has none for ``num_classes``
    on ``head_images(cfg.head_fit_images)``: the first N labelled training images (None: there are none)."""
    name = cfg.name or source_model_name(init_from)
    network = models.create(**classifier_kwargs(name, num_classes, image_size, cfg.global_pool))
    lines = init_backbone(network, init_from)
    for line in lines:
        rank_zero_info(line)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    model = EvalModel(network, torch.device(auto if cfg.device == "auto" else cfg.device))
    # init_backbone reports a head it had to create: the source has no classifier for these classes.
    if any(line.startswith("head: new") for line in lines):
        if head_images is None:
            raise ValueError(f"{init_from} has no classifier for {num_classes} classes and no training images were "
                             "given to fit one on its features")
        fit = head_images(cfg.head_fit_images)
        train_acc = model.fit_head(network.get_submodule(classifier_name(network)), fit, cfg.batch_size)
        rank_zero_info(f"head: fitted a linear head (logistic regression, L-BFGS) on the frozen features of "
                       f"{len(fit.labels)} training images; training accuracy {train_acc:.1f}%")
    return model
