"""Caption metrics: exact captions score BLEU 1 and CIDEr-D 10; BLEU-1 and BLEU-2 of a hand-worked pair."""

import math

import pytest

from evaluation.captioning import caption_scores, words


def test_words_drop_case_and_punctuation():
    assert words("A large, red Circle.  On blue!") == "a large red circle on blue"


def test_exact_captions_score_the_maximum():
    refs = {"a": ["a red circle on a blue background"], "b": ["two green stars on grey"]}  # 4 words at least: a 4-gram each
    scores = caption_scores({k: v[0].upper() + "." for k, v in refs.items()}, refs)
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6) and scores["cider"] == pytest.approx(10.0, abs=1e-6)


def test_bleu_of_a_hand_worked_pair():
    # hypothesis "the red circle" (3 words) against "the big red circle" (4): unigram precision 3/3, bigram 1/2
    # ("red circle" matches, "the red" does not); brevity penalty exp(1 - 4/3)
    scores = caption_scores({"x": "the red circle", "y": "a star"}, {"x": ["the big red circle"], "y": ["a star"]})
    bp = math.exp(1 - 6 / 5)  # corpus lengths: hypotheses 3 + 2, references 4 + 2
    assert scores["bleu1"] == pytest.approx(bp * 5 / 5, rel=1e-6)
    assert scores["bleu2"] == pytest.approx(bp * math.sqrt(1 * (2 / 3)), rel=1e-6)  # bigrams: 1/2 + 1/1 = 2/3


def test_mismatched_keys_are_an_error():
    with pytest.raises(ValueError, match="same keys"):
        caption_scores({"a": "x"}, {"b": ["x"]})
