"""init_backbone: the next stage from any earlier one, with MAE's exact-missing-keys rule (facebookresearch/mae
main_finetune.py:main, its assertion on msg.missing_keys)."""

import pytest
import timm
import torch
import torch.nn.functional as F

import models
from trainers.checkpoint import AtomicCheckpointIO
from trainers.export import export_vit_encoder
from trainers.handoff import init_backbone

NEW_HEAD_AND_FC_NORM = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}


def _save_run(run_dir, state: dict, prefix: str = "model.") -> None:
    """A run directory as Lightning leaves it: <run>/checkpoints/last.ckpt with prefixed keys."""
    ckpt = {"global_step": 4, "state_dict": {prefix + k: v for k, v in state.items()}}
    AtomicCheckpointIO().save_checkpoint(ckpt, run_dir / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    """A tiny MAE at 32 px (patch 8: a 4x4 grid) saved as a run directory; returns (run_dir, encoder state)."""
    torch.manual_seed(0)
    mae = models.create("mae_vit_tiny_patch8", img_size=32)
    run = tmp_path_factory.mktemp("mae_run")
    _save_run(run, mae.state_dict())
    return run, {k: v.clone() for k, v in mae.encoder.state_dict().items()}


def test_mae_encoder_into_an_avg_pooled_classifier_misses_exactly_head_and_fc_norm(mae_run):
    run, encoder = mae_run
    model = models.create("vit_tiny_patch8", img_size=32, num_classes=7, global_pool="avg")
    lines = init_backbone(model, run)
    state = model.state_dict()
    # MAE main_finetune.py: missing exactly head.* + fc_norm.*; the encoder's final norm is unexpected (unused)
    assert set(state) - set(encoder) == NEW_HEAD_AND_FC_NORM
    assert set(encoder) - set(state) == {"norm.weight", "norm.bias"}
    for key in set(state) & set(encoder):
        assert torch.equal(state[key], encoder[key]), key
    assert model.pos_embed.requires_grad  # the frozen sin-cos table becomes a learned one's start
    # trunc_normal(std=2e-5): timm's cut-offs are at +-2 absolute, so in effect N(0, 2e-5^2); 1344 draws
    assert 1.7e-5 < state["head.weight"].std() < 2.3e-5 and not state["head.bias"].any()
    assert torch.equal(state["fc_norm.weight"], torch.ones(192)) and not state["fc_norm.bias"].any()
    text = "\n".join(lines)
    assert "MAE run" in text and "sin-cos" in text and "trunc_normal(std=2e-5)" in text
    assert "new: fc_norm.bias, fc_norm.weight, head.bias, head.weight" in text


def test_other_missing_or_unexpected_keys_are_an_error_that_lists_them(mae_run, tmp_path):
    run, encoder = mae_run
    broken = {k: v for k, v in encoder.items() if k != "blocks.3.attn.qkv.weight"}
    broken["blocks.99.extra"] = torch.zeros(1)
    _save_run(tmp_path / "broken", broken, prefix="model.")
    model = models.create("vit_tiny_patch8", img_size=32, num_classes=7, global_pool="avg")
    with pytest.raises(ValueError) as err:
        init_backbone(model, tmp_path / "broken")
    message = str(err.value)
    for key in ("blocks.3.attn.qkv.weight", "fc_norm.weight", "head.bias", "blocks.99.extra", "norm.weight"):
        assert key in message, key
    assert str(tmp_path / "broken") in message

    wider = models.create("vit_small_patch16", img_size=32, patch_size=8, num_classes=7)  # 384 wide, not 192
    with pytest.raises(ValueError, match=r"other shape \['blocks.0.attn.proj.bias \[192\] vs \[384\]"):
        init_backbone(wider, run)


def test_pos_embed_is_kept_at_the_same_grid_and_resized_bicubically_keeping_the_cls_row(mae_run):
    run, encoder = mae_run
    same = models.create("vit_tiny_patch8", img_size=32, num_classes=0, global_pool="token")
    lines = init_backbone(same, run)
    assert torch.equal(same.pos_embed, encoder["pos_embed"]) and not any("resized" in line for line in lines)

    larger = models.create("vit_tiny_patch8", img_size=64, num_classes=0, global_pool="token")  # 4x4 -> 8x8
    lines = init_backbone(larger, run)
    old = encoder["pos_embed"]  # (1, 1 + 16, 192)
    grid = old[:, 1:].reshape(1, 4, 4, 192).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    got = larger.pos_embed.detach()
    assert got.shape == (1, 65, 192)
    assert torch.equal(got[:, 0], old[:, 0])  # the cls row is kept as it is
    assert torch.allclose(got[:, 1:], expected.reshape(1, 64, 192), atol=1e-6)
    swag = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    assert not torch.allclose(got[:, 1:], swag.reshape(1, 64, 192), atol=1e-3)  # MAE's convention, not SWAG's
    assert any("resized from the 4x4 to the 8x8 grid" in line for line in lines)


def test_export_and_finetune_layouts_heads_of_other_shapes_and_token_from_avg(mae_run, tmp_path):
    run, encoder = mae_run
    mae_encoder = models.create("vit_tiny_patch8", img_size=32, pos_embed="sincos")
    mae_encoder.load_state_dict(encoder)
    export = export_vit_encoder(mae_encoder, tmp_path / "encoder.safetensors")
    plain = models.create("vit_tiny_patch8", img_size=32, num_classes=7, global_pool="avg")
    assert "export or plain state dict" in init_backbone(plain, export)[0]
    assert torch.equal(plain.blocks[5].mlp.fc1.weight, encoder["blocks.5.mlp.fc1.weight"])

    # a fine-tuned classifier (model.*) with 7 classes: same classes keep the head, others get a new one
    _save_run(tmp_path / "ft", plain.state_dict())
    same = models.create("vit_tiny_patch8", img_size=32, num_classes=7, global_pool="avg")
    init_backbone(same, tmp_path / "ft")
    assert torch.equal(same.head.weight, plain.head.weight)
    reset = models.create("vit_tiny_patch8", img_size=32, num_classes=7, global_pool="avg")
    assert any("reset_head=True" in line for line in init_backbone(reset, tmp_path / "ft", reset_head=True))
    assert not torch.equal(reset.head.weight, plain.head.weight)
    other = models.create("vit_tiny_patch8", img_size=32, num_classes=3, global_pool="avg")
    lines = init_backbone(other, tmp_path / "ft")
    assert any("dropped the source's head.bias [7], head.weight [7, 192]" in line for line in lines)

    # a linear probe's backbone (token pooling, no head) from the avg-pooled classifier: norm new, fc_norm unused
    probe = models.create("vit_tiny_patch8", img_size=32, num_classes=0, global_pool="token")
    lines = init_backbone(probe, tmp_path / "ft")
    assert any(line.startswith("norm: new LayerNorm") for line in lines)
    assert "new: norm.bias, norm.weight" in lines[-1]


def test_a_timm_regnet_gets_a_new_head_fc(tmp_path):
    source = timm.create_model("regnety_002", num_classes=11)
    target = timm.create_model("regnety_002", num_classes=5)
    torch.save({f"model.{k}": v for k, v in source.state_dict().items()}, tmp_path / "swag.pt")  # a SWAG backbone
    lines = init_backbone(target, tmp_path / "swag.pt")
    assert any("dropped the source's head.fc.bias [11], head.fc.weight [11, 368]" in line for line in lines)
    assert "new: head.fc.bias, head.fc.weight" in lines[-1]
    assert torch.equal(target.stem.conv.weight, source.stem.conv.weight)
    assert 1.7e-5 < target.head.fc.weight.std() < 2.3e-5 and not target.head.fc.bias.any()


def test_a_conv_stem_vit_exports_without_timm_kwargs_and_hands_off_to_a_classifier(tmp_path):
    from safetensors import safe_open

    trunk = models.create("vitc_1gf", img_size=32)
    path = export_vit_encoder(trunk, tmp_path / "encoder.safetensors")
    with safe_open(str(path), "pt") as f:
        assert "timm_kwargs" not in f.metadata()  # timm has no conv-stem ViT to rebuild it with
    classifier = models.create("vitc_1gf", img_size=32, num_classes=5)
    init_backbone(classifier, path)
    for name, value in trunk.state_dict().items():
        if not name.startswith("head"):
            assert torch.equal(classifier.state_dict()[name], value), name
