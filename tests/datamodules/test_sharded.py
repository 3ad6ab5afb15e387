"""The sharded datamodule: exact epoch lengths, rank partitioning, seeded order, corrupt-sample handling,
finite validation, device-side normalisation, and a real Lightning fit (epochs, determinism, resume)."""

import io
import json
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import types
from collections import Counter
from pathlib import Path

import fsspec
import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from datamodules.sharded import DataConfig, ShardedDataModule
from datamodules.shard_writer import ShardWriter
from datamodules.streams import (CorruptDataError, FiniteShardStream, ResampledShardStream, ShardLoader, ShardPiece,
                                 finite_split, worker_share)
from datamodules.shards import ShardSpecError
from datamodules.transforms import eval_transform, mae_train_transform
from trainers.callbacks import DataPosition  # the trainer side of the data position: how these fits get it

SIZE = 8  # output side; the JPEGs are 16 x 16
PER_SHARD = 8
NUM_SHARDS = 4
ALL_KEYS = [f"s{i:04d}" for i in range(NUM_SHARDS * PER_SHARD)]


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write(pattern: str, samples: list[dict]) -> None:
    with wds.ShardWriter(pattern, maxcount=PER_SHARD, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4 clean shards of 8 samples (shard k holds s{8k}..s{8k+7}), one shard with 2 corrupt samples
    (a bad JPEG at position 2, a sample without "jpg" at position 5), and one file that is not a tar."""
    root = tmp_path_factory.mktemp("shards")
    _write(str(root / "train-%06d.tar"), [
        {"__key__": key, "jpg": _jpeg(i), "cls": i % 5} for i, key in enumerate(ALL_KEYS)
    ])
    bad = [{"__key__": f"b{i:04d}", "jpg": _jpeg(100 + i), "cls": 1} for i in range(PER_SHARD)]
    bad[2]["jpg"] = b"\xff\xd8 definitely not a jpeg"
    del bad[5]["jpg"]
    _write(str(root / "bad-%06d.tar"), bad)
    (root / "junk-000000.tar").write_bytes(b"this is not a tar file" * 40)
    return {
        "root": root,
        "train": [str(root / f"train-{i:06d}.tar") for i in range(NUM_SHARDS)],
        "spec": str(root / "train-{000000..000003}.tar"),
        "bad": str(root / "bad-000000.tar"),
        "junk": str(root / "junk-000000.tar"),
    }


def _keys_of_shards(*shard_ids: int) -> set[str]:
    return {ALL_KEYS[k * PER_SHARD + j] for k in shard_ids for j in range(PER_SHARD)}


def _module(data, seed=0, **overrides) -> ShardedDataModule:
    cfg = dict(train_shards=data["spec"], batch_size=4, num_workers=0, image_size=SIZE, shuffle_buffer=16)
    cfg.update(overrides)
    return ShardedDataModule(DataConfig(**cfg), mae_train_transform(SIZE), eval_transform(SIZE), seed=seed)


def _keys(batches) -> list[str]:
    return [k for batch in batches for k in batch["key"]]


# ---------------------------------------------------------------------------------------------------
# Training stream


@pytest.mark.parametrize("num_workers, batches", [(0, 5), (1, 5), (2, 5), (2, 1)])
def test_exact_batches_per_epoch(data, num_workers, batches):
    dm = _module(data, num_workers=num_workers, batches_per_epoch=batches)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == batches
    for _epoch in range(2):
        got = list(loader)
        assert len(got) == batches
        for batch in got:
            assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 3, SIZE, SIZE)
            assert batch["label"].dtype == torch.int64 and batch["label"].shape == (4,)
            assert len(batch["key"]) == 4 and all(k in ALL_KEYS for k in batch["key"])
            # labels travel with their sample: s{i} has cls i % 5
            assert batch["label"].tolist() == [int(k[1:]) % 5 for k in batch["key"]]


def test_worker_shares_sum_to_the_total():
    assert [worker_share(5, w, 2) for w in range(2)] == [3, 2]
    assert [worker_share(1, w, 3) for w in range(3)] == [1, 0, 0]
    assert sum(worker_share(17, w, 4) for w in range(4)) == 17


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_read_disjoint_samples(data, num_workers):
    seen = []
    for rank in (0, 1):
        dm = _module(data, num_workers=num_workers, batches_per_epoch=6)
        dm.world_size, dm.rank = 2, rank
        dm.setup("fit")
        seen.append(set(_keys(dm.train_dataloader())))
    # shards split by rank: rank 0 reads shards 0 and 2, rank 1 reads shards 1 and 3
    assert seen[0] <= _keys_of_shards(0, 2)
    assert seen[1] <= _keys_of_shards(1, 3)
    assert not seen[0] & seen[1]


def test_fewer_shards_than_readers_warns_and_shares_all(data):
    dm = _module(data, train_shards=data["train"][0], num_workers=2, batches_per_epoch=2)
    dm.world_size, dm.rank = 2, 1
    with pytest.warns(UserWarning, match="every reader samples from all shards"):
        dm.setup("fit")
    assert dm.train_stream.partition(worker=1, num_workers=2) == data["train"][:1]
    assert set(_keys(dm.train_dataloader())) <= _keys_of_shards(0)


def _epoch(stream, epoch):
    stream.set_epoch(epoch)
    batches = list(stream)
    return _keys(batches), torch.cat([b["image"] for b in batches])


def test_same_seed_same_batches_new_epoch_new_order(data):
    def stream(seed):
        return ResampledShardStream(data["train"], mae_train_transform(SIZE), 4, 6, seed=seed, shuffle_buffer=16)

    keys0, images0 = _epoch(stream(3), 0)
    keys0_again, images0_again = _epoch(stream(3), 0)
    assert keys0 == keys0_again and torch.equal(images0, images0_again)  # crops included
    keys1, _ = _epoch(stream(3), 1)
    assert keys1 != keys0
    other_seed, _ = _epoch(stream(4), 0)
    assert other_seed != keys0


def test_worker_processes_are_deterministic(data):
    dm = _module(data, num_workers=2, batches_per_epoch=4, seed=9)
    dm.setup("fit")
    first, second = list(dm.train_dataloader()), list(dm.train_dataloader())
    assert _keys(first) == _keys(second)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, second))


def test_stream_pickles_for_spawned_workers(data):
    stream = ResampledShardStream(data["train"], mae_train_transform(SIZE), 4, 2, seed=2)
    clone = pickle.loads(pickle.dumps(stream))
    assert _epoch(clone, 0)[0] == _epoch(stream, 0)[0]


def test_reads_fsspec_urls(data):
    fs = fsspec.filesystem("memory")
    with open(data["train"][2], "rb") as src, fs.open("/prism-test-shards/m-000000.tar", "wb") as dst:
        dst.write(src.read())
    try:
        stream = FiniteShardStream(["memory://prism-test-shards/m-000000.tar"], eval_transform(SIZE), 4)
        assert sorted(_keys(stream)) == sorted(_keys_of_shards(2))
    finally:
        fs.rm("/prism-test-shards", recursive=True)


def test_data_loading_leaves_the_global_torch_rng_alone(data):
    stream = ResampledShardStream(data["train"], mae_train_transform(SIZE), 4, 2)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    list(stream)
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------------------------------
# Corrupt data


def test_corrupt_samples_are_skipped_and_counted(data, caplog):
    stream = FiniteShardStream([data["bad"]], eval_transform(SIZE), 4)
    with caplog.at_level(logging.WARNING, logger="datamodules.streams"):
        batches = list(stream)
    assert [len(b["key"]) for b in batches] == [4, 2]  # 8 samples, 2 skipped
    assert set(_keys(batches)) == {f"b{i:04d}" for i in (0, 1, 3, 4, 6, 7)}
    stats = stream.reader.stats[data["bad"]]
    assert (stats.seen, stats.corrupt) == (8, 2)
    assert "b0005" in stats.last_error and "missing" in stats.last_error and "jpg" in stats.last_error
    assert data["bad"] in caplog.text and "b0002" in caplog.text  # first corrupt sample of the shard is logged


def test_unreadable_shard_is_counted_and_skipped(data):
    stream = FiniteShardStream([data["junk"], data["train"][1]], eval_transform(SIZE), 4)
    assert set(_keys(stream)) == _keys_of_shards(1)
    assert stream.reader.stats[data["junk"]].corrupt >= 1


def test_too_many_corrupt_samples_name_the_shard(data):
    # Unshuffled, so samples are checked in shard order. min 4 samples, max 10%: the 1st corrupt sample
    # (3rd read) is below the minimum; the 2nd is the bad shard's 6th sample -> "2 of 6" (33%).
    stream = ResampledShardStream(
        [data["train"][0], data["bad"]], mae_train_transform(SIZE), 4, 50, shuffle_buffer=0,
        min_samples_for_corrupt_check=4, max_corrupt_fraction=0.1,
    )
    with pytest.raises(CorruptDataError) as info:
        list(stream)
    message = str(info.value)
    assert data["bad"] in message and "2 of 6" in message and "max_corrupt_fraction" in message
    assert "b0005" in message  # the last error


def test_corrupt_error_reaches_the_main_process(data):
    dm = _module(data, train_shards=data["bad"], num_workers=1, batches_per_epoch=50,
                 min_samples_for_corrupt_check=4, max_corrupt_fraction=0.1)
    dm.setup("fit")
    with pytest.raises(CorruptDataError, match="bad-000000.tar"):
        list(dm.train_dataloader())


# ---------------------------------------------------------------------------------------------------
# Validation stream


def test_val_stream_yields_every_sample_once_across_two_workers(data):
    stream = FiniteShardStream(data["train"], eval_transform(SIZE), 5)
    batches = list(ShardLoader(stream, num_workers=2))
    assert sorted(_keys(batches)) == ALL_KEYS
    # each worker reads 2 shards = 16 samples -> batches of 5, 5, 5, 1 (partial last batch kept)
    assert sorted(len(b["key"]) for b in batches) == [1, 1, 5, 5, 5, 5, 5, 5]


def test_val_split_by_rank_then_worker(data):
    seen = []
    for rank in (0, 1):
        dm = _module(data, val_shards=data["spec"], num_workers=2)
        dm.world_size, dm.rank = 2, rank
        dm.setup("validate")
        seen.append(_keys(dm.val_dataloader()))
    assert sorted(seen[0]) == sorted(_keys_of_shards(0, 2))
    assert sorted(seen[1]) == sorted(_keys_of_shards(1, 3))


def test_val_batches_cap(data):
    dm = _module(data, val_shards=data["spec"], num_workers=2, val_batches=3)
    dm.setup("validate")
    loader = dm.val_dataloader()
    assert len(loader) == 3 and len(list(loader)) == 3


def test_one_val_shard_feeds_two_workers_every_sample_once(data):
    dm = _module(data, val_shards=data["train"][0], num_workers=2)
    dm.setup("validate")
    assert Counter(_keys(dm.val_dataloader())) == Counter(_keys_of_shards(0))


def test_one_val_shard_on_two_ranks_of_two_workers_in_process(data):
    seen = []
    for rank in (0, 1):
        dm = _module(data, val_shards=data["train"][3], num_workers=2, batch_size=3)
        dm.world_size, dm.rank = 2, rank
        dm.setup("validate")
        seen.append(_keys(dm.val_dataloader()))
    # shard 3 holds s0024..s0031; rank r keeps positions r, r + 2, ...
    assert sorted(seen[0]) == ["s0024", "s0026", "s0028", "s0030"]
    assert sorted(seen[1]) == ["s0025", "s0027", "s0029", "s0031"]


def test_finite_split_hand_worked():
    # 1 shard, 2 ranks x 2 workers: rank 1 keeps positions 1, 3, 5, ...; its two workers every other of those
    assert finite_split(["a"], 2, 1, 2, 0) == [ShardPiece("a", 4, 1)]  # 1, 5, 9, ...
    assert finite_split(["a"], 2, 1, 2, 1) == [ShardPiece("a", 4, 3)]  # 3, 7, 11, ...
    # 2 shards: one per rank, its samples split between the rank's workers
    assert finite_split(["a", "b"], 2, 1, 2, 1) == [ShardPiece("b", 2, 1)]
    # 3 shards, 4 readers: shard a is shared by readers 0 and 3, b and c are read whole
    assert [finite_split(list("abc"), 4, r) for r in range(4)] == [
        [ShardPiece("a", 2, 0)], [ShardPiece("b")], [ShardPiece("c")], [ShardPiece("a", 2, 1)]]
    # enough shards: whole shards, round robin by rank, then by worker
    assert finite_split(list("abcdefgh"), 2, 1, 2, 0) == [ShardPiece("b"), ShardPiece("f")]
    assert finite_split(list("abcdefgh"), 2, 1, 0, 0) == [ShardPiece(u) for u in "bdfh"]  # 0 workers: one reader


@pytest.mark.parametrize("counts, world, workers", [
    ([9], 2, 2), ([8, 5], 2, 2), ([3, 1, 4], 4, 1), ([8] * 4, 2, 2), ([7, 2], 3, 3), ([5] * 5, 2, 2),
    ([6, 6, 6], 2, 4), ([1], 1, 1), ([10], 8, 0)])
def test_finite_split_reads_every_sample_exactly_once(counts, world, workers):
    shards = [f"s{i}.tar" for i in range(len(counts))]
    every = Counter((url, position) for url, n in zip(shards, counts) for position in range(n))
    read = Counter()
    for rank in range(world):
        for worker in range(max(1, workers)):
            for piece in finite_split(shards, world, rank, workers, worker):
                n = counts[shards.index(piece.url)]
                read.update((piece.url, p) for p in range(n) if p % piece.stride == piece.offset)
    assert read == every


def _index_set(root: Path, prefix: str, sizes: list[int]) -> str:
    """A shard set written by the project's writer (with its index): shard i holds sizes[i] samples."""
    with ShardWriter(str(root), prefix, max_count=max(sizes), shard_sizes=sizes) as writer:
        for i in range(sum(sizes)):
            writer.write({"__key__": f"{prefix}{i:04d}", "jpg": _jpeg(i), "cls": str(i % 5).encode()})
    return str(root / f"{prefix}-*.tar")


def test_a_rank_without_a_validation_sample_is_refused_before_training(tmp_path):
    spec = _index_set(tmp_path, "tiny", [1])
    dm = _module({"spec": spec}, val_shards=spec, num_workers=2)
    dm.world_size, dm.rank = 2, 0
    with pytest.raises(ValueError, match=r"1 sample\(s\) in 1 shard\(s\).*rank\(s\) \[1\] of 2.*fewer ranks"):
        dm.setup("validate")
    dm.world_size = 1  # one rank: the single sample is enough
    dm.setup("validate")
    assert _keys(dm.val_dataloader()) == ["tiny0000"]


def test_a_rank_without_a_sample_fails_at_validation_when_there_is_no_index(tmp_path):
    spec = _index_set(tmp_path, "tiny", [1])
    (tmp_path / "tiny-index.json").unlink()
    dm = _module({"spec": spec}, val_shards=spec, num_workers=2)
    dm.world_size, dm.rank = 2, 1
    dm.setup("validate")  # without an index the sample count is unknown here
    with pytest.raises(RuntimeError, match="rank 1 of 2 no sample"):
        list(dm.val_dataloader())


def test_an_empty_validation_set_is_an_error(tmp_path):
    with tarfile.open(tmp_path / "empty-000000.tar", "w"):
        pass
    stream = FiniteShardStream([str(tmp_path / "empty-000000.tar")], eval_transform(SIZE), 4)
    with pytest.raises(RuntimeError, match="this process no sample.*empty-000000.tar"):
        list(ShardLoader(stream, num_workers=0))


# ---------------------------------------------------------------------------------------------------
# Setup checks and batches_per_epoch


def test_setup_requires_train_shards(data):
    dm = _module(data, train_shards=None, batches_per_epoch=2)
    with pytest.raises(ValueError, match="--data.train_shards"):
        dm.setup("fit")


def test_setup_rejects_a_spec_matching_nothing(data):
    dm = _module(data, train_shards=str(data["root"] / "nope-{000..003}.tar"), batches_per_epoch=2)
    with pytest.raises(ShardSpecError, match="nope-000.tar"):
        dm.setup("fit")


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="batch_size"):
        DataConfig(batch_size=0)
    with pytest.raises(ValueError, match="max_corrupt_fraction"):
        DataConfig(max_corrupt_fraction=1.5)


