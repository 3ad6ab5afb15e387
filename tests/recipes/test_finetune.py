"""The fine-tuning recipe: its configs, the number of classes, and imagefolder shards end to end."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from datamodules import make_shards
from recipes.cli import parse_config
from tests.recipes.conftest import summary
from datamodules.classification import ClassificationDataConfig, prepare_data
from recipes.finetune import Config

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"
STEPS_PER_EPOCH = 1281167 // 1024  # IN-1k at batch 1024: 1251
TINY = ["--data.batch_size", "4", "--data.num_workers", "1", "--trainer.accelerator", "cpu", "--data.val_batches", "2",
        "--trainer.log_every_n_steps", "1", "--optim.warmup_steps", "1", "--model.name", "vit_tiny_patch8"]


@pytest.mark.parametrize("size, model, blr, decay, epochs, drop_path", [
    ("base", "vit_base_patch16", 5e-4, 0.65, 100, 0.1),   # facebookresearch/mae FINETUNE.md
    ("large", "vit_large_patch16", 1e-3, 0.75, 50, 0.2),
    ("huge", "vit_huge_patch14", 1e-3, 0.75, 50, 0.3),
])
def test_shipped_configs_have_mae_finetuning_numbers(size, model, blr, decay, epochs, drop_path):
    cfg, _ = parse_config(Config, ["--config", str(CONFIGS / f"finetune_vit_{size}_in1k.yaml")])
    eff = cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes
    assert (cfg.model.name, cfg.model.global_pool, cfg.model.drop_path_rate) == (model, "avg", drop_path)
    assert eff == 1024 and cfg.data.num_classes == 1000 and cfg.data.image_size == 224
    assert (cfg.optim.blr, cfg.optim.layer_decay, cfg.optim.weight_decay, tuple(cfg.optim.betas)) == \
        (blr, decay, 0.05, (0.9, 0.999))
    assert cfg.optim.min_lr == 1e-6 and cfg.optim.warmup_steps == 5 * STEPS_PER_EPOCH
    assert cfg.trainer.max_steps == epochs * STEPS_PER_EPOCH and cfg.data.batches_per_epoch == STEPS_PER_EPOCH
    aug = cfg.augment
    assert (aug.rand_augment, aug.reprob, aug.mixup, aug.cutmix, aug.switch_prob, aug.smoothing) == \
        ("rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0, 0.5, 0.1)
    if size == "base":  # facebookresearch/mae FINETUNE.md's blr and batch, worked by hand: 5e-4 * 1024 / 256 = 2e-3
        assert cfg.optim.blr * eff / 256 == pytest.approx(2e-3)


def test_help_lists_the_settings(capsys):
    with pytest.raises(SystemExit):
        parse_config(Config, ["--help"])
    text = capsys.readouterr().out
    for flag in ("--init_from", "--data.num_classes", "--optim.layer_decay", "--augment.mixup", "--ema.enabled",
                 "--model.global_pool"):
        assert flag in text, flag
    assert "Layer-wise rate decay" in text


def _imagefolder(root: Path, classes=("cat", "dog", "owl"), per_class=6) -> Path:
    rng = np.random.default_rng(0)
    for i, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            pixels = np.full((20 + j, 24, 3), 60 * i, dtype=np.uint8) + rng.integers(0, 40, (20 + j, 24, 3), np.uint8)
            Image.fromarray(pixels).save(root / name / f"{j}.jpg")
    return root


def test_the_number_of_classes_comes_from_classes_json_or_the_flag(tmp_path):
    images = _imagefolder(tmp_path / "train")
    assert make_shards.main(["--format", "imagefolder", "--input", str(images), "--output", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "classes.json").read_text()) == {"cat": 0, "dog": 1, "owl": 2}
    assert prepare_data(ClassificationDataConfig(train_shards=str(tmp_path / "s" / "train-*.tar"))) == 3
    assert prepare_data(ClassificationDataConfig(train_shards=str(tmp_path / "s"), num_classes=5)) == 5
    (tmp_path / "s" / "classes.json").unlink()
    with pytest.raises(ValueError, match="number of classes is unknown.*--data.num_classes N"):
        prepare_data(ClassificationDataConfig(train_shards=str(tmp_path / "s")))


@pytest.mark.slow
def test_imagefolder_shards_feed_finetune_and_a_finished_run_only_evaluates(run_recipe, tmp_path):
    for split in ("train", "val"):
        images = _imagefolder(tmp_path / "images" / split)
        assert make_shards.main(["--format", "imagefolder", "--input", str(images), "--output",
                                 str(tmp_path / "shards"), "--prefix", split]) == 0
    run_dir = tmp_path / "ft"
    args = ["--run_dir", str(run_dir), "--data.train_shards", str(tmp_path / "shards" / "train-*.tar"),
            "--data.val_shards", str(tmp_path / "shards" / "val-*.tar"), "--data.num_classes", "3",
            "--data.image_size", "16", "--trainer.max_steps", "3", "--trainer.val_every_n_steps", "3", *TINY]
    first = run_recipe("recipes.finetune", *args, timeout=120)
    out = summary(first.stdout)
    assert set(out) == {"run_dir", "checkpoint", "model", "top1", "top5", "wandb"}, first.stdout + first.stderr
    assert "3 classes" in first.stderr + first.stdout
    assert re.search(r"lr 6\.250e-05 = blr 4\.000e-03 x 4 / 256, layer decay 0\.75", first.stdout + first.stderr)
    assert out["top5"] == "100.0"  # 3 classes: the true one is always among the 5 best
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3 and last["hyper_parameters"]["model"]["num_classes"] == 3

    weights = load_file(out["model"])  # timm keys: a strict load into timm's ViT, same weights as the checkpoint
    with safe_open(out["model"], "pt") as f:
        vit = timm.models.VisionTransformer(**json.loads(f.metadata()["timm_kwargs"]))
    vit.load_state_dict(weights, strict=True)
    assert torch.equal(weights["head.weight"], last["state_dict"]["model.head.weight"])

    # the same command on the finished run: no step is trained, the metrics come back the same
    second = run_recipe("recipes.finetune", *args, timeout=120)
    assert summary(second.stdout)["top1"] == out["top1"]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert {p.name for p in (run_dir / "checkpoints").glob("*.ckpt")} == {"last.ckpt", "step-000003.ckpt"}
