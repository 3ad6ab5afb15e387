"""Prompt simulation for SAM 2: hand-built vectors, statistical checks of the samplers, and agreement with
facebookresearch/sam2 sam2/modeling/sam2_utils.py (same seed, same prompts; same error-centre clicks)."""

import pytest
import torch

from trainers.sam_prompts import (
    get_next_point,
    mask_to_box,
    sample_box_points,
    sample_one_point_from_error_center,
    sample_random_points_from_errors,
)


def _square(size=10, lo=2, hi=7):
    mask = torch.zeros(1, 1, size, size, dtype=torch.bool)
    mask[..., lo:hi + 1, lo:hi + 1] = True
    return mask


def _blobs(count, height, width, seed, threshold=0.55):
    """Random smooth-ish masks: thresholded box-filtered noise, so the error regions have thick interiors."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(count, 1, height, width, generator=gen)
    smooth = torch.nn.functional.avg_pool2d(noise, 5, stride=1, padding=2, count_include_pad=False)
    return smooth > smooth.flatten(1).quantile(threshold, dim=1).view(count, 1, 1, 1)


def test_mask_to_box_is_inclusive_and_matches_sam2():
    from sam2.utils.misc import mask_to_box as reference

    masks = torch.zeros(3, 1, 5, 7, dtype=torch.bool)
    masks[0, 0, 1, 3] = True  # a single pixel at x=3, y=1
    masks[1, 0, 2:5, 0:6] = True
    assert mask_to_box(masks).tolist() == [[[3, 1, 3, 1]], [[0, 2, 5, 4]], [[7, 5, -1, -1]]]
    random = _blobs(6, 9, 13, seed=0, threshold=0.9)
    assert torch.equal(mask_to_box(random), reference(random))
    assert mask_to_box(random).dtype == torch.int32


def test_errors_are_sampled_uniformly_with_the_right_labels():
    gt = _square()
    pred = torch.zeros_like(gt)
    pred[..., 2:8, 2:5] = True
    pred[..., 0, 0] = True  # 18 false-negative pixels (rows 2-7, cols 5-7) and 1 false positive at (0, 0)
    draws = 3000
    points, labels = sample_random_points_from_errors(gt, pred, draws, generator=torch.Generator().manual_seed(0))
    assert points.shape == (1, draws, 2) and labels.shape == (1, draws)
    assert points.dtype == torch.float32 and labels.dtype == torch.int32
    x, y, labels = points[0, :, 0].long(), points[0, :, 1].long(), labels[0]
    negative = labels == 0
    assert (x[negative] == 0).all() and (y[negative] == 0).all()
    assert ((x[~negative] >= 5) & (x[~negative] <= 7) & (y[~negative] >= 2) & (y[~negative] <= 7)).all()
    # every one of the 19 error pixels is drawn 3000/19 ~ 158 times, sd ~12.2: 5 sd is 61 either way
    counts = torch.bincount(y * 10 + x, minlength=100)
    error_pixels = (gt ^ pred).flatten()
    assert ((counts[error_pixels] - draws / 19).abs() < 61).all() and not counts[~error_pixels].any()
    assert abs(negative.sum().item() - draws / 19) < 61  # 18:1 positive to negative


def test_an_exact_prediction_gives_a_negative_click_on_the_background():
    gt = _square()
    gen = torch.Generator().manual_seed(1)
    points, labels = sample_random_points_from_errors(gt, gt.clone(), 200, generator=gen)
    x, y = points[0, :, 0].long(), points[0, :, 1].long()
    assert not labels.any() and not gt[0, 0, y, x].any()
    assert len(set((y * 10 + x).tolist())) > 20  # spread over the background, not one pixel
    full = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    points, labels = sample_random_points_from_errors(full, full, 5, generator=gen)
    assert not points.any() and not labels.any()  # no background: (0, 0), negative


def test_no_prediction_means_an_empty_one():
    gt = _square()
    points, labels = sample_random_points_from_errors(gt, None, 50, generator=torch.Generator().manual_seed(2))
    assert labels.all() and gt[0, 0, points[0, :, 1].long(), points[0, :, 0].long()].all()


def test_random_points_match_sam2_for_the_same_seed():
    from sam2.modeling.sam2_utils import sample_random_points_from_errors as reference

    gt, pred = _blobs(5, 11, 9, seed=3), _blobs(5, 11, 9, seed=4)
    pred[0] = gt[0]  # one exact prediction
    torch.manual_seed(7)
    expected = reference(gt, pred, 4)
    torch.manual_seed(7)
    got = sample_random_points_from_errors(gt, pred, 4)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    torch.manual_seed(8)
    expected = reference(gt, pred, 1)
    torch.manual_seed(8)
    assert torch.equal(get_next_point(gt, pred, "uniform")[0], expected[0])


def _box_masks():
    """Rectangles in a 260 x 300 image: a large one that noise cannot push out of the image (noise capped at 20 px),
    small ones, a single pixel (no noise), ones touching the image's corners."""
    masks = torch.zeros(6, 1, 260, 300, dtype=torch.bool)
    for i, (y0, y1, x0, x1) in enumerate([(25, 230, 25, 270), (30, 40, 50, 90), (0, 5, 0, 8), (100, 101, 7, 7),
                                          (200, 259, 250, 299), (60, 200, 20, 60)]):
        masks[i, 0, y0:y1 + 1, x0:x1 + 1] = True
    return masks