@pytest.fixture
def index_file(data):
    path = data["root"] / "train-index.json"
    path.write_text(json.dumps({"num_samples": 32, "shards": {f"train-{i:06d}.tar": 8 for i in range(4)}}))
    yield path
    path.unlink()


def _stub_read_index(shard_paths):
    """A stand-in for datamodules.shard_writer.read_index, reading the hand-written index."""
    import os

    index = os.path.join(os.path.dirname(shard_paths[0]), "train-index.json")
    if not os.path.exists(index):
        return None
    counts = json.load(open(index))["shards"]
    return sum(counts[os.path.basename(p)] for p in shard_paths)


def test_batches_per_epoch_from_the_index(data, index_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "datamodules.shard_writer", types.SimpleNamespace(read_index=_stub_read_index))
    dm = _module(data)
    dm.world_size, dm.rank = 2, 0
    dm.setup("fit")
    assert dm.batches_per_epoch == 4  # 32 samples // (batch 4 x 2 ranks)


def test_batches_per_epoch_without_an_index_asks_for_it(data, monkeypatch):
    monkeypatch.setitem(sys.modules, "datamodules.shard_writer", types.SimpleNamespace(read_index=_stub_read_index))
    with pytest.raises(ValueError, match="--data.batches_per_epoch"):
        _module(data).setup("fit")


