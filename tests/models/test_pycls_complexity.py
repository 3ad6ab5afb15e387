"""pycls-convention counting against facebookresearch/pycls's own counts (dev/model_complexity.json, the
``complexity`` methods of pycls/models/vit.py) and hand-worked cases."""

import pytest

from models.complexity import vit_complexity
from models.pycls_complexity import (
    Counter,
    adjust_block_compatibility,
    regnet_complexity,
    regnet_stages,
    stem_counter,
    vit_complexity_pycls,
    vit_counter,
)
from models.vit import ViTConfig

# (depth, w0, wa, wm, group width) of facebookresearch/pycls configs/dds_baselines/regnety/RegNetY-*_dds_8gpu.yaml
# -> (flops, params, acts) of the same files' entries in pycls dev/model_complexity.json
REGNETY = {
    "200MF": ((13, 24, 36.44, 2.49, 8), (199_519_076, 3_162_996, 2_168_052)),
    "400MF": ((16, 48, 27.89, 2.09, 8), (401_849_056, 4_344_144, 3_892_496)),
    "4.0GF": ((22, 96, 31.41, 2.24, 64), (3_973_301_344, 20_646_656, 12_287_200)),
    "16GF": ((18, 200, 106.23, 2.48, 112), (15_911_534_044, 83_590_140, 23_041_228)),
    "32GF": ((20, 232, 115.89, 2.53, 232), (32_279_583_362, 145_046_770, 30_261_570)),
}


@pytest.mark.parametrize("name", list(REGNETY))
def test_regnety_golden_values_exactly(name):
    args, (flops, params, acts) = REGNETY[name]
    cx = regnet_complexity(*args)
    assert (cx.flops, cx.params, cx.acts) == (flops, params, acts)


def test_swag_regnety_16gf_row_agrees():
    # facebookresearch/SWAG models/regnet.py:RegNetY16gf builds pycls's 16GF (d 18, w0 200, wa 106.23, wm 2.48, g 112)
    # with SE 0.25 and bottleneck 1, so it has pycls dev/model_complexity.json's counts
    cx = regnet_complexity(18, 200, 106.23, 2.48, 112, se_ratio=0.25, bottleneck=1.0, img_size=224, num_classes=1000)
    assert (cx.flops, cx.params, cx.acts) == (15_911_534_044, 83_590_140, 23_041_228)


def _vit(d, depth, heads, mlp, strides=(), dims=()):
    if not dims:
        return ViTConfig(embed_dim=d, depth=depth, num_heads=heads, mlp_ratio=mlp / d)
    kernels = (3,) * (len(dims) - 1) + (1,)
    return ViTConfig(embed_dim=d, depth=depth, num_heads=heads, mlp_ratio=mlp / d, stem="conv",
                     stem_kernels=kernels, stem_strides=strides, stem_dims=dims)


S5, S7 = (2, 2, 2, 2, 1), (2, 2, 1, 2, 1, 2, 1)
# facebookresearch/pycls branch vitconfigs configs/vitconv_baselines/vit/ViT-{P,C}-{1.0,4.0,18,36}GF_adamw_*.yaml and
# what pycls/models/vit.py:ViT.complexity counts for them (224 px, 1000 classes): GFLOPs, params M, acts M
VIT_TABLE = [
    (_vit(192, 12, 3, 576), 1.083, 4.83, 5.52),
    (_vit(192, 11, 3, 576, S5, (24, 48, 96, 192, 192)), 1.079, 4.57, 5.63),
    (_vit(384, 12, 6, 1152), 3.909, 18.51, 11.04),
    (_vit(384, 11, 6, 1152, S5, (48, 96, 192, 384, 384)), 3.966, 17.75, 11.26),
    (_vit(768, 12, 12, 3072), 17.580, 86.57, 23.90),
    (_vit(768, 11, 12, 3072, S7, (64, 128, 128, 256, 256, 512, 768)), 17.727, 81.57, 24.02),
    (_vit(1024, 14, 16, 4096), 35.997, 178.36, 37.14),
    (_vit(1024, 13, 16, 4096, S7, (64, 128, 128, 256, 256, 512, 1024)), 35.026, 167.80, 36.61),
]


@pytest.mark.parametrize("cfg,gflops,params_m,acts_m", VIT_TABLE)
def test_vit_p_and_c_table(cfg, gflops, params_m, acts_m):
    cx = vit_complexity_pycls(cfg)
    assert round(cx.flops / 1e9, 3) == pytest.approx(gflops, abs=1e-9)
    assert round(cx.params / 1e6, 2) == pytest.approx(params_m, abs=1e-9)
    assert round(cx.acts / 1e6, 2) == pytest.approx(acts_m, abs=1e-9)


