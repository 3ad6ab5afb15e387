"""Conversation shards -> PerceptionLM training and evaluation batches (Cho et al. 2025).

A sample holds a ``json`` with ``conversations`` (PLM's turns, one ``<image>`` or ``<video>`` marker for the sample's
medium), ``task`` and, for videos, ``fps``; the pixels are ``jpg`` for an image, ``000.jpg``, ``001.jpg``, ... for a
video (the layout of ``datamodules.synthetic_conversations`` and of ``make_shards --format conversation``). A
conversation without a marker and without pixels is text only.

Visual inputs (``datamodules.plm_transforms``): an image becomes one squashed tile (``vanilla``, stage 1) or a
thumbnail and up to ``max_num_tiles`` tiles (``thumb+tile``); a video becomes ``sample_video_frames(num_frames, fps,
max_video_frames)`` frames, each one tile. Every tile or frame takes ``tokens_per_tile`` image placeholders in the
text (``datamodules.chat.encode_conversation``).

Training batch (``batch_contract``), after ``on_after_batch_transfer``:

==================  ===============================  ============================================================
``media``           float ``(M, 3, S, S)``            every tile and frame of the batch, sample after sample, in the
                                                      order of the placeholders (uint8 on the host, normalised with
                                                      PE's mean = std = 0.5 on the device)
``input_ids``       int64 ``(B, L)``                  Llama 3 chat layout, right-padded; M x tokens_per_tile of its
                                                      ids are the image placeholder
``attention_mask``  bool ``(B, L)``                   False on padding
``labels``          int64 ``(B, L)``                  the assistant answers and their ``<|eot_id|>``; -100 elsewhere
``task``, ``key``   lists of B str                    the json's ``task`` ("" without one), the WebDataset key
==================  ===============================  ============================================================

Validation batch (for a trainer that generates and scores without a tokenizer): ``media``, ``input_ids`` and
``attention_mask`` of the prompt only (the conversation up to and including the header of its last assistant turn,
``<|start_header_id|>assistant<|end_header_id|>\\n\\n``), ``answer_ids`` (B lists: the reference answer's tokens and
``<|eot_id|>``, exactly what the model should generate), ``choices`` (B lists: for a multiple-choice sample every
option's answer as the assistant writes it, ``synthetic_conversations.mcq_choices``, tokenised with ``<|eot_id|>``; []
for an open question), ``answer_index`` (B ints; -1 for an open question), ``task`` and ``key``.

The tokenizer is a Hugging Face directory (``--data.tokenizer``: a Llama 3 one with ``<|image|>``), or, without one,
a byte-level BPE that :func:`ensure_tokenizer` trains once on the training conversations and keeps in the run
directory, so that a resumed run and a later stage read the same ids.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from PIL import Image

from .captions import PE_MEAN, PE_STD, _decode_frame, _fields, frame_fields
from .chat import (MEDIA_MARKERS, ROLES, SPECIAL_TOKENS, ChatTokenizer, encode_conversation, load_tokenizer, pad_batch,
                   train_tokenizer)
from .plm_transforms import PLMImageTransform, sample_video_frames, video_frames
from .sharded import DataConfig, ShardedDataModule, resolve_shards
from .shards import expand_shards
from .streams import ShardLoader, ShardReader, json_members
from .synthetic_conversations import ConversationWorldConfig, ensure_conversation_world, mcq_choices
from .transforms import normalize_on_device

__all__ = ["SYNTHETIC_CONVERSATIONS", "TOKENIZER_DIR", "ConversationDataConfig", "ConversationDataModule",
           "ConversationSampleTransform", "PromptSampleTransform", "TaskFilter", "answer_tokens", "assistant_header",
           "check_conversation_shards", "check_sample", "collate_prompts", "collate_training", "conversation_texts",
           "encode_prompt", "ensure_tokenizer", "media_fields", "resolve_conversation_shards"]

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"
"""Where :func:`ensure_tokenizer` keeps a trained tokenizer, under the run directory."""
TOKENIZER_SETTINGS = "prism_tokenizer.json"
"""Written beside a trained tokenizer: what it was trained on, so a rerun with other settings is told."""
PREFLIGHT_SAMPLES = 4
"""Samples of the first shard of each split that ``check_conversation_shards`` reads before training."""
PREFLIGHT_SHARDS = 4
"""With --data.tasks: shards read at most, in order, to find samples of those tasks (before training, and to size the
epoch)."""
_MARKERS = re.compile("|".join(map(re.escape, MEDIA_MARKERS)))
_MARKERS_LINE = re.compile(f"(?:{_MARKERS.pattern})\\n?")
_NO_LIMIT = 1 << 62  # a length bound that never cuts: prompts are measured against max_length afterwards


@dataclass
class ConversationDataConfig(DataConfig):
    """Shards and loader (as every recipe), plus the tokenizer, the visual inputs and the sequence budget."""

    tokens_per_tile: int = field(kw_only=True)
    """Image placeholders per tile or video frame: the visual tokens the model makes of one (the recipe sets it from
    the model: patches per tile over pooling_ratio squared; PLM: 1024 in stage 1, 256 from stage 2)."""
    batch_size: int = 8
    """Conversations per batch on each device (PLM: a global batch of 512 in stage 1, 2048 in stage 2)."""
    image_size: int = 64
    """Not read here: tiles and video frames are tile_size x tile_size."""
    shuffle_buffer: int = 64
    """Samples held in each worker's shuffle buffer. A video sample holds every frame's bytes, so this is far below
    the image datamodules' 1000."""
    tokenizer: str | None = None
    """A Hugging Face tokenizer directory with the Llama 3 chat tokens and <|image|> (PLM's own). None: a byte-level
    BPE trained on the training conversations, kept in <run_dir>/tokenizer."""
    vocab_size: int = 1024
    """Ids of the trained tokenizer (tokenizer None) at most. The synthetic world's 3500 training conversations have
    128 distinct words and saturate at 561 ids (every word one token), so 1024 leaves room for other text."""
    vision_input: Literal["vanilla", "thumb+tile"] = "vanilla"
    """How an image becomes tiles: vanilla (stage 1) squashes it into one tile; thumb+tile (stages 2-3) gives a
    thumbnail, then a grid of up to max_num_tiles tiles. Video frames are one tile each in both."""
    tile_size: int = 64
    """Side of a tile and of a video frame in pixels: the vision tower's input size (the tiny model: 64; PLM: 448)."""
    max_num_tiles: int = 16
    """thumb+tile: tiles of an image's grid at most, the thumbnail not counted (PLM stage 2: 16; stage 3: 36)."""
    max_video_frames: int = 8
    """Frames taken from a video at most: uniformly from its 1-fps frames, or from all its frames when those are too
    few (PLM stage 1: 8; stage 2: 16; stage 3: 32)."""
    max_length: int = 1280
    """Tokens per conversation at most, visual tokens included; text past it is cut, a cut through visual tokens is
    an error (PLM: 1280 in stage 1, 6144 in stage 2, 11520 in stage 3). Batches are padded to their longest."""
    tasks: list[str] | None = None
    """Train only on samples whose json 'task' is one of these (PLM stage 1 trains on captions: [image_caption] in
    the synthetic world). None: every sample."""
    val_tasks: list[str] | None = None
    """Validate only on samples of these tasks. None: every task, so that a stage trained on some tasks still shows
    what it makes of the others."""
    text_only: bool = False
    """Drop every sample's pixels and media marker and keep its text: a language model trained on the conversations
    alone, and the text-only baseline of a visual question (what the words give away without the image)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        floor = 256 + len(SPECIAL_TOKENS)
        checks = {"tokens_per_tile": (self.tokens_per_tile >= 1, ">= 1"),
                  "tile_size": (self.tile_size >= 1, ">= 1"),
                  "max_num_tiles": (self.max_num_tiles >= 1, ">= 1"),
                  "max_video_frames": (self.max_video_frames >= 1, ">= 1"),
                  "max_length": (self.max_length > self.tokens_per_tile, f"> tokens_per_tile {self.tokens_per_tile} "
                                 "(a tile and some text)"),
                  "vocab_size": (self.vocab_size > floor,
                                 f"> {floor} (256 byte tokens and {len(SPECIAL_TOKENS)} special ones)"),
                  "vision_input": (self.vision_input in ("vanilla", "thumb+tile"), "'vanilla' or 'thumb+tile'"),
                  **{name: (tasks is None or (len(tasks) > 0 and all(isinstance(t, str) for t in tasks)),
                            "None or a non-empty list of task names")
                     for name, tasks in (("tasks", self.tasks), ("val_tasks", self.val_tasks))}}
        for name, (ok, wanted) in checks.items():
            if not ok:
                raise ValueError(f"ConversationDataConfig.{name} must be {wanted}, got {getattr(self, name)!r} "
                                 f"(--data.{name})")
        if self.decode != "host":
            raise ValueError("ConversationDataConfig.decode must be 'host': a sample's tiles are made with its tokens "
                             f"in the loader workers (got {self.decode!r}; --data.decode host)")


# ----------------------------------------------------------------------------------------------------
# Reading a sample (raw WebDataset fields; ``json`` may already be decoded into a dict)


def _where(sample: Mapping) -> str:
    return f"Sample {sample.get('__key__')!r} of shard {sample.get('__url__', '?')}"


def _meta(sample: Mapping) -> dict:
    meta = sample.get("json")
    if isinstance(meta, (bytes, str)):
        try:
            meta = json.loads(meta)
        except ValueError as err:
            raise ValueError(f"{_where(sample)}: its json does not parse ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{_where(sample)} has no json object (fields {_fields(sample)}): a conversation sample "
                         "needs one with 'conversations'. Write the shards with `python -m datamodules.make_shards "
                         "--format conversation`.")
    return meta


def _turns(sample: Mapping, meta: Mapping) -> list[dict]:
    turns = meta.get("conversations")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
        raise ValueError(f"{_where(sample)}: its json 'conversations' must be a non-empty list of {{\"from\": ..., "
                         f"\"value\": ...}} turns, got {json.dumps(turns)[:120]}")
    return turns


def without_media(turns: Sequence[Mapping]) -> list[dict]:
    """The turns with their media markers (and the line break after one) taken out: the conversation's text."""
    return [{**t, "value": _MARKERS_LINE.sub("", t["value"])} if isinstance(t.get("value"), str) else dict(t)
            for t in turns]


