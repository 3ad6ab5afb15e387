"""J, F and J&F (DAVIS 2017 / SA-V) against hand-worked examples.

Frames are 10x10 unless said otherwise: ceil(0.008 * sqrt(200)) = ceil(0.113) = 1, so boundaries match within
the radius-1 disk (the 4-neighbour cross). A block covering rows a..b, cols c..d (away from the right and bottom
edges) has as ``_seg2bmap`` boundary the rectangle ring with corners (a-1, c-1) and (b, d).
"""

import math

import numpy as np
import pytest
import torch

from evaluation.vos import (PngVideoFolders, boundary_f_measure, boundary_precision_recall, boundary_radius, disk,
                            evaluate_dataset, evaluate_video, load_masks_from_pngs, region_similarity,
                            mean_pairwise_iou, region_similarity_torch, seg_to_boundary)
from evaluation.vos import _dilate


def block(r0, r1, c0, c1, size=(10, 10)):
    """Mask with rows r0..r1 and cols c0..c1 (inclusive) set."""
    m = np.zeros(size, bool)
    m[r0:r1 + 1, c0:c1 + 1] = True
    return m


EMPTY = np.zeros((10, 10), bool)
GT = block(2, 5, 2, 5)        # 4x4; boundary ring rows 1..5, cols 1..5: 16 pixels
SHIFT1 = block(2, 5, 3, 6)    # J = 12/20; every ring pixel within 1 of the other ring: F = 1
SHIFT2 = block(2, 5, 4, 7)    # J = 8/24; 10 of 16 ring pixels matched each way: F = 10/16
INNER = block(3, 4, 3, 4)     # 2x2; ring rows 2..4, cols 2..4 (8 px): J = 4/16, P = 8/8, R = 12/16


# ------------------------------------------------------------------------------------------- building blocks

def test_disk_footprints_by_hand():
    r1 = [[0, 1, 0],
          [1, 1, 1],
          [0, 1, 0]]
    r2 = [[0, 0, 1, 0, 0],
          [0, 1, 1, 1, 0],
          [1, 1, 1, 1, 1],
          [0, 1, 1, 1, 0],
          [0, 0, 1, 0, 0]]
    r3 = [[0, 0, 0, 1, 0, 0, 0],
          [0, 1, 1, 1, 1, 1, 0],
          [0, 1, 1, 1, 1, 1, 0],
          [1, 1, 1, 1, 1, 1, 1],
          [0, 1, 1, 1, 1, 1, 0],
          [0, 1, 1, 1, 1, 1, 0],
          [0, 0, 0, 1, 0, 0, 0]]
    for r, want in ((1, r1), (2, r2), (3, r3)):
        np.testing.assert_array_equal(disk(r), np.array(want, bool))
    assert disk(0).tolist() == [[True]]
    assert disk(8).sum() == 197  # lattice points with x^2 + y^2 <= 64 (Gauss circle problem, N(8) = 197)


def test_disk_matches_skimage():
    morph = pytest.importorskip("skimage.morphology")
    for r in range(10):
        np.testing.assert_array_equal(disk(r), morph.disk(r).astype(bool))


def test_boundary_radius():
    assert boundary_radius(10, 10) == 1            # 0.008 * 14.14 = 0.11
    assert boundary_radius(100, 100) == 2          # 0.008 * 141.4 = 1.13
    assert boundary_radius(480, 854) == 8          # 0.008 * 979.6 = 7.84 (DAVIS 480p)
    assert boundary_radius(480, 854, bound_th=3) == 3  # >= 1 means pixels
    with pytest.raises(ValueError, match="bound_th"):
        boundary_radius(10, 10, bound_th=0)


