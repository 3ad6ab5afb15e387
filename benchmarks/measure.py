"""Measuring one run: step boundaries (CUDA events on a GPU, perf_counter on the CPU), step statistics, the
device's measured matmul peak (the ceiling MFU is measured against), peak memory, and where and how it all was
measured."""

from __future__ import annotations

import datetime
import gc
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

# Dense bf16 peaks from the vendors' data sheets (NVIDIA H100/H200 Tensor Core GPU, A100, V100): shown next to the
# measured peak for reference only; MFU is always against the measured one.
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
    transfer) and once after the last step, the same places as ``benchmarks.training.plain_loop``. A step's time
    therefore holds everything Lightning does between two batches: hooks, callbacks, logging, the next fetch."""

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


# ---- the device: matmul peak and memory ----------------------------------------------------------------------

def matmul_peak(device: torch.device | str, size: int | None = None, min_seconds: float = 1.0) -> dict:
    """The dense matmul rate this device reaches now, the ceiling MFU is measured against (and, for reference, the
    GPU's data-sheet bf16 peak when ``SPEC_PEAK_BF16`` has it).

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
    return {"flops_per_sec": 2 * size**3 * repetitions / seconds, "dtype": str(dtype).removeprefix("torch."),
            "size": size, "repetitions": repetitions, "seconds": seconds,
            "spec_bf16_flops_per_sec": spec_peak(device_name(device)) if cuda else None}


def spec_peak(device_name: str) -> float | None:
    """The data sheet's dense bf16 FLOP/s of a GPU by name, when ``SPEC_PEAK_BF16`` has it."""
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
        return "process RSS high-water mark (getrusage); it cannot be reset, so each run includes the earlier ones"

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
