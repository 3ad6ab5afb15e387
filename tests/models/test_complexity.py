"""FLOPs / params / activations against the published tables and torch's own FLOP counter."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import models
from models.complexity import mae_complexity, vit_complexity
from models.mae import MAEConfig
from models.vit import ViTConfig


def _vit(d, depth, heads, patch, **kw):
    return ViTConfig(embed_dim=d, depth=depth, num_heads=heads, patch_size=patch, **kw)


# performance.md §2.1 (open_clip docs/model_profile.csv image towers), forward GFLOPs at 224
@pytest.mark.parametrize(
    "cfg,gflops",
    [(_vit(768, 12, 12, 16), 35.13), (_vit(1024, 24, 16, 16), 123.11), (_vit(1024, 24, 16, 14), 162.02),
     (_vit(1280, 32, 16, 14), 334.59)],
)
def test_vit_forward_flops(cfg, gflops):
    assert round(vit_complexity(cfg).flops / 1e9, 2) == gflops


# performance.md §2.2 (MAE, reference models_mae.py structure, mask 0.75)
@pytest.mark.parametrize(
    "d,depth,heads,patch,encoder_gf,gflops",
    [(768, 12, 12, 16, 8.82, 19.56), (1024, 24, 16, 16, 30.75, 41.51), (1280, 32, 16, 14, 82.87, 97.12)],
)
def test_mae_forward_flops(d, depth, heads, patch, encoder_gf, gflops):
    cfg = MAEConfig(embed_dim=d, depth=depth, num_heads=heads, patch_size=patch)
    assert round(mae_complexity(cfg).flops / 1e9, 2) == gflops
    visible = int((224 // patch) ** 2 * 0.25) + 1  # 49 + 1 or 64 + 1
    assert round(vit_complexity(cfg, num_tokens=visible).flops / 1e9, 2) == encoder_gf
    assert mae_complexity(cfg).train_flops == 3 * mae_complexity(cfg).flops


def test_mae_one_block_decoder():
    cfg = MAEConfig(embed_dim=1024, depth=24, num_heads=16, decoder_depth=1)
    assert round(mae_complexity(cfg).flops / 1e9, 2) == 32.28


def test_vit_huge_params_with_head():
    # methods.md §2.3: ViT-H/14 @224 with a 1000-class head, 632,045,800 params (trunk 1,281,000 fewer)
    cfg = _vit(1280, 32, 16, 14, num_classes=1000)
    assert vit_complexity(cfg).params == 632_045_800
    with torch.device("meta"):
        model = models.create("vit_huge_patch14", num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 632_045_800
    assert vit_complexity(_vit(1280, 32, 16, 14)).params == 632_045_800 - 1_281_000


# methods.md §5 (pycls ViT_P table, 224 px, 1000 classes): params and activations in millions
@pytest.mark.parametrize(
    "cfg,params_m,acts_m",
    [(_vit(192, 12, 3, 16, mlp_ratio=3.0, num_classes=1000), 4.83, 5.52),
     (_vit(384, 12, 6, 16, mlp_ratio=3.0, num_classes=1000), 18.51, 11.04),
     (_vit(768, 12, 12, 16, num_classes=1000), 86.57, 23.90),
     (_vit(1024, 14, 16, 16, num_classes=1000), 178.36, 37.14)],
)
def test_pycls_params_and_activations(cfg, params_m, acts_m):
    cx = vit_complexity(cfg)
    assert round(cx.params / 1e6, 2) == params_m
    assert round(cx.activations / 1e6, 2) == acts_m


def test_flops_agree_with_torch_flop_counter():
    torch.manual_seed(0)
    vit = models.create("vit_tiny_patch16", img_size=32, patch_size=8, depth=2, num_classes=10).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vit(torch.randn(1, 3, 32, 32))
    assert counter.get_total_flops() == vit.complexity().flops

    mae = models.create("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=2, decoder_depth=2).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        mae(torch.randn(1, 3, 32, 32))
    assert counter.get_total_flops() == mae.complexity().flops
