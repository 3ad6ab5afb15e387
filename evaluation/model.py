"""A classifier as the evaluation harnesses run it: uint8 (B, H, W, 3) numpy images in, logits or pre-logits
features out, and a linear head fitted on frozen features for a network that has none for the evaluation's
classes (logistic regression, evaluation/linear_head.py).

The network is any timm-style classifier (``forward_features`` / ``forward_head``); building it from a
checkpoint is ``trainers.eval_model.load_eval_model``.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from batch_contract import IMAGENET_MEAN, IMAGENET_STD
from evaluation.linear_head import fit_linear_head


class LabelledImages(Protocol):
    """What a head fit reads (``datamodules.image_sets.ImageSet`` is one)."""

    images: np.ndarray
    """uint8 (N, H, W, 3), not normalised."""
    labels: np.ndarray
    """int (N,), -1 where an image has no label."""


class EvalModel:
    """A classifier (timm-style: forward_features / forward_head) run on uint8 (B, H, W, 3) numpy images."""

    def __init__(self, network: nn.Module, device: torch.device):
        self.network, self.device = network.eval().to(device), device
        # The normalisation every Prism datamodule applies in training, so the network sees what it learned on.
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        self.autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")

    def _inputs(self, images: np.ndarray) -> Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        return (x.permute(0, 3, 1, 2).float() / 255 - self.mean) / self.std

    @torch.no_grad()
    def features(self, images: np.ndarray) -> Tensor:
        """Pre-logits features (B, D): the penultimate layer."""
        with self.autocast:
            return self.network.forward_head(self.network.forward_features(self._inputs(images)),
                                             pre_logits=True).float()

    @torch.no_grad()
    def classify(self, images: np.ndarray) -> Tensor:
        with self.autocast:
            return self.network(self._inputs(images)).float()

    def corruption_workers(self, requested: int | None) -> int:
        """--data.num_workers, with None resolved for this model's device."""
        if requested is not None:
            return requested
        return 0 if self.device.type == "cpu" else min(8, max(1, (os.cpu_count() or 2) - 1))

    def features_of(self, images: np.ndarray, batch_size: int) -> Tensor:
        return torch.cat([self.features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])

    def fit_head(self, head: nn.Linear, fit: LabelledImages, batch_size: int) -> float:
        """Load into ``head`` (the network's classifier) the logistic regression of ``fit``'s labels on the frozen
        features of its images; returns the training accuracy in %."""
        if (fit.labels < 0).any():
            raise ValueError("Fitting a linear head needs labelled training shards (a 'cls' field in each sample)")
        features = self.features_of(fit.images, batch_size).cpu()
        fitted = fit_linear_head(features, torch.from_numpy(fit.labels), head.out_features)
        head.load_state_dict(fitted.state_dict())
        return 100.0 * float((fitted(features).argmax(1).numpy() == fit.labels).mean())
