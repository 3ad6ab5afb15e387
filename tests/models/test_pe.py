"""PE-Core: the towers equal the PE formulas at any resolution, export to open_clip exactly, and start as PE and
open_clip start."""

import json
import math

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import models
from models.pe import open_clip_config, open_clip_state_dict
from tests.models.flop_count import counted_flops


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    model = models.create("pe_core_nano").eval()
    with torch.no_grad():  # a trained-looking position table, so that resampling it matters
        model.visual.trunk.pos_embed.normal_(std=0.5)
        for block in model.visual.trunk.blocks:  # peaked attention, so that the RoPE angles matter
            block.attn.qkv.weight.mul_(8)
    return model


def rope_angles(height: int, width: int, head_dim: int) -> torch.Tensor:
    """pe.py:Rope2D written out: per axis RotaryEmbedding(head_dim / 2, theta 1e4) with each frequency used for a
    pair of channels; the first half of the channels turns with the column, the second with the row; patches sit
    at raw indices (x + 1, y + 1) and the cls token at (0, 0)."""
    axis_dim = head_dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim))
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    xs = torch.cat([torch.zeros(1), cols.flatten() + 1.0]).double()
    ys = torch.cat([torch.zeros(1), rows.flatten() + 1.0]).double()
    pairs = lambda pos: (pos[:, None] * inv_freq).repeat_interleave(2, dim=-1)  # noqa: E731
    return torch.cat([pairs(xs), pairs(ys)], dim=-1).float()  # (1 + H W, head_dim)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * angles.cos() + rotated * angles.sin()


