"""Optimizers, parameter groups and learning-rate schedules shared by every method."""

import math
from dataclasses import dataclass

import torch
from timm.optim import Lamb
from torch import nn


@dataclass
class ScheduleConfig:
    """The learning rate and its warmup + cosine schedule, shared by every optimizer's config."""

    blr: float = 1e-3
    """Base learning rate. The actual rate is blr * effective_batch / 256 (MAE's linear scaling rule).
    1e-3 is the reference code's default; the paper's recipes use 1.5e-4 (recipes/configs)."""
    lr: float | None = None
    """Absolute learning rate; when set it replaces the rate derived from blr."""
    warmup_steps: int = 50
    """Linear warmup from 0, in optimizer steps (MAE: 40 epochs of 800)."""
    min_lr: float = 0.0
    """Floor of the half-cycle cosine decay."""

    def __post_init__(self):
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.lr is None and self.blr <= 0:
            raise ValueError(f"optim.blr must be > 0, got {self.blr}")


@dataclass
class OptimConfig(ScheduleConfig):
    weight_decay: float = 0.05
    """AdamW weight decay. Biases, norms and other 1-D parameters never decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas; MAE pretraining uses beta2 = 0.95."""


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


def with_lr_scale(param_groups: list[dict], lr: float) -> list[dict]:
    """Each group's starting rate is ``lr * lr_scale`` (1 without a scale).

    The schedule (``build_warmup_cosine``) multiplies every group's starting rate by one factor, so a group's
    rate at any step is ``lr * lr_scale * factor``: MAE util/lr_sched.py sets ``lr * lr_scale`` every iteration,
    min_lr included, which is the same number.
    """
    return [{**g, "lr": lr * g["lr_scale"]} if "lr_scale" in g else g for g in param_groups]


def build_adamw(param_groups: list[dict], cfg: OptimConfig, lr: float) -> torch.optim.AdamW:
    # Fused AdamW: one kernel per step, and it can skip a step on the device (found_inf), which the
    # non-finite loss guard uses instead of reading the loss back each step (trainers/guards.py).
    fused = all(p.device.type in ("cuda", "cpu") for g in param_groups for p in g["params"])
    return torch.optim.AdamW(with_lr_scale(param_groups, lr), lr=lr, betas=tuple(cfg.betas), fused=fused or None)


def build_warmup_cosine(optimizer: torch.optim.Optimizer, cfg, lr: float, total_steps: int):
    """Per-step schedule; each group's own base rate (e.g. a layer-decay scale baked in) is scaled alike.

    ``cfg`` is any config with ``warmup_steps`` and ``min_lr`` (OptimConfig, LARSConfig)."""
    min_ratio = cfg.min_lr / lr if lr > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, cfg.warmup_steps, total_steps, min_ratio)
    )


# ---- fine-tuning: layer-wise learning-rate decay ----------------------------------------------------------

