"""Layer-wise learning-rate decay (facebookresearch/mae util/lr_decay.py:param_groups_lrd) against scales worked by
hand from its rule, with ViT-B's decay 0.65 from facebookresearch/mae FINETUNE.md."""

import math

import pytest
import torch
from torch import nn

import models
from trainers.classification import FinetuneOptimConfig
from trainers.optim import OptimConfig, build_adamw, build_warmup_cosine, param_groups_layer_decay


def _scale_and_wd(groups: list[dict], model: nn.Module) -> dict[str, tuple[float, float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_vit_b_with_decay_065_matches_the_reference_vector():
    with torch.device("meta"):  # ViT-B/16 with a 1000-class head and global pooling, as MAE fine-tunes it
        model = models.create("vit_base_patch16", num_classes=1000, global_pool="avg")
    groups = param_groups_layer_decay(model, 0.05, 0.65, {"pos_embed", "cls_token"})
    got = _scale_and_wd(groups, model)
    assert len(got) == len(list(model.parameters()))

    # by hand from lr_decay.py:get_layer_id_for_vit: 0.65^13 for id 0 (cls, pos_embed, patch_embed) ... 0.65^1 for
    # block 11, 1.0 for the head
    for name in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"):
        assert got[name][0] == pytest.approx(0.65 ** 13), name
    assert got["blocks.0.attn.qkv.weight"][0] == pytest.approx(0.65 ** 12)
    assert got["blocks.5.mlp.fc2.bias"][0] == pytest.approx(0.65 ** 7)
    assert got["blocks.11.norm1.weight"][0] == pytest.approx(0.65)
    for name in ("head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"):
        assert got[name][0] == 1.0, name
    for i in range(12):
        scales = [got[n][0] for n in got if n.startswith(f"blocks.{i}.")]
        assert len(scales) == 12 and scales == pytest.approx([0.65 ** (12 - i)] * 12)  # 12 tensors per block

    # weight decay: none for 1-D parameters and for the names pos_embed / cls_token (3-D); 0.05 for the rest
    no_decay = {n for n, (_, wd) in got.items() if wd == 0.0}
    assert {"cls_token", "pos_embed", "patch_embed.proj.bias", "head.bias", "fc_norm.weight",
            "blocks.3.attn.qkv.bias", "blocks.3.norm2.weight"} <= no_decay
    assert {n for n in got if n not in no_decay} == {n for n, p in model.named_parameters()
                                                      if p.ndim > 1 and n not in ("cls_token", "pos_embed")}
    assert got["blocks.3.attn.qkv.weight"][1] == got["head.weight"][1] == got["patch_embed.proj.weight"][1] == 0.05
    # "up to 2 x 14 groups": (decay, no decay) for id 0, each of 12 blocks, and the head
    assert len(groups) == 28


def test_frozen_parameters_are_left_out_and_a_model_without_blocks_gets_plain_groups():
    mae = models.create("mae_vit_tiny_patch8", img_size=16).encoder  # its sin-cos pos_embed is frozen
    names = _scale_and_wd(param_groups_layer_decay(mae, 0.05, 0.75), mae)
    assert "pos_embed" not in names and "cls_token" in names

    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    groups = param_groups_layer_decay(cnn, 0.05, 0.65)
    got = _scale_and_wd(groups, cnn)
    assert {scale for scale, _ in got.values()} == {1.0}
    assert {n for n, (_, wd) in got.items() if wd == 0.05} == {"0.weight", "3.weight"}


class _TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Linear(2, 2)
        self.blocks = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
        self.head = nn.Linear(2, 1)


def test_the_schedule_gives_each_group_lr_times_its_scale():
    model = _TwoBlocks()
    cfg = OptimConfig(warmup_steps=2, min_lr=1e-3, weight_decay=0.0)
    lr, total = 1.0, 6
    groups = param_groups_layer_decay(model, 0.0, 0.5)
    optimizer = build_adamw(groups, cfg, lr)
    scheduler = build_warmup_cosine(optimizer, cfg, lr, total)
    depth = {"patch_embed": 0, "blocks.0": 1, "blocks.1": 2, "head": 3}
    names = {id(p): n.rsplit(".", 1)[0] for n, p in model.named_parameters()}
    for step in range(total + 1):
        # MAE util/lr_sched.py: lr * e / W in warmup, then min_lr + (lr - min_lr) * cos term; times 0.5^(3 - id)
        if step < 2:
            base = lr * step / 2
        else:
            base = 1e-3 + (lr - 1e-3) * 0.5 * (1 + math.cos(math.pi * (step - 2) / (total - 2)))
        for group in optimizer.param_groups:
            scale = 0.5 ** (3 - depth[names[id(group["params"][0])]])
            assert group["lr"] == pytest.approx(base * scale), (step, scale)
        optimizer.step()
        scheduler.step()


def test_finetune_optim_defaults_are_mae_finetuning_and_bad_decay_is_refused():
    cfg = FinetuneOptimConfig()
    assert (cfg.blr, tuple(cfg.betas), cfg.min_lr, cfg.weight_decay) == (5e-4, (0.9, 0.999), 1e-6, 0.05)
    with pytest.raises(ValueError, match="layer_decay"):
        FinetuneOptimConfig(layer_decay=0.0)
    with pytest.raises(ValueError, match="layer_decay"):
        FinetuneOptimConfig(layer_decay=1.5)
