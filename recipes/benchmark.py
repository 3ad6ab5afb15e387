"""Training speed: a method's Lightning run, as users run it, against a plain PyTorch loop over the same model,
data and optimizer, on one device (issue 6).

    python -m recipes.benchmark                           # MAE tiny on the CPU, well under a minute
    python -m recipes.benchmark --trainer finetune        # or swag
    python -m recipes.benchmark --model.name mae_vit_base_patch16 --image_size 224 --batch_size 256 --steps 50
    python -m recipes.benchmark --data shards --shards '/data/in1k/train-{000000..001023}.tar'
    python -m recipes.benchmark --trainer none --worker_counts '[0, 2, 4, 8]'    # the loader against raw decode
    python -m recipes.benchmark --model.name mae_vit_2b_patch14 --image_size 224 --strategy deepspeed_stage_3 \
        --plain false                                     # a model too big for two copies: the Lightning run only
    python -m recipes.benchmark --trainer swag --model.name regnety_16gf --channels_last true

Both runs: the same weights, batches and seed; warmup_steps untimed steps, then steps timed ones. The Lightning run
is the recipe's (build_trainer with --strategy, its callbacks, W&B offline + CSV in <run_dir>/lightning) with
checkpoints and validation past the end: no checkpoint is written, and the checkpoint folder is deleted. The plain
loop is plain PyTorch on the one device whatever --strategy is, so the ratio is Lightning (with that strategy) /
plain. The table is printed and, with every figure and the config, written to <run_dir>/benchmark.json.
The GPU suite (python -m benchmarks.gpu_suite) runs the issue's cases through this recipe."""

import copy
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch import LightningDataModule

from datamodules import IMAGENET_MEAN, IMAGENET_STD
from datamodules.hashtags import VOCABULARY_FILE, HashtagDataConfig, ensure_vocabulary, hashtag_datamodule
from datamodules.loader_benchmark import format_loader_table, loader_benchmark
from datamodules.sharded import DataConfig, ShardedDataModule, resolve_shards
from datamodules.transforms import eval_transform, finetune_train_transform, mae_train_transform
from recipes.cli import parse_config
from recipes.finetune import ClassificationDataConfig, prepare_data
from trainers import benchmarking as bench
from trainers.build import STRATEGIES, LoggingConfig, TrainerConfig, build_trainer, resolve_precision
from trainers.callbacks import ImagePanelLogger, StepCheckpoint, ThroughputLogger
from trainers.checkpoint import CHECKPOINT_DIR
from trainers.classification import (AugmentConfig, ClassifierConfig, EMAConfig, FinetuneOptimConfig,
                                     ImageClassification, classifier_kwargs)
from trainers.mae import MAEModelConfig, MAEPretraining
from trainers.optim import OptimConfig, resolve_lr
from trainers.weakly_supervised import WeaklySupervisedPretraining, WSPOptimConfig

DEFAULT_MODELS = {"mae": "mae_vit_tiny_patch8", "finetune": "vit_tiny_patch8", "swag": "vit_tiny_patch8"}


@dataclass
class ModelChoice:
    name: str | None = None
    """Registered model; None: mae_vit_tiny_patch8 for --trainer mae, vit_tiny_patch8 for finetune and swag."""


