"""Caption datamodules for contrastive pre-training: batches and their contract, tokens against the tokenizer applied
to the shard's own caption, PE's squash resize at validation, PE's video frame sampling, errors before compute,
zero-shot class names, and the progressive-resolution schedule in a real Lightning fit and its resume."""

import io
import json
import pickle
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from batch_contract import check_batch
from datamodules import captions
from datamodules.captions import (
    CaptionDataConfig,
    CaptionSampleTransform,
    ResolutionSchedule,
    caption_datamodule,
    check_caption_shards,
    squash_pil_transform,
    video_caption_datamodule,
    zero_shot_classes,
)
from datamodules.shard_writer import ShardWriter
from datamodules.shards import expand_shards
from datamodules.synthetic import CLASS_NAMES, SyntheticWorldConfig, ensure_synthetic_world
from datamodules.text import CaptionTokenizer
from trainers.callbacks import DataPosition  # the trainer side of the data position, as in test_sharded

TEXT_KEYS = ("text", "text_tokens", "text_mask", "key")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # 48 validation scenes hold all 10 classes (labels are drawn uniformly; 32 would miss one with seed 0).
    cfg = SyntheticWorldConfig(image_size=40, train_samples=8, val_samples=48, samples_per_shard=8, video_samples=4,
                               video_frames=5, video_size=24)
    return ensure_synthetic_world(cfg, root=str(tmp_path_factory.mktemp("world")))


@pytest.fixture(scope="module")
def tokenizer():
    return CaptionTokenizer(32)


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _write(directory, prefix: str, samples: list[dict]) -> str:
    with ShardWriter(str(directory), prefix, max_count=len(samples)) as writer:
        for sample in samples:
            writer.write(sample)
    return str(directory / f"{prefix}-000000.tar")


def _tar_fields(spec_or_path: str, field: str) -> dict[str, bytes]:
    """key -> raw bytes of ``field`` for every sample of the shards, read with tarfile (not the code under test)."""
    out = {}
    for path in expand_shards(spec_or_path):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, _, name = member.name.partition(".")
                if name == field:
                    out[key] = tar.extractfile(member).read()
    return out


def _assert_tokens_of(batch: dict, captions: dict[str, str], tokenizer: CaptionTokenizer) -> None:
    for i, key in enumerate(batch["key"]):
        tokens, mask = tokenizer(captions[key])
        assert batch["text"][i] == captions[key]
        assert torch.equal(batch["text_tokens"][i], tokens[0]), key
        assert torch.equal(batch["text_mask"][i], mask[0]), key


# ---------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("field, value", [("context_length", 2), ("video_frames", 0), ("min_crop_scale", 0.0),
                                          ("min_crop_scale", 1.5), ("decode", "device")])
def test_config_rejects_bad_values_naming_the_flag(field, value):
    with pytest.raises(ValueError, match=f"--data.{field}"):
        CaptionDataConfig(**{field: value})


# ---------------------------------------------------------------------------------------------------
# Image-text batches


def test_train_batch_keeps_the_contract_and_tokens_match_the_shard_captions(world, tokenizer):
    cfg = CaptionDataConfig(train_shards=world.train_shards, image_size=32, batch_size=4, num_workers=0,
                            batches_per_epoch=2)
    dm = caption_datamodule(cfg)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 2
    captions = {k: v.decode() for k, v in _tar_fields(world.train_shards, "txt").items()}
    for batch in batches:
        assert set(batch) == {"image", *TEXT_KEYS}  # training carries no label
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 3, 32, 32)
        _assert_tokens_of(batch, captions, tokenizer)
        on_device = dm.on_after_batch_transfer(dict(batch), 0)
        assert check_batch(on_device, ("image", *TEXT_KEYS)) == []
        # PE's normalisation, mean = std = 0.5: pixel 0 -> -1, 255 -> 1
        assert torch.allclose(on_device["image"], batch["image"].float() / 127.5 - 1, atol=1e-6)


