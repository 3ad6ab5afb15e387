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


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float, *,
              local_loss: bool = False, gather: bool = True) -> torch.Tensor:
    """The symmetric InfoNCE loss of N matching (image, text) feature rows, with the negatives of every rank.

    See the module docstring for the conventions; the features should be L2-normalised (the loss does not
    normalise them, as neither CLIP nor open_clip does inside the loss). ``gather=False``: this rank's pairs only,
    with no collective (validation, where ranks may hold different numbers of pairs)."""
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(f"clip_loss needs image and text features of the same shape (N, D); got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    all_images, all_texts = image_features, text_features
    if gather:
        all_images, all_texts = gather_with_grad(image_features), gather_with_grad(text_features)
    if local_loss:
        # This rank's rows sit at [rank * N, (rank + 1) * N) of the gathered batch.
        rank = dist.get_rank() if all_images.shape[0] > image_features.shape[0] else 0
        targets = torch.arange(image_features.shape[0], device=image_features.device) + rank * image_features.shape[0]
        logits_per_image = logit_scale * image_features @ all_texts.T
        logits_per_text = logit_scale * text_features @ all_images.T
    else:
        targets = torch.arange(all_images.shape[0], device=image_features.device)
        logits_per_image = logit_scale * all_images @ all_texts.T
        logits_per_text = logits_per_image.T
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2
