"""ViT: timm key compatibility (strict loads both ways, same outputs), fused attention, pooling, frozen sin-cos."""

import pytest
import timm
import torch
import torch.nn.functional as F

import models
from models.pos_embed import sincos_2d_pos_embed
from models.vit import VisionTransformer, ViTConfig

SMALL = dict(img_size=32, patch_size=8)  # 16 patches: fast on CPU


def _ours(**kw):
    return models.create("vit_tiny_patch16", **SMALL, **kw).eval()


def _timm(**kw):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL, **kw).eval()


@pytest.mark.parametrize(
    "ours_kw,timm_kw",
    [
        (dict(), dict(num_classes=0)),
        (dict(num_classes=10), dict(num_classes=10)),
        (dict(num_classes=10, global_pool="avg"), dict(num_classes=10, global_pool="avg")),
        (dict(pos_embed="sincos"), dict(num_classes=0)),
    ],
)
def test_timm_loads_our_state_dict_strictly_and_agrees(ours_kw, timm_kw):
    torch.manual_seed(0)
    ours, theirs = _ours(**ours_kw), _timm(**timm_kw)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), theirs.forward_features(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_we_load_timm_state_dict_strictly():
    theirs = _timm(num_classes=5)
    ours = _ours(num_classes=5)
    ours.load_state_dict(theirs.state_dict(), strict=True)


def test_parameter_names_are_timm_style():
    names = set(dict(_ours(num_classes=3).named_parameters()))
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "head.weight"} <= names
    for leaf in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
        assert f"blocks.11.{leaf}.weight" in names
    assert not any(n.startswith("fc_norm") for n in names)
    assert _ours().pos_embed.shape == (1, 1 + 16, 192)
    avg = set(dict(_ours(global_pool="avg").named_parameters()))
    assert "fc_norm.weight" in avg and "norm.weight" not in avg
    assert not any(n.startswith("head") for n in avg)


def test_attention_goes_through_sdpa(monkeypatch):
    model = models.create("vit_tiny_patch16", **SMALL, depth=3).eval()
    assert all(block.attn.fused_attn for block in model.blocks)
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
    assert len(calls) == 3
    assert calls[0] == (2, 3, 17, 64)  # (B, heads, 1 + L, head_dim)
    # the explicit softmax path gives the same numbers
    for block in model.blocks:
        block.attn.fused_attn = False
    with torch.no_grad():
        torch.testing.assert_close(model(x), fused, atol=1e-5, rtol=1e-5)


def test_sincos_pos_embed_is_fixed_and_frozen():
    model = _ours(pos_embed="sincos")
    assert not model.pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed[0], sincos_2d_pos_embed(192, 4, cls_token=True))
    model.train()
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    assert model.pos_embed.grad is None
    assert _ours().pos_embed.requires_grad


def test_pooling_by_hand():
    model = _ours(global_pool="avg")
    tokens = torch.zeros(1, 17, 192)
    tokens[0, 0] = 100.0  # cls must be ignored by avg pooling
    tokens[0, 1:, 0] = torch.arange(16.0)  # mean over patches = 7.5 in dim 0
    pooled = model.forward_head(tokens, pre_logits=True)
    features = torch.zeros(192)
    features[0] = 7.5
    expected = F.layer_norm(features, (192,), eps=1e-6)  # fc_norm is (1, 0) at init
    torch.testing.assert_close(pooled[0], expected)
    token_model = _ours()
    assert torch.equal(token_model.forward_head(tokens), tokens[:, 0])  # no head: the cls token itself


def test_drop_path_rises_linearly():
    model = models.create("vit_tiny_patch16", **SMALL, depth=5, drop_path_rate=0.2)
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in model.blocks]  # rate 0 -> Identity
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_timm_init_stats():
    torch.manual_seed(0)
    model = models.create("vit_small_patch16", **SMALL, depth=2)
    w = model.blocks[0].mlp.fc1.weight
    assert w.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.qkv.bias.abs().sum() == 0
    assert model.cls_token.abs().max() < 1e-4
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(model.norm.weight == 1) and torch.all(model.norm.bias == 0)


def test_no_weight_decay_names_exist():
    model = _ours()
    assert model.no_weight_decay() <= set(dict(model.named_parameters()))


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        ViTConfig(img_size=30, patch_size=8)
    with pytest.raises(ValueError, match="global_pool"):
        ViTConfig(global_pool="max")
    with pytest.raises(ValueError, match="num_heads"):
        VisionTransformer(ViTConfig(embed_dim=100, num_heads=3))
