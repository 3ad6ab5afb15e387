"""Hashtags: the vocabulary (threshold, order, limits), the sample transform, the class-balancing resampler, and
the training-stream filter it plugs into (exact resume with a filter)."""

import io
import json
import threading
import time

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from datamodules.hashtags import (HashtagDataConfig, HashtagResampler, HashtagSampleTransform, Vocabulary,
                                  build_vocabulary, ensure_vocabulary, hashtag_datamodule, normalize_tag,
                                  zero_shot_class_map)
from datamodules.sharded import DataConfig, ShardedDataModule
from datamodules.streams import ResampledShardStream, ShardLoader
from datamodules.transforms import eval_pil_transform, eval_transform, mae_train_pil_transform, mae_train_transform

# Per-sample hashtags of a hand-made corpus (two shards of three). Counted once per sample after normalisation:
# cat 3 (s0, s1, s2), dog 3 (s0, s2, s4), bird 2 (s1, s4), fish 1 (s3); "#Cat" and "cat " are "cat".
TAGS = [["#Cat", "dog"], ["cat ", "bird"], ["dog", "cat", "cat"], ["fish"], ["bird", "dog"], []]
CLASSES = ["cat", "golden retriever"]


def _jpeg(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hashtags")
    with wds.ShardWriter(str(root / "tiny-%06d.tar"), maxcount=3, verbose=0) as sink:
        for i, tags in enumerate(TAGS):
            label = i % 2
            meta = {"hashtags": tags, "label": label, "class_name": CLASSES[label]}
            sink.write({"__key__": f"s{i}", "jpg": _jpeg(i), "cls": label, "json": json.dumps(meta).encode()})
    return str(root / "tiny-{000000..000001}.tar")


@pytest.fixture(scope="module")
def stream_shards(tmp_path_factory):
    """4 shards of 16 samples; sample i carries tag "common" always and "rare" when i % 8 == 0."""
    root = tmp_path_factory.mktemp("balanced")
    with wds.ShardWriter(str(root / "train-%06d.tar"), maxcount=16, verbose=0) as sink:
        for i in range(64):
            tags = ["common", "rare"] if i % 8 == 0 else ["common"]
            sink.write({"__key__": f"k{i:04d}", "jpg": _jpeg(i), "cls": i % 3,
                        "json": json.dumps({"hashtags": tags}).encode()})
    return [str(root / f"train-{i:06d}.tar") for i in range(4)]


# ---------------------------------------------------------------------------------------------------
# Vocabulary


def test_vocabulary_threshold_and_order(corpus):
    vocab = build_vocabulary(corpus, min_count=2)
    assert vocab.tags == ["cat", "dog", "bird"]  # count desc, ties by name; fish (1) is below the threshold
    assert vocab.counts == [3, 3, 2]
    assert vocab.num_samples == 6
    assert vocab.class_names == CLASSES
    assert build_vocabulary(corpus, min_count=1).tags == ["cat", "dog", "bird", "fish"]
    assert build_vocabulary(corpus, min_count=1, max_size=2).tags == ["cat", "dog"]


def test_vocabulary_sample_limit_reads_the_first_samples_in_shard_order(corpus):
    # s0..s3 (across the shard boundary): cat 3, dog 2, bird 1, fish 1
    vocab = build_vocabulary(corpus, min_count=1, sample_limit=4)
    assert (vocab.tags, vocab.counts, vocab.num_samples) == (["cat", "dog", "bird", "fish"], [3, 2, 1, 1], 4)
    assert build_vocabulary(corpus, min_count=2, sample_limit=2).tags == ["cat"]  # s0, s1


def test_vocabulary_with_worker_processes_counts_the_same(corpus):
    vocab = build_vocabulary(corpus, min_count=1, num_workers=2)
    assert (vocab.tags, vocab.counts) == (["cat", "dog", "bird", "fish"], [3, 3, 2, 1])


def test_vocabulary_without_any_frequent_tag_says_what_to_change(corpus):
    with pytest.raises(ValueError, match="min_count"):
        build_vocabulary(corpus, min_count=10)


def test_vocabulary_save_load_round_trip(corpus, tmp_path):
    vocab = build_vocabulary(corpus, min_count=2)
    loaded = Vocabulary.load(vocab.save(tmp_path / "run" / "hashtag_vocab.json"))
    assert loaded == vocab and loaded.index == {"cat": 0, "dog": 1, "bird": 2}
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="Delete it to rebuild"):
        Vocabulary.load(tmp_path / "bad.json")


def test_ensure_vocabulary_builds_once_and_other_ranks_wait(corpus, tmp_path, caplog):
    path = tmp_path / "hashtag_vocab.json"
    cfg = HashtagDataConfig(train_shards=corpus, min_count=2)

    def rank0():  # rank 0 finishing its build while another rank waits
        time.sleep(0.3)
        ensure_vocabulary(path, cfg, is_writer=True)

    writer = threading.Thread(target=rank0)
    writer.start()
    assert ensure_vocabulary(path, cfg, is_writer=False, poll_s=0.05).tags == ["cat", "dog", "bird"]
    writer.join()
    # a rerun reuses the file, even with other settings (the head is sized to it), and says so
    cfg.min_count = 1
    assert ensure_vocabulary(path, cfg, is_writer=True).tags == ["cat", "dog", "bird"]
    assert "min_count 2, 1" in caplog.text
    with pytest.raises(TimeoutError, match="rank 0"):
        ensure_vocabulary(tmp_path / "never.json", cfg, is_writer=False, timeout_s=0.1, poll_s=0.05)


