"""SAM 2 clips from video and image shards: the synthetic default's batches and their contract, masks that follow their
objects through every transform, one geometry per clip, time reversal, whole validation videos, 1-frame image clips
and their mix with videos, errors before compute, and a training stream that resumes where it stopped."""

import io
import pickle
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from batch_contract import IMAGENET_MEAN, IMAGENET_STD, check_batch
from datamodules import video_segmentation
from datamodules.shard_writer import ShardWriter
from datamodules.shards import expand_shards
from datamodules.synthetic import SyntheticWorldConfig, ensure_synthetic_world
from datamodules.video_segmentation import (
    ClipAugment,
    VideoClipTransform,
    VideoSegmentationDataConfig,
    VideoSegmentationDataModule,
    check_video_shards,
    random_affine,
)
from trainers.callbacks import DataPosition  # the trainer side of the data position, as in test_sharded

CLIP_KEYS = ("frames", "frame_masks", "frame_valid", "key")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    cfg = SyntheticWorldConfig(image_size=32, train_samples=8, val_samples=1, samples_per_shard=4, video_samples=8,
                               video_frames=6, video_size=32)
    return ensure_synthetic_world(cfg, root=str(tmp_path_factory.mktemp("world")))


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _png(ids: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(ids.astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _write(directory: Path, prefix: str, samples: list[dict]) -> str:
    with ShardWriter(str(directory), prefix, max_count=len(samples)) as writer:
        for sample in samples:
            writer.write(sample)
    return str(directory / f"{prefix}-000000.tar")


def _video(key: str, frames: list[np.ndarray], masks: list[np.ndarray | None]) -> dict:
    sample = {"__key__": key}
    for t, (frame, mask) in enumerate(zip(frames, masks)):
        sample[f"{t:03d}.jpg"] = _jpeg(frame)
        if mask is not None:
            sample[f"{t:03d}.mask.png"] = _png(mask)
    return sample


def _square_video(key: str, num_frames: int, size: int = 16) -> dict:
    """A grey video whose object (id 1) is a white square in the top left corner."""
    frame, mask = np.full((size, size, 3), 90), np.zeros((size, size))
    frame[2:8, 2:8], mask[2:8, 2:8] = 255, 1
    return _video(key, [frame] * num_frames, [mask] * num_frames)


def _assert_objects_1_to_k_in_frame_0(frame_masks: torch.Tensor, max_objects: int) -> None:
    """(B, T, H, W): each clip's ids are 1..K, all in frame 0, K <= max_objects."""
    for clip in frame_masks:
        k = int(clip[0].max())
        assert 1 <= k <= max_objects
        assert clip[0].unique().tolist() == list(range(k + 1))
        assert int(clip.max()) == k  # no object outside those of frame 0


# ---------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("field, value", [("num_frames", 0), ("max_objects", 0), ("max_objects", 256),
                                          ("reverse_time_prob", 1.5), ("image_prob", 0.0), ("decode", "device"),
                                          ("max_object_area", 0.0), ("max_object_area", 1.5)])
def test_config_rejects_bad_values_naming_the_flag(field, value):
    with pytest.raises(ValueError, match=f"--data.{field}"):
        VideoSegmentationDataConfig(**{field: value})


# ---------------------------------------------------------------------------------------------------
# The synthetic default


