"""Classification accuracy: a pure top-k count and the torchmetrics wrapper the trainers validate with."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy


def topk_correct(logits: Tensor, labels: Tensor, ks: Sequence[int]) -> Tensor:
    """(len(ks),) counts of samples whose label is among their k highest logits, for each k.

    Ties go to ``torch.topk``'s order. k larger than the number of classes counts every sample.
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"topk_correct: logits {tuple(logits.shape)} must be (N, C) and labels "
                         f"{tuple(labels.shape)} (N,)")
    kmax = min(max(ks), logits.shape[1])
    ranked = logits.topk(kmax, dim=1).indices == labels[:, None]  # (N, kmax): where the label sits
    return torch.stack([ranked[:, :min(k, kmax)].any(dim=1).sum() for k in ks])


class TopKAccuracy(nn.Module):
    """Top-1 and top-5 accuracy in percent over a validation pass, summed over ranks (torchmetrics)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")

    def update(self, logits: Tensor, labels: Tensor) -> None:
        self.top1.update(logits.float(), labels)
        self.top5.update(logits.float(), labels)

    def compute_and_reset(self) -> dict[str, Tensor]:
        out = {"top1": 100 * self.top1.compute(), "top5": 100 * self.top5.compute()}
        self.top1.reset()
        self.top5.reset()
        return out
