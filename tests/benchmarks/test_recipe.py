"""python -m recipes.benchmark as a user runs it, on tiny settings: every figure is computed and consistent, the loops
alternate, and the flags reach both loops (timings themselves never gate a test)."""

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import loader, measure, methods, training
from datamodules.shard_writer import ShardWriter
from recipes.benchmark import Config, main
from recipes.cli import parse_config

TINY = ["--image_size", "32", "--batch_size", "8", "--warmup_steps", "2", "--steps", "4", "--repeats", "2"]
RUN_FIGURES = ("images_per_sec", "step_ms_median", "step_ms_min", "step_ms_max", "achieved_flops_per_sec", "mfu",
               "peak_memory_bytes")


def _mae_tiny_forward_flops_at_32px() -> float:
    """mae_vit_tiny_patch8 at 32 px by hand (tests/benchmarks/flop_formulas.py): P = 16 patches of 8x8, encoder
    d = 192 x 12 blocks on N_e = int(16 x 0.25) + 1 = 5 tokens, decoder d' = 128 x 4 blocks on 17 tokens."""
    def block(n, d):
        return 24 * n * d**2 + 4 * n**2 * d
    encoder = 2 * 16 * 192 * 192 + 12 * block(5, 192)
    decoder = 2 * 5 * 192 * 128 + 4 * block(17, 128) + 2 * 17 * 128 * 192
    return encoder + decoder


def _check_runs(report: dict, timed_steps: int, batch: int) -> None:
    for entry in report["repeats"]:
        for loop in entry["order"]:
            run = entry[loop]
            assert run["timed_steps"] == timed_steps and len(run["step_ms"]) == timed_steps
            assert all(isinstance(run[key], (int, float)) and math.isfinite(run[key]) and run[key] > 0
                       for key in RUN_FIGURES), run
            assert run["images_per_sec"] == pytest.approx(timed_steps * batch / (sum(run["step_ms"]) / 1000))
            assert run["step_ms_min"] <= run["step_ms_median"] <= run["step_ms_max"]
            assert run["achieved_flops_per_sec"] == pytest.approx(
                run["images_per_sec"] * report["flops"]["train_flops_per_image"])
            assert run["mfu"] == pytest.approx(run["achieved_flops_per_sec"] / report["peak"]["flops_per_sec"])


