"""PerceptionLM batches from conversation shards: the synthetic default and the batch contract, placeholders that
match the media sample by sample, response-only labels, tiles and video frames, evaluation prompts with their answers
and choices, the run's tokenizer trained once, the task filter, errors before compute, and a resumed stream."""

import io
import json
import logging
import pickle
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from batch_contract import IGNORE_INDEX, check_batch
from datamodules import conversations
from datamodules.captions import frame_fields
from datamodules.chat import BEGIN_OF_TEXT, END_HEADER, END_OF_TURN, START_HEADER, encode_conversation, load_tokenizer
from datamodules.conversations import (ConversationDataConfig, ConversationDataModule, ConversationSampleTransform,
                                       check_conversation_shards, ensure_tokenizer)
from datamodules.plm_transforms import PLMImageTransform, canvas_grid, sample_video_frames, video_frames
from datamodules.shard_writer import ShardWriter
from datamodules.shards import expand_shards
from datamodules.streams import ShardReader
from datamodules.synthetic_conversations import TASKS, ConversationWorldConfig, ensure_conversation_world, mcq_choices

TINY_WORLD = dict(image_size=32, video_size=32, video_frames=6, fps=4.0, train_counts={t: 4 for t in TASKS},
                  val_counts={t: 3 for t in TASKS}, samples_per_shard=8)
"""32 training conversations in 4 shards and 24 validation ones in 3; videos of 6 frames at 4 fps."""
TPT = 4  # tokens per tile
TINY = dict(tokens_per_tile=TPT, tile_size=16, max_num_tiles=4, max_video_frames=4, max_length=256, batch_size=4,
            num_workers=0, shuffle_buffer=8)
CONTRACT = ["media", "input_ids", "attention_mask", "labels"]
HEADER = f"{START_HEADER}assistant{END_HEADER}\n\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return ensure_conversation_world(ConversationWorldConfig(**TINY_WORLD), root=str(tmp_path_factory.mktemp("w")))


@pytest.fixture(scope="module")
def tokenizer_dir(world, tmp_path_factory):
    cfg = ConversationDataConfig(train_shards=world.train_shards, **TINY)
    return ensure_tokenizer(cfg, tmp_path_factory.mktemp("run"), is_writer=True)


def _cfg(world, **overrides) -> ConversationDataConfig:
    return ConversationDataConfig(**{"train_shards": world.train_shards, "val_shards": world.val_shards, **TINY,
                                     **overrides})


def _module(world, tokenizer_dir, seed=0, **overrides) -> ConversationDataModule:
    dm = ConversationDataModule(_cfg(world, **overrides), tokenizer_dir, seed=seed)
    dm.setup("fit")
    return dm


def _raw(spec: str) -> dict[str, dict]:
    """key -> raw sample (json decoded, pixels as bytes) of every sample of a shard spec."""
    reader = ShardReader(required_keys=("json",), max_corrupt_fraction=0.0, min_samples_for_corrupt_check=1 << 30)
    return {s["__key__"]: s for s in reader.decode(reader.tar_samples(reader.finite_urls(expand_shards(spec))))}


def _expected_media(sample: dict, cfg: ConversationDataConfig) -> torch.Tensor:
    """The sample's tiles or frames computed from its raw pixels, apart from the datamodule."""
    if "jpg" in sample:
        image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        tiles = PLMImageTransform(cfg.vision_input, cfg.tile_size, cfg.max_num_tiles, normalize=False)(image)
        n_w, n_h = canvas_grid(*image.size, cfg.tile_size, cfg.max_num_tiles)
        assert len(tiles) == (1 if cfg.vision_input == "vanilla" else n_w * n_h + 1)
        return tiles
    meta, fields = sample["json"], frame_fields(sample)
    picked = sample_video_frames(meta["num_frames"], meta["fps"], cfg.max_video_frames)
    frames = [Image.open(io.BytesIO(sample[fields[i]])).convert("RGB") for i in picked]
    return video_frames(frames, cfg.tile_size, normalize=False)


def _answer(meta: dict) -> str:
    return mcq_choices(meta)[meta["answer"]] if "options" in meta else meta["answer"]


