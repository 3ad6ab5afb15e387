"""SAM 2.1 image encoder: under an official checkpoint's weights it computes what facebookresearch/sam2's
ImageEncoder computes (CPU size and SAM 2.1-T); the size table is the official configs'; the key map refuses a
checkpoint that does not fit; activation checkpointing changes nothing but memory."""

import inspect
import pathlib

import pytest
import sam2
import torch
import yaml
from sam2.modeling.backbones.hieradet import Hiera
from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
from sam2.modeling.position_encoding import PositionEmbeddingSine

from models.sam.image_encoder import (
    POS_TEMPERATURE,
    SAM2_ENCODERS,
    SAM2ImageEncoder,
    official_image_encoder_state,
)

CONFIGS = pathlib.Path(sam2.__file__).parent / "configs" / "sam2.1"
OFFICIAL_SIZES = {"t": "sam2_hiera_tiny", "s": "sam2_hiera_small", "b+": "sam2_hiera_base_plus",
                  "l": "sam2_hiera_large"}

# sam2_hiera_nano written as sam2 arguments, independently of the module's table.
NANO_TRUNK = dict(embed_dim=32, num_heads=1, stages=(1, 1, 2, 1), global_att_blocks=(3,), window_spec=(4, 4, 4, 2),
                  window_pos_embed_bkg_spatial_size=(4, 4))
NANO_NECK = dict(d_model=64, backbone_channel_list=[256, 128, 64, 32], fpn_top_down_levels=[2, 3],
                 fpn_interp_model="nearest")
NANO_POS = dict(num_pos_feats=64, normalize=True, scale=None, temperature=10000)


def official_config(size: str) -> dict:
    """The ``model`` section of sam2/configs/sam2.1/sam2.1_hiera_{size}.yaml, ``_target_`` entries dropped."""
    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "_target_"}
        return node

    return strip(yaml.safe_load((CONFIGS / f"sam2.1_hiera_{size}.yaml").read_text())["model"])


def sam2_encoder(trunk: dict, neck: dict, pos: dict, scalp: int = 1) -> ImageEncoder:
    """sam2's own ImageEncoder from its classes (no hydra, no download), weights moved off their initial values:
    the position embeddings start at zero and the norms at 1 and 0, which would hide a misplaced tensor."""
    encoder = ImageEncoder(Hiera(**trunk), FpnNeck(PositionEmbeddingSine(**pos), **neck), scalp=scalp).eval()
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if "pos_embed" in name:
                param.normal_(std=1.0)
            elif "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    return encoder


def checkpoint_of(encoder: ImageEncoder) -> dict:
    """The state as an official SAM 2 checkpoint holds it: under ``image_encoder.``, beside the other modules."""
    state = {f"image_encoder.{k}": v for k, v in encoder.state_dict().items()}
    state["sam_mask_decoder.iou_token.weight"] = torch.zeros(1, 256)
    return state


