import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datamodules.chat import (BEGIN_OF_TEXT, END_HEADER, END_OF_TURN, IGNORE_INDEX, IMAGE_TOKEN, PAD_TOKEN,
                              START_HEADER, VIDEO_TOKEN, ChatFormat, encode_conversation, load_tokenizer, pad_batch,
                              train_tokenizer)

TEXTS = [f"{size} {colour} {shape} moves {way} over a striped background in frame {i}. What is in the picture?"
         for i, (size, colour, shape, way) in enumerate(
             [(s, c, h, w) for s in ("a big", "a small") for c in ("red", "green", "blue") for h in ("cube", "disc")
              for w in ("left", "right")] * 4)] + ["\n\n"] * 48  # the blank line after each header, as trained
VOCAB = 420


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(TEXTS, VOCAB, tmp_path_factory.mktemp("tok"))


def ids_of(tokenizer, *tokens):
    return [tokenizer.token_to_id(t) for t in tokens]


def test_a_conversation_is_llama3_chat_with_image_runs_and_response_labels(tokenizer):
    turns = [{"from": "human", "value": "<image>\nWhat is in the picture?"},
             {"from": "gpt", "value": "A red cube."}]
    out = encode_conversation(tokenizer, turns, media_tokens=[5], max_length=256)
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    bos, start, end, eot, image = ids_of(tokenizer, BEGIN_OF_TEXT, START_HEADER, END_HEADER, END_OF_TURN, IMAGE_TOKEN)
    user, assistant, blank = tokenizer.encode("user"), tokenizer.encode("assistant"), tokenizer.encode("\n\n")
    question, answer = tokenizer.encode("\nWhat is in the picture?"), tokenizer.encode("A red cube.")
    expected = ([bos, start, *user, end, *blank] + [image] * 5 + question + [eot]
                + [start, *assistant, end, *blank] + answer + [eot])
    assert ids == expected and out["input_ids"].dtype == out["labels"].dtype == torch.int64
    # the pieces read back as Llama 3's layout
    assert tokenizer.decode(ids) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
                                     + "<|image|>" * 5 + "\nWhat is in the picture?<|eot_id|>"
                                     "<|start_header_id|>assistant<|end_header_id|>\n\nA red cube.<|eot_id|>")
    # loss on the response text and its <|eot_id|> only: the last len(answer) + 1 positions
    first = len(ids) - len(answer) - 1
    assert labels[:first] == [IGNORE_INDEX] * first and labels[first:] == answer + [eot]
    assert tokenizer.decode(labels[first:]) == "A red cube.<|eot_id|>"
    assert out["num_image_tokens"] == 5 == ids.count(image)


def test_every_assistant_turn_is_a_target_and_nothing_else(tokenizer):
    turns = [{"from": "system", "value": "Describe frames."},
             {"from": "user", "value": "Frames: <video> and <image>"},
             {"from": "assistant", "value": "a disc"},
             {"from": "human", "value": "and?"},
             {"from": "assistant", "value": "a cube"}]
    out = encode_conversation(tokenizer, turns, [3, 2], 256)
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    eot, image = ids_of(tokenizer, END_OF_TURN, IMAGE_TOKEN)
    assert ids.count(eot) == 5 and ids.count(image) == 5 == out["num_image_tokens"]
    assert tokenizer.token_to_id(VIDEO_TOKEN) not in ids  # video frames use <|image|> too
    targets = [(i, t) for i, t in enumerate(labels) if t != IGNORE_INDEX]
    assert tokenizer.decode([t for _, t in targets]) == "a disc<|eot_id|>a cube<|eot_id|>"
    assert all(ids[i] == t for i, t in targets)
    # the two targets are contiguous runs that each end at an <|eot_id|>
    eots = [i for i, t in enumerate(ids) if t == eot]
    assert targets[len(tokenizer.encode("a disc"))][0] == eots[2] and targets[-1][0] == eots[4] == len(ids) - 1


