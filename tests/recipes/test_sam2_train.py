"""The SAM 2 recipe end to end, run as a user runs it, on tiny settings: training with the prompt simulation,
validation J&F with its overlay panel, checkpoints, the export in sam2's layout, exact resume, DDP on two CPU
processes, the shipped configs, and its errors before compute."""

import csv
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.shard_writer import ShardWriter
from recipes.cli import parse_config
from recipes.sam2_train import Config
from trainers.sam2 import SAM2Training

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"

TINY = ["--data.batch_size", "1", "--data.num_workers", "1", "--data.num_frames", "3", "--data.val_batches", "2",
        "--trainer.accelerator", "cpu", "--trainer.log_every_n_steps", "1", "--optim.warmup_steps", "2",
        "--trainer.cpu_threads", "1"]


def _summary(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"^  (\S+)\s+(\S+)$", stdout, flags=re.M))


def _metrics(run_dir) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_train_validate_export_and_resume(run_recipe, tmp_path):
    run_dir = tmp_path / "sam2"
    args = ["--run_dir", str(run_dir), "--trainer.val_every_n_steps", "2", "--trainer.checkpoint_every_n_steps", "2",
            *TINY]
    first = run_recipe("recipes.sam2_train", *args, "--trainer.max_steps", "4")
    out = _summary(first.stdout)
    assert {"checkpoint", "sam2", "overlays", "J&F", "boundary_iou", "wandb"} <= set(out)
    assert "sam2.1_hiera_nano in video mode @ 128px" in first.stdout + first.stderr

    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4 and last["hyper_parameters"]["model"]["name"] == "sam2.1_hiera_nano"
    rows = _metrics(run_dir)
    trained = [r for r in rows if r.get("train/loss_mask")]
    assert len(trained) == 4 and all(float(r["train/loss"]) > 0 for r in trained)
    validated = [r for r in rows if r.get("val/J&F")]
    assert len(validated) >= 2  # at step 2 and at the end
    for row in validated:
        assert 0 <= float(row["val/J"]) <= 100 and 0 <= float(row["val/F"]) <= 100
        assert float(row["val/J&F"]) == pytest.approx((float(row["val/J"]) + float(row["val/F"])) / 2)
        assert float(row["val/videos"]) == 2 and float(row["val/objects"]) >= 2
    assert out["overlays"].endswith(".png") and list((run_dir / "images").glob("vos-step*.csv"))
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert list((run_dir / "wandb").glob("offline-run-*/files/media/images/val/vos_overlays_*.png"))

    # The export is sam2's {"model": state}: it initialises a new run as an official checkpoint does.
    fresh = SAM2Training(seed=1)
    assert "official checkpoint" in fresh.init_from(out["sam2"])[0]
    assert torch.equal(fresh.model.state_dict()["no_mem_embed"], last["state_dict"]["model.no_mem_embed"])

    second = run_recipe("recipes.sam2_train", *args, "--trainer.max_steps", "6")
    assert "Resuming from" in second.stdout + second.stderr
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    steps = [int(r["step"]) for r in _metrics(run_dir) if r.get("train/loss_mask")]
    assert steps == sorted(set(steps)) and len(steps) == 6  # the resumed run logs steps 4 and 5, none twice


def test_ddp_on_two_cpu_processes(run_recipe, tmp_path):
    run_dir = tmp_path / "ddp"
    proc = run_recipe("recipes.sam2_train", "--run_dir", str(run_dir), "--trainer.max_steps", "2",
                      "--trainer.val_every_n_steps", "2", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                      *TINY, "--data.val_batches", "1", timeout=300)
    assert "Strategy: DDP, unused-parameter search on" in proc.stderr
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    videos = {float(r["val/videos"]) for r in _metrics(run_dir) if r.get("val/videos")}
    assert videos == {2.0}  # one video on each rank, gathered


