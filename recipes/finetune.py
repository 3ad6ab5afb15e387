"""End-to-end fine-tuning of a pretrained backbone for classification (MAE's protocol, He et al. 2022).

    python -m recipes.finetune --init_from runs/mae_prepretrain   # tiny ViT on the synthetic world, about a minute
    python -m recipes.finetune --help                             # every setting, with its meaning
    python -m recipes.finetune --config recipes/configs/finetune_vit_base_in1k.yaml --init_from runs/mae_vit_base
    python -m recipes.finetune --init_from RUN --data.train_shards 'shards/train-*.tar' \
        --data.val_shards 'shards/val-*.tar' --data.num_classes N      # shards of datamodules.make_shards

init_from takes any earlier stage (MAE, SWAG, finetune, linear probe: run dir, checkpoint or export), at any
resolution. Rerunning with the same --run_dir resumes; a finished run only re-evaluates. The classifier is
exported to <run_dir>/export/model.safetensors with timm keys.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fsspec
import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.utilities import rank_zero_info

from datamodules import IMAGENET_MEAN, IMAGENET_STD
from datamodules.sharded import DataConfig, ShardedDataModule, resolve_shards
from datamodules.synthetic import CLASS_NAMES
from datamodules.transforms import eval_transform, finetune_train_transform
from recipes.cli import parse_config, start_run
from trainers.build import STRATEGIES, LoggingConfig, TrainerConfig, build_trainer, uses_gpu
from trainers.callbacks import ThroughputLogger
from trainers.classification import (AugmentConfig, ClassifierConfig, EMAConfig, FinetuneOptimConfig,
                                     ImageClassification, classifier_kwargs, evaluate_and_export,
                                     training_flops_per_sample)
from trainers.handoff import load_into
from trainers.optim import effective_batch, resolve_lr


@dataclass
class ClassificationDataConfig(DataConfig):
    num_classes: int | None = None
    """Classes of the labels ("cls" in the shards). None: the length of classes.json next to the train
    shards (make_shards --format imagefolder writes it), or 10 for the synthetic world."""

    def __post_init__(self):
        super().__post_init__()
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"DataConfig.num_classes must be >= 1, got {self.num_classes} (--data.num_classes)")


@dataclass
class Config:
    run_dir: str = "runs/finetune"
    """Run directory: config, checkpoints, W&B run and exported weights. Reusing it resumes."""
    seed: int = 0
    """Seed of weights, augmentation and data order."""
    init_from: str | None = None
    """Weights of an earlier stage (run dir, .ckpt, DeepSpeed dir or .safetensors); None trains from scratch.
    Ignored when run_dir already has a checkpoint."""
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    """The classifier."""
    data: ClassificationDataConfig = field(default_factory=ClassificationDataConfig)
    """Shards, classes, batch and loader."""
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    """AdamW with layer-wise rate decay and the warmup + cosine schedule."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """RandAugment, random erasing, mixup / CutMix and label smoothing."""
    ema: EMAConfig = field(default_factory=EMAConfig)
    """Exponential moving average of the weights."""
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(max_steps=100, val_every_n_steps=50,
                                                                         checkpoint_every_n_steps=50))
    """Devices, strategy, precision, steps and checkpoint cadence."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """W&B logging."""

    def __post_init__(self):
        if self.augment.mixing and self.data.batch_size % 2:
            raise ValueError(f"Mixup/CutMix pair images within a batch: --data.batch_size must be even, got "
                             f"{self.data.batch_size} (or turn mixing off: --augment.mixup 0 --augment.cutmix 0).")
        if self.ema.enabled and (self.trainer.strategy == "fsdp" or "stage_3" in self.trainer.strategy):
            raise ValueError("--ema.enabled needs whole weights on every rank, which FSDP and ZeRO-3 shard: "
                             "use --trainer.strategy ddp or deepspeed_stage_1/2.")


def prepare_data(data: ClassificationDataConfig) -> int:
    """Fill in the synthetic world when no shards are given, check the specs; returns the number of classes."""
    synthetic = data.train_shards is None
    shards = resolve_shards(data)
    if data.num_classes is not None or synthetic:
        return data.num_classes or len(CLASS_NAMES)
    classes = shards[0][0].rsplit("/", 1)[0] + "/classes.json"
    try:
        with fsspec.open(classes, "r") as f:
            return len(json.load(f))
    except (OSError, ValueError) as err:
        raise ValueError(f"The number of classes is unknown: --data.num_classes is not set and {classes} cannot be "
                         f"read ({err}). Pass --data.num_classes N, or write the shards with `python -m "
                         "datamodules.make_shards --format imagefolder`, which writes classes.json.") from None


def main(cfg: Config, config_yaml: str = "") -> dict:
    run_dir = Path(cfg.run_dir).resolve()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    num_classes = prepare_data(cfg.data)
    # Checked on the meta device: a typo in the model name fails before any data or compute.
    model_kwargs = classifier_kwargs(cfg.model.name, num_classes, cfg.data.image_size, cfg.model.global_pool,
                                     cfg.model.drop_path_rate)
    datamodule = ShardedDataModule(cfg.data, finetune_train_transform(cfg.data.image_size, cfg.augment.rand_augment),
                                   eval_transform(cfg.data.image_size), seed=cfg.seed, mean=IMAGENET_MEAN,
                                   std=IMAGENET_STD, required_keys=("jpg", "cls"))
    peak = get_available_flops(torch.device("cuda"), torch.bfloat16) if uses_gpu(cfg.trainer) else None
    throughput = ThroughputLogger(cfg.data.batch_size, cfg.trainer.log_every_n_steps,
                                  training_flops_per_sample(model_kwargs), peak)
    trainer = build_trainer(cfg.trainer, cfg.logging, run_dir, callbacks=[throughput],
                            batch_size_per_device=cfg.data.batch_size, seed=cfg.seed)
    eff_batch = effective_batch(cfg.data.batch_size, cfg.trainer.accumulate_grad_batches, trainer.world_size)
    lr = resolve_lr(cfg.optim, eff_batch)
    module = ImageClassification(model_kwargs, asdict(cfg.optim), lr, cfg.trainer.max_steps, asdict(cfg.augment),
                                 asdict(cfg.ema))
    rank_zero_info(
        f"Fine-tune {cfg.model.name} @ {cfg.data.image_size}px, {num_classes} classes: "
        f"{sum(p.numel() for p in module.model.parameters()) / 1e6:.1f}M params\n"
        f"effective batch {eff_batch} = {cfg.data.batch_size} per device x "
        f"{cfg.trainer.accumulate_grad_batches} accumulation x {trainer.world_size} devices\n"
        f"lr {lr:.3e} = blr {cfg.optim.blr:.3e} x {eff_batch} / 256"
        + (" (overridden by optim.lr)" if cfg.optim.lr is not None else "")
        + f", layer decay {cfg.optim.layer_decay}; {cfg.optim.warmup_steps} warmup steps of {cfg.trainer.max_steps}, "
        f"precision {trainer.precision}"
    )

    resume = start_run(trainer, run_dir, config_yaml)
    if cfg.init_from and resume is None:
        for line in module.init_backbone(cfg.init_from):
            rank_zero_info(line)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)

    def networks(checkpoint: Path) -> dict:
        trained = module
        if STRATEGIES[cfg.trainer.strategy]:  # DeepSpeed/FSDP: live weights are bf16 or shards, the checkpoint fp32
            trained = load_into(ImageClassification(**module.hparams), checkpoint)
        return {"model": trained.model, **({"model_ema": trained.ema.module} if trained.ema is not None else {})}

    return evaluate_and_export(trainer, module, datamodule, run_dir, networks)


if __name__ == "__main__":
    main(*parse_config(Config, description=__doc__))