def test_class_to_hashtags_by_name_and_synonyms(tmp_path):
    vocab = Vocabulary(["cat", "goldenretriever", "kitty", "dog"], [9, 5, 4, 3], 20, ["cat", "golden retriever", "cow"])
    assert vocab.class_to_hashtags(vocab.class_names) == [[0], [1], []]
    assert vocab.class_to_hashtags(["cat", "dog"], {"cat": ["#Kitty", "cat", "nope"]}) == [[2, 0], [3]]
    assert zero_shot_class_map(vocab) == [[0], [1], []]
    synonyms = tmp_path / "classes.json"
    synonyms.write_text(json.dumps({"dog": ["dog"], "cat": ["kitty", "cat"]}))
    no_names = Vocabulary(vocab.tags, vocab.counts, 20)
    assert zero_shot_class_map(no_names, str(synonyms)) == [[3], [2, 0]]  # label order = the file's order
    assert zero_shot_class_map(no_names) is None
    with pytest.raises(ValueError, match="eval.class_hashtags"):
        zero_shot_class_map(vocab, str(tmp_path / "missing.json"))


def test_normalize_tag():
    assert [normalize_tag(t) for t in ["#Cat", " dog ", "BIRD"]] == ["cat", "dog", "bird"]


def test_data_config_rejects_bad_values():
    with pytest.raises(ValueError, match="min_count"):
        HashtagDataConfig(min_count=0)
    with pytest.raises(ValueError, match="balance_power"):
        HashtagDataConfig(balance_power=-1)
    with pytest.raises(ValueError, match="batch_size"):  # the inherited checks still run
        HashtagDataConfig(batch_size=0)


# ---------------------------------------------------------------------------------------------------
# Samples


def test_sample_transform_reads_hashtags_from_json():
    transform = HashtagSampleTransform(eval_pil_transform(8))
    image = Image.fromarray(np.zeros((16, 16, 3), np.uint8))
    meta = {"hashtags": ["#Cat", "cat", "Dog", ""]}
    for encoded in (meta, json.dumps(meta).encode()):  # decoded by webdataset, or raw bytes
        out = transform({"__key__": "k1", "jpg": image, "cls": 4, "json": encoded})
        assert out["hashtags"] == ["cat", "dog"] and out["label"] == 4 and out["key"] == "k1"
        assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 8, 8)
    assert "label" not in transform({"__key__": "k", "jpg": image, "json": meta})
    assert transform({"__key__": "k", "jpg": image, "cls": 1})["hashtags"] == []  # labelled shards without json


# ---------------------------------------------------------------------------------------------------
# The resampler


def test_keep_probabilities_follow_the_formula():
    # counts 100, 25, 4 -> count^-0.5 = 0.1, 0.2, 0.5; w_max = 0.5 (the rarest tag)
    vocab = Vocabulary(["a", "b", "c"], [100, 25, 4], 129)
    r = HashtagResampler(vocab, power=0.5)
    assert r.keep_probability(["a"]) == pytest.approx(0.1 / 0.5)
    assert r.keep_probability(["a", "b"]) == pytest.approx((0.1 + 0.2) / 2 / 0.5)
    assert r.keep_probability(["c"]) == pytest.approx(1.0)
    assert r.keep_probability(["#A", "zzz"]) == pytest.approx(0.2)  # normalised; unknown tags are ignored
    assert r.keep_probability(["zzz"]) == 0.0 and r.keep_probability([]) == 0.0  # nothing to learn from
    assert HashtagResampler(vocab, power=0.0).keep_probability(["a"]) == 1.0  # balancing off
    assert HashtagResampler(vocab, power=1.0).keep_probability(["a"]) == pytest.approx(0.01 / 0.25)
    # single-tag samples: a tag with count c is kept c * keep(c) ~ c^(1 - power) times
    assert r.expected_keep_fraction() == pytest.approx((100 * 0.2 + 25 * 0.4 + 4 * 1.0) / 129)


def test_resampler_decisions_are_deterministic_and_match_the_probability():
    r = HashtagResampler(Vocabulary(["a", "b", "c"], [100, 25, 4], 129), power=0.5, seed=3)
    samples = [{"__key__": f"x{i}", "json": json.dumps({"hashtags": ["a", "b"]}).encode()} for i in range(4000)]
    epoch0 = [r(s, 0) for s in samples]
    assert epoch0 == [r(s, 0) for s in samples]  # same (seed, epoch, key), same decision
    assert epoch0 != [r(s, 1) for s in samples]  # a new epoch draws anew
    assert epoch0 != [HashtagResampler(Vocabulary(["a", "b", "c"], [100, 25, 4], 129), 0.5, seed=4)(s, 0)
                      for s in samples]
    # keep = 0.3; binomial sd over 4000 draws is 0.0072: 0.03 is more than 4 sd
    assert abs(sum(epoch0) / len(samples) - 0.3) < 0.03