def test_synthetic_default_gives_clips_of_the_contract_and_whole_validation_videos(tmp_path, monkeypatch):
    monkeypatch.setenv("PRISM_CACHE", str(tmp_path))  # where ensure_synthetic_world builds
    monkeypatch.setattr(video_segmentation, "SYNTHETIC_VIDEO_SEGMENTATION", {
        "video_samples": 6, "samples_per_shard": 2, "video_frames": 5, "train_samples": 1, "val_samples": 1})
    cfg = VideoSegmentationDataConfig(image_size=24, batch_size=2, num_workers=0, batches_per_epoch=2, num_frames=4,
                                      max_objects=2)
    check_video_shards(cfg)
    assert [Path(p).name for p in expand_shards(cfg.train_shards)] == ["video-000000.tar", "video-000001.tar"]
    assert [Path(p).name for p in expand_shards(cfg.val_shards)] == ["video-000002.tar"]
    dm = VideoSegmentationDataModule(cfg)
    dm.setup("fit")
    for batch in dm.train_dataloader():
        assert batch["frames"].dtype == torch.uint8 and batch["frames"].shape == (2, 4, 3, 24, 24)
        assert batch["frame_masks"].dtype == torch.uint8 and batch["frame_masks"].shape == (2, 4, 24, 24)
        assert batch["frame_valid"].dtype == torch.bool and batch["frame_valid"].all()
        _assert_objects_1_to_k_in_frame_0(batch["frame_masks"], 2)
        host = batch["frames"].clone()
        on_device = dm.on_after_batch_transfer(batch, 0)
        assert check_batch(on_device, CLIP_KEYS) == []
        mean, std = (torch.tensor(v).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        assert torch.allclose(on_device["frames"], (host.float() / 255 - mean) / std, atol=1e-5)
    val = list(dm.val_dataloader())
    assert len(val) == 2  # the last shard's 2 videos, one per batch, each whole (5 frames), every frame annotated
    for batch in val:
        assert batch["frames"].shape == (1, 5, 3, 24, 24) and batch["frame_valid"].tolist() == [[True] * 5]
        assert batch["frame_masks"][0, 0].max() >= 1
        assert check_batch(dm.on_after_batch_transfer(batch, 0), CLIP_KEYS) == []
    shipped = pickle.loads(pickle.dumps(dm.train_transform))  # loader workers receive it pickled
    assert isinstance(shipped.augment, ClipAugment)


# ---------------------------------------------------------------------------------------------------
# Transforms


def _two_object_video(num_frames: int = 4, size: int = 64) -> dict:
    """A green video with a red square (id 1) and a blue one (id 2), both moving every frame."""
    frames, masks = [], []
    for t in range(num_frames):
        frame, mask = np.zeros((size, size, 3)), np.zeros((size, size))
        frame[:] = (0, 160, 0)
        for obj, colour, (y, x) in ((1, (255, 0, 0), (8 + 3 * t, 10 + 4 * t)), (2, (0, 0, 255), (36 - 2 * t, 34))):
            frame[y : y + 18, x : x + 14], mask[y : y + 18, x : x + 14] = colour, obj
        frames.append(frame)
        masks.append(mask)
    return {"__url__": "hand-made", **_video("two", frames, masks)}


def _eroded(mask: torch.Tensor, pixels: int = 2) -> torch.Tensor:
    """bool (H, W) -> its interior: colours bleed over the edges by resampling and JPEG."""
    return -F.max_pool2d(-mask[None, None].float(), 2 * pixels + 1, stride=1, padding=pixels)[0, 0] > 0


def test_masks_cover_their_objects_colour_after_all_the_random_transforms():
    transform = VideoClipTransform(48, 4, max_objects=2, augment=ClipAugment())
    sample, coloured = _two_object_video(), 0
    for seed in range(12):
        torch.manual_seed(seed)
        out = transform(sample)
        frames, masks = out["frames"].float(), out["frame_masks"]
        if bool((frames[:, 0] == frames[:, 1]).all()):  # RandomGrayscale (p 0.05) took the colours away
            continue
        coloured += 1
        # Both squares are large: both survive in frame 0, numbered in id order (red 1, blue 2).
        assert masks[0].unique().tolist() == [0, 1, 2], seed
        for t in range(4):
            r, g, b = frames[t]
            red, blue = _eroded(masks[t] == 1), _eroded(masks[t] == 2)
            assert red.sum() > 20 and blue.sum() > 20, (seed, t)
            assert ((r - torch.maximum(g, b))[red] > 100).all(), (seed, t)
            assert ((b - torch.maximum(r, g))[blue] > 100).all(), (seed, t)
            # ...and the other way round: strongly red pixels lie on object 1's mask
            strongly_red = (r - torch.maximum(g, b)) > 150
            assert (masks[t][strongly_red] == 1).float().mean() > 0.97, (seed, t)
    assert coloured >= 9


def test_every_frame_and_mask_of_a_clip_gets_the_same_geometry():
    # 8 identical frames: with geometry only, the 8 transformed frames (and masks) must stay identical.
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (24, 32, 3))
    mask = np.zeros((24, 32))
    mask[4:14, 6:20], mask[12:20, 18:28] = 1, 2
    sample = _video("same", [frame] * 8, [mask] * 8)
    geometry = VideoClipTransform(24, 8, max_objects=2, augment=ClipAugment(hflip=True, affine=True, colour=False))
    plain = VideoClipTransform(24, 8, max_objects=2)
    torch.manual_seed(0)
    reference = plain(sample)
    moved = 0
    for seed in range(6):
        torch.manual_seed(seed)
        out = geometry(sample)
        assert (out["frames"] == out["frames"][:1]).all(), seed
        assert (out["frame_masks"] == out["frame_masks"][:1]).all(), seed
        moved += not torch.equal(out["frames"], reference["frames"])
    assert moved >= 5  # the flip and the affine did something