def test_batches_per_epoch_with_the_real_index_reader(data, index_file):
    pytest.importorskip("datamodules.shard_writer")
    dm = _module(data)
    dm.world_size, dm.rank = 2, 0
    dm.setup("fit")
    assert dm.batches_per_epoch == 4


# ---------------------------------------------------------------------------------------------------
# Device side and checkpoint state


def test_on_after_batch_transfer_normalises_on_device(data):
    dm = ShardedDataModule(DataConfig(), mae_train_transform(SIZE), eval_transform(SIZE),
                           mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.125))
    image = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)
    image[1, :, 0, 1] = 255
    frames = torch.full((1, 2, 3, 1, 1), 255, dtype=torch.uint8)
    label = torch.tensor([3, 4])
    out = dm.on_after_batch_transfer({"image": image, "frames": frames, "label": label, "key": ["a", "b"]}, 0)
    assert out["image"].dtype == torch.float32 and out["frames"].dtype == torch.float32
    # 0 -> (0 - 0.5) / std = -1, -2, -4; 255 -> (1 - 0.5) / std = 1, 2, 4
    assert torch.allclose(out["image"][0, :, 0, 0], torch.tensor([-1.0, -2.0, -4.0]))
    assert torch.allclose(out["image"][1, :, 0, 1], torch.tensor([1.0, 2.0, 4.0]))
    assert torch.allclose(out["frames"][0, 1, :, 0, 0], torch.tensor([1.0, 2.0, 4.0]))
    assert out["label"] is label and out["key"] == ["a", "b"]


