"""Stage handoff end to end: MAE pretraining -> fine-tuning at another resolution -> linear probe of that run."""

import json
import re
import subprocess
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
from recipes.linear_probe import Config

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--data.batch_size", "4", "--data.num_workers", "1", "--trainer.accelerator", "cpu", "--data.val_batches",
          "1", "--trainer.log_every_n_steps", "1", "--optim.warmup_steps", "1", "--trainer.max_steps", "2",
          "--trainer.val_every_n_steps", "100"]  # evaluated once, by the final validate


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """3 classes x 6 images per split as imagefolder shards (faster to make than the synthetic world)."""
    root = tmp_path_factory.mktemp("handoff")
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for i, name in enumerate(("a", "b", "c")):
            (root / split / name).mkdir(parents=True)
            for j in range(6):
                pixels = rng.integers(0, 80, (36, 40, 3), np.uint8) + np.uint8(80 * i)
                Image.fromarray(pixels).save(root / split / name / f"{j}.jpg")
        assert make_shards.main(["--format", "imagefolder", "--input", str(root / split), "--output",
                                 str(root / "shards"), "--prefix", split]) == 0
    return ["--data.train_shards", str(root / "shards" / "train-*.tar"),
            "--data.val_shards", str(root / "shards" / "val-*.tar")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def finetuned(run_recipe_module, shards, runs) -> subprocess.CompletedProcess:
    """MAE at 32 px (a 4x4 grid of 8-px patches), then fine-tuning from its run dir at 48 px (6x6)."""
    run_recipe_module("recipes.mae_prepretrain", "--run_dir", str(runs / "mae"), "--data.image_size", "32",
                      "--logging.image_every_n_steps", "0", *shards, *COMMON)
    return run_recipe_module("recipes.finetune", "--run_dir", str(runs / "ft"), "--init_from", str(runs / "mae"),
                             "--data.image_size", "48", *shards, *COMMON)


@pytest.mark.slow
def test_finetune_starts_from_the_mae_run_at_another_resolution(finetuned, runs):
    log = finetuned.stdout + finetuned.stderr
    assert "keys under 'model.encoder.'" in log
    assert "pos_embed: resized from the 4x4 to the 6x6 grid" in log
    assert "fc_norm: new LayerNorm" in log and "head: new head.bias [3], head.weight [3, 192]" in log
    mae = torch.load(runs / "mae" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    ft = torch.load(runs / "ft" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ft["global_step"] == 2 and ft["state_dict"]["model.pos_embed"].shape == (1, 37, 192)
    assert mae["model.encoder.pos_embed"].shape == (1, 17, 192)
    assert set(summary(finetuned.stdout)) == {"run_dir", "checkpoint", "model", "top1", "top5", "wandb"}


@pytest.mark.slow
def test_linear_probe_of_the_finetune_run(finetuned, run_recipe_module, shards, runs):
    proc = run_recipe_module("recipes.linear_probe", "--run_dir", str(runs / "lp"), "--init_from", str(runs / "ft"),
                             "--data.image_size", "32", *shards, *COMMON)
    log = proc.stdout + proc.stderr
    assert "keys under 'model.'" in log and "pos_embed: resized from the 6x6 to the 4x4 grid" in log
    assert "dropped the source's head.bias [3], head.weight [3, 192] (the model has none)" in log
    assert "norm: new LayerNorm" in log
    # blr 0.1 and lr = blr * batch / 256 (facebookresearch/mae FINETUNE.md "Linear Probing"); at this batch:
    # lr = 0.1 * 4 / 256
    assert re.search(r"lr 1\.563e-03 = blr 1\.000e-01 x 4 / 256, LARS momentum 0\.9", log)
    out = summary(proc.stdout)
    assert set(out) == {"run_dir", "checkpoint", "model", "top1", "top5", "wandb"}

    # the backbone stayed frozen: its blocks are the fine-tuned ones, bit for bit
    ft = torch.load(runs / "ft" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    lp = torch.load(runs / "lp" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(lp["model.blocks.11.mlp.fc2.weight"], ft["model.blocks.11.mlp.fc2.weight"])
    assert {k for k in lp if k.startswith("head.")} == {"head.0.running_mean", "head.0.running_var",
                                                        "head.0.num_batches_tracked", "head.1.weight", "head.1.bias"}
    # the export is a timm ViT classifier: cls-token pooling, the probe as its head
    with safe_open(out["model"], "pt") as f:
        kwargs = json.loads(f.metadata()["timm_kwargs"])
    assert (kwargs["global_pool"], kwargs["num_classes"], kwargs["img_size"]) == ("token", 3, 32)
    timm.models.VisionTransformer(**kwargs).load_state_dict(load_file(out["model"]), strict=True)


def test_shipped_config_is_the_mae_linear_probe():
    cfg, _ = parse_config(Config, ["--config", str(ROOT / "recipes/configs/linear_probe_vit_base_in1k.yaml")])
    eff = cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes
    steps = 1281167 // 16384  # 78 per epoch
    # facebookresearch/mae FINETUNE.md "Linear Probing" batch and blr, worked by hand: 0.1 * 16384 / 256 = 6.4
    assert eff == 16384 and cfg.optim.blr * eff / 256 == pytest.approx(6.4)
    assert (cfg.optim.weight_decay, cfg.optim.momentum, cfg.optim.trust_coefficient) == (0.0, 0.9, 0.001)
    assert cfg.trainer.max_steps == 90 * steps and cfg.optim.warmup_steps == 10 * steps
    assert (cfg.model.name, cfg.model.global_pool) == ("vit_base_patch16", "token")