def test_affine_is_left_out_when_an_object_of_the_first_frame_would_leave_the_picture():
    frames = [Image.new("RGB", (32, 32), (200, 10, 10))] * 2
    masks = torch.zeros(2, 1, 32, 32, dtype=torch.uint8)
    masks[:, 0, 0, 0] = 1  # one pixel in the corner: almost any rotation or shear moves it out
    skipped = 0
    for seed in range(10):
        torch.manual_seed(seed)
        out_frames, out_masks = random_affine(frames, masks)
        assert out_masks[0].amax() == 1, seed  # never lost from frame 0
        skipped += out_frames is frames and out_masks is masks
    assert skipped >= 8


# Frame t of the time-reversal videos is one flat colour; its object covers its top t + 1 rows.
PALETTE = np.array([(25 * t, 250 - 25 * t, 60 + 15 * t) for t in range(10)])


def _counting_video() -> dict:
    masks = [np.zeros((16, 16)) for _ in range(10)]
    for t, mask in enumerate(masks):
        mask[: t + 1] = 1
    return _video("count", [np.broadcast_to(PALETTE[t], (16, 16, 3)) for t in range(10)], masks)


def _frame_ids(frames: torch.Tensor) -> list[int]:
    """(T, 3, H, W) uint8 -> the palette index of each frame, by its mean colour."""
    distance = torch.cdist(frames.float().mean(dim=(2, 3)), torch.as_tensor(PALETTE, dtype=torch.float32))
    assert distance.min(dim=1).values.max() < 8
    return distance.argmin(dim=1).tolist()


@pytest.mark.parametrize("prob, low, high", [(0.0, 0, 0), (0.25, 30, 70), (1.0, 200, 200)])
def test_time_reversal_happens_with_its_probability_and_reverses_the_masks_too(prob, low, high):
    transform = VideoClipTransform(16, 4, max_objects=1, reverse_time_prob=prob)
    sample, reversed_clips = _counting_video(), 0
    for seed in range(200):
        torch.manual_seed(seed)
        out = transform(sample)
        times = _frame_ids(out["frames"])
        assert (out["frame_masks"] == 1).sum(dim=(1, 2)).tolist() == [16 * (t + 1) for t in times]
        steps = set(np.diff(times).tolist())
        assert steps in ({1}, {-1}), times
        reversed_clips += steps == {-1}
    assert low <= reversed_clips <= high


@pytest.mark.parametrize("max_area, kept", [(1.0, {1, 2, 3}), (0.9, {2, 3}), (0.04, {3}), (0.005, set())])
def test_objects_over_the_area_limit_are_never_drawn(max_area, kept):
    """An image of 20 x 20 = 400 pixels: object 1 covers 376 (94%), object 2 20 (5%), object 3 4 (1%)."""
    ids = np.ones((20, 20))
    ids[:4, :5], ids[18:, 18:] = 2, 3
    sample = _video("im", [np.full((20, 20, 3), 90)], [ids])
    transform = VideoClipTransform(20, 1, max_objects=3, max_object_area=max_area)
    masks = transform(sample)["frame_masks"][0]  # every object left is drawn: max_objects is 3
    areas = {int((masks == k).sum()) for k in range(1, int(masks.max()) + 1)}
    assert areas == {{1: 376, 2: 20, 3: 4}[k] for k in kept}