def test_val_squashes_the_whole_image_and_keeps_labels_and_json_captions(tmp_path, tokenizer):
    rng = np.random.default_rng(0)
    wide, tall = rng.integers(0, 256, (32, 64, 3)), rng.integers(0, 256, (50, 30, 3))  # (H, W, 3)
    samples = [
        {"__key__": "wide", "jpg": _jpeg(wide), "txt": b"a wide picture", "cls": b"3"},
        {"__key__": "tall", "jpg": _jpeg(tall), "json": json.dumps({"caption": "a tall one", "label": 1}).encode()},
    ]
    shard = _write(tmp_path, "val", samples)
    cfg = CaptionDataConfig(train_shards=shard, val_shards=shard, image_size=24, batch_size=2, num_workers=0)
    dm = caption_datamodule(cfg)
    dm.setup("validate")
    (batch,) = list(dm.val_dataloader())
    assert batch["key"] == ["wide", "tall"]
    assert batch["label"].tolist() == [3, 1]  # from cls, then from the json
    _assert_tokens_of(batch, {"wide": "a wide picture", "tall": "a tall one"}, tokenizer)
    for i, sample in enumerate(samples):
        # PE's eval transform: Resize((S, S)) with bilinear on the PIL image, no center crop
        decoded = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        expected = torch.from_numpy(np.array(decoded.resize((24, 24), Image.Resampling.BILINEAR))).permute(2, 0, 1)
        assert torch.equal(batch["image"][i], expected), sample["__key__"]
    assert check_batch(dm.on_after_batch_transfer(batch, 0), ("image", "label", *TEXT_KEYS)) == []


def test_transform_pickles_without_its_tokenizer_and_names_a_sample_without_caption(tmp_path, tokenizer):
    transform = CaptionSampleTransform(squash_pil_transform(8), context_length=32)
    image = Image.new("RGB", (10, 6), (10, 20, 30))
    out = transform({"__key__": "k", "jpg": image, "txt": b"  a grey box \n"})
    assert out["text"] == "a grey box" and torch.equal(out["text_tokens"], tokenizer("a grey box")[0][0])
    shipped = pickle.dumps(transform)
    assert len(shipped) < 100_000  # the BPE tables (~2 MB) are rebuilt in the worker, not shipped to it
    again = pickle.loads(shipped)({"__key__": "k", "jpg": image, "txt": b"a grey box"})
    assert torch.equal(again["text_tokens"], out["text_tokens"])
    with pytest.raises(ValueError, match=r"'lost'.*shard /x/a.tar.*no caption.*make_shards --format captions"):
        transform({"__key__": "lost", "__url__": "/x/a.tar", "jpg": image, "json": b'{"label": 1}'})


# ---------------------------------------------------------------------------------------------------
# Video-text batches

# Frame t of the hand-made videos is one flat colour, far from every other frame's after JPEG.
PALETTE = np.array([(25 * t, 250 - 25 * t, 60 + 15 * t) for t in range(10)])


def _video(num_frames: int, size: tuple[int, int]) -> dict:
    return {f"{t:03d}.jpg": _jpeg(np.broadcast_to(PALETTE[t], (*size, 3))) for t in range(num_frames)}


def _frame_ids(frames: torch.Tensor) -> list[int]:
    """(T, 3, H, W) uint8 -> the palette index of each frame, by its mean colour."""
    means = frames.float().mean(dim=(2, 3))  # (T, 3)
    distance = torch.cdist(means, torch.as_tensor(PALETTE, dtype=torch.float32))
    assert distance.min(dim=1).values.max() < 8, "a frame is not one of the palette's flat colours"
    return distance.argmin(dim=1).tolist()


@pytest.fixture()
def video_shard(tmp_path):
    samples = [
        {"__key__": "ten", **_video(10, (16, 16)), "txt": b"ten frames", "json": json.dumps({"label": 0}).encode()},
        {"__key__": "three", **_video(3, (12, 20)), "json": json.dumps({"caption": "three", "label": 1}).encode()},
    ]
    return _write(tmp_path, "video", samples)


def test_video_frames_are_taken_at_int_i_n_minus_1_over_t_minus_1(video_shard, tokenizer):
    # Hand-worked for T = 4: N = 10 -> int(i * 9 / 3) = 0, 3, 6, 9; N = 3 -> int(i * 2 / 3) = 0, 0, 1, 2.
    expected = {"ten": [0, 3, 6, 9], "three": [0, 0, 1, 2]}
    cfg = CaptionDataConfig(train_shards=video_shard, val_shards=video_shard, image_size=8, batch_size=2,
                            num_workers=0, video_frames=4, batches_per_epoch=1, shuffle_buffer=0)
    check_caption_shards(cfg, video=True)
    dm = video_caption_datamodule(cfg)
    dm.setup("fit")
    (val,) = list(dm.val_dataloader())
    (train,) = list(dm.train_dataloader())
    for batch in (val, train):  # the train crop moves the frame's window, not the frames taken
        assert batch["frames"].dtype == torch.uint8 and batch["frames"].shape == (2, 4, 3, 8, 8)
        assert {key: _frame_ids(frames) for key, frames in zip(batch["key"], batch["frames"])} == expected
        _assert_tokens_of(batch, {"ten": "ten frames", "three": "three"}, tokenizer)
    assert val["label"].tolist() == [0, 1]
    assert check_batch(dm.on_after_batch_transfer(val, 0), ("frames", "label", *TEXT_KEYS)) == []


