"""Image classification from a pretrained backbone: end-to-end fine-tuning and linear probing
(He et al. 2022, facebookresearch/mae main_finetune.py and main_linprobe.py) as LightningModules.

Both hold the network at ``self.model`` (the probe's linear classifier at ``self.head``), so that
``trainers.handoff.init_backbone`` can start a later stage from either run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn

import models
from evaluation.classification import TopKAccuracy
from trainers.handoff import classifier_name, init_backbone
from trainers.method import Method, as_config
from trainers.optim import LARSConfig, OptimConfig, param_groups_layer_decay


# ---- configs -----------------------------------------------------------------------------------------------

@dataclass
class ClassifierConfig:
    name: str = "vit_tiny_patch8"
    """Registered model name (`python -c "import models; print(models.list_models())"`): vit_*, vitc_*, regnety_*."""
    global_pool: str = "avg"
    """ViTs: 'avg' (mean of patch tokens, then fc_norm: MAE fine-tuning) or 'token' (final norm, then cls token).
    Models without the option (CNNs average anyway) ignore it."""
    drop_path_rate: float = 0.1
    """Stochastic depth of the last block (MAE: 0.1 ViT-B, 0.2 ViT-L, 0.3 ViT-H)."""


@dataclass
class ProbeModelConfig:
    name: str = "vit_tiny_patch8"
    """Registered name of the frozen backbone; it must match the model the earlier stage trained."""
    global_pool: str = "token"
    """ViTs: 'token' = the cls token after the final norm (MAE linear probe); 'avg' pools with a random,
    frozen fc_norm (MAE --global_pool, mae#186)."""


@dataclass
class FinetuneOptimConfig(OptimConfig):
    blr: float = 5e-4
    """Base learning rate; the actual rate is blr * effective_batch / 256 (MAE: 5e-4 ViT-B, 1e-3 ViT-L/H)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (MAE fine-tuning: 0.9, 0.999)."""
    warmup_steps: int = 10
    """Linear warmup from 0, in optimizer steps (MAE: 5 epochs)."""
    min_lr: float = 1e-6
    """Floor of the half-cycle cosine decay (MAE fine-tuning: 1e-6)."""
    layer_decay: float = 0.75
    """Layer-wise rate decay: block i trains at layer_decay^(depth - i) of the rate (MAE: 0.65 ViT-B, 0.75 L/H)."""

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"optim.layer_decay must be in (0, 1], got {self.layer_decay}")


@dataclass
class AugmentConfig:
    rand_augment: str = "rand-m9-mstd0.5-inc1"
    """timm RandAugment config on the host (MAE fine-tuning); an empty string turns it off."""
    reprob: float = 0.25
    """Random erasing probability, per image, on the device after normalisation (pixel mode, one box)."""
    mixup: float = 0.8
    """Mixup alpha; 0 turns mixup off."""
    cutmix: float = 1.0
    """CutMix alpha; 0 turns CutMix off."""
    mixup_prob: float = 1.0
    """Probability of mixing a batch at all."""
    switch_prob: float = 0.5
    """Probability of CutMix instead of mixup when both are on."""
    mixup_mode: str = "batch"
    """'batch': one mix per batch (MAE); 'pair' or 'elem': per pair / per sample."""
    smoothing: float = 0.1
    """Label smoothing (folded into the mixed targets when mixing)."""

    def __post_init__(self):
        for name in ("reprob", "mixup_prob", "switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"augment.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.mixup < 0 or self.cutmix < 0 or not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"augment: need mixup, cutmix >= 0 and smoothing in [0, 1); got {self.mixup}, "
                             f"{self.cutmix}, {self.smoothing}")
        if self.mixup_mode not in ("batch", "pair", "elem"):
            raise ValueError(f"augment.mixup_mode must be batch, pair or elem, got {self.mixup_mode!r}")

    @property
    def mixing(self) -> bool:
        return self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0)


@dataclass
class EMAConfig:
    enabled: bool = False
    """Keep an exponential moving average of the weights and evaluate it too (val/ema_top1; ViT_C recipe)."""
    decay: float = 0.9999
    """Weight of the old average at each update: ema = decay * ema + (1 - decay) * model."""
    every_n_steps: int = 1
    """Update every N optimizer steps (pycls: 32, with 1 - decay = 32 x its per-step rate)."""
    copy_during_warmup: bool = False
    """Copy the weights instead of averaging during the lr warmup (pycls)."""

    def __post_init__(self):
        if not 0.0 <= self.decay < 1.0 or self.every_n_steps < 1:
            raise ValueError(f"ema: need decay in [0, 1) and every_n_steps >= 1, got {self.decay}, "
                             f"{self.every_n_steps}")


