"""The PE contrastive recipe end to end, run as a user runs it, on tiny settings: training, validation metrics,
checkpoints, the open_clip export, resume, DDP on two CPU processes, and its errors before compute."""

import csv
import io
import re

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from datamodules.shard_writer import ShardWriter
from datamodules.synthetic import ensure_synthetic_world
from trainers.contrastive import ContrastivePretraining

pytestmark = pytest.mark.slow

TINY = ["--data.batch_size", "8", "--data.num_workers", "1", "--trainer.accelerator", "cpu",
        "--data.val_batches", "2", "--trainer.log_every_n_steps", "1", "--optim.warmup_steps", "2",
        "--data.image_size", "48", "--resolution", "[[0, 32], [4, 48]]", "--templates", '["a large {}"]']


@pytest.fixture(scope="module")
def world(prism_cache):
    return ensure_synthetic_world(root=str(prism_cache))


def _shards(world) -> list[str]:
    return ["--data.train_shards", world.train_shards, "--data.val_shards", world.val_shards]


def _summary(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"^  (\w+)\s+(\S+)$", stdout, flags=re.M))


def _metrics(run_dir) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_train_validate_export_and_resume(run_recipe, world, tmp_path):
    run_dir = tmp_path / "pe"
    first = run_recipe("recipes.pe_pretrain", "--run_dir", str(run_dir), "--trainer.max_steps", "6",
                       "--trainer.val_every_n_steps", "3", "--trainer.checkpoint_every_n_steps", "4",
                       *_shards(world), *TINY)
    out = _summary(first.stdout)
    assert {"checkpoint", "open_clip", "open_clip_config", "retrieval", "zero_shot_top1", "wandb"} <= set(out)
    assert "10 zero-shot classes" in first.stdout + first.stderr

    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6 and last["hyper_parameters"]["model"]["name"] == "pe_core_nano"

    rows = _metrics(run_dir)
    validated = [r for r in rows if r.get("val/zero_shot_top1")]
    assert len(validated) >= 2  # at step 3 and at the end
    for row in validated:
        assert 0 <= float(row["val/zero_shot_top1"]) <= float(row["val/zero_shot_top5"]) <= 100
        for name in ("image_to_text_R@1", "text_to_image_R@10", "reweighted_image_to_text_R@1"):
            assert 0 <= float(row[f"val/{name}"]) <= 100
        assert float(row["val/retrieval_pairs"]) == 16  # 2 batches of 8
    assert out["retrieval"].endswith(".png") and list((run_dir / "images").glob("retrieval-*.txt"))
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert list((run_dir / "wandb").glob("offline-run-*/files/media/images/val/retrieval_*.png"))  # the W&B panel

    # The export loads in open_clip (its config registered from the export) and embeds as the checkpoint does.
    open_clip.add_model_config(out["open_clip_config"])
    theirs = open_clip.create_model("pe_core_nano", pretrained=out["open_clip"]).eval()
    ours = ContrastivePretraining(**{k: last["hyper_parameters"][k] for k in ("model", "optim", "lr", "total_steps")})
    ours.load_state_dict(last["state_dict"])
    images = torch.randn(2, 3, 64, 64)
    tokens = open_clip.get_tokenizer("PE-Core-T-16-384")(["a large red circle", "a small blue star"])
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode_image(images), ours.model.eval().encode_image(images))
        torch.testing.assert_close(theirs.encode_text(tokens), ours.model.encode_text(tokens))

    # Same command, more steps: resumes at step 6.
    second = run_recipe("recipes.pe_pretrain", "--run_dir", str(run_dir), "--trainer.max_steps", "8",
                        "--trainer.val_every_n_steps", "3", "--trainer.checkpoint_every_n_steps", "4",
                        *_shards(world), *TINY)
    assert "Resuming from" in second.stdout + second.stderr
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8


def test_ddp_on_two_cpu_processes_gathers_every_ranks_pairs(run_recipe, world, tmp_path):
    run_dir = tmp_path / "ddp"
    run_recipe("recipes.pe_pretrain", "--run_dir", str(run_dir), "--trainer.max_steps", "3",
               "--trainer.val_every_n_steps", "3", "--trainer.devices", "2", "--trainer.strategy", "ddp",
               *_shards(world), *TINY, timeout=240)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    pairs = {float(r["val/retrieval_pairs"]) for r in _metrics(run_dir) if r.get("val/retrieval_pairs")}
    assert pairs == {32.0}  # 2 ranks x 2 batches of 8


def test_video_text_pairs_train_on_the_mean_of_frames(run_recipe, tmp_path):
    run_dir = tmp_path / "video"
    proc = run_recipe("recipes.pe_pretrain", "--run_dir", str(run_dir), "--video", "true", "--trainer.max_steps", "2",
                      "--trainer.val_every_n_steps", "2", "--data.video_frames", "4", *TINY)
    assert "10 zero-shot classes" in proc.stdout + proc.stderr
    validated = [r for r in _metrics(run_dir) if r.get("val/zero_shot_top1")]
    assert validated and float(validated[-1]["val/retrieval_pairs"]) == 16


def test_siglip_with_mask_regularisation_trains_logs_and_exports(run_recipe, world, tmp_path):
    run_dir = tmp_path / "siglip"
    proc = run_recipe("recipes.pe_pretrain", "--run_dir", str(run_dir), "--trainer.max_steps", "3",
                      "--trainer.val_every_n_steps", "3", "--model.loss", "siglip", "--model.mask_fraction", "0.25",
                      *_shards(world), *TINY)
    trained = [r for r in _metrics(run_dir) if r.get("train/mask_loss")]
    assert len(trained) == 3
    assert all(0 < float(r["train/mask_loss"]) < 2 for r in trained)
    assert float(trained[0]["train/logit_bias"]) == pytest.approx(-10, abs=0.1)
    out = _summary(proc.stdout)
    open_clip.add_model_config(out["open_clip_config"])
    theirs = open_clip.create_model("pe_core_nano", pretrained=out["open_clip"])  # strict: the bias is in the file
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert theirs.logit_bias.item() == last["state_dict"]["model.logit_bias"].item() != -10.0


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("case", ["no captions", "prompt too long", "tower width"])
def test_bad_input_stops_before_compute_with_the_reason(case, run_recipe, world, tmp_path):
    args = [*_shards(world), *TINY, "--trainer.max_steps", "2"]
    if case == "no captions":
        with ShardWriter(str(tmp_path), "plain", max_count=10) as writer:
            for i in range(4):
                writer.write({"__key__": f"s{i}", "jpg": _jpeg(), "cls": b"0"})
        args += ["--data.train_shards", str(tmp_path / "plain-000000.tar")]
        expected = "has no caption"
    elif case == "prompt too long":
        args += ["--data.context_length", "4"]
        expected = "The zero-shot prompt 'a large "
    else:
        narrow = {"cls_token": torch.zeros(1, 1, 64), "pos_embed": torch.zeros(1, 17, 64)}  # a width-64 ViT
        save_file(narrow, tmp_path / "small.safetensors")
        args += ["--model.lock_image", "true", "--model.image_tower", "vit_tiny_patch8",
                 "--init_from", str(tmp_path / "small.safetensors")]
        expected = "has width 64, but model.image_tower 'vit_tiny_patch8'"
    proc = run_recipe("recipes.pe_pretrain", "--run_dir", str(tmp_path / "run"), *args, check=False)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").glob("*"))