def test_synthetic_video_split_feeds_the_video_datamodule(world, tokenizer):
    cfg = CaptionDataConfig(train_shards=world.video_shards, val_shards=world.video_shards, image_size=16,
                            batch_size=2, num_workers=0, video_frames=3, batches_per_epoch=1)
    check_caption_shards(cfg, video=True)
    dm = video_caption_datamodule(cfg)
    dm.setup("fit")
    captions = {k: json.loads(v)["caption"] for k, v in _tar_fields(world.video_shards, "json").items()}
    for batch in (next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))):
        assert batch["frames"].shape == (2, 3, 3, 16, 16)
        _assert_tokens_of(batch, captions, tokenizer)
        assert check_batch(dm.on_after_batch_transfer(batch, 0), ("frames", *TEXT_KEYS)) == []


def test_video_default_is_a_synthetic_video_split_with_validation_apart(tmp_path, monkeypatch):
    monkeypatch.setenv("PRISM_CACHE", str(tmp_path))  # where ensure_synthetic_world builds
    monkeypatch.setattr(captions, "SYNTHETIC_VIDEOS", {"train_samples": 1, "val_samples": 1, "video_samples": 6,
                                                       "samples_per_shard": 2, "video_frames": 3, "video_size": 16})
    cfg = CaptionDataConfig()
    check_caption_shards(cfg, video=True)
    assert [Path(p).name for p in expand_shards(cfg.train_shards)] == ["video-000000.tar", "video-000001.tar"]
    assert [Path(p).name for p in expand_shards(cfg.val_shards)] == ["video-000002.tar"]


# ---------------------------------------------------------------------------------------------------
# Errors before compute


def test_shards_without_captions_or_frames_fail_before_compute(tmp_path, world):
    bare = _write(tmp_path, "bare", [{"__key__": "a", "jpg": _jpeg(np.zeros((8, 8, 3))), "cls": b"0"}])
    with pytest.raises(ValueError, match=r"--data.train_shards.*bare-000000.tar.*no caption.*'txt'"):
        check_caption_shards(CaptionDataConfig(train_shards=bare))
    with pytest.raises(ValueError, match=r"--data.val_shards.*bare-000000.tar.*no caption"):
        check_caption_shards(CaptionDataConfig(train_shards=world.train_shards, val_shards=bare))
    with pytest.raises(ValueError, match=r"train-000000.tar.*no video frames.*000.jpg"):
        check_caption_shards(CaptionDataConfig(train_shards=world.train_shards), video=True)
    with pytest.raises(ValueError, match=r"no 'jpg' image.*video_caption_datamodule"):
        check_caption_shards(CaptionDataConfig(train_shards=world.video_shards))
    check_caption_shards(CaptionDataConfig(train_shards=world.train_shards, val_shards=world.val_shards))


# ---------------------------------------------------------------------------------------------------
# Zero-shot class names


def test_zero_shot_classes_of_the_synthetic_world_in_label_order(world):
    assert not list(Path(world.root).rglob("classes.json"))  # so the names come from the samples' json
    assert zero_shot_classes(world.val_shards) == list(CLASS_NAMES)


def test_zero_shot_classes_from_classes_json_none_without_labels_and_gaps_refused(tmp_path):
    image = _jpeg(np.zeros((8, 8, 3)))
    named = tmp_path / "named"
    shard = _write(named, "val", [{"__key__": "a", "jpg": image, "txt": b"x"}])
    (named / "classes.json").write_text(json.dumps({"zebra": 0, "ant": 2, "mole": 1}))  # name -> label
    assert zero_shot_classes(shard) == ["zebra", "mole", "ant"]
    assert zero_shot_classes(_write(tmp_path / "plain", "val", [{"__key__": "a", "jpg": image, "txt": b"x"}])) is None
    gap = [{"__key__": f"s{label}", "jpg": image, "json": json.dumps({"label": label, "class_name": f"c{label}"})
            .encode()} for label in (0, 2)]
    with pytest.raises(ValueError, match=r"label\(s\) \[1\].*classes.json"):
        zero_shot_classes(_write(tmp_path / "gap", "val", gap))