def test_box_noise_stays_within_its_bound_and_the_image():
    masks = _box_masks().repeat(50, 1, 1, 1)
    exact = mask_to_box(masks)[:, 0].float().view(-1, 2, 2)
    sides = (exact[:, 1] - exact[:, 0]).unsqueeze(1)  # (B, 1, 2): width, height
    reach = (0.1 * sides).clamp(max=20)
    points, labels = sample_box_points(masks, generator=torch.Generator().manual_seed(0))
    assert points.shape == (300, 2, 2) and points.dtype == torch.float32
    assert labels.dtype == torch.int32 and labels.tolist() == [[2, 3]] * 300
    offsets = points - exact
    assert (offsets.abs() <= reach + 1e-4).all()
    assert (points >= 0).all() and (points[..., 0] <= 299).all() and (points[..., 1] <= 259).all()
    # the noise is applied to every coordinate, independently, and reaches its bound on both sides
    unclamped = (offsets / reach)[0::6]  # the first box, far from the image border
    assert unclamped.abs().min() > 0 and (unclamped[0] != unclamped[0, 0, 0]).any()
    assert unclamped.min() < -0.9 and unclamped.max() > 0.9 and abs(unclamped.mean()) < 0.2  # mean's sd: 0.04
    assert reach[0].tolist() == [[20.0, 20.0]] and reach[1].tolist() == [[4.0, 1.0]]


def test_box_without_noise_is_exact():
    masks = _box_masks()
    points, _ = sample_box_points(masks, noise=0.0)
    assert torch.equal(points, mask_to_box(masks).float().view(-1, 2, 2))


def test_box_points_match_sam2_for_the_same_seed():
    from sam2.modeling.sam2_utils import sample_box_points as reference

    masks = _box_masks()
    torch.manual_seed(5)
    expected = reference(masks, noise=0.1, noise_bound=20)
    torch.manual_seed(5)
    got = sample_box_points(masks, noise=0.1, noise_bound=20)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_error_centre_vector():
    gt = _square()
    points, labels = sample_one_point_from_error_center(gt, None)  # depth 3 at rows/cols 4-5: first is (4, 4)
    assert points.tolist() == [[[4.0, 4.0]]] and labels.tolist() == [[1]]
    points, labels = sample_one_point_from_error_center(torch.zeros_like(gt), gt)  # the same, false positive
    assert points.tolist() == [[[4.0, 4.0]]] and labels.tolist() == [[0]]
    points, labels = get_next_point(gt, gt, "center")  # nothing to correct
    assert points.tolist() == [[[0.0, 0.0]]] and labels.tolist() == [[0]]
    with pytest.raises(ValueError, match="unknown"):
        get_next_point(gt, gt, "edge")


@pytest.mark.parametrize("padding", [True, False])
def test_error_centre_matches_sam2(padding):
    from sam2.modeling.sam2_utils import sample_one_point_from_error_center as reference

    gt, pred = _blobs(8, 23, 19, seed=5), _blobs(8, 23, 19, seed=6)
    pred[1] = gt[1]
    pred[2] = gt[2] & ~_blobs(1, 23, 19, seed=7)[0]  # false negatives only
    got, expected = (fn(gt, pred, padding=padding) for fn in (sample_one_point_from_error_center, reference))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert got[1].sum() not in (0, 8)  # both kinds of click occur


@pytest.mark.gpu
def test_training_samplers_on_gpu_never_wait_for_the_device():
    gt, pred = _blobs(4, 32, 32, seed=8).cuda(), _blobs(4, 32, 32, seed=9).cuda()
    gen = torch.Generator("cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        boxes, box_labels = sample_box_points(gt, generator=gen)
        points, labels = sample_random_points_from_errors(gt, pred, 3, generator=gen)
        uniform = get_next_point(gt, pred, "uniform", generator=gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert boxes.is_cuda and points.is_cuda and uniform[0].is_cuda and box_labels.tolist() == [[2, 3]] * 4
    errors = (gt ^ pred)[torch.arange(4).cuda()[:, None], 0, points[..., 1].long(), points[..., 0].long()]
    assert errors.all() and torch.equal(labels.bool(), gt[torch.arange(4).cuda()[:, None], 0,
                                                            points[..., 1].long(), points[..., 0].long()])
