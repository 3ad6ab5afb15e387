"""decode="device": batches equal in form and close in pixels to the host path's, the crop draw's distribution, flips,
exact resume, host fallback for non-JPEGs, corrupt JPEGs replaced and counted, the clear errors, and the GPU path."""

import io
import math
import pickle

import numpy as np
import pytest
import torch
import webdataset as wds
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image
from scipy import stats
from torch.utils.data._utils.pin_memory import pin_memory

from datamodules import IMAGENET_MEAN, IMAGENET_STD
from datamodules.device_decode import (
    DeviceDecodeError, DeviceDecodeTransform, EncodedImage, PendingImage, decode_batch, draw_geometry, read_header,
)
from datamodules.sharded import CorruptDataError, DataConfig, ShardedDataModule
from datamodules.streams import FiniteShardStream, ResampledShardStream, ShardLoader, collate
from datamodules.transforms import (
    RandomResizedCropFlip, ResizeCenterCrop, eval_transform, finetune_train_transform, linear_probe_train_transform,
    mae_train_transform,
)

SIZE = 16  # output side; sources are 48 x 40 (not square, not a multiple of it)
PER_SHARD = 8


def _pixels(seed: int, width: int = 48, height: int = 40) -> np.ndarray:
    """A horizontal ramp plus noise: smooth enough that JPEG keeps it, varied enough to tell crops apart."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
    return np.clip(ramp + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)


def _encode(pixels: np.ndarray, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _write(pattern: str, samples: list[dict]) -> None:
    with wds.ShardWriter(pattern, maxcount=PER_SHARD, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """2 shards of 8 labelled JPEGs; a shard mixing JPEG, PNG and CMYK JPEG; a shard with a broken header."""
    root = tmp_path_factory.mktemp("device_decode")
    _write(str(root / "train-%06d.tar"), [
        {"__key__": f"s{i:04d}", "jpg": _encode(_pixels(i)), "cls": i % 5} for i in range(2 * PER_SHARD)
    ])
    mixed = [{"__key__": f"m{i:04d}", "jpg": _encode(_pixels(50 + i)), "cls": i} for i in range(PER_SHARD)]
    mixed[1]["jpg"] = _encode(_pixels(51), "PNG")
    mixed[4]["jpg"] = _encode(_pixels(54), "JPEG", "CMYK")
    _write(str(root / "mixed-%06d.tar"), mixed)
    bad = [{"__key__": f"b{i:04d}", "jpg": _encode(_pixels(80 + i)), "cls": i} for i in range(PER_SHARD)]
    bad[2]["jpg"] = b"\xff\xd8 definitely not a jpeg"
    _write(str(root / "bad-%06d.tar"), bad)
    return {"spec": str(root / "train-{000000..000001}.tar"),
            "train": [str(root / f"train-{i:06d}.tar") for i in (0, 1)],
            "mixed": str(root / "mixed-000000.tar"), "bad": str(root / "bad-000000.tar")}


def _module(decode: str, train_shards: str, val_shards: str | None = None, train=None, **overrides):
    cfg = dict(train_shards=train_shards, val_shards=val_shards, batch_size=4, num_workers=0, image_size=SIZE,
               shuffle_buffer=0, batches_per_epoch=2, decode=decode)
    cfg.update(overrides)
    return ShardedDataModule(DataConfig(**cfg), train or mae_train_transform(SIZE), eval_transform(SIZE), seed=3)


def _batches(dm, which: str = "train") -> list[dict]:
    dm.setup("fit")
    loader = dm.train_dataloader() if which == "train" else dm.val_dataloader()
    return [dm.on_after_batch_transfer(batch, 0) for batch in loader]


def _levels(image: torch.Tensor) -> torch.Tensor:
    """Normalised float images back to 0..255 levels."""
    mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(-1, 1, 1)
    return (image * std + mean) * 255


def _jpeg_sample(key: str, pixels: np.ndarray, **fields) -> dict:
    return {"__key__": key, "jpg": read_header(".jpg", _encode(pixels)), **fields}


# ---------------------------------------------------------------------------------------------------
# The batch the trainer sees


@pytest.mark.parametrize("which", ["train", "val"])
def test_device_batches_match_the_host_batches(data, which):
    """Same keys, dtypes, shapes, labels and sample order; pixels within a level or two. Both sides decode with
    libjpeg-turbo and resample with the antialiased bicubic filter (a = -0.5, PIL's; torch's antialias path uses the
    same kernel), PIL in 8-bit fixed point, torch in float then rounded: so differences are rounding, ~1 level.
    The train crop boxes are equal because the device path draws them as the host transform does (same order)."""
    host = _batches(_module("host", data["spec"], data["spec"]), which)
    device = _batches(_module("device", data["spec"], data["spec"]), which)
    assert len(host) == len(device) == 2 * (which == "train") + 4 * (which == "val")
    for h, d in zip(host, device):
        assert list(h) == list(d) == ["image", "key", "label"]
        assert d["image"].dtype == h["image"].dtype == torch.float32
        assert d["image"].shape == h["image"].shape == (4, 3, SIZE, SIZE)
        assert d["key"] == h["key"] and torch.equal(d["label"], h["label"])
        difference = (_levels(d["image"]) - _levels(h["image"])).abs()
        assert difference.mean() < 1.0 and difference.max() < 8.0


def test_linear_probe_transform_runs_on_the_device_and_finetune_without_randaugment_too(data):
    for transform in (linear_probe_train_transform(SIZE), finetune_train_transform(SIZE, rand_augment_config="")):
        (first, *_) = _batches(_module("device", data["spec"], train=transform))
        assert first["image"].shape == (4, 3, SIZE, SIZE) and first["image"].dtype == torch.float32


def test_pending_images_pass_pinning_and_lightning_transfer_untouched():
    """Both walk tuples, dataclasses and bytes element by element (a 100 kB JPEG: ~1 s); PendingImage must be
    left whole, and so read without any device copy."""
    pending = PendingImage(bytes(100_000), None, (40, 48), (0, 0, 40, 48), 0, SIZE, False)
    batch = {"image": [pending, pending], "label": torch.tensor([1, 2]), "key": ["a", "b"]}
    moved = move_data_to_device(batch, "cpu")
    assert moved["image"][0] is pending and moved["image"][1] is pending
    assert pin_memory([pending])[0] is pending
    clone = pickle.loads(pickle.dumps(pending))  # crosses from the worker process
    assert (clone.jpeg, clone.source_size, clone.crop, clone.size) == (pending.jpeg, (40, 48), (0, 0, 40, 48), SIZE)


# ---------------------------------------------------------------------------------------------------
# The worker side: header, crop draw, flip


def test_header_only_read_gives_the_size_without_the_pixels():
    data = _encode(_pixels(0, width=64, height=48))
    truncated = data[: len(data) * 3 // 4]  # the header is whole, the scan is not: loading would fail
    value = read_header(".jpg", truncated)
    assert isinstance(value, EncodedImage) and value.data is truncated and value.header.size == (64, 48)
    out = DeviceDecodeTransform(RandomResizedCropFlip(SIZE, (0.2, 1.0)))({"__key__": "k", "jpg": value})
    assert out["image"].jpeg is truncated and out["image"].source_size == (48, 64) and "label" not in out


def _draws(geometry, size: tuple[int, int], count: int, seed: int = 0):
    header = Image.open(io.BytesIO(_encode(np.zeros((size[1], size[0], 3), np.uint8))))
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        return [draw_geometry(geometry, header) for _ in range(count)]
    finally:
        torch.set_rng_state(generator_state)


def test_crop_boxes_lie_inside_with_scale_and_ratio_in_range():
    width, height = 1000, 800
    for (top, left, h, w), _ in _draws(RandomResizedCropFlip(SIZE, (0.2, 1.0)), (width, height), 500):
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        # w, h are rounded to whole pixels (h >= ~300 here): area and ratio hold within 1%
        assert 0.2 * 0.99 <= w * h / (width * height) <= 1.0
        assert 3 / 4 * 0.99 <= w / h <= 4 / 3 * 1.01


def test_crop_draw_is_uniform_in_scale_and_log_ratio_and_flips_half():
    """With scale (0.2, 0.5) on 1000 x 800 every first try fits (the widest crop is sqrt(0.5 * 800000 * 4/3) = 730
    px), so the accepted area fraction is uniform on [0.2, 0.5] and log(w/h) uniform on [log 3/4, log 4/3]."""
    draws = _draws(RandomResizedCropFlip(SIZE, (0.2, 0.5)), (1000, 800), 1500, seed=1)
    fractions = [w * h / 800_000 for (_, _, h, w), _ in draws]
    log_ratios = [math.log(w / h) for (_, _, h, w), _ in draws]
    assert stats.kstest(fractions, stats.uniform(0.2, 0.3).cdf).pvalue > 1e-3
    low = math.log(3 / 4)
    assert stats.kstest(log_ratios, stats.uniform(low, -2 * low).cdf).pvalue > 1e-3
    flips = sum(flip for _, flip in draws) / len(draws)
    assert abs(flips - 0.5) < 0.05  # 1500 fair coins: standard deviation 0.013


def test_crop_draw_falls_back_to_a_centre_crop_for_extreme_aspect_ratios():
    # 1000 x 50: a crop of >= 20% of the area is >= 10000 px, so its height at ratio <= 4/3 is >= sqrt(10000 * 3/4)
    # = 87 > 50 and every try fails. Fallback: full height 50, width round(50 * 4/3) = 67, centred: left (1000-67)//2.
    for box, _ in _draws(RandomResizedCropFlip(SIZE, (0.2, 1.0)), (1000, 50), 5):
        assert box == (0, 466, 50, 67)
    assert _draws(ResizeCenterCrop(SIZE, 18), (1000, 50), 1) == [(None, False)]


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_flip_really_flips(flip_p):
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, 32:] = 255  # dark left half, bright right half
    # scale 1 and ratio 2 = 64/32: the crop is the whole image (w = sqrt(2048 * 2) = 64, h = 32)
    transform = DeviceDecodeTransform(RandomResizedCropFlip(SIZE, (1.0, 1.0), (2.0, 2.0), flip_p=flip_p))
    sample = transform(_jpeg_sample("k", pixels))
    assert sample["image"].crop == (0, 0, 32, 64) and sample["image"].flip is bool(flip_p)
    batch = collate([sample])
    decode_batch(batch, "cpu")
    image = batch["image"][0].float()
    left, right = image[:, :, :4].mean(), image[:, :, -4:].mean()
    assert (left > 200 and right < 55) if flip_p else (left < 55 and right > 200)


# ---------------------------------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skipping_batches_continues_the_uninterrupted_stream(data, num_workers):
    """As on the host path (test_sharded.py): crops depend on the sample's place in the stream only."""
    def stream(skip):
        s = ResampledShardStream(data["train"], DeviceDecodeTransform(RandomResizedCropFlip(SIZE, (0.2, 1.0))), 2, 5,
                                 seed=3, shuffle_buffer=8, header_only_keys=("jpg",))
        s.skip_batches = skip
        batches = list(ShardLoader(s, num_workers))
        for batch in batches:
            decode_batch(batch, "cpu")
        return batches

    full = stream(0)
    assert len(full) == 5
    for skip in (1, 3):
        rest = stream(skip)
        assert [b["key"] for b in rest] == [b["key"] for b in full[skip:]], skip
        for resumed, uninterrupted in zip(rest, full[skip:]):
            assert torch.equal(resumed["image"], uninterrupted["image"])


