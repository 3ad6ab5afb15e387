"""The language side of PerceptionLM (Cho et al. 2025): the LM tokenizer and the Llama 3 chat layout of a
training conversation, with the visual placeholder tokens and the response-only labels.

A conversation is a list of turns ``{"from": "human" | "user" | "gpt" | "assistant" | "system", "value": str}``
(PLM's jsonl, facebookresearch/perception_models apps/plm/docs/training.md) whose text holds one ``<image>`` or
``<video>`` marker per visual input, in order. It becomes Llama 3's chat layout (meta-llama/llama3
llama/tokenizer.py:ChatFormat, which also strips each message)::

    <|begin_of_text|> then, per turn, <|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>

where each marker is replaced by a run of ``<|image|>`` placeholders, one per visual token of that input (tiles
and video frames alike: the model scatters the projected features of every input into these positions,
perception_models apps/plm/transformer.py:stitch_images_into_text). ``labels`` equal ``input_ids`` on the
assistant responses (their text and their ``<|eot_id|>``) and ``-100`` everywhere else, so that the loss covers
the responses only; they are not shifted (Hugging Face's causal-LM loss shifts them).

The tokenizer is any Hugging Face tokenizer directory that has the chat tokens and ``<|image|>`` (a Llama 3
tokenizer with ``<|image|>`` added, as PLM's own, or one from :func:`train_tokenizer`). No LM vocabulary ships
in any wheel, so offline runs train a byte-level BPE on local text (captions of the synthetic world, say);
its special tokens keep Llama 3's names, so code written against it works unchanged with a real Llama 3
tokenizer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from batch_contract import IGNORE_INDEX

__all__ = ["BEGIN_OF_TEXT", "END_OF_TEXT", "START_HEADER", "END_HEADER", "END_OF_TURN", "IMAGE_TOKEN",
           "VIDEO_TOKEN", "PAD_TOKEN", "SPECIAL_TOKENS", "IGNORE_INDEX", "IMAGE_MARKER", "VIDEO_MARKER",
           "MEDIA_MARKERS", "ROLES",
           "LLAMA3_CHAT_TEMPLATE", "ChatTokenizer", "ChatFormat", "train_tokenizer", "load_tokenizer",
           "encode_conversation", "pad_batch"]

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
END_OF_TURN = "<|eot_id|>"
IMAGE_TOKEN = "<|image|>"
"""The visual placeholder; PLM's tokenizer (and transformers' PerceptionLMProcessor, ``tokenizer.image_token``)
names it so, at id 128002 of the Llama 3 vocabulary."""
VIDEO_TOKEN = "<|video|>"
"""transformers' PerceptionLMProcessor marks video features with it (``tokenizer.video_token``); PLM training, and
so :func:`encode_conversation`, uses ``<|image|>`` for video frames too."""
PAD_TOKEN = "<|finetune_right_pad_id|>"
"""Llama 3.1's padding token (id 128004); a tokenizer without it pads with ``<|end_of_text|>`` (padding is masked
out of attention and loss, so its id never matters)."""
SPECIAL_TOKENS = (BEGIN_OF_TEXT, END_OF_TEXT, START_HEADER, END_HEADER, END_OF_TURN, IMAGE_TOKEN, VIDEO_TOKEN,
                  PAD_TOKEN)
_CHAT_TOKENS = (BEGIN_OF_TEXT, START_HEADER, END_HEADER, END_OF_TURN)
IMAGE_MARKER, VIDEO_MARKER = "<image>", "<video>"
MEDIA_MARKERS = (IMAGE_MARKER, VIDEO_MARKER)
_MARKER = re.compile("|".join(map(re.escape, MEDIA_MARKERS)))
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
"""PLM's jsonl speakers (``from``) -> Llama 3 header roles."""
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
"""Meta-Llama-3-Instruct's chat template (its tokenizer_config.json), saved with a trained tokenizer so that
``apply_chat_template`` lays a text-only conversation out exactly as :func:`encode_conversation` does."""
_FLAG = "--data.max_length"


