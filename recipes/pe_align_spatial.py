"""PE spatial alignment (Bolya et al. 2025, "Perception Encoder", §5): a PE-Core vision tower trained for dense
features, by self-distillation from a frozen intermediate block of itself and by SAM 2.1's mask-logit
correspondences; the result is exported as PE-Spatial (trainers/pe_spatial.py has the method).

    python -m recipes.pe_pretrain --run_dir runs/pe                  # the contrastive starting point
    python -m recipes.pe_align_spatial --init_from runs/pe --teacher sam2.1_hiera_tiny.pt   # or a sam2_train run

Trains on the synthetic world's video frames (or --data.train_shards video / image segmentation shards). Validation
propagates each validation video's first-frame masks through its frames by feature affinity (J&F, DAVIS protocol)
and fits a linear foreground / background probe on half of the validation videos (mIoU on the other half), for the
aligned tower and for the starting tower (``start_*``). The aligned tower is exported to <run_dir>/export/pe_spatial
as a timm model directory (config.json + model.safetensors)."""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import models
from datamodules.captions import PE_MEAN, PE_STD
from datamodules.video_segmentation import VideoSegmentationDataConfig, VideoSegmentationDataModule, check_video_shards
from recipes.cli import run_command
from trainers.build import LoggingConfig, TrainerConfig
from trainers.checkpoint import find_resume_checkpoint
from trainers.eval_model import source_model_section
from trainers.pe_spatial import SpatialAlignment, SpatialModelConfig, SpatialOptimConfig, load_sam2_teacher
from trainers.run import Export, run


@dataclass
class Config:
    run_dir: str = "runs/pe_align_spatial"
    """Run directory: config, checkpoints, W&B run and the exported tower. Reusing it resumes."""
    seed: int = 0
    """Seed of data order."""
    init_from: str | None = None
    """Required: the PE contrastive run (recipes.pe_pretrain run directory or one of its .ckpt files) whose vision
    tower is aligned."""
    teacher: str | None = None
    """Required: the SAM 2.1 teacher, an official sam2.1_hiera_*.pt or a recipes.sam2_train run directory / export."""
    model: SpatialModelConfig = field(default_factory=SpatialModelConfig)
    """Teacher block, loss weights, SAM 2 prompt grid, label-propagation settings."""
    data: VideoSegmentationDataConfig = field(
        default_factory=lambda: VideoSegmentationDataConfig(batch_size=8, num_frames=1, num_workers=1))
    """Segmentation shards (frames train the tower; validation videos score it); image_size is the training
    resolution (a choice: 128 px, twice PE-Core nano's native 64, as PE-Spatial trains above PE-Core's size)."""
    optim: SpatialOptimConfig = field(default_factory=SpatialOptimConfig)
    """AdamW and the warmup + cosine schedule."""
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(max_steps=300, val_every_n_steps=300))
    """Devices, strategy, precision, steps and checkpoint cadence."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """W&B."""


def check_init_from(init_from: str | None) -> str:
    """The registered PE-Core model of the contrastive run ``init_from``; anything else fails here, before compute."""
    if not init_from:
        raise ValueError("--init_from is required: the PE contrastive run whose vision tower is aligned, e.g. "
                         "--init_from runs/pe_pretrain (made by `python -m recipes.pe_pretrain --run_dir ...`)")
    path = Path(init_from)
    if not path.exists():
        raise FileNotFoundError(f"--init_from {init_from} does not exist: pass a recipes.pe_pretrain run directory")
    section = source_model_section(init_from)
    name = section.get("name")
    if name not in models.list_models("pe_core_*") or section.get("image_tower"):
        raise ValueError(f"--init_from {init_from} is not a PE contrastive run: its config.yaml names model "
                         f"{name!r}{' with an image_tower' if section.get('image_tower') else ''}, not a pe_core_* "
                         "model. Pass the run directory of `python -m recipes.pe_pretrain` (not a LiT run).")
    if path.is_dir() and find_resume_checkpoint(path) is None:
        raise FileNotFoundError(f"--init_from {init_from} has no complete checkpoint under checkpoints/: let the "
                                "PE run finish (or rerun it to resume), then align it")
    return name


def main(cfg: Config, config_yaml: str = "") -> dict:
    d, name = cfg.data, check_init_from(cfg.init_from)
    model = dataclasses.replace(cfg.model, name=cfg.model.name or name)
    if not cfg.teacher:
        raise ValueError("--teacher is required: the SAM 2.1 whose mask logits teach locality, e.g. --teacher "
                         "sam2.1_hiera_tiny.pt (official) or a `python -m recipes.sam2_train` run directory")
    sam = load_sam2_teacher(cfg.teacher)  # a file that is not a SAM 2 stops here
    check_video_shards(d)  # fills in the synthetic videos; a bad shard stops here
    datamodule = VideoSegmentationDataModule(d, cfg.seed, mean=PE_MEAN, std=PE_STD)  # the student's normalisation

    def method(lr: float) -> SpatialAlignment:
        return SpatialAlignment(model, cfg.optim, lr, cfg.trainer.max_steps, cfg.teacher, d.image_size, sam=sam)

    def export(trained: SpatialAlignment, out: Export) -> dict:
        return trained.export(out.dir, step=out.step)

    teacher = (f"SAM 2 ({Path(cfg.teacher).name}, {model.points_per_side ** 2} prompts, mask {model.sam_features})"
               if model.correspondence_teacher == "sam" else "the ground-truth masks (a control, not the method)")
    headline = (f"PE spatial alignment of {model.name} @ {d.image_size}px: block {model.teacher_layer} "
                f"self-distillation x {model.self_weight} + correspondences of {teacher} x {model.sam_weight}")
    return run(cfg, config_yaml, method, datamodule, export=export, validate=bool(d.val_shards), headline=headline,
               report=("J&F", "start_J&F", "probe_mIoU", "start_probe_mIoU", "teacher_click_IoU",
                       "teacher_prompt_agreement"))


if __name__ == "__main__":
    run_command(main, Config, __doc__)
