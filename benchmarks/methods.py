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
from datamodules.video_segmentation import VideoSegmentationDataConfig, VideoSegmentationDataModule, check_video_shards
from models.sam.sam2 import SAM2_CONFIGS
from trainers.classification import (AugmentConfig, ClassifierConfig, EMAConfig, FinetuneOptimConfig,
                                     ImageClassification, classifier_kwargs)
from trainers.contrastive import ContrastiveOptimConfig, ContrastivePretraining
from trainers.mae import MAEModelConfig, MAEPretraining
from trainers.optim import OptimConfig, resolve_lr
from trainers.sam2 import SAM2ModelConfig, SAM2OptimConfig, SAM2PromptConfig, SAM2Training
from trainers.weakly_supervised import WeaklySupervisedPretraining, WSPOptimConfig

DEFAULT_MODELS = {"mae": "mae_vit_tiny_patch8", "finetune": "vit_tiny_patch8", "swag": "vit_tiny_patch8",
                  "pe": "pe_core_nano", "sam2": "sam2.1_hiera_nano"}


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


class StepCountingSAM2(SAM2Training):
    """SAM2Training whose prompt decisions follow the optimizer steps in a plain loop too. They are drawn from
    (seed, global step), and without a Trainer a LightningModule's global step stays 0: a plain loop would repeat
    step 0's decisions (mask prompt or clicks, how many frames get correction clicks, so the work of the step)
    while Lightning draws new ones every step. Here a module without a Trainer counts its own optimizer steps."""

    plain_steps = 0

    @property
    def global_step(self) -> int:
        trainer = self.attached_trainer()
        return trainer.global_step if trainer is not None else self.plain_steps

    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        if self.attached_trainer() is None:
            self.plain_steps += 1


def sam2(cfg: Config, name: str, data: DataConfig, total: int, run_dir: Path) -> Method:
    """SAM 2 video training with the recipe's defaults (recipes/sam2_train.py: one mask on tracked frames, sam2's
    MOSE prompt simulation, AdamW with layer decay); the gradient clipping of the recipe's Trainer is not applied,
    as the plain loop has none."""
    if name not in SAM2_CONFIGS:
        raise ValueError(f"--trainer sam2 trains SAM 2 on clips: --model.name must be one of {', '.join(SAM2_CONFIGS)}")
    side = SAM2_CONFIGS[name].image_size
    if cfg.image_size != side:
        raise ValueError(f"{name} takes {side} x {side} frames: add --image_size {side}")
    if cfg.decode != "host":
        raise ValueError("--trainer sam2 decodes its clips in the loader workers: --decode host")
    data = VideoSegmentationDataConfig(**asdict(data), num_frames=cfg.num_frames, max_objects=cfg.objects)
    if cfg.data == "shards":
        check_video_shards(data)  # without --shards: the synthetic world's videos, not its images
    optim = SAM2OptimConfig()
    module = StepCountingSAM2(SAM2ModelConfig(name=name, multimask_output_for_tracking=False), SAM2PromptConfig(),
                              optim, resolve_lr(optim, cfg.batch_size), total, seed=cfg.seed)
    return Method(module, data, lambda: VideoSegmentationDataModule(data, cfg.seed),
                  {"num_frames": cfg.num_frames, "objects": cfg.objects})


METHODS = {"mae": mae, "finetune": finetune, "swag": swag, "pe": pe, "sam2": sam2}


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