# ---------------------------------------------------------------------------------------------------
# Images nvJPEG is not given, broken images, and errors


def test_png_and_cmyk_are_decoded_on_the_host_exactly_as_the_host_path(data):
    host = _batches(_module("host", data["mixed"]))
    device = _batches(_module("device", data["mixed"]))
    assert [b["key"] for b in host] == [b["key"] for b in device]
    for h, d in zip(host, device):
        for row, key in enumerate(h["key"]):
            if key in ("m0001", "m0004"):  # PNG and CMYK JPEG: PIL on both paths, same crop: same pixels
                assert torch.equal(h["image"][row], d["image"][row]), key
    pixels = read_header(".jpg", _encode(_pixels(1), "PNG"))
    assert isinstance(pixels, Image.Image) and pixels.mode == "RGB"


def test_broken_header_is_a_corrupt_sample_counted_by_the_reader(data):
    stream = FiniteShardStream([data["bad"]], DeviceDecodeTransform(ResizeCenterCrop(SIZE, 18)), 4,
                               header_only_keys=("jpg",))
    keys = [key for batch in stream for key in batch["key"]]
    assert "b0002" not in keys and len(keys) == PER_SHARD - 1
    shard_stats = stream.reader.stats[data["bad"]]
    assert (shard_stats.seen, shard_stats.corrupt) == (PER_SHARD, 1) and "b0002" in shard_stats.last_error


