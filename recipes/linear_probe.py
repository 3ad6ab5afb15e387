"""Linear probing of a frozen backbone (MAE's protocol, He et al. 2022: BatchNorm + Linear on the cls token, LARS).

    python -m recipes.linear_probe --init_from runs/mae_prepretrain   # tiny ViT on the synthetic world
    python -m recipes.linear_probe --help                             # every setting, with its meaning
    python -m recipes.linear_probe --config recipes/configs/linear_probe_vit_base_in1k.yaml \
        --init_from runs/mae_vit_base

init_from takes any earlier stage (MAE, SWAG, finetune: run dir, checkpoint or export), at any resolution.
Rerunning with the same --run_dir resumes; a finished run only re-evaluates. The backbone with the probe as
its head (BatchNorm folded into the Linear) is exported to <run_dir>/export/model.safetensors with timm keys.
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from datamodules import IMAGENET_MEAN, IMAGENET_STD
from datamodules.sharded import ShardedDataModule
from datamodules.transforms import eval_transform, linear_probe_train_transform
from recipes.cli import parse_config, start_run
from recipes.finetune import ClassificationDataConfig, prepare_data
from trainers.build import STRATEGIES, LoggingConfig, TrainerConfig, build_trainer, uses_gpu
from trainers.callbacks import ThroughputLogger
from trainers.classification import (LinearProbe, ProbeModelConfig, classifier_kwargs, evaluate_and_export,
                                     training_flops_per_sample)
from trainers.handoff import init_backbone, load_into
from trainers.optim import LARSConfig, effective_batch, resolve_lr


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
    run_dir = Path(cfg.run_dir).resolve()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    num_classes = prepare_data(cfg.data)
    # The backbone without a head, no drop path (a frozen network); checked on the meta device first.
    backbone_kwargs = classifier_kwargs(cfg.model.name, 0, cfg.data.image_size, cfg.model.global_pool)
    datamodule = ShardedDataModule(cfg.data, linear_probe_train_transform(cfg.data.image_size),
                                   eval_transform(cfg.data.image_size), seed=cfg.seed, mean=IMAGENET_MEAN,
                                   std=IMAGENET_STD, required_keys=("jpg", "cls"))
    peak = get_available_flops(torch.device("cuda"), torch.bfloat16) if uses_gpu(cfg.trainer) else None
    flops = training_flops_per_sample(backbone_kwargs)
    throughput = ThroughputLogger(cfg.data.batch_size, cfg.trainer.log_every_n_steps, flops and flops / 3, peak)
    trainer = build_trainer(cfg.trainer, cfg.logging, run_dir, callbacks=[throughput],
                            batch_size_per_device=cfg.data.batch_size, seed=cfg.seed)
    eff_batch = effective_batch(cfg.data.batch_size, cfg.trainer.accumulate_grad_batches, trainer.world_size)
    lr = resolve_lr(cfg.optim, eff_batch)
    module = LinearProbe(backbone_kwargs, num_classes, asdict(cfg.optim), lr, cfg.trainer.max_steps)
    rank_zero_info(
        f"Linear probe on {cfg.model.name} ({backbone_kwargs.get('global_pool', 'pooled')} features) "
        f"@ {cfg.data.image_size}px, "
        f"{num_classes} classes: {sum(p.numel() for p in module.head.parameters()):,} trained parameters\n"
        f"effective batch {eff_batch} = {cfg.data.batch_size} per device x "
        f"{cfg.trainer.accumulate_grad_batches} accumulation x {trainer.world_size} devices\n"
        f"lr {lr:.3e} = blr {cfg.optim.blr:.3e} x {eff_batch} / 256"
        + (" (overridden by optim.lr)" if cfg.optim.lr is not None else "")
        + f", LARS momentum {cfg.optim.momentum}, weight decay {cfg.optim.weight_decay}; "
        f"{cfg.optim.warmup_steps} warmup steps of {cfg.trainer.max_steps}, precision {trainer.precision}"
    )

    resume = start_run(trainer, run_dir, config_yaml)
    if cfg.init_from and resume is None:
        for line in init_backbone(module.model, cfg.init_from):
            rank_zero_info(line)
    elif resume is None:
        rank_zero_warn("No --init_from: probing a randomly initialised backbone (a baseline, not a result).")
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)

    def networks(checkpoint: Path) -> dict:
        trained = module
        if STRATEGIES[cfg.trainer.strategy]:  # DeepSpeed/FSDP: live weights are bf16 or shards, the checkpoint fp32
            trained = load_into(LinearProbe(**module.hparams), checkpoint)
        return {"model": trained.as_classifier()}

    return evaluate_and_export(trainer, module, datamodule, run_dir, networks)


if __name__ == "__main__":
    main(*parse_config(Config, description=__doc__))
