"""Weakly-supervised pretraining on hashtags (SWAG, Singh et al. CVPR 2022) as a LightningModule.

A backbone with a hashtag classifier (``model.head``, one output per vocabulary hashtag) learns to predict
the hashtags of each image with a softmax over the vocabulary; a sample with k hashtags has target 1/k on each
(facebookresearch/SWAG#15). MAWS (Singh et al. 2023) runs this stage initialised from MAE.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

import models
from evaluation.hashtags import precision_at_k, zero_shot_class_scores
from models.vit import VisionTransformer
from trainers.checkpoint import save_safetensors
from trainers.export import export_vit_encoder
from trainers.handoff import init_backbone
from trainers.method import Method, as_config
from trainers.optim import OptimConfig, param_groups_weight_decay

OPTIMIZERS = ("adamw", "sgd")


@dataclass
class WSPModelConfig:
    name: str = "vit_tiny_patch8"
    """Registered backbone (`python -c "import models; print(models.list_models())"`); its classifier
    ``head`` becomes the hashtag head, sized to the vocabulary."""
    drop_path_rate: float = 0.0
    """Stochastic depth."""


@dataclass
class WSPOptimConfig(OptimConfig):
    blr: float = 4e-3
    """Base learning rate; the actual rate is blr * effective_batch / 256. The default (lr 5e-4 at batch 32) suits
    short runs on the synthetic world, where it learns faster than MAE's 1e-3; the paper configs set their own."""
    name: str = "adamw"
    """"adamw" (SWAG's ViTs) or "sgd" with Nesterov momentum (SWAG's RegNets); the schedule is the same warmup +
    cosine for both (facebookresearch/SWAG releases no training code, so its optimizer settings are unverified)."""
    momentum: float = 0.9
    """SGD momentum (Nesterov)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.name not in OPTIMIZERS:
            raise ValueError(f"Unknown optim.name {self.name!r}. Choose one of: {', '.join(OPTIMIZERS)}.")


def hashtag_loss(logits: Tensor, target: Tensor, num_tagged: int) -> Tensor:
    """Softmax cross-entropy against 1/k targets: -(1/k) sum over a sample's k hashtags of log softmax
    (facebookresearch/SWAG#15), averaged over the ``num_tagged`` samples that have at least one hashtag.

    ``target`` rows sum to 1 (tagged) or 0 (untagged, so they add nothing); ``num_tagged`` is a host-side int,
    so the mean needs no device synchronisation. A batch without tagged samples gives 0 (with a graph).
    """
    per_sample = -(target * logits.float().log_softmax(dim=-1)).sum(dim=-1)
    return per_sample.sum() / max(num_tagged, 1)


class WeaklySupervisedPretraining(Method):
    """Batches carry ``image`` (normalised float) and ``hashtags`` (lists of str); validation batches may carry
    ``label`` for the zero-shot metric.

    Args:
        model: keyword arguments of ``models.create``; ``num_classes`` is the vocabulary size.
        optim: ``WSPOptimConfig`` (or its fields as a dict, as checkpoints store them).
        lr: the actual peak learning rate; total_steps: length of the schedule in optimizer steps.
        class_to_hashtags: for each class, the vocabulary indices of its hashtags (zero-shot); None: no zero-shot.
        zero_shot: keyword arguments of ``zero_shot_class_scores`` (``prior_power``, ``reduce``).
        vocab: the hashtags in head order; saved in checkpoints, so ``load_from_checkpoint`` needs no vocab.
        hashtag_prior: (V,) training frequency of each hashtag, for the zero-shot calibration (a buffer, saved
            with the weights); None: uniform, i.e. no calibration.
    ``vocab`` and ``hashtag_prior`` stay out of the hyperparameters (27K entries do not belong in W&B's config).
    """

    batch_keys = ("image", "hashtags")

    def __init__(self, model: dict, optim: WSPOptimConfig | dict | None, lr: float, total_steps: int,
                 class_to_hashtags: list[list[int]] | None = None, zero_shot: dict | None = None,
                 vocab: Sequence[str] = (), hashtag_prior: Tensor | None = None):
        super().__init__(as_config(WSPOptimConfig, optim), lr, total_steps)
        self.record_hparams(model=model, optim=self.optim_cfg, lr=lr, total_steps=total_steps,
                         class_to_hashtags=class_to_hashtags, zero_shot=zero_shot)
        num_hashtags = model.get("num_classes", 0)
        if num_hashtags < 1 or (vocab and len(vocab) != num_hashtags):
            raise ValueError(f"model num_classes ({num_hashtags}) must be the vocabulary size ({len(vocab)})")
        self.model = models.create(**model)
        self.vocab: list[str] = []
        self._index: dict[str, int] = {}
        self.set_vocab(list(vocab))
        prior = torch.full((num_hashtags,), 1.0 / num_hashtags) if hashtag_prior is None else hashtag_prior.float()
        self.register_buffer("hashtag_prior", prior.clone())
        self.flops_per_sample = 3 * self.model.complexity().flops  # forward + backward
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.tagged_fraction = 0.0  # of the last training batch, set by compute_loss
        # Weighted means (untagged samples weigh 0). Keep nan_strategy at its default: torchmetrics 1.9's
        # "disable" drops the weights.
        self.val_precision = nn.ModuleDict({f"at{k}": MeanMetric() for k in (1, 5)})
        self.val_zero_shot = MeanMetric()

    def set_vocab(self, vocab: list[str]) -> None:
        self.vocab, self._index = vocab, {tag: i for i, tag in enumerate(vocab)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["hashtag_vocab"] = self.vocab

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if not self.vocab and checkpoint.get("hashtag_vocab"):
            self.set_vocab(list(checkpoint["hashtag_vocab"]))

    def hashtag_targets(self, hashtags: Sequence[Sequence[str]]) -> tuple[Tensor, int]:
        """(B, V) float targets, 1/k on each of a sample's k distinct in-vocabulary hashtags, and the number of
        samples with k >= 1. Built on the host as index lists; only those travel to the device."""
        if not self.vocab:
            raise RuntimeError("WeaklySupervisedPretraining has no vocabulary: pass vocab= (or load a checkpoint)")
        rows, cols, values, num_tagged = [], [], [], 0
        for i, tags in enumerate(hashtags):
            found = sorted({self._index[t] for t in tags if t in self._index})
            if found:
                rows += [i] * len(found)
                cols += found
                values += [1.0 / len(found)] * len(found)
                num_tagged += 1
        host = torch.tensor([rows, cols], dtype=torch.long), torch.tensor(values, dtype=torch.float32)
        if self.device.type == "cuda":
            host = tuple(t.pin_memory() for t in host)
        index, value = (t.to(self.device, non_blocking=True) for t in host)
        target = torch.zeros(len(hashtags), len(self.vocab), device=self.device)
        target[index[0], index[1]] = value
        return target, num_tagged

    def compute_loss(self, batch) -> Tensor:
        """The batch's fraction of tagged samples is left in ``self.tagged_fraction`` (a host float) for the log."""
        target, num_tagged = self.hashtag_targets(batch["hashtags"])
        self.tagged_fraction = num_tagged / max(1, len(target))
        return hashtag_loss(self.model(batch["image"]), target, num_tagged)

    def training_metrics(self) -> dict[str, float]:
        return {"train/tagged_fraction": self.tagged_fraction}

    def param_groups(self) -> list[dict]:
        skip = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else set()
        return param_groups_weight_decay(self.model, self.optim_cfg.weight_decay, skip=skip)

    def init_from(self, source) -> list[str]:
        """The backbone of an earlier stage (MAE, as MAWS does); the hashtag head never carries over."""
        return init_backbone(self.model, source, reset_head=True)

    def validation_step(self, batch, batch_idx):
        logits = self.model(batch["image"])
        target, num_tagged = self.hashtag_targets(batch["hashtags"])
        size = len(target)
        self.log("val/loss", hashtag_loss(logits, target, num_tagged), sync_dist=True, batch_size=max(1, num_tagged))
        tagged = (target.sum(1) > 0).float()
        for k in (1, 5):
            if k <= target.shape[1]:
                self.val_precision[f"at{k}"].update(precision_at_k(logits, target, k), tagged)
                self.log(f"val/precision@{k}", self.val_precision[f"at{k}"], batch_size=size, prog_bar=k == 1)
        if "label" in batch and self.hparams.class_to_hashtags:
            scores = zero_shot_class_scores(logits, self.hparams.class_to_hashtags, self.hashtag_prior,
                                            **(self.hparams.zero_shot or {}))
            self.val_zero_shot.update((scores.argmax(1) == batch["label"]).float())
            self.log("val/zero_shot_top1", self.val_zero_shot, batch_size=size, prog_bar=True)


def trunk_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The backbone's weights without the hashtag head."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}


def export_trunk(model: nn.Module, model_kwargs: dict, path: str | Path, **metadata) -> Path:
    """The backbone without its hashtag head as safetensors: a ViT with timm keys (``num_classes=0``, loadable by
    ``timm.models.VisionTransformer``), any other backbone as its own state dict minus ``head.*``."""
    if isinstance(model, VisionTransformer):
        trunk = models.create(**{**model_kwargs, "num_classes": 0, "drop_path_rate": 0.0})
        trunk.load_state_dict(trunk_state_dict(model))
        return export_vit_encoder(trunk, path, **metadata)
    return save_safetensors(trunk_state_dict(model), path, {"model": model_kwargs["name"], **metadata})
