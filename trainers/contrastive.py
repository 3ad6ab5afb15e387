"""Contrastive image-text (and video-text) pretraining as Perception Encoder trains it (Bolya et al. 2025), and
locked-image tuning (LiT, Zhai et al. 2022), which MAWS (Singh et al. 2023) uses to measure zero-shot transfer.

Batches carry ``image`` (B, 3, H, W) or ``frames`` (B, T, 3, H, W) and ``text_tokens`` (B, L). The loss is
:func:`trainers.contrastive_loss.clip_loss` over the global batch (or SigLIP's sigmoid loss), plus PE's mask
regularisation when it is switched on (:mod:`trainers.mask_regularization`). Validation batches may carry ``label``: the
epoch then ends with zero-shot classification (class embeddings from prompt templates, ranked by cosine, as PE's
logits of 100 x cosine rank them) and image-text retrieval both ways, with plain cosine and with PE's reweighted
scores.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors

import models
from evaluation.zero_shot import DEFAULT_TEMPLATES, class_embeddings, retrieval_recall, zero_shot_classification
from models.pe import open_clip_config, open_clip_state_dict
from trainers.checkpoint import save_safetensors
from trainers.contrastive_loss import clip_loss, siglip_loss
from trainers.handoff import init_backbone, load_into, load_state_dict
from trainers.mask_regularization import masked_feature_loss
from trainers.method import Method, as_config
from trainers.optim import OptimConfig, param_groups_weight_decay

OPTIMIZERS = ("adamw", "lamb")
LOSSES = ("clip", "siglip")
SIGLIP_INIT = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}
"""SigLIP's initial temperature and bias (Zhai et al. 2023)."""


@dataclass
class ContrastiveModelConfig:
    name: str = "pe_core_nano"
    """Registered CLIP model (`python -c "import models; print(models.list_models('pe_core_*'))"`)."""
    lock_image: bool = False
    """Locked-image tuning: the image tower (``image_tower``, initialised with --init_from) stays frozen and only
    the text tower and the temperature train."""
    image_tower: str | None = None
    """A registered image model used instead of the PE vision tower, e.g. the ViT of a MAE, SWAG, MAWS or
    finetune run; its pooled features are the image embedding (LiT uses no image projection), so the text tower
    projects to its width. None: the model's own PE tower."""
    local_loss: bool = False
    """Each rank computes the loss of its own rows against the global batch (a W-th of the logits) instead of the
    full global-batch loss; the gradients are the same (CLIP loss; SigLIP's always works this way)."""
    loss: str = "clip"
    """"clip" (InfoNCE, as PE trains), or "siglip" (the sigmoid loss, with a learned logit bias)."""
    mask_fraction: float = 0.0
    """Mask regularisation (PE §2.1): the fraction of each batch's images seen again with patches blanked, whose
    features at those patches are pulled towards the intact image's (the paper-scale configs: 0.0625). 0: off."""
    mask_ratio: float = 0.75
    """The fraction of an image's patches blanked for mask regularisation."""
    mask_weight: float = 1.0
    """The regulariser's weight against the contrastive loss."""

    def __post_init__(self) -> None:
        if self.lock_image and not self.image_tower:
            raise ValueError("model.lock_image needs model.image_tower: the registered image model of the run given "
                             "in --init_from (e.g. --model.image_tower vit_tiny_patch16)")
        if self.loss not in LOSSES:
            raise ValueError(f"Unknown model.loss {self.loss!r}. Choose one of: {', '.join(LOSSES)}.")
        if self.loss == "siglip" and self.local_loss:
            raise ValueError("model.local_loss applies to the CLIP loss; SigLIP's already computes each rank's rows "
                             "only: drop --model.local_loss")
        if not 0 <= self.mask_fraction <= 1 or not 0 < self.mask_ratio < 1:
            raise ValueError(f"model.mask_fraction must be in [0, 1] and model.mask_ratio in (0, 1); got "
                             f"{self.mask_fraction} and {self.mask_ratio}")
        if self.mask_fraction and self.image_tower:
            raise ValueError("Mask regularisation trains the PE vision tower: it does not apply with "
                             "model.image_tower (set model.mask_fraction 0)")


