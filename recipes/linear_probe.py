"""Linear probing of a frozen backbone (MAE's protocol, He et al. 2022: BatchNorm + Linear on the cls token, LARS).

    python -m recipes.linear_probe --init_from runs/mae_prepretrain   # tiny ViT on the synthetic world
    python -m recipes.linear_probe --help                             # every setting, with its meaning
    python -m recipes.linear_probe --config recipes/configs/linear_probe_vit_base_in1k.yaml \
        --init_from runs/mae_vit_base

init_from takes any earlier stage (MAE, SWAG, finetune: run dir, checkpoint or export), at any resolution.
Rerunning with the same --run_dir resumes; a finished run only re-evaluates. The backbone with the probe as
its head (BatchNorm folded into the Linear) is exported to <run_dir>/export/model.safetensors with timm keys.
"""

from dataclasses import dataclass, field

from datamodules import IMAGENET_MEAN, IMAGENET_STD
from datamodules.classification import ClassificationDataConfig, prepare_data
from datamodules.sharded import ShardedDataModule
from datamodules.transforms import eval_transform, linear_probe_train_transform
from recipes.cli import run_command
from trainers.build import LoggingConfig, TrainerConfig
from trainers.classification import LinearProbe, ProbeModelConfig, classifier_kwargs
from trainers.export import export_model
from trainers.optim import LARSConfig
from trainers.run import Export, run


@dataclass
class Config:
    run_dir: str = "runs/linear_probe"
    """Run directory: config, checkpoints, W&B run and exported weights. Reusing it resumes."""
    seed: int = 0
    """Seed of the probe's weights and the data order."""
    init_from: str | None = None
    """The backbone's weights: an earlier stage's run dir, .ckpt, DeepSpeed dir or .safetensors. None probes a
    randomly initialised backbone (a baseline). Ignored when run_dir already has a checkpoint."""
    model: ProbeModelConfig = field(default_factory=ProbeModelConfig)
    """The frozen backbone."""
    data: ClassificationDataConfig = field(default_factory=lambda: ClassificationDataConfig(batch_size=64))
    """Shards, classes, batch and loader."""
    optim: LARSConfig = field(default_factory=LARSConfig)
    """LARS and the warmup + cosine schedule."""
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(max_steps=100, val_every_n_steps=50,
                                                                         checkpoint_every_n_steps=50))
    """Devices, strategy, precision, steps and checkpoint cadence."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """W&B logging."""


def main(cfg: Config, config_yaml: str = "") -> dict:
    num_classes = prepare_data(cfg.data)
    # The backbone without a head, no drop path (a frozen network); checked on the meta device first.
    backbone = classifier_kwargs(cfg.model.name, 0, cfg.data.image_size, cfg.model.global_pool)
    datamodule = ShardedDataModule(cfg.data, linear_probe_train_transform(cfg.data.image_size),
                                   eval_transform(cfg.data.image_size), seed=cfg.seed, mean=IMAGENET_MEAN,
                                   std=IMAGENET_STD, required_keys=("jpg", "cls"))

    def export(trained: LinearProbe, out: Export) -> dict:
        scores = {k.split("/")[-1]: v for k, v in out.metrics.items()}
        return {"model": export_model(trained.as_classifier(), out.dir / "model.safetensors", step=out.step, **scores)}

    features = backbone.get("global_pool", "pooled")
    return run(cfg, config_yaml, lambda lr: LinearProbe(backbone, num_classes, cfg.optim, lr, cfg.trainer.max_steps),
               datamodule, export=export, validate=True, report=("top1", "top5"),
               headline=f"Linear probe on {cfg.model.name} ({features} features) @ {cfg.data.image_size}px, "
                        f"{num_classes} classes")


if __name__ == "__main__":
    run_command(main, Config, __doc__)
