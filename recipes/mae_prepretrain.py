"""MAE pre-pretraining (He et al. 2022; the first stage of MAWS, Singh et al. 2023).

    python -m recipes.mae_prepretrain                       # tiny MAE on the built-in synthetic world, minutes on a CPU
    python -m recipes.mae_prepretrain --help                # every setting, with its meaning
    python -m recipes.mae_prepretrain --config recipes/configs/mae_vit_large_in1k.yaml \
        --data.train_shards '/data/in1k/train-{000000..001023}.tar'

Rerunning with the same --run_dir resumes from its newest complete checkpoint and continues the
same W&B run. The encoder is exported to <run_dir>/export/encoder.safetensors with timm keys.
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.utilities import rank_zero_info

import models
from datamodules import IMAGENET_MEAN, IMAGENET_STD
from datamodules.sharded import DataConfig, ShardedDataModule, resolve_shards
from datamodules.transforms import eval_transform, mae_train_transform
from recipes.cli import parse_config, start_run
from trainers.build import STRATEGIES, LoggingConfig, TrainerConfig, build_trainer, finished_fit, print_outputs, uses_gpu
from trainers.callbacks import ImagePanelLogger, ThroughputLogger
from trainers.export import export_vit_encoder
from trainers.handoff import load_into
from trainers.mae import MAEModelConfig, MAEPretraining
from trainers.optim import OptimConfig, effective_batch, resolve_lr


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


def main(cfg: Config, config_yaml: str = "") -> dict[str, Path | None]:
    run_dir = Path(cfg.run_dir).resolve()
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    # Model name and overrides are checked on the meta device: a typo fails before any data or compute.
    model_kwargs = {"name": cfg.model.name, "img_size": cfg.data.image_size, "mask_ratio": cfg.model.mask_ratio,
                    "norm_pix_loss": cfg.model.norm_pix_loss, "drop_path_rate": cfg.model.drop_path_rate}
    with torch.device("meta"):
        flops_per_sample = 3 * models.create(**model_kwargs).complexity().flops  # forward + backward

    resolve_shards(cfg.data)  # the synthetic world unless shards are given; a spec matching nothing fails here
    datamodule = ShardedDataModule(cfg.data, mae_train_transform(cfg.data.image_size),
                                   eval_transform(cfg.data.image_size), seed=cfg.seed,
                                   mean=IMAGENET_MEAN, std=IMAGENET_STD)

    peak = get_available_flops(torch.device("cuda"), torch.bfloat16) if uses_gpu(cfg.trainer) else None
    panels = ImagePanelLogger(run_dir / "images", cfg.logging.image_every_n_steps, IMAGENET_MEAN, IMAGENET_STD)
    throughput = ThroughputLogger(cfg.data.batch_size, cfg.trainer.log_every_n_steps, flops_per_sample, peak)
    trainer = build_trainer(cfg.trainer, cfg.logging, run_dir, callbacks=[panels, throughput],
                            batch_size_per_device=cfg.data.batch_size, seed=cfg.seed)

    eff_batch = effective_batch(cfg.data.batch_size, cfg.trainer.accumulate_grad_batches, trainer.world_size)
    lr = resolve_lr(cfg.optim, eff_batch)
    module = MAEPretraining(model_kwargs, asdict(cfg.optim), lr, cfg.trainer.max_steps)
    rank_zero_info(
        f"MAE {cfg.model.name} @ {cfg.data.image_size}px, mask {cfg.model.mask_ratio}: "
        f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f}M params, "
        f"{flops_per_sample / 1e9:.2f} GFLOPs/image per training step\n"
        f"effective batch {eff_batch} = {cfg.data.batch_size} per device x "
        f"{cfg.trainer.accumulate_grad_batches} accumulation x {trainer.world_size} devices\n"
        f"lr {lr:.3e} = blr {cfg.optim.blr:.3e} x {eff_batch} / 256"
        + (" (overridden by optim.lr)" if cfg.optim.lr is not None else "")
        + f"; {cfg.optim.warmup_steps} warmup steps of {cfg.trainer.max_steps}, precision {trainer.precision}"
    )

    resume = start_run(trainer, run_dir, config_yaml)
    if cfg.init_from and resume is None:
        load_into(module.model, cfg.init_from, prefix="model.")
        rank_zero_info(f"Initialised the model from {cfg.init_from}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)

    outcome = finished_fit(trainer)
    if outcome is None:  # preempted or stopped by the guard: nothing to evaluate or export yet
        return {}
    if not trainer.is_global_zero:
        return {}
    checkpoint = Path(trainer.checkpoint_callback.last_model_path)
    encoder = module.model.encoder
    if STRATEGIES[cfg.trainer.strategy]:  # DeepSpeed/FSDP: live weights are bf16 or shards, the checkpoint is fp32
        encoder = load_into(models.create(**model_kwargs).encoder, checkpoint, prefix="model.encoder.")
    outputs = {
        "run_dir": run_dir,
        "checkpoint": checkpoint,
        "encoder": export_vit_encoder(encoder, run_dir / "export" / "encoder.safetensors",
                                      step=trainer.global_step, source=cfg.model.name),
        "wandb": Path(trainer.loggers[0].experiment.dir).parent,
        "images": panels.last_path,
    }
    print_outputs(outcome, outputs)
    return outputs


if __name__ == "__main__":
    main(*parse_config(Config, description=__doc__))
