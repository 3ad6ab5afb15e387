"""Training speed: a method's Lightning run, as the recipes build it, against a plain PyTorch loop over the same
model, batches, optimizer and seed, on one device (``python -m recipes.benchmark``).

Each repeat runs both loops from the same initial weights; which runs first alternates (Lightning, plain | plain,
Lightning | ...), so that neither always gets the process's earlier or later state (allocator, caches, the W&B
service of an earlier run). The Lightning run is the recipes' (build_trainer, its callbacks, W&B offline + CSV in
<run_dir>/lightning) with checkpoints and validation past the end: no checkpoint is written, and the checkpoint
folder is deleted. The plain loop is plain PyTorch on the one device whatever --strategy is.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.throughput import get_available_flops

from benchmarks.config import Config
from benchmarks.measure import PeakMemory, StepClock, StepTimer, how_measured, matmul_peak
from benchmarks.methods import BatchCost, Method, build_method
from benchmarks.report import LOOPS, Run, benchmark_report, flop_count, format_report
from batch_contract import IGNORE_INDEX
from datamodules import IMAGENET_MEAN, IMAGENET_STD
from datamodules.captions import PE_MEAN, PE_STD
from datamodules.chat import load_tokenizer
from datamodules.conversations import (ConversationDataConfig, ConversationSampleTransform, collate_training,
                                       resolve_conversation_shards)
from datamodules.shards import expand_shards
from datamodules.streams import ShardReader
from datamodules.synthetic import MAX_SCENE_OBJECTS, render_video, sample_scene
from datamodules.text import END_TOKEN
from datamodules.transforms import normalize_on_device
from trainers.build import LoggingConfig, TrainerConfig, build_trainer, resolve_precision
from trainers.callbacks import ImagePanelLogger, StepCheckpoint, ThroughputLogger
from trainers.checkpoint import CHECKPOINT_DIR
from trainers.random_state import seed_rank
from trainers.run import compute_begins
from trainers.sam2 import OBJECTS_KEY
from trainers.threads import configure_cpu_threads

# ---- batches ---------------------------------------------------------------------------------------------------


class RepeatedBatch:
    """One batch served ``times`` times, a fresh copy each time: mixup and random erasing work in place, and
    every step (and every run) must see the same input. A length, so that Lightning sizes its epoch."""

    def __init__(self, batch: dict, times: int):
        self.batch, self.times = batch, times

    def __len__(self) -> int:
        return self.times

    def __iter__(self):
        for _ in range(self.times):
            yield {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in self.batch.items()}


def _world_clips(num_frames: int, objects: int, size: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The synthetic world's clips whose largest ``objects`` objects all show in frame 0, scene after scene."""
    for n in itertools.count():
        scene = sample_scene(seed, n, "benchmark", max_objects=min(objects + 2, MAX_SCENE_OBJECTS))
        if len(scene.objects) >= objects:
            frames, ids = render_video(dataclasses.replace(scene, objects=scene.objects[:objects]), num_frames, size)
            if np.isin(np.arange(1, objects + 1), ids[0]).all():
                yield frames, ids


def synthetic_clips(batch_size: int, num_frames: int, objects: int, size: int, seed: int = 0) -> dict:
    """SAM 2's training batch as it reaches the device (batch_contract/__init__.py), from the synthetic world:
    ``frames`` (B, T, 3, S, S) normalised with the ImageNet mean and std, ``frame_masks`` (B, T, S, S) uint8 with
    the ids 1..objects of each clip's objects (all in frame 0, moving, occluding each other), ``frame_valid`` all
    True, and the objects per clip, which trainers.sam2 counts on the host before the transfer."""
    clips = list(itertools.islice(_world_clips(num_frames, objects, size, seed), batch_size))
    frames = torch.from_numpy(np.stack([f for f, _ in clips])).permute(0, 1, 4, 2, 3)
    return {"frames": normalize_on_device(frames, IMAGENET_MEAN, IMAGENET_STD),
            "frame_masks": torch.from_numpy(np.stack([m for _, m in clips])),
            "frame_valid": torch.ones(batch_size, num_frames, dtype=torch.bool), OBJECTS_KEY: [objects] * batch_size}


