"""benchmarks/loader.py: rows complete and self-consistent (rates = images / seconds, ratio = datamodule / raw),
exact image counts, worker counts 0 and 1, warm-up excluded from the clock, and the table. No timing assertions."""

import io
import math
import types

import numpy as np
import pytest
import torch
from PIL import Image

import benchmarks.loader as lb
from benchmarks.loader import datamodule_rate, format_loader_table, loader_benchmark, raw_decode_rate
from datamodules.shard_writer import ShardWriter
from datamodules.sharded import DataConfig
from datamodules.shards import expand_shards
from datamodules.transforms import mae_train_transform

BATCH = 4
BATCHES = 3
ROW_KEYS = {"workers", "datamodule_images_per_sec", "raw_decode_images_per_sec", "ratio", "datamodule_images",
            "datamodule_seconds", "raw_decode_images", "raw_decode_seconds", "decode"}


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _shards(root, prefix: str, samples: list[dict]) -> str:
    with ShardWriter(str(root), prefix, max_count=8) as writer:
        for sample in samples:
            writer.write(sample)
    return str(root / f"{prefix}-*.tar")


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    """4 shards of 8 labelled 16 x 16 JPEGs."""
    return _shards(tmp_path_factory.mktemp("bench"), "train",
                   [{"__key__": f"s{i:04d}", "jpg": _jpeg(i), "cls": str(i % 3).encode()} for i in range(32)])


@pytest.fixture(scope="module")
def rows(spec):
    cfg = DataConfig(train_shards=spec, batch_size=BATCH, image_size=8, shuffle_buffer=8, num_workers=5)
    out = loader_benchmark(cfg, mae_train_transform(8), [0, 1], BATCHES)
    assert cfg.num_workers == 5 and cfg.batches_per_epoch is None  # the caller's config is left as it was
    return out


def test_rows_are_complete_and_consistent(rows):
    assert [row["workers"] for row in rows] == [0, 1]
    for row in rows:
        assert set(row) == ROW_KEYS and row["decode"] == "host"
        assert row["datamodule_images"] == BATCHES * BATCH
        assert row["raw_decode_images"] == BATCHES * BATCH
        for side in ("datamodule", "raw_decode"):
            assert row[f"{side}_seconds"] > 0
            assert row[f"{side}_images_per_sec"] == pytest.approx(row[f"{side}_images"] / row[f"{side}_seconds"])
        assert row["ratio"] == pytest.approx(row["datamodule_images_per_sec"] / row["raw_decode_images_per_sec"])


def test_table_has_the_how_line_and_one_line_per_row(rows):
    how = "2 cores, batch 4, 8 px, tiny shards"
    lines = format_loader_table(rows, how).splitlines()
    assert lines[0] == how
    assert len(lines) == 2 + len(rows)  # how, header, rows
    assert "ratio" in lines[1]
    for line, row in zip(lines[2:], rows):
        cells = line.split()
        assert cells[0] == str(row["workers"])
        assert float(cells[3]) == pytest.approx(row["ratio"], abs=5e-4)
        assert cells[-1] == row["decode"]
    with pytest.raises(ValueError, match="one line"):
        format_loader_table(rows, "two\nlines")


def test_datamodule_rate_counts_whole_batches(spec):
    out = datamodule_rate(DataConfig(train_shards=spec, batch_size=3, image_size=8, shuffle_buffer=0),
                          mae_train_transform(8), num_workers=0, batches=5, warmup_batches=0)
    assert (out["workers"], out["images"]) == (0, 15)
    assert out["images_per_sec"] == pytest.approx(15 / out["seconds"])


def test_raw_decode_counts_exactly_and_skips_undecodable(tmp_path):
    # Every third sample is not a JPEG: skipped, not counted. 10 images in chunks of 4 = 4 + 4 + 2.
    samples = [{"__key__": f"m{i:04d}", "jpg": b"not a jpeg" if i % 3 == 0 else _jpeg(i)} for i in range(16)]
    shards = expand_shards(_shards(tmp_path, "mixed", samples))
    out = raw_decode_rate(shards, 0, images=10, warmup_images=3, chunk=4)
    assert (out["workers"], out["images"]) == (0, 10)
    assert out["images_per_sec"] == pytest.approx(10 / out["seconds"])