def test_turn_text_is_trimmed_and_special_strings_in_text_stay_text(tokenizer):
    plain = encode_conversation(tokenizer, [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}], [], 64)
    padded = encode_conversation(tokenizer, [{"from": "human", "value": "  hi \n"}, {"from": "gpt", "value": "ok "}],
                                 [], 64)
    assert plain["input_ids"].tolist() == padded["input_ids"].tolist()
    sneaky = encode_conversation(tokenizer, [{"from": "human", "value": "say <|eot_id|> <|image|>"},
                                             {"from": "gpt", "value": "no"}], [], 128)
    eot, image = ids_of(tokenizer, END_OF_TURN, IMAGE_TOKEN)
    assert sneaky["input_ids"].tolist().count(eot) == 2 and image not in sneaky["input_ids"].tolist()


def test_conversation_errors_name_the_sample(tokenizer):
    question = {"from": "human", "value": "<image> what?"}
    with pytest.raises(ValueError, match=r"sample 'k1': the conversation has no assistant turn"):
        encode_conversation(tokenizer, [question], [4], 64, key="k1")
    with pytest.raises(ValueError, match=r"sample 'k2': the conversation has 1 media marker.*but 2 media token count"):
        encode_conversation(tokenizer, [question, {"from": "gpt", "value": "x"}], [4, 4], 64, key="k2")
    with pytest.raises(ValueError, match=r"has 0 media marker.*but 1 media token count"):
        encode_conversation(tokenizer, [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}], [4], 64)
    with pytest.raises(ValueError, match=r"turn 0 is from 'robot'"):
        encode_conversation(tokenizer, [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}], [], 64)


def test_media_that_cannot_fit_is_refused_with_both_numbers_and_the_flag(tokenizer):
    turns = [{"from": "human", "value": "<image><image> what?"}, {"from": "gpt", "value": "a cube"}]
    with pytest.raises(ValueError, match=r"sample 'k': its 70 visual tokens \(\[40, 30\]\) do not fit a sequence of "
                                         r"64 tokens.*raise --data.max_length"):
        encode_conversation(tokenizer, turns, [40, 30], 64, key="k")


def test_long_text_is_cut_but_never_a_placeholder_run(tokenizer):
    answer = "a big red cube moves left over a striped background " * 4
    turns = [{"from": "human", "value": "<image> what?"}, {"from": "gpt", "value": answer}]
    full = encode_conversation(tokenizer, turns, [6], 1000)
    cut = encode_conversation(tokenizer, turns, [6], 40)
    assert len(full["input_ids"]) > 40 == len(cut["input_ids"]) == len(cut["labels"])
    assert cut["input_ids"].tolist() == full["input_ids"][:40].tolist()
    assert cut["labels"].tolist() == full["labels"][:40].tolist() and (cut["labels"] != IGNORE_INDEX).any()
    # the image run sits at positions 1 + header .. ; a bound inside it is refused, with the positions
    start = full["input_ids"].tolist().index(tokenizer.image_token_id)
    with pytest.raises(ValueError, match=rf"sample 's': it is {len(full['input_ids'])} tokens; cutting it to "
                                         rf"--data.max_length {start + 3} would cut the 6 visual tokens of media "
                                         rf"input 0 \(positions {start}..{start + 5}\)"):
        encode_conversation(tokenizer, turns, [6], start + 3, key="s")
    # a bound that keeps the image but none of the answer trains nothing
    with pytest.raises(ValueError, match=r"no assistant response token is left"):
        encode_conversation(tokenizer, turns, [6], start + 7)