class ChatTokenizer:
    """A ``tokenizers.Tokenizer`` with the ids of the chat tokens resolved; what :func:`load_tokenizer` returns.

    Special-token strings inside conversation text are encoded as plain text (``encode_special_tokens``): a caption
    that happens to contain ``<|image|>`` must not create a placeholder without features. It pickles as its
    directory, so a loader worker reloads it instead of receiving the whole vocabulary.
    """

    def __init__(self, tokenizer: Tokenizer, directory: str | Path, pad_token: str):
        self.tokenizer = tokenizer
        self.tokenizer.encode_special_tokens = True
        self.directory = str(directory)
        ids = {name: tokenizer.token_to_id(name) for name in (*_CHAT_TOKENS, IMAGE_TOKEN, pad_token)}
        self.bos_token_id = ids[BEGIN_OF_TEXT]
        self.start_header_id = ids[START_HEADER]
        self.end_header_id = ids[END_HEADER]
        self.eot_token_id = ids[END_OF_TURN]
        self.image_token_id = ids[IMAGE_TOKEN]
        self.pad_token_id = ids[pad_token]

    def __reduce__(self):
        return load_tokenizer, (self.directory,)

    def __len__(self) -> int:
        """Ids in use, added tokens included: the decoder's embedding rows."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without any special token added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


# ----------------------------------------------------------------------------------------------------
# Training and loading


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
"""Llama 3's pre-tokenization pattern (meta-llama/llama3 llama/tokenizer.py: pat_str)."""


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: str | Path) -> ChatTokenizer:
    """Train a byte-level BPE (GPT-2's and Llama 3's kind: every byte is a base token, so no text is unknown) with
    Llama 3's special tokens, save it as a Hugging Face tokenizer directory at ``path`` and load it back.

    ``transformers.AutoTokenizer.from_pretrained(path)`` loads the directory (``tokenizer.image_token`` included);
    the same texts give the same vocabulary (the BPE trainer breaks count ties by token order, not by chance).
    """
    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size <= floor:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for merges: the 256 byte tokens and "
                         f"{len(SPECIAL_TOKENS)} special tokens take {floor} ids")
    tokenizer = Tokenizer(models.BPE())
    # Llama 3's pre-tokenizer (its tokenizer.json: this split, then bytes): a run of line breaks is one piece, so
    # "\n\n" after a header encodes alike on its own and inside a whole chat-templated string
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    # Llama 3's tokenizer.json prepends <|begin_of_text|> when special tokens are asked for; ours does the same so
    # that Hugging Face code treats both alike (Prism's own encoding never asks for them).
    bos = (BEGIN_OF_TEXT, tokenizer.token_to_id(BEGIN_OF_TEXT))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BEGIN_OF_TEXT} $A:0", pair=f"{BEGIN_OF_TEXT} $A:0 {BEGIN_OF_TEXT}:1 $B:1", special_tokens=[bos])
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    _write_hf_config(directory)
    return load_tokenizer(directory)


def _write_hf_config(directory: Path) -> None:
    # Written by hand rather than with transformers' save_pretrained, which names its own version's class
    # (transformers 5: "TokenizersBackend", unknown to 4.x); "PreTrainedTokenizerFast" loads in both.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BEGIN_OF_TEXT,
        "eos_token": END_OF_TURN,  # Llama 3 Instruct's: generation stops at the end of the assistant turn
        "pad_token": PAD_TOKEN,
        "extra_special_tokens": {"image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN},
        "chat_template": LLAMA3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special_map = {key: config[key] for key in ("bos_token", "eos_token", "pad_token")}
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, sort_keys=True) + "\n")