@pytest.mark.slow
def test_mae_benchmark_reports_every_figure(run_benchmark, tmp_path):
    proc = run_benchmark("recipes.benchmark", "--trainer", "mae", "--run_dir", str(tmp_path), *TINY)
    report = json.loads((tmp_path / "benchmark.json").read_text())

    assert [entry["order"] for entry in report["repeats"]] == [["lightning", "plain"], ["plain", "lightning"]]
    _check_runs(report, timed_steps=4, batch=8)
    for name in ("lightning", "plain"):  # each loop's row pools its two runs
        run = report[name]
        assert run["runs"] == 2 and run["timed_steps"] == 8
        assert run["images_per_sec"] == pytest.approx(8 * 8 / (sum(run["step_ms"]) / 1000))
    ratios = [entry["ratio"]["images_per_sec"] for entry in report["repeats"]]
    for entry in report["repeats"]:
        assert entry["ratio"]["images_per_sec"] == pytest.approx(entry["lightning"]["images_per_sec"]
                                                                 / entry["plain"]["images_per_sec"])
    ratio = report["ratio_lightning_over_plain"]
    assert ratio["repeats"] == 2 and ratio["images_per_sec"] == pytest.approx(sum(ratios) / 2)
    assert (ratio["images_per_sec_min"], ratio["images_per_sec_max"]) == pytest.approx((min(ratios), max(ratios)))

    flops = report["flops"]  # the model's own count, which the formula by hand confirms
    assert flops["model_forward_flops_per_image"] == pytest.approx(_mae_tiny_forward_flops_at_32px(), rel=1e-3)
    assert flops["train_flops_per_image"] == 3 * flops["model_forward_flops_per_image"]
    assert flops["source"] == "MaskedAutoencoderViT.complexity()"

    cuda = torch.cuda.is_available()
    assert report["peak"]["dtype"] == ("bfloat16" if cuda else "float32") and report["peak"]["flops_per_sec"] > 0
    how = report["how_measured"]
    assert how["model"] == "mae_vit_tiny_patch8" and how["batch_per_step"] == 8 and how["compile"] is False
    assert how["precision"] == ("bf16-mixed" if cuda else "32-true") and how["torch_threads"] >= 1
    assert {"device", "date", "steps", "timing", "peak_memory", "ratio"} <= set(how)
    assert how["runs"] == "2 repeat(s), in order: lightning, plain | plain, lightning"
    if not cuda:  # the process's RSS high-water mark only grows, run after run
        peaks = [entry[loop]["peak_memory_bytes"] for entry in report["repeats"] for loop in entry["order"]]
        assert peaks == sorted(peaks)
    assert report["config"]["trainer"] == "mae" and report["config"]["image_size"] == 32

    for text in ("how measured", "Lightning / plain", "plain PyTorch", "MFU", "FLOPs per image", "peak: measured",
                 "median over 2 repeats", "repeat 2: plain"):
        assert text in proc.stdout, proc.stdout
    # The Lightning runs are the recipes': W&B offline and CSV logs; their end-of-run checkpoints are gone.
    assert list((tmp_path / "lightning" / "wandb").glob("offline-run-*"))
    assert (tmp_path / "lightning" / "csv" / "hparams.yaml").exists()
    assert not (tmp_path / "lightning" / "checkpoints").exists()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """2 shards of 8 labelled 16 x 16 JPEGs (3 classes)."""
    root = tmp_path_factory.mktemp("shards")
    with ShardWriter(str(root), "train", max_count=8) as writer:
        for i in range(16):
            pixels = np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
            jpeg = io.BytesIO()
            Image.fromarray(pixels).save(jpeg, format="JPEG", quality=90)
            writer.write({"__key__": f"s{i:04d}", "jpg": jpeg.getvalue(), "cls": str(i % 3).encode()})
    return str(root / "train-{000000..000001}.tar")


def test_loader_benchmark_reports_the_datamodule_over_raw_decode_ratio(shards, tmp_path, capsys):
    cfg, _ = parse_config(Config, ["--trainer", "none", "--worker_counts", "[0, 1]", "--shards", shards,
                                   "--run_dir", str(tmp_path), "--image_size", "16", "--batch_size", "4",
                                   "--steps", "2"])
    main(cfg)
    report = json.loads((tmp_path / "benchmark.json").read_text())
    rows = report["loader"]
    assert [row["workers"] for row in rows] == [0, 1]
    for row in rows:
        assert row["datamodule_images_per_sec"] > 0 and row["raw_decode_images_per_sec"] > 0
        assert row["ratio"] == pytest.approx(row["datamodule_images_per_sec"] / row["raw_decode_images_per_sec"])
    assert report["config"]["worker_counts"] == [0, 1] and report["how_measured"]["shards"] == shards
    out = capsys.readouterr().out
    assert "how measured" in out and "raw decode img/s" in out


@pytest.mark.filterwarnings("ignore:.*smaller than the logging interval", "ignore:Total length of `list` across ranks")
def test_finetune_over_shards_feeds_both_loops_from_the_datamodule(shards, tmp_path):
    cfg, _ = parse_config(Config, ["--trainer", "finetune", "--data", "shards", "--shards", shards, "--num_workers",
                                   "0", "--num_classes", "3", "--run_dir", str(tmp_path), "--image_size", "16",
                                   "--batch_size", "4", "--warmup_steps", "1", "--steps", "2", "--repeats", "1",
                                   "--model.name", "vit_tiny_patch8"])
    report = main(cfg)
    assert report["how_measured"]["data"] == f"shards {shards}"
    # both loops run with the thread count the recipes' runs get (trainers.threads), which the report states
    assert report["how_measured"]["cpu_threads"].startswith("torch threads: ")
    assert report["how_measured"]["torch_threads"] == torch.get_num_threads()
    assert report["lightning"]["timed_steps"] == report["plain"]["timed_steps"] == 2
    # vit_tiny_patch8 at 16 px with 3 classes by hand: 4 patches + cls, d = 192, 12 blocks, the head
    forward = 2 * 4 * 3 * 64 * 192 + 12 * (24 * 5 * 192**2 + 4 * 25 * 192) + 2 * 192 * 3
    assert report["flops"]["model_forward_flops_per_image"] == pytest.approx(forward, rel=1e-3)
    assert report["ratio_lightning_over_plain"]["images_per_sec"] == pytest.approx(
        report["lightning"]["images_per_sec"] / report["plain"]["images_per_sec"])