def _role(turn: Mapping) -> str | None:
    return ROLES.get(turn.get("from", turn.get("role")))


def _last_answer(turns: Sequence[Mapping], where: str) -> int:
    """Index of the last assistant turn: the reference answer of an evaluation, and what training needs one of."""
    answers = [i for i, turn in enumerate(turns) if _role(turn) == "assistant"]
    if not answers:
        raise ValueError(f"{where}: its conversation has no assistant turn (speakers "
                         f"{[t.get('from', t.get('role')) for t in turns]}), so there is no answer to train on or to "
                         "evaluate: give it one ('from': 'gpt' or 'assistant'), or drop the sample.")
    return answers[-1]


def media_fields(sample: Mapping, meta: Mapping) -> tuple[str | None, list[str]]:
    """("image", ["jpg"]), ("video", its frame fields in order) or (None, []) for a text-only conversation; the
    conversation's markers must match: one for a medium, none without."""
    frames = frame_fields(sample)
    kind = meta.get("media") or ("video" if frames else "image" if "jpg" in sample else None)
    fields = frames if kind == "video" else ["jpg"] if kind == "image" and "jpg" in sample else []
    texts = [t["value"] for t in _turns(sample, meta) if isinstance(t.get("value"), str)]
    markers = sum(len(_MARKERS.findall(text)) for text in texts)
    if (kind is not None or markers) and not fields:
        wanted = {"video": "000.jpg, 001.jpg, ... frames", "image": "'jpg' image"}.get(kind, "'jpg' image or frames")
        said = f"its json says media {kind!r} and " if meta.get("media") else ""
        raise ValueError(f"{_where(sample)}: {said}its conversation holds {markers} media marker(s) "
                         f"({' / '.join(MEDIA_MARKERS)}), but the sample has no {wanted} (fields {_fields(sample)}). "
                         "Re-write the shard with its pixels, or drop the marker and 'media' for a text-only "
                         "conversation.")
    if markers != (1 if fields else 0):
        raise ValueError(f"{_where(sample)}: its conversation holds {markers} media marker(s) "
                         f"({' / '.join(MEDIA_MARKERS)}) for {'one ' + kind if fields else 'no media'}: put exactly "
                         "one marker where the image or video goes (none in a text-only conversation).")
    return kind if fields else None, fields


