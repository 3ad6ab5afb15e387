import math

import pytest
import torch
from torch import nn

from trainers.optim import (OptimConfig, build_adamw, build_warmup_cosine, effective_batch,
                            param_groups_weight_decay, resolve_lr, warmup_cosine_factor)


def test_linear_scaling_rule_matches_the_reference_vectors():
    # blr and batch of facebookresearch/mae PRETRAIN.md and FINETUNE.md, worked by hand with lr = blr * batch / 256:
    # 1.5e-4 * 4096 / 256 = 2.4e-3 and 5e-4 * 1024 / 256 = 2e-3
    assert resolve_lr(OptimConfig(blr=1.5e-4), effective_batch(64, 1, 64)) == pytest.approx(2.4e-3)
    assert resolve_lr(OptimConfig(blr=5e-4), effective_batch(32, 4, 8)) == pytest.approx(2e-3)
    assert resolve_lr(OptimConfig(blr=1.5e-4, lr=0.01), 4096) == 0.01


@pytest.mark.parametrize("step, expected", [
    (0, 0.0),             # warmup starts from zero
    (20, 0.5),            # e / 40 with e = 20
    (40, 1.0),            # end of warmup
    (420, 0.5),           # half way through the cosine: 0.5 * (1 + cos(pi / 2))
    (610, 0.5 * (1 + math.cos(math.pi * 570 / 760))),
    (800, 0.0),
])
def test_warmup_cosine_values(step, expected):
    assert warmup_cosine_factor(step, warmup_steps=40, total_steps=800) == pytest.approx(expected, abs=1e-12)


def test_min_lr_floor_follows_the_reference_formula():
    lr, min_lr = 2.4e-3, 1e-6
    # util/lr_sched.py: min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * (e - W) / (E - W)))
    expected = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * 300 / 760))
    assert lr * warmup_cosine_factor(340, 40, 800, min_ratio=min_lr / lr) == pytest.approx(expected)


def test_scheduler_sets_the_rate_used_by_each_optimizer_step():
    param = nn.Parameter(torch.zeros(3))
    cfg = OptimConfig(warmup_steps=4, min_lr=0.0)
    opt = build_adamw([{"params": [param], "weight_decay": 0.0}], cfg, lr=1.0)
    sched = build_warmup_cosine(opt, cfg, lr=1.0, total_steps=10)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0, 0.25, 0.5, 0.75, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(1, 6)]
    assert seen == pytest.approx(expected)
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_weight_decay_groups_follow_the_mae_pretraining_split():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))     # 3-D: decayed, as timm 0.3.2 add_weight_decay
            self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4), requires_grad=False)  # frozen: not optimised
            self.proj = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.scale = nn.Parameter(torch.ones(1, 4))              # named in skip

    model = Toy()
    decay, no_decay = param_groups_weight_decay(model, 0.05, skip={"scale"})
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {"cls_token", "proj.weight"}
    assert {names[id(p)] for p in no_decay["params"]} == {"proj.bias", "norm.weight", "norm.bias", "scale"}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="warmup_steps"):
        OptimConfig(warmup_steps=-1)
    with pytest.raises(ValueError, match="blr"):
        OptimConfig(blr=0)
