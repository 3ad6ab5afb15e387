"""Measuring training speed (recipes/benchmark.py): step timing, a plain PyTorch loop to hold Lightning against,
the device's measured matmul peak, peak memory, FLOP formulas, and the report as a table and a dict for JSON.

Nothing here knows where batches come from: the recipe hands in an iterable of batch dicts (and, for shard
loaders, the datamodule's device-side step), as Lightning's fit would get them.
"""

from __future__ import annotations

import copy
import datetime
import gc
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from trainers.random_state import seed_rank

# Dense bf16 peaks from the vendors' spec sheets (shared references performance.md, "Peak dense bf16 used for
# MFU"): shown next to the measured peak for reference only; MFU is always against the measured one.
SPEC_PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "V100": 125e12}


# ---- step timing ---------------------------------------------------------------------------------------------

class StepClock:
    """Step boundaries. On a GPU a mark is a CUDA event recorded on the current stream: nothing waits inside a
    step, and the events are read once the run is over. On the CPU a mark reads ``clock`` (perf_counter)."""

    def __init__(self, device: torch.device | str, clock: Callable[[], float] = time.perf_counter):
        self.cuda = torch.device(device).type == "cuda"
        self.clock = clock
        self.marks: list = []
        self.how = "CUDA events at step boundaries" if self.cuda else "time.perf_counter at step boundaries"

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(self.clock())

    def step_ms(self) -> list[float]:
        """Milliseconds between consecutive marks: one value per step."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [1000.0 * (b - a) for a, b in zip(self.marks, self.marks[1:])]


class StepTimer(Callback):
    """Marks a boundary when each training batch is on the device (``on_train_batch_start``, after Lightning's
    transfer) and once after the last step, the same places as :func:`plain_loop`. A step's time therefore holds
    everything Lightning does between two batches: hooks, callbacks, logging, the next batch's fetch."""

    def __init__(self, device: torch.device | str, clock: Callable[[], float] = time.perf_counter):
        self.clock = StepClock(device, clock)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.clock.mark()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= trainer.max_steps:
            self.clock.mark()

    def step_ms(self) -> list[float]:
        return self.clock.step_ms()


def step_stats(step_ms: Sequence[float], warmup_steps: int, batch_size: int) -> dict:
    """Images/s over the timed steps (those after ``warmup_steps``) and their median / min / max step time."""
    timed = list(step_ms[warmup_steps:])
    if not timed:
        raise ValueError(f"No timed steps: {len(step_ms)} step(s) measured, {warmup_steps} of them warm-up. "
                         "Raise --steps.")
    return {
        "timed_steps": len(timed),
        "images_per_sec": len(timed) * batch_size / (sum(timed) / 1000.0),
        "step_ms_median": statistics.median(timed),
        "step_ms_min": min(timed),
        "step_ms_max": max(timed),
        "step_ms": timed,
    }


# ---- the plain PyTorch loop ------------------------------------------------------------------------------------

class RepeatedBatch:
    """One batch served ``times`` times, a fresh copy each time: mixup and random erasing work in place, and
    every step (and both runs) must see the same input. A length, so that Lightning sizes its epoch."""

    def __init__(self, batch: dict, times: int):
        self.batch, self.times = batch, times

    def __len__(self) -> int:
        return self.times

    def __iter__(self):
        for _ in range(self.times):
            yield {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in self.batch.items()}