def test_4gf_stem_and_block_costs():
    # pycls/models/vit.py complexity for 4GF: ViTStemConv 435.4 MF, ViTStemPatchify 57.9 MF, one ViTEncoderBlock on
    # 197 tokens 320.9 MF, so the conv stem's extra cost is about one block (Xiao et al. 2021 drop one block for it)
    conv, patchify = VIT_TABLE[3][0], VIT_TABLE[2][0]
    assert round(stem_counter(conv).pycls().flops / 1e6) == 435
    assert round(stem_counter(patchify).pycls().flops / 1e6) == 58
    one_block = vit_complexity_pycls(patchify).flops - vit_complexity_pycls(_vit(384, 11, 6, 1152)).flops
    assert round(one_block / 1e6) == 321


def test_conv_stem_multiply_adds_by_hand():
    # 224 -> 112 -> 56 -> 28 -> 14 -> 14; sum of k^2 c_in c_out h w, plus w_out h w for the biased last conv
    expected = (9 * 3 * 48 * 112**2 + 9 * 48 * 96 * 56**2 + 9 * 96 * 192 * 28**2 + 9 * 192 * 384 * 14**2
                + 384 * 384 * 14**2 + 384 * 14**2)
    assert stem_counter(VIT_TABLE[3][0]).pycls().flops == expected
    cx = stem_counter(VIT_TABLE[3][0])
    assert (cx.h, cx.w) == (14, 14)


@pytest.mark.parametrize("cfg", [ViTConfig(), ViTConfig(embed_dim=192, num_heads=3, num_classes=10, qkv_bias=False),
                                 ViTConfig(img_size=64, patch_size=8, embed_dim=64, num_heads=2, depth=3)])
def test_our_convention_matches_models_complexity(cfg):
    # two independent walks of the same patchify ViT: the counter in our convention vs models/complexity.py
    assert vit_counter(cfg).ours() == vit_complexity(cfg)


def test_counter_by_hand():
    cx = Counter(7)
    cx.conv(4, 6, 3, stride=2, groups=2, bias=True)  # 7 -> 4
    assert (cx.h, cx.w) == (4, 4)
    assert cx.macs == 9 * 4 * 6 * 16 // 2 and cx.bias_adds == 6 * 16
    assert cx.params == 9 * 4 * 6 // 2 + 6 and cx.acts == 6 * 16
    cx.linear(5, 3, bias=True, locations=10)
    assert cx.pycls().flops == 9 * 4 * 6 * 16 // 2 + 6 * 16 + 5 * 3 * 10 + 3 * 10
    assert cx.ours().flops == 2 * (9 * 4 * 6 * 16 // 2 + 5 * 3 * 10)


def test_attention_counting_by_hand():
    d, h, n = 8, 2, 5
    cx = Counter(1)
    cx.attention(d, h, n)
    assert cx.macs == n * 3 * d * d + 2 * d * n * n + n * d * d
    # pycls/models/blocks.py:MultiheadAttention.complexity: 3dL + heads L^2 + heads L head_d + dL
    assert cx.acts == 3 * d * n + h * n * n + d * n + d * n
    assert cx.params == 3 * d * d + 3 * d + d * d + d


def test_adjust_block_compatibility_by_hand():
    assert adjust_block_compatibility([100], [1.0], [24])[0] == [96]  # round(100 / 24) = 4
    assert adjust_block_compatibility([16], [1.0], [24]) == ([16], [1.0], [16])  # group capped at the width
    assert adjust_block_compatibility([64], [0.25], [8])[0] == [64]  # bottleneck 16 is a multiple of 8
    assert adjust_block_compatibility([20], [2.0], [3])[0] == [21]  # 40 -> multiple of lcm(3, 2) = 6: 42 -> 21
    # Python round, as pycls: halves go to even (60 / 24 = 2.5 -> 2), not up
    assert adjust_block_compatibility([60], [1.0], [24])[0] == [48]
    assert adjust_block_compatibility([36], [1.0], [24])[0] == [48]  # 1.5 -> 2


def test_regnet_width_rule_by_hand():
    # d 3, w0 8, wa 8, wm 2: continuous 8, 16, 24 -> k = round(log2(1, 2, 3)) = 0, 1, 2 (log2 3 = 1.58) -> 8, 16, 32
    st = regnet_stages(3, 8, 8.0, 2.0, 8)
    assert st.widths == (8, 16, 32) and st.depths == (1, 1, 1) and st.group_widths == (8, 8, 8)


@pytest.mark.parametrize("args", [(0, 24, 36.0, 2.5, 8), (13, 20, 36.0, 2.5, 8), (13, 24, -1.0, 2.5, 8),
                                  (13, 24, 36.0, 1.0, 8)])
def test_regnet_stages_rejects_bad_parameters(args):
    with pytest.raises(ValueError, match="RegNet needs"):
        regnet_stages(*args)


def test_compatibility_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="one width"):
        adjust_block_compatibility([8, 16], [1.0], [8])
    with pytest.raises(ValueError, match="positive"):
        adjust_block_compatibility([0], [1.0], [8])
