"""Hashtag metrics and SWAG-style zero-shot transfer, against hand-worked examples."""

import math

import pytest
import torch

from evaluation.hashtags import calibrated_hashtag_probs, precision_at_k, zero_shot_class_scores


def test_precision_at_k_hand_example():
    # sample 0 carries hashtags {0, 3}; ranking by score: 0, 2, 1, 3
    # sample 1 carries {2, 3} (as 1/k targets); ranking: 1, 2, 3, 0
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 5.0, 4.0, 3.0]])
    target = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.5, 0.5]])
    assert precision_at_k(logits, target, 1).tolist() == [1.0, 0.0]
    assert precision_at_k(logits, target, 2).tolist() == [0.5, 0.5]
    assert torch.allclose(precision_at_k(logits, target, 3), torch.tensor([1 / 3, 2 / 3]))
    assert precision_at_k(logits, target, 4).tolist() == [0.5, 0.5]  # k larger than the tag count caps it at k_true/k


def test_precision_at_k_rejects_bad_input():
    with pytest.raises(ValueError, match="k=5"):
        precision_at_k(torch.zeros(2, 4), torch.zeros(2, 4), 5)
    with pytest.raises(ValueError, match="batch, num_hashtags"):
        precision_at_k(torch.zeros(2, 4), torch.zeros(2, 3), 1)


def test_calibration_divides_by_the_prior_and_renormalises():
    p = [0.5, 0.3, 0.2]
    logits = torch.tensor([p]).log()
    prior = torch.tensor([0.5, 0.25, 0.25])
    # p / prior = [1, 1.2, 0.8], sum 3
    assert torch.allclose(calibrated_hashtag_probs(logits, prior), torch.tensor([[1 / 3, 0.4, 0.8 / 3]]))
    assert torch.allclose(calibrated_hashtag_probs(logits, prior, prior_power=0.0), torch.tensor([p]))
    half = [0.5 / math.sqrt(0.5), 0.3 / 0.5, 0.2 / 0.5]
    expected = torch.tensor([[h / sum(half) for h in half]])
    assert torch.allclose(calibrated_hashtag_probs(logits, prior, prior_power=0.5), expected)
    # a uniform prior changes nothing
    assert torch.allclose(calibrated_hashtag_probs(logits, torch.full((3,), 1 / 3)), torch.tensor([p]))


def test_calibration_rejects_a_prior_of_the_wrong_size():
    with pytest.raises(ValueError, match="expected \\(3,\\)"):
        calibrated_hashtag_probs(torch.zeros(1, 3), torch.ones(4))


def test_zero_shot_sum_and_max_over_a_class_hashtags():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    classes = [[0, 2], [1], [], [3, 1]]
    scores = zero_shot_class_scores(logits, classes)
    assert torch.allclose(scores[0, [0, 1, 3]], torch.tensor([0.6, 0.3, 0.4]))
    assert scores[0, 2] == float("-inf")  # a class without hashtags is never predicted
    scores = zero_shot_class_scores(logits, classes, reduce="max")
    assert torch.allclose(scores[0, [0, 1, 3]], torch.tensor([0.4, 0.3, 0.3]))


def test_calibration_can_flip_the_predicted_class():
    # p = [0.6, 0.4], but hashtag 0 was 4x as frequent in training: q ~ [0.6 / 0.8, 0.4 / 0.2] = [0.75, 2]
    logits = torch.tensor([[0.6, 0.4]]).log()
    prior = torch.tensor([0.8, 0.2])
    assert zero_shot_class_scores(logits, [[0], [1]]).argmax(1).item() == 0
    calibrated = zero_shot_class_scores(logits, [[0], [1]], prior)
    assert calibrated.argmax(1).item() == 1
    assert torch.allclose(calibrated, torch.tensor([[0.75 / 2.75, 2 / 2.75]]))


def test_zero_shot_names_bad_hashtag_indices():
    with pytest.raises(ValueError, match=r"\(1, 7\)"):
        zero_shot_class_scores(torch.zeros(1, 4), [[0], [7]])
    with pytest.raises(ValueError, match="reduce"):
        zero_shot_class_scores(torch.zeros(1, 4), [[0]], reduce="mean")