def classifier_kwargs(name: str, num_classes: int, img_size: int, global_pool: str | None = None,
                      drop_path_rate: float = 0.0) -> dict:
    """``models.create`` keyword arguments for a classifier, checked by building it on the meta device.

    ``global_pool`` is a ViT option; a model whose config has no such field (a CNN) is built without it.
    """
    kwargs = {"name": name, "num_classes": num_classes, "img_size": img_size, "drop_path_rate": drop_path_rate}
    if global_pool is not None:
        kwargs["global_pool"] = global_pool
    with torch.device("meta"):
        try:
            models.create(**kwargs)
        except TypeError as err:
            if "global_pool" not in str(err):
                raise
            kwargs.pop("global_pool")
            models.create(**kwargs)
    return kwargs


# ---- shared pieces -------------------------------------------------------------------------------------------

def _check_labels(labels: torch.Tensor, num_classes: int) -> None:
    lo, hi = int(labels.min()), int(labels.max())  # one sync, on the first batch only
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"Labels range over [{lo}, {hi}] but the classifier has {num_classes} classes; "
                         "set --data.num_classes to the number of classes in the shards (classes.json).")


def _forward_flops(model: nn.Module) -> float | None:
    """One image's forward FLOPs from the model's own count; None for a model without ``complexity()``."""
    complexity = getattr(model, "complexity", None)
    return complexity().flops if callable(complexity) else None


# ---- fine-tuning -----------------------------------------------------------------------------------------------

class ImageClassification(Method):
    """End-to-end fine-tuning (MAE main_finetune.py): mixup/CutMix with label smoothing and random erasing
    on the device, AdamW over layer-decay groups, per-step warmup + cosine, optional weight EMA.

    Args:
        model: keyword arguments of ``models.create`` (``classifier_kwargs``), ``num_classes`` included.
        optim: ``FinetuneOptimConfig``; augment: ``AugmentConfig`` (its device-side parts are used here);
            ema: ``EMAConfig``. Each also as a dict of its fields, as checkpoints store them.
        lr: the peak learning rate (already scaled by the effective batch).
        total_steps: length of the schedule in optimizer steps.
    """

    batch_keys = ("image", "label")

    def __init__(self, model: dict, optim: FinetuneOptimConfig | dict | None, lr: float, total_steps: int,
                 augment: AugmentConfig | dict | None = None, ema: EMAConfig | dict | None = None):
        super().__init__(as_config(FinetuneOptimConfig, optim), lr, total_steps)
        self.augment_cfg = as_config(AugmentConfig, augment)
        self.ema_cfg = as_config(EMAConfig, ema)
        self.record_hparams(model=model, optim=self.optim_cfg, lr=lr, total_steps=total_steps, augment=self.augment_cfg,
                         ema=self.ema_cfg)
        self.model = models.create(**model)
        self.num_classes = int(model["num_classes"])
        aug = self.augment_cfg
        self.mixup = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob,
                           switch_prob=aug.switch_prob, mode=aug.mixup_mode, label_smoothing=aug.smoothing,
                           num_classes=self.num_classes) if aug.mixing else None
        self.erasing = RandomErasing(aug.reprob, mode="pixel", max_count=1, device="cpu") if aug.reprob > 0 else None
        # MAE main_finetune.py: soft targets with mixing, else smoothed CE, else plain CE
        self.criterion = (SoftTargetCrossEntropy() if self.mixup else
                          LabelSmoothingCrossEntropy(aug.smoothing) if aug.smoothing > 0 else nn.CrossEntropyLoss())
        self.ema = None
        if self.ema_cfg.enabled:
            self.ema = ModelEmaV3(self.model, decay=self.ema_cfg.decay)
            self.ema.requires_grad_(False)  # a DDP/optimizer bystander: its weights move by update() only
        self.accuracy = TopKAccuracy(self.num_classes)
        self.ema_accuracy = TopKAccuracy(self.num_classes) if self.ema is not None else None
        forward = _forward_flops(self.model)
        self.flops_per_sample = 3 * forward if forward else None  # forward + backward
        self._ema_seen_step = 0
        self._labels_checked = False

    def init_from(self, source) -> list[str]:
        """Weights of an earlier stage (``trainers.handoff.init_backbone``); the EMA restarts from them."""
        lines = init_backbone(self.model, source)
        if self.ema is not None:
            self.ema.module.load_state_dict(self.model.state_dict())
            lines.append("EMA: starts from the same weights")
        return lines

    def compute_loss(self, batch) -> torch.Tensor:
        """Random erasing and mixup included; the EMA update stays in on_train_batch_end."""
        images, labels = batch["image"], batch["label"]
        if not self._labels_checked:
            _check_labels(labels, self.num_classes)
            self._labels_checked = True
        if self.erasing is not None:  # the reference erases per image in the loader, after Normalize, before mixing
            self.erasing.device = images.device
            images = self.erasing(images)
        targets = labels
        if self.mixup is not None:
            if len(images) % 2:
                raise ValueError(f"Mixup/CutMix pairs images within a batch and needs an even batch size; got "
                                 f"{len(images)}. Use an even --data.batch_size.")
            images, targets = self.mixup(images, labels)
        return self.criterion(self.model(images), targets)

    def param_groups(self) -> list[dict]:
        skip = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else set()
        return param_groups_layer_decay(self.model, self.optim_cfg.weight_decay, self.optim_cfg.layer_decay, skip)

    def on_train_start(self):
        self._ema_seen_step = self.trainer.global_step

    def on_train_batch_end(self, outputs, batch, batch_idx):
        step = self.trainer.global_step
        if self.ema is None or step == self._ema_seen_step:  # accumulating: no optimizer step yet
            return
        self._ema_seen_step = step
        if step % self.ema_cfg.every_n_steps == 0:
            copying = self.ema_cfg.copy_during_warmup and step <= self.optim_cfg.warmup_steps
            self.ema.apply_update_(self.model, 0.0 if copying else self.ema_cfg.decay)

    def validation_step(self, batch, batch_idx):
        images, labels = batch["image"], batch["label"]
        if batch_idx == 0:
            _check_labels(labels, self.num_classes)
        logits = self.model(images)
        self.log("val/loss", F.cross_entropy(logits.float(), labels), sync_dist=True, batch_size=len(labels))
        self.accuracy.update(logits, labels)
        if self.ema is not None:
            self.ema_accuracy.update(self.ema.module(images), labels)

    def on_validation_epoch_end(self):
        for name, value in self.accuracy.compute_and_reset().items():
            self.log(f"val/{name}", value, prog_bar=name == "top1")
        if self.ema_accuracy is not None:
            for name, value in self.ema_accuracy.compute_and_reset().items():
                self.log(f"val/ema_{name}", value)


