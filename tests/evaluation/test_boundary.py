"""Boundary IoU: widths, boundary bands and pairwise BIoU against values worked by hand from the definition in
bowenc0221/boundary-iou-api boundary_iou/utils/boundary_utils.py:mask_to_boundary, and two independent formulations
(OpenCV erosion as in boundary-iou-api; scipy's chessboard distance transform)."""

import io
import math
import os
from contextlib import redirect_stdout

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import ndimage

from evaluation.boundary import BoundaryIoU, boundary_iou, boundary_width, mask_to_boundary


# ---------------------------------------------------------------- independent references (never our code)

def _d(h, w, ratio):
    # d as bowenc0221/boundary-iou-api boundary_iou/utils/boundary_utils.py:mask_to_boundary computes it, used only
    # to feed the references
    return max(int(round(ratio * np.sqrt(h ** 2 + w ** 2))), 1)


def opencv_boundary(mask, ratio):
    """boundary-iou-api boundary_utils.py formulation: pad 1 px of zeros, cv2.erode 3x3 ones d times, crop,
    subtract. OpenCV needs uint8 or float (found by running cv2.erode: bool, int32 and int64 raise cv2.error), so
    other dtypes go through uint8 and back."""
    h, w = mask.shape
    src = mask if mask.dtype in (np.uint8, np.float32, np.float64) else (mask != 0).astype(np.uint8)
    padded = cv2.copyMakeBorder(src, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=_d(h, w, ratio))[1:h + 1, 1:w + 1]
    out = src - eroded
    return out if src is mask else (out != 0).astype(mask.dtype) * mask


def chessboard_boundary(mask, ratio):
    """Closed form of that erosion (the two agree in test_random_masks_match_opencv_and_chessboard): mask pixels
    within chessboard distance d of a non-mask pixel, the outside of the image counting as non-mask. Boolean
    result."""
    h, w = mask.shape
    fg = np.pad(mask != 0, 1)
    dist = ndimage.distance_transform_cdt(fg, metric="chessboard")[1:-1, 1:-1]
    return (mask != 0) & (dist <= _d(h, w, ratio))