def load_tokenizer(directory: str | Path) -> ChatTokenizer:
    """A Hugging Face tokenizer directory (its ``tokenizer.json``) as a :class:`ChatTokenizer`; it must hold the
    Llama 3 chat tokens and ``<|image|>``."""
    directory = Path(directory)
    file = directory / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"{directory} has no tokenizer.json: the LM tokenizer must be a Hugging Face tokenizer directory (write "
            "one with transformers.AutoTokenizer.from_pretrained(...).save_pretrained(dir), or train one offline "
            "with datamodules.chat.train_tokenizer)")
    tokenizer = Tokenizer.from_file(str(file))
    missing = [name for name in _CHAT_TOKENS if tokenizer.token_to_id(name) is None]
    if missing:
        raise ValueError(f"The tokenizer in {directory} lacks the Llama 3 chat token(s) {missing}: PLM lays "
                         "conversations out in Llama 3's chat format, so use a Llama 3 (Instruct) tokenizer or "
                         "one from datamodules.chat.train_tokenizer")
    if tokenizer.token_to_id(IMAGE_TOKEN) is None:
        raise ValueError(
            f"The tokenizer in {directory} has no {IMAGE_TOKEN!r} token, the placeholder that visual tokens replace. "
            f"Add it: tok = transformers.AutoTokenizer.from_pretrained({str(directory)!r}); "
            f"tok.add_tokens([{IMAGE_TOKEN!r}], special_tokens=True); tok.save_pretrained(...) (and build the model "
            f"with vocab_size=len(tok)); PLM's own tokenizer instead renames Llama 3's "
            f"<|reserved_special_token_0|> (id 128002) to {IMAGE_TOKEN} in tokenizer.json")
    return ChatTokenizer(tokenizer, directory, _pad_token(tokenizer, directory))


def _pad_token(tokenizer: Tokenizer, directory: Path) -> str:
    config_file = directory / "tokenizer_config.json"
    configured = json.loads(config_file.read_text()).get("pad_token") if config_file.is_file() else None
    if isinstance(configured, Mapping):  # older configs store an AddedToken as a dict
        configured = configured.get("content")
    # <|eot_id|> is always there (load_tokenizer checked it), so the search ends
    return next(name for name in (configured, PAD_TOKEN, END_OF_TEXT, END_OF_TURN)
                if name and tokenizer.token_to_id(name) is not None)


# ----------------------------------------------------------------------------------------------------
# Conversations


def _role(turn: Mapping, index: int, where: str) -> str:
    speaker = turn.get("from", turn.get("role"))
    if speaker not in ROLES:
        raise ValueError(f"{where}turn {index} is from {speaker!r}; a turn's 'from' must be one of {sorted(ROLES)}")
    if not isinstance(turn.get("value"), str):
        raise ValueError(f"{where}turn {index} has no text: its 'value' must be a string, got {turn.get('value')!r}")
    return ROLES[speaker]


def _pieces(tokenizer: ChatTokenizer, turns: Sequence[Mapping], media_tokens: Sequence[int], where: str):
    """The conversation as ``(ids, supervised, media_index)`` pieces in order; ``media_index`` is None on text."""
    roles = [_role(turn, i, where) for i, turn in enumerate(turns)]
    if "assistant" not in roles:
        raise ValueError(f"{where}the conversation has no assistant turn (speakers: {[t.get('from') for t in turns]}):"
                         " with the loss on assistant responses only it would train nothing")
    markers = sum(len(_MARKER.findall(turn["value"])) for turn in turns)
    if markers != len(media_tokens):
        raise ValueError(f"{where}the conversation has {markers} media marker(s) ({' / '.join(MEDIA_MARKERS)}) but "
                         f"{len(media_tokens)} media token count(s) were given: one per marker, in order")
    pieces, media = [([tokenizer.bos_token_id], False, None)], iter(range(len(media_tokens)))
    for role, turn in zip(roles, turns):
        answer = role == "assistant"
        header = [tokenizer.start_header_id, *tokenizer.encode(role), tokenizer.end_header_id]
        pieces.append((header + tokenizer.encode("\n\n"), False, None))
        # Stripped as Llama 3's ChatFormat.encode_message and its Instruct chat template do
        texts = _MARKER.split(turn["value"].strip())
        for k, text in enumerate(texts):
            if k:
                index = next(media)
                pieces.append(([tokenizer.image_token_id] * media_tokens[index], False, index))
            if text:
                pieces.append((tokenizer.encode(text), answer, None))
        pieces.append(([tokenizer.eot_token_id], answer, None))
    return pieces


