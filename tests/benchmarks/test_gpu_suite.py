"""benchmarks.gpu_suite without a GPU: the cases and their commands, the Markdown section it keeps in a file, and the
target verdicts computed from hand-made benchmark.json dicts (the figures in them are made up)."""

import json
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu_suite as suite
from recipes.benchmark import Config
from recipes.cli import parse_config


def _config(case: suite.Case) -> Config:
    cfg, _ = parse_config(Config, list(case.args))
    return cfg


def test_dry_run_lists_every_case_with_a_command_that_parses(tmp_path, capsys):
    run_root, out = tmp_path / "runs", tmp_path / "BENCHMARKS.md"
    assert suite.main(["--dry-run", "--run-root", str(run_root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    cases = suite.make_cases(run_root)
    assert len({c.name for c in cases}) == len(cases) and {c.part for c in cases} == set(suite.PARTS)
    configs = {}
    for case in cases:
        assert f"-- {case.name} (" in printed and case.shown() in printed, case.name
        configs[case.name] = cfg = _config(case)
        assert cfg.run_dir == str(run_root / case.name)  # each case its own run directory
    assert not out.exists() and not run_root.exists()  # --dry-run writes nothing

    # What each part is there to measure
    mae = [configs["mae_b16_eager"], configs["mae_b16_compile"]]
    assert all(c.model.name == "mae_vit_base_patch16" and c.image_size == 224 and c.precision == "bf16-mixed"
               and c.data == "synthetic" and c.plain and c.steps == 50 and c.warmup_steps == 20 for c in mae)
    assert [c.compile for c in mae] == [False, True]
    # the Lightning / plain target gets the median of 3 alternating repeats; every other run is timed once
    assert [c.repeats for c in mae] == [3, 1]
    assert all(configs[case.name].repeats == 1 for case in cases
               if case.kind == "training" and case.name != "mae_b16_eager")
    loader = [configs["loader_host"], configs["loader_device"]]
    assert [c.decode for c in loader] == ["host", "device"] and all(c.trainer == "none" for c in loader)
    assert all(c.worker_counts == [8, 16] and c.shards == suite.world_spec(run_root) for c in loader)
    shards = [configs["loader_mae_shards_host"], configs["loader_mae_shards_device"]]
    assert [c.decode for c in shards] == ["host", "device"] and all(c.data == "shards" for c in shards)
    assert configs["zero_ddp_b16"].strategy == "ddp" and configs["zero_ds2_b16"].strategy == "deepspeed_stage_2"
    for short, model, *_ in suite.BIG_MAE:
        for name, strategy in ((f"zero3_{short}", "deepspeed_stage_3"), (f"zero3off_{short}",
                                                                          "deepspeed_stage_3_offload")):
            assert configs[name].model.name == model and configs[name].strategy == strategy
            assert configs[name].plain is False  # a 6.5B model does not fit twice
    regnet = [configs[name] for name in ("abl_regnet16_nchw", "abl_regnet16_cl")]
    assert [c.channels_last for c in regnet] == [False, True] and all(c.trainer == "swag" for c in regnet)
    assert configs["abl_mae_b16_fp32"].precision == "32-true"


def test_each_part_fits_one_ten_minute_device_command():
    cases = suite.make_cases()
    for part in suite.PARTS:
        mine = [c for c in cases if c.part == part]
        assert sum(c.estimate_s for c in mine if not c.only_if_failed) <= suite.PART_BUDGET_S < 600, part
        assert all(c.estimate_s < c.timeout_s <= suite.PART_BUDGET_S for c in mine), part
        assert all(c.only_if_failed in {d.name for d in mine} for c in mine if c.only_if_failed)


def test_shards_and_smoke_settings():
    cases = {c.name: c for c in suite.make_cases("r", shards="/data/in1k/train-{000000..000009}.tar", smoke=True)}
    assert _config(cases["loader_host"]).shards == _config(cases["loader_mae_shards_device"]).shards == \
        "/data/in1k/train-{000000..000009}.tar"
    for case in cases.values():
        cfg = _config(case)
        assert cfg.batch_size <= 8 and cfg.steps == 2 and (cfg.repeats == 1 or case.kind == "loader")
        assert case.kind == ("loader" if cfg.trainer == "none" else "training")


def test_bad_parts_and_case_names_are_refused(capsys):
    with pytest.raises(SystemExit):
        suite.parse_args(["--part", "mae,speed"])
    assert "unknown part(s) ['speed']" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"--cases: \['zero3_2b'\] are not cases of --part mae"):
        suite.main(["--dry-run", "--part", "mae", "--cases", "zero3_2b"])
    assert suite.main(["--dry-run", "--part", "zero", "--cases", "zero3_2b"]) == 0
    printed = capsys.readouterr().out
    assert "zero3_2b" in printed and "zero3_huge" not in printed and "part mae" not in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_to_run_without_cuda_and_says_how(tmp_path):
    with pytest.raises(SystemExit) as refused:
        suite.main(["--part", "mae", "--run-root", str(tmp_path / "runs"), "--out", str(tmp_path / "B.md")])
    message = str(refused.value)
    assert "no" in message and "CUDA" in message and "--dry-run" in message
    assert "python -m benchmarks.gpu_suite --part mae" in message
    assert list(tmp_path.iterdir()) == []


# ---- the Markdown section ----------------------------------------------------------------------------------------

def test_write_section_replaces_its_marked_section_and_keeps_the_rest(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    before, after = "# Benchmarks\n\nWritten by hand.\n\n", "\n\n## CPU\n\nAlso by hand.\n"
    path.write_text(f"{before}{suite.BEGIN}\nold figures\n{suite.END}{after}")
    new = f"{suite.BEGIN}\nnew figures\n{suite.END}"
    suite.write_section(path, new)
    assert path.read_text() == f"{before}{new}{after}"
    suite.write_section(path, new)
    assert path.read_text() == f"{before}{new}{after}"  # a second write changes nothing

    unmarked = tmp_path / "other.md"
    unmarked.write_text("# Benchmarks\nno section yet")
    suite.write_section(unmarked, new)
    assert unmarked.read_text() == f"# Benchmarks\nno section yet\n\n{new}\n"
    fresh = tmp_path / "fresh.md"
    suite.write_section(fresh, new)
    assert fresh.read_text() == f"{new}\n"


# ---- the target verdicts from hand-made reports ------------------------------------------------------------

def _run(images_per_sec: float, mfu: float | None = None, peak_gb: float = 10.0) -> dict:
    return {"images_per_sec": images_per_sec, "mfu": mfu, "step_ms_median": 50.0, "step_ms_min": 49.5,
            "step_ms_max": 51.25, "peak_memory_bytes": peak_gb * 1e9, "achieved_flops_per_sec": None}


def _report(images_per_sec: float, mfu: float | None = None, plain: float | None = None, **how) -> dict:
    return {"how_measured": {"device": "NVIDIA H200", "torch": "2.11", "lightning": "2.6.6", "cpu_cores": 16,
                             "batch_per_step": 256, "strategy": "auto", **how},
            "peak": {"flops_per_sec": 790e12}, "flops": {"train_flops_per_image": 58.7e9},
            "lightning": _run(images_per_sec, mfu),
            "plain": _run(plain) if plain else None,
            "ratio_lightning_over_plain": {"images_per_sec": images_per_sec / plain} if plain else None}


def _ok(report: dict, name: str = "x") -> dict:
    return {"name": name, "part": "p", "kind": "training", "what": name,
            "command": f"python -m recipes.benchmark {name}", "estimate_s": 60, "started": "2026-11-21T12:00:00+00:00",
            "seconds": 50.0, "status": "ok", "report": report}


def _failed(status: str = "oom", name: str = "x") -> dict:
    return {**_ok({}, name), "status": status, "report": None,
            "error": "exit 1\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"}


def test_mfu_target_takes_the_best_mae_run_against_fifty_percent():
    assert suite.check_mfu({}).holds is None
    check = suite.check_mfu({"mae_b16_eager": _ok(_report(6000, mfu=0.47)),
                             "mae_b16_compile": _ok(_report(6500, mfu=0.52))})
    assert check.holds is True and "mae_b16_compile 52.0%" in check.figure and "mae_b16_eager 47.0%" in check.figure
    assert suite.check_mfu({"mae_b16_eager": _ok(_report(6000, mfu=0.499))}).holds is False
    assert suite.check_mfu({"mae_b16_eager": _failed()}).holds is None  # a failed run measured nothing


def test_lightning_overhead_target_needs_every_mae_run_within_two_percent():
    # 990 / 1000 = 0.99 and 985 / 1000 = 0.985 hold; 975 / 1000 = 0.975 does not
    records = {"mae_b16_eager": _ok(_report(990, plain=1000)), "mae_b16_compile": _ok(_report(985, plain=1000))}
    check = suite.check_lightning_overhead(records)
    assert check.holds is True and "0.990" in check.figure and "0.985" in check.figure
    records["mae_b16_compile"] = _ok(_report(975, plain=1000))
    assert suite.check_lightning_overhead(records).holds is False
    assert suite.check_lightning_overhead({"mae_b16_eager": _ok(_report(990))}).holds is None  # --plain false


def test_the_ratio_of_several_repeats_is_shown_with_its_spread():
    report = _report(990, plain=1000)
    report["ratio_lightning_over_plain"].update(images_per_sec=0.99, images_per_sec_min=0.975,
                                                images_per_sec_max=1.004, repeats=3)
    check = suite.check_lightning_overhead({"mae_b16_eager": _ok(report)})
    assert check.holds is True and check.figure == "Lightning / plain: mae_b16_eager 0.990 (0.975-1.004)"
    row = next(line for line in suite.render_section({"invocations": [], "cases": {"mae_b16_eager": _ok(
        report, "mae_b16_eager")}}).splitlines() if line.startswith("| mae_b16_eager |"))
    assert "| 0.990 (0.975-1.004) |" in row


def test_zero2_target_is_the_ratio_to_ddp():
    assert suite.check_zero2({"zero_ddp_b16": _ok(_report(1000))}).holds is None
    holds = suite.check_zero2({"zero_ddp_b16": _ok(_report(1000)), "zero_ds2_b16": _ok(_report(950))})
    assert holds.holds is True and "0.950x" in holds.figure
    assert suite.check_zero2({"zero_ddp_b16": _ok(_report(1000)), "zero_ds2_b16": _ok(_report(949))}).holds is False


def test_loader_target_compares_shards_with_synthetic_batches():
    records = {"loader_mae_synthetic": _ok(_report(6000)), "loader_mae_shards_host": _ok(_report(3000)),
               "loader_mae_shards_device": _ok(_report(5760))}
    check = suite.check_loader(records)  # host 0.50x, device 0.96x: the device decode keeps up
    assert check.holds is True and "host decode 3000 img/s = 0.50x" in check.figure and "0.96x" in check.figure
    records["loader_mae_shards_device"] = _ok(_report(5640))  # 0.94x
    assert suite.check_loader(records).holds is False
    # Without this part's own synthetic run, the mae part's eager run is the reference
    check = suite.check_loader({"mae_b16_eager": _ok(_report(4000)), "loader_mae_shards_host": _ok(_report(3900))})
    assert check.holds is True and "mae_b16_eager" in check.figure
    assert suite.check_loader({"loader_mae_shards_host": _ok(_report(3900))}).holds is None


def test_largest_fitting_model_is_found_largest_first():
    assert suite.check_largest({}).holds is None
    records = {"zero3_6p5b": _failed("oom"), "zero3off_6p5b": _failed("timeout"),
               "zero3_2b": _ok(_report(300, strategy="deepspeed_stage_3", batch_per_step=64)),
               "zero3_huge": _ok(_report(900, strategy="deepspeed_stage_3", batch_per_step=128))}
    check = suite.check_largest(records)
    assert check.holds is True and check.figure == ("mae_vit_2b_patch14 (deepspeed_stage_3, batch 64): 300.0 img/s, "
                                                    "peak 10.0 GB; larger: mae_vit_6p5b_patch14 zero3_6p5b oom, "
                                                    "zero3off_6p5b timeout")
    records["zero3off_6p5b"] = _ok(_report(40, strategy="deepspeed_stage_3_offload", batch_per_step=32))
    assert suite.check_largest(records).figure.startswith("mae_vit_6p5b_patch14 (deepspeed_stage_3_offload")
    # None fits: open until every model has been tried
    records = {"zero3_6p5b": _failed(), "zero3off_6p5b": _failed(), "zero3_2b": _failed(), "zero3off_2b": _failed()}
    assert suite.check_largest(records).holds is None
    records.update(zero3_huge=_failed(), zero3off_huge=_failed("failed"))
    none_fit = suite.check_largest(records)
    assert none_fit.holds is False and none_fit.figure.startswith("none fits: mae_vit_6p5b_patch14 zero3_6p5b oom")


def test_rendered_section_holds_the_gpu_the_commands_the_figures_and_the_failures(tmp_path):
    loader = _ok({"how_measured": {"device": "NVIDIA H200", "torch": "2.11", "lightning": "2.6.6", "cpu_cores": 16},
                  "loader": [{"workers": 8, "datamodule_images_per_sec": 2500.0, "raw_decode_images_per_sec": 8000.0,
                              "ratio": 0.3125}]}, "loader_host")
    store = {"invocations": [{"command": "python -m benchmarks.gpu_suite --part mae", "started": "2026-11-21T12:00"}],
             "cases": {"mae_b16_eager": _ok(_report(6000, mfu=0.5123, plain=6050), "mae_b16_eager"),
                       "zero3_6p5b": _failed("oom", "zero3_6p5b"), "loader_host": {**loader, "kind": "loader"}}}
    section = suite.render_section(store)
    assert section.startswith(suite.BEGIN) and section.endswith(suite.END)
    assert "GPU: NVIDIA H200" in section and "2026-11-21" in section
    assert "`python -m benchmarks.gpu_suite --part mae`" in section
    assert "`python -m recipes.benchmark mae_b16_eager`" in section
    assert "`python -m recipes.benchmark zero3_6p5b`" in section
    row = next(line for line in section.splitlines() if line.startswith("| mae_b16_eager |"))
    assert "| 6,000.0 | 50.00 (49.50-51.25) | 51.2% |" in row and "| 6,050.0 |" in row
    assert "| 0.992 | 58.70 | 790.0 |" in row  # 6000 / 6050; training GFLOPs per image; the measured peak
    assert "| loader_host | ok | 8 | 2,500 | 8,000 | 0.312 |" in section
    assert "zero3_6p5b (oom):" in section and "    torch.OutOfMemoryError: CUDA out of memory" in section
    verdicts = {line.split(" | ")[0] for line in section.splitlines() if line.endswith("| yes |")}
    assert any("MFU >= 50%" in v for v in verdicts) and any("within 2%" in v for v in verdicts)
    path = tmp_path / "B.md"
    suite.write_section(path, section)
    assert suite.render_section(store) in path.read_text()


# ---- running a case ----------------------------------------------------------------------------------------------

def _script(monkeypatch, code: str) -> suite.Case:
    """A case whose command is a short Python script instead of the recipe (run_case is what is tested)."""
    monkeypatch.setattr(suite.Case, "command", lambda self: [sys.executable, "-c", code])
    return suite.Case("script", "mae", "a script", ("--trainer", "mae"), 10, 120)


def test_a_failing_case_is_recorded_with_its_last_error_lines(tmp_path, monkeypatch):
    case = _script(monkeypatch, "import sys; print('step 1'); print('ValueError: bad flag', file=sys.stderr); "
                                "sys.exit(3)")
    record = suite.run_case(case, 60, tmp_path / "case")
    assert record["status"] == "failed" and record["error"] == "exit 3\nstep 1\nValueError: bad flag"
    assert "report" not in record and (tmp_path / "case" / "log.txt").exists()
    case = _script(monkeypatch, "import sys; print('torch.OutOfMemoryError: CUDA out of memory.'); sys.exit(1)")
    assert suite.run_case(case, 60, tmp_path / "case")["status"] == "oom"


def test_a_finished_case_is_read_from_its_benchmark_json(tmp_path, monkeypatch):
    (tmp_path / "case").mkdir()
    (tmp_path / "case" / "benchmark.json").write_text('{"stale": true}')  # a previous run's: must not count
    case = _script(monkeypatch, "import sys; sys.exit(0)")
    assert suite.run_case(case, 60, tmp_path / "case")["status"] == "failed"
    target = tmp_path / "case" / "benchmark.json"
    case = _script(monkeypatch, f"open({str(target)!r}, 'w').write('{{\"lightning\": 1}}')")
    record = suite.run_case(case, 60, tmp_path / "case")
    assert record["status"] == "ok" and record["report"] == {"lightning": 1}


def test_a_case_past_its_time_is_stopped_with_its_children(tmp_path, monkeypatch):
    pid_file = tmp_path / "child.pid"
    case = _script(monkeypatch, "import subprocess, sys, time; "
                                "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
                                f"open({str(pid_file)!r}, 'w').write(str(child.pid)); print('started', flush=True); "
                                "time.sleep(120)")
    record = suite.run_case(case, 2, tmp_path / "case")
    assert record["status"] == "timeout" and record["error"] == "stopped after 2 s\nstarted"
    child = int(pid_file.read_text())
    # the whole process group got the signal: the grandchild is gone (or a zombie nobody waits for)
    try:
        state = open(f"/proc/{child}/stat").read().split(")")[-1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z")


@pytest.mark.gpu
def test_gpu_suite_runs_the_mae_part_end_to_end(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--part", "mae", "--cases", "mae_b16_eager",
                           "--smoke", "--run-root", str(tmp_path / "runs"), "--out", str(out)],
                          cwd=suite.ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    record = json.loads((tmp_path / "runs" / "results.json").read_text())["cases"]["mae_b16_eager"]
    assert record["status"] == "ok", record.get("error")
    assert record["report"]["lightning"]["mfu"] > 0 and record["report"]["ratio_lightning_over_plain"]
    assert "| mae_b16_eager |" in out.read_text() and "### Targets" in out.read_text()


def test_a_part_runs_its_cases_retries_what_does_not_fit_and_keeps_to_its_budget(tmp_path, monkeypatch, capsys):
    """The zero part with each case's command replaced by a script that writes a made-up benchmark.json (or runs
    out of memory, for ViT-6.5B without offload), on a pretend GPU."""
    def command(case):
        if case.name == "zero3_6p5b":
            return [sys.executable, "-c", "print('torch.OutOfMemoryError: CUDA out of memory'); raise SystemExit(1)"]
        cfg = _config(case)
        report = _report(1000 if cfg.strategy == "ddp" else 960, strategy=cfg.strategy, batch_per_step=cfg.batch_size)
        path = f"{cfg.run_dir}/benchmark.json"
        return [sys.executable, "-c", f"open({path!r}, 'w').write({json.dumps(report)!r})"]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(suite, "missing_modules", lambda parts: [])
    monkeypatch.setattr(suite.Case, "command", command)
    run_root, out = tmp_path / "runs", tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nby hand\n")
    assert suite.main(["--part", "zero", "--run-root", str(run_root), "--out", str(out), "--part-budget", "0"]) == 0
    store = json.loads((run_root / "results.json").read_text())
    status = {name: record["status"] for name, record in store["cases"].items()}
    assert status == {"zero_ddp_b16": "ok", "zero_ds2_b16": "ok", "zero3_6p5b": "oom", "zero3off_6p5b": "ok",
                      "zero3_2b": "ok", "zero3_huge": "ok"}  # offload only where stage 3 did not fit
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nby hand\n\n" + suite.BEGIN) and text.endswith(suite.END + "\n")
    assert "| ZeRO-2 >= 0.95x DDP (MAE ViT-B/16, images/s) | 960 / 1000 img/s = 0.960x | yes |" in text
    assert "mae_vit_6p5b_patch14 (deepspeed_stage_3_offload, batch 32)" in text
    assert "yes  ZeRO-2 >= 0.95x DDP" in capsys.readouterr().out

    # Again with a budget of 150 s (the scripts take no time): ViT-6.5B's estimate (190 s) is past it, so it is
    # skipped with the command that runs it, and so is its retry; the others fit
    assert suite.main(["--part", "zero", "--run-root", str(run_root), "--out", str(out), "--part-budget", "150"]) == 0
    store = json.loads((run_root / "results.json").read_text())
    assert [name for name, r in store["cases"].items() if r["status"] == "skipped"] == ["zero3_6p5b", "zero3off_6p5b"]
    assert "--part zero --cases zero3_6p5b" in store["cases"]["zero3_6p5b"]["error"]
    assert store["cases"]["zero3off_6p5b"]["error"] == "zero3_6p5b did not run"
    assert len(store["invocations"]) == 2 and out.read_text().count(suite.BEGIN) == 1