def pe_image_features(model, images: torch.Tensor) -> torch.Tensor:
    """pe.py:VisionTransformer.forward (+ AttentionPooling, proj) from the weights, with plain torch ops."""
    t = model.visual.trunk
    p = t.patch_embed.patch_size[0]
    x = F.conv2d(images, t.patch_embed.proj.weight, stride=p)  # PE's patch conv has no bias
    batch, width, grid_h, grid_w = x.shape
    x = x.flatten(2).transpose(1, 2)
    cls_pos, grid_pos = t.pos_embed[:, :1], t.pos_embed[:, 1:]
    side = math.isqrt(grid_pos.shape[1])
    grid_pos = F.interpolate(grid_pos.reshape(1, side, side, width).permute(0, 3, 1, 2), size=(grid_h, grid_w),
                             mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(1, -1, width)
    x = torch.cat([(t.cls_token + cls_pos).expand(batch, -1, -1), x + grid_pos], dim=1)
    x = t.norm_pre(x)
    heads = t.blocks[0].attn.num_heads
    angles = rope_angles(grid_h, grid_w, width // heads)
    for block in t.blocks:
        h = block.norm1(x)
        q, k, v = F.linear(h, block.attn.qkv.weight, block.attn.qkv.bias).unflatten(-1, (3, heads, -1)).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        attn = torch.softmax(rotate(q, angles) @ rotate(k, angles).transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
        x = x + block.attn.proj((attn @ v).transpose(1, 2).flatten(2))
        x = x + block.mlp(block.norm2(x))
    x = t.norm(x)
    pool = t.attn_pool
    pool_heads = pool.num_heads
    q = pool.q(pool.latent.expand(batch, -1, -1)).unflatten(-1, (pool_heads, -1)).transpose(1, 2)
    k, v = pool.kv(x).unflatten(-1, (2, pool_heads, -1)).unbind(2)
    attn = torch.softmax(q @ k.transpose(1, 2).transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    pooled = pool.proj((attn @ v.transpose(1, 2)).transpose(1, 2).flatten(2))  # no residual around the attention
    pooled = pooled + pool.mlp(pool.norm(pooled))
    return pooled[:, 0] @ t.head.weight.T  # no bias


@pytest.mark.parametrize("size", [64, 48, 96, 40])
def test_image_features_equal_the_pe_formula_at_every_resolution(nano, size):
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ours, expected = nano.encode_image(images), pe_image_features(nano, images)
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)


def test_timm_as_released_differs_off_the_native_grid(nano):
    """The fix matters: timm's own tower, given the same weights, rescales RoPE and resamples bicubically."""
    plain = timm.create_model("vit_pe_core_nano_patch8_64", num_classes=128, dynamic_img_size=True).eval()
    state = nano.visual.trunk.state_dict()
    state["head.bias"] = torch.zeros(128)
    plain.load_state_dict(state)
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = pe_image_features(nano, images)
        assert (plain(images) - expected).norm() > 0.05 * expected.norm()
        native = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(plain(native), nano.encode_image(native), atol=2e-5, rtol=1e-4)


def test_video_embedding_is_the_mean_of_its_frames(nano):
    frames = torch.randn(2, 3, 3, 64, 64)
    with torch.no_grad():
        per_frame = torch.stack([nano.encode_image(frames[:, t]) for t in range(3)], dim=1)
        torch.testing.assert_close(nano.encode_video(frames), per_frame.mean(dim=1), atol=1e-5, rtol=1e-5)
        image_features, _, _ = nano(frames, torch.zeros(2, 32, dtype=torch.long))
        torch.testing.assert_close(image_features, F.normalize(per_frame.mean(dim=1), dim=-1), atol=1e-5, rtol=1e-5)


def test_initialisation_follows_open_clip_and_clip():
    torch.manual_seed(0)
    model = models.create("pe_core_nano", text_width=256, text_heads=4)
    text = model.text
    # open_clip TextTransformer.init_parameters: token 0.02, positions 0.01, projection width^-0.5
    assert text.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert text.positional_embedding.std().item() == pytest.approx(0.01, rel=0.1)
    assert text.text_projection.std().item() == pytest.approx(256**-0.5, rel=0.05)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.visual.trunk.head.bias is None
    width = model.visual.trunk.embed_dim
    assert model.visual.trunk.head.weight.std().item() == pytest.approx(width**-0.5, rel=0.1)
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == 0.0


def _assert_open_clip_embeds_equal(ours, theirs, image_size: int):
    torch.manual_seed(1)
    images = torch.randn(2, 3, image_size, image_size)
    tokens = open_clip.get_tokenizer("PE-Core-T-16-384")(["a red circle", "two blue squares on grass"])
    tokens = tokens[:, : ours.cfg.context_length]
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode_image(images), ours.encode_image(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.encode_text(tokens), ours.encode_text(tokens), atol=1e-5, rtol=1e-5)
        assert theirs.logit_scale.item() == ours.logit_scale.item()


def test_export_loads_in_open_clip_with_identical_embeddings(tmp_path):
    torch.manual_seed(0)
    ours = models.create("pe_core_tiny").eval()
    path = tmp_path / "pe_core_tiny.safetensors"
    save_file(open_clip_state_dict(ours), path)
    theirs = open_clip.create_model("PE-Core-T-16-384", pretrained=str(path)).eval()  # strict load
    assert open_clip_config(ours.cfg) == open_clip.get_model_config("PE-Core-T-16-384")
    _assert_open_clip_embeds_equal(ours, theirs, 384)


def test_prism_sizes_load_in_open_clip_from_their_exported_config(tmp_path):
    torch.manual_seed(0)
    ours = models.create("pe_core_nano").eval()
    (tmp_path / "pe_core_nano.json").write_text(json.dumps(open_clip_config(ours.cfg)))
    save_file(open_clip_state_dict(ours), tmp_path / "weights.safetensors")
    open_clip.add_model_config(tmp_path)
    theirs = open_clip.create_model("pe_core_nano", pretrained=str(tmp_path / "weights.safetensors")).eval()
    _assert_open_clip_embeds_equal(ours, theirs, 64)


def test_a_siglip_model_exports_its_logit_bias_to_open_clip(tmp_path):
    torch.manual_seed(0)
    ours = models.create("pe_core_nano", init_logit_scale=math.log(10), init_logit_bias=-10.0).eval()
    with torch.no_grad():
        ours.logit_bias.fill_(-7.5)  # as if trained
    (tmp_path / "pe_core_nano_siglip.json").write_text(json.dumps(open_clip_config(ours.cfg)))
    save_file(open_clip_state_dict(ours), tmp_path / "weights.safetensors")
    open_clip.add_model_config(tmp_path)
    theirs = open_clip.create_model("pe_core_nano_siglip", pretrained=str(tmp_path / "weights.safetensors")).eval()
    assert theirs.logit_bias.item() == -7.5
    _assert_open_clip_embeds_equal(ours, theirs, 64)


def test_patch_tokens_come_from_the_same_pass_as_the_embeddings(nano):
    images, tokens = torch.randn(2, 3, 48, 64), torch.randint(1, 49000, (2, 32))
    with torch.no_grad():
        image_features, text_features, scale, patches = nano.forward_with_patches(images, tokens)
        expected = nano(images, tokens)
        torch.testing.assert_close((image_features, text_features, scale), expected)
        assert patches.shape == (2, 6 * 8, nano.visual.trunk.embed_dim)
        torch.testing.assert_close(patches, nano.visual.trunk.forward_features(images)[:, 1:])  # cls dropped
        frames = torch.randn(2, 3, 3, 32, 32)  # a video: every frame's patches, the embedding is the frame mean
        video_features, _, _, video_patches = nano.forward_with_patches(frames, tokens)
        torch.testing.assert_close(video_features, nano(frames, tokens)[0])
        assert video_patches.shape == (6, 16, nano.visual.trunk.embed_dim)


@pytest.mark.parametrize("name,image_size", [("pe_core_nano", 64), ("pe_core_nano", 32)])
def test_complexity_counts_the_forward(name, image_size):
    # frozen: torch's module tracker fails on timm's attention pool, whose query is an expanded parameter
    model = models.create(name).eval().requires_grad_(False)
    images, tokens = torch.randn(1, 3, image_size, image_size), torch.zeros(1, 32, dtype=torch.long)
    assert model.complexity(image_size).flops == pytest.approx(counted_flops(model, images, tokens), rel=0.01)
    assert model.complexity().params == sum(p.numel() for p in model.parameters())


def test_registered_sizes_match_the_paper_table():
    """Widths, depths and patch sizes of PE-Core T/S/B/L (Bolya et al. 2025, Table of configs)."""
    expected = {"pe_core_tiny": (16, 192, 12, 512, 384), "pe_core_small": (16, 384, 12, 512, 384),
                "pe_core_base": (16, 768, 12, 1024, 224), "pe_core_large": (14, 1024, 24, 1024, 336)}
    for name, (patch, width, depth, out, size) in expected.items():
        with torch.device("meta"):
            model = models.create(name)
        trunk = model.visual.trunk
        assert (trunk.patch_embed.patch_size[0], trunk.embed_dim, len(trunk.blocks)) == (patch, width, depth)
        assert (trunk.head.out_features, model.cfg.image_size) == (out, size)
