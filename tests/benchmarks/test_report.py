"""benchmarks/report.py: each run's figures, the pooled figures of each loop, the median Lightning / plain ratio over
repeats with its spread, and the text."""

import pytest

from benchmarks.report import Run, benchmark_report, format_report

FLOPS = {"train_flops_per_image": 1e9, "model_forward_flops_per_image": 1e9 / 3, "source": "M.complexity()"}
PEAK = {"flops_per_sec": 1e11, "dtype": "float32", "size": 8, "repetitions": 1, "seconds": 1.0}


def test_run_figures_and_ratio():
    runs = [Run("lightning", 0, [5.0, 100.0, 100.0], 123), Run("plain", 0, [5.0, 50.0, 50.0], 123)]
    report = benchmark_report({}, FLOPS, PEAK, 1, 10, runs)
    # Lightning: 20 images in 0.2 s = 100 img/s = 1e11 FLOP/s = MFU 1; plain: 200 img/s
    assert report["lightning"]["images_per_sec"] == pytest.approx(100)
    assert report["lightning"]["achieved_flops_per_sec"] == pytest.approx(1e11)
    assert report["lightning"]["mfu"] == pytest.approx(1.0) and report["plain"]["mfu"] == pytest.approx(2.0)
    ratio = report["ratio_lightning_over_plain"]
    assert ratio["repeats"] == 1
    assert (ratio["images_per_sec"], ratio["images_per_sec_min"], ratio["images_per_sec_max"]) == pytest.approx(
        (0.5, 0.5, 0.5))
    assert ratio["step_ms_median"] == pytest.approx(2.0)
    assert report["plain"]["peak_memory_bytes"] == 123
    text = format_report({**report, "how_measured": {"device": "x"}})
    assert "Lightning / plain" in text and "0.500 (0.500-0.500)" in text and "2.000 (2.000-2.000)" in text


def test_repeats_give_the_median_ratio_with_its_spread_and_pool_each_loop():
    # Per repeat, Lightning / plain images/s: 100/200 = 0.5, 100/100 = 1.0, 100/125 = 0.8 (order alternates)
    runs = [Run("lightning", 0, [1.0, 100.0], 10), Run("plain", 0, [1.0, 50.0], 20),
            Run("plain", 1, [1.0, 100.0], 30), Run("lightning", 1, [1.0, 100.0], 40),
            Run("lightning", 2, [1.0, 100.0], 50), Run("plain", 2, [1.0, 80.0], 60)]
    report = benchmark_report({}, FLOPS, PEAK, 1, 10, runs)
    assert [entry["order"] for entry in report["repeats"]] == [["lightning", "plain"], ["plain", "lightning"],
                                                                ["lightning", "plain"]]
    per_repeat = [entry["ratio"]["images_per_sec"] for entry in report["repeats"]]
    assert per_repeat == pytest.approx([0.5, 1.0, 0.8])
    ratio = report["ratio_lightning_over_plain"]
    assert ratio["repeats"] == 3
    assert (ratio["images_per_sec"], ratio["images_per_sec_min"], ratio["images_per_sec_max"]) == pytest.approx(
        (0.8, 0.5, 1.0))
    assert ratio["step_ms_median"] == pytest.approx(1.25)  # of 2.0, 1.0 and 1.25
    # each loop's row pools its runs: plain 30 images in 0.23 s; the highest peak memory
    plain = report["plain"]
    assert plain["runs"] == 3 and plain["timed_steps"] == 3 and plain["step_ms"] == pytest.approx([50, 100, 80])
    assert plain["images_per_sec"] == pytest.approx(30 / 0.23) and plain["peak_memory_bytes"] == 60
    assert report["lightning"]["step_ms_median"] == pytest.approx(100)
    text = format_report({**report, "how_measured": {"device": "x"}})
    assert "0.800 (0.500-1.000)" in text and "median over 3 repeats" in text
    assert "repeat 2: plain 100, lightning 100; Lightning / plain 1.000" in text


def test_without_plain_runs_there_is_no_ratio():
    runs = [Run("lightning", 0, [1.0, 100.0], None), Run("lightning", 1, [1.0, 50.0], None)]
    report = benchmark_report({}, {**FLOPS, "train_flops_per_image": None}, PEAK, 1, 10, runs)
    assert report["plain"] is None and report["ratio_lightning_over_plain"] is None
    assert report["lightning"]["runs"] == 2 and report["lightning"]["mfu"] is None
    assert report["lightning"]["peak_memory_bytes"] is None
    text = format_report({**report, "how_measured": {"device": "x"}})
    assert "plain PyTorch loop not run (--plain false)" in text and text.count("Lightning / plain") == 1
