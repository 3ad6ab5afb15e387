"""The PE spatial alignment recipe end to end, run as a user runs it on tiny settings: from a real (tiny) PE
contrastive run and an official-layout SAM 2.1 nano checkpoint to the validation metrics of both towers, the W&B
run and a PE-Spatial export that timm loads with the tower's features; and its errors before compute."""

import csv
import json
import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import models
from tests.models.test_sam2_model import sam2_nano_checkpoint
from trainers.handoff import load_state_dict
from trainers.pe_spatial import spatial_trunk

pytestmark = pytest.mark.slow

TINY = ["--data.batch_size", "2", "--data.num_workers", "1", "--data.val_batches", "4", "--trainer.accelerator",
        "cpu", "--trainer.log_every_n_steps", "1", "--optim.warmup_steps", "1", "--trainer.cpu_threads", "1",
        "--model.points_per_side", "2"]
REPORTED = ("J&F", "start_J&F", "probe_mIoU", "start_probe_mIoU", "teacher_prompt_agreement")


@pytest.fixture(scope="module")
def sources(run_recipe_module, tmp_path_factory) -> tuple[Path, Path]:
    """A PE contrastive run (2 steps of recipes.pe_pretrain) and an official-layout sam2.1_hiera_nano.pt."""
    root = tmp_path_factory.mktemp("sources")
    run_recipe_module("recipes.pe_pretrain", "--run_dir", str(root / "pe"), "--trainer.max_steps", "2",
                      "--trainer.val_every_n_steps", "2", "--data.batch_size", "8", "--data.num_workers", "1",
                      "--data.val_batches", "1", "--trainer.accelerator", "cpu", "--optim.warmup_steps", "1",
                      "--resolution", "null")
    return root / "pe", sam2_nano_checkpoint(root)[1]


def test_align_validate_and_export(run_recipe, sources, tmp_path):
    pe_run, teacher = sources
    run_dir = tmp_path / "spatial"
    proc = run_recipe("recipes.pe_align_spatial", "--run_dir", str(run_dir), "--init_from", str(pe_run),
                      "--teacher", str(teacher), "--trainer.max_steps", "3", "--trainer.val_every_n_steps", "3",
                      *TINY)
    out = dict(re.findall(r"^  (\S+)\s+(\S+)$", proc.stdout, flags=re.M))
    assert all(0 <= float(out[name]) <= 100 for name in REPORTED), proc.stdout[-2000:]
    assert "teacher_click_IoU" in out  # NaN where no grid click landed on an object
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    validated = [r for r in rows if r.get("val/J&F")]
    assert validated and all(validated[-1][f"val/{name}"] for name in REPORTED)
    losses = [float(r["train/sam_correspondence_loss"]) for r in rows if r.get("train/sam_correspondence_loss")]
    assert losses and all(-1 <= v <= 1 for v in losses)  # a negative cosine
    assert list((run_dir / "wandb").glob("offline-run-*"))

    export = Path(out["pe_spatial"])
    config = json.loads((export / "config.json").read_text())
    tower = timm.create_model(config["architecture"], **config["model_args"])
    tower.load_state_dict(load_file(export / "model.safetensors"), strict=True)
    trained = spatial_trunk(models.create("pe_core_nano").visual.trunk)
    trained.load_state_dict(load_state_dict(run_dir, prefix="model."))
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert torch.allclose(tower.forward_features(images), trained.forward_features(images), atol=1e-5)


@pytest.mark.parametrize("case", ["no teacher", "teacher not SAM 2", "init_from not PE", "no init_from"])
def test_bad_input_stops_before_compute_with_the_reason(case, run_recipe, sources, tmp_path):
    pe_run, teacher = sources
    args = {"--init_from": str(pe_run), "--teacher": str(teacher)}
    if case == "no teacher":
        del args["--teacher"]
        expected = "--teacher is required"
    elif case == "teacher not SAM 2":
        args["--teacher"] = str(pe_run)
        expected = f"--teacher {pe_run} is not a SAM 2 model"
    elif case == "init_from not PE":
        args["--init_from"] = str(teacher)
        expected = f"--init_from {teacher} is not a PE contrastive run"
    else:
        del args["--init_from"]
        expected = "--init_from is required"
    proc = run_recipe("recipes.pe_align_spatial", "--run_dir", str(tmp_path / "run"),
                      *[x for pair in args.items() for x in pair], *TINY, check=False)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()