def synthetic_video(num_frames: int, objects: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The first clip of :func:`synthetic_clips` as a video: frames (T, S, S, 3) uint8 RGB and id maps (T, S, S)."""
    return next(_world_clips(num_frames, objects, size, seed))


PAD_MULTIPLE = 64
"""Without a given sequence length, conversations are padded to the longest one rounded up to this multiple."""


def synthetic_conversations(batch_size: int, data: ConversationDataConfig, tokenizer: str, image_token_id: int,
                            sequence_length: int | None = None) -> dict:
    """PerceptionLM's training batch (datamodules.conversations) made of the first ``batch_size`` conversations of
    ``data.train_shards`` (the built-in world interleaves image and video tasks) by the datamodule's own sample
    transform and collation (``data.vision_input``: thumb+tile in stage 2), then right padded to
    ``sequence_length`` tokens (None: the longest, rounded up to ``PAD_MULTIPLE``), so that its shape does not
    follow the texts. The placeholders take the model's ``image_token_id`` (the trained tokenizer's ids are all
    below it, so no text id becomes one) and ``media`` is normalised with PE's mean and std, as
    ``on_after_batch_transfer`` does on the device."""
    tok = load_tokenizer(tokenizer)
    if len(tok) > image_token_id:
        raise ValueError(f"the tokenizer's {len(tok)} ids reach the model's image placeholder {image_token_id}")
    resolve_conversation_shards(data)  # None: the built-in world (built once, cached)
    transform = ConversationSampleTransform(data, tok)
    reader = ShardReader(required_keys=(), max_corrupt_fraction=0.0, min_samples_for_corrupt_check=1 << 30)
    samples = reader.tar_samples(reader.finite_urls(expand_shards(data.train_shards)))
    try:
        made = [transform(sample) for sample, _ in zip(samples, range(batch_size))]
    finally:
        samples.close()
    if len(made) < batch_size:
        raise ValueError(f"{data.train_shards} holds {len(made)} conversations, fewer than the batch of {batch_size}")
    batch = collate_training({k: [m[k] for m in made] for k in ("conversation", "task", "key")}, tok.pad_token_id)
    width = batch["input_ids"].shape[1]
    length = sequence_length or -(-width // PAD_MULTIPLE) * PAD_MULTIPLE
    extra = length - width  # encode_conversation kept every row within data.max_length = sequence_length
    ids = torch.nn.functional.pad(batch["input_ids"], (0, extra), value=tok.pad_token_id)
    ids[ids == tok.image_token_id] = image_token_id
    return {"media": normalize_on_device(batch["media"], PE_MEAN, PE_STD), "input_ids": ids,
            "attention_mask": torch.nn.functional.pad(batch["attention_mask"], (0, extra), value=False),
            "labels": torch.nn.functional.pad(batch["labels"], (0, extra), value=IGNORE_INDEX),
            "task": batch["task"], "key": batch["key"]}


def synthetic_batch(batch_size: int, image_size: int, device: torch.device | str, *, seed: int = 0,
                    num_classes: int | None = None, vocab: Sequence[str] | None = None,
                    context_length: int | None = None, num_frames: int | None = None, objects: int = 1,
                    conversations: dict | None = None) -> dict:
    """A random batch in the batch contract (batch_contract/__init__.py), made once on ``device``: ``image``
    standard normal (as normalised pixels), ``label`` when ``num_classes`` is given, ``hashtags`` (1 to 3 tags of
    ``vocab`` per image) when ``vocab`` is, ``text_tokens`` (random ids, CLIP's end token last) and ``text_mask``
    of ``context_length`` when that is. With ``num_frames``: clips of the synthetic world instead
    (:func:`synthetic_clips`, ``objects`` per clip); with ``conversations`` (:func:`synthetic_conversations`'
    arguments but the batch size): conversations of the built-in world."""
    if num_frames is not None:
        return to_device(synthetic_clips(batch_size, num_frames, objects, image_size, seed), torch.device(device))
    if conversations is not None:
        return to_device(synthetic_conversations(batch_size, **conversations), torch.device(device))
    gen = torch.Generator().manual_seed(seed)
    batch: dict = {"image": torch.randn(batch_size, 3, image_size, image_size, generator=gen)}
    if context_length is not None:
        tokens = torch.randint(1, END_TOKEN, (batch_size, context_length), generator=gen)
        tokens[:, -1] = END_TOKEN  # the text tower pools at the end token, the largest id
        batch["text_tokens"], batch["text_mask"] = tokens, torch.ones_like(tokens, dtype=torch.bool)
    if num_classes is not None:
        batch["label"] = torch.randint(num_classes, (batch_size,), generator=gen)
    if vocab is not None:
        counts = torch.randint(1, 4, (batch_size,), generator=gen).tolist()
        batch["hashtags"] = [[vocab[i] for i in torch.randint(len(vocab), (n,), generator=gen).tolist()]
                             for n in counts]
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def datamodule_batches(datamodule: L.LightningDataModule) -> tuple[Iterable[dict], Callable[[dict], dict]]:
    """A datamodule's training batches as fit gets them: after setup('fit'), its loader, and its device-side step
    (on_after_batch_transfer) for plain_loop's ``prepare``."""
    datamodule.setup("fit")
    return datamodule.train_dataloader(), lambda batch: datamodule.on_after_batch_transfer(batch, 0)


# ---- the plain PyTorch loop ------------------------------------------------------------------------------------

def autocast_for(precision: str, device: torch.device) -> Callable[[], object]:
    """What Lightning's precision plugin wraps around training_step: bf16 autocast for bf16-mixed, nothing for
    32-true. Other precisions need a loss scaler or cast weights, which the plain loop does not do."""
    if precision == "bf16-mixed":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "32-true":
        return nullcontext
    raise ValueError(f"The plain loop runs precision bf16-mixed or 32-true, not {precision!r}: pass --precision "
                     "bf16-mixed or 32-true.")


def optimizer_and_scheduler(configured) -> tuple[torch.optim.Optimizer, object | None]:
    """The optimizer and the per-step scheduler from what ``configure_optimizers`` returned (an optimizer, or a
    dict with ``optimizer`` and an optional ``lr_scheduler`` as every method here returns)."""
    if isinstance(configured, torch.optim.Optimizer):
        return configured, None
    if not isinstance(configured, dict) or "optimizer" not in configured:
        raise TypeError(f"plain_loop understands configure_optimizers() returning an optimizer or a dict with "
                        f"'optimizer' (and 'lr_scheduler'); got {type(configured).__name__}.")
    scheduler = configured.get("lr_scheduler")
    if isinstance(scheduler, dict):
        if scheduler.get("interval", "epoch") != "step":
            raise ValueError("plain_loop steps the scheduler every optimizer step; this one has interval "
                             f"{scheduler.get('interval', 'epoch')!r}.")
        scheduler = scheduler["scheduler"]
    return configured["optimizer"], scheduler


def plain_loop(module: L.LightningModule, batches: Iterable[dict], steps: int, device: torch.device | str,
               precision: str, seed: int, prepare: Callable[[dict], dict] | None = None,
               clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Train ``module`` for ``steps`` steps the plain PyTorch way; returns each step's milliseconds.

    The loss is the module's ``compute_loss`` (the code its training_step runs), the optimizer and schedule come
    from its own ``configure_optimizers`` (called after the move to the device, as Lightning does: fused AdamW
    needs CUDA parameters). The module's ``on_before_batch_transfer`` runs on each batch before the move, as in
    Lightning (SAM 2 counts its objects there); ``prepare`` is the device-side step of a datamodule
    (on_after_batch_transfer). The
    random state is seeded right before the first step as trainers.random_state seeds a Lightning run, so that
    masks, mixup and drop-path draw the same numbers. Step boundaries are marked where :class:`StepTimer` marks.
    """
    device = torch.device(device)
    module.to(device).train()
    optimizer, scheduler = optimizer_and_scheduler(module.configure_optimizers())
    autocast = autocast_for(precision, device)
    timer = StepClock(device, clock)
    seed_rank(seed, 0)
    batches = iter(batches)
    for _ in range(steps):
        batch = to_device(module.on_before_batch_transfer(next(batches), 0), device)
        if prepare is not None:
            batch = prepare(batch)
        timer.mark()
        with autocast():
            loss = module.compute_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        module.after_optimizer_step()  # as Lightning runs it (PE clamps its temperature)
    timer.mark()
    return timer.step_ms()


# ---- the benchmark: both loops, repeated ------------------------------------------------------------------------

def run_order(repeats: int, plain: bool) -> list[tuple[int, str]]:
    """(repeat, loop) in running order: Lightning first in even repeats, the plain loop first in odd ones; the
    Lightning runs alone without ``plain``."""
    if not plain:
        return [(repeat, "lightning") for repeat in range(repeats)]
    return [(repeat, loop) for repeat in range(repeats) for loop in (LOOPS if repeat % 2 == 0 else LOOPS[::-1])]


def skip_checkpoints(trainer: L.Trainer, last_step: int) -> None:
    """No checkpoint from a Lightning run: its last step counts as saved and there is no last.ckpt. A benchmark's
    weights are no use, and a big model's DeepSpeed checkpoint (about 14 bytes per parameter: 90 GB for ViT-6.5B)
    would take minutes after the timed steps and may not fit on the disk."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, StepCheckpoint):
            callback.note_saved(last_step)
            callback.save_last = False


@dataclass
class Setup:
    """What every run of one benchmark shares."""

    cfg: Config
    run_dir: Path
    device: torch.device
    trainer_cfg: TrainerConfig
    method: Method
    flops: dict
    runs_left: int
    batch: dict | None
    """The synthetic batch (None with --data shards)."""

    @property
    def total(self) -> int:
        return self.trainer_cfg.max_steps

    def module(self) -> L.LightningModule:
        """The untouched initial weights: a copy while later runs still need them, the original for the last run
        (a model too big to hold twice runs once, with --plain false, and is never copied)."""
        self.runs_left -= 1
        return self.method.module if self.runs_left == 0 else copy.deepcopy(self.method.module)


def lightning_trainer(cfg: Config, trainer_cfg: TrainerConfig, run_dir: Path,
                      device: torch.device) -> tuple[L.Trainer, StepTimer]:
    """A Trainer as the recipes build it, with their callbacks as they configure them, plus the step timer. As in
    the recipes, the ThroughputLogger learns the model's FLOP count once the model exists (``lightning_run``)."""
    peak = get_available_flops(device, torch.bfloat16) if device.type == "cuda" else None
    callbacks: list = [ThroughputLogger(cfg.batch_size, trainer_cfg.log_every_n_steps, None, peak)]
    if cfg.trainer == "mae":  # rendered once, after the last step
        callbacks.append(ImagePanelLogger(run_dir / "lightning" / "images", trainer_cfg.max_steps + 1, IMAGENET_MEAN,
                                          IMAGENET_STD))
    timer = StepTimer(device)
    trainer = build_trainer(trainer_cfg, LoggingConfig(name=f"benchmark-{cfg.trainer}"), run_dir / "lightning",
                            callbacks=[*callbacks, timer], batch_size_per_device=cfg.batch_size, seed=cfg.seed)
    skip_checkpoints(trainer, trainer_cfg.max_steps)
    return trainer, timer


def lightning_run(setup: Setup, repeat: int, built: tuple[L.Trainer, StepTimer] | None = None) -> Run:
    cfg = setup.cfg
    trainer, timer = built or lightning_trainer(cfg, setup.trainer_cfg, setup.run_dir, setup.device)
    for callback in trainer.callbacks:
        if isinstance(callback, ThroughputLogger):
            callback.flops_per_sample = setup.flops["train_flops_per_image"]
    data = ({"train_dataloaders": RepeatedBatch(setup.batch, setup.total)} if setup.batch is not None
            else {"datamodule": setup.method.datamodule()})
    module = setup.module()
    with PeakMemory(setup.device) as memory:
        trainer.fit(module, **data)
    trainer.loggers[0].experiment.finish()
    # A benchmark's weights are no use; DeepSpeed saves directories, hence rmtree (whatever a signal or guard saved)
    shutil.rmtree(setup.run_dir / "lightning" / CHECKPOINT_DIR, ignore_errors=True)
    return Run("lightning", repeat, timer.step_ms(), memory.bytes)


def plain_run(setup: Setup, repeat: int) -> Run:
    cfg = setup.cfg
    module = setup.module()
    if cfg.channels_last:
        module.to(memory_format=torch.channels_last)  # 4-D weights only
    if cfg.compile:
        module.model.compile()
    with PeakMemory(setup.device) as memory:
        if setup.batch is not None:
            batches, prepare = RepeatedBatch(setup.batch, setup.total), None
        else:
            datamodule = setup.method.datamodule()
            datamodule.decode_device = setup.device  # no Trainer tells it where to decode (--decode device)
            batches, prepare = datamodule_batches(datamodule)
        step_ms = plain_loop(module, batches, setup.total, setup.device, resolve_precision(setup.trainer_cfg),
                             cfg.seed, prepare)
    return Run("plain", repeat, step_ms, memory.bytes)


def _synthetic(cfg: Config, method: Method, device: torch.device) -> dict | None:
    if cfg.data != "synthetic":
        return None
    batch = synthetic_batch(cfg.batch_size, cfg.image_size, device, seed=cfg.seed, **method.synthetic)
    if cfg.channels_last and "image" in batch:  # RepeatedBatch's copies keep the layout (clone preserves strides)
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    return batch


def _how(setup: Setup, name: str, order: list[tuple[int, str]], threads: str, cost: BatchCost | None) -> dict:
    cfg, data = setup.cfg, setup.method.data
    repeats = " | ".join(", ".join(loop for r, loop in order if r == repeat) for repeat in range(cfg.repeats))
    return how_measured(
        setup.device, trainer=cfg.trainer, model=name, image_size=cfg.image_size,
        data=cfg.data if cfg.data == "synthetic" else f"shards {data.train_shards}",
        **({"decode": cfg.decode} if cfg.data == "shards" else {}),
        **({"clip": f"{cfg.num_frames} frames, {'up to ' if cfg.data == 'shards' else ''}{cfg.objects} objects"}
           if cfg.trainer == "sam2" else {}),
        **({"batch": cost.how} if cost is not None else {}),
        batch_per_step=cfg.batch_size, steps=f"{cfg.warmup_steps} warm-up + {cfg.steps} timed per run",
        precision=resolve_precision(setup.trainer_cfg), strategy=cfg.strategy, compile=cfg.compile,
        channels_last=cfg.channels_last, plain_loop="run" if cfg.plain else "not run (--plain false)",
        runs=f"{cfg.repeats} repeat(s), in order: {repeats}",
        ratio=("median over repeats of Lightning / plain within a repeat, with min-max" if cfg.plain else "none"),
        cpu_threads=threads, timing=StepClock(setup.device).how, peak_memory=PeakMemory(setup.device).kind)


def training_benchmark(cfg: Config, run_dir: Path, device: torch.device) -> tuple[dict, str]:
    """Both loops ``cfg.repeats`` times (see the module's docstring); the report and its text."""
    total = cfg.warmup_steps + cfg.steps
    # Lightning takes compile and channels-last as users pass them (--trainer.compile / --trainer.channels_last);
    # the plain loop applies them by hand.
    trainer_cfg = TrainerConfig(max_steps=total, devices=1, accelerator="gpu" if device.type == "cuda" else "cpu",
                                strategy=cfg.strategy, precision=cfg.precision,
                                checkpoint_every_n_steps=total + 1, val_every_n_steps=total + 1,
                                compile=cfg.compile, channels_last=cfg.channels_last)
    # The first Trainer before anything slow: build_trainer refuses what cannot run here (DeepSpeed or FSDP without
    # CUDA) with its own message before the model, the data and the matmul peak take their time.
    first = lightning_trainer(cfg, trainer_cfg, run_dir, device)
    name, method = build_method(cfg, total, run_dir)
    order = run_order(cfg.repeats, cfg.plain)
    batch = _synthetic(cfg, method, device)
    # A method whose cost follows the batch (PLM: tokens, tiles) counts it on the batch; the others per image
    cost = method.batch_cost(batch) if method.batch_cost is not None and batch is not None else None
    setup = Setup(cfg, run_dir, device, trainer_cfg, method, cost.flops if cost else flop_count(method.module.model),
                  len(order), batch)
    # Both loops get the thread count the recipes' runs get (trainers/run.py), loader workers counted
    threads = configure_cpu_threads(cfg.num_workers if cfg.data == "shards" else 0, 1)
    peak = matmul_peak(device)
    how = _how(setup, name, order, threads, cost)
    compute_begins()  # the settings held: an error from here on is a failure, shown with its traceback
    runs = []
    for repeat, loop in order:
        if loop == "lightning":
            runs.append(lightning_run(setup, repeat, first))
            first = None
        else:
            runs.append(plain_run(setup, repeat))
    report = benchmark_report(how, setup.flops, peak, cfg.warmup_steps, cfg.batch_size, runs)
    if cost is None:
        return report, format_report(report)
    add_token_rates(report, cost.tokens, cfg.batch_size)
    return report, f"{format_report(report)}\n{token_lines(report)}"


def add_token_rates(report: dict, tokens: int, batch_size: int) -> None:
    """Real tokens per second beside images/s in every loop's and every run's figures (the same batch every step:
    ``tokens`` per ``batch_size`` samples), and training FLOPs per token. Ratios are unchanged: the same factor."""
    figures = [report[loop] for loop in LOOPS if report[loop] is not None]
    figures += [entry[loop] for entry in report["repeats"] for loop in LOOPS if loop in entry]
    for f in figures:
        f["tokens_per_sec"] = f["images_per_sec"] * tokens / batch_size
    report["tokens_per_step"] = tokens
    flops = report["flops"]
    flops["train_flops_per_token"] = flops["train_flops_per_image"] * batch_size / tokens


def token_lines(report: dict) -> str:
    rates = ", ".join(f"{name} {report[loop]['tokens_per_sec']:.4g}" for name, loop in
                      (("Lightning", "lightning"), ("plain PyTorch", "plain")) if report[loop] is not None)
    return (f"tokens/s (the {report['tokens_per_step']} real tokens of each step, visual ones included): {rates}\n"
            f"training FLOPs per token: {report['flops']['train_flops_per_token'] / 1e6:.4g} MF")
