"""ViT_C (Xiao et al. 2021; facebookresearch/pycls): conv stem structure, token order, init, config errors,
registered pairs, complexity."""

import math

import pytest
import timm
import torch
from torch import nn

import models
from models.conv_stem import ConvStem
from models.pycls_complexity import vit_complexity_pycls
from models.vit import VisionTransformer, ViTConfig
from tests.models.flop_count import counted_flops

# facebookresearch/pycls branch vitconfigs configs/vitconv_baselines/vit/ViT-{P,C}-*GF_adamw_*.yaml:
# name -> (d, patchify depth, heads, mlp, stem strides, stem dims)
S5, S7 = (2, 2, 2, 2, 1), (2, 2, 1, 2, 1, 2, 1)
TABLE = {
    "1gf": (192, 12, 3, 576, S5, (24, 48, 96, 192, 192)),
    "4gf": (384, 12, 6, 1152, S5, (48, 96, 192, 384, 384)),
    "18gf": (768, 12, 12, 3072, S7, (64, 128, 128, 256, 256, 512, 768)),
    "36gf": (1024, 14, 16, 4096, S7, (64, 128, 128, 256, 256, 512, 1024)),
}


def _tiny(**kw):
    """A ViT_C-1GF with 2 blocks at 32 px (2 x 2 tokens): fast on CPU."""
    return models.create("vitc_1gf", img_size=32, depth=2, **kw)


@pytest.mark.parametrize("size", list(TABLE))
def test_registered_pairs_match_the_table(size):
    d, depth, heads, mlp, strides, dims = TABLE[size]
    with torch.device("meta"):
        p, c = models.create(f"vitp_{size}"), models.create(f"vitc_{size}")
    for model in (p, c):
        cfg = model.cfg
        assert (cfg.embed_dim, cfg.num_heads, int(cfg.embed_dim * cfg.mlp_ratio)) == (d, heads, mlp)
        assert (cfg.img_size, cfg.patch_size, cfg.num_classes) == (224, 16, 0)
    assert p.cfg.stem == "patchify" and p.cfg.depth == depth
    assert c.cfg.stem == "conv" and c.cfg.depth == depth - 1  # one block fewer
    assert c.cfg.stem_strides == strides and c.cfg.stem_dims == dims
    assert c.cfg.stem_kernels == (3,) * (len(dims) - 1) + (1,)
    assert c.num_features == p.num_features == d


def test_stem_structure():
    stem = models.create("vitc_4gf", depth=1).patch_embed
    layers = list(stem.proj)
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [48, 96, 192, 384, 384]
    assert [m.stride[0] for m in convs] == [2, 2, 2, 2, 1]
    assert [m.kernel_size[0] for m in convs] == [3, 3, 3, 3, 1]
    assert [m.padding[0] for m in convs] == [1, 1, 1, 1, 0]
    assert [m.bias is not None for m in convs] == [False] * 4 + [True]
    # conv -> BN -> ReLU for every layer but the last, which is a bare conv
    types = [type(m) for m in layers]
    assert types == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 4 + [nn.Conv2d]


def test_224_gives_14x14xd_tokens_and_patch_embed_attributes():
    model = models.create("vitc_1gf", depth=1).eval()
    stem = model.patch_embed
    assert isinstance(stem, ConvStem)
    assert stem.img_size == (224, 224) and stem.patch_size == (16, 16) and stem.grid_size == (14, 14)
    assert stem.num_patches == model.num_patches == 196
    with torch.no_grad():
        assert stem(torch.randn(2, 3, 224, 224)).shape == (2, 196, 192)
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 192)


def test_tokens_are_row_major():
    # with 1x1 kernels each token sees exactly one pixel, (16 i, 16 j): light only the one under token (1, 2)
    stem = ConvStem(64, 3, (1, 1, 1, 1, 1), (2, 2, 2, 2, 1), (8, 8, 8, 8, 8)).eval()
    for conv in stem.convs:
        conv.weight.data.abs_()  # positive weights: the lit pixel survives every ReLU
    base = torch.zeros(1, 3, 64, 64)
    lit = base.clone()
    lit[0, :, 16 * 1, 16 * 2] = 5.0
    with torch.no_grad():
        changed = (stem(lit) - stem(base)).abs().sum(-1)[0]
    assert changed.shape == (16,)
    assert changed.nonzero().flatten().tolist() == [1 * 4 + 2]


def test_parameter_names_keep_vit_layout():
    model = _tiny(num_classes=5)
    names = list(dict(model.named_parameters()))
    stem_names = [n for n in names if "proj" in n and not n.startswith("blocks")]
    assert stem_names and all(n.startswith("patch_embed.") for n in stem_names)
    assert {"cls_token", "pos_embed", "blocks.1.attn.qkv.weight", "head.weight"} <= set(names)
    # apart from the stem, the keys and shapes are timm's ViT's: weights hand over like a patchify ViT's
    theirs = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5, mlp_ratio=3.0)
    ours = {k: v.shape for k, v in model.state_dict().items() if not k.startswith("patch_embed.")}
    assert ours == {k: v.shape for k, v in theirs.state_dict().items() if not k.startswith("patch_embed.")}


