"""MAE pretraining (He et al., CVPR 2022) as a LightningModule: the method, not the plumbing."""

from dataclasses import dataclass

import torch

import models
from models.mae import patchify, unpatchify
from trainers.handoff import load_into
from trainers.method import Method, as_config
from trainers.optim import OptimConfig, param_groups_weight_decay


@dataclass
class MAEModelConfig:
    name: str = "mae_vit_tiny_patch8"
    """Registered model name (`python -c "import models; print(models.list_models('mae_*'))"`)."""
    mask_ratio: float = 0.75
    """Fraction of patches removed; the encoder sees int(L * (1 - ratio)) patches."""
    norm_pix_loss: bool = True
    """Regress per-patch normalised pixels (the paper's default recipe)."""
    drop_path_rate: float = 0.0
    """Stochastic depth in the encoder."""

    def __post_init__(self):
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"model.mask_ratio must be in [0, 1), got {self.mask_ratio}")


class MAEPretraining(Method):
    """Batches carry ``image`` (normalised float); the loss is the model's masked-patch loss.

    Args:
        model: keyword arguments of ``models.create`` (``name`` plus config overrides).
        optim: ``OptimConfig`` (or its fields as a dict, as checkpoints store them).
        lr: the actual peak learning rate (already scaled by the effective batch).
        total_steps: length of the schedule in optimizer steps.
    """

    batch_keys = ("image",)

    def __init__(self, model: dict, optim: OptimConfig | dict | None, lr: float, total_steps: int):
        super().__init__(as_config(OptimConfig, optim), lr, total_steps)
        self.record_hparams(model=model, optim=self.optim_cfg, lr=lr, total_steps=total_steps)
        self.model = models.create(**model)
        self.flops_per_sample = 3 * self.model.complexity().flops  # forward + backward

    def compute_loss(self, batch) -> torch.Tensor:
        loss, _, _ = self.model(batch["image"])
        return loss

    def param_groups(self) -> list[dict]:
        return param_groups_weight_decay(self.model, self.optim_cfg.weight_decay, skip=self.model.no_weight_decay())

    def init_from(self, source) -> list[str]:
        """Continue pretraining from an earlier MAE run's weights (decoder included; the optimizer starts fresh)."""
        load_into(self.model, source, prefix="model.")
        return [f"Initialised the model from {source}"]

    def validation_step(self, batch, batch_idx):
        # The same masks at every validation, so that val/loss curves compare like with like.
        noise = self._fixed_noise(batch["image"], seed=batch_idx)
        loss, _, _ = self.model(batch["image"], noise=noise)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["image"]))

    def _fixed_noise(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        num_patches = (images.shape[-1] // self.model.cfg.patch_size) ** 2
        gen = torch.Generator(device="cpu").manual_seed(seed + 1000 * self.global_rank)
        return torch.rand(images.shape[0], num_patches, generator=gen).to(images.device)

    @torch.no_grad()
    def image_panels(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows for the reconstruction grid, all in the input's normalised space."""
        noise = self._fixed_noise(images, seed=0)
        _, pred, mask = self.model(images, noise=noise)
        p = self.model.cfg.patch_size
        target = patchify(images, p)
        if self.model.cfg.norm_pix_loss:  # undo the per-patch normalisation of the prediction
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6).sqrt() + target.mean(dim=-1, keepdim=True)
        removed = mask.unsqueeze(-1).to(pred.dtype)
        return {
            "original": images,
            "masked": unpatchify(target * (1 - removed), p),
            "reconstruction": unpatchify(pred, p),
            "visible + reconstruction": unpatchify(target * (1 - removed) + pred * removed, p),
        }
