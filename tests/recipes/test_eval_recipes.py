"""recipes.eval_robustness and recipes.msd from an MAE checkpoint on the synthetic world, as a user runs them."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import models
from datamodules import IMAGENET_MEAN, IMAGENET_STD
from evaluation.robustness import RobustnessResult
from trainers.eval_model import EvalModelConfig, load_eval_model

TINY = ["--data.image_size", "32", "--data.eval_images", "12", "--model.head_fit_images", "40",
        "--model.batch_size", "16", "--data.num_workers", "1"]  # one corruption process: the pool path


@pytest.fixture(scope="module")
def mae_run(run_recipe_module, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("eval") / "mae"
    run_recipe_module("recipes.mae_prepretrain", "--run_dir", str(run_dir), "--data.image_size", "32",
                      "--data.batch_size", "8", "--data.num_workers", "1", "--trainer.accelerator", "cpu",
                      "--trainer.max_steps", "3", "--logging.image_every_n_steps", "0")
    return run_dir


@pytest.fixture(scope="module")
def robustness_run(run_recipe_module, mae_run) -> tuple[Path, str]:
    out = mae_run.parent / "robustness"
    proc = run_recipe_module("recipes.eval_robustness", "--init_from", str(mae_run), "--run_dir", str(out),
                             "--corruptions", "gaussian_noise,contrast,blue_noise_sample", "--severities", "[1, 5]",
                             *TINY)
    return out, proc.stdout + proc.stderr


def test_eval_robustness_fits_a_head_and_reports_every_corruption_and_severity(robustness_run):
    out, stdout = robustness_run
    assert "fitted a linear head" in stdout  # the MAE checkpoint has no classifier
    result = RobustnessResult.from_json((out / "robustness.json").read_text())
    assert result.num_images == 12
    assert set(result.errors) == {"gaussian_noise", "contrast", "blue_noise_sample"}
    assert all(set(by_severity) == {1, 5} for by_severity in result.errors.values())
    # errors count whole images out of 12
    for value in [result.clean_error, *(e for by in result.errors.values() for e in by.values())]:
        assert value * 12 / 100 == pytest.approx(round(value * 12 / 100))
    table = (out / "robustness.md").read_text()
    assert "**ImageNet-C mean**" in table and "**ImageNet-C-bar mean**" in table and "| gaussian_noise |" in table
    assert "| gaussian_noise |" in stdout and (out / "config.yaml").is_file()


def test_msd_table_and_plot_use_the_robustness_errors(run_recipe_module, mae_run, robustness_run):
    robustness_dir, _ = robustness_run
    out = mae_run.parent / "msd"
    proc = run_recipe_module("recipes.msd", "--init_from", str(mae_run), "--run_dir", str(out),
                             "--corruptions", "gaussian_noise,contrast,blue_noise_sample", "--images", "6",
                             "--augmentation_samples", "3", "--corruption_samples", "2",
                             "--errors_from", str(robustness_dir), *TINY)
    report = json.loads((out / "msd.json").read_text())
    errors = RobustnessResult.from_json((robustness_dir / "robustness.json").read_text()).per_corruption()
    assert set(report["corruptions"]) == set(errors)
    for name, row in report["corruptions"].items():
        assert row["error"] == errors[name]
        assert row["msd"] >= 0 and row["distance_of_means"] >= 0
    with Image.open(out / "msd_vs_error.png") as png:
        assert png.format == "PNG" and png.size[0] > 100
    assert "Spearman correlation with the error" in proc.stdout and "| contrast |" in proc.stdout


def test_a_checkpoint_with_a_head_is_used_as_it_is(tmp_path):
    network = models.create("vit_tiny_patch8", num_classes=3, img_size=32).eval()
    torch.nn.init.normal_(network.head.weight)  # a head that is not the init
    save_file(network.state_dict(), str(tmp_path / "model.safetensors"))
    loaded = load_eval_model(str(tmp_path / "model.safetensors"), EvalModelConfig(name="vit_tiny_patch8",
                                                                                   device="cpu"), 3, 32, None)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(loaded.classify(images), network(x), atol=1e-5)


def test_bad_flags_are_refused_before_any_work(run_recipe_module, tmp_path):
    proc = run_recipe_module("recipes.eval_robustness", "--init_from", str(tmp_path), "--severities", "[0]",
                             check=False)
    assert proc.returncode == 2 and "--severities" in proc.stderr
    proc = run_recipe_module("recipes.msd", "--init_from", str(tmp_path), "--augmentation", "mixup", check=False)
    assert proc.returncode != 0 and "unknown augmentation policy" in proc.stderr
    proc = run_recipe_module("recipes.eval_robustness", "--init_from", str(tmp_path), "--corruptions", "fogg",
                             check=False)
    assert proc.returncode != 0 and "Did you mean fog" in proc.stderr and "loaded" not in proc.stderr
