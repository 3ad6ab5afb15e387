"""Hashtag prediction metrics and SWAG-style zero-shot transfer from a hashtag classifier (pure tensor functions).

SWAG (Singh et al. 2022) turns hashtag predictions into class predictions without any training on the target
task: softmax over the hashtags, a calibration that undoes the skew of the hashtag distribution, then a
mapping of each target class to hashtags (facebookresearch/SWAG#13: "Platt scaling" towards a uniform prior,
then WordNet similarities to ImageNet-1k classes). Its hashtag head, calibration constants and mapping are
unreleased, so ``zero_shot_class_scores`` is SWAG-style, not a reproduction; its docstring says what it does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor


def precision_at_k(logits: Tensor, target: Tensor, k: int) -> Tensor:
    """Per-sample precision@k: the fraction of the ``k`` highest-scoring hashtags that the sample carries.

    logits: (B, V) scores; target: (B, V), nonzero where the sample carries the hashtag (multi-hot, or the
    1/k targets). Returns (B,) float in [0, 1]. A sample without any hashtag scores 0: exclude such samples
    (``target.any(1)``) when averaging, as the training loss does.
    """
    if logits.shape != target.shape or logits.ndim != 2:
        raise ValueError(f"precision_at_k: logits {tuple(logits.shape)} and target {tuple(target.shape)} must "
                         "both be (batch, num_hashtags)")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"precision_at_k: k={k} must be in [1, {logits.shape[1]}] (the number of hashtags)")
    top = logits.topk(k, dim=1).indices  # (B, k)
    hits = (target.gather(1, top) != 0).sum(1)
    return hits.float() / k


def calibrated_hashtag_probs(hashtag_logits: Tensor, hashtag_prior: Tensor | None = None,
                             prior_power: float = 1.0) -> Tensor:
    """softmax over hashtags, divided by prior^power and renormalised: (B, V) -> (B, V), rows sum to 1.

    Equivalently ``softmax(logits - prior_power * log(prior))``. With power 1 this is the Bayes-rule prior
    correction p(h|x) / p(h): the posterior the classifier would give had every hashtag been equally frequent
    in training, i.e. "toward a uniform prior". ``prior_power`` between 0 (no correction) and 1 is the one
    free constant of this calibration; SWAG's own constants are unreleased.
    """
    logits = hashtag_logits.float()
    if hashtag_prior is not None and prior_power != 0:
        prior = hashtag_prior.to(logits.device, torch.float32)
        if prior.shape != logits.shape[1:]:
            raise ValueError(f"hashtag_prior has shape {tuple(prior.shape)}; expected ({logits.shape[1]},)")
        logits = logits - prior_power * prior.clamp_min(torch.finfo(torch.float32).tiny).log()
    return logits.softmax(dim=1)


def zero_shot_class_scores(hashtag_logits: Tensor, class_to_hashtags: Sequence[Sequence[int]],
                           hashtag_prior: Tensor | None = None, *, prior_power: float = 1.0,
                           reduce: Literal["sum", "max"] = "sum") -> Tensor:
    """Class scores (B, C) from hashtag logits (B, V), SWAG-style.

    1. q = softmax(logits) / prior^prior_power, renormalised over the hashtags (``calibrated_hashtag_probs``);
       ``hashtag_prior`` is the hashtag frequency the head was trained on, None for no calibration.
    2. score(c) = sum (or max) of q over the hashtags of class c (``class_to_hashtags[c]``: vocabulary
       indices). "sum" reads the class's hashtags as disjoint events, so the score is the probability that
       the image's hashtag is one of them; "max" ignores how many synonyms a class has.
    A class with no hashtag scores -inf: it is never predicted.
    """
    if reduce not in ("sum", "max"):
        raise ValueError(f"zero_shot_class_scores: reduce must be 'sum' or 'max', got {reduce!r}")
    q = calibrated_hashtag_probs(hashtag_logits, hashtag_prior, prior_power)
    num_hashtags = q.shape[1]
    pairs = [(c, h) for c, tags in enumerate(class_to_hashtags) for h in tags]
    bad = [(c, h) for c, h in pairs if not 0 <= h < num_hashtags]
    if bad:
        raise ValueError(f"class_to_hashtags refers to hashtag indices outside [0, {num_hashtags}): "
                         f"(class, index) {bad[:5]}")
    scores = torch.full((q.shape[0], len(class_to_hashtags)), float("-inf"), device=q.device)
    if not pairs:
        return scores
    classes = torch.tensor([c for c, _ in pairs], device=q.device)
    columns = q[:, torch.tensor([h for _, h in pairs], device=q.device)]  # (B, number of pairs)
    index = classes.expand_as(columns)
    if reduce == "sum":
        mapped = torch.zeros_like(scores).scatter_add_(1, index, columns)
    else:
        mapped = torch.zeros_like(scores).scatter_reduce_(1, index, columns, "amax", include_self=False)
    has_tags = torch.zeros(len(class_to_hashtags), dtype=torch.bool, device=q.device)
    has_tags[classes] = True
    return torch.where(has_tags, mapped, scores)
