"""SAM 2 training (Ravi et al. 2024): promptable video segmentation from simulated masks, clicks and boxes with
correction clicks, tracked through the memory over 8-frame clips; and SAM's interactive image training
(Kirillov et al. 2023) with --model.mode image.

    python -m recipes.sam2_train                  # SAM 2.1 nano from scratch on the synthetic videos, minutes on a CPU
    python -m recipes.sam2_train --config recipes/configs/sam2.1_hiera_b+_mose.yaml --init_from \
        sam2.1_hiera_base_plus.pt --data.train_shards '...' --data.val_shards '...'   # sam2's MOSE fine-tuning
    python -m recipes.sam2_train --config recipes/configs/sam_vit_b_sa1b.yaml --data.train_shards '...'   # SAM

Validation tracks each validation video from its first frame's masks and reports J&F, J, F (DAVIS protocol) and
Boundary IoU, with overlays in W&B; images (image mode, or 1-frame validation clips) get the mIoU after 1 and 5
clicks and after the box, the Boundary IoU after one click, and the prompt agreement: the mean IoU between the
one-click masks of an image's different objects (near 100: the model does not read its clicks). The weights are
exported in the official layout to <run_dir>/export (sam2's {"model": state}, or segment-anything's state dict)."""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from datamodules.video_segmentation import VideoSegmentationDataConfig, VideoSegmentationDataModule, check_video_shards
from recipes.cli import run_command
from trainers.build import LoggingConfig, TrainerConfig
from trainers.run import Export, run
from trainers.sam2 import (
    SAM2ModelConfig,
    SAM2OptimConfig,
    SAM2PromptConfig,
    SAM2Training,
    VOSPanelLogger,
    find_unused_parameters,
)


@dataclass
class Config:
    run_dir: str = "runs/sam2_train"
    """Run directory: config, checkpoints, W&B run, overlays and exported weights. Reusing it resumes."""
    seed: int = 0
    """Seed of weights, data order and the per-batch prompt decisions."""
    init_from: str | None = None
    """An official sam2.1_hiera_*.pt / sam2_hiera_*.pt (SAM 2.0: with --model.version 2.0) or sam_vit_*.pth
    checkpoint, an export of this recipe, or an earlier run of it; for sam_vit_*, also an MAE pre-trained ViT (an MAE
    run or its export) for the image encoder. Ignored when run_dir already has a checkpoint."""
    model: SAM2ModelConfig = field(default_factory=lambda: SAM2ModelConfig(multimask_output_for_tracking=False))
    """The model, video or image mode, frozen parts, activation checkpointing. From scratch, one mask on tracked
    frames (with three, the nano model learned to ignore its memory: J&F stayed near 0)."""
    prompts: SAM2PromptConfig = field(default_factory=SAM2PromptConfig)
    """Prompt simulation (sam2's MOSE fine-tuning settings)."""
    data: VideoSegmentationDataConfig = field(
        default_factory=lambda: VideoSegmentationDataConfig(batch_size=2, num_workers=1))
    """Video (and image) segmentation shards, clip length, objects per clip, augmentation, loader."""
    optim: SAM2OptimConfig = field(default_factory=SAM2OptimConfig)
    """AdamW, the image encoder's rate and layer decay, the schedule."""
    trainer: TrainerConfig = field(
        default_factory=lambda: TrainerConfig(max_steps=500, val_every_n_steps=250, checkpoint_every_n_steps=250,
                                              gradient_clip_val=0.1))
    """Devices, strategy, precision, steps, checkpoints; gradient-norm clipping at 0.1 as sam2 trains."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """W&B."""


def check_model(m: SAM2ModelConfig, d: VideoSegmentationDataConfig) -> None:
    """A typo in a model name, frames of another size than the model's, or clips in image mode fail here."""
    with torch.device("meta"):
        side = m.build().cfg.image_size
    if d.image_size != side:
        raise ValueError(f"{m.name} takes {side} x {side} frames, but --data.image_size is {d.image_size}: set "
                         f"--data.image_size {side}")
    if m.mode == "image" and d.num_frames != 1:
        raise ValueError(f"--model.mode image trains on single images: set --data.num_frames 1 (got {d.num_frames})")


def main(cfg: Config, config_yaml: str = "") -> dict:
    d, m = cfg.data, cfg.model
    check_model(m, d)
    check_video_shards(d)  # fills in the synthetic videos; a short video or a mis-sized mask stops here
    datamodule = VideoSegmentationDataModule(d, cfg.seed)
    panel = VOSPanelLogger(Path(cfg.run_dir).resolve() / "images")

    def method(lr: float) -> SAM2Training:
        return SAM2Training(m, cfg.prompts, cfg.optim, lr, cfg.trainer.max_steps, seed=cfg.seed)

    def export(trained: SAM2Training, out: Export) -> dict:
        return {**trained.export(out.dir, step=out.step), "overlays": panel.last_path}

    headline = (f"SAM training, {m.name} in {m.mode} mode @ {d.image_size}px, clips of {d.num_frames} frame(s) with "
                f"up to {d.max_objects} objects" + (f", frozen: {', '.join(m.freeze)}" if m.freeze else ""))
    report = ("J&F", "J", "F", "boundary_iou", "mIoU_1_click", "mIoU_5_clicks", "mIoU_box", "image_boundary_iou",
              "prompt_agreement_1_click")
    return run(dataclasses.replace(cfg, trainer=find_unused_parameters(cfg.trainer)), config_yaml, method,
               datamodule, export=export, callbacks=[panel], validate=bool(d.val_shards), headline=headline,
               report=report)


if __name__ == "__main__":
    run_command(main, Config, __doc__)