@pytest.mark.parametrize("scheme", ["timm", "mae"])
def test_conv_stem_init(scheme):
    torch.manual_seed(0)
    model = models.create("vitc_4gf", img_size=32, depth=1)
    model.init_weights(scheme)
    convs = model.patch_embed.convs
    for conv in convs[:-1]:  # pycls/models/vit.py:init_weights_vit: 3x3 normal(sqrt(2 / out_channels))
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / conv.out_channels), rel=0.05)
    last = convs[-1]  # 1x1 normal(sqrt(1 / out_channels)), zero bias
    assert last.weight.std().item() == pytest.approx(math.sqrt(1 / 384), rel=0.05)
    assert torch.all(last.bias == 0)
    for bn in (m for m in model.patch_embed.proj if isinstance(m, nn.BatchNorm2d)):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_trains_and_evaluates():
    model = _tiny(num_classes=3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.patch_embed.convs[0].weight.grad is not None
    bn = model.patch_embed.proj[1]
    assert bn.num_batches_tracked.item() == 1


def test_complexity_agrees_with_torch_flop_counter_and_numel():
    model = _tiny(num_classes=10).eval()
    cx = model.complexity()
    assert cx.flops == counted_flops(model, torch.randn(1, 3, 32, 32))
    assert cx.params == sum(p.numel() for p in model.parameters())


def test_conv_stem_complexity_by_hand():
    # ours counts 2 FLOPs per multiply-add and no bias: at 32 px the 1GF stem maps 32 -> 16 -> 8 -> 4 -> 2 -> 2;
    # a patchify ViT with the same blocks differs only in the stem (4 patches of 3 x 16 x 16 -> 192)
    conv, patchify = _tiny().complexity(), models.create("vitp_1gf", img_size=32, depth=2).complexity()
    macs = 9 * 3 * 24 * 16**2 + 9 * 24 * 48 * 8**2 + 9 * 48 * 96 * 4**2 + 9 * 96 * 192 * 2**2 + 192 * 192 * 2**2
    params = (9 * 3 * 24 + 9 * 24 * 48 + 9 * 48 * 96 + 9 * 96 * 192 + 192 * 192 + 192  # convs + last bias
              + 2 * (24 + 48 + 96 + 192))  # BatchNorm weight + bias
    acts = 24 * 16**2 + 48 * 8**2 + 96 * 4**2 + 192 * 2**2 + 192 * 2**2
    assert conv.flops - patchify.flops == 2 * macs - 2 * 4 * 768 * 192
    assert conv.params - patchify.params == params - (768 * 192 + 192)
    assert conv.activations - patchify.activations == acts - 4 * 192


@pytest.mark.parametrize("size", list(TABLE))
def test_vitc_flops_close_to_its_patchify_twin(size):
    # Xiao et al. 2021 drop one block from ViT_C so that FLOPs match its ViT_P twin; pycls/models/vit.py:ViT.complexity
    # puts every vitconfigs pair within 3% (4GF: 3.966 vs 3.909 GF, 36GF: 35.026 vs 35.997)
    with torch.device("meta"):
        c, p = models.create(f"vitc_{size}"), models.create(f"vitp_{size}")
    assert c.complexity().flops == pytest.approx(p.complexity().flops, rel=0.03)
    assert vit_complexity_pycls(c.cfg).flops == pytest.approx(vit_complexity_pycls(p.cfg).flops, rel=0.03)


def test_wrong_input_size_is_a_clear_error():
    with pytest.raises(ValueError, match="img_size"):
        _tiny()(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(stem_kernels=(3, 1), stem_strides=(4, 2), stem_dims=(8, 192)), "multiply to 8, not patch_size 16"),
        (dict(stem_kernels=(3, 1), stem_strides=(4, 4), stem_dims=(8, 96)), "must equal embed_dim 192"),
        (dict(stem_kernels=(3,), stem_strides=(4, 4), stem_dims=(8, 192)), "one kernel, stride and dim"),
        (dict(stem_kernels=(2, 1), stem_strides=(4, 4), stem_dims=(8, 192)), "odd"),
        (dict(stem="patchify", stem_kernels=(3, 1), stem_strides=(4, 4), stem_dims=(8, 192)), "only used with"),
        (dict(stem="convolutional"), "stem must be"),
    ],
)
def test_config_errors_are_clear(kw, match):
    kw = {"stem": "conv", **kw}
    with pytest.raises(ValueError, match=match):
        ViTConfig(embed_dim=192, num_heads=3, **kw)


def test_lists_from_config_files_become_tuples():
    cfg = ViTConfig(embed_dim=192, num_heads=3, stem="conv", stem_kernels=[3, 1], stem_strides=[4, 4],
                    stem_dims=[8, 192])
    assert cfg.stem_dims == (8, 192)
    assert VisionTransformer(cfg).patch_embed.grid_size == (14, 14)
