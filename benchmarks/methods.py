"""The methods the training benchmark runs, each with its defaults: the LightningModule, its data config, a maker of
fresh datamodules and what its synthetic batches carry besides images."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
from lightning.pytorch import LightningDataModule

from benchmarks.config import Config
from datamodules import IMAGENET_MEAN, IMAGENET_STD
from datamodules.captions import CaptionDataConfig, caption_datamodule
from datamodules.classification import ClassificationDataConfig, prepare_data
from datamodules.hashtags import VOCABULARY_FILE, HashtagDataConfig, ensure_vocabulary, hashtag_datamodule
from datamodules.sharded import DataConfig, ShardedDataModule, resolve_shards
from datamodules.transforms import eval_transform, finetune_train_transform, mae_train_transform
from trainers.classification import (AugmentConfig, ClassifierConfig, EMAConfig, FinetuneOptimConfig,
                                     ImageClassification, classifier_kwargs)
from trainers.contrastive import ContrastiveOptimConfig, ContrastivePretraining
from trainers.mae import MAEModelConfig, MAEPretraining
from trainers.optim import OptimConfig, resolve_lr
from trainers.weakly_supervised import WeaklySupervisedPretraining, WSPOptimConfig

DEFAULT_MODELS = {"mae": "mae_vit_tiny_patch8", "finetune": "vit_tiny_patch8", "swag": "vit_tiny_patch8",
                  "pe": "pe_core_nano"}


class Method(NamedTuple):
    """A method's module, its data config, a maker of fresh datamodules (one per run, the same seed) and what its
    synthetic batches carry besides images (``synthetic_batch``'s num_classes or vocab)."""
    module: L.LightningModule
    data: DataConfig
    datamodule: Callable[[], LightningDataModule]
    synthetic: dict


def mae(cfg: Config, name: str, data: DataConfig, total: int, run_dir: Path) -> Method:
    optim, size = OptimConfig(), cfg.image_size
    module = MAEPretraining({**asdict(MAEModelConfig(name=name)), "img_size": size}, asdict(optim),
                            resolve_lr(optim, cfg.batch_size), total)
    return Method(module, data, lambda: ShardedDataModule(data, mae_train_transform(size), eval_transform(size),
                                                          cfg.seed, IMAGENET_MEAN, IMAGENET_STD), {})


def finetune(cfg: Config, name: str, data: DataConfig, total: int, run_dir: Path) -> Method:
    data = ClassificationDataConfig(**asdict(data), num_classes=cfg.num_classes)
    classes = prepare_data(data) if cfg.data == "shards" else cfg.num_classes or 1000  # prepare_data resolves
    model, optim, augment, size = ClassifierConfig(name=name), FinetuneOptimConfig(), AugmentConfig(), cfg.image_size
    module = ImageClassification(classifier_kwargs(name, classes, size, model.global_pool, model.drop_path_rate),
                                 asdict(optim), resolve_lr(optim, cfg.batch_size), total, asdict(augment),
                                 asdict(EMAConfig()))
    return Method(module, data, lambda: ShardedDataModule(
        data, finetune_train_transform(size, augment.rand_augment), eval_transform(size), cfg.seed, IMAGENET_MEAN,
        IMAGENET_STD, required_keys=("jpg", "cls")), {"num_classes": classes})


def swag(cfg: Config, name: str, data: DataConfig, total: int, run_dir: Path) -> Method:
    data, vocabulary, prior = HashtagDataConfig(**asdict(data)), None, None
    if cfg.data == "shards":
        resolve_shards(data)
        vocabulary = ensure_vocabulary(run_dir / VOCABULARY_FILE, data, is_writer=True)
        prior = torch.tensor(vocabulary.training_prior(data.balance_power))
    vocab = vocabulary.tags if vocabulary else [f"tag{i}" for i in range(cfg.num_classes or 1000)]
    optim = WSPOptimConfig()
    module = WeaklySupervisedPretraining({"name": name, "img_size": cfg.image_size, "num_classes": len(vocab)},
                                         asdict(optim), resolve_lr(optim, cfg.batch_size), total, vocab=vocab,
                                         hashtag_prior=prior)
    return Method(module, data, lambda: hashtag_datamodule(data, vocabulary, seed=cfg.seed), {"vocab": vocab})


def pe(cfg: Config, name: str, data: DataConfig, total: int, run_dir: Path) -> Method:
    data, optim = CaptionDataConfig(**asdict(data)), ContrastiveOptimConfig()
    module = ContrastivePretraining({"name": name}, asdict(optim), resolve_lr(optim, cfg.batch_size), total,
                                    image_size=cfg.image_size)
    return Method(module, data, lambda: caption_datamodule(data, cfg.seed), {"context_length": data.context_length})


METHODS = {"mae": mae, "finetune": finetune, "swag": swag, "pe": pe}


def build_method(cfg: Config, total: int, run_dir: Path) -> tuple[str, Method]:
    """The model's name and the method of ``cfg.trainer``, its data config cut to one epoch of ``total`` batches
    (no loader restart) over the shards it will read, without validation."""
    name = cfg.model.name or DEFAULT_MODELS[cfg.trainer]
    data = DataConfig(train_shards=cfg.shards, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                      image_size=cfg.image_size, batches_per_epoch=total, decode=cfg.decode)
    method = METHODS[cfg.trainer](cfg, name, data, total, run_dir)
    if cfg.data == "shards":
        resolve_shards(method.data)  # the synthetic world unless --shards is given; a spec matching nothing fails
        method.data.val_shards = None  # validation stays out of both loops
    return name, method