def test_bad_settings_are_refused_with_the_flag_to_fix(capsys):
    cfg, _ = parse_config(Config, ["--trainer", "swag", "--precision", "32-true"])
    assert cfg.trainer == "swag" and cfg.model.name is None and cfg.repeats == 3
    with pytest.raises(SystemExit):
        parse_config(Config, ["--trainer", "finetune", "--batch_size", "7"])
    assert "--batch_size must be even" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(Config, ["--num_classes", "0"])
    assert "--num_classes must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(Config, ["--repeats", "0"])
    assert "--repeats must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(Config, ["--trainer", "sam2", "--objects", "9"])
    assert "--objects 9: a synthetic scene holds at most 8 objects" in capsys.readouterr().err
    assert parse_config(Config, ["--trainer", "sam2", "--objects", "9", "--data", "shards"])[0].objects == 9
    with pytest.raises(SystemExit):
        parse_config(Config, ["--trainer", "dino"])
    with pytest.raises(SystemExit):
        parse_config(Config, ["--precision", "16-mixed"])


@pytest.mark.gpu
def test_gpu_benchmark_in_bf16(run_benchmark, tmp_path):
    run_benchmark("recipes.benchmark", "--trainer", "finetune", "--run_dir", str(tmp_path), *TINY)
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert report["how_measured"]["precision"] == "bf16-mixed" and "cuda" in report["how_measured"]["peak_memory"]
    assert report["peak"]["dtype"] == "bfloat16" and report["peak"]["size"] == 8192
    _check_runs(report, timed_steps=4, batch=8)
    assert all(report[name]["peak_memory_bytes"] > 0 and 0 < report[name]["mfu"] < 1 for name in ("lightning", "plain"))


# ---- --plain, --channels_last, --strategy, --decode (the GPU suite's flags) -------------------------------------

TWO_STEPS = ["--image_size", "32", "--batch_size", "4", "--warmup_steps", "1", "--steps", "2"]


def test_plain_false_runs_and_reports_the_lightning_runs_only(tmp_path, capsys, monkeypatch):
    def no_plain_loop(*args, **kwargs):
        raise AssertionError("--plain false ran the plain loop")

    monkeypatch.setattr(training, "plain_loop", no_plain_loop)
    cfg, _ = parse_config(Config, ["--plain", "false", "--repeats", "2", "--run_dir", str(tmp_path), *TWO_STEPS])
    main(cfg)
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert report["plain"] is None and report["ratio_lightning_over_plain"] is None  # null in the JSON
    assert [entry["order"] for entry in report["repeats"]] == [["lightning"], ["lightning"]]
    run = report["lightning"]
    assert run["runs"] == 2 and run["timed_steps"] == 4
    assert run["images_per_sec"] == pytest.approx(4 * 4 / (sum(run["step_ms"]) / 1000))
    assert run["mfu"] == pytest.approx(run["achieved_flops_per_sec"] / report["peak"]["flops_per_sec"])
    assert report["how_measured"]["plain_loop"] == "not run (--plain false)" and report["config"]["plain"] is False
    out = capsys.readouterr().out
    assert "plain PyTorch loop not run (--plain false)" in out
    assert out.count("Lightning / plain") == 1  # in that note only: no ratio row in the table
    assert not (tmp_path / "lightning" / "checkpoints").exists()