def test_resampler_drops_samples_without_json_and_leaves_broken_json_to_the_decoder():
    r = HashtagResampler(Vocabulary(["a"], [5], 5))
    assert not r({"__key__": "k", "jpg": b""}, 0)
    assert r({"__key__": "k", "json": b"{broken"}, 0)


# ---------------------------------------------------------------------------------------------------
# The filtered training stream


def test_filtered_stream_resumes_exactly(stream_shards):
    """A filtered stream skipped by S batches yields exactly batches S.. of the uninterrupted one, with the
    same pixels: the filter runs before the resume count and decides from (seed, epoch, key) alone."""
    # counts: common 64, rare 8 -> keep(common) = (1/8) / (1/sqrt 8) = 0.354, keep(common, rare) = 0.677
    resampler = HashtagResampler(Vocabulary(["common", "rare"], [64, 8], 64), power=0.5, seed=1)

    def stream(skip):
        s = ResampledShardStream(stream_shards, HashtagSampleTransform(mae_train_pil_transform(8)), 2, 6, seed=3,
                                 shuffle_buffer=8, sample_filter=resampler)
        s.skip_batches = skip
        return list(ShardLoader(s, num_workers=0))

    full = stream(0)
    assert len(full) == 6
    tags = {f"k{i:04d}": ["common", "rare"] if i % 8 == 0 else ["common"] for i in range(64)}
    accepted = {k for k, t in tags.items() if resampler({"__key__": k, "json": json.dumps({"hashtags": t})}, 0)}
    assert 0 < len(accepted) < 64  # the filter is not trivial here...
    assert {k for b in full for k in b["key"]} <= accepted  # ...and only what it accepts is trained on
    for skip in (1, 4):
        rest = stream(skip)
        assert [b["key"] for b in rest] == [b["key"] for b in full[skip:]], skip
        for resumed, uninterrupted in zip(rest, full[skip:]):
            assert torch.equal(resumed["image"], uninterrupted["image"])
            assert resumed["hashtags"] == uninterrupted["hashtags"]


class _KeepEpochParity:
    """Keeps sample k{i} when i % 2 == epoch % 2: shows which epoch the filter was called with."""

    def __call__(self, sample, epoch):
        return int(sample["__key__"][1:]) % 2 == epoch % 2


def test_datamodule_passes_the_epoch_to_the_training_filter_only(stream_shards):
    cfg = DataConfig(train_shards=stream_shards[0] + "::" + stream_shards[1], val_shards=stream_shards[2],
                     batch_size=4, num_workers=0, image_size=8, shuffle_buffer=4, batches_per_epoch=3)
    dm = ShardedDataModule(cfg, mae_train_transform(8), eval_transform(8), train_sample_filter=_KeepEpochParity())
    dm.setup("fit")
    loader = dm.train_dataloader()
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        keys = [k for batch in loader for k in batch["key"]]
        assert len(keys) == 12 and {int(k[1:]) % 2 for k in keys} == {epoch}
    val_keys = [k for batch in dm.val_dataloader() for k in batch["key"]]
    assert len(val_keys) == 16  # validation is never filtered


def test_hashtag_datamodule_batches(corpus, tmp_path):
    vocab = build_vocabulary(corpus, min_count=1)
    cfg = HashtagDataConfig(train_shards=corpus, val_shards=corpus, batch_size=2, num_workers=0, image_size=8,
                            shuffle_buffer=2, batches_per_epoch=3, balance_power=0.0)
    dm = hashtag_datamodule(cfg, vocab, seed=0)
    dm.setup("fit")
    for batch in dm.train_dataloader():
        assert batch["image"].shape == (2, 3, 8, 8) and batch["label"].dtype == torch.int64
        assert all(tags for tags in batch["hashtags"])  # the untagged s5 is never drawn for training
    val = list(dm.val_dataloader())
    assert [k for b in val for k in b["key"]] == [f"s{i}" for i in range(6)]
    assert [t for b in val for t in b["hashtags"]] == [["cat", "dog"], ["cat", "bird"], ["dog", "cat"], ["fish"],
                                                      ["bird", "dog"], []]
    # labelled validation shards without json (ImageNet-style) feed the zero-shot metric
    with wds.ShardWriter(str(tmp_path / "labelled-%06d.tar"), maxcount=8, verbose=0) as sink:
        for i in range(3):
            sink.write({"__key__": f"v{i}", "jpg": _jpeg(i), "cls": i})
    cfg.val_shards = str(tmp_path / "labelled-000000.tar")
    dm = hashtag_datamodule(cfg, vocab, seed=0)
    dm.setup("validate")
    val = list(dm.val_dataloader())
    assert [t for b in val for t in b["hashtags"]] == [[], [], []]
    assert [label for b in val for label in b["label"].tolist()] == [0, 1, 2]