def blob_masks(rng, n, h, w, threshold=0.55):
    """Smooth random blobs (bilinear-zoomed noise), many touching the border, plus a sprinkling of noise."""
    out = []
    for _ in range(n):
        grid = rng.random((max(h // 6, 2), max(w // 6, 2)))
        smooth = ndimage.zoom(grid, (h / grid.shape[0], w / grid.shape[1]), order=1, mode="nearest")[:h, :w]
        smooth = np.pad(smooth, ((0, h - smooth.shape[0]), (0, w - smooth.shape[1])), mode="edge")
        m = smooth > threshold
        m ^= rng.random((h, w)) < 0.02
        out.append(m.astype(np.uint8))
    return np.stack(out)


def rect(h, w, rows, cols, dtype=np.uint8):
    m = np.zeros((h, w), dtype)
    m[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1] = 1
    return m


# ---------------------------------------------------------------- boundary_width

@pytest.mark.parametrize("length, expected", [(5, 2), (7, 4), (3, 2), (1, 1)])
def test_width_rounds_half_to_even(length, expected):
    # ratio 0.5 x an odd length is an exact .5: 2.5 -> 2, 3.5 -> 4, 1.5 -> 2, 0.5 -> 0 clamped to 1
    assert boundary_width(length, 0, 0.5) == expected
    assert boundary_width(0, length, 0.5) == expected


@pytest.mark.parametrize("h, w, expected", [
    (100, 75, 2), (75, 100, 2), (21, 72, 2), (36, 323, 6), (7, 24, 1), (15, 20, 1),
    (480, 640, 16), (1024, 1024, 29), (720, 1280, 29), (10, 10, 1), (25, 25, 1), (3, 4, 1), (1, 1, 1)])
def test_width_table(h, w, expected):
    assert boundary_width(h, w) == expected


def test_width_all_exact_half_sizes():
    # Every H, W < 400 whose diagonal c is an integer with c/50 ending in .5: there are 56 of them (the assertion
    # below counts them), and round-half-to-even of c/50 is c//50 when that is even, else c//50 + 1 (clamped to 1).
    # floor(x + 0.5) rounds every one of them up, so it is wrong exactly where c//50 is even and nonzero, not on
    # all 56 of them (21x72 -> 1.5 -> 2 either way).
    sizes = [(h, w) for h in range(1, 400) for w in range(1, 400)
             if math.isqrt(h * h + w * w) ** 2 == h * h + w * w and math.isqrt(h * h + w * w) % 50 == 25]
    assert len(sizes) == 56
    for h, w in sizes:
        q = math.isqrt(h * h + w * w) // 50
        assert boundary_width(h, w) == max(q if q % 2 == 0 else q + 1, 1), (h, w)
        half_up = max(math.floor(0.02 * math.hypot(h, w) + 0.5), 1)
        assert (boundary_width(h, w) != half_up) == (q % 2 == 0 and q > 0), (h, w)


def test_width_bad_input():
    with pytest.raises(ValueError, match="dilation_ratio"):
        boundary_width(10, 10, -0.1)
    with pytest.raises(ValueError, match="height"):
        boundary_width(-1, 10)


# ---------------------------------------------------------------- mask_to_boundary, hand-worked

def test_rectangle_pixel_count():
    m = rect(100, 75, (20, 79), (20, 59))  # d = 2
    b = mask_to_boundary(m)
    assert b.dtype == np.uint8 and b.shape == (100, 75)
    assert b.sum() == 384 == 60 * 40 - 56 * 36
    assert mask_to_boundary(m, dilation_ratio=0.024).sum() == 564  # 0.024 * 125 = 3: d = 3


@pytest.mark.parametrize("side, expected", [(10, 36), (200, 4656)])
def test_full_image_is_a_frame(side, expected):
    # outside the image is background: a full mask has a frame of width d (1 for 10x10, 6 for 200x200)
    b = mask_to_boundary(np.ones((side, side), np.uint8))
    assert b.sum() == expected
    d = boundary_width(side, side)
    assert b[d:-d, d:-d].sum() == 0 and b[:d].all() and b[:, -d:].all()


def test_empty_mask():
    assert mask_to_boundary(np.zeros((30, 40), np.uint8)).sum() == 0
    assert mask_to_boundary(torch.zeros(2, 30, 40, dtype=torch.bool)).sum() == 0


def test_mask_touching_the_border():
    # 10x10, left half (cols 0..4, all rows), d = 1: col 0, col 4, rows 0 and 9 are boundary: 50 - 3*8 = 26.
    m = rect(10, 10, (0, 9), (0, 4))
    b = mask_to_boundary(m)
    assert b.sum() == 26
    assert b[:, 0].all() and b[0, :5].all() and b[9, :5].all() and b[:, 4].all()
    assert b[1:9, 1:4].sum() == 0


def test_thin_objects_are_all_boundary():
    # d = 2 on 100x75: a strip 4 px wide (< 2d+1) is all boundary; at 5 px wide an interior line appears,
    # rows 22..77 of the middle column (56 px), so 300 - 56 = 244 boundary pixels.
    thin = rect(100, 75, (20, 79), (30, 33))
    assert np.array_equal(mask_to_boundary(thin), thin)
    five = rect(100, 75, (20, 79), (30, 34))
    assert mask_to_boundary(five).sum() == 244
    single = rect(100, 75, (50, 50), (10, 10))
    assert np.array_equal(mask_to_boundary(single), single)


def test_value_and_dtype_are_kept():
    m = rect(100, 75, (20, 79), (20, 59))
    for dtype in (np.uint8, np.int32, np.int64, np.uint16, np.float16, np.float32, np.float64):
        b = mask_to_boundary(m.astype(dtype) * 255)
        assert b.dtype == dtype and np.count_nonzero(b) == 384 and set(np.unique(b).tolist()) == {0, 255}
    bb = mask_to_boundary(m.astype(bool))
    assert bb.dtype == np.bool_ and bb.sum() == 384
    t = mask_to_boundary(torch.from_numpy(m).float()[None, None] * 3)
    assert t.dtype == torch.float32 and t.shape == (1, 1, 100, 75) and t.sum() == 384 * 3


def test_bad_input_is_explained():
    with pytest.raises(ValueError, match=r"expected \(H, W\)"):
        mask_to_boundary(np.zeros((2, 5, 5), np.uint8))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        mask_to_boundary(torch.zeros(2, 3, 5, 5))
    with pytest.raises(TypeError, match="numpy array"):
        mask_to_boundary([[0, 1], [1, 0]])


# ---------------------------------------------------------------- mask_to_boundary, random masks vs references

SIZES = [(1, 1), (3, 4), (10, 10), (7, 24), (15, 20), (21, 72), (100, 75), (75, 100), (36, 323), (48, 64),
         (61, 37)]
RATIOS = [0.005, 0.02, 0.05, 0.2]


@pytest.mark.parametrize("h, w", SIZES)
def test_random_masks_match_opencv_and_chessboard(h, w):
    rng = np.random.default_rng(h * 1000 + w)
    masks = blob_masks(rng, 3, h, w)
    masks[0, :, 0] = 1  # make sure at least one blob touches the border
    for ratio in RATIOS:
        refs = np.stack([opencv_boundary(m, ratio) for m in masks])
        for m, ref in zip(masks, refs):
            assert np.array_equal(ref != 0, chessboard_boundary(m, ratio))  # the two references agree
            assert np.array_equal(mask_to_boundary(m, ratio), ref)
            assert np.array_equal(mask_to_boundary(m.astype(bool), ratio), ref != 0)
            assert np.array_equal(mask_to_boundary(m.astype(np.uint16), ratio), ref)  # scipy path
        batch = torch.from_numpy(masks)
        out = mask_to_boundary(batch, ratio)
        assert out.dtype == torch.uint8 and np.array_equal(out.numpy(), refs)
        out4 = mask_to_boundary(batch.bool()[:, None], ratio)
        assert out4.shape == (3, 1, h, w) and np.array_equal(out4[:, 0].numpy(), refs != 0)
        assert np.array_equal(mask_to_boundary(batch[1], ratio).numpy(), refs[1])


@pytest.mark.parametrize("chunk_bytes", [1, 2 * 21 * 72])
def test_cpu_chunks_do_not_change_the_result(monkeypatch, chunk_bytes):
    # on CPU a batch is eroded a few masks at a time; 1 byte -> one mask per chunk, 2 masks -> uneven last chunk
    import evaluation.boundary as boundary

    monkeypatch.setattr(boundary, "_CPU_CHUNK_BYTES", chunk_bytes)
    masks = blob_masks(np.random.default_rng(2), 5, 21, 72)
    refs = np.stack([opencv_boundary(m, 0.02) for m in masks])
    assert np.array_equal(mask_to_boundary(torch.from_numpy(masks)).numpy(), refs)
    out = mask_to_boundary(torch.from_numpy(masks)[:, None].bool())
    assert out.shape == (5, 1, 21, 72) and np.array_equal(out[:, 0].numpy(), refs != 0)


def test_grey_level_masks_match_opencv():
    # OpenCV's erosion is a grey-level minimum; so is ours: the result on non-binary float masks is identical.
    rng = np.random.default_rng(7)
    for h, w in [(21, 72), (40, 33)]:
        m = (rng.random((h, w)) * (rng.random((h, w)) > 0.2)).astype(np.float32)
        for ratio in (0.02, 0.1):
            ref = opencv_boundary(m, ratio)
            assert np.array_equal(mask_to_boundary(m, ratio), ref)
            assert np.array_equal(mask_to_boundary(m.astype(np.float64), ratio), opencv_boundary(
                m.astype(np.float64), ratio))
            assert np.array_equal(mask_to_boundary(torch.from_numpy(m)[None], ratio)[0].numpy(), ref)


@pytest.mark.gpu
def test_cuda_matches_opencv():
    rng = np.random.default_rng(3)
    masks = blob_masks(rng, 4, 96, 128)
    refs = np.stack([opencv_boundary(m, 0.02) for m in masks])
    out = mask_to_boundary(torch.from_numpy(masks).cuda())
    assert out.is_cuda and np.array_equal(out.cpu().numpy(), refs)
    biou = boundary_iou(torch.from_numpy(masks).cuda(), torch.from_numpy(masks[::-1].copy()).cuda())
    assert biou.is_cuda and biou.shape == (4,)


# ---------------------------------------------------------------- boundary_iou

def shifted_squares(shift=1):
    # 40x40 canvas, 20x20 squares, the second one shifted right by `shift` px
    return rect(40, 40, (10, 29), (10, 29)), rect(40, 40, (10, 29), (10 + shift, 29 + shift))


@pytest.mark.parametrize("ratio, expected", [
    # d = 1: rings of 76 px sharing only the top and bottom rows' 19-px overlaps: 38 / (152 - 38) = 1/3
    (0.02, 38 / 114),
    # d = 2: rings of 144; overlap 4 rows x 19 + 2 cols x 16 = 108: 108 / 180
    (0.04, 108 / 180),
    # d = 3: rings of 204; overlap 6 x 19 + 4 x 14 = 170: 170 / 238 = 5/7
    (0.06, 170 / 238),
])
def test_boundary_iou_shifted_squares(ratio, expected):
    g, p = shifted_squares()
    assert boundary_iou(g, p, ratio) == pytest.approx(expected, abs=1e-12)
    assert boundary_iou(p, g, ratio) == pytest.approx(expected, abs=1e-12)
    t = boundary_iou(torch.from_numpy(g)[None], torch.from_numpy(p)[None], ratio)
    assert t.shape == (1,) and t.dtype == torch.float32 and t.item() == pytest.approx(expected, abs=1e-6)


def test_boundary_iou_offset_3x3_squares():
    # 3x3 squares offset by (1, 1) on 10x10 (d = 1), worked by hand: 3x3 rings of 8 px, overlap {(3,4), (4,3)}: 2 / 14
    g, p = rect(10, 10, (2, 4), (2, 4)), rect(10, 10, (3, 5), (3, 5))
    assert boundary_iou(g, p) == pytest.approx(2 / 14)
    assert boundary_iou(g * 255, p.astype(bool)) == pytest.approx(2 / 14)  # binarised with != 0


def test_boundary_iou_conventions():
    z = np.zeros((10, 10), np.uint8)
    sq = rect(10, 10, (2, 4), (2, 4))
    far = rect(10, 10, (6, 8), (6, 8))
    assert boundary_iou(sq, sq) == 1.0
    assert boundary_iou(sq, far) == 0.0
    assert boundary_iou(z, sq) == 0.0 and boundary_iou(sq, z, empty=float("nan")) == 0.0
    assert boundary_iou(z, z) == 1.0
    assert math.isnan(boundary_iou(z, z, empty=float("nan")))
    assert boundary_iou(z, z, empty=0.0) == 0.0
    tz = torch.zeros(2, 10, 10, dtype=torch.bool)
    assert torch.equal(boundary_iou(tz, tz), torch.ones(2))
    assert boundary_iou(tz, tz, empty=float("nan")).isnan().all()


def test_boundary_iou_batched_equals_pairs():
    rng = np.random.default_rng(11)
    gts, preds = blob_masks(rng, 5, 30, 41), blob_masks(rng, 5, 30, 41)
    preds[4] = 0
    gts[4] = 0
    expected = []
    for g, p in zip(gts, preds):  # reference bands from OpenCV, IoU counted here
        gb, pb = opencv_boundary(g, 0.02) != 0, opencv_boundary(p, 0.02) != 0
        union = (gb | pb).sum()
        expected.append((gb & pb).sum() / union if union else 1.0)
    out = boundary_iou(torch.from_numpy(gts), torch.from_numpy(preds))
    assert out.shape == (5,)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6)
    for g, p, e in zip(gts, preds, expected):
        assert boundary_iou(g, p) == pytest.approx(e, rel=1e-12)


def test_boundary_iou_bad_input():
    with pytest.raises(TypeError, match="two numpy arrays or two torch tensors"):
        boundary_iou(np.zeros((4, 4)), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="same shape"):
        boundary_iou(np.zeros((4, 4)), np.zeros((4, 5)))


# ---------------------------------------------------------------- BoundaryIoU metric

def _pairs():
    g, p = shifted_squares()
    sq = torch.from_numpy(g)
    shifted = torch.from_numpy(p)
    empty = torch.zeros_like(sq)
    # hand values at d = 1: 1/3, 1, 0 (one empty), both empty -> `empty`
    preds = torch.stack([shifted, sq, empty, empty])
    targets = torch.stack([sq, sq, sq, empty])
    return preds, targets


def test_metric_two_updates_equal_one():
    preds, targets = _pairs()
    a = BoundaryIoU()
    a.update(preds[:1], targets[:1])
    a.update(preds[1:], targets[1:])
    b = BoundaryIoU()
    b.update(preds, targets)
    expected = (1 / 3 + 1 + 0 + 1) / 4
    assert a.compute().item() == pytest.approx(expected, rel=1e-6)
    assert b.compute().item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric BoundaryIoU was called before")
def test_metric_empty_conventions_and_threshold():
    preds, targets = _pairs()
    m = BoundaryIoU(empty=float("nan"))  # the both-empty pair is skipped
    m.update(preds, targets)
    assert m.compute().item() == pytest.approx((1 / 3 + 1 + 0) / 3, rel=1e-6)
    z = BoundaryIoU(empty=0.0)
    z.update(preds, targets)
    assert z.compute().item() == pytest.approx((1 / 3 + 1) / 4, rel=1e-6)
    logits = torch.where(preds.bool(), 4.0, -4.0)
    t = BoundaryIoU(threshold=0.0)
    t.update(logits, targets)
    assert t.compute().item() == pytest.approx((1 / 3 + 1 + 0 + 1) / 4, rel=1e-6)
    assert BoundaryIoU().compute().isnan()  # nothing seen


def _ddp_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        preds, targets = _pairs()
        m = BoundaryIoU()
        # rank 0 sees pairs 0 and 1, rank 1 sees pairs 2 and 3
        m.update(preds[2 * rank:2 * rank + 2], targets[2 * rank:2 * rank + 2])
        value = m.compute().item()
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(repr(value))
    finally:
        dist.destroy_process_group()


def test_metric_sync_sums_states():
    # In-process stand-in for a 2-rank all_gather: torchmetrics gathers each state (sum: float64, count: long)
    # and reduces with dist_reduce_fx="sum"; the result must be the mean over both ranks' pairs.
    preds, targets = _pairs()
    other = BoundaryIoU()
    other.update(preds[2:], targets[2:])
    by_dtype = {other.sum.dtype: other.sum, other.count.dtype: other.count}
    m = BoundaryIoU(dist_sync_fn=lambda t, group=None: [t, by_dtype[t.dtype]],
                    distributed_available_fn=lambda: True)
    m.update(preds[:2], targets[:2])
    assert m.compute().item() == pytest.approx((1 / 3 + 1 + 0 + 1) / 4, rel=1e-6)


@pytest.mark.slow  # two fresh interpreters each import torchmetrics (~6 s on 2 cores)
def test_metric_syncs_across_two_processes(tmp_path):
    with redirect_stdout(io.StringIO()):
        mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expected = (1 / 3 + 1 + 0 + 1) / 4  # the mean over both ranks' pairs, not either rank's own mean
    for rank in range(2):
        assert float((tmp_path / f"rank{rank}.txt").read_text()) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- benchmark smoke test

def test_benchmark_runs_and_prints_a_ratio(capsys):
    from benchmarks.boundary_iou import main

    result = main(["--masks", "8", "--height", "48", "--width", "64", "--repeats", "1", "--batch", "3"])
    out = capsys.readouterr().out
    assert "ratio ours/OpenCV" in out and "masks/s" in out and "threads" in out
    assert result["identical"] and result["d"] == 2  # 0.02 * 80 = 1.6 -> 2
