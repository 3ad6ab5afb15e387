"""Fast compound scaling (Dollár et al. 2021; facebookresearch/pycls pycls/models/scaler.py): factors and
discretisation worked by hand, growth of flops and activations."""

import pytest
import torch

import models
from models.pycls_complexity import anynet_complexity, vit_complexity_pycls
from models.regnet import RegNet, RegNetConfig
from models.scaling import (
    alpha_factors,
    scale_regnet,
    scale_vit,
    scaled_size,
    scaling_factors,
)
from models.vitc import _config as vit_config

# pycls/models/scaler.py:scaling_factors("d1_w8_g8_r1", s): the d, w, r weights sum to 10, so d = s^(1/10),
# w = g = s^(8/10/2) = s^0.4, r = s^(1/10/2) = s^0.05, worked out to 4 decimals
TABLE = [(2, 1.0718, 1.3195, 1.0353), (4, 1.1487, 1.7411, 1.0718), (16, 1.3195, 3.0314, 1.1487)]


@pytest.mark.parametrize("s,d,w,r", TABLE)
def test_fast_scaling_factors_table(s, d, w, r):
    fd, fw, fg, fr = scaling_factors("d1_w8_g8_r1", s)
    assert (round(fd, 4), round(fw, 4), round(fr, 4)) == (d, w, r)
    assert fg == fw  # groups scale with width
    ad, aw, ar = alpha_factors(s, 0.8)  # the paper's exponent form gives the same numbers
    assert (round(ad, 4), round(aw, 4), round(ar, 4)) == (d, w, r)


@pytest.mark.parametrize("kind", ["d", "w", "dw", "dwr", "d1_w8_g8_r1", "d1_w2", "w1_r1", "d2_w1_g3_r0.5"])
@pytest.mark.parametrize("s", [0.5, 2.0, 9.0])
def test_factors_multiply_to_s(kind, s):
    d, w, _, r = scaling_factors(kind, s)
    assert d * w * w * r * r == pytest.approx(s)


def test_letters_are_unit_weights():
    s = 16.0
    assert scaling_factors("dw", s) == pytest.approx(scaling_factors("d1_w1_g0_r0", s))
    assert scaling_factors("dw", s) == pytest.approx((s**0.5, s**0.25, 1.0, 1.0))  # S = 2: d = s^(1/2), w = s^(1/4)
    d, w, g, r = scaling_factors("dwr", s)  # uniform "dwr" = alpha 1/3: d = s^(1/3), w = r = s^(1/6)
    assert (d, w, r) == pytest.approx(alpha_factors(s, 1 / 3)) and g == 1.0
    assert scaling_factors("w", s) == pytest.approx((1.0, 4.0, 1.0, 1.0))  # width only = alpha 1: w = s^(1/2)
    # groups alone: S = w_g / 2 = 0.5, so g = s^(w_g / S / 2) = s (pycls scaler.py), d = w = r = 1
    assert scaling_factors("g", s) == pytest.approx((1.0, 1.0, 16.0, 1.0))


@pytest.mark.parametrize("kind", ["dx", "d1_x2", "d_w2", "", "d1__w2"])
def test_bad_scaling_type_is_a_clear_error(kind):
    with pytest.raises(ValueError, match="scaling type"):
        scaling_factors(kind, 2.0)


def test_bad_scale_is_a_clear_error():
    with pytest.raises(ValueError, match="positive"):
        scaling_factors("dw", 0.0)
    with pytest.raises(ValueError, match="alpha"):
        alpha_factors(2.0, 1.5)


def test_image_size_rounding():
    assert scaled_size(224, 4**0.05) == 240  # 224 x 1.0718 = 240.08 -> 60 x 4
    assert scaled_size(224, 16**0.05) == 256  # 257.3 / 4 = 64.3 -> 64 x 4
    assert scaled_size(224, 1.0) == 224
    assert scaled_size(224, 4**0.05, multiple=16) == 240  # 15.005 -> 15 patches


# defaults: d 22, w0 96, wa 31.41, wm 2.24, g 64 (pycls configs/dds_baselines/regnety/RegNetY-4.0GF_dds_8gpu.yaml)
REGNETY_4GF = RegNetConfig(num_classes=1000)