def synthetic_batch(batch_size: int, image_size: int, device: torch.device | str, *, seed: int = 0,
                    num_classes: int | None = None, vocab: Sequence[str] | None = None) -> dict:
    """A random batch in the datamodules' contract (datamodules/__init__.py), made once on ``device``: ``image``
    standard normal (as normalised pixels), ``label`` when ``num_classes`` is given, ``hashtags`` (1 to 3 tags of
    ``vocab`` per image) when ``vocab`` is."""
    gen = torch.Generator().manual_seed(seed)
    batch: dict = {"image": torch.randn(batch_size, 3, image_size, image_size, generator=gen)}
    if num_classes is not None:
        batch["label"] = torch.randint(num_classes, (batch_size,), generator=gen)
    if vocab is not None:
        counts = torch.randint(1, 4, (batch_size,), generator=gen).tolist()
        batch["hashtags"] = [[vocab[i] for i in torch.randint(len(vocab), (n,), generator=gen).tolist()]
                             for n in counts]
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


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


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def datamodule_batches(datamodule: L.LightningDataModule) -> tuple[Iterable[dict], Callable[[dict], dict]]:
    """A datamodule's training batches as fit gets them: after setup('fit'), its loader, and its device-side step
    (on_after_batch_transfer) for plain_loop's ``prepare``."""
    datamodule.setup("fit")
    return datamodule.train_dataloader(), lambda batch: datamodule.on_after_batch_transfer(batch, 0)