def test_state_dict_round_trip(data):
    dm = _module(data, batches_per_epoch=2, seed=5)
    dm.setup("fit")
    dm.train_dataloader().set_epoch(3)  # what Lightning calls, through `.sampler`
    state = dm.state_dict()
    assert (state["epoch"], state["seed"], state["batches_done"]) == (3, 5, 0)
    other = _module(data, batches_per_epoch=2, seed=5)
    other.setup("fit")
    other.load_state_dict({**state, "epoch": 7, "batches_done": 1})
    assert other.train_stream.epoch == 7 and other.train_stream.skip_batches == 1
    # the skip belongs to the first iteration of the resumed epoch only
    loader = other.train_dataloader()
    assert len(list(loader)) == 1 and other.train_stream.skip_batches == 0
    assert len(list(loader)) == 2


def test_position_comes_from_training_position_and_its_absence_during_training_warns(data):
    dm = _module(data, batches_per_epoch=5)
    dm.setup("fit")
    dm.train_dataloader().set_epoch(2)
    dm.training_position = lambda: (2, 3)
    assert (dm.state_dict()["epoch"], dm.state_dict()["batches_done"]) == (2, 3)
    dm.training_position = None
    dm.trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    dm.trainer.training = True  # a save inside fit, with nobody to say how far the epoch got
    with pytest.warns(UserWarning, match="training_position is not set.*DataPosition"):
        state = dm.state_dict()
    assert (state["epoch"], state["batches_done"]) == (2, 0)


