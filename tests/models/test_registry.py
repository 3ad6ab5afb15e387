"""Registry: every name builds (on meta), sizes are the published ones, param counts match the formula, errors are clear."""

import pytest
import torch

import models
from models.mae import MaskedAutoencoderViT
from models.registry import register_model
from models.vit import VisionTransformer

# (embed_dim, depth, heads) from the ViT paper / timm and facebookresearch/maws (2B, 6.5B)
SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
         "huge": (1280, 32, 16), "2b": (2560, 24, 32), "6p5b": (4096, 32, 32)}
DECODERS = {"tiny": (128, 4, 4), "small": (256, 4, 8)}  # ours; base and up use the reference 512 / 8 / 16
EXPECTED = (
    [f"vit_{s}_patch{p}" for s in ("tiny", "small", "base", "large", "huge") for p in (16, 14)]
    + ["vit_tiny_patch8", "vit_2b_patch14", "vit_6p5b_patch14"]
)
EXPECTED += ["mae_" + n for n in EXPECTED]


def _block_params(d: int, m: float, qkv_bias: bool = True) -> int:
    h = int(d * m)
    return 2 * d + (3 * d * d + (3 * d if qkv_bias else 0)) + (d * d + d) + 2 * d + (d * h + h) + (h * d + d)


def _vit_params(c) -> int:
    patches = (c.img_size // c.patch_size) ** 2
    n = c.in_chans * c.patch_size**2 * c.embed_dim + c.embed_dim  # patch projection
    n += c.embed_dim + (1 + patches) * c.embed_dim  # cls + pos
    n += c.depth * _block_params(c.embed_dim, c.mlp_ratio, c.qkv_bias) + 2 * c.embed_dim
    return n + (c.embed_dim * c.num_classes + c.num_classes if c.num_classes else 0)


def _mae_params(c) -> int:
    patches, dd = (c.img_size // c.patch_size) ** 2, c.decoder_embed_dim
    n = _vit_params(c.encoder_config())
    n += c.embed_dim * dd + dd + dd + (1 + patches) * dd  # decoder_embed, mask_token, decoder_pos_embed
    n += c.decoder_depth * _block_params(dd, c.mlp_ratio) + 2 * dd
    return n + dd * c.in_chans * c.patch_size**2 + c.in_chans * c.patch_size**2


VIT_MAE = [n for n in models.list_models(include_aliases=True) if n.startswith(("vit_", "mae_"))]


def test_registered_names():
    assert models.list_models("mae_*") + models.list_models("vit_*") == sorted(EXPECTED)
    assert models.list_models("mae_*") == sorted(n for n in EXPECTED if n.startswith("mae_"))
    assert "mae_vit_large_patch16_dec512d8b" in models.list_models(include_aliases=True)


@pytest.mark.parametrize("name", VIT_MAE)
def test_every_model_builds_with_published_size(name):
    with torch.device("meta"):
        model = models.create(name)
    canonical = name.removesuffix("_dec512d8b")
    size = canonical.split("_")[-2]
    patch = int(canonical.split("_patch")[1])
    cfg = model.cfg
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == SIZES[size]
    assert cfg.patch_size == patch and cfg.img_size == 224
    assert cfg.ln_eps == 1e-6
    numel = sum(p.numel() for p in model.parameters())
    if canonical.startswith("mae_"):
        assert isinstance(model, MaskedAutoencoderViT)
        dec = DECODERS.get(size, (512, 8, 16))
        assert (cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads) == dec
        assert cfg.mask_ratio == 0.75 and cfg.norm_pix_loss
        assert numel == _mae_params(cfg)
    else:
        assert isinstance(model, VisionTransformer)
        assert cfg.num_classes == 0 and cfg.pos_embed == "learned" and cfg.global_pool == "token"
        assert numel == _vit_params(cfg)
    assert model.complexity().params == numel


def test_overrides_apply():
    model = models.create("vit_tiny_patch16", depth=2, num_classes=7)
    assert model.cfg.depth == 2 and len(model.blocks) == 2 and model.head.out_features == 7
    mae = models.create("mae_vit_tiny_patch16", img_size=32, patch_size=8, mask_ratio=0.5, decoder_depth=1)
    assert mae.cfg.mask_ratio == 0.5 and len(mae.decoder_blocks) == 1


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError) as err:
        models.create("vit_bse_patch16")
    assert "vit_base_patch16" in str(err.value) and "list_models" in str(err.value)
    with pytest.raises(ValueError, match="list_models"):
        models.create("resnet50")


def test_unknown_override_lists_fields():
    with pytest.raises(TypeError) as err:
        models.create("vit_tiny_patch16", embed_dims=10)
    message = str(err.value)
    assert "embed_dims" in message and "embed_dim" in message.split("Valid fields")[1]
    with pytest.raises(TypeError, match="decoder_embed_dim"):
        models.create("mae_vit_tiny_patch16", decoder_width=3)


def test_duplicate_registration_rejected():
    def vit_tiny_patch16(**overrides):  # same name as a registered factory
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="registered twice"):
        register_model(vit_tiny_patch16)
    assert set(EXPECTED) <= set(models.list_models())