@dataclass
class ContrastiveOptimConfig(OptimConfig):
    blr: float = 4e-3
    """Base learning rate; the actual rate is blr * effective_batch / 256 (1e-3 at the default batch of 64, which
    suits short runs on the synthetic world; PE-Core at paper scale: LAMB at 2e-3 absolute, see recipes/configs)."""
    weight_decay: float = 0.1
    """Weight decay on matrices; 1-D parameters, biases, norms and logit_scale never decay (open_clip)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """Adam betas (CLIP, open_clip's ViT recipes: 0.98)."""
    name: str = "adamw"
    """"adamw", or "lamb" (timm's Lamb: layer-wise trust ratio on decayed parameters, global grad-norm clip at
    1, as PE-Core is trained)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.name not in OPTIMIZERS:
            raise ValueError(f"Unknown optim.name {self.name!r}. Choose one of: {', '.join(OPTIMIZERS)}.")


class ContrastivePretraining(Method):
    """Args:
        model: ``ContrastiveModelConfig`` fields (or the config).
        optim: ``ContrastiveOptimConfig`` (or its fields as a dict, as checkpoints store them).
        lr: the actual peak learning rate; total_steps: length of the schedule in optimizer steps.
        class_names: the zero-shot classes in label order (None: no zero-shot); templates: their prompts.
        tokenize: texts -> (text_tokens, text_mask), for the prompts; kept out of the hyperparameters (the data
            side owns the tokenizer).
        image_size: the training resolution the FLOP count is quoted at (None: the model's native size).
    """

    batch_keys = ("image", "text_tokens")

    def __init__(self, model: ContrastiveModelConfig | dict, optim: ContrastiveOptimConfig | dict | None, lr: float,
                 total_steps: int, class_names: Sequence[str] | None = None,
                 templates: Sequence[str] = DEFAULT_TEMPLATES,
                 tokenize: Callable[[list[str]], tuple[Tensor, Tensor]] | None = None, image_size: int | None = None):
        super().__init__(as_config(ContrastiveOptimConfig, optim), lr, total_steps)
        self.model_cfg = as_config(ContrastiveModelConfig, model)
        self.record_hparams(model=self.model_cfg, optim=self.optim_cfg, lr=lr, total_steps=total_steps,
                            class_names=list(class_names) if class_names else None, templates=list(templates),
                            image_size=image_size)
        tower = {}
        if self.model_cfg.image_tower:  # built at the training resolution: a plain ViT's position table is fixed
            tower = {"image_tower": self.model_cfg.image_tower, "image_size": image_size}
        if self.model_cfg.loss == "siglip":
            tower |= SIGLIP_INIT
        self.model = models.create(self.model_cfg.name, **tower)
        if self.model_cfg.lock_image:
            self.model.lock_image()
        self.class_names, self.templates, self.tokenize = class_names, list(templates), tokenize
        self.flops_per_sample = self.train_flops(image_size)
        self._val: dict[str, list[Tensor]] = {}
        self._val_texts: list[str] = []
        self.retrieval_examples: list[tuple[Tensor, list[str]]] = []
        """After a validation: up to 8 of this rank's first images (CPU) with their 3 best captions."""

    def train_flops(self, image_size: int | None) -> float:
        """FLOPs of one training pair: 3x the forward, or the image forward alone plus 3x the text's when the
        image tower is locked (no backward through it)."""
        full = self.model.complexity(image_size).flops
        if not self.model_cfg.lock_image:  # mask regularisation: that fraction of the images again, with backward
            return 3 * full + 3 * self.model_cfg.mask_fraction * self.model.image_complexity(image_size).flops
        image = self.model.image_complexity(image_size).flops
        return image + 3 * (full - image)

    # -- training ------------------------------------------------------------------------------------------
    def compute_loss(self, batch) -> Tensor:
        images = batch["frames"] if "frames" in batch else batch["image"]
        cfg = self.model_cfg
        if not cfg.mask_fraction:
            return self.contrastive_loss(*self.model(images, batch["text_tokens"]))
        image_features, text_features, logit_scale, patches = self.model.forward_with_patches(
            images, batch["text_tokens"])
        visual = self.model.visual
        self._mask_loss = masked_feature_loss(visual.patch_features, images.flatten(0, -4), patches,
                                              visual.patch_size, cfg.mask_fraction, cfg.mask_ratio)
        return self.contrastive_loss(image_features, text_features, logit_scale) + cfg.mask_weight * self._mask_loss

    def contrastive_loss(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                         gather: bool = True) -> Tensor:
        if self.model_cfg.loss == "siglip":
            return siglip_loss(image_features, text_features, logit_scale, self.model.logit_bias, gather=gather)
        return clip_loss(image_features, text_features, logit_scale, local_loss=self.model_cfg.local_loss,
                         gather=gather)

    def after_optimizer_step(self) -> None:
        self.model.clamp_logit_scale()  # as open_clip does after every optimizer step

    def training_metrics(self) -> dict[str, float]:
        metrics = {"train/logit_scale": self.model.logit_scale.detach()}
        if self.model.logit_bias is not None:
            metrics["train/logit_bias"] = self.model.logit_bias.detach()
        if self.model_cfg.mask_fraction:
            metrics["train/mask_loss"] = self._mask_loss.detach()
        return metrics

    def param_groups(self) -> list[dict]:
        # ndim < 2, biases (and so norms and logit_scale) decay-free, as open_clip_train/main.py: exclude()
        return param_groups_weight_decay(self.model, self.optim_cfg.weight_decay)

    def init_from(self, source) -> list[str]:
        """The image tower from an earlier run (LiT); without ``image_tower``, the whole model from an earlier
        contrastive run."""
        if not self.model_cfg.image_tower:
            load_into(self.model, source, prefix="model.")
            return [f"Initialised the model from {source}"]
        tower, width = self.model.visual.model, self.model.visual.width
        state = load_state_dict(source)  # read once: init_backbone takes it as it is
        source_width = next((v.shape[-1] for k, v in state.items() if k.endswith("cls_token")), None)
        if source_width is not None and source_width != width:
            raise ValueError(f"The image tower in {source} has width {source_width}, but model.image_tower "
                             f"{self.model_cfg.image_tower!r} (whose width the text projection is built for) has "
                             f"{width}: set --model.image_tower to the architecture that run trained.")
        lines = init_backbone(tower, source, state=state)
        return lines + (["image tower locked: it stays as loaded"] if self.model_cfg.lock_image else [])

    # -- validation: loss, zero-shot, retrieval ------------------------------------------------------------
    def validation_step(self, batch, batch_idx):
        images = batch["frames"] if "frames" in batch else batch["image"]
        image_features, text_features, logit_scale = self.model(images, batch["text_tokens"])
        # this rank's pairs: validation batches differ in size and number across ranks, so no collective per batch
        loss = self.contrastive_loss(image_features, text_features, logit_scale, gather=False)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(images))
        parts = {"image": image_features.float(), "text": text_features.float(), "tokens": batch["text_tokens"]}
        if "label" in batch:
            parts["label"] = batch["label"]
        for name, value in parts.items():
            self._val.setdefault(name, []).append(value)
        if batch_idx == 0:
            self._example_images = images[:8].detach().cpu()
        self._val_texts += list(batch.get("text", ()))

    def on_validation_epoch_start(self) -> None:
        self._val, self._val_texts = {}, []

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        local = {name: torch.cat(values) for name, values in self._val.items()}
        self._keep_examples(local["image"], local["text"])
        gathered = {name: _gather_rows(value) for name, value in local.items()}
        self._val, self._val_texts = {}, []
        metrics = self.retrieval(gathered["image"], gathered["text"], gathered["tokens"])
        metrics["retrieval_pairs"] = float(len(gathered["image"]))  # what R@k ran over, every rank's pairs
        if "label" in gathered and self.class_names and self.tokenize is not None:
            metrics |= self.zero_shot(gathered["image"], gathered["label"])
        for name, value in metrics.items():  # every rank holds the same gathered numbers
            self.log(f"val/{name}", value, prog_bar=name == "zero_shot_top1")

    def _keep_examples(self, images: Tensor, texts: Tensor) -> None:
        """The first images of this rank's validation with their best captions among this rank's (a picture for
        people to look at, not a metric: ``val/*_R@k`` are over every rank's pairs)."""
        if len(self._val_texts) != len(texts):  # batches without ``text``: nothing to show
            return
        shown = self._example_images
        best = (images[: len(shown)] @ texts.T).topk(min(3, len(texts)), dim=1).indices.tolist()
        self.retrieval_examples = [(shown[i], [self._val_texts[j] for j in row]) for i, row in enumerate(best)]

    def retrieval(self, images: Tensor, texts: Tensor, tokens: Tensor) -> dict[str, float]:
        """R@1/5/10 both ways over the validation pairs; identical captions share their images (clip_benchmark)."""
        owners = torch.arange(len(images), device=images.device)
        same_text = [tuple(row) for row in tokens.tolist()]
        plain = retrieval_recall(images, texts, owners, texts=same_text)
        reweighted = retrieval_recall(images, texts, owners, texts=same_text, reweight=True)
        return plain | {f"reweighted_{k}": v for k, v in reweighted.items()}

    def zero_shot(self, images: Tensor, labels: Tensor) -> dict[str, float]:
        """Top-1/top-5 (percent) with class embeddings from the prompt templates, on the gathered image features."""
        classes = class_embeddings(self.encode_texts, self.class_names, self.templates)
        accuracy = zero_shot_classification(lambda features: features, [{"image": images, "label": labels}], classes)
        return {f"zero_shot_{k}": v for k, v in accuracy.items()}

    def encode_texts(self, texts: list[str]) -> Tensor:
        tokens, _ = self.tokenize(texts)
        return self.model.encode_text(tokens.to(self.device))

    # -- export --------------------------------------------------------------------------------------------
    def export(self, out_dir: Path, **metadata) -> dict[str, Path]:
        """PE towers: open_clip's format (weights + model config); a LiT model: its own state dict."""
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.model_cfg.image_tower:
            path = save_safetensors(self.model.state_dict(), out_dir / "clip.safetensors",
                                    {"model": self.model_cfg.name, "image_tower": self.model_cfg.image_tower,
                                     **metadata})
            return {"clip": path}
        cfg = self.model.cfg
        name = cfg.open_clip_name or self.model_cfg.name
        config = out_dir / f"{name}.json"
        config.write_text(json.dumps(open_clip_config(cfg), indent=1))
        weights = save_safetensors(open_clip_state_dict(self.model), out_dir / "open_clip.safetensors",
                                   {"open_clip_model": name, **metadata})
        return {"open_clip": weights, "open_clip_config": config}


def _gather_rows(local: Tensor) -> Tensor:
    """Every rank's rows (their counts may differ), concatenated in rank order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    return torch.cat(gather_all_tensors(local))  # pads to the longest rank's rows, gathers, trims
