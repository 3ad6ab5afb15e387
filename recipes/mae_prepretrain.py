"""MAE pre-pretraining (He et al. 2022; the first stage of MAWS, Singh et al. 2023).

    python -m recipes.mae_prepretrain                       # tiny MAE on the built-in synthetic world, minutes on a CPU
    python -m recipes.mae_prepretrain --help                # every setting, with its meaning
    python -m recipes.mae_prepretrain --config recipes/configs/mae_vit_large_in1k.yaml \
        --data.train_shards '/data/in1k/train-{000000..001023}.tar'

Rerunning with the same --run_dir resumes from its newest complete checkpoint and continues the
same W&B run. The encoder is exported to <run_dir>/export/encoder.safetensors with timm keys.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch

import models
from datamodules import IMAGENET_MEAN, IMAGENET_STD
from datamodules.sharded import DataConfig, ShardedDataModule, resolve_shards
from datamodules.transforms import eval_transform, mae_train_transform
from recipes.cli import run_command
from trainers.build import LoggingConfig, TrainerConfig
from trainers.callbacks import ImagePanelLogger
from trainers.export import export_vit_encoder
from trainers.mae import MAEModelConfig, MAEPretraining
from trainers.optim import OptimConfig
from trainers.run import Export, run


@dataclass
class Config:
    run_dir: str = "runs/mae_prepretrain"
    """Run directory: config, checkpoints, W&B run and exported weights. Reusing it resumes."""
    seed: int = 0
    """Seed of weights, masks and data order."""
    init_from: str | None = None
    """Start a new run from the weights of an earlier MAE run: its run dir, a .ckpt file, a DeepSpeed checkpoint
    directory or a converted fp32 file (the optimizer starts fresh). Ignored when run_dir already has a checkpoint."""
    model: MAEModelConfig = field(default_factory=MAEModelConfig)
    """The MAE model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards, batch and loader."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and the warmup + cosine schedule."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Devices, strategy, precision, steps and checkpoint cadence."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """W&B and image logging."""


def main(cfg: Config, config_yaml: str = "") -> dict:
    model = {"name": cfg.model.name, "img_size": cfg.data.image_size, "mask_ratio": cfg.model.mask_ratio,
             "norm_pix_loss": cfg.model.norm_pix_loss, "drop_path_rate": cfg.model.drop_path_rate}
    with torch.device("meta"):
        models.create(**model)  # a typo in the model name fails before any data or compute

    resolve_shards(cfg.data)  # the synthetic world unless shards are given; a spec matching nothing fails here
    datamodule = ShardedDataModule(cfg.data, mae_train_transform(cfg.data.image_size),
                                   eval_transform(cfg.data.image_size), seed=cfg.seed,
                                   mean=IMAGENET_MEAN, std=IMAGENET_STD)
    panels = ImagePanelLogger(Path(cfg.run_dir).resolve() / "images", cfg.logging.image_every_n_steps, IMAGENET_MEAN, IMAGENET_STD)

    def export(trained: MAEPretraining, out: Export) -> dict:
        encoder = export_vit_encoder(trained.model.encoder, out.dir / "encoder.safetensors", step=out.step,
                                     source=cfg.model.name)
        return {"encoder": encoder, "images": panels.last_path}

    return run(cfg, config_yaml, lambda lr: MAEPretraining(model, cfg.optim, lr, cfg.trainer.max_steps), datamodule,
               headline=f"MAE {cfg.model.name} @ {cfg.data.image_size}px, mask {cfg.model.mask_ratio}",
               export=export, callbacks=[panels])


if __name__ == "__main__":
    run_command(main, Config, __doc__)