# ---------------------------------------------------------------------------------------------------
# Progressive resolution


def test_resolution_schedule_size_at_and_validation():
    schedule = ResolutionSchedule([(0, 98), (10, 154), (20, 224)])
    assert [schedule.size_at(s) for s in (0, 9, 10, 19, 20, 10**6)] == [98, 98, 154, 154, 224, 224]
    for stages, match in [([], "at least one"), ([(1, 98)], "step 0"), ([(0, 98), (5, 154), (5, 224)], "increasing"),
                          ([(0, 98), (4, 2), (3, 224)], "increasing"), ([(0, 0)], ">= 1")]:
        with pytest.raises(ValueError, match=match):
            ResolutionSchedule(stages)
    with pytest.raises(ValueError, match=r"\[\(20, 224\)\].*--data.image_size 200"):
        caption_datamodule(CaptionDataConfig(image_size=200), resolution_schedule=schedule)


def test_device_resize_keeps_the_precision_dtype_and_spares_validation():
    cfg = CaptionDataConfig(image_size=24)
    dm = caption_datamodule(cfg, resolution_schedule=ResolutionSchedule([(0, 16)]))
    dm.trainer = L.Trainer(accelerator="cpu", precision="bf16-true", logger=False, enable_progress_bar=False,
                           enable_model_summary=False)
    image = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8)
    frames = torch.randint(0, 256, (2, 5, 3, 24, 24), dtype=torch.uint8)
    dm.trainer.training = True
    out = dm.on_after_batch_transfer({"image": image.clone(), "frames": frames.clone()}, 0)
    assert out["image"].dtype == torch.bfloat16 and out["image"].shape == (2, 3, 16, 16)
    assert out["frames"].dtype == torch.bfloat16 and out["frames"].shape == (2, 5, 3, 16, 16)
    normalised = image.float() / 127.5 - 1
    expected = F.interpolate(normalised, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(out["image"].float(), expected, atol=2e-2)  # bf16 keeps ~3 significant digits
    dm.trainer.validating = True
    out = dm.on_after_batch_transfer({"image": image.clone()}, 0)
    assert out["image"].shape == (2, 3, 24, 24)


class _SizeRecorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.train_sizes: dict[int, tuple[int, int]] = {}
        self.val_sizes: list[tuple[int, tuple[int, int]]] = []

    def training_step(self, batch, batch_idx):
        self.train_sizes[self.global_step] = tuple(batch["image"].shape[-2:])
        return (self.weight * batch["image"].mean()).sum()

    def validation_step(self, batch, batch_idx):
        self.val_sizes.append((self.global_step, tuple(batch["image"].shape[-2:])))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # the resumed fit saves no checkpoints
def test_training_resolution_follows_the_global_step_and_resumes_there(world, tmp_path):
    def fit(ckpt_path=None, checkpoints=False):
        cfg = CaptionDataConfig(train_shards=world.train_shards, val_shards=world.val_shards, image_size=48,
                                batch_size=2, num_workers=0, batches_per_epoch=2, val_batches=1)
        dm = caption_datamodule(cfg, seed=1, resolution_schedule=ResolutionSchedule([(0, 32), (3, 48)]))
        callbacks = [DataPosition()]
        if checkpoints:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1,
                                             filename="{step}"))
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=6, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
                            enable_checkpointing=checkpoints, default_root_dir=tmp_path)
        model = _SizeRecorder()
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model

    run = fit(checkpoints=True)
    assert run.train_sizes == {0: (32, 32), 1: (32, 32), 2: (32, 32), 3: (48, 48), 4: (48, 48), 5: (48, 48)}
    # Validation after epoch 0 runs while training is at 32 px, and sees the full 48.
    assert (2, (48, 48)) in run.val_sizes and {size for _, size in run.val_sizes} == {(48, 48)}
    resumed = fit(ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt"))
    assert resumed.train_sizes == {2: (32, 32), 3: (48, 48), 4: (48, 48), 5: (48, 48)}