def test_channels_last_reaches_the_model_and_the_batch_of_both_loops(tmp_path, monkeypatch):
    """A conv model (RegNetY-200MF under the SWAG trainer): the stem's weight and the images each step sees are in
    the channels-last layout, in the Lightning run and in the plain loop."""
    seen = []

    def layout(module, image):
        weight = next(p for p in module.parameters() if p.ndim == 4)
        return (weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous(),
                image.is_contiguous(memory_format=torch.channels_last) and not image.is_contiguous())

    start = measure.StepTimer.on_train_batch_start

    def lightning_step(self, trainer, pl_module, batch, batch_idx):
        seen.append(("lightning", *layout(pl_module, batch["image"])))
        start(self, trainer, pl_module, batch, batch_idx)

    loop = training.plain_loop

    def plain_loop(module, batches, *args, **kwargs):
        batches = list(batches)
        seen.extend(("plain", *layout(module, batch["image"])) for batch in batches)
        return loop(module, batches, *args, **kwargs)

    monkeypatch.setattr(measure.StepTimer, "on_train_batch_start", lightning_step)
    monkeypatch.setattr(training, "plain_loop", plain_loop)
    cfg, _ = parse_config(Config, ["--trainer", "swag", "--model.name", "regnety_200mf", "--num_classes", "10",
                                   "--channels_last", "true", "--repeats", "1", "--run_dir", str(tmp_path),
                                   *TWO_STEPS])
    report = main(cfg)
    assert report["how_measured"]["channels_last"] is True
    assert report["lightning"]["timed_steps"] == report["plain"]["timed_steps"] == 2
    assert {run for run, *_ in seen} == {"lightning", "plain"}
    assert all(weight and image for _, weight, image in seen), seen


@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed runs where there is a GPU")
def test_deepspeed_on_the_cpu_fails_with_build_trainers_error_before_anything_slow(tmp_path, monkeypatch):
    def slow(*args, **kwargs):
        raise AssertionError("reached the model, the data or the matmul peak")

    monkeypatch.setitem(methods.METHODS, "mae", slow)
    monkeypatch.setattr(training, "matmul_peak", slow)
    cfg, _ = parse_config(Config, ["--strategy", "deepspeed_stage_2", "--run_dir", str(tmp_path), *TWO_STEPS])
    with pytest.raises(ValueError, match=r"trainer.strategy='deepspeed_stage_2' needs CUDA GPUs"):
        main(cfg)
    assert not (tmp_path / "benchmark.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed runs where there is a GPU")
def test_the_command_reports_a_setting_it_cannot_run_in_one_line(run_benchmark, tmp_path):
    proc = run_benchmark("recipes.benchmark", "--strategy", "deepspeed_stage_2", "--run_dir", str(tmp_path),
                         *TWO_STEPS, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "python -m recipes.benchmark: error: trainer.strategy='deepspeed_stage_2' needs CUDA GPUs" in proc.stderr


def test_strategy_and_decode_flags_are_checked_up_front(capsys):
    cfg, _ = parse_config(Config, ["--strategy", "deepspeed_stage_3_offload", "--plain", "false"])
    assert cfg.strategy == "deepspeed_stage_3_offload" and cfg.plain is False and cfg.decode == "host"
    with pytest.raises(SystemExit):
        parse_config(Config, ["--strategy", "zero9"])
    err = capsys.readouterr().err
    assert "Unknown --strategy 'zero9'" in err and "deepspeed_stage_2" in err
    with pytest.raises(SystemExit):
        parse_config(Config, ["--decode", "device"])  # synthetic batches are never decoded
    assert "--decode device applies to JPEG shards" in capsys.readouterr().err
    cfg, _ = parse_config(Config, ["--trainer", "none", "--decode", "device"])
    assert cfg.decode == "device"


def test_decode_reaches_the_loader_benchmark(shards, tmp_path, monkeypatch):
    decodes = []
    measure_rates = loader.loader_benchmark

    def loader_benchmark(data, *args):
        decodes.append(data.decode)
        return measure_rates(data, *args)

    monkeypatch.setattr(loader, "loader_benchmark", loader_benchmark)
    cfg, _ = parse_config(Config, ["--trainer", "none", "--decode", "device", "--worker_counts", "[0]", "--shards",
                                   shards, "--run_dir", str(tmp_path), "--image_size", "16", "--batch_size", "4",
                                   "--steps", "2"])
    report = main(cfg)
    assert decodes == ["device"]
    assert report["how_measured"]["decode"] == "device" and report["config"]["decode"] == "device"
    assert [row["workers"] for row in report["loader"]] == [0] and report["loader"][0]["datamodule_images_per_sec"] > 0
