"""The benchmark's settings (``python -m recipes.benchmark --help`` shows them): which method and model, the data,
the steps and repeats, and the options both loops share."""

from dataclasses import dataclass, field
from typing import Literal

from datamodules.synthetic import MAX_SCENE_OBJECTS
from trainers.build import STRATEGIES


@dataclass
class ModelChoice:
    name: str | None = None
    """Registered model; None: mae_vit_tiny_patch8 for --trainer mae, vit_tiny_patch8 for finetune and swag,
    pe_core_nano for pe, sam2.1_hiera_nano for sam2, plm_nano for plm."""


@dataclass
class Config:
    trainer: Literal["mae", "finetune", "swag", "pe", "sam2", "plm", "none"] = "mae"
    """The LightningModule: mae (MAEPretraining), finetune (ImageClassification), swag (WeaklySupervisedPretraining),
    pe (ContrastivePretraining, image-caption pairs), sam2 (SAM2Training in video mode on clips of --num_frames
    frames: an "image" of the figures is a clip, and --image_size must be the model's), plm (PLMTraining in stage 2
    on conversations of the built-in world, synthetic data only: an "image" is a conversation, tokens/s counts its
    real tokens, and --image_size must be the model's tile size); none: only the loader benchmark (datamodule
    against raw decode, per worker count)."""
    model: ModelChoice = field(default_factory=ModelChoice)
    """The model; everything else (mask ratio, pooling, augmentation, optimizer) is the method's default."""
    data: Literal["synthetic", "shards"] = "synthetic"
    """synthetic: one random batch made on the device before the runs (pure compute, no loader); shards: the
    method's datamodule over --shards, a fresh one with the same seed for each run."""
    shards: str | None = None
    """Shards for --data shards and --trainer none (path, glob, {000..099} braces, URL); None: the synthetic world."""
    image_size: int = 64
    """Side of the square images in pixels."""
    batch_size: int = 32
    """Images per step on the one device."""
    warmup_steps: int = 3
    """Untimed steps at the start of each run (compilation, allocator, loader start-up)."""
    steps: int = 10
    """Timed steps per run (and timed batches per worker count with --trainer none)."""
    precision: Literal["bf16-mixed", "32-true"] | None = None
    """None: bf16-mixed on a GPU, 32-true on the CPU (as build_trainer resolves it)."""
    compile: bool = False
    """torch.compile the model, in both loops."""
    channels_last: bool = False
    """Both loops convert the model's 4-D weights (and the synthetic batch) to the channels-last layout, which
    convolutions (RegNet, the ViT-C stem) run faster in on GPUs; a ViT's only convolution is its patch embedding."""
    strategy: str = "auto"
    """The Lightning runs' strategy (trainers.build.STRATEGIES: auto, ddp, deepspeed_stage_{1,2,3},
    deepspeed_stage_{2,3}_offload, fsdp); DeepSpeed and FSDP need CUDA. The plain loop stays plain PyTorch."""
    plain: bool = True
    """Also run the plain PyTorch loop; false: the Lightning runs only (no plain figures, no ratio), for models
    that do not fit twice (a 6.5B model's fp32 weights and AdamW states)."""
    decode: Literal["host", "device"] = "host"
    """JPEG decoding with --data shards and --trainer none (DataConfig.decode): host (PIL in the loader
    workers) or device (on the GPU, after the transfer)."""
    num_frames: int = 8
    """Frames per clip with --trainer sam2 (SAM 2 trains on 8)."""
    objects: int = 2
    """Objects per clip with --trainer sam2: 1..8 with synthetic data (a scene holds at most 8); with --data shards
    at most this many."""
    sequence_length: int | None = None
    """Tokens per conversation with --trainer plm (visual ones included): every row is right padded to it (and a
    longer one cut, as --data.max_length cuts). None: the batch's longest, rounded up to a multiple of 64."""
    num_workers: int = 2
    """Loader worker processes with --data shards."""
    num_classes: int | None = None
    """Outputs of the head: classes (finetune) or hashtags (swag, synthetic data only). None: 1000 with synthetic
    data; with shards the classes.json beside them (finetune) or the counted vocabulary (swag)."""
    worker_counts: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Loader worker counts to measure with --trainer none."""
    repeats: int = 3
    """Runs of each loop. Each repeat runs both, and which runs first alternates (Lightning then plain, plain then
    Lightning, ...), so that neither loop always gets the process's earlier or later state; the Lightning / plain
    ratio is the median over repeats, printed with its min-max spread. With --plain false: this many Lightning runs."""
    seed: int = 0
    """Seed of weights, batches, masks and data order (the same in every run)."""
    run_dir: str = "runs/benchmark"
    """Where benchmark.json and the Lightning runs' logs go."""

    def __post_init__(self):
        for name in ("image_size", "batch_size", "steps", "num_classes", "repeats", "num_frames", "objects",
                     "sequence_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.trainer == "sam2" and self.data == "synthetic" and self.objects > MAX_SCENE_OBJECTS:
            raise ValueError(f"--objects {self.objects}: a synthetic scene holds at most {MAX_SCENE_OBJECTS} objects; "
                             f"use --objects 1..{MAX_SCENE_OBJECTS} (or --data shards with clips that hold more)")
        if self.warmup_steps < 0 or self.num_workers < 0 or any(n < 0 for n in self.worker_counts):
            raise ValueError("--warmup_steps, --num_workers and --worker_counts must be >= 0")
        if self.trainer == "finetune" and self.batch_size % 2:
            raise ValueError(f"finetune mixes images in pairs: --batch_size must be even, got {self.batch_size}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"Unknown --strategy {self.strategy!r}. Choose one of: {', '.join(STRATEGIES)}.")
        if self.decode != "host" and self.data == "synthetic" and self.trainer != "none":
            raise ValueError(f"--decode {self.decode} applies to JPEG shards: add --data shards (or use --trainer "
                             "none); synthetic batches are made on the device and never decoded.")
