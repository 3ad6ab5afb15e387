"""Optimizers, parameter groups and learning-rate schedules shared by every method."""

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class OptimConfig:
    blr: float = 1e-3
    """Base learning rate. The actual rate is blr * effective_batch / 256 (MAE's linear scaling rule).
    1e-3 is the reference code's default; the paper's recipes use 1.5e-4 (recipes/configs)."""
    lr: float | None = None
    """Absolute learning rate; when set it replaces the rate derived from blr."""
    weight_decay: float = 0.05
    """AdamW weight decay. Biases, norms and other 1-D parameters never decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas; MAE pretraining uses beta2 = 0.95."""
    warmup_steps: int = 50
    """Linear warmup from 0, in optimizer steps (MAE: 40 epochs of 800)."""
    min_lr: float = 0.0
    """Floor of the half-cycle cosine decay."""

    def __post_init__(self):
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.lr is None and self.blr <= 0:
            raise ValueError(f"optim.blr must be > 0, got {self.blr}")


def effective_batch(batch_per_device: int, accumulate_grad_batches: int, world_size: int) -> int:
    return batch_per_device * accumulate_grad_batches * world_size


def resolve_lr(cfg: OptimConfig, eff_batch: int) -> float:
    """facebookresearch/mae main_pretrain.py: lr = blr * eff_batch_size / 256."""
    return cfg.lr if cfg.lr is not None else cfg.blr * eff_batch / 256


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier at an optimizer step (facebookresearch/mae util/lr_sched.py).

    The reference evaluates its schedule per iteration at the fractional epoch; counted in steps the
    formula is the same: linear warmup from 0, then a half cycle of cosine down to ``min_ratio``.
    """
    if step < warmup_steps:
        return step / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups_weight_decay(model: nn.Module, weight_decay: float, skip: set[str] = frozenset()) -> list[dict]:
    """Two AdamW groups: decayed weights, and 1-D parameters / biases / ``skip`` names without decay.

    This is the split of timm 0.3.2 ``add_weight_decay`` that MAE pretraining uses; frozen parameters
    (MAE's fixed sin-cos tables) are left out of the optimizer altogether.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in skip or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_adamw(param_groups: list[dict], cfg: OptimConfig, lr: float) -> torch.optim.AdamW:
    # Fused AdamW is one kernel per step on CUDA; it is unavailable on the CPU.
    on_cuda = any(p.is_cuda for g in param_groups for p in g["params"])
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(cfg.betas), fused=on_cuda or None)


def build_warmup_cosine(optimizer: torch.optim.Optimizer, cfg: OptimConfig, lr: float, total_steps: int):
    """Per-step schedule; each group's own base rate (e.g. a layer-decay scale baked in) is scaled alike."""
    min_ratio = cfg.min_lr / lr if lr > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, cfg.warmup_steps, total_steps, min_ratio)
    )