def test_regnety_4gf_scaled_by_4_by_hand():
    # stages (2, 6, 12, 2) x (128, 192, 512, 1088), g 64; d = 4^0.1 = 1.1487, w = g = 4^0.4 = 1.7411, r = 1.0718:
    # depths 2.30, 6.89, 13.78, 2.30 -> 2, 7, 14, 2; widths /8: 27.86, 41.8, 111.4, 236.8 -> 224, 336, 888, 1896;
    # group 111.4 -> 111 -> 8 x round(13.9) = 112; widths to multiples of 112: 224, 336, 896, 1904; 224 px -> 240
    assert REGNETY_4GF.stages().widths == (128, 192, 512, 1088)
    scaled = scale_regnet(REGNETY_4GF, 4.0)
    st = scaled.stages()
    assert st.depths == (2, 7, 14, 2)
    assert st.widths == (224, 336, 896, 1904)
    assert st.group_widths == (112,) * 4
    assert scaled.img_size == 240


def test_regnety_4gf_scaled_by_4_grows_flops_by_s_and_acts_by_s_to_the_0_6():
    base = anynet_complexity(REGNETY_4GF.stages())
    scaled_cfg = scale_regnet(REGNETY_4GF, 4.0)
    scaled = anynet_complexity(scaled_cfg.stages(), img_size=scaled_cfg.img_size)
    # flops ~ d w^2 r^2 = s (up to discretisation); acts ~ d w r^2 = s^(0.1 + 0.4 + 0.1) = 4^0.6 = 2.30, the
    # s^(1 - alpha/2) of fast scaling with alpha = 0.8 (Dollár et al. 2021)
    assert scaled.flops / base.flops == pytest.approx(4.0, rel=0.10)
    assert scaled.acts / base.acts == pytest.approx(4**0.6, rel=0.10)
    assert scaled.params / base.params == pytest.approx(4**0.9, rel=0.10)  # params x s^((1 + alpha)/2)


def test_scaled_regnet_builds_and_counts_its_own_params():
    scaled = scale_regnet(REGNETY_4GF, 4.0)
    with torch.device("meta"):
        model = RegNet(scaled)
    st = scaled.stages()
    assert [len(list(getattr(model, f"s{i}").children())) for i in range(1, 5)] == list(st.depths)
    assert sum(p.numel() for p in model.parameters()) == anynet_complexity(st).params


def test_scale_vit_by_hand():
    # ViT_P-1GF, s = 4: depth 12 x 1.1487 = 13.78 -> 14; width 192 x 1.7411 = 334.3, head_dim 64 -> 5.22 -> 5 heads,
    # 320 wide; 224 x 1.0718 / 16 = 15.005 -> 15 patches -> 240 px
    cfg = scale_vit(vit_config("1gf", conv=False), 4.0)
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.img_size, cfg.mlp_ratio) == (14, 320, 5, 240, 3.0)
    # ViT_C-4GF: depth 11 -> 12.64 -> 13; 384 -> 668.6 -> 10 heads of 64 = 640; hidden stem dims x 1.7411 -> /8
    # 10.45, 20.9, 41.8, 83.6 -> 80, 168, 336, 672; the last is the new width
    cfg = scale_vit(vit_config("4gf", conv=True), 4.0)
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads) == (13, 640, 10)
    assert cfg.stem_dims == (80, 168, 336, 672, 640) and cfg.stem_strides == (2, 2, 2, 2, 1)


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("s", [2.0, 4.0, 16.0])
def test_scale_vit_grows_flops_by_about_s(conv, s):
    base_cfg = vit_config("18gf", conv)
    base, scaled = vit_complexity_pycls(base_cfg), vit_complexity_pycls(scale_vit(base_cfg, s))
    assert scaled.flops / base.flops == pytest.approx(s, rel=0.10)
    assert scaled.acts / base.acts == pytest.approx(s**0.6, rel=0.10)


def test_scaled_vit_runs():
    cfg = scale_vit(vit_config("1gf", conv=True), 2.0)
    model = models.create("vitc_1gf", **{k: getattr(cfg, k) for k in ("depth", "embed_dim", "num_heads", "stem_dims")},
                          img_size=32).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, cfg.embed_dim)
