"""benchmarks/measure.py: step timing on a fake clock, the data-sheet peaks, and (on a GPU) the matmul peak and
peak memory."""

from types import SimpleNamespace

import pytest
import torch

from benchmarks import measure


def _fake_clock(*ticks: float):
    ticks = iter(ticks)
    return lambda: next(ticks)


def test_step_clock_and_stats_on_a_fake_clock():
    clock = measure.StepClock("cpu", _fake_clock(10.0, 10.1, 10.3, 10.6, 11.0))
    for _ in range(5):
        clock.mark()
    assert clock.step_ms() == pytest.approx([100, 200, 300, 400])
    stats = measure.step_stats(clock.step_ms(), warmup_steps=1, batch_size=4)
    # timed: 200, 300 and 400 ms, 3 x 4 images in 0.9 s
    assert stats["timed_steps"] == 3 and stats["step_ms"] == pytest.approx([200, 300, 400])
    assert stats["images_per_sec"] == pytest.approx(12 / 0.9)
    assert (stats["step_ms_median"], stats["step_ms_min"], stats["step_ms_max"]) == pytest.approx((300, 200, 400))
    with pytest.raises(ValueError, match="No timed steps"):
        measure.step_stats([1.0, 2.0], warmup_steps=2, batch_size=4)


def test_step_timer_marks_every_batch_start_and_the_end_of_the_last_step():
    timer = measure.StepTimer("cpu", _fake_clock(0.0, 1.0, 3.0, 6.0))
    trainer = SimpleNamespace(global_step=0, max_steps=3)
    for batch_idx in range(3):
        timer.on_train_batch_start(trainer, None, {}, batch_idx)
        trainer.global_step += 1  # the optimizer step
        timer.on_train_batch_end(trainer, None, None, {}, batch_idx)
    assert timer.step_ms() == pytest.approx([1000, 2000, 3000])


def test_spec_peak_by_device_name():
    assert measure.spec_peak("NVIDIA H200") == 989.4e12 and measure.spec_peak("NVIDIA H100 80GB HBM3") == 989.4e12
    assert measure.spec_peak("NVIDIA A100-SXM4-40GB") == 312e12 and measure.spec_peak("Tesla T4") is None


def test_how_measured_names_the_machine_and_keeps_the_callers_settings():
    how = measure.how_measured(torch.device("cpu"), model="m", runs="2")
    assert how["device"].startswith("CPU") and how["cpu_cores"] >= 1 and how["torch_threads"] >= 1
    assert (how["model"], how["runs"]) == ("m", "2") and {"torch", "lightning", "date"} <= set(how)
    text = measure.format_how(how)
    assert text.splitlines()[0] == "how measured" and "  model" in text


@pytest.mark.gpu
def test_cuda_peak_and_memory():
    device = torch.device("cuda")
    peak = measure.matmul_peak(device, min_seconds=0.2)
    assert peak["dtype"] == "bfloat16" and peak["size"] == 8192 and peak["repetitions"] >= 10
    assert peak["flops_per_sec"] > 1e12
    with measure.PeakMemory(device) as memory:
        x = torch.empty(256, 1024, 1024, dtype=torch.uint8, device=device)  # 256 MiB
        del x
    assert memory.bytes >= 256 * 2**20 and "cuda" in memory.kind