def _batch_with_truncated(position: int, labels=(10, 11, 12, 13)) -> dict:
    transform = DeviceDecodeTransform(ResizeCenterCrop(SIZE, 18))
    samples = [_jpeg_sample(f"k{i}", _pixels(i), cls=label) for i, label in enumerate(labels)]
    whole = samples[position]["jpg"].data
    samples[position]["jpg"] = read_header(".jpg", whole[: len(whole) * 3 // 4])  # header fine, pixels cut
    return collate([transform(sample) for sample in samples])


@pytest.mark.parametrize("position, source", [(1, 2), (3, 0)])
def test_undecodable_jpeg_is_replaced_by_another_sample_counted_and_warned(position, source):
    dm = _module("device", "unused.tar")
    batch = _batch_with_truncated(position)
    with pytest.warns(UserWarning, match=f"k{position}"):
        out = dm.on_after_batch_transfer(batch, 0)
    assert dm.device_decode_failures == 1 and dm.device_decoded == 4
    assert torch.equal(out["image"][position], out["image"][source])  # the whole sample is replaced:
    assert out["label"][position] == out["label"][source] == 10 + source  # image and label stay paired
    assert out["key"][position] == f"k{source}"
    others = [row for row in range(4) if row != position]
    assert out["key"][:position] + out["key"][position + 1:] == [f"k{row}" for row in others]


def test_too_many_undecodable_jpegs_stop_the_run():
    dm = _module("device", "unused.tar", max_corrupt_fraction=0.2, min_samples_for_corrupt_check=4)
    with pytest.warns(UserWarning), pytest.raises(CorruptDataError, match="1 of 4 images"):
        dm.on_after_batch_transfer(_batch_with_truncated(0), 0)  # 1 > 0.2 x 4


def test_a_batch_with_no_decodable_image_fails_clearly():
    batch = _batch_with_truncated(0, labels=(1,))
    with pytest.raises(DeviceDecodeError, match="None of the 1 images"):
        decode_batch(batch, "cpu")


def test_transforms_without_geometry_fail_when_built_and_at_setup(data):
    with pytest.raises(ValueError, match="RandAugment needs PIL images: use --data.decode host"):
        _module("device", data["spec"], train=finetune_train_transform(SIZE))  # before any Trainer exists
    dm = _module("device", data["spec"], data["spec"], train=mae_train_transform(SIZE))
    dm.val_transform = lambda sample: sample
    with pytest.raises(ValueError, match="val_transform"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="--data.decode"):
        DataConfig(decode="gpu")


# ---------------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.gpu
def test_cuda_decode_matches_the_cpu_decode(data):
    """nvJPEG and libjpeg-turbo may round IDCT and chroma upsampling differently: a level or two, not more."""
    def decoded(device):
        dm = _module("device", data["spec"], data["spec"])
        dm.decode_device = torch.device(device)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        return dm.on_after_batch_transfer(dm.transfer_batch_to_device(batch, torch.device(device), 0), 0)

    cpu, cuda = decoded("cpu"), decoded("cuda")
    assert cuda["image"].is_cuda and cuda["label"].is_cuda and cuda["key"] == cpu["key"]
    assert cuda["image"].dtype == torch.float32 and cuda["image"].shape == cpu["image"].shape
    difference = (_levels(cuda["image"].cpu()) - _levels(cpu["image"])).abs()
    assert difference.mean() < 2.0 and difference.max() < 24.0