def test_the_shipped_configs_parse_with_the_published_settings():
    mose, _ = parse_config(Config, ["--config", str(CONFIGS / "sam2.1_hiera_b+_mose.yaml")])
    assert (mose.model.name, mose.init_from, mose.data.image_size) == ("sam2.1_hiera_base_plus",
                                                                      "sam2.1_hiera_base_plus.pt", 1024)
    assert (mose.optim.lr, mose.optim.lr * mose.optim.vision_lr_ratio, mose.optim.min_lr) == pytest.approx(
        (5e-6, 3e-6, 5e-7))
    assert mose.data.batch_size * mose.trainer.devices == 8 and mose.trainer.gradient_clip_val == 0.1
    assert mose.model.multimask_output_for_tracking is None  # sam2's setting, not the from-scratch default
    sam, _ = parse_config(Config, ["--config", str(CONFIGS / "sam_vit_b_sa1b.yaml")])
    assert (sam.model.name, sam.model.mode, sam.optim.lr, sam.optim.layer_decay) == ("sam_vit_b", "image", 8e-4, 0.6)
    assert sam.data.batch_size * sam.trainer.devices * sam.trainer.num_nodes == 128
    assert (sam.data.max_objects, sam.data.max_object_area) == (64, 0.9)  # up to 64 masks per GPU, none over 90%


def _png(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


def _video_shard(directory, frames: int, frame_side: int, mask_side: int) -> str:
    with ShardWriter(str(directory), "videos", max_count=10) as writer:
        sample = {"__key__": "v0"}
        for t in range(frames):
            ids = np.zeros((mask_side, mask_side), np.uint8)
            ids[4:20, 4 + t : 20 + t] = 1
            sample[f"{t:03d}.jpg"] = _png(np.full((frame_side, frame_side, 3), 90, np.uint8), "JPEG")
            sample[f"{t:03d}.mask.png"] = _png(ids, "PNG")
        writer.write(sample)
    return str(directory / "videos-000000.tar")


def _image_shard(directory, side: int = 128) -> str:
    """Two images with two instance masks each (make_shards --format coco's fields: jpg and mask.png)."""
    with ShardWriter(str(directory), "images", max_count=10) as writer:
        for i in range(2):
            ids = np.zeros((side, side), np.uint8)
            ids[10 + 5 * i : 60, 20:70] = 1
            ids[70:110, 60 + 10 * i : 120] = 2
            image = np.where(ids[..., None] > 0, 40 + 80 * ids[..., None], 200).astype(np.uint8).repeat(3, -1)
            writer.write({"__key__": f"im{i}", "jpg": _png(image, "JPEG"), "mask.png": _png(ids, "PNG")})
    return str(directory / "images-000000.tar")


def test_images_validate_with_clicks_and_a_box_in_video_mode(run_recipe, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_recipe("recipes.sam2_train", "--run_dir", str(run_dir), *TINY, "--trainer.max_steps", "2",
                      "--trainer.val_every_n_steps", "2", "--data.val_shards", _image_shard(tmp_path))
    out = _summary(proc.stdout)
    image_metrics = ("mIoU_1_click", "mIoU_5_clicks", "mIoU_box", "image_boundary_iou", "prompt_agreement_1_click")
    assert set(image_metrics) <= set(out) and "J&F" not in out
    row = [r for r in _metrics(run_dir) if r.get("val/mIoU_5_clicks")][-1]
    assert all(0 <= float(row[f"val/{name}"]) <= 100 for name in image_metrics)
    assert list((run_dir / "wandb").glob("offline-run-*/files/media/images/val/vos_overlays_*.png"))


@pytest.mark.parametrize("case", ["short video", "mask size", "other SAM version", "image size"])
def test_bad_input_stops_before_compute_with_the_reason(case, run_recipe, tmp_path):
    args = [*TINY, "--trainer.max_steps", "2"]
    if case == "short video":
        args += ["--data.train_shards", _video_shard(tmp_path, 2, 48, 48)]
        expected = "has 2 annotated frame(s), fewer than a training clip's 3"
    elif case == "mask size":
        args += ["--data.train_shards", _video_shard(tmp_path, 4, 48, 32)]
        expected = "mask 000.mask.png is 32x32 but its frame 000.jpg is 48x48"
    elif case == "other SAM version":
        args += ["--init_from", str(SAM2Training({"version": "2.0"}).export(tmp_path)["sam2"])]
        expected = "the checkpoint is SAM 2.0 but the model is built as SAM 2.1"
    else:
        args += ["--data.image_size", "64"]
        expected = "sam2.1_hiera_nano takes 128 x 128 frames, but --data.image_size is 64"
    proc = run_recipe("recipes.sam2_train", "--run_dir", str(tmp_path / "run"), *args, check=False)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-3000:]
    assert not list((tmp_path / "run").glob("checkpoints/*"))