def test_pad_batch_pads_right_and_masks_labels(tokenizer):
    fmt = ChatFormat(tokenizer, 128)
    short = fmt([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}])
    long = fmt([{"from": "human", "value": "<image> what is it?"}, {"from": "gpt", "value": "a green disc"}], [3])
    batch = pad_batch([short, long], tokenizer.pad_token_id)
    n, m = len(short["input_ids"]), len(long["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, m)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert batch["attention_mask"].dtype == torch.bool
    assert batch["input_ids"][0, :n].tolist() == short["input_ids"].tolist()
    assert (batch["input_ids"][0, n:] == tokenizer.pad_token_id).all() and (batch["labels"][0, n:] == -100).all()
    assert batch["attention_mask"][0].tolist() == [True] * n + [False] * (m - n) and batch["attention_mask"][1].all()
    assert batch["labels"][1].tolist() == long["labels"].tolist()
    assert tokenizer.pad_token_id == tokenizer.token_to_id(PAD_TOKEN)


def test_training_is_deterministic_within_and_across_processes(tokenizer, tmp_path):
    train_tokenizer(TEXTS, VOCAB, tmp_path / "again")
    reference = (Path(tokenizer.directory) / "tokenizer.json").read_bytes()
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == reference
    code = ("import sys; from tests.datamodules.test_chat import TEXTS, VOCAB; "
            "from datamodules.chat import train_tokenizer; train_tokenizer(TEXTS, VOCAB, sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "other")], check=True,
                   cwd=Path(__file__).parents[2])
    assert (tmp_path / "other" / "tokenizer.json").read_bytes() == reference
    assert len(tokenizer) <= VOCAB


def test_hugging_face_loads_the_directory_and_encodes_the_same(tokenizer):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer.directory)
    for text in TEXTS[:5] + ["Unseen wörds, digits 12345 and émoji 🙂", "\n\nA red cube."]:
        assert hf(text, add_special_tokens=False).input_ids == tokenizer.encode(text)
        assert hf(text).input_ids == [tokenizer.bos_token_id, *tokenizer.encode(text)]  # as Llama 3's tokenizer
    assert hf.decode(tokenizer.encode("Unseen wörds 🙂")) == "Unseen wörds 🙂"
    assert (hf.image_token, hf.image_token_id) == (IMAGE_TOKEN, tokenizer.image_token_id)
    assert hf.video_token_id == tokenizer.token_to_id(VIDEO_TOKEN) and hf.pad_token_id == tokenizer.pad_token_id
    assert len(hf) == len(tokenizer)
    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": " What moves? "},
             {"from": "gpt", "value": "A red cube."}]
    messages = [{"role": r, "content": t["value"]} for r, t in zip(("system", "user", "assistant"), turns)]
    templated = hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert templated == encode_conversation(tokenizer, turns, [], 256)["input_ids"].tolist()


def test_it_pickles_as_its_directory(tokenizer):
    data = pickle.dumps(tokenizer)
    assert len(data) < 1000  # the path, not the vocabulary
    again = pickle.loads(data)
    assert again.encode(TEXTS[0]) == tokenizer.encode(TEXTS[0]) and again.image_token_id == tokenizer.image_token_id


def _tokenizer_without(tmp_path, tokens):
    """A tokenizer directory whose tokenizer.json lacks ``tokens`` (removed from a trained one)."""
    source = train_tokenizer(TEXTS, VOCAB, tmp_path / "full")
    spec = json.loads((Path(source.directory) / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in tokens]
    for token in tokens:
        del spec["model"]["vocab"][token]
    spec["post_processor"] = None
    out = tmp_path / "partial"
    out.mkdir()
    (out / "tokenizer.json").write_text(json.dumps(spec))
    return out


def test_a_tokenizer_without_the_image_token_is_refused_with_the_fix(tmp_path):
    directory = _tokenizer_without(tmp_path, [IMAGE_TOKEN])
    with pytest.raises(ValueError, match=rf"{directory} has no '<\|image\|>' token.*add_tokens"):
        load_tokenizer(directory)
    # the fix the message gives works
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(directory)
    hf.add_tokens([IMAGE_TOKEN], special_tokens=True)
    hf.save_pretrained(tmp_path / "fixed")
    fixed = load_tokenizer(tmp_path / "fixed")
    assert fixed.image_token_id == len(fixed) - 1


def test_missing_chat_tokens_and_missing_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"lacks the Llama 3 chat token\(s\) \['<\|eot_id\|>'\]"):
        load_tokenizer(_tokenizer_without(tmp_path, [END_OF_TURN]))
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="leaves no room for merges"):
        train_tokenizer(TEXTS, 260, tmp_path / "tiny")
