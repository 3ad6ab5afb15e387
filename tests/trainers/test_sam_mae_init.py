"""SAM's image encoder from an MAE pre-trained ViT (Kirillov et al. 2023, §3 and appendix A; ViTDet, Li et al. 2022):
the blocks load bit for bit, the position table is resized as ViTDet's get_abs_pos does, and what a plain ViT lacks
keeps its fresh init."""

import pytest
import torch
import torch.nn.functional as F
import yaml

import models
from trainers.export import export_vit_encoder
from trainers.sam2 import SAM2Training
from trainers.sam_init import init_sam_from_vit, read_vit

NANO = {"name": "sam_vit_nano", "mode": "image"}
BLOCK_PARTS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


def random_mae(embed_dim: int = 64, depth: int = 4, seed: int = 0):
    """An MAE whose encoder has sam_vit_nano's trunk (SAMVIT_NANO_ARGS: width 64, 4 blocks, 2 heads, patch 16) at
    224 px (a 14 x 14 grid, as MAE pre-trains), every tensor drawn at random so that no value comes from an init."""
    torch.manual_seed(seed)
    mae = models.create("mae_vit_tiny_patch16", embed_dim=embed_dim, depth=depth, num_heads=2)
    with torch.no_grad():
        for tensor in mae.state_dict().values():
            tensor.normal_()
    return mae


@pytest.fixture(scope="module")
def mae():
    return random_mae()


@pytest.fixture(scope="module")
def official_file(mae, tmp_path_factory):
    """facebookresearch/mae's layout: {"model": state} under timm ViT names (mae_pretrain_vit_base.pth)."""
    path = tmp_path_factory.mktemp("official") / "mae_pretrain_vit_nano.pth"
    torch.save({"model": mae.encoder.state_dict()}, path)
    return path


def expected_pos_embed(table: torch.Tensor, side: int) -> torch.Tensor:
    """(1, 1 + 14*14, C) -> (1, side, side, C): the cls row dropped, the grid resized bicubically (ViTDet's
    get_abs_pos), in SAM's NHWC layout."""
    grid = table[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    return F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)


def assert_loaded(method: SAM2Training, mae, before: dict[str, torch.Tensor]) -> None:
    encoder, state = mae.encoder.state_dict(), method.model.state_dict()
    trunk = ["patch_embed.proj.weight", "patch_embed.proj.bias"] + [
        f"blocks.{i}.{part}.{kind}" for i in range(4) for part in BLOCK_PARTS for kind in ("weight", "bias")]
    for key in trunk:
        assert torch.equal(state[f"image_encoder.{key}"], encoder[key]), key
    assert torch.equal(state["image_encoder.pos_embed"], expected_pos_embed(encoder["pos_embed"], 16))
    fresh = [k for k in state if "rel_pos" in k or ".neck." in k or not k.startswith("image_encoder.")]
    assert len([k for k in fresh if "rel_pos" in k]) == 8 and any(".neck." in k for k in fresh)
    for key in fresh:
        assert torch.equal(state[key], before[key]), key
    assert set(state) == {f"image_encoder.{k}" for k in trunk} | {"image_encoder.pos_embed"} | set(fresh)


def test_an_official_mae_file_initialises_the_trunk_and_nothing_else(mae, official_file):
    method = SAM2Training(model=NANO)
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    lines = method.init_from(str(official_file))
    assert_loaded(method, mae, before)
    text = "\n".join(lines)
    for name in ("rel_pos_h", "rel_pos_w", "neck", "prompt_encoder", "mask_decoder", "cls_token", "norm.weight",
                 "norm.bias", "14x14", "16x16"):
        assert name in text, name
    sam = method.model.eval()
    with torch.no_grad():
        masks, iou = sam(torch.randn(1, 3, 256, 256), points=torch.tensor([[[128.0, 128.0]]]),
                         labels=torch.tensor([[1]]))
    assert masks.shape == (1, 3, 64, 64) and iou.shape == (1, 3) and masks.isfinite().all()


def test_a_prism_mae_run_and_its_export_load_the_same(mae, tmp_path):
    run = tmp_path / "mae_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "mae_vit_tiny_patch16"}}))
    state = {f"model.{k}": v for k, v in mae.state_dict().items()}  # MAEPretraining holds the MAE at self.model
    torch.save({"state_dict": state, "global_step": 1}, run / "checkpoints" / "last.ckpt")
    export = export_vit_encoder(mae.encoder, run / "export" / "encoder.safetensors")
    for source, layout in ((run, "MAE run"), (export, "timm's names")):
        method = SAM2Training(model=NANO)
        before = {k: v.clone() for k, v in method.model.state_dict().items()}
        assert layout in method.init_from(str(source))[0]
        assert_loaded(method, mae, before)


@pytest.mark.parametrize("embed_dim, depth, named", [
    (96, 4, r"patch_embed\.proj\.weight: \[96, 3, 16, 16\] in the ViT, \[64, 3, 16, 16\] in sam_vit_nano"),
    (64, 3, r"missing in the ViT: blocks\.3\.norm1\.weight"),
])
def test_a_vit_of_another_size_is_an_error_naming_the_tensors(embed_dim, depth, named, tmp_path):
    path = tmp_path / "mae.pth"
    torch.save({"model": random_mae(embed_dim, depth).encoder.state_dict()}, path)
    method = SAM2Training(model=NANO)
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    with pytest.raises(ValueError, match=named) as err:
        method.init_from(str(path))
    assert "no registered sam_vit_* model has this trunk" in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in method.model.state_dict().items())


def test_the_error_names_the_sam_that_fits(official_file):
    with torch.device("meta"):
        sam_b = models.create("sam_vit_b")
    with pytest.raises(ValueError, match=r"(?s)\[768, 3, 16, 16\] in sam_vit_b.*fits --model\.name sam_vit_nano"):
        init_sam_from_vit(sam_b, read_vit(official_file), "sam_vit_b")


def test_a_sam2_model_refuses_an_mae_vit(official_file):
    with pytest.raises(ValueError, match="Hiera.*choose a sam_vit_\\* model"):
        SAM2Training().init_from(str(official_file))


def test_sam_sources_still_take_their_own_paths(tmp_path):
    trained = SAM2Training(model=NANO)
    exported = trained.export(tmp_path / "export")["sam"]
    run = tmp_path / "sam_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": NANO}))
    torch.save({"state_dict": {f"model.{k}": v for k, v in trained.model.state_dict().items()}, "global_step": 1},
               run / "checkpoints" / "last.ckpt")
    assert read_vit(exported) is None and read_vit(run) is None and read_vit(run / "checkpoints" / "last.ckpt") is None
    assert "official checkpoint" in SAM2Training(model=NANO).init_from(str(exported))[0]
    assert "Prism run" in SAM2Training(model=NANO).init_from(str(run))[0]