def test_resume_with_another_layout_warns_and_restarts_the_epoch(data):
    dm = _module(data, batches_per_epoch=2)
    dm.setup("fit")
    state = {**dm.state_dict(), "batches_done": 1}
    state["layout"] = {**state["layout"], "world_size": 4}
    with pytest.warns(UserWarning, match="world_size 4 -> 1"):
        dm.load_state_dict(state)
    assert dm.train_stream.skip_batches == 0


@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
def test_skipping_batches_continues_the_uninterrupted_stream(data, num_workers):
    """After skipping S batches, a new loader yields exactly batches S.. of an uninterrupted one, in
    order and with the same pixels (each sample's crop depends on its place in the stream only)."""
    def stream(skip):
        s = ResampledShardStream(data["train"], mae_train_transform(SIZE), 2, 7, seed=3, shuffle_buffer=8)
        s.skip_batches = skip
        return list(ShardLoader(s, num_workers))

    full = stream(0)
    assert len(full) == 7
    for skip in (1, 2, 5, 7):
        rest = stream(skip)
        assert [b["key"] for b in rest] == [b["key"] for b in full[skip:]], skip
        for resumed, uninterrupted in zip(rest, full[skip:]):
            assert torch.equal(resumed["image"], uninterrupted["image"])


# ---------------------------------------------------------------------------------------------------
# A real Lightning fit