def test_validation_is_the_whole_video_resized_with_unannotated_frames_flagged(tmp_path):
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (20, 30, 3)) for _ in range(5)]
    first, third = np.zeros((20, 30)), np.zeros((20, 30))
    first[2:10, 3:12], first[12:18, 15:28], third[5:15, 5:15] = 7, 3, 3  # ids 3, 7 -> 1, 2
    shard = _write(tmp_path, "val", [_video("whole", frames, [first, None, third, None, None])])
    cfg = VideoSegmentationDataConfig(train_shards=shard, val_shards=shard, image_size=16, batch_size=4,
                                      num_workers=0, num_frames=2)
    check_video_shards(cfg)
    dm = VideoSegmentationDataModule(cfg)
    dm.setup("validate")
    (batch,) = list(dm.val_dataloader())
    assert batch["key"] == ["whole"] and batch["frames"].shape == (1, 5, 3, 16, 16)
    assert batch["frame_valid"].tolist() == [[True, False, True, False, False]]
    for t in range(5):  # resize only: the decoded frame through PIL's bilinear resize
        decoded = Image.open(io.BytesIO(_jpeg(frames[t]))).convert("RGB").resize((16, 16), Image.Resampling.BILINEAR)
        assert torch.equal(batch["frames"][0, t], torch.from_numpy(np.array(decoded)).permute(2, 0, 1)), t
    masks = batch["frame_masks"][0]
    assert masks[0].unique().tolist() == [0, 1, 2] and masks[2].unique().tolist() == [0, 1]
    assert not masks[1].any() and not masks[3:].any()


# ---------------------------------------------------------------------------------------------------
# Image shards: 1-frame clips, alone or mixed with videos


def test_image_shards_give_one_frame_clips_alone_and_mixed_with_videos(world):
    alone = VideoSegmentationDataConfig(train_shards=world.train_shards, image_size=24, batch_size=2, num_workers=0,
                                        num_frames=1, max_objects=2, batches_per_epoch=2)
    check_video_shards(alone)
    dm = VideoSegmentationDataModule(alone)
    dm.setup("fit")
    for batch in dm.train_dataloader():
        assert batch["frames"].shape == (2, 1, 3, 24, 24) and batch["frame_masks"].shape == (2, 1, 24, 24)
        _assert_objects_1_to_k_in_frame_0(batch["frame_masks"], 2)
    mixed = VideoSegmentationDataConfig(train_shards=world.video_shards, image_shards=world.train_shards,
                                        image_prob=0.5, image_size=24, batch_size=2, num_workers=0, num_frames=3,
                                        batches_per_epoch=8)
    check_video_shards(mixed)
    dm = VideoSegmentationDataModule(mixed, seed=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(loader) == len(batches) == 8
    lengths = [b["frames"].shape[1] for b in batches]
    assert lengths == [1 if kind else 3 for kind in dm.train_stream.kinds(0)] and set(lengths) == {1, 3}
    for batch in batches:
        assert check_batch(dm.on_after_batch_transfer(batch, 0), CLIP_KEYS) == []
    keys = {key for b in batches for key in b["key"]}
    assert any(k.startswith("video-") for k in keys) and any(k.startswith("train-") for k in keys)


# ---------------------------------------------------------------------------------------------------
# Errors before compute, and the guard in the workers


def test_short_videos_and_mismatched_masks_fail_before_compute_naming_the_fix(tmp_path, world):
    short = _write(tmp_path / "short", "train", [_square_video("short", 3)])
    with pytest.raises(ValueError, match=r"--data.train_shards: Sample 'short'.*has 3 annotated frame\(s\), fewer "
                                         r"than a training clip's 4 \(--data.num_frames 4\).*drop this video"):
        check_video_shards(VideoSegmentationDataConfig(train_shards=short, num_frames=4))
    bad = _square_video("bad", 4)
    bad["002.mask.png"] = _png(np.ones((12, 16)))
    mismatched = _write(tmp_path / "bad", "train", [bad])
    with pytest.raises(ValueError, match=r"'bad'.*mask 002.mask.png is 16x12 but its frame 002.jpg is 16x16"):
        check_video_shards(VideoSegmentationDataConfig(train_shards=mismatched, num_frames=4))
    empty = _square_video("empty", 4)
    empty["000.mask.png"] = _png(np.zeros((16, 16)))
    no_object = _write(tmp_path / "empty", "val", [empty])
    with pytest.raises(ValueError, match=r"--data.val_shards: Sample 'empty'.*no object in its first frame"):
        check_video_shards(VideoSegmentationDataConfig(train_shards=world.video_shards, val_shards=no_object,
                                                       num_frames=4))
    with pytest.raises(ValueError, match=r"'train-00000000'.*1 annotated frame.*--data.image_shards"):
        check_video_shards(VideoSegmentationDataConfig(train_shards=world.train_shards, num_frames=4))


def test_a_short_video_past_the_checked_ones_stops_training_with_the_same_message(tmp_path):
    samples = [_square_video(f"ok{i}", 4) for i in range(video_segmentation.PREFLIGHT_SAMPLES)]
    shard = _write(tmp_path, "train", [*samples, _square_video("late", 2)])
    cfg = VideoSegmentationDataConfig(train_shards=shard, image_size=16, batch_size=1, num_workers=0, num_frames=4,
                                      shuffle_buffer=0, batches_per_epoch=5)
    check_video_shards(cfg)  # reads only the first samples
    dm = VideoSegmentationDataModule(cfg)
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"'late'.*has 2 annotated frame\(s\).*--data.num_frames 4"):
        list(dm.train_dataloader())


