"""PE spatial alignment: the two losses against hand computations, the teachers' features against independent
paths (SAM 2's image predictor, timm's intermediate features), and the method's frozen parts."""

import math
import pathlib

import numpy as np
import pytest
import torch

import models
from models.sam.image_predictor import SAM2ImagePredictor
from tests.models.test_sam2_model import sam2_nano_checkpoint
from trainers.pe_spatial import (SpatialAlignment, SpatialModelConfig, block_tokens, click_mask_features,
                                 correspondence_loss, grid_points, load_sam2_teacher, mask_share_features,
                                 pairwise_cosine, sam_mask_features, spatial_trunk, teacher_click_quality,
                                 token_alignment_loss)

pytestmark = pytest.mark.usefixtures("one_thread")


def cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_token_alignment_loss_is_negative_cosine_by_hand():
    student = [[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]]
    teacher = [[2.0, 1.0, 1.0], [1.0, 1.0, -1.0]]
    expected = -(cos(student[0], teacher[0]) + cos(student[1], teacher[1])) / 2
    loss = token_alignment_loss(torch.tensor([student]), torch.tensor([teacher]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    same = torch.randn(2, 5, 4)
    assert token_alignment_loss(same, 3 * same).item() == pytest.approx(-1.0)  # aligned: the minimum, -1
    assert token_alignment_loss(same, -same).item() == pytest.approx(1.0)


def test_correspondence_loss_by_hand():
    student = [[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]  # 3 tokens, width 2
    teacher = [[3.0, -1.0, 0.0, 2.0], [1.0, 1.0, 1.0, 1.0], [-2.0, 0.0, 1.0, 0.0]]  # 3 tokens, 4 mask logits
    s = [[cos(a, b) for b in student] for a in student]
    t = [[cos(a, b) for b in teacher] for a in teacher]
    expected = -sum(cos(s[i], t[i]) for i in range(3)) / 3
    loss = correspondence_loss(torch.tensor([student]), torch.tensor([teacher]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(pairwise_cosine(torch.tensor([student]))[0], torch.tensor(s), atol=1e-6)


def test_correspondence_loss_ignores_what_the_similarities_ignore():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 4), torch.randn(2, 6, 9)
    rotation = torch.linalg.qr(torch.randn(4, 4))[0]
    scale = torch.rand(2, 6, 1) + 0.5
    base = correspondence_loss(student, teacher)
    assert correspondence_loss(student @ rotation, teacher * scale).item() == pytest.approx(base.item(), abs=1e-6)
    assert correspondence_loss(teacher, teacher).item() == pytest.approx(-1.0)


def test_mask_share_features_by_hand():
    masks = torch.zeros(1, 4, 4, dtype=torch.uint8)
    masks[0, 0, :3] = 7  # the first three pixels of the top row
    masks[0, 2:, 2:] = 255  # the bottom-right cell is all object 255
    shares = mask_share_features(masks, (2, 2))
    assert shares.shape == (1, 4, 256)
    expected = torch.zeros(4, 256)
    expected[0, 0], expected[0, 7] = 0.5, 0.5  # cell (0, 0): pixels (0, 0), (0, 1) are 7; (1, 0), (1, 1) background
    expected[1, 0], expected[1, 7] = 0.75, 0.25  # cell (0, 1): pixel (0, 2) is 7
    expected[2, 0] = 1.0
    expected[3, 255] = 1.0
    assert torch.equal(shares[0], expected)
    similarity = pairwise_cosine(mask_share_features(torch.tensor([[[1, 1], [2, 0]]]), (2, 2)))[0]
    assert similarity[0, 1] == 1 and similarity[0, 2] == 0 and similarity[2, 3] == 0  # one object, two, object-bg


def test_teacher_click_quality_by_hand():
    ids = torch.zeros(8, 8, dtype=torch.long)
    ids[:4, :4] = 3  # the 2 x 2 grid's clicks land at pixels (2, 2), (2, 6), (6, 2), (6, 6): one on object 3
    logits = torch.full((4, 8, 8), -5.0)
    logits[0, :4, :4] = 5.0  # the click on the object gets exactly its mask
    logits[1:, :, :] = 5.0  # the others cover the whole image
    agreement, ious = teacher_click_quality(logits, 2, ids)
    # IoU(object, image) = 16 / 64 three times, IoU(image, image) = 1 three times
    assert agreement == pytest.approx((3 * 0.25 + 3 * 1.0) / 6)
    assert ious == [1.0]
    half = torch.full((4, 4, 4), -5.0)
    half[0, :2, :2] = 5.0  # low-resolution logits are upsampled to the masks' size: the same object at 4 x 4
    assert teacher_click_quality(half, 2, ids)[1] == [1.0]


def test_an_unknown_correspondence_teacher_is_refused():
    with pytest.raises(ValueError, match="correspondence_teacher must be one of sam, masks"):
        SpatialModelConfig(correspondence_teacher="dino")


def test_grid_points():
    assert grid_points(2, 8).tolist() == [[2.0, 2.0], [6.0, 2.0], [2.0, 6.0], [6.0, 6.0]]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> pathlib.Path:
    return sam2_nano_checkpoint(tmp_path_factory.mktemp("sam2"))[1]


def test_sam_features_are_the_image_predictors_best_masks(teacher_file):
    sam = load_sam2_teacher(str(teacher_file))
    torch.manual_seed(1)
    image = torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8)
    pixels = (image[None] / 255.0 - 0.5) / 0.5
    logits = sam_mask_features(sam, pixels, 2, (32, 32), probabilities=False)  # (1, 32*32, 4)
    probabilities = sam_mask_features(sam, pixels, 2, (32, 32))
    predictor = SAM2ImagePredictor(sam)
    predictor.set_image(image.permute(1, 2, 0).numpy())
    for p, (x, y) in enumerate([(32, 32), (96, 32), (32, 96), (96, 96)]):
        _, iou, low_res = predictor.predict(np.array([[x, y]]), np.array([1]), multimask_output=True)
        best = torch.from_numpy(low_res[int(np.argmax(iou))])
        assert torch.allclose(logits[0, :, p], best.flatten(), atol=1e-3)
        assert torch.allclose(probabilities[0, :, p], best.flatten().sigmoid(), atol=1e-4)
    pooled = sam_mask_features(sam, pixels, 2, (16, 16), probabilities=False)
    by_hand = logits[0].T.view(4, 16, 2, 16, 2).mean(dim=(2, 4)).flatten(1).T  # 2 x 2 averages
    assert torch.allclose(pooled[0], by_hand, atol=1e-4)


def test_probabilities_tell_objects_apart_where_raw_logits_do_not():
    # A teacher that reads its 16 clicks perfectly: clicks 0-1 land on object A (columns 0-1 of a 4 x 4 grid of
    # cells, rows 0-1), 2-3 on object B (rows 2-3, columns 2-3); the other 12 land on the background and answer with
    # it. Each mask is +10 inside, -32 (the clamp) outside.
    ids = torch.zeros(4, 4, dtype=torch.long)
    ids[:2, :2], ids[2:, 2:] = 1, 2
    clicked = torch.tensor([1, 1, 2, 2] + [0] * 12)
    logits = torch.where(ids[None] == clicked[:, None, None], 10.0, -32.0)[None]  # (1, 16, 4, 4)
    a, b = 0, 15  # a cell of A and a cell of B
    probabilities = pairwise_cosine(click_mask_features(logits, (4, 4)))[0]
    assert probabilities[a, b] == pytest.approx(0.0, abs=1e-6) and probabilities[a, 1] == pytest.approx(1.0)
    # raw: A's cell (10, 10, -32, -32, -32 x 12), B's (-32, -32, 10, 10, -32 x 12): dot 12 * 1024 - 4 * 320, each
    # norm squared 2 * 100 + 14 * 1024 -> cos = 11008 / 14536 = 0.76: two objects look alike
    raw = pairwise_cosine(click_mask_features(logits, (4, 4), probabilities=False))[0]
    assert raw[a, b] == pytest.approx((12 * 1024 - 4 * 320) / (2 * 100 + 14 * 1024), abs=1e-5)


def test_unknown_sam_features_are_refused():
    with pytest.raises(ValueError, match="sam_features must be one of probabilities, logits, got 'softmax'"):
        SpatialModelConfig(sam_features="softmax")


def test_a_teacher_checkpoint_without_its_run_is_refused_without_a_flag_the_recipe_lacks(tmp_path):
    torch.save({"state_dict": {"model.weight": torch.zeros(1)}}, tmp_path / "orphan.ckpt")
    with pytest.raises(ValueError, match=r"is not a SAM 2 model: Cannot tell which model .* no config\.yaml") as err:
        load_sam2_teacher(str(tmp_path / "orphan.ckpt"))
    assert "Pass --" not in str(err.value)


def test_a_teacher_that_is_not_sam2_is_refused(tmp_path):
    (tmp_path / "config.yaml").write_text("model:\n  name: pe_core_nano\n")  # a PE run, not a SAM 2 one
    with pytest.raises(ValueError, match="is not a SAM 2 model: .*pe_core_nano"):
        load_sam2_teacher(str(tmp_path))


def test_block_tokens_are_timms_intermediate_features():
    trunk = models.create("pe_core_nano").visual.trunk.eval()
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        timm_tokens = trunk.forward_intermediates(images, indices=[1, 3], norm=False, output_fmt="NLC",
                                                  intermediates_only=True)
        assert torch.allclose(block_tokens(trunk, images, 2), timm_tokens[0], atol=1e-5)
        assert torch.allclose(block_tokens(trunk, images, 4), timm_tokens[1], atol=1e-5)
        last = spatial_trunk(trunk).forward_features(images)[:, 1:]
        assert torch.allclose(last, timm_tokens[1], atol=1e-5)  # no final norm


def test_step_trains_the_student_only(teacher_file, tmp_path):
    clip = models.create("pe_core_nano")
    torch.save({"state_dict": {f"model.{k}": v for k, v in clip.state_dict().items()}}, tmp_path / "pe.ckpt")
    method = SpatialAlignment({"name": "pe_core_nano"}, None, 1e-4, 10, str(teacher_file), 64)
    lines = method.init_from(tmp_path / "pe.ckpt")
    assert "text tower" in lines[0]
    trunk = clip.visual.trunk.state_dict()
    for name, value in method.model.state_dict().items():
        assert torch.equal(value, trunk[name]) and torch.equal(method.start.state_dict()[name], trunk[name])
    assert not any(k.startswith("sam") for k in method.state_dict())  # the SAM 2 teacher stays out of checkpoints
    optimised = {id(p) for group in method.param_groups() for p in group["params"]}
    assert optimised == {id(p) for p in method.model.parameters()}

    method.train()
    assert not method.start.training and not method.sam.training
    loss = method.compute_loss({"frames": torch.randn(1, 2, 3, 64, 64)})
    loss.backward()
    expected = method._self_loss.detach() + method._sam_loss.detach()
    assert torch.isfinite(loss) and torch.allclose(loss.detach(), expected)
    assert all(p.grad is not None for p in method.model.blocks.parameters())
    assert all(p.grad is None for p in [*method.start.parameters(), *method.sam.parameters()])


def test_the_ground_truth_control_matches_the_masks_not_sam(teacher_file):
    method = SpatialAlignment({"name": "pe_core_nano", "correspondence_teacher": "masks"}, None, 1e-4, 10,
                              str(teacher_file), 64)
    assert method.batch_keys == ("frames", "frame_masks")
    frames, masks = torch.randn(1, 2, 3, 64, 64), torch.zeros(1, 2, 64, 64, dtype=torch.uint8)
    masks[:, :, 8:40, 16:48] = 1
    method.train()
    method.compute_loss({"frames": frames, "frame_masks": masks})
    student = method.model.forward_features(frames.flatten(0, 1))[:, 1:]
    grid = (64 // method.model.patch_embed.patch_size[0],) * 2
    expected = correspondence_loss(student, mask_share_features(masks.flatten(0, 1), grid))
    assert torch.allclose(method._sam_loss.detach(), expected.detach(), atol=1e-6)
    with_sam = correspondence_loss(student, sam_mask_features(method.sam, frames.flatten(0, 1), 8, grid))
    assert not torch.allclose(with_sam, expected, atol=1e-3)  # a different teacher would have given another loss


@pytest.mark.parametrize("features", ["probabilities", "logits"])
def test_the_sam_target_holds_the_chosen_features(teacher_file, features):
    method = SpatialAlignment({"name": "pe_core_nano", "sam_features": features}, None, 1e-4, 10, str(teacher_file), 64)
    frames = torch.randn(1, 1, 3, 64, 64)
    images = frames.flatten(0, 1)
    grid = method.grid(images)
    expected = sam_mask_features(method.sam, images, 8, grid, probabilities=features == "probabilities")
    other = sam_mask_features(method.sam, images, 8, grid, probabilities=features != "probabilities")
    target = method.correspondence_target({"frames": frames}, images)
    assert torch.allclose(target, expected, atol=1e-6) and not torch.allclose(target, other, atol=1e-2)