class _Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.train_keys: dict[int, list[str]] = {}
        self.val_samples = 0
        self.dtypes: set[torch.dtype] = set()

    def training_step(self, batch, batch_idx):
        self.train_keys.setdefault(self.current_epoch, []).extend(batch["key"])
        self.dtypes.add(batch["image"].dtype)
        return (self.weight * batch["image"].mean()).sum()

    def validation_step(self, batch, batch_idx):
        self.val_samples += len(batch["key"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(data, tmp_path, epochs, ckpt_path=None, callbacks=()):
    dm = _module(data, val_shards=data["spec"], num_workers=1, batches_per_epoch=3, seed=1)
    model = _Recorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, enable_checkpointing=bool(callbacks),
        callbacks=[DataPosition(), *callbacks], default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


def test_lightning_fit_epochs_determinism_and_resume(data, tmp_path):
    run = _fit(data, tmp_path, epochs=3)
    assert sorted(run.train_keys) == [0, 1, 2] and all(len(k) == 12 for k in run.train_keys.values())
    assert run.dtypes == {torch.float32}  # normalised by the datamodule's on_after_batch_transfer
    assert run.val_samples == 3 * len(ALL_KEYS)  # every validation sample once per epoch
    assert run.train_keys[0] != run.train_keys[1] != run.train_keys[2]

    # Lightning's set_epoch reached the worker: epoch 1 is the single reader's stream at epoch 1.
    reference = ResampledShardStream(data["train"], mae_train_transform(SIZE), 4, 3, seed=1, shuffle_buffer=16)
    assert _epoch(reference, 1)[0] == run.train_keys[1]

    assert _fit(data, tmp_path, epochs=3).train_keys == run.train_keys  # same seed, same stream

    # Stop after 2 epochs, resume to 3: the resumed epoch gets epoch 2's stream, not a replay of epoch 1.
    ckpt_dir = tmp_path / "ckpt"
    first = _fit(data, tmp_path, epochs=2, callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True)])
    assert first.train_keys == {e: run.train_keys[e] for e in (0, 1)}
    resumed = _fit(data, tmp_path, epochs=3, ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert resumed.train_keys == {2: run.train_keys[2]}


def test_lightning_mid_epoch_resume_reads_the_batches_an_uninterrupted_run_reads(data, tmp_path):
    def fit(steps, ckpt_path=None, every=None):
        dm = _module(data, num_workers=2, batches_per_epoch=5, seed=4)
        model = _Recorder()
        callbacks = [ModelCheckpoint(dirpath=tmp_path / "mid", every_n_train_steps=every, save_top_k=-1,
                                     filename="{step}")] if every else []
        callbacks.append(DataPosition())  # hands Lightning's loop position to the datamodule
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
                            enable_checkpointing=bool(every), default_root_dir=tmp_path)
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return [k for epoch in sorted(model.train_keys) for k in model.train_keys[epoch]]

    uninterrupted = fit(8)  # epoch 0 (5 batches of 4), then 3 batches of epoch 1
    assert len(uninterrupted) == 32
    fit(8, every=1)  # a checkpoint after every step
    for step in (3, 5, 6):  # mid epoch 0, the last batch of epoch 0, mid epoch 1
        assert fit(8, ckpt_path=str(tmp_path / "mid" / f"step={step}.ckpt")) == uninterrupted[step * 4:], step


