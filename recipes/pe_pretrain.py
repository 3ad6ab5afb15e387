"""Perception Encoder contrastive pretraining (Bolya et al. 2025), and locked-image tuning (LiT) of a text tower
against an earlier run's frozen image encoder.

    python -m recipes.pe_pretrain                 # PE-Core nano on the synthetic world's captions, minutes on a CPU
    python -m recipes.pe_pretrain --config recipes/configs/pe_core_base.yaml --data.train_shards '...'
    python -m recipes.pe_pretrain --model.lock_image true --model.image_tower vit_tiny_patch16 \
        --init_from runs/maws/swag                # LiT: zero-shot transfer of an MAE / SWAG / MAWS / finetune encoder

Validation reports zero-shot top-1/top-5 (classes of the validation shards) and retrieval R@1/5/10 both ways; both
towers are exported in open_clip's format to <run_dir>/export (open_clip.safetensors + the model config)."""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn

import models
from datamodules.captions import (PE_MEAN, PE_STD, CaptionDataConfig, ResolutionSchedule, caption_datamodule,
                                  check_caption_shards, video_caption_datamodule, zero_shot_classes)
from datamodules.synthetic import CAPTION_TEMPLATES
from datamodules.text import CaptionTokenizer
from evaluation.zero_shot import DEFAULT_TEMPLATES
from recipes.cli import run_command
from trainers.build import LoggingConfig, TrainerConfig
from trainers.callbacks import RetrievalPanelLogger
from trainers.contrastive import ContrastiveModelConfig, ContrastiveOptimConfig, ContrastivePretraining
from trainers.run import Export, run


@dataclass
class Config:
    run_dir: str = "runs/pe_pretrain"
    """Run directory: config, checkpoints, W&B run and exported towers. Reusing it resumes."""
    seed: int = 0
    """Seed of weights and data order."""
    init_from: str | None = None
    """With model.image_tower: the earlier run (dir, checkpoint or export) whose encoder is the image tower.
    Otherwise an earlier contrastive run to continue from. Ignored when run_dir already has a checkpoint."""
    model: ContrastiveModelConfig = field(default_factory=ContrastiveModelConfig)
    """The CLIP model, locked-image tuning, the loss variant."""
    data: CaptionDataConfig = field(default_factory=lambda: CaptionDataConfig(batch_size=64))
    """Image-caption (or video-caption) shards, batch and loader; image_size is the final training size."""
    video: bool = False
    """Train on video-caption shards (a video's embedding is the mean of its frames')."""
    resolution: list[tuple[int, int]] | None = field(default_factory=lambda: [(0, 48), (300, 64)])
    """Progressive resolution: (first optimizer step, image side) pairs, sides up to data.image_size (PE-Core:
    98 -> 154 -> 224 -> final). None: data.image_size throughout."""
    optim: ContrastiveOptimConfig = field(default_factory=ContrastiveOptimConfig)
    """AdamW or LAMB, and the warmup + cosine schedule."""
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(max_steps=600, val_every_n_steps=300))
    """Devices, strategy, precision, steps and checkpoint cadence."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """W&B."""
    templates: list[str] | None = None
    """Zero-shot prompt templates ('{}' is the class name); the class embedding is the mean over them. None: prompts
    worded like the synthetic world's captions for the built-in data, else evaluation.zero_shot's CLIP-style ones."""


def main(cfg: Config, config_yaml: str = "") -> dict:
    d, m = cfg.data, cfg.model
    with torch.device("meta"):  # a typo in a model name fails before any data or compute
        models.create(m.name, **({"image_tower": m.image_tower, "image_size": d.image_size} if m.image_tower else {}))
    synthetic = d.train_shards is None
    check_caption_shards(d, video=cfg.video)  # fills in the synthetic world; a shard without captions stops here
    class_names = zero_shot_classes(d.val_shards) if d.val_shards else None
    templates = cfg.templates or list(CAPTION_TEMPLATES if synthetic else DEFAULT_TEMPLATES)
    tokenizer = CaptionTokenizer(d.context_length)
    if class_names:
        tokenizer.check_fits([t.format(n) for t in templates for n in class_names], "The zero-shot prompt")
    if m.image_tower and cfg.resolution:  # a plain ViT's position table is built for one size
        rank_zero_warn(f"--resolution {cfg.resolution} is ignored: the image tower {m.image_tower} runs at "
                       f"--data.image_size {d.image_size} only")
    schedule = ResolutionSchedule(tuple(cfg.resolution)) if cfg.resolution and not m.image_tower else None
    datamodule = (video_caption_datamodule if cfg.video else caption_datamodule)(d, cfg.seed,
                                                                                 resolution_schedule=schedule)
    panel = RetrievalPanelLogger(Path(cfg.run_dir).resolve() / "images", PE_MEAN, PE_STD)

    def method(lr: float) -> ContrastivePretraining:
        return ContrastivePretraining(m, cfg.optim, lr, cfg.trainer.max_steps, class_names, templates, tokenizer,
                                      image_size=d.image_size)

    def export(trained: ContrastivePretraining, out: Export) -> dict:
        return {**trained.export(out.dir, step=out.step), "retrieval": panel.last_path}

    tower = f"LiT on {m.image_tower}" if m.lock_image else f"{m.name}"
    sizes = " -> ".join(str(size) for _, size in schedule.stages) if schedule else d.image_size
    return run(cfg, config_yaml, method, datamodule, export=export, callbacks=[panel], validate=bool(d.val_shards),
               headline=f"PE contrastive {tower} @ {sizes}px, {len(class_names or [])} zero-shot classes",
               report=("zero_shot_top1", "zero_shot_top5", "image_to_text_R@1", "text_to_image_R@1"))


if __name__ == "__main__":
    run_command(main, Config, __doc__)
