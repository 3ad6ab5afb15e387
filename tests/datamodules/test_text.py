import pickle
from pathlib import Path

import open_clip
import pytest
import torch

from datamodules.text import PE_CORE_CONTEXT, CaptionTokenizer

SOT, EOT = 49406, 49407  # CLIP's start and end of text (Radford et al. 2021; 49,408 ids in all)


def test_ids_are_clips_and_the_mask_runs_to_the_end_token():
    tokens, mask = CaptionTokenizer()(["a photo of a cat", "A Photo of a  CAT."])
    assert tokens.shape == mask.shape == (2, PE_CORE_CONTEXT) and tokens.dtype == torch.int64
    # CLIP's BPE ids of "a", "photo", "of", "a", "cat" (the ids OpenAI's CLIP README tokenises to)
    assert tokens[0, :7].tolist() == [SOT, 320, 1125, 539, 320, 2368, EOT] and not tokens[0, 7:].any()
    assert tokens[1, :6].tolist() == tokens[0, :6].tolist()  # lower-cased, whitespace folded
    assert mask[0].tolist() == [True] * 7 + [False] * (PE_CORE_CONTEXT - 7)


def test_a_long_caption_is_cut_and_keeps_its_end_token():
    tokenizer = CaptionTokenizer(context_length=8)
    tokens, mask = tokenizer("one two three four five six seven eight nine ten")
    assert tokens[0, 0] == SOT and tokens[0, -1] == EOT and mask.all()
    assert tokenizer.num_tokens("one two three four five six seven eight nine ten") == 12


def test_the_vocabulary_is_the_file_inside_the_open_clip_wheel():
    # no download: the BPE merges are read from the installed package
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    assert bpe.is_file()
    tokens, _ = CaptionTokenizer()("a diagram")
    assert tokens[0, :4].tolist() == [SOT, 320, 22697, EOT]


def test_it_travels_to_loader_workers():
    tokenizer = pickle.loads(pickle.dumps(CaptionTokenizer(16)))
    assert tokenizer("a cat")[0][0, :4].tolist() == [SOT, 320, 2368, EOT]


def test_texts_that_must_fit_are_checked_before_compute():
    tokenizer = CaptionTokenizer(context_length=7)
    tokenizer.check_fits(["a cat", "a photo of a cat"], "the template")  # SOT + 5 words + EOT: exactly 7
    with pytest.raises(ValueError, match=r"the template 'a blurry photo of a cat' is 8 tokens, more than the "
                                         r"text context of 7"):
        tokenizer.check_fits(["a cat", "a blurry photo of a cat"], "the template")
    with pytest.raises(ValueError, match="context of 2 tokens cannot hold a caption"):
        CaptionTokenizer(2)


def test_the_end_token_constant_is_the_vocabularys():
    from datamodules.text import END_TOKEN

    tokenizer = CaptionTokenizer()
    assert tokenizer.eot_token_id == END_TOKEN
    assert tokenizer("a cat")[0][0, 3].item() == END_TOKEN  # [SOT] a cat [EOT]