DDP_SCRIPT = r'''
"""Fit one epoch under 2-process DDP (gloo, CPU) per validation set; each rank writes what its val loader gave."""
import json
import sys

import lightning as L
import torch

from datamodules.sharded import DataConfig, ShardedDataModule
from datamodules.transforms import eval_transform, mae_train_transform


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        # DDP broadcasts buffers in the first forward after training steps: a collective every rank must join.
        self.register_buffer("calls", torch.zeros(1))
        self.val_keys, self.val_batches = [], 0

    def forward(self, images):
        self.calls += 1
        return self.weight * images.mean()

    def training_step(self, batch, batch_idx):
        return self(batch["image"]).sum()

    def validation_step(self, batch, batch_idx):
        self.val_keys.extend(batch["key"])
        self.val_batches += 1
        n = len(batch["key"])
        # Reduced over the ranks at the end of validation, as the trainers' val/loss is.
        self.log("val/loss", self(batch["image"]).sum(), sync_dist=True, batch_size=n)
        self.log("val/samples", float(n), reduce_fx="sum", sync_dist=True, batch_size=n)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    out, train, configs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    for name, val in configs.items():
        cfg = DataConfig(train_shards=train, val_shards=val, batch_size=2, num_workers=2, image_size=8,
                         batches_per_epoch=2, shuffle_buffer=0)
        dm = ShardedDataModule(cfg, mae_train_transform(8), eval_transform(8))
        model = Recorder()
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, num_sanity_val_steps=0,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=out)
        trainer.fit(model, datamodule=dm)
        report = {"keys": model.val_keys, "batches": model.val_batches,
                  "samples_logged": trainer.callback_metrics["val/samples"].item()}
        with open(f"{out}/{name}-rank{trainer.global_rank}.json", "w") as f:
            json.dump(report, f)
'''


@pytest.fixture(scope="module")
def ddp_validation(data, tmp_path_factory):
    """Each rank's validation keys from real 2-rank x 2-worker DDP fits: one val shard of 9 samples, and two
    val shards of 8 and 5 samples."""
    root = tmp_path_factory.mktemp("ddp_val")
    sets = {"one": _index_set(root, "one", [9]), "two": _index_set(root, "two", [8, 5])}
    (root / "fit.py").write_text(DDP_SCRIPT)
    root_dir = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root_dir, os.environ.get("PYTHONPATH", "")]),
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(root / "fit.py"), str(root), data["spec"], json.dumps(sets)],
                          cwd=root_dir, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {name: {rank: json.loads((root / f"{name}-rank{rank}.json").read_text()) for rank in (0, 1)}
            for name in sets}


