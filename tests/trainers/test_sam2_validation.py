"""Validation on images, against segment-anything's own model and sam2's own click and box samplers: the IoU after
1 and 5 clicks (each at the centre of the largest error, the previous best logits fed back, one mask after the first
click) and after the exact box; and 1-frame clips validated as images while videos of the same run are tracked."""

import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from sam2.modeling.sam2_utils import sample_box_points as their_box
from sam2.modeling.sam2_utils import sample_one_point_from_error_center as their_click

from evaluation.boundary import boundary_iou
from models.sam.sam import official_sam_state
from tests.models.test_sam_model import reference_nano
from tests.trainers.test_sam2_method import clip_batch
from trainers.sam2 import SAM2Training, VOSPanelLogger, report_prompt_blindness

pytestmark = pytest.mark.usefixtures("one_thread")

SAM_SIDE = 256  # sam_vit_nano's input


def iou(gt: torch.Tensor, pred: torch.Tensor) -> list[float]:
    inter, union = (gt & pred).flatten(1).sum(1), (gt | pred).flatten(1).sum(1)
    return (inter / union).tolist()


@torch.no_grad()
def reference_scores(ref, image: torch.Tensor, gt: torch.Tensor) -> dict:
    """segment-anything's encoder, prompt encoder and decoder driven by hand: sam2's centre-of-error clicks, the
    best-scored of three masks for the first click, one mask with the previous low-res logits afterwards."""
    embedding = ref.image_encoder(image[None])  # the decoder repeats it per prompt set

    def decode(points=None, boxes=None, masks=None, multimask=True):
        sparse, dense = ref.prompt_encoder(points=points, boxes=boxes, masks=masks)
        low, scores = ref.mask_decoder(image_embeddings=embedding, image_pe=ref.prompt_encoder.get_dense_pe(),
                                       sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                       multimask_output=multimask)
        best = low[torch.arange(len(low)), scores.argmax(-1)][:, None]
        return best, F.interpolate(best, (SAM_SIDE, SAM_SIDE), mode="bilinear", align_corners=False) > 0

    coords = labels = low = pred = None
    scores = {}
    for n in range(1, 6):
        point, label = their_click(gt, pred)
        coords = point if coords is None else torch.cat([coords, point], 1)
        labels = label if labels is None else torch.cat([labels, label], 1)
        low, pred = decode(points=(coords, labels), masks=low, multimask=n == 1)
        if n == 1:
            scores["1_click"], first = iou(gt, pred), pred
        scores["5_clicks"] = iou(gt, pred)
    box, _ = their_box(gt, noise=0)
    scores["box"] = iou(gt, decode(boxes=box.flatten(1))[1])
    scores["boundary_iou"] = boundary_iou(gt[:, 0], first[:, 0]).tolist()
    pairs = [(i, j) for i in range(len(gt)) for j in range(i + 1, len(gt))]
    scores["prompt_agreement"] = [sum(iou(first[i], first[j])[0] for i, j in pairs) / len(pairs)]
    return scores


def test_image_validation_equals_sams_click_protocol_on_segment_anything():
    torch.manual_seed(0)
    ref = reference_nano()
    module = SAM2Training({"name": "sam_vit_nano", "mode": "image"}).eval()
    module.model.load_state_dict(official_sam_state(ref.state_dict(), module.model), strict=True)
    batch = clip_batch(1, frames=1, objects=(3,), side=SAM_SIDE, seed=2)
    module.on_validation_epoch_start()
    with torch.no_grad():
        module.validation_step(batch, 0)
    (record,) = module._val
    gt = torch.stack([batch["frame_masks"][0, 0] == k for k in (1, 2, 3)])[:, None]
    want = reference_scores(ref, batch["frames"][0, 0], gt)
    assert set(record) == set(want)
    for name in want:
        assert record[name] == pytest.approx(want[name], abs=1e-6), name
    assert want["5_clicks"] != want["1_click"]  # the four later clicks changed the masks: the loop really ran
    frames, gt_ids, pred_ids, _ = module.vos_examples
    assert frames.shape == (1, 3, SAM_SIDE, SAM_SIDE) and gt_ids.shape == pred_ids.shape == (1, SAM_SIDE, SAM_SIDE)


def test_video_mode_scores_one_frame_clips_as_images_and_longer_clips_as_videos():
    torch.manual_seed(0)
    module = SAM2Training().eval()
    module.on_validation_epoch_start()
    with torch.no_grad():
        module.validation_step(clip_batch(1, frames=1, objects=(2,)), 0)
        module.validation_step(clip_batch(1, frames=4, objects=(1,)), 1)
    image, video = module._val
    assert {"1_click", "5_clicks", "box", "boundary_iou", "prompt_agreement"} == set(image)
    assert len(image["5_clicks"]) == 2 and len(image["prompt_agreement"]) == 1
    assert "scores" in video and video["key"] == "1/0"


def test_an_image_mode_model_on_a_video_shows_the_frame_it_scored(tmp_path):
    torch.manual_seed(0)
    module = SAM2Training({"name": "sam_vit_nano", "mode": "image"}).eval()
    module.on_validation_epoch_start()
    with torch.no_grad():
        module.validation_step(clip_batch(1, frames=4, objects=(2,), side=SAM_SIDE), 0)
    (record,) = module._val
    assert len(record["1_click"]) == 2  # the video's first frame, scored as an image
    frames, gt_ids, pred_ids, _ = module.vos_examples
    assert len(frames) == len(gt_ids) == len(pred_ids) == 1
    trainer = SimpleNamespace(is_global_zero=True, sanity_checking=False, global_step=7, loggers=[])
    panel = VOSPanelLogger(tmp_path)
    panel.on_validation_end(trainer, module)  # a 4-frame video with a 1-frame prediction used to fail here
    assert panel.last_path == tmp_path / "vos-step000007.png" and panel.last_path.exists()


def test_a_model_that_does_not_read_its_clicks_is_reported(caplog):
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        assert report_prompt_blindness(0.875)  # above the 0.8 threshold
    assert "overlap by 88% IoU on average" in caplog.text and "does not read its clicks" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        assert not report_prompt_blindness(0.2) and not report_prompt_blindness(None)
    assert "read its clicks" not in caplog.text