def _jpeg(size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("field, value", [("tokens_per_tile", 0), ("max_length", TPT), ("vocab_size", 200),
                                          ("vision_input", "tiles"), ("tasks", []), ("max_num_tiles", 0),
                                          ("max_video_frames", 0), ("tile_size", 0), ("decode", "device")])
def test_config_rejects_bad_values_naming_the_flag(field, value):
    with pytest.raises(ValueError, match=f"--data.{field}"):
        ConversationDataConfig(**{**TINY, field: value})


def test_tokens_per_tile_is_required():
    with pytest.raises(TypeError, match="tokens_per_tile"):
        ConversationDataConfig()


# ---------------------------------------------------------------------------------------------------
# The synthetic default and the batch contract


def test_synthetic_default_gives_batches_of_the_contract(tmp_path, monkeypatch):
    monkeypatch.setenv("PRISM_CACHE", str(tmp_path / "cache"))  # where ensure_conversation_world builds
    monkeypatch.setattr(conversations, "SYNTHETIC_CONVERSATIONS", TINY_WORLD)
    cfg = ConversationDataConfig(**{**TINY, "batches_per_epoch": 3})
    check_conversation_shards(cfg)
    assert cfg.train_shards.startswith(str(tmp_path / "cache")) and "val-" in cfg.val_shards
    dm = ConversationDataModule(cfg, ensure_tokenizer(cfg, tmp_path / "run", is_writer=True))
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    for batch in batches:
        host = batch["media"].clone()
        assert host.dtype == torch.uint8 and batch["input_ids"].shape[0] == 4
        on_device = dm.on_after_batch_transfer(batch, 0)
        assert check_batch(on_device, CONTRACT + ["key"]) == []
        assert torch.allclose(on_device["media"], (host.float() / 255 - 0.5) / 0.5, atol=1e-6)  # PE's mean and std
        placeholders = int((on_device["input_ids"] == dm.tokenizer.image_token_id).sum())
        assert placeholders == on_device["media"].shape[0] * TPT
    for batch in dm.val_dataloader():
        assert check_batch(dm.on_after_batch_transfer(batch, 0), ["media", "input_ids", "attention_mask", "key"]) == []


# ---------------------------------------------------------------------------------------------------
# Training batches


@pytest.mark.parametrize("vision_input", ["vanilla", "thumb+tile"])
def test_placeholders_and_media_match_sample_by_sample(world, tokenizer_dir, vision_input):
    dm = _module(world, tokenizer_dir, vision_input=vision_input, batches_per_epoch=8)
    raw, image_id, kinds = _raw(world.train_shards), dm.tokenizer.image_token_id, set()
    for batch in dm.train_dataloader():
        assert int((batch["input_ids"] == image_id).sum()) == batch["media"].shape[0] * TPT
        offset = 0
        for row, key in enumerate(batch["key"]):
            expected = _expected_media(raw[key], dm.cfg)
            n = len(expected)
            assert torch.equal(batch["media"][offset : offset + n], expected), key  # in the placeholders' order
            at = (batch["input_ids"][row] == image_id).nonzero().flatten()
            assert len(at) == n * TPT and at[-1] - at[0] + 1 == n * TPT  # one run where the marker was
            kinds.add(raw[key]["json"]["media"])
            assert batch["task"][row] == raw[key]["json"]["task"]
            offset += n
        assert offset == batch["media"].shape[0]
    assert kinds == {"image", "video"}


def test_video_samples_take_the_frames_plm_samples(world, tokenizer_dir):
    dm = _module(world, tokenizer_dir, batches_per_epoch=8)
    raw, seen = _raw(world.train_shards), 0
    # 6 frames at 4 fps hold 2 one-second frames, fewer than 4: PLM then samples the raw frames, 0 2 3 5
    assert sample_video_frames(6, 4.0, 4) == [0, 2, 3, 5]
    for batch in dm.train_dataloader():
        for row, key in enumerate(batch["key"]):
            if raw[key]["json"]["media"] == "video":
                count = int((batch["input_ids"][row] == dm.tokenizer.image_token_id).sum())
                assert count == 4 * TPT
                seen += 1
    assert seen


def test_labels_are_the_json_answer_and_nothing_else(world, tokenizer_dir):
    dm = _module(world, tokenizer_dir, batches_per_epoch=8)
    raw = _raw(world.train_shards)
    for batch in dm.train_dataloader():
        for row, key in enumerate(batch["key"]):
            ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
            target = labels != IGNORE_INDEX
            assert torch.equal(labels[target], ids[target]) and not target[~mask].any()
            assert dm.tokenizer.decode(labels[target].tolist()) == _answer(raw[key]["json"]) + END_OF_TURN
            first = int(target.nonzero()[0])  # the answer follows the assistant header
            assert dm.tokenizer.decode(ids[:first].tolist()).endswith(HEADER)
            assert ids[0] == dm.tokenizer.token_to_id(BEGIN_OF_TEXT) and int(mask.sum()) == int(mask.cumprod(0).sum())


def test_a_text_only_conversation_has_no_media(world, tokenizer_dir):
    cfg = _cfg(world)
    turns = [{"from": "human", "value": "Describe the image."}, {"from": "gpt", "value": "a red ring"}]
    out = ConversationSampleTransform(cfg, load_tokenizer(tokenizer_dir))(
        {"__key__": "text", "json": {"conversations": turns, "task": "chat"}})
    assert out["conversation"]["media"].shape == (0, 3, 16, 16) and out["task"] == "chat"
    assert load_tokenizer(tokenizer_dir).image_token_id not in out["conversation"]["input_ids"].tolist()


def test_worker_processes_give_the_same_batches(world, tokenizer_dir):
    in_process = list(_module(world, tokenizer_dir, batches_per_epoch=2).train_dataloader())
    dm = _module(world, tokenizer_dir, batches_per_epoch=2, num_workers=1)
    pickle.loads(pickle.dumps(dm.train_transform))  # what a worker receives
    in_worker = list(dm.train_dataloader())
    assert [b["key"] for b in in_worker] == [b["key"] for b in in_process]
    for a, b in zip(in_worker, in_process):
        assert all(torch.equal(a[k], b[k]) for k in CONTRACT)


# ---------------------------------------------------------------------------------------------------
# Validation batches


def test_validation_gives_prompts_answers_and_choices(world, tokenizer_dir):
    dm = _module(world, tokenizer_dir, vision_input="thumb+tile")
    tok, raw, keys = dm.tokenizer, _raw(world.val_shards), []
    for batch in dm.val_dataloader():
        assert "labels" not in batch and int((batch["input_ids"] == tok.image_token_id).sum()) == \
            batch["media"].shape[0] * TPT
        for row, key in enumerate(batch["key"]):
            meta, prompt = raw[key]["json"], batch["input_ids"][row][batch["attention_mask"][row]].tolist()
            answer = batch["answer_ids"][row]
            assert tok.decode(prompt).endswith(HEADER)
            assert tok.decode(answer) == _answer(meta) + END_OF_TURN
            media_tokens = [len(_expected_media(raw[key], dm.cfg)) * TPT]
            whole = encode_conversation(tok, meta["conversations"], media_tokens, 256)["input_ids"].tolist()
            assert prompt + answer == whole  # exactly what training would have seen
            choices, index = batch["choices"][row], batch["answer_index"][row]
            if "options" in meta:
                assert index == meta["answer"] and choices[index] == answer
                assert [tok.decode(c) for c in choices] == [c + END_OF_TURN for c in mcq_choices(meta)]
            else:
                assert choices == [] and index == -1
            assert batch["task"][row] == meta["task"]
        keys += batch["key"]
    assert sorted(keys) == sorted(raw)  # every validation sample once


# ---------------------------------------------------------------------------------------------------
# The run's tokenizer


def test_tokenizer_is_trained_once_and_reused(world, tmp_path, caplog):
    cfg = _cfg(world)
    directory = ensure_tokenizer(cfg, tmp_path, is_writer=True)
    assert directory == str(tmp_path / "tokenizer")
    trained = Path(directory, "tokenizer.json").stat().st_mtime_ns
    assert ensure_tokenizer(cfg, tmp_path, is_writer=True) == directory
    assert ensure_tokenizer(cfg, tmp_path, is_writer=False, poll_s=0.01) == directory  # no wait: it is there
    with caplog.at_level(logging.WARNING, logger="datamodules.conversations"):
        ensure_tokenizer(_cfg(world, vocab_size=600), tmp_path, is_writer=True)  # a resume with other settings
    assert Path(directory, "tokenizer.json").stat().st_mtime_ns == trained
    assert "Keeping the run's tokenizer" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer"]  # no temporary directory left
    # the ids cover the corpus: every word of the synthetic world is one token at this vocabulary size
    assert len(load_tokenizer(directory)) < cfg.vocab_size
    with pytest.raises(TimeoutError, match="rank 0"):
        ensure_tokenizer(cfg, tmp_path / "other", is_writer=False, timeout_s=0.05, poll_s=0.01)
    assert ensure_tokenizer(_cfg(world, tokenizer=directory), tmp_path / "unused") == directory
    assert not (tmp_path / "unused").exists()


def _tokenizer_without_image_token(directory: Path) -> Path:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[BEGIN_OF_TEXT, START_HEADER, END_HEADER,
                                                                  END_OF_TURN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(["a red ring"], trainer)
    directory.mkdir()
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def test_a_given_tokenizer_is_checked_before_compute(world, tmp_path):
    with pytest.raises(ValueError, match=r"--data.tokenizer .*no tokenizer.json"):
        ensure_tokenizer(_cfg(world, tokenizer=str(tmp_path / "nowhere")), tmp_path)
    bare = _tokenizer_without_image_token(tmp_path / "bare")
    for call in (lambda cfg: check_conversation_shards(cfg), lambda cfg: ensure_tokenizer(cfg, tmp_path)):
        with pytest.raises(ValueError, match=r"--data.tokenizer .*bare.*no '<\|image\|>' token.*add_tokens"):
            call(_cfg(world, tokenizer=str(bare)))


# ---------------------------------------------------------------------------------------------------
# Tasks


def test_the_task_filters_keep_only_their_tasks(world, tokenizer_dir):
    dm = _module(world, tokenizer_dir, tasks=["image_caption", "video_motion"],
                 val_tasks=["image_caption", "video_motion"])
    first = _raw(expand_shards(world.train_shards)[0])
    kept = sum(s["json"]["task"] in ("image_caption", "video_motion") for s in first.values())
    assert dm.batches_per_epoch == max(1, (32 // 4) * kept // len(first))  # the index's 32, scaled
    tasks = [t for batch in dm.train_dataloader() for t in batch["task"]]
    assert tasks and set(tasks) <= {"image_caption", "video_motion"}
    val = [t for batch in dm.val_dataloader() for t in batch["task"]]
    assert sorted(val) == ["image_caption"] * 3 + ["video_motion"] * 3
    every = [t for batch in _module(world, tokenizer_dir, tasks=["image_caption"]).val_dataloader()
             for t in batch["task"]]
    assert len(every) == 3 * 8 and set(every) == set(TASKS)  # training on captions alone still validates on all
    check_conversation_shards(_cfg(world, tasks=["image_caption"]))
    with pytest.raises(ValueError, match=r"--data.val_shards: no sample of --data.val_tasks \['captions'\]"):
        check_conversation_shards(_cfg(world, val_tasks=["captions"]))
    with pytest.raises(ValueError, match=r"--data.train_shards: no sample of --data.tasks \['captions'\] among the 32 "
                                         r"samples of its first 4 shard\(s\).*image_count"):
        check_conversation_shards(_cfg(world, tasks=["captions"]))


# ---------------------------------------------------------------------------------------------------
# Errors before compute


def _conversation(**changes) -> dict:
    meta = {"task": "image_caption", "media": "image",
            "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                              {"from": "assistant", "value": "a grey picture"}]}
    return {**meta, **changes}


BAD_SAMPLES = {
    "no_answer": ({"json": _conversation(conversations=[{"from": "human", "value": "<image>\nDescribe it."}])},
                  {}, r"'bad' of shard .*bad-000000.tar: its conversation has no assistant turn"),
    "no_pixels": ({"json": _conversation()}, {},
                  r"'bad' of shard .*bad-000000.tar: its json says media 'image' .* has no 'jpg' image"),
    "no_marker": ({"json": _conversation(conversations=[{"from": "human", "value": "Describe it."},
                                                        {"from": "gpt", "value": "grey"}]), "jpg": _jpeg()}, {},
                  r"'bad' of shard .*: its conversation holds 0 media marker\(s\)"),
    "too_many_tiles": ({"json": _conversation(), "jpg": _jpeg()},
                       {"vision_input": "thumb+tile", "tokens_per_tile": 60, "max_length": 250},
                       r"'bad' of shard .*: its image gives 5 tile\(s\) \(thumbnail included\) x 60 tokens per tile "
                       r"\(--data.tokens_per_tile\) = 300 visual tokens.*--data.max_length 250.*--data.max_num_tiles"),
    "too_many_frames": ({"json": _conversation(media="video", fps=1.0, conversations=[
        {"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": "a ring"}]),
        **{f"{t:03d}.jpg": _jpeg() for t in range(6)}}, {"tokens_per_tile": 50, "max_length": 200},
        r"'bad' of shard .*: its video gives 4 frame\(s\) x 50 tokens per tile.*= 200 visual tokens.*"
        r"--data.max_length 200.*--data.max_video_frames"),
}


def _shard(directory: Path, prefix: str, fields: dict) -> str:
    with ShardWriter(str(directory), prefix, max_count=8) as writer:
        writer.write({"__key__": prefix, **{k: json.dumps(v).encode() if k == "json" else v
                                            for k, v in fields.items()}})
    return str(directory / f"{prefix}-000000.tar")


@pytest.mark.parametrize("case", BAD_SAMPLES)
def test_bad_samples_fail_before_compute_naming_shard_sample_and_fix(world, tmp_path, case):
    fields, overrides, message = BAD_SAMPLES[case]
    bad = _shard(tmp_path, "bad", fields)
    text_only = _shard(tmp_path, "good", {"json": _conversation(media=None, conversations=[
        {"from": "human", "value": "Hello."}, {"from": "gpt", "value": "Hello."}])})
    for split, shards in (("train_shards", (bad, text_only)), ("val_shards", (text_only, bad))):
        cfg = _cfg(world, **{"train_shards": shards[0], "val_shards": shards[1], **overrides})
        with pytest.raises(ValueError, match=f"--data.{split}: Sample {message}"):
            check_conversation_shards(cfg)


def test_a_text_too_long_for_max_length_fails_before_compute_with_a_tokenizer(world, tokenizer_dir):
    cfg = _cfg(world, max_length=4 * TPT + 4)  # a video's 4 frames and 4 more tokens
    check_conversation_shards(cfg)  # the visual tokens alone fit
    with pytest.raises(ValueError, match=r"--data.train_shards: sample '.*': .*--data.max_length 20.* \(shard .*\)"):
        check_conversation_shards(cfg, tokenizer_dir)


# ---------------------------------------------------------------------------------------------------
# Resume


def test_training_stream_resumes_where_it_stopped(world, tokenizer_dir):
    first = _module(world, tokenizer_dir, seed=3, vision_input="thumb+tile", batches_per_epoch=5)
    full = list(first.train_dataloader())
    state = {**first.state_dict(), "batches_done": 2}
    resumed = _module(world, tokenizer_dir, seed=3, vision_input="thumb+tile", batches_per_epoch=5)
    resumed.load_state_dict(state)
    rest = list(resumed.train_dataloader())
    assert [b["key"] for b in rest] == [b["key"] for b in full[2:]]
    for again, uninterrupted in zip(rest, full[2:]):
        for key in CONTRACT:
            assert torch.equal(again[key], uninterrupted[key]), key



class _BatchRecorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.problems: list[str] = []
        self.val_answers: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.problems += check_batch(batch, CONTRACT + ["key"])
        return (self.weight * batch["media"].mean()).sum()

    def validation_step(self, batch, batch_idx):
        self.problems += check_batch(batch, ["media", "input_ids", "attention_mask", "key"])
        self.val_answers += batch["answer_ids"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_lightning_fit_receives_normalised_batches(world, tokenizer_dir):
    model, dm = _BatchRecorder(), ConversationDataModule(_cfg(world, batches_per_epoch=2, val_batches=2),
                                                         tokenizer_dir)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, dm)
    assert model.problems == [] and len(model.val_answers) == 8
    assert all(isinstance(ids, list) and ids[-1] == dm.tokenizer.eot_token_id for ids in model.val_answers)