def test_ddp_one_val_shard_on_two_ranks_of_two_workers_evaluates_every_sample_once(ddp_validation):
    ranks = ddp_validation["one"]
    everything = Counter(f"one{i:04d}" for i in range(9))
    assert Counter(ranks[0]["keys"] + ranks[1]["keys"]) == everything
    # rank r keeps positions r, r + 2, ...; each of its workers every other one of those
    assert sorted(ranks[0]["keys"]) == [f"one{i:04d}" for i in (0, 2, 4, 6, 8)]
    # positions 0, 4, 8 -> batches of 2 + 1, positions 2, 6 -> one batch: 3 batches on rank 0; rank 1 reads
    # 1, 5 and 3, 7: 2 batches. Uneven batch counts do not stall the epoch-end reductions.
    assert (ranks[0]["batches"], ranks[1]["batches"]) == (3, 2)
    assert ranks[0]["samples_logged"] == ranks[1]["samples_logged"] == 9


def test_ddp_two_val_shards_on_two_ranks_of_two_workers_evaluate_every_sample_once(ddp_validation):
    ranks = ddp_validation["two"]
    assert Counter(ranks[0]["keys"] + ranks[1]["keys"]) == Counter(f"two{i:04d}" for i in range(13))
    # one shard per rank (8 and 5 samples), its samples split between the rank's two workers
    assert sorted(ranks[0]["keys"]) == [f"two{i:04d}" for i in range(8)]
    assert (ranks[0]["batches"], ranks[1]["batches"]) == (4, 3)  # 4 + 4 samples; 3 + 2 samples, batches of 2
    assert ranks[0]["samples_logged"] == ranks[1]["samples_logged"] == 13


def test_lightning_fit_without_val_shards(data, tmp_path):
    dm = _module(data, num_workers=0, batches_per_epoch=2)
    model = _Recorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert len(model.train_keys[0]) == 8 and model.val_samples == 0


def test_loader_workers_survive_the_sigusr1_slurm_sends_to_every_process(data):
    """SLURM sends SIGUSR1 to all processes of a job step; a worker killed by it would crash training."""
    import os
    import signal

    stream = ResampledShardStream(data["train"], mae_train_transform(SIZE), 2, 6, seed=0, shuffle_buffer=4)
    loader = ShardLoader(stream, num_workers=1)
    batches = iter(loader)
    first = next(batches)
    worker_iter = batches.gi_frame.f_locals["batches"]  # the DataLoader iterator inside the lazy generator
    for worker in worker_iter._workers:
        os.kill(worker.pid, signal.SIGUSR1)
    rest = list(batches)
    assert len(rest) == 5 and first["image"].shape[0] == 2


def test_only_required_image_fields_are_decoded(tmp_path):
    from datamodules.streams import ShardReader

    def png(pixels):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue()

    mask_bytes = png(np.eye(4, dtype=np.uint8))
    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        sink.write({"__key__": "a", "jpg": png(np.zeros((4, 4, 3), np.uint8)), "mask.png": mask_bytes, "cls": b"3"})
    shards = [str(tmp_path / "s.tar")]
    for required, mask_type in ((("jpg",), bytes), (("jpg", "mask.png"), Image.Image)):
        reader = ShardReader(required, 0.5, 100)
        (sample,) = reader.decode(reader.tar_samples(ShardReader.finite_urls(shards)))
        assert isinstance(sample["jpg"], Image.Image) and sample["jpg"].mode == "RGB"
        assert isinstance(sample["mask.png"], mask_type)
    assert sample["mask.png"].mode == "L"  # ids keep their mode
    assert int(sample["cls"]) == 3


@pytest.mark.parametrize("precision, dtype", [("bf16-true", torch.bfloat16), ("32-true", torch.float32)])
def test_images_normalised_on_the_device_take_the_precisions_input_dtype(precision, dtype):
    # Lightning casts a batch for the precision before the transfer, while its images are still uint8; a bf16-true
    # (or DeepSpeed bf16) model must still get bf16 images.
    dm = ShardedDataModule(DataConfig(), mae_train_transform(8), eval_transform(8))
    dm.trainer = L.Trainer(accelerator="cpu", precision=precision, logger=False, enable_progress_bar=False,
                           enable_checkpointing=False)
    batch = dm.on_after_batch_transfer({"image": torch.full((2, 3, 8, 8), 255, dtype=torch.uint8),
                                        "label": torch.tensor([1, 2])}, 0)
    assert batch["image"].dtype == dtype and batch["label"].dtype == torch.int64
    assert batch["image"][0, 0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-2)