# ---- linear probing ----------------------------------------------------------------------------------------------

class LinearProbe(Method):
    """A linear classifier on frozen features (MAE main_linprobe.py): ``BatchNorm1d(affine=False, eps=1e-6)``
    then ``Linear`` (trunc_normal(0.01)) on the backbone's pooled features (ViT: the cls token after the final
    norm), trained with LARS and plain cross-entropy.

    The head stays in train mode so its BatchNorm statistics update (mae#54). The backbone runs without
    gradients and in eval mode: for a ViT without drop path that is the same computation as MAE's train mode,
    and for a backbone with BatchNorm (RegNet) it keeps the frozen network really frozen.

    Args:
        model: keyword arguments of ``models.create`` for the backbone; ``num_classes`` must be 0.
        num_classes: outputs of the probe.
        optim: ``LARSConfig`` (or its fields as a dict).
        lr, total_steps: as ``ImageClassification``.
    """

    batch_keys = ("image", "label")

    def __init__(self, model: dict, num_classes: int, optim: LARSConfig | dict | None, lr: float, total_steps: int):
        super().__init__(as_config(LARSConfig, optim), lr, total_steps)
        self.record_hparams(model=model, num_classes=num_classes, optim=self.optim_cfg, lr=lr, total_steps=total_steps)
        if model.get("num_classes", 0) != 0:
            raise ValueError(f"LinearProbe's backbone must be built without a head (num_classes=0), got {model}")
        self.model = models.create(**model).requires_grad_(False)
        self.num_classes = num_classes
        dim = getattr(self.model, "num_features", None) or self.model.cfg.embed_dim
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)
        self.accuracy = TopKAccuracy(num_classes)
        # Forward only: nothing propagates back through the frozen backbone, and the head's share is negligible.
        self.flops_per_sample = _forward_flops(self.model)
        self.warn_without_init = "No --init_from: probing a randomly initialised backbone (a baseline, not a result)."
        self._labels_checked = False

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.train(False)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.model(images)
        return self.head(features.float())

    def compute_loss(self, batch) -> torch.Tensor:
        if not self._labels_checked:
            _check_labels(batch["label"], self.num_classes)
            self._labels_checked = True
        return F.cross_entropy(self(batch["image"]), batch["label"])

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.head.parameters())}]

    def validation_step(self, batch, batch_idx):
        logits, labels = self(batch["image"]), batch["label"]
        self.log("val/loss", F.cross_entropy(logits.float(), labels), sync_dist=True, batch_size=len(labels))
        self.accuracy.update(logits, labels)

    def on_validation_epoch_end(self):
        for name, value in self.accuracy.compute_and_reset().items():
            self.log(f"val/{name}", value, prog_bar=name == "top1")

    @torch.no_grad()
    def as_classifier(self) -> nn.Module:
        """The backbone with the probe as its own classifier, for export: the BatchNorm (its running statistics,
        i.e. eval mode) folded into the Linear, so that e.g. timm's VisionTransformer(num_classes=C) gives the
        probe's eval-mode logits: W' = W / s, b' = b - W' mean with s = sqrt(var + eps)."""
        bn, fc = self.head
        scale = (bn.running_var + bn.eps).rsqrt()
        weight = fc.weight * scale
        bias = fc.bias - weight @ bn.running_mean
        classifier = models.create(**{**self.hparams.model, "num_classes": self.num_classes})
        head = classifier_name(classifier)
        state = {**self.model.state_dict(), f"{head}.weight": weight, f"{head}.bias": bias}
        classifier.load_state_dict(state)
        return classifier.to(fc.weight.device).eval()
