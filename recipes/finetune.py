"""End-to-end fine-tuning of a pretrained backbone for classification (MAE's protocol, He et al. 2022).

    python -m recipes.finetune --init_from runs/mae_prepretrain   # tiny ViT on the synthetic world, about a minute
    python -m recipes.finetune --help                             # every setting, with its meaning
    python -m recipes.finetune --config recipes/configs/finetune_vit_base_in1k.yaml --init_from runs/mae_vit_base
    python -m recipes.finetune --init_from RUN --data.train_shards 'shards/train-*.tar' \
        --data.val_shards 'shards/val-*.tar' --data.num_classes N      # shards of datamodules.make_shards

The defaults suit a small dataset on a CPU: a tiny ViT, AdamW at blr 4e-3, no mixup, CutMix, random erasing,
RandAugment or drop path (see the README for what they reach on 1,500 handwritten digits). MAE's ImageNet settings
ship as recipes/configs/finetune_vit_*_in1k.yaml. init_from takes any earlier stage (MAE, SWAG, finetune, linear
probe: run dir, checkpoint or export), at any resolution. Rerunning with the same --run_dir resumes; a finished run
only re-evaluates. The classifier is exported to <run_dir>/export/model.safetensors with timm keys.
"""

from dataclasses import dataclass, field

from datamodules import IMAGENET_MEAN, IMAGENET_STD
from datamodules.classification import ClassificationDataConfig, prepare_data
from datamodules.sharded import ShardedDataModule
from datamodules.transforms import eval_transform, finetune_train_transform
from recipes.cli import run_command
from trainers.build import LoggingConfig, TrainerConfig
from trainers.classification import (AugmentConfig, ClassifierConfig, EMAConfig, FinetuneOptimConfig,
                                     ImageClassification, classifier_kwargs)
from trainers.export import export_model
from trainers.run import Export, run


@dataclass
class Config:
    run_dir: str = "runs/finetune"
    """Run directory: config, checkpoints, W&B run and exported weights. Reusing it resumes."""
    seed: int = 0
    """Seed of weights, augmentation and data order."""
    init_from: str | None = None
    """Weights of an earlier stage (run dir, .ckpt, DeepSpeed dir or .safetensors); None trains from scratch.
    Ignored when run_dir already has a checkpoint."""
    model: ClassifierConfig = field(default_factory=lambda: ClassifierConfig(drop_path_rate=0.0))
    """The classifier."""
    data: ClassificationDataConfig = field(default_factory=ClassificationDataConfig)
    """Shards, classes, batch and loader."""
    optim: FinetuneOptimConfig = field(default_factory=lambda: FinetuneOptimConfig(blr=4e-3))
    """AdamW with layer-wise rate decay and the warmup + cosine schedule."""
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(rand_augment="", reprob=0.0, mixup=0.0,
                                                                         cutmix=0.0))
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


def main(cfg: Config, config_yaml: str = "") -> dict:
    num_classes = prepare_data(cfg.data)
    # Checked on the meta device: a typo in the model name fails before any data or compute.
    model = classifier_kwargs(cfg.model.name, num_classes, cfg.data.image_size, cfg.model.global_pool,
                              cfg.model.drop_path_rate)
    datamodule = ShardedDataModule(cfg.data, finetune_train_transform(cfg.data.image_size, cfg.augment.rand_augment),
                                   eval_transform(cfg.data.image_size), seed=cfg.seed, mean=IMAGENET_MEAN,
                                   std=IMAGENET_STD, required_keys=("jpg", "cls"))

    def method(lr: float) -> ImageClassification:
        return ImageClassification(model, cfg.optim, lr, cfg.trainer.max_steps, cfg.augment, cfg.ema)

    def export(trained: ImageClassification, out: Export) -> dict:
        networks = {"model": trained.model, **({"model_ema": trained.ema.module} if trained.ema is not None else {})}
        scores = {k.split("/")[-1]: v for k, v in out.metrics.items()}
        return {name: export_model(network, out.dir / f"{name}.safetensors", step=out.step, **scores)
                for name, network in networks.items()}

    return run(cfg, config_yaml, method, datamodule, export=export, validate=True,
               headline=f"Fine-tune {cfg.model.name} @ {cfg.data.image_size}px, {num_classes} classes",
               report=("top1", "top5", "ema_top1", "ema_top5"))


if __name__ == "__main__":
    run_command(main, Config, __doc__)