def assert_same_outputs(ours: SAM2ImageEncoder, official: ImageEncoder, images: torch.Tensor) -> None:
    ours.load_state_dict(official_image_encoder_state(checkpoint_of(official), ours), strict=True)
    with torch.no_grad():
        got, want = ours.eval()(images), official(images)
    assert set(got) == set(want) == {"vision_features", "vision_pos_enc", "backbone_fpn"}
    assert len(got["backbone_fpn"]) == len(want["backbone_fpn"]) == 3
    assert len(got["vision_pos_enc"]) == len(want["vision_pos_enc"]) == 3
    pairs = [("vision_features", got["vision_features"], want["vision_features"])]
    for key in ("backbone_fpn", "vision_pos_enc"):
        pairs += [(f"{key}[{i}]", g, w) for i, (g, w) in enumerate(zip(got[key], want[key]))]
    for name, g, w in pairs:
        assert g.shape == w.shape, name
        diff = (g - w).abs().max().item()
        assert diff <= 1e-4, f"{name}: max abs diff {diff}"
    assert got["backbone_fpn"][0].shape[-2:] == (images.shape[-2] // 4, images.shape[-1] // 4)


def test_nano_equals_sam2_image_encoder():
    torch.manual_seed(0)
    official = sam2_encoder(NANO_TRUNK, NANO_NECK, NANO_POS)
    ours = SAM2ImageEncoder(SAM2_ENCODERS["sam2_hiera_nano"])
    # Not square, so rows and columns of the position code cannot be swapped unnoticed.
    assert_same_outputs(ours, official, torch.randn(2, 3, 96, 160))


def test_tiny_equals_sam2_image_encoder():
    """SAM 2.1-T as its yaml builds it, at 64 x 96 px: the 14- and 7-token windows of the last two stages pad the
    4 x 6 and 2 x 3 grids and the 7 x 7 background position embedding is resampled, in both implementations."""
    torch.manual_seed(0)
    cfg = official_config("t")["image_encoder"]
    neck = dict(cfg["neck"])
    official = sam2_encoder(cfg["trunk"], neck, neck.pop("position_encoding"), cfg["scalp"])
    with torch.device("meta"):  # skips timm's initialisation: the strict load below writes every tensor
        ours = SAM2ImageEncoder(SAM2_ENCODERS["sam2_hiera_tiny"])
    ours.to_empty(device="cpu")
    assert sum(p.numel() for p in ours.trunk.parameters()) == 26_849_472  # SAM 2.1-T's Hiera
    assert_same_outputs(ours, official, torch.randn(1, 3, 64, 96))


def block_layout(blocks) -> list[tuple]:
    """Per block: widths, heads, attention window (0: global) and whether it pools queries; sam2 keeps the window
    as an int, timm as a pair."""
    def window(block):
        size = block.window_size
        return size if isinstance(size, int) else size[0]

    return [(b.dim, b.dim_out, b.attn.num_heads, window(b), b.q_stride is not None) for b in blocks]


@pytest.mark.parametrize("size", list(OFFICIAL_SIZES))
def test_sizes_are_the_official_configs(size):
    """Each size against sam2/configs/sam2.1: neck and scalp from the yaml, the trunk block for block against
    sam2's Hiera built from the yaml's arguments (shapes of every tensor, windows, heads, pooling)."""
    model = official_config(size)
    encoder_cfg, cfg = model["image_encoder"], SAM2_ENCODERS[OFFICIAL_SIZES[size]]
    neck, pos = encoder_cfg["neck"], encoder_cfg["neck"]["position_encoding"]
    assert (cfg.img_size, cfg.scalp, cfg.d_model) == (model["image_size"], encoder_cfg["scalp"], neck["d_model"])
    assert cfg.fpn_top_down_levels == tuple(neck["fpn_top_down_levels"]) and neck["fpn_interp_model"] == "nearest"
    assert (pos["num_pos_feats"], pos["temperature"], pos["normalize"]) == (cfg.d_model, POS_TEMPERATURE, True)
    assert neck.get("fuse_type", inspect.signature(FpnNeck).parameters["fuse_type"].default) == "sum"
    with torch.device("meta"):
        ours = SAM2ImageEncoder(cfg)
    assert ours.channel_list == neck["backbone_channel_list"]
    hiera = Hiera(**encoder_cfg["trunk"])
    shapes = {f"image_encoder.trunk.{k}": v.shape for k, v in hiera.state_dict().items()}
    shapes.update({f"image_encoder.neck.convs.{i}.conv.weight": (cfg.d_model, c, 1, 1)
                   for i, c in enumerate(neck["backbone_channel_list"])})
    shapes.update({f"image_encoder.neck.convs.{i}.conv.bias": (cfg.d_model,)
                   for i in range(len(neck["backbone_channel_list"]))})
    official = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert official_image_encoder_state(official, ours).keys() == ours.state_dict().keys()
    assert block_layout(ours.trunk.model.blocks) == block_layout(hiera.blocks)


def test_key_map_names_what_does_not_fit():
    torch.manual_seed(0)
    ours = SAM2ImageEncoder(SAM2_ENCODERS["sam2_hiera_nano"])
    state = checkpoint_of(sam2_encoder(NANO_TRUNK, NANO_NECK, NANO_POS))
    assert official_image_encoder_state({"model": state}, ours).keys() == ours.state_dict().keys()

    missing = dict(state)
    del missing["image_encoder.trunk.blocks.2.mlp.layers.1.weight"]
    with pytest.raises(ValueError, match=r"missing: image_encoder\.trunk\.blocks\.2\.mlp\.layers\.1\.weight$"):
        official_image_encoder_state(missing, ours)

    extra = dict(state, **{"image_encoder.neck.convs.4.conv.weight": torch.zeros(64, 16, 1, 1)})
    with pytest.raises(ValueError, match=r"unexpected: image_encoder\.neck\.convs\.4\.conv\.weight$"):
        official_image_encoder_state(extra, ours)

    wide = dict(state, **{"image_encoder.neck.convs.0.conv.weight": torch.zeros(256, 256, 1, 1)})
    with pytest.raises(ValueError, match=r"wrong shape: image_encoder\.neck\.convs\.0\.conv\.weight"):
        official_image_encoder_state(wide, ours)


def test_refuses_sides_the_trunk_cannot_pool_evenly():
    ours = SAM2ImageEncoder(SAM2_ENCODERS["sam2_hiera_nano"])
    with pytest.raises(ValueError, match="multiples of 32, got 96 x 112"):
        ours(torch.zeros(1, 3, 96, 112))


def outputs_and_grads(encoder: SAM2ImageEncoder, images: torch.Tensor, weights: list[torch.Tensor]):
    images = images.clone().requires_grad_(True)
    encoder.zero_grad(set_to_none=True)
    fpn = encoder(images)["backbone_fpn"]
    sum((w * x).sum() for w, x in zip(weights, fpn)).backward()
    grads = {name: p.grad.clone() for name, p in encoder.named_parameters()}
    return [x.detach() for x in fpn], grads, images.grad


def test_grad_checkpointing_changes_only_memory():
    torch.manual_seed(0)
    encoder = SAM2ImageEncoder(SAM2_ENCODERS["sam2_hiera_nano"]).train()
    images = torch.randn(2, 3, 64, 64)
    weights = [torch.randn(2, 64, 64 // s, 64 // s) for s in (4, 8, 16)]
    calls = []
    for block in encoder.trunk.model.blocks:
        block.register_forward_pre_hook(lambda *_: calls.append(1))

    plain = outputs_and_grads(encoder, images, weights)
    assert len(calls) == len(encoder.trunk.model.blocks)
    calls.clear()
    encoder.set_grad_checkpointing(True)
    checkpointed = outputs_and_grads(encoder, images, weights)
    assert len(calls) == 2 * len(encoder.trunk.model.blocks)  # every block ran again in the backward pass

    for got, want in zip(checkpointed[0], plain[0]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert checkpointed[1].keys() == plain[1].keys()
    for name in plain[1]:
        torch.testing.assert_close(checkpointed[1][name], plain[1][name], rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(checkpointed[2], plain[2], rtol=0, atol=1e-6)