@dataclass
class Config:
    trainer: Literal["mae", "finetune", "swag", "none"] = "mae"
    """The LightningModule: mae (MAEPretraining), finetune (ImageClassification), swag (WeaklySupervisedPretraining);
    none: only the loader benchmark (datamodule against raw decode, per worker count)."""
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
    """torch.compile the model, in both runs."""
    channels_last: bool = False
    """Both runs convert the model's 4-D weights (and the synthetic batch) to the channels-last layout, which
    convolutions (RegNet, the ViT-C stem) run faster in on GPUs; a ViT's only convolution is its patch embedding."""
    strategy: str = "auto"
    """The Lightning run's strategy (trainers.build.STRATEGIES: auto, ddp, deepspeed_stage_{1,2,3},
    deepspeed_stage_{2,3}_offload, fsdp); DeepSpeed and FSDP need CUDA. The plain loop stays plain PyTorch."""
    plain: bool = True
    """Also run the plain PyTorch loop; false: the Lightning run only (no plain figures, no ratio), for models
    that do not fit twice (a 6.5B model's fp32 weights and AdamW states)."""
    decode: Literal["host", "device"] = "host"
    """JPEG decoding with --data shards and --trainer none (DataConfig.decode): host (PIL in the loader
    workers) or device (on the GPU, after the transfer)."""
    num_workers: int = 2
    """Loader worker processes with --data shards."""
    num_classes: int | None = None
    """Outputs of the head: classes (finetune) or hashtags (swag, synthetic data only). None: 1000 with synthetic
    data; with shards the classes.json beside them (finetune) or the counted vocabulary (swag)."""
    worker_counts: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Loader worker counts to measure with --trainer none."""
    seed: int = 0
    """Seed of weights, batches, masks and data order (the same in both runs)."""
    run_dir: str = "runs/benchmark"
    """Where benchmark.json and the Lightning run's logs go."""

    def __post_init__(self):
        for name in ("image_size", "batch_size", "steps", "num_classes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.num_workers < 0 or any(n < 0 for n in self.worker_counts):
            raise ValueError("--warmup_steps, --num_workers and --worker_counts must be >= 0")
        if self.trainer == "finetune" and self.batch_size % 2:
            raise ValueError(f"finetune mixes images in pairs: --batch_size must be even, got {self.batch_size}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"Unknown --strategy {self.strategy!r}. Choose one of: {', '.join(STRATEGIES)}.")
        if self.decode != "host" and self.data == "synthetic" and self.trainer != "none":
            raise ValueError(f"--decode {self.decode} applies to JPEG shards: add --data shards (or use --trainer "
                             "none); synthetic batches are made on the device and never decoded.")


class Method(NamedTuple):
    """A method's module, its data config, a maker of fresh datamodules (one per run, the same seed) and what its
    synthetic batches carry besides images (bench.synthetic_batch's num_classes or vocab)."""
    module: L.LightningModule
    data: DataConfig
    datamodule: Callable[[], LightningDataModule]
    synthetic: dict


def mae(cfg: Config, name: str, data: DataConfig, total: int, run_dir: Path) -> Method:
    optim, size = OptimConfig(), cfg.image_size
    module = MAEPretraining({**asdict(MAEModelConfig(name=name)), "img_size": size}, asdict(optim),
                            resolve_lr(optim, cfg.batch_size), total)
    return Method(module, data, lambda: ShardedDataModule(data, mae_train_transform(size), eval_transform(size),
                                                          cfg.seed, IMAGENET_MEAN, IMAGENET_STD), {})


def finetune(cfg: Config, name: str, data: DataConfig, total: int, run_dir: Path) -> Method:
    data = ClassificationDataConfig(**asdict(data), num_classes=cfg.num_classes)
    classes = prepare_data(data) if cfg.data == "shards" else cfg.num_classes or 1000  # prepare_data resolves
    model, optim, augment, size = ClassifierConfig(name=name), FinetuneOptimConfig(), AugmentConfig(), cfg.image_size
    module = ImageClassification(classifier_kwargs(name, classes, size, model.global_pool, model.drop_path_rate),
                                 asdict(optim), resolve_lr(optim, cfg.batch_size), total, asdict(augment),
                                 asdict(EMAConfig()))
    return Method(module, data, lambda: ShardedDataModule(
        data, finetune_train_transform(size, augment.rand_augment), eval_transform(size), cfg.seed, IMAGENET_MEAN,
        IMAGENET_STD, required_keys=("jpg", "cls")), {"num_classes": classes})


def swag(cfg: Config, name: str, data: DataConfig, total: int, run_dir: Path) -> Method:
    data, vocabulary, prior = HashtagDataConfig(**asdict(data)), None, None
    if cfg.data == "shards":
        resolve_shards(data)
        vocabulary = ensure_vocabulary(run_dir / VOCABULARY_FILE, data, is_writer=True)
        prior = torch.tensor(vocabulary.training_prior(data.balance_power))
    vocab = vocabulary.tags if vocabulary else [f"tag{i}" for i in range(cfg.num_classes or 1000)]
    optim = WSPOptimConfig()
    module = WeaklySupervisedPretraining({"name": name, "img_size": cfg.image_size, "num_classes": len(vocab)},
                                         asdict(optim), resolve_lr(optim, cfg.batch_size), total, vocab=vocab,
                                         hashtag_prior=prior)
    return Method(module, data, lambda: hashtag_datamodule(data, vocabulary, seed=cfg.seed), {"vocab": vocab})


def skip_checkpoints(trainer: L.Trainer, last_step: int) -> None:
    """No checkpoint from the Lightning run: its last step counts as saved and there is no last.ckpt. A benchmark's
    weights are no use, and a big model's DeepSpeed checkpoint (about 14 bytes per parameter: 90 GB for ViT-6.5B)
    would take minutes after the timed steps and may not fit on the disk."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, StepCheckpoint):
            callback.note_saved(last_step)
            callback.save_last = False


def training_benchmark(cfg: Config, run_dir: Path, device: torch.device) -> tuple[dict, str]:
    total = cfg.warmup_steps + cfg.steps
    # The Lightning run takes compile and channels-last as users do (--trainer.compile / --trainer.channels_last);
    # the plain loop applies them by hand.
    trainer_cfg = TrainerConfig(max_steps=total, devices=1, strategy=cfg.strategy, precision=cfg.precision,
                                checkpoint_every_n_steps=total + 1, val_every_n_steps=total + 1,
                                compile=cfg.compile, channels_last=cfg.channels_last)
    precision = resolve_precision(trainer_cfg)
    # The recipes' own callbacks, as they configure them; the FLOPs per image are filled in once the model exists
    throughput = ThroughputLogger(cfg.batch_size, trainer_cfg.log_every_n_steps, None,
                                  get_available_flops(device, torch.bfloat16) if device.type == "cuda" else None)
    callbacks: list = [throughput]
    if cfg.trainer == "mae":  # rendered once, after the last step
        callbacks.append(ImagePanelLogger(run_dir / "lightning" / "images", total + 1, IMAGENET_MEAN, IMAGENET_STD))
    timer = bench.StepTimer(device)
    # The Trainer first: build_trainer refuses what cannot run here (DeepSpeed or FSDP without CUDA) with its own
    # message before the model, the data and the matmul peak take their time.
    trainer = build_trainer(trainer_cfg, LoggingConfig(name=f"benchmark-{cfg.trainer}"), run_dir / "lightning",
                            callbacks=[*callbacks, timer], batch_size_per_device=cfg.batch_size, seed=cfg.seed)
    skip_checkpoints(trainer, total)

    name = cfg.model.name or DEFAULT_MODELS[cfg.trainer]
    data = DataConfig(train_shards=cfg.shards, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                      image_size=cfg.image_size, batches_per_epoch=total,  # one epoch: no loader restart
                      decode=cfg.decode)
    method = {"mae": mae, "finetune": finetune, "swag": swag}[cfg.trainer](cfg, name, data, total, run_dir)
    if cfg.data == "shards":
        resolve_shards(method.data)  # the synthetic world unless --shards is given; a spec matching nothing fails
        method.data.val_shards = None  # validation stays out of both runs
    flops = bench.flop_check(method.module.model)
    throughput.flops_per_sample = flops["train_flops_per_image"]
    # The same weights, untouched by the Lightning run; none when the model is too big to hold twice
    plain_module = copy.deepcopy(method.module) if cfg.plain else None
    if plain_module is not None and cfg.channels_last:
        plain_module.to(memory_format=torch.channels_last)  # 4-D weights only
    if plain_module is not None and cfg.compile:
        plain_module.model.compile()
    batches = plain_datamodule = None
    if cfg.data == "synthetic":
        batch = bench.synthetic_batch(cfg.batch_size, cfg.image_size, device, seed=cfg.seed, **method.synthetic)
        if cfg.channels_last:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        batches = bench.RepeatedBatch(batch, total)  # its copies keep the layout (clone preserves strides)
        fit_data = {"train_dataloaders": batches}
    else:
        fit_data = {"datamodule": method.datamodule()}
        plain_datamodule = method.datamodule() if cfg.plain else None
        if plain_datamodule is not None:
            plain_datamodule.decode_device = device  # no Trainer tells it where to decode (--decode device)

    peak = bench.matmul_peak(device)
    how = bench.how_measured(device, trainer=cfg.trainer, model=name, image_size=cfg.image_size,
                             data=cfg.data if cfg.data == "synthetic" else f"shards {method.data.train_shards}",
                             **({"decode": cfg.decode} if cfg.data == "shards" else {}),
                             batch_per_step=cfg.batch_size, steps=f"{cfg.warmup_steps} warm-up + {cfg.steps} timed",
                             precision=precision, strategy=cfg.strategy, compile=cfg.compile,
                             channels_last=cfg.channels_last,
                             plain_loop="run" if cfg.plain else "not run (--plain false)", timing=timer.clock.how,
                             peak_memory=bench.PeakMemory(device).kind)
    with bench.PeakMemory(device) as lightning_memory:
        trainer.fit(method.module, **fit_data)
    trainer.loggers[0].experiment.finish()
    # A benchmark's weights are no use; DeepSpeed saves directories, hence rmtree (whatever a signal or guard saved)
    shutil.rmtree(run_dir / "lightning" / CHECKPOINT_DIR, ignore_errors=True)
    del trainer, method, fit_data  # frees the Lightning run's memory before the plain loop is measured

    plain = None
    if plain_module is not None:
        with bench.PeakMemory(device) as plain_memory:
            batches, prepare = bench.datamodule_batches(plain_datamodule) if plain_datamodule else (batches, None)
            plain = (bench.plain_loop(plain_module, batches, total, device, precision, cfg.seed, prepare),
                     plain_memory)

    report = bench.benchmark_report(how, flops, peak, cfg.warmup_steps, cfg.batch_size,
                                    lightning=(timer.step_ms(), lightning_memory), plain=plain)
    return report, bench.format_report(report)


def loader_report(cfg: Config, device: torch.device) -> tuple[dict, str]:
    data = DataConfig(train_shards=cfg.shards, batch_size=cfg.batch_size, image_size=cfg.image_size,
                      decode=cfg.decode)
    resolve_shards(data)
    rows = loader_benchmark(data, mae_train_transform(cfg.image_size), cfg.worker_counts, cfg.steps)
    how = bench.how_measured(device, shards=data.train_shards, transform="MAE training", image_size=cfg.image_size,
                             batch=cfg.batch_size, timed_batches=cfg.steps, decode=cfg.decode)
    table = format_loader_table(rows, f"MAE training transform, {cfg.image_size} px, batch {cfg.batch_size}, "
                                      f"{cfg.decode} decode")
    return {"how_measured": how, "loader": rows}, f"{bench.format_how(how)}\n\n{table}"


def main(cfg: Config, config_yaml: str = "") -> dict:
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    L.seed_everything(cfg.seed, verbose=False)
    report, text = loader_report(cfg, device) if cfg.trainer == "none" else training_benchmark(cfg, run_dir, device)
    report["config"] = asdict(cfg)
    path = run_dir / "benchmark.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{text}\n\nwritten: {path}")
    return report


if __name__ == "__main__":
    main(*parse_config(Config, description=__doc__))