def plain_loop(module: L.LightningModule, batches: Iterable[dict], steps: int, device: torch.device | str,
               precision: str, seed: int, prepare: Callable[[dict], dict] | None = None,
               clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Train ``module`` for ``steps`` steps the plain PyTorch way; returns each step's milliseconds.

    The loss is the module's ``compute_loss`` (the code its training_step runs), the optimizer and schedule come
    from its own ``configure_optimizers`` (called after the move to the device, as Lightning does: fused AdamW
    needs CUDA parameters). ``prepare`` is the device-side step of a datamodule (on_after_batch_transfer). The
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
        batch = to_device(next(batches), device)
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
    timer.mark()
    return timer.step_ms()


# ---- the device: matmul peak and memory ----------------------------------------------------------------------

def matmul_peak(device: torch.device | str, size: int | None = None, min_seconds: float = 1.0) -> dict:
    """The dense matmul rate this device reaches now, the ceiling MFU is measured against (and, for reference, the
    GPU's spec-sheet bf16 peak when performance.md knows it).

    GPU: bf16 ``size``^3 (default 8192), CUDA-event timing; CPU: float32 (default 1024^3) on every torch thread, as
    training runs. After a warm-up, one product is timed to choose how many make about ``min_seconds``; those
    are timed together.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    size = size or (8192 if cuda else 1024)
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def seconds_for(repetitions: int) -> float:
        clock = StepClock(device)
        clock.mark()
        for _ in range(repetitions):
            a @ b
        clock.mark()
        return clock.step_ms()[0] / 1000.0

    seconds_for(3 if cuda else 1)  # warm-up: clocks, kernel choice, caches
    once = seconds_for(1)
    repetitions = max(10 if cuda else 1, round(min_seconds / max(once, 1e-9)))
    seconds = seconds_for(repetitions)
    del a, b
    return {"flops_per_sec": 2 * size**3 * repetitions / seconds, "dtype": str(dtype).removeprefix("torch."),
            "size": size, "repetitions": repetitions, "seconds": seconds,
            "spec_bf16_flops_per_sec": spec_peak(device_name(device)) if cuda else None}


def spec_peak(device_name: str) -> float | None:
    """The spec sheet's dense bf16 FLOP/s of a GPU by name, when performance.md lists it."""
    return next((flops for key, flops in SPEC_PEAK_BF16.items() if key in device_name), None)


class PeakMemory:
    """Peak memory of what runs inside ``with``. GPU: ``torch.cuda.max_memory_allocated`` after a reset at the start
    (tensors only, the caching allocator's reserve excluded). CPU: the process's resident-set high-water mark
    (getrusage), which cannot be reset, so a later run's figure includes every earlier one's."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.bytes: int | None = None

    @property
    def kind(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated, reset before each run"
        return "process RSS high-water mark (getrusage); it cannot be reset, so the later run includes the earlier"

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.bytes = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


# ---- FLOPs: the model's own count against performance.md's formulas ----------------------------------------------

def vit_block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """performance.md §2.1: one pre-LN block, matmuls only: 8Nd^2 (qkv + out) + 4mNd^2 (MLP) + 4N^2d (QK^T, AV)."""
    return 8 * tokens * dim**2 + 4 * mlp_ratio * tokens * dim**2 + 4 * tokens**2 * dim


def vit_forward_flops(img_size: int, patch_size: int, dim: int, depth: int, mlp_ratio: float = 4.0,
                      in_chans: int = 3, num_classes: int = 0) -> float:
    """performance.md §2.1: patch embed 2 P (3p^2) d + L block(P + 1, d); plus the classifier, 2 d K (§2.1 counts
    the tower only: the head is under 0.01% of a ViT-B at 224 with 1000 classes)."""
    patches = (img_size // patch_size) ** 2
    return (2 * patches * in_chans * patch_size**2 * dim + depth * vit_block_flops(patches + 1, dim, mlp_ratio)
            + 2 * dim * num_classes)


def mae_forward_flops(img_size: int, patch_size: int, dim: int, depth: int, mask_ratio: float = 0.75,
                      decoder_dim: int = 512, decoder_depth: int = 8, mlp_ratio: float = 4.0,
                      in_chans: int = 3) -> tuple[float, float]:
    """performance.md §2.2, (encoder, decoder) forward FLOPs. Encoder: patch embed on all P patches + L blocks on
    N_e = int(P (1 - r)) + 1 tokens (facebookresearch/mae models_mae.py random_masking keeps int(L (1 - r))).
    Decoder: embed 2 N_e d d', blocks on P + 1 tokens, prediction 2 (P + 1) d' 3p^2."""
    patches = (img_size // patch_size) ** 2
    visible = int(patches * (1 - mask_ratio)) + 1
    pixels = in_chans * patch_size**2
    encoder = 2 * patches * pixels * dim + depth * vit_block_flops(visible, dim, mlp_ratio)
    decoder = (2 * visible * dim * decoder_dim + decoder_depth * vit_block_flops(patches + 1, decoder_dim, mlp_ratio)
               + 2 * (patches + 1) * decoder_dim * pixels)
    return encoder, decoder


def formula_forward_flops(model: nn.Module) -> tuple[float | None, str]:
    """performance.md's forward FLOPs per image for ``model``, from the numbers of its config; (None, why) for
    models the formulas do not cover (conv stems, CNNs)."""
    c = getattr(model, "cfg", None)
    if c is not None and hasattr(c, "decoder_embed_dim"):
        encoder, decoder = mae_forward_flops(c.img_size, c.patch_size, c.embed_dim, c.depth, c.mask_ratio,
                                             c.decoder_embed_dim, c.decoder_depth, c.mlp_ratio, c.in_chans)
        return encoder + decoder, "performance.md §2.2, MAE encoder + decoder"
    if c is not None and hasattr(c, "embed_dim") and getattr(c, "stem", "patchify") == "patchify":
        return (vit_forward_flops(c.img_size, c.patch_size, c.embed_dim, c.depth, c.mlp_ratio, c.in_chans,
                                  c.num_classes), "performance.md §2.1, ViT")
    return None, f"no formula in performance.md for {type(model).__name__}"


def flop_check(model: nn.Module) -> dict:
    """The model's own count (``complexity()``, forward; training = 3x) beside the formula, and how far apart."""
    own = model.complexity().flops if callable(getattr(model, "complexity", None)) else None
    formula, source = formula_forward_flops(model)
    difference = (own - formula) / formula if own is not None and formula else None
    return {"model_forward_flops_per_image": own, "formula_forward_flops_per_image": formula,
            "formula_source": source, "relative_difference": difference,
            "train_flops_per_image": 3 * own if own is not None else None}


# ---- the report ------------------------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # platform.processor() is often empty on Linux
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"CPU: {model}"


def how_measured(device: torch.device, **settings) -> dict:
    """Where and how: the device, cores and threads, versions and date, plus the caller's settings."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"device": device_name(device), "cpu_cores": cores, "torch_threads": torch.get_num_threads(), **settings,
            "torch": torch.__version__, "lightning": L.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def format_how(how: dict) -> str:
    return "how measured\n" + "\n".join(f"  {key:<18} {value}" for key, value in how.items())


def run_figures(step_ms: Sequence[float], warmup_steps: int, batch_size: int, train_flops: float | None,
                peak_flops: float, memory: PeakMemory) -> dict:
    """One run's figures: timing, achieved FLOP/s (images/s x training FLOPs per image), MFU, peak memory."""
    figures = step_stats(step_ms, warmup_steps, batch_size)
    achieved = figures["images_per_sec"] * train_flops if train_flops else None
    return {**figures, "achieved_flops_per_sec": achieved, "mfu": achieved / peak_flops if achieved else None,
            "peak_memory_bytes": memory.bytes}


def benchmark_report(how: dict, flops: dict, peak: dict, warmup_steps: int, batch_size: int, *,
                     lightning: tuple[Sequence[float], PeakMemory],
                     plain: tuple[Sequence[float], PeakMemory] | None = None) -> dict:
    """Every figure of the two runs (each given as its step milliseconds and its PeakMemory) and their ratio.
    Without a plain run (``plain`` None), ``plain`` and ``ratio_lightning_over_plain`` are None."""
    def figures(run: tuple[Sequence[float], PeakMemory] | None) -> dict | None:
        if run is None:
            return None
        step_ms, memory = run
        return run_figures(step_ms, warmup_steps, batch_size, flops["train_flops_per_image"], peak["flops_per_sec"],
                           memory)

    runs = {"lightning": figures(lightning), "plain": figures(plain)}
    ratio = None
    if runs["plain"] is not None:
        ratio = {key: runs["lightning"][key] / runs["plain"][key] for key in ("images_per_sec", "step_ms_median")}
    return {"how_measured": how, "flops": flops, "peak": peak, **runs, "ratio_lightning_over_plain": ratio}


def _num(value: float | None, unit: str = "", scale: float = 1.0, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value / scale:.{digits}g}{unit}"


def format_report(report: dict) -> str:
    """The report as plain text: how measured, the table (Lightning, plain loop, their ratio), FLOPs and peak."""
    rows = [("", "images/s", "median ms", "min ms", "max ms", "TFLOP/s", "MFU", "peak mem")]
    for name, key in (("Lightning", "lightning"), ("plain PyTorch", "plain")):
        r = report[key]
        if r is None:
            rows.append((name, "not run", "", "", "", "", "", ""))
            continue
        rows.append((name, _num(r["images_per_sec"]), _num(r["step_ms_median"]), _num(r["step_ms_min"]),
                     _num(r["step_ms_max"]), _num(r["achieved_flops_per_sec"], scale=1e12),
                     _num(r["mfu"] and 100 * r["mfu"], "%", digits=3), _num(r["peak_memory_bytes"], " GB", 1e9)))
    ratio = report["ratio_lightning_over_plain"]
    if ratio is not None:
        rows.append(("Lightning / plain", f"{ratio['images_per_sec']:.3f}", f"{ratio['step_ms_median']:.3f}",
                     "", "", "", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = "\n".join("  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                                       for i, (cell, w) in enumerate(zip(row, widths))) for row in rows)
    f, p = report["flops"], report["peak"]
    diff = f["relative_difference"]
    lines = [
        format_how(report["how_measured"]), "", table, "",
        f"FLOPs per image, forward: model {_num(f['model_forward_flops_per_image'], ' GF', 1e9)}, formula "
        f"{_num(f['formula_forward_flops_per_image'], ' GF', 1e9)} ({f['formula_source']}), difference "
        + ("n/a" if diff is None else f"{100 * diff:+.3f}%"),
        f"training FLOPs per image: {_num(f['train_flops_per_image'], ' GF', 1e9)} (3 x forward)",
        f"peak: measured {_num(p['flops_per_sec'], ' TFLOP/s', 1e12)} ({p['dtype']} {p['size']}^3 matmul x "
        f"{p['repetitions']}, {p['seconds']:.2f} s); spec bf16 "
        + (_num(p["spec_bf16_flops_per_sec"], " TFLOP/s", 1e12) if p.get("spec_bf16_flops_per_sec") else "unknown"),
        "MFU = achieved / measured peak",
    ]
    if ratio is None:
        lines.append("plain PyTorch loop not run (--plain false): no plain figures and no Lightning / plain ratio")
    return "\n".join(lines)
