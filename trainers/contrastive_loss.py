"""The CLIP contrastive loss (InfoNCE over image-text pairs, Radford et al. 2021 §2.3), as Perception Encoder
trains with it (Bolya et al. 2025), with negatives from every rank.

    loss = clip_loss(image_features, text_features, logit_scale)

``image_features`` and ``text_features`` are the L2-normalised embeddings of this rank's N pairs, ``(N, D)``, row i
of one matching row i of the other; ``logit_scale`` is the multiplier of the cosine similarities (the exponential
of the learned log-scale, ln(1/0.07) at initialisation). The loss is the mean of the image -> text and the
text -> image cross-entropies over the logits ``logit_scale * image @ text.T``, with the matching pair as the
target.

Under data parallelism the features of every rank are gathered *with their gradients*, so the negatives are the
whole global batch:
- default: every rank computes the full global-batch loss (the same number on every rank);
- ``local_loss=True``: each rank computes only its own rows (its images against every text, its texts against
  every image), which costs a W-th of the logits; the mean of the ranks' losses is the full-batch loss.
In both, each rank's features receive W times the full-batch gradient (the other ranks' losses also depend on
them), so that after DDP averages the parameter gradients over the W ranks they equal the full-batch gradient, as
in open_clip's ``ClipLoss`` with ``gather_with_grad=True`` (mlfoundations/open_clip
src/open_clip/loss.py:ClipLoss).

:func:`siglip_loss` is the sigmoid alternative (SigLIP, Zhai et al. 2023): every (image, text) pair of the global
batch is its own binary problem, so each rank computes its images against every rank's texts and nothing is
normalised over the batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the sum over ranks of the gradient of its slice.

    Written out rather than torch.distributed.nn.all_gather (deprecated in torch 2.14); the backward all-reduces
    the whole gradient, which gloo supports (it has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), local.shape[0]
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """Every rank's ``local`` (same shape on each), concatenated in rank order, differentiable; ``local`` itself
    outside a distributed run."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    return _GatherWithGrad.apply(local)


def _check_pairs(name: str, image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(f"{name} needs image and text features of the same shape (N, D); got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")


def _first_row(local: torch.Tensor, gathered: torch.Tensor) -> int:
    """Where this rank's rows start in the gathered batch (0 when nothing was gathered)."""
    return dist.get_rank() * local.shape[0] if gathered.shape[0] > local.shape[0] else 0


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float, *,
              local_loss: bool = False, gather: bool = True) -> torch.Tensor:
    """The symmetric InfoNCE loss of N matching (image, text) feature rows, with the negatives of every rank.

    See the module docstring for the conventions; the features should be L2-normalised (the loss does not
    normalise them, as neither CLIP nor open_clip does inside the loss). ``gather=False``: this rank's pairs only,
    with no collective (validation, where ranks may hold different numbers of pairs)."""
    _check_pairs("clip_loss", image_features, text_features)
    all_images, all_texts = image_features, text_features
    if gather:
        all_images, all_texts = gather_with_grad(image_features), gather_with_grad(text_features)
    if local_loss:
        targets = torch.arange(image_features.shape[0], device=image_features.device)
        targets = targets + _first_row(image_features, all_images)
        logits_per_image = logit_scale * image_features @ all_texts.T
        logits_per_text = logit_scale * text_features @ all_images.T
    else:
        targets = torch.arange(all_images.shape[0], device=image_features.device)
        logits_per_image = logit_scale * all_images @ all_texts.T
        logits_per_text = logits_per_image.T
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float,
                logit_bias: torch.Tensor | float, *, gather: bool = True) -> torch.Tensor:
    """The sigmoid loss of N matching (image, text) rows (SigLIP, Zhai et al. 2023, Algorithm 1): with logits
    ``logit_scale * image @ text.T + logit_bias`` over this rank's images and every rank's texts, the sum of
    ``-log sigmoid(z * logit)`` (z = 1 for a matching pair, -1 otherwise) divided by N.

    The value on each rank is open_clip's ``SigLipLoss`` on that rank (src/open_clip/loss.py, which passes the
    texts around a ring instead of gathering them); the mean over ranks is the single-process loss of the global
    batch, and the texts are gathered with their gradients, so DDP's averaged gradients are that loss's. The paper
    initialises the scale at 10 (its log at ln 10) and the bias at -10, so that training starts near the
    prior of mostly negative pairs."""
    _check_pairs("siglip_loss", image_features, text_features)
    all_texts = gather_with_grad(text_features) if gather else text_features
    logits = logit_scale * image_features @ all_texts.T + logit_bias
    rows = torch.arange(image_features.shape[0], device=image_features.device)
    signs = -torch.ones_like(logits)
    signs[rows, rows + _first_row(image_features, all_texts)] = 1
    return -F.logsigmoid(signs * logits).sum() / image_features.shape[0]