def encode_conversation(tokenizer: ChatTokenizer, turns: Sequence[Mapping], media_tokens: Sequence[int],
                        max_length: int, key: str | None = None) -> dict:
    """A conversation -> ``{"input_ids": int64 (L,), "labels": int64 (L,), "num_image_tokens": int}``, L <=
    ``max_length``.

    ``media_tokens[i]`` is the number of visual tokens of the i-th ``<image>`` / ``<video>`` marker (tiles x tokens
    per tile, or frames x tokens per frame). A conversation longer than ``max_length`` loses its last text tokens;
    one whose cut would fall inside or before a placeholder run, or would leave no response token, is refused:
    the model needs every visual token of every input, and a sample without a target trains nothing. Errors
    name ``key`` (the sample's WebDataset key) when given.
    """
    where = f"sample {key!r}: " if key is not None else ""
    if any(n < 1 for n in media_tokens):
        raise ValueError(f"{where}every media input needs at least one visual token, got {list(media_tokens)}")
    total_media = sum(media_tokens)
    if total_media >= max_length:
        raise ValueError(f"{where}its {total_media} visual tokens ({list(media_tokens)}) do not fit a sequence of "
                         f"{max_length} tokens with any text: raise {_FLAG} or give the inputs fewer tiles or frames")
    ids, labels, spans = [], [], []
    for piece, supervised, media_index in _pieces(tokenizer, turns, media_tokens, where):
        if media_index is not None:
            spans.append((media_index, len(ids), len(ids) + len(piece)))
        ids += piece
        labels += piece if supervised else [IGNORE_INDEX] * len(piece)
    if len(ids) > max_length:
        cut = [(i, start, end) for i, start, end in spans if end > max_length]
        if cut:
            i, start, end = cut[0]
            raise ValueError(f"{where}it is {len(ids)} tokens; cutting it to {_FLAG} {max_length} would cut the "
                             f"{media_tokens[i]} visual tokens of media input {i} (positions {start}..{end - 1}): "
                             f"raise {_FLAG} or give the inputs fewer tiles or frames")
        ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise ValueError(f"{where}cut to {_FLAG} {max_length} tokens, no assistant response token is left to train "
                         f"on: raise {_FLAG}")
    return {"input_ids": torch.tensor(ids, dtype=torch.int64), "labels": torch.tensor(labels, dtype=torch.int64),
            "num_image_tokens": total_media}


class ChatFormat:
    """``encode_conversation`` with its tokenizer and length bound, as a picklable callable for loader workers."""

    def __init__(self, tokenizer: ChatTokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, turns: Sequence[Mapping], media_tokens: Sequence[int] = (), key: str | None = None) -> dict:
        return encode_conversation(self.tokenizer, turns, media_tokens, self.max_length, key)


def pad_batch(samples: Sequence[Mapping], pad_id: int) -> dict[str, torch.Tensor]:
    """Samples of :func:`encode_conversation` -> ``{"input_ids": int64 (B, L), "attention_mask": bool (B, L),
    "labels": int64 (B, L)}``, padded on the right to the longest (pad id in ``input_ids``, -100 in ``labels``)."""
    if not samples:
        raise ValueError("pad_batch needs at least one sample")
    lengths = [len(sample["input_ids"]) for sample in samples]
    input_ids = torch.full((len(samples), max(lengths)), pad_id, dtype=torch.int64)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, (sample, length) in enumerate(zip(samples, lengths)):
        input_ids[row, :length] = torch.as_tensor(sample["input_ids"], dtype=torch.int64)
        labels[row, :length] = torch.as_tensor(sample["labels"], dtype=torch.int64)
    attention_mask = torch.arange(input_ids.shape[1]) < torch.tensor(lengths).unsqueeze(1)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
