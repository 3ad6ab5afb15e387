"""A linear classifier fitted on frozen features, for evaluating checkpoints that have no head (MAE).

Multinomial logistic regression with an L2 penalty, solved to convergence by full-batch L-BFGS (the
deterministic choice of linear-evaluation protocols that fit on features, e.g. CLIP's scikit-learn probe).
Features are standardised for the solve and the standardisation is folded back into the returned layer, so
it applies to raw features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def fit_linear_head(features: Tensor, labels: Tensor, num_classes: int, weight_decay: float = 1e-4,
                    max_iter: int = 500) -> nn.Linear:
    """nn.Linear(D, num_classes) minimising mean cross-entropy + weight_decay/2 * ||W||^2 on standardised features."""
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"fit_linear_head: features {tuple(features.shape)} must be (N, D), labels "
                         f"{tuple(labels.shape)} (N,)")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"fit_linear_head: labels range over [{int(labels.min())}, {int(labels.max())}] "
                         f"but num_classes is {num_classes}")
    x = features.detach().double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    solver = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, tolerance_grad=1e-9,
                               tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        solver.zero_grad()
        loss = penalised_loss(z, labels, weight, bias, weight_decay)
        loss.backward()
        return loss

    solver.step(objective)
    head = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():  # W z + b with z = (x - mean) / std  ==  (W / std) x + (b - (W / std) mean)
        scaled = weight / std
        head.weight.copy_(scaled.float())
        head.bias.copy_((bias - scaled @ mean).float())
    return head.to(features.device)


def penalised_loss(z: Tensor, labels: Tensor, weight: Tensor, bias: Tensor, weight_decay: float) -> Tensor:
    """The objective ``fit_linear_head`` minimises (the bias is not penalised)."""
    return F.cross_entropy(z @ weight.T + bias, labels) + 0.5 * weight_decay * weight.pow(2).sum()