def test_seg_to_boundary_hand_drawn():
    m = np.array([[0, 0, 0, 0, 0, 0],
                  [0, 1, 1, 1, 0, 0],
                  [0, 1, 1, 1, 0, 0],
                  [0, 0, 0, 0, 0, 0]])
    want = [[1, 1, 1, 1, 0, 0],
            [1, 0, 0, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [0, 0, 0, 0, 0, 0]]
    np.testing.assert_array_equal(seg_to_boundary(m), np.array(want, bool))
    # touching the right and bottom edges: only neighbours inside the frame count, the corner never does
    m = np.array([[0, 0, 0, 0],
                  [0, 0, 0, 0],
                  [0, 0, 1, 1],
                  [0, 0, 1, 1]])
    want = [[0, 0, 0, 0],
            [0, 1, 1, 1],
            [0, 1, 0, 0],
            [0, 1, 0, 0]]
    np.testing.assert_array_equal(seg_to_boundary(m), np.array(want, bool))
    assert not seg_to_boundary(np.ones((5, 7))).any()      # a full-frame mask has no boundary
    assert not seg_to_boundary(np.zeros((5, 7))).any()
    stack = seg_to_boundary(np.stack([m, np.zeros_like(m)]))  # frames are independent
    np.testing.assert_array_equal(stack[0], np.array(want, bool))
    assert not stack[1].any()


def test_dilation_matches_scipy_binary_dilation():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for r in range(6):
        for shape in ((3, 9, 13), (2, 2, 5), (1, 12, 3)):  # includes frames smaller than the disk
            b = rng.random(shape) < 0.1
            want = ndimage.binary_dilation(b, structure=disk(r)[None])
            np.testing.assert_array_equal(_dilate(b, disk(r)), want, err_msg=f"r={r} shape={shape}")


def _brute_force_f(gt, pred, radius):
    """Independent per-pixel formulation: boundary rule by explicit neighbour loops, matching by distance."""
    def boundary(m):
        h, w = m.shape
        return [(y, x) for y in range(h) for x in range(w)
                if any(m[y, x] != m[y + dy, x + dx] for dy, dx in ((0, 1), (1, 0), (1, 1))
                       if y + dy < h and x + dx < w)]

    def matched(a, b):
        return sum(any((y - v) ** 2 + (x - u) ** 2 <= radius ** 2 for v, u in b) for y, x in a)

    gb, pb = boundary(gt), boundary(pred)
    p = matched(pb, gb) / len(pb) if pb else 1.0
    r = matched(gb, pb) / len(gb) if gb else 1.0
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def test_f_measure_matches_brute_force_on_random_masks():
    rng = np.random.default_rng(1)
    for _ in range(25):
        h, w = rng.integers(2, 12, size=2)
        gt, pred = rng.random((h, w)) < rng.random(), rng.random((h, w)) < rng.random()
        for th in (0.008, 2, 3):
            want = _brute_force_f(gt, pred, boundary_radius(h, w, th))
            assert math.isclose(boundary_f_measure(gt, pred, th), want), (gt, pred, th)


# ---------------------------------------------------------------------------------------------- J and F by hand

def test_region_similarity_by_hand():
    assert region_similarity(GT, GT) == 1.0
    assert math.isclose(region_similarity(GT, SHIFT1), 12 / 20)
    assert math.isclose(region_similarity(GT, SHIFT2), 8 / 24)
    assert math.isclose(region_similarity(GT, INNER), 4 / 16)
    assert region_similarity(EMPTY, EMPTY) == 1.0   # both empty: 1 (DAVIS / SA-V)
    assert region_similarity(GT, EMPTY) == 0.0
    assert region_similarity(EMPTY, GT) == 0.0
    np.testing.assert_allclose(region_similarity(np.stack([GT, GT, EMPTY]), np.stack([GT, SHIFT2, EMPTY])),
                               [1.0, 1 / 3, 1.0])
    with pytest.raises(ValueError, match="same shape"):
        region_similarity(GT, GT[:5])


def test_region_similarity_torch_by_hand():
    gt = torch.from_numpy(np.stack([GT, GT, EMPTY, EMPTY]))
    pred = torch.from_numpy(np.stack([SHIFT1, SHIFT2, EMPTY, GT]))
    torch.testing.assert_close(region_similarity_torch(gt, pred), torch.tensor([0.6, 1 / 3, 1.0, 0.0]))


def test_mean_pairwise_iou_by_hand():
    masks = torch.zeros(4, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True  # 4 pixels
    masks[1, :2, 1:3] = True  # 4 pixels, 2 shared with the first
    # pairs: (0, 1) 2/6; (0, 2), (0, 3), (1, 2), (1, 3) 0; (2, 3) both empty: 1
    assert mean_pairwise_iou(masks).item() == pytest.approx((2 / 6 + 1) / 6)
    assert mean_pairwise_iou(masks[:1].expand(3, -1, -1)).item() == 1.0  # the same answer three times
    with pytest.raises(ValueError, match="P >= 2"):
        mean_pairwise_iou(masks[:1])


@pytest.mark.gpu
def test_region_similarity_torch_on_cuda_without_host_sync():
    gt = torch.from_numpy(np.stack([GT, GT, EMPTY, EMPTY])).cuda()
    pred = torch.from_numpy(np.stack([SHIFT1, SHIFT2, EMPTY, GT])).cuda()
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host copy raises
    try:
        j = region_similarity_torch(gt, pred)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert j.is_cuda
    torch.testing.assert_close(j.cpu(), torch.tensor([0.6, 1 / 3, 1.0, 0.0]))


def test_boundary_precision_recall_by_hand():
    assert boundary_precision_recall(GT, INNER) == (1.0, 12 / 16)   # pred boundary all near gt; 4 gt corners not
    assert boundary_precision_recall(INNER, GT) == (12 / 16, 1.0)   # roles swap
    assert boundary_precision_recall(GT, EMPTY) == (1.0, 0.0)        # pred empty
    assert boundary_precision_recall(EMPTY, GT) == (0.0, 1.0)        # pred spurious
    assert boundary_precision_recall(EMPTY, EMPTY) == (1.0, 1.0)


def test_boundary_f_measure_by_hand():
    assert boundary_f_measure(GT, GT) == 1.0
    assert boundary_f_measure(GT, SHIFT1) == 1.0
    assert math.isclose(boundary_f_measure(GT, SHIFT2), 10 / 16)
    assert math.isclose(boundary_f_measure(GT, SHIFT2, bound_th=1.0), 10 / 16)  # radius 1 in pixels
    assert boundary_f_measure(GT, SHIFT2, bound_th=2) == 1.0  # every ring pixel is within 2 of the other ring
    assert math.isclose(boundary_f_measure(GT, INNER), 2 * 0.75 / 1.75)
    assert boundary_f_measure(EMPTY, EMPTY) == 1.0
    assert boundary_f_measure(GT, EMPTY) == 0.0
    assert boundary_f_measure(EMPTY, GT) == 0.0
    np.testing.assert_allclose(boundary_f_measure(np.stack([GT, GT]), np.stack([SHIFT2, EMPTY])), [10 / 16, 0.0])


# ------------------------------------------------------------------------------------------ videos and datasets

def test_evaluate_video_by_hand():
    gt = {1: np.stack([GT, GT, GT]),
          2: np.stack([EMPTY, EMPTY, GT]),
          4: np.stack([EMPTY, EMPTY, EMPTY])}      # object absent from the ground truth: ignored
    pred = {1: np.stack([GT, SHIFT2, EMPTY]),
            2: np.stack([EMPTY, GT, SHIFT1]),     # frame 1: spurious on empty gt
            3: np.stack([GT, GT, GT])}            # prediction-only id: ignored
    s = evaluate_video(gt, pred)
    assert sorted(s.j) == [1, 2]
    np.testing.assert_allclose(s.j[1], [1, 1 / 3, 0])
    np.testing.assert_allclose(s.f[1], [1, 10 / 16, 0])
    np.testing.assert_allclose(s.j[2], [1, 0, 0.6])   # frame 0 both empty: J = F = 1
    np.testing.assert_allclose(s.f[2], [1, 0, 1])
    np.testing.assert_array_equal(s.frames[1], [0, 1, 2])
    j1, f1 = 100 * (4 / 3) / 3, 100 * (1 + 10 / 16) / 3   # 44.44, 54.17
    j2, f2 = 100 * 1.6 / 3, 100 * 2 / 3                   # 53.33, 66.67
    assert math.isclose(s.j_mean[1], j1) and math.isclose(s.f_mean[1], f1)
    assert math.isclose(s.j_mean[2], j2) and math.isclose(s.f_mean[2], f2)
    assert math.isclose(s.jf, ((j1 + f1) / 2 + (j2 + f2) / 2) / 2)   # 54.65


def test_missing_prediction_is_scored_as_empty():
    s = evaluate_video({7: np.stack([GT, GT])}, {})
    np.testing.assert_array_equal(s.j[7], [0, 0])
    np.testing.assert_array_equal(s.f[7], [0, 0])


def test_skip_first_and_last_changes_the_result():
    gt = {1: np.stack([GT] * 4)}
    pred = {1: np.stack([GT, SHIFT2, SHIFT2, EMPTY])}
    full = evaluate_video(gt, pred)
    skip = evaluate_video(gt, pred, skip_first_and_last=True)
    assert math.isclose(full.j_mean[1], 100 * (1 + 1 / 3 + 1 / 3 + 0) / 4)
    assert math.isclose(full.f_mean[1], 100 * (1 + 0.625 + 0.625 + 0) / 4)
    assert math.isclose(skip.j_mean[1], 100 / 3)
    assert math.isclose(skip.f_mean[1], 62.5)
    np.testing.assert_array_equal(skip.frames[1], [1, 2])
    # an object present only in a skipped frame is absent from the evaluated ground truth
    only_first = {2: np.stack([GT, EMPTY, EMPTY, EMPTY])}
    assert evaluate_video(only_first, {}, skip_first_and_last=True).j == {}
    with pytest.raises(ValueError, match="at least 3 frames"):
        evaluate_video({1: np.stack([GT, GT])}, {}, skip_first_and_last=True)


def test_dataset_mean_is_over_objects_not_videos():
    perfect, missed = np.stack([GT] * 3), np.stack([EMPTY] * 3)
    videos = {"a": ({1: perfect, 2: perfect}, {1: perfect, 2: missed}),   # J = F = 100 and 0
              "b": ({1: perfect}, {1: perfect})}                           # J = F = 100
    for protocol in ("davis", "sav"):
        d = evaluate_dataset(videos, protocol=protocol)
        assert math.isclose(d.j, 200 / 3) and math.isclose(d.f, 200 / 3) and math.isclose(d.jf, 200 / 3)
        assert d.per_video_jf == {"a": 50.0, "b": 100.0}   # the mean over videos would be 75
        assert d.num_objects == 3
    rows = d.table().splitlines()
    assert rows[1] == "global,,66.7,66.7,66.7" and "a,2,0.0,0.0,0.0" in rows


def test_sav_scores_objects_from_their_first_appearance():
    # frames 1..3 are evaluated; the object enters the ground truth at frame 2, the prediction loses it at 3
    gt = {1: np.stack([EMPTY, EMPTY, GT, GT, GT])}
    pred = {1: np.stack([EMPTY, EMPTY, GT, EMPTY, GT])}
    davis = evaluate_dataset({"v": (gt, pred)}, protocol="davis")
    sav = evaluate_dataset({"v": (gt, pred)}, protocol="sav")
    assert math.isclose(davis.jf, 100 * 2 / 3)    # frames 1, 2, 3: (1 + 1 + 0) / 3, J and F alike
    assert math.isclose(sav.jf, 50.0)             # frames 2, 3: (1 + 0) / 2
    np.testing.assert_array_equal(sav.videos["v"].frames[1], [2, 3])
    # a spurious prediction before the object appears starts the count earlier (and scores 0 there)
    early = {1: np.stack([EMPTY, GT, GT, EMPTY, GT])}
    assert math.isclose(evaluate_dataset({"v": (gt, early)}, protocol="sav").j, 100 / 3)
    # unskipped evaluation on request
    assert math.isclose(evaluate_dataset({"v": (gt, pred)}, skip_first_and_last=False).j, 100 * 4 / 5)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match=r"pred_masks\[1\]"):
        evaluate_video({1: np.stack([GT] * 3)}, {1: np.stack([GT] * 2)})
    with pytest.raises(ValueError, match="protocol"):
        evaluate_dataset({}, protocol="youtube")
    with pytest.raises(ValueError, match="no object"):
        evaluate_dataset({"v": ({1: np.stack([EMPTY] * 3)}, {})})
    with pytest.raises(ValueError, match="tuple"):
        evaluate_dataset({"v": [{}, {}]})


# ------------------------------------------------------------------------------------------------ PNG folders

def _save_png(path, array, palette=True):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.ascontiguousarray(array, dtype=np.uint8)
    if palette:  # indexed PNG as DAVIS ships them: pixel value = palette index = object id
        im = Image.frombytes("P", a.shape[::-1], a.tobytes())
        im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (3 * 253))
    else:
        im = Image.frombytes("L", a.shape[::-1], a.tobytes())
    im.save(path)


