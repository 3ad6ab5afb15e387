"""One FLOP count per model: the benchmark reports the model's own ``complexity()``, and the closed-form formulas of
flop_formulas.py (an independent oracle) agree with it. The formulas themselves are pinned by hand and against
open_clip's published profile."""

import pytest
import torch

import models
from benchmarks.report import flop_count
from tests.benchmarks.flop_formulas import formula_forward_flops, mae_forward_flops, vit_block_flops, vit_forward_flops


def test_block_formula_by_hand():
    # N = 2 tokens, d = 3, m = 4: 8*2*9 + 4*4*2*9 + 4*4*3 = 144 + 288 + 48
    assert vit_block_flops(2, 3) == 480
    # patch embed of one 2x2 patch into d = 3, then one block on 2 tokens, then a 5-class head: 2*1*12*3 + 480 + 30
    assert vit_forward_flops(2, 2, 3, 1, num_classes=5) == 72 + 480 + 30


# mlfoundations/open_clip docs/model_profile.csv, image towers at 224 px, forward GFLOPs: ViT-B/16, L/16, L/14, H/14
@pytest.mark.parametrize("patch, dim, depth, forward_gf", [(16, 768, 12, 35.13), (16, 1024, 24, 123.11),
                                                            (14, 1024, 24, 162.02), (14, 1280, 32, 334.59)])
def test_vit_forward_at_224_matches_open_clips_profile(patch, dim, depth, forward_gf):
    assert vit_forward_flops(224, patch, dim, depth) / 1e9 == pytest.approx(forward_gf, abs=0.005)


# MAE at 224 px, mask 0.75, 8-block 512-wide decoder, worked out by hand from the formula (GFLOPs)
@pytest.mark.parametrize("patch, dim, depth, encoder_gf, decoder_gf, forward_gf, train_gf", [
    (16, 768, 12, 8.82, 10.75, 19.56, 58.7),     # MAE ViT-B/16
    (16, 1024, 24, 30.75, 10.76, 41.51, 124.5),  # MAE ViT-L/16
    (14, 1280, 32, 82.87, 14.26, 97.12, 291.4),  # MAE ViT-H/14
])
def test_mae_forward_at_224(patch, dim, depth, encoder_gf, decoder_gf, forward_gf, train_gf):
    encoder, decoder = mae_forward_flops(224, patch, dim, depth)
    assert encoder / 1e9 == pytest.approx(encoder_gf, abs=0.005)
    assert decoder / 1e9 == pytest.approx(decoder_gf, abs=0.005)
    assert (encoder + decoder) / 1e9 == pytest.approx(forward_gf, abs=0.005)
    assert 3 * (encoder + decoder) / 1e9 == pytest.approx(train_gf, abs=0.05)


def test_mae_large_with_a_one_block_decoder():
    assert sum(mae_forward_flops(224, 16, 1024, 24, decoder_depth=1)) / 1e9 == pytest.approx(32.28, abs=0.005)


def test_the_benchmark_reports_the_models_own_count_which_the_formulas_confirm():
    with torch.device("meta"):
        mae = models.create("mae_vit_base_patch16")
        vit = models.create("vit_base_patch16", num_classes=1000)
        regnet = models.create("regnety_200mf")
    for model in (mae, vit, regnet):
        count = flop_count(model)
        assert count["model_forward_flops_per_image"] == model.complexity().flops > 0
        assert count["train_flops_per_image"] == 3 * count["model_forward_flops_per_image"]
        assert count["source"] == f"{type(model).__name__}.complexity()"
    assert formula_forward_flops(mae) / 1e9 == pytest.approx(19.56, abs=0.005)
    assert formula_forward_flops(vit) == pytest.approx(35.126120448e9 + 2 * 768 * 1000)
    for model in (mae, vit):  # two independent implementations of the same counting convention
        own = flop_count(model)["model_forward_flops_per_image"]
        assert abs(own - formula_forward_flops(model)) / formula_forward_flops(model) < 1e-3
    assert formula_forward_flops(regnet) is None  # a CNN: the model's count is the only one


def test_a_model_without_a_count_reports_none():
    count = flop_count(torch.nn.Linear(2, 2))
    assert count["model_forward_flops_per_image"] is None and count["train_flops_per_image"] is None
    assert "no count" in count["source"]