# ---------------------------------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize("mixed", [False, True])
def test_training_stream_resumes_where_it_stopped(world, mixed):
    def module():
        cfg = VideoSegmentationDataConfig(train_shards=world.video_shards, image_size=16, batch_size=2,
                                          num_workers=0, num_frames=3, batches_per_epoch=5, shuffle_buffer=4,
                                          image_shards=world.train_shards if mixed else None)
        dm = VideoSegmentationDataModule(cfg, seed=3)
        dm.setup("fit")
        return dm

    first = module()
    full = list(first.train_dataloader())
    state = {**first.state_dict(), "batches_done": 2}
    resumed = module()
    resumed.load_state_dict(state)
    rest = list(resumed.train_dataloader())
    assert [b["key"] for b in rest] == [b["key"] for b in full[2:]]
    for again, uninterrupted in zip(rest, full[2:]):
        for key in ("frames", "frame_masks", "frame_valid"):
            assert torch.equal(again[key], uninterrupted[key]), key
    if mixed:
        assert {b["frames"].shape[1] for b in full} == {1, 3}


class _KeyRecorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.keys: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        assert batch["frames"].dtype == torch.float32  # normalised on the device
        self.keys.append(batch["key"])
        return (self.weight * batch["frames"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # the resumed fits save no checkpoints
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before")  # the datamodule resumes
def test_lightning_resumes_the_mixed_stream_mid_epoch_in_worker_processes(world, tmp_path):
    def fit(ckpt_path=None, checkpoints=False):
        cfg = VideoSegmentationDataConfig(train_shards=world.video_shards, image_shards=world.train_shards,
                                          image_size=16, batch_size=2, num_workers=1, num_frames=2,
                                          batches_per_epoch=3, shuffle_buffer=4)
        callbacks = [DataPosition()]
        if checkpoints:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1,
                                             filename="{step}"))
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=5, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
                            enable_checkpointing=checkpoints, default_root_dir=tmp_path)
        model = _KeyRecorder()
        trainer.fit(model, datamodule=VideoSegmentationDataModule(cfg, seed=5), ckpt_path=ckpt_path)
        return model.keys

    uninterrupted = fit(checkpoints=True)  # epoch 0 (3 batches), then 2 of epoch 1
    assert len(uninterrupted) == 5
    kinds = {key.split("-")[0] for keys in uninterrupted for key in keys}
    assert kinds == {"video", "train"}  # batches of both streams, each from its own worker
    for step in (2, 4):  # mid epoch 0, mid epoch 1
        assert fit(ckpt_path=str(tmp_path / "ckpt" / f"step={step}.ckpt")) == uninterrupted[step:], step