def test_raw_decode_with_more_workers_than_shards(spec):
    one_shard = expand_shards(spec)[:1]
    out = raw_decode_rate(one_shard, 2, images=9, warmup_images=0, chunk=4)
    assert (out["workers"], out["images"]) == (2, 9)


def test_raw_decode_fails_clearly_without_jpegs(tmp_path):
    shards = expand_shards(_shards(tmp_path, "text", [{"__key__": f"t{i:04d}", "txt": b"hello"} for i in range(8)]))
    with pytest.raises(ValueError, match="'jpg'"):
        raw_decode_rate(shards, 0, images=4)


def test_warmup_is_excluded_from_the_clock(monkeypatch):
    # A fake clock: the first item (worker start-up) arrives at t = 10, the next ones 1 apart.
    arrivals = iter([0.0, 10.0, 11.0, 12.0])  # the first read is the request for the first item
    monkeypatch.setattr(lb, "time", types.SimpleNamespace(perf_counter=lambda: next(arrivals)))
    assert lb._timed(iter([5, 6, 7]), warmup=1, count=int) == (13, 2.0)
    arrivals = iter([0.0, 10.0, 11.0])
    assert lb._timed(iter([5, 6]), warmup=0, count=int) == (11, 11.0)


def test_device_decode_rows_measure_the_device_path(spec):
    """decode="device" on the CPU: the datamodule side decodes in on_after_batch_transfer; rows as for the host."""
    cfg = DataConfig(train_shards=spec, batch_size=BATCH, image_size=8, shuffle_buffer=8, decode="device")
    (row,) = loader_benchmark(cfg, mae_train_transform(8), [0], BATCHES, device="cpu")
    assert set(row) == ROW_KEYS and row["decode"] == "device"
    assert row["datamodule_images"] == row["raw_decode_images"] == BATCHES * BATCH
    for side in ("datamodule", "raw_decode"):
        assert math.isfinite(row[f"{side}_images_per_sec"]) and row[f"{side}_images_per_sec"] > 0
    assert row["ratio"] == pytest.approx(row["datamodule_images_per_sec"] / row["raw_decode_images_per_sec"])
    assert format_loader_table([row], "how").splitlines()[2].split()[-1] == "device"


def test_device_batches_reach_the_timed_window_normalised(spec, monkeypatch):
    seen = []
    timed = lb._timed
    monkeypatch.setattr(lb, "_timed", lambda items, *args: timed((seen.append(b) or b for b in items), *args))
    cfg = DataConfig(train_shards=spec, batch_size=BATCH, image_size=8, shuffle_buffer=0, decode="device")
    datamodule_rate(cfg, mae_train_transform(8), num_workers=0, batches=2, warmup_batches=1, device="cpu")
    assert len(seen) == 3
    assert all(b["image"].dtype == torch.float32 and b["image"].shape == (BATCH, 3, 8, 8) for b in seen)


def test_the_device_sync_closes_the_timed_window(monkeypatch):
    # Clock reads: the first request (0), the warm-up item after its sync (10), and the end after the final sync
    # (13): items after the warm-up read no clock, so no per-batch sync is needed.
    arrivals = iter([0.0, 10.0, 13.0])
    monkeypatch.setattr(lb, "time", types.SimpleNamespace(perf_counter=lambda: next(arrivals)))
    syncs = []
    assert lb._timed(iter([5, 6, 7]), warmup=1, count=int, finish=lambda: syncs.append(1)) == (13, 3.0)
    assert len(syncs) == 2  # after the warm-up item, and once at the end


@pytest.mark.parametrize("call, message", [
    (lambda: raw_decode_rate([], 0, images=4), "no shards"),
    (lambda: raw_decode_rate(["x.tar"], -1, images=4), "num_workers"),
    (lambda: raw_decode_rate(["x.tar"], 0, images=0), "images"),
    (lambda: loader_benchmark(DataConfig(train_shards="x.tar"), None, [], 1), "worker_counts is empty"),
    (lambda: loader_benchmark(DataConfig(train_shards="x.tar"), None, [0, -2], 1), "worker_counts"),
    (lambda: datamodule_rate(DataConfig(train_shards="x.tar"), None, 0, batches=0), "batches"),
])
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
