"""The VOS evaluation recipe end to end, run as a user runs it, on a random-weights nano SAM 2 and two videos of the
synthetic world: an official-layout checkpoint and a Prism run directory of the same weights give the same masks;
palette PNGs per frame (DAVIS) or per object and frame (SA-V); J&F per video and their mean printed and written;
a video without an object on its first frame fails, unless objects are tracked from their first appearance."""

import io
import json
import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from datamodules.shard_writer import ShardWriter
from models.sam.video_predictor import DAVIS_PALETTE
from tests.models.test_sam2_model import ours_from, sam2_nano

pytestmark = pytest.mark.slow

SIDE = 128  # the synthetic world's video size at the default --data.image_size
TWO = ["video-00000512", "video-00000513"]  # the first two videos of the synthetic world's validation shard


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """The nano model's tiny ops only wait on each other with more threads on a shared 2-core machine."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The same random weights as an official sam2*.pt file and as a Prism run directory (config.yaml and a
    Lightning checkpoint whose state_dict holds the model under model.*)."""
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    reference = sam2_nano()
    official = root / "sam2.1_hiera_nano.pt"
    torch.save({"model": reference.state_dict()}, official)
    run = root / "sam2_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "sam2.1_hiera_nano"}}))
    state = {f"model.{k}": v for k, v in ours_from(reference, "2.1", root).state_dict().items()}
    torch.save({"state_dict": state, "global_step": 1}, run / "checkpoints" / "last.ckpt")
    return official, run


def per_video(stdout: str) -> dict[str, float]:
    return {name: float(jf) for name, jf in re.findall(r"^(\S+)\s+J&F\s+([\d.]+)$", stdout, flags=re.M)}


def png(path) -> tuple[np.ndarray, str, list[int] | None]:
    with Image.open(path) as image:
        return np.array(image), image.mode, image.getpalette()


def close_to(pred: np.ndarray, truth: np.ndarray) -> bool:
    """Every object's IoU over 0.7: on the frame of its mask prompt, an object's output is the mask as low-res
    logits (a quarter of the input's side, antialiased) resized back, so boundaries move by a pixel or so."""
    ious = [((pred == i) & (truth == i)).sum() / ((pred == i) | (truth == i)).sum() for i in np.unique(truth) if i]
    return len(ious) > 0 and min(ious) > 0.7


def test_official_checkpoint_davis_and_sav(run_recipe, checkpoints, tmp_path):
    official, run = checkpoints
    (tmp_path / "val.txt").write_text("\n".join(TWO) + "\n")
    two = ["--video_list", str(tmp_path / "val.txt")]
    out = tmp_path / "davis"
    proc = run_recipe("recipes.eval_vos", "--init_from", str(official), "--output", str(out), *two)
    videos = per_video(proc.stdout)
    assert list(videos) == TWO and all(0 <= jf <= 100 for jf in videos.values())
    mean = re.search(r"^mean\s+J&F\s+([\d.]+)\s+J ([\d.]+)\s+F ([\d.]+)", proc.stdout, flags=re.M)
    assert mean and abs(float(mean[1]) - (float(mean[2]) + float(mean[3])) / 2) < 0.1
    summary = json.loads((out / "jf.json").read_text())
    assert summary["videos"].keys() == videos.keys() and summary["protocol"] == "davis"
    assert (out / "jf.csv").read_text().startswith("video,object,J&F,J,F\nglobal,,")
    for name in videos:
        frames = sorted(p.name for p in (out / "JPEGImages" / name).glob("*.jpg"))
        masks = sorted((out / "masks" / name).glob("*.png"))
        assert [p.name for p in masks] == [f.replace(".jpg", ".png") for f in frames] and len(masks) == 8
        for path in masks:
            ids, mode, palette = png(path)
            assert ids.shape == (SIDE, SIDE) and mode == "P" and palette == DAVIS_PALETTE
        truth, _, _ = png(out / "Annotations" / name / "00000.png")
        assert close_to(png(masks[0])[0], truth) and len(np.unique(truth)) > 2  # frame 0: the given masks

    # The Prism run directory of the same weights gives the same masks.
    again = tmp_path / "prism"
    proc = run_recipe("recipes.eval_vos", "--init_from", str(run), "--output", str(again), *two)
    assert per_video(proc.stdout) == videos
    for path in sorted((out / "masks").rglob("*.png")):
        assert np.array_equal(png(path)[0], png(again / path.relative_to(out))[0]), path

    sav = tmp_path / "sav"
    proc = run_recipe("recipes.eval_vos", "--init_from", str(official), "--output", str(sav), "--protocol", "sav",
                      *two)
    assert per_video(proc.stdout).keys() == videos.keys()
    for name in videos:
        objects = sorted(p.name for p in (sav / "masks" / name).iterdir())
        truth, _, _ = png(out / "Annotations" / name / "00000.png")
        assert objects == [f"{i:03d}" for i in np.unique(truth) if i]
        for obj in objects:
            pngs = sorted((sav / "masks" / name / obj).glob("*.png"))
            assert len(pngs) == 8
            mask, mode, palette = png(pngs[0])
            assert mode == "P" and palette == DAVIS_PALETTE and set(np.unique(mask)) <= {0, 1}
            assert close_to(mask, (truth == int(obj)).astype(np.uint8))


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


def test_object_appearing_later(run_recipe, checkpoints, tmp_path):
    """A video whose object shows up on frame 1 only: an error that names the video, or with
    --track_later_objects, tracked from there (nothing predicted on frame 0)."""
    official, _ = checkpoints
    rng = np.random.default_rng(0)
    sample = {"__key__": "late-object"}
    for t in range(4):
        ids = np.zeros((64, 96), np.uint8)
        if t > 0:
            ids[10 + 5 * t:40 + 5 * t, 20:60] = 3
        sample[f"{t:03d}.jpg"] = _encode(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), "JPEG")
        sample[f"{t:03d}.mask.png"] = _encode(ids, "PNG")
    with ShardWriter(str(tmp_path / "shards"), prefix="vos") as writer:
        writer.write(sample)
    shards = ["--data.val_shards", str(tmp_path / "shards" / "vos-000000.tar")]

    failed = run_recipe("recipes.eval_vos", "--init_from", str(official), "--output", str(tmp_path / "a"), *shards,
                        check=False)
    assert failed.returncode != 0
    assert re.search(r"JPEGImages/late-object: no object on frame 0 of the annotations", failed.stderr)

    out = tmp_path / "b"
    proc = run_recipe("recipes.eval_vos", "--init_from", str(official), "--output", str(out), *shards,
                      "--track_later_objects", "true")
    assert list(per_video(proc.stdout)) == ["late-object"]
    first, mode, _ = png(out / "masks" / "late-object" / "00000.png")
    second, _, _ = png(out / "masks" / "late-object" / "00001.png")
    assert first.shape == (64, 96) and mode == "P" and not first.any()
    assert close_to(second, png(out / "Annotations" / "late-object" / "00001.png")[0])