def vit_layer_id(name: str, depth: int) -> int:
    """Depth of a ViT parameter for layer decay (facebookresearch/mae util/lr_decay.py get_layer_id_for_vit):
    0 for the embedding (cls token, position table, patch embedding or conv stem), i + 1 for ``blocks.i``,
    depth + 1 for everything after the blocks (final norm, fc_norm, head)."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups_layer_decay(model: nn.Module, weight_decay: float, layer_decay: float,
                             no_weight_decay_names: set[str] | frozenset[str] = frozenset()) -> list[dict]:
    """AdamW groups for fine-tuning with layer-wise rate decay (MAE util/lr_decay.py param_groups_lrd).

    A parameter at depth ``id`` (``vit_layer_id``) gets ``lr_scale = layer_decay ** (depth + 1 - id)``: the
    head keeps the full rate, the patch embedding gets ``layer_decay ** (depth + 1)``. Parameters with
    ``ndim == 1`` or named in ``no_weight_decay_names`` (exact names, e.g. ``pos_embed``) get no weight
    decay; the reference does not look at the ``.bias`` suffix, and biases are 1-D anyway. One group per
    (depth, decay or not): at most 2 x (depth + 2) groups. Frozen parameters are left out.

    A model without ``blocks`` (a CNN such as RegNetY) has no layer order this rule knows: it gets the plain
    two-group split with ``lr_scale`` 1.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        plain = param_groups_weight_decay(model, weight_decay, set(no_weight_decay_names))
        return [{**g, "lr_scale": 1.0} for g in plain]
    depth = len(blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim == 1 or name in no_weight_decay_names
        layer = vit_layer_id(name, depth)
        group = groups.setdefault((layer, no_decay), {
            "params": [], "weight_decay": 0.0 if no_decay else weight_decay,
            "lr_scale": layer_decay ** (depth + 1 - layer),
        })
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


# ---- linear probing: LARS ---------------------------------------------------------------------------------

@dataclass
class LARSConfig(ScheduleConfig):
    blr: float = 0.1
    """Base learning rate; the actual rate is blr * effective_batch / 256 (MAE linear probe: 0.1, so 6.4 at 16384)."""
    warmup_steps: int = 10
    """Linear warmup from 0, in optimizer steps (MAE: 10 epochs of 90)."""
    weight_decay: float = 0.0
    """Weight decay, applied (inside the trust ratio) to parameters with more than one dimension only."""
    momentum: float = 0.9
    """Momentum of the update buffer."""
    trust_coefficient: float = 0.001
    """LARS trust coefficient: a >1-D parameter's update is scaled by trust * ||p|| / ||grad + wd * p||."""

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"optim.momentum must be in [0, 1), got {self.momentum}")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio, as MAE's linear probe uses it (facebookresearch/mae
    util/lars.py; You et al. 2017).

    For a parameter with more than one dimension, ``d = grad + wd * p`` is scaled by
    ``trust * ||p|| / ||d||`` (1 when either norm is 0); 1-D parameters (biases, norms) take the plain
    gradient, without decay. Then ``mu <- momentum * mu + d`` and ``p <- p - lr * mu``.

    Our own rather than ``timm.optim.Lars``: timm applies the trust ratio only when the group's weight decay
    is non-zero (unless ``always_adapt``) and to 1-D parameters too, while the MAE probe trains with weight
    decay 0 and still scales every >1-D update by the trust ratio.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(f"LARS: need lr >= 0, weight_decay >= 0, 0 <= momentum < 1, trust_coefficient > 0; "
                             f"got {lr}, {weight_decay}, {momentum}, {trust_coefficient}")
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                    "trust_coefficient": trust_coefficient}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    both = (p_norm > 0) & (d_norm > 0)
                    # where() picks 1 wherever a norm is 0, so the 0/0 of the other branch never reaches p
                    d = d * torch.where(both, group["trust_coefficient"] * p_norm / d_norm, torch.ones_like(p_norm))
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(d)
                p.add_(state["mu"], alpha=-group["lr"])
        return loss


def build_lars(param_groups: list[dict], cfg: LARSConfig, lr: float) -> LARS:
    return LARS(with_lr_scale(param_groups, lr), lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                trust_coefficient=cfg.trust_coefficient)


def build_optimizer(param_groups: list[dict], cfg: ScheduleConfig, lr: float) -> torch.optim.Optimizer:
    """The optimizer a config names: LARS for ``LARSConfig``; SGD with Nesterov momentum for a config whose
    ``name`` is "sgd" (SWAG's RegNets); timm's LAMB for "lamb" (PE-Core: NVIDIA's variant, with bias correction, the
    trust ratio on decayed parameters and a global grad-norm clip at 1); else AdamW (fused where the parameters
    allow it)."""
    if isinstance(cfg, LARSConfig):
        return build_lars(param_groups, cfg, lr)
    name = getattr(cfg, "name", "adamw")
    if name == "sgd":
        return torch.optim.SGD(with_lr_scale(param_groups, lr), lr=lr, momentum=cfg.momentum, nesterov=True)
    if name == "lamb":
        return Lamb(with_lr_scale(param_groups, lr), lr=lr, betas=tuple(cfg.betas))
    return build_adamw(param_groups, cfg, lr)


def warmup_step_decay_factor(step: int, warmup_steps: int, milestones: list[int] | tuple[int, ...],
                             gamma: float = 0.1) -> float:
    """Learning-rate multiplier of a linear warmup followed by step-wise decay: ``gamma`` once for every milestone
    (an optimizer step) already reached, as SAM trains (Kirillov et al. 2023, appendix A: 250 warmup steps, then
    x0.1 at 60000 and 86666 of 90000 steps)."""
    if step < warmup_steps:
        return step / warmup_steps
    return gamma ** sum(step >= milestone for milestone in milestones)