def _fps(sample: Mapping, meta: Mapping) -> float | None:
    fps = meta.get("fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float))):
        raise ValueError(f"{_where(sample)}: its json 'fps' must be a number, got {fps!r}")
    return fps


def _image_size(sample: Mapping, field_name: str) -> tuple[int, int]:
    """(width, height) from the image header: no pixel is decoded."""
    data = sample[field_name]
    if isinstance(data, Image.Image):
        return data.size
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception as exc:  # any decoder error: name the sample and the field
        raise ValueError(f"{_where(sample)}: {field_name} is not an image ({type(exc).__name__}: {exc}). Re-write "
                         "this shard.") from exc


def _with_shard(sample: Mapping, err: ValueError) -> ValueError:
    """encode_conversation's errors name the sample; add its shard."""
    return ValueError(f"{err} (shard {sample.get('__url__', '?')})")


def _check_visual_budget(sample: Mapping, kind: str, count: int, cfg: ConversationDataConfig) -> None:
    tokens = count * cfg.tokens_per_tile
    if tokens < cfg.max_length:
        return
    what, flag = (("frame(s)", "--data.max_video_frames") if kind == "video" else
                  ("tile(s) (thumbnail included)" if cfg.vision_input == "thumb+tile" else "tile(s)",
                   "--data.max_num_tiles"))
    raise ValueError(f"{_where(sample)}: its {kind} gives {count} {what} x {cfg.tokens_per_tile} tokens per tile "
                     f"(--data.tokens_per_tile) = {tokens} visual tokens, which leaves no room for text in "
                     f"--data.max_length {cfg.max_length}. Raise --data.max_length above {tokens}, or lower {flag}.")


# ----------------------------------------------------------------------------------------------------
# Prompts (what an evaluation feeds the model) and the reference answers


def assistant_header(tokenizer: ChatTokenizer) -> list[int]:
    """``<|start_header_id|>assistant<|end_header_id|>\\n\\n`` as ``encode_conversation`` lays it out: the ids after
    which the model writes its answer."""
    return [tokenizer.start_header_id, *tokenizer.encode("assistant"), tokenizer.end_header_id,
            *tokenizer.encode("\n\n")]


def answer_tokens(tokenizer: ChatTokenizer, text: str) -> list[int]:
    """An assistant turn's text as the model writes it: its tokens (stripped, as the chat layout strips it), then
    ``<|eot_id|>``."""
    return [*tokenizer.encode(text.strip()), tokenizer.eot_token_id]


def encode_prompt(tokenizer: ChatTokenizer, turns: Sequence[Mapping], media_tokens: Sequence[int], max_length: int,
                  key: str | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the conversation up to and including the header of its last assistant turn, and that
    turn's tokens with ``<|eot_id|>``; together they are exactly ``encode_conversation`` of the turns up to that one.
    Turns after it are left out. The whole must fit ``max_length``: an evaluation scores the answer after the prompt.
    """
    where = f"sample {key!r}: " if key is not None else ""
    last = _last_answer(turns, f"sample {key!r}" if key is not None else "the conversation")
    kept = list(turns[: last + 1])
    # encode_conversation refuses a prompt alone (no assistant turn): encode it with its answer and cut that off
    ids = encode_conversation(tokenizer, kept, media_tokens, _NO_LIMIT, key)["input_ids"].tolist()
    answer = answer_tokens(tokenizer, kept[last]["value"])
    prompt, header = ids[: len(ids) - len(answer)], assistant_header(tokenizer)
    if ids[len(prompt):] != answer or prompt[-len(header):] != header:
        raise ValueError(f"{where}its last assistant turn does not encode on its own as it does in the conversation "
                         f"(a media marker in it?): {kept[last]['value'][:80]!r}")
    if len(ids) > max_length:
        raise ValueError(f"{where}its prompt ({len(prompt)} tokens) and answer ({len(answer)}) are {len(ids)} tokens, "
                         f"more than --data.max_length {max_length}: raise --data.max_length or give the inputs "
                         "fewer tiles or frames")
    return prompt, answer


# ----------------------------------------------------------------------------------------------------
# Sample transforms (classes, not closures, so that they pickle for the loader workers)


class _Conversations:
    """What training and evaluation share: the tokenizer, the visual inputs and the sequence budget."""

    def __init__(self, cfg: ConversationDataConfig, tokenizer: ChatTokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer  # pickles as its directory
        self.image = PLMImageTransform(cfg.vision_input, cfg.tile_size, cfg.max_num_tiles, normalize=False)

    def turns(self, sample: Mapping, meta: Mapping) -> list[dict]:
        turns = _turns(sample, meta)
        return without_media(turns) if self.cfg.text_only else turns

    def media(self, sample: Mapping, meta: Mapping) -> tuple[torch.Tensor, list[int]]:
        """uint8 ``(n, 3, S, S)`` tiles or frames (n = 0 for text) and the visual tokens per marker."""
        kind, fields = media_fields(sample, meta)
        size = self.cfg.tile_size
        if kind is None or self.cfg.text_only:
            return torch.empty((0, 3, size, size), dtype=torch.uint8), []
        if kind == "image":
            _check_visual_budget(sample, kind, self.image.num_tiles(*_image_size(sample, "jpg")), self.cfg)
            pixels = self.image(_decode_frame(sample, "jpg"))
        else:
            picked = sample_video_frames(len(fields), _fps(sample, meta), self.cfg.max_video_frames)
            _check_visual_budget(sample, kind, len(picked), self.cfg)
            pixels = video_frames([_decode_frame(sample, fields[i]) for i in picked], size, normalize=False)
        return pixels, [len(pixels) * self.cfg.tokens_per_tile]


class ConversationSampleTransform(_Conversations):
    """Raw sample -> ``{"conversation": {"media": uint8 (n, 3, S, S), "input_ids", "labels"}, "task", "key"}``;
    :func:`collate_training` makes the batch."""

    def __call__(self, sample: dict) -> dict:
        meta = _meta(sample)
        media, tokens = self.media(sample, meta)
        try:
            encoded = encode_conversation(self.tokenizer, self.turns(sample, meta), tokens, self.cfg.max_length,
                                          sample.get("__key__"))
        except ValueError as err:
            raise _with_shard(sample, err) from None
        return {"conversation": {"media": media, "input_ids": encoded["input_ids"], "labels": encoded["labels"]},
                "task": str(meta.get("task", "")), "key": sample["__key__"]}


class PromptSampleTransform(_Conversations):
    """Raw sample -> ``{"conversation": {"media", "input_ids" (the prompt), "answer_ids", "choices",
    "answer_index"}, "task", "key"}``, or None for a task left out by ``val_tasks`` (the stream drops it undecoded);
    :func:`collate_prompts` makes the batch."""

    def __call__(self, sample: dict) -> dict | None:
        meta = _meta(sample)
        task = str(meta.get("task", ""))
        if self.cfg.val_tasks is not None and task not in self.cfg.val_tasks:
            return None  # webdataset's map drops a None
        media, tokens = self.media(sample, meta)
        try:
            prompt, answer = encode_prompt(self.tokenizer, self.turns(sample, meta), tokens, self.cfg.max_length,
                                           sample.get("__key__"))
        except ValueError as err:
            raise _with_shard(sample, err) from None
        choices, index = self.choices(meta)
        return {"conversation": {"media": media, "input_ids": torch.tensor(prompt, dtype=torch.int64),
                                 "answer_ids": answer, "choices": choices, "answer_index": index},
                "task": task, "key": sample["__key__"]}

    def choices(self, meta: Mapping) -> tuple[list[list[int]], int]:
        """Every option's answer tokens and the right one's index for a multiple-choice sample; ([], -1) else."""
        index = meta.get("answer")
        if not isinstance(meta.get("options"), list) or isinstance(index, bool) or not isinstance(index, int):
            return [], -1
        return [answer_tokens(self.tokenizer, choice) for choice in mcq_choices(dict(meta))], index


class TaskFilter:
    """Keeps the raw training samples whose json 'task' is one of ``tasks``, before any image is decoded. A pure
    function of the sample, as the resumable stream needs."""

    def __init__(self, tasks: Sequence[str]):
        self.tasks = frozenset(tasks)

    def __call__(self, sample: dict, epoch: int) -> bool:
        meta = sample.get("json")
        try:
            meta = json.loads(meta) if isinstance(meta, (bytes, str)) else meta
        except ValueError:
            return True  # the transform names the sample and its bad json
        return not isinstance(meta, dict) or meta.get("task") in self.tasks


# ----------------------------------------------------------------------------------------------------
# Batches: streams.collate lists the transforms' "conversation" dicts; these finish them in the loader workers


def collate_training(batch: dict, pad_id: int) -> dict:
    """-> ``media`` (every sample's tiles, in sample order), ``input_ids``, ``attention_mask``, ``labels`` (right
    padded, ``chat.pad_batch``), ``task``, ``key``."""
    samples = batch["conversation"]
    return {"media": torch.cat([s["media"] for s in samples]), **pad_batch(samples, pad_id),
            "task": list(batch["task"]), "key": list(batch["key"])}


def collate_prompts(batch: dict, pad_id: int) -> dict:
    """-> ``media``, the prompts' ``input_ids`` and ``attention_mask`` (right padded), and per sample
    ``answer_ids``, ``choices``, ``answer_index``, ``task``, ``key``."""
    samples = batch["conversation"]
    padded = pad_batch([{"input_ids": s["input_ids"], "labels": s["input_ids"]} for s in samples], pad_id)
    return {"media": torch.cat([s["media"] for s in samples]), "input_ids": padded["input_ids"],
            "attention_mask": padded["attention_mask"], "answer_ids": [s["answer_ids"] for s in samples],
            "choices": [s["choices"] for s in samples], "answer_index": [s["answer_index"] for s in samples],
            "task": list(batch["task"]), "key": list(batch["key"])}


# ----------------------------------------------------------------------------------------------------
# The tokenizer of a run


def conversation_texts(shards: Sequence[str]) -> Iterator[str]:
    """The pieces of text the chat layout encodes, from the ``.json`` members of ``shards`` (no image is read): per
    turn its role, the blank line after the header, and its text between media markers."""
    for url in shards:
        for name, raw in json_members(url):
            try:
                turns = json.loads(raw).get("conversations")
            except (ValueError, AttributeError):
                log.warning("%s: member %s is not a json object; left out of the tokenizer's text", url, name)
                continue
            for turn in turns if isinstance(turns, list) else ():
                if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                    continue
                if _role(turn):
                    yield _role(turn)
                    yield "\n\n"
                yield from (piece for piece in _MARKERS.split(turn["value"].strip()) if piece)


def _load(directory: str | Path, flag: str) -> ChatTokenizer:
    try:
        return load_tokenizer(directory)
    except (OSError, ValueError) as err:
        raise ValueError(f"{flag} {str(directory)!r}: {err}") from None


def _tokenizer_settings(cfg: ConversationDataConfig) -> dict:
    return {"shards": cfg.train_shards, "vocab_size": cfg.vocab_size}


def _counted(texts: Iterator[str], counter: Counter) -> Iterator[str]:
    for text in texts:
        counter["pieces"] += 1
        yield text


def _train_into(directory: Path, cfg: ConversationDataConfig) -> None:
    """Train in a temporary sibling and rename it into place: a waiting rank never sees half a tokenizer."""
    start, counter = time.perf_counter(), Counter()
    shards = expand_shards(cfg.train_shards)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        tokenizer = train_tokenizer(_counted(conversation_texts(shards), counter), cfg.vocab_size, tmp)
        if not counter["pieces"]:
            raise ValueError(f"--data.train_shards {cfg.train_shards!r}: no conversation text in its json members to "
                             "train a tokenizer on; check the shards' 'conversations', or pass --data.tokenizer")
        (tmp / TOKENIZER_SETTINGS).write_text(json.dumps(_tokenizer_settings(cfg), indent=1) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, directory)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (directory / "tokenizer.json").is_file():
            raise
        return  # another writer got there first (same texts, same vocabulary)
    log.info("tokenizer: %d ids trained on %d text pieces of %d shard(s) in %.1f s -> %s", len(tokenizer),
             counter["pieces"], len(shards), time.perf_counter() - start, directory)


def _wait_for(path: Path, timeout_s: float, poll_s: float) -> None:
    waited = 0.0
    while not path.is_file():
        if waited >= timeout_s:
            raise TimeoutError(f"Waited {waited:.0f} s for rank 0 to train the tokenizer into {path.parent}; did it "
                               "fail?")
        if waited % 300 < poll_s:
            log.info("waiting for rank 0 to write %s", path)
        time.sleep(poll_s)
        waited += poll_s


def ensure_tokenizer(cfg: ConversationDataConfig, run_dir: str | Path, is_writer: bool | None = None,
                     timeout_s: float = 24 * 3600, poll_s: float = 5.0) -> str:
    """The directory of the run's tokenizer. ``--data.tokenizer`` when given (checked); else ``<run_dir>/tokenizer``,
    trained on the training shards' conversations by the one process with ``is_writer`` (default: global rank 0)
    unless it exists already (a resumed run keeps its ids), while the others wait for it."""
    if cfg.tokenizer is not None:
        _load(cfg.tokenizer, "--data.tokenizer")
        return str(cfg.tokenizer)
    resolve_conversation_shards(cfg)
    directory = Path(run_dir) / TOKENIZER_DIR
    writer = rank_zero_only.rank == 0 if is_writer is None else is_writer
    if writer and not (directory / "tokenizer.json").is_file():
        if directory.exists() and any(directory.iterdir()):
            raise ValueError(f"{directory} exists without a tokenizer.json: delete it to train the tokenizer anew, "
                             "or pass --data.tokenizer")
        _train_into(directory, cfg)
    _wait_for(directory / "tokenizer.json", timeout_s, poll_s)
    _load(directory, "the run's tokenizer")
    settings_file = directory / TOKENIZER_SETTINGS
    saved = json.loads(settings_file.read_text()) if settings_file.is_file() else None
    if writer and saved is not None and saved != _tokenizer_settings(cfg):
        log.warning("Keeping the run's tokenizer %s (the model's embeddings are sized to it), although it was trained "
                    "with other settings: %s, now %s. Start a new run_dir to train another.", directory, saved,
                    _tokenizer_settings(cfg))
    return str(directory)


# ----------------------------------------------------------------------------------------------------
# The datamodule


class ConversationDataModule(ShardedDataModule):
    """Conversation shards -> PerceptionLM training batches and evaluation prompts (module docstring).

    ``tokenizer``: the directory :func:`ensure_tokenizer` returns (or a loaded ChatTokenizer). Call
    ``check_conversation_shards(cfg)`` first to fill in the synthetic world and fail before any compute.
    """

    def __init__(self, cfg: ConversationDataConfig, tokenizer: str | Path | ChatTokenizer, seed: int = 0,
                 mean: Sequence[float] = PE_MEAN, std: Sequence[float] = PE_STD):
        tok = tokenizer if isinstance(tokenizer, ChatTokenizer) else _load(tokenizer, "tokenizer")
        super().__init__(cfg, ConversationSampleTransform(cfg, tok), PromptSampleTransform(cfg, tok), seed=seed,
                         mean=mean, std=std, required_keys=("json",),
                         train_sample_filter=TaskFilter(cfg.tasks) if cfg.tasks else None)
        self.tokenizer = tok

    def setup(self, stage: str | None = None) -> None:
        resolve_conversation_shards(self.cfg)
        super().setup(stage)

    def _batches_per_epoch(self, shards: list[str], world: int) -> int:
        batches = super()._batches_per_epoch(shards, world)
        if self.cfg.batches_per_epoch is not None or not self.cfg.tasks:
            return batches
        # The index counts every task: their share in the first shards sizes the epoch (json members only)
        kept, seen = _task_counts(shards, self.cfg.tasks)
        if not kept:
            raise _no_task_sample("train_shards", shards, self.cfg.tasks, seen)
        scaled = max(1, batches * kept // sum(seen.values()))
        rank_zero_info(f"Train data: tasks {self.cfg.tasks} are {kept} of {sum(seen.values())} samples read from "
                       f"{shards[0]}, ...: {scaled} batches per epoch (set --data.batches_per_epoch for an exact "
                       "count)")
        return scaled

    def train_dataloader(self) -> ShardLoader:
        loader = super().train_dataloader()
        # The workers pad and concatenate: the training process receives finished (and pinned) batches
        loader.loader.collate_fn = functools.partial(collate_training, pad_id=self.tokenizer.pad_token_id)
        return loader

    def val_dataloader(self) -> ShardLoader | list:
        loader = super().val_dataloader()
        if isinstance(loader, ShardLoader):
            loader.loader.collate_fn = functools.partial(collate_prompts, pad_id=self.tokenizer.pad_token_id)
        return loader

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        media = batch.get("media") if isinstance(batch, dict) else None
        if isinstance(media, torch.Tensor) and media.dtype == torch.uint8:
            batch["media"] = normalize_on_device(media, self.mean, self.std)
        return super().on_after_batch_transfer(batch, dataloader_idx)  # then the precision's cast


# ----------------------------------------------------------------------------------------------------
# Checks before compute, and the built-in data


SYNTHETIC_CONVERSATIONS: dict = {}
"""The built-in data: ``ConversationWorldConfig`` fields ({}: its defaults, 3500 training conversations in 28 shards
and 512 validation ones about other scenes, 64 px, every task; built once in about 20 s on 2 cores)."""


def resolve_conversation_shards(cfg: ConversationDataConfig) -> None:
    """With no ``--data.train_shards``, fill in the synthetic conversation world (built once, cached), validating on
    its val split unless ``--data.val_shards`` is given."""
    if cfg.train_shards is None:
        world = ensure_conversation_world(ConversationWorldConfig(**SYNTHETIC_CONVERSATIONS))
        cfg.train_shards, cfg.val_shards = world.train_shards, cfg.val_shards or world.val_shards


def _task_of(raw: object) -> str:
    try:
        task = json.loads(raw).get("task") if isinstance(raw, (bytes, str)) else None
    except (ValueError, AttributeError):
        task = None
    return str(task)


def _task_counts(urls: Sequence[str], tasks: Sequence[str]) -> tuple[int, Counter]:
    """(samples of ``tasks``, samples per task) in the first shard that has any of them, from the json members alone;
    at most PREFLIGHT_SHARDS shards are read (the counts then cover them all)."""
    seen = Counter()
    for url in urls[:PREFLIGHT_SHARDS]:
        seen.update(_task_of(raw) for _, raw in json_members(url))
        if any(seen[t] for t in tasks):
            break
    return sum(seen[t] for t in tasks), seen


def _no_task_sample(name: str, urls: Sequence[str], tasks: Sequence[str], seen: Counter) -> ValueError:
    read = urls[:PREFLIGHT_SHARDS]
    flag = "val_tasks" if name == "val_shards" else "tasks"
    return ValueError(f"--data.{name}: no sample of --data.{flag} {list(tasks)} among the {sum(seen.values())} "
                      f"samples of its first {len(read)} shard(s) ({read[0]}, ...; their tasks: "
                      f"{dict(seen.most_common())}). Fix the task names, or drop --data.{flag} to use every sample.")


def _leading_samples(urls: Sequence[str], name: str, tasks: Sequence[str] | None) -> list[dict]:
    """The first PREFLIGHT_SAMPLES samples of the first shard (with ``tasks``: of those tasks, from as many of the
    first PREFLIGHT_SHARDS shards as it takes), undecoded."""
    reader = ShardReader(required_keys=(), max_corrupt_fraction=0.0, min_samples_for_corrupt_check=1 << 30)
    samples = reader.tar_samples(reader.finite_urls(urls[: 1 if tasks is None else PREFLIGHT_SHARDS]))
    found, seen = [], Counter()
    try:
        for sample in samples:
            task = _task_of(sample.get("json"))
            seen[task] += 1
            if tasks is None or task in tasks:
                found.append(sample)
            if len(found) == PREFLIGHT_SAMPLES:
                break
    finally:
        samples.close()
    if tasks is not None and seen and not found:
        raise _no_task_sample(name, urls, tasks, seen)
    if not found:
        raise ValueError(f"--data.{name}: shard {urls[0]} holds no readable sample. Check it with `tar tf {urls[0]}`.")
    return found


def check_sample(sample: Mapping, cfg: ConversationDataConfig, tokenizer: ChatTokenizer | None = None,
                 prompt: bool = False) -> None:
    """What a sample needs, read from its json and image headers (no pixel decoded): conversation turns with an
    assistant one, the pixels its marker stands for, visual tokens that leave room for text in ``max_length``, and,
    with a tokenizer, an encoding (``prompt``: the evaluation prompt) within ``max_length``."""
    meta = _meta(sample)
    turns = _turns(sample, meta)
    _last_answer(turns, _where(sample))
    kind, fields = media_fields(sample, meta)
    tokens = []
    if cfg.text_only:
        turns = without_media(turns)
    elif kind is not None:
        image = PLMImageTransform(cfg.vision_input, cfg.tile_size, cfg.max_num_tiles, normalize=False)
        count = (image.num_tiles(*_image_size(sample, "jpg")) if kind == "image" else
                 len(sample_video_frames(len(fields), _fps(sample, meta), cfg.max_video_frames)))
        _check_visual_budget(sample, kind, count, cfg)
        tokens = [count * cfg.tokens_per_tile]
    if tokenizer is None:
        return
    try:
        if prompt:
            encode_prompt(tokenizer, turns, tokens, cfg.max_length, sample.get("__key__"))
        else:
            encode_conversation(tokenizer, turns, tokens, cfg.max_length, sample.get("__key__"))
    except ValueError as err:
        raise _with_shard(sample, err) from None


def check_conversation_shards(cfg: ConversationDataConfig, tokenizer: str | Path | None = None) -> None:
    """Fail before the model is built when the shards cannot feed PerceptionLM: the first samples (of ``--data.tasks``)
    of the first training and validation shard must pass ``check_sample``, and ``--data.tokenizer`` (when given) must
    load with the chat tokens and ``<|image|>``. With a tokenizer (``tokenizer`` or ``--data.tokenizer``) those
    samples are also encoded. With no ``--data.train_shards`` the built-in synthetic conversations are filled in."""
    tok = _load(cfg.tokenizer, "--data.tokenizer") if cfg.tokenizer is not None else None
    if tokenizer is not None:
        tok = _load(tokenizer, "tokenizer")
    resolve_conversation_shards(cfg)
    shards = resolve_shards(cfg)
    for (name, prompt, tasks), urls in zip((("train_shards", False, cfg.tasks), ("val_shards", True, cfg.val_tasks)),
                                           shards):
        for sample in _leading_samples(urls, name, tasks):
            try:
                check_sample(sample, cfg, tok, prompt)
            except ValueError as err:
                raise ValueError(f"--data.{name}: {err}") from None