def test_png_folders_davis_and_sav_layouts(tmp_path):
    # DAVIS layout: object 1 in every frame, object 2 only in the last one
    for t in range(3):
        _save_png(tmp_path / f"gt/v/{t:05d}.png", 1 * GT + 2 * (t == 2) * block(7, 8, 7, 8))
        _save_png(tmp_path / f"pred/v/{t:05d}.png", 1 * [GT, SHIFT2, EMPTY][t])
    masks = load_masks_from_pngs(tmp_path / "gt/v")
    assert sorted(masks) == [1, 2] and masks[1].shape == (3, 10, 10) and masks[1].dtype == bool
    np.testing.assert_array_equal(masks[2][2], block(7, 8, 7, 8))
    # SA-V layout: one folder per object, one binary PNG per frame; the prediction lacks object 001
    for t in range(3):
        _save_png(tmp_path / f"gt/w/000/{t:05d}.png", 255 * GT, palette=False)
        _save_png(tmp_path / f"gt/w/001/{t:05d}.png", 255 * GT, palette=False)
        _save_png(tmp_path / f"pred/w/000/{t:05d}.png", 255 * GT, palette=False)
    assert sorted(load_masks_from_pngs(tmp_path / "gt/w")) == ["000", "001"]
    d = evaluate_dataset(PngVideoFolders(tmp_path / "gt", tmp_path / "pred"), protocol="sav")
    # v, frame 1 only: object 1 -> J 1/3, F 10/16; object 2 absent there -> ignored. w: 000 -> 100, 001 -> 0
    assert sorted(d.videos) == ["v", "w"] and d.num_objects == 3
    assert math.isclose(d.j, (100 / 3 + 100 + 0) / 3)
    assert math.isclose(d.f, (62.5 + 100 + 0) / 3)
    with pytest.raises(FileNotFoundError, match="prediction folder"):
        PngVideoFolders(tmp_path / "gt", tmp_path / "nowhere")["v"]
