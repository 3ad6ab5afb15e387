"""Semi-supervised VOS with SAM 2 (``track_video``) against facebookresearch/sam2's own evaluation: SAM2Train in eval
mode (a mask prompt on frame 0, every other frame tracked) and its track_step loop backwards from a later frame,
under the same random weights; the prompt mask comes back exactly on its frame."""

from types import SimpleNamespace

import pytest
import torch
from training.model.sam2 import SAM2Train

from models.sam.sam2 import NO_OBJ_SCORE
from models.sam.tracking import track_video
from tests.models.test_sam2_model import (
    BATCH,
    DYNAMIC_MULTIMASK,
    FRAMES,
    SIDE,
    frame_prompts,
    ours_from,
    run_sam2,
    sam2_nano,
    yaml_flags,
)

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    ref = sam2_nano("2.1")
    return ref, ours_from(ref, "2.1", tmp_path_factory.mktemp("ckpt"))


def _first_masks() -> torch.Tensor:
    return frame_prompts("mask")["mask"][:, 0] > 0  # (O, S, S): two rectangles


def _sam2_train_eval(ref, frames: torch.Tensor, masks: torch.Tensor) -> list[torch.Tensor]:
    """SAM2Train's evaluation of one video: frames (T, 3, S, S), masks (T, O, S, S) -> per-frame (O, 1, S, S)."""
    train = SAM2Train(ref.image_encoder, ref.memory_attention, ref.memory_encoder,
                      sam_mask_decoder_extra_args=DYNAMIC_MULTIMASK, **dict(yaml_flags("2.1"), image_size=SIDE))
    train.load_state_dict(ref.state_dict())
    frame_of_object = torch.arange(FRAMES)[:, None].expand(FRAMES, BATCH)
    video = SimpleNamespace(masks=masks, num_frames=FRAMES, flat_img_batch=frames, flat_obj_to_img_idx=frame_of_object)
    return [out["pred_masks_high_res"] for out in train.eval()(video)]


def test_tracking_equals_sam2_training_evaluation(models):
    ref, ours = models
    torch.manual_seed(1)
    frames = torch.randn(FRAMES, 3, SIDE, SIDE)
    first = _first_masks()
    masks = torch.zeros(FRAMES, BATCH, SIDE, SIDE, dtype=torch.bool)
    masks[0] = first
    with torch.no_grad():
        want = _sam2_train_eval(ref, frames, masks)
    ours.train()
    got = track_video(ours, frames, first)
    assert ours.training  # its mode is restored
    assert got.shape == (FRAMES, BATCH, SIDE, SIDE) and got.dtype == torch.float32
    for t in range(FRAMES):
        diff = (got[t] - want[t][:, 0]).abs().max().item()
        assert diff <= TOL, f"frame {t}: max abs diff {diff}"
    # The prompt is the output of its frame: exactly the mask, as +-10 logits.
    assert torch.equal(got[0] > 0, first) and torch.equal(got[0], first.float() * 20 - 10)
    assert ((got[1:] > 0).flatten(1).any(1)).all()  # random weights still predict something on later frames


def test_tracking_backwards_from_a_later_frame_equals_sam2_track_step(models):
    ref, ours = models
    torch.manual_seed(2)
    frames = torch.randn(FRAMES, 3, SIDE, SIDE)
    schedule = [(3, "mask"), (2, None), (1, None), (0, None)]
    with torch.no_grad():
        want = run_sam2(ref, frames[:, None].expand(-1, BATCH, -1, -1, -1), schedule, reverse=True)
    got = track_video(ours.eval(), frames, _first_masks(), start=3, reverse=True)
    for (t, _), out in zip(schedule, want):
        diff = (got[t] - out["pred_masks_high_res"][:, 0]).abs().max().item()
        assert diff <= TOL, f"frame {t}: max abs diff {diff}"


def test_frames_before_the_start_stay_empty_and_bad_input_is_named(models):
    _, ours = models
    frames = torch.randn(3, 3, SIDE, SIDE)
    got = track_video(ours, frames, _first_masks(), start=1, output_device="cpu")
    assert (got[0] == NO_OBJ_SCORE).all() and torch.equal(got[1] > 0, _first_masks())
    with pytest.raises(ValueError, match=r"frames must be \(T, 3, 128, 128\)"):
        track_video(ours, torch.randn(3, 3, 64, 64), _first_masks())
    with pytest.raises(ValueError, match=r"first_masks must be \(O, 128, 128\)"):
        track_video(ours, frames, torch.ones(2, 64, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="start must be a frame of the video"):
        track_video(ours, frames, _first_masks(), start=3)
