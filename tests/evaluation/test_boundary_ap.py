"""COCO Boundary AP on tiny hand-made datasets: IoUs and AP values worked out by hand from the rules of
bowenc0221/boundary-iou-api boundary_iou/coco_instance_api/cocoeval.py:COCOeval.computeBoundaryIoU, and IoU
matrices against an independent OpenCV + pycocotools formulation of that computeBoundaryIoU."""

import copy
import io
import json
from contextlib import redirect_stdout

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest
from pycocotools.coco import COCO

from evaluation.boundary_ap import STAT_NAMES, BoundaryCOCOeval, boundary_ap

# pycocotools 2.0.11 mask.decode under numpy 2; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual, dtype=float), expected, rtol=0, atol=1e-12)


def rect(h, w, rows, cols):
    m = np.zeros((h, w), np.uint8)
    m[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1] = 1
    return m


def rle(mask):
    """Compressed RLE with str counts, as in a results json."""
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


def uncompressed_rle(mask):
    """Uncompressed RLE written out by hand: run lengths of the column-major pixels, starting with zeros."""
    flat = mask.flatten(order="F").astype(int)
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def gt_ann(ann_id, image_id, mask, category_id=1, iscrowd=0, segmentation=None):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": iscrowd,
            "segmentation": segmentation if segmentation is not None else rle(mask),
            "area": float(mask.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle(mask))]}


def det(image_id, mask, score, category_id=1):
    return {"image_id": image_id, "category_id": category_id, "segmentation": rle(mask), "score": score}


def make_coco(images, anns, n_categories=1):
    coco = COCO()
    coco.dataset = {"images": [{"id": i, "height": h, "width": w} for i, (h, w) in images.items()],
                    "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in range(1, n_categories + 1)]}
    with redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def evaluated(gt, dets, ratio=0.02):
    with redirect_stdout(io.StringIO()):
        dt = gt.loadRes(copy.deepcopy(dets))
        e = BoundaryCOCOeval(gt, dt, dilation_ratio=ratio)
        e.evaluate()
    return e


# ---------------------------------------------------------------- perfect detections

def test_perfect_detections_score_one():
    images = {1: (10, 10), 2: (20, 30), 3: (40, 40)}
    m1 = rect(10, 10, (2, 6), (3, 7))
    m2a = rect(20, 30, (0, 7), (0, 9))  # touches the border
    m2b = rect(20, 30, (10, 17), (12, 28))
    m3 = rect(40, 40, (5, 24), (8, 30))
    poly = [[10.0, 28.0, 30.0, 28.0, 30.0, 38.0, 10.0, 38.0]]  # a polygon ground truth on image 3
    anns = [gt_ann(1, 1, m1), gt_ann(2, 2, m2a), gt_ann(3, 2, m2b, category_id=2), gt_ann(4, 3, m3, 2),
            gt_ann(5, 3, np.zeros((40, 40), np.uint8), segmentation=poly)]
    anns[-1]["area"] = 200.0
    gt = make_coco(images, anns, n_categories=2)
    poly_mask = gt.annToMask(gt.anns[5])
    dets = [det(1, m1, 0.9), det(2, m2a, 0.8), det(2, m2b, 0.7, 2), det(3, m3, 0.6, 2), det(3, poly_mask, 0.5),
            det(3, rect(40, 40, (30, 35), (0, 3)), 0.1)]  # a last-ranked false positive keeps AP at 1
    result = boundary_ap(gt, dets)
    for prefix in ("", "segm_"):
        for name in ("AP", "AP50", "AP75", "APs", "AR1", "AR10", "AR100", "ARs"):
            assert result[prefix + name] == pytest.approx(1.0), prefix + name
        for name in ("APm", "APl", "ARm", "ARl"):  # every object is small (< 32^2 px): no ground truth there
            assert result[prefix + name] == -1.0, prefix + name
    assert set(result) == set(STAT_NAMES) | {f"segm_{n}" for n in STAT_NAMES}


# ---------------------------------------------------------------- high mask IoU, lower boundary IoU

def two_squares_dataset():
    """Two 40x40 images with one 20x20 square each. Image 1: exact detection (score .9); image 2: the detection
    is shifted right by 1 px (score .8): mask IoU 380/420 = 19/21; boundary IoU 1/3 (d=1), 5/7 (d=3)."""
    square = rect(40, 40, (10, 29), (10, 29))
    shifted = rect(40, 40, (10, 29), (11, 30))
    gt = make_coco({1: (40, 40), 2: (40, 40)}, [gt_ann(1, 1, square), gt_ann(2, 2, square)])
    return gt, [det(1, square, 0.9), det(2, shifted, 0.8)]


def test_compute_iou_is_min_of_mask_and_boundary():
    gt, dets = two_squares_dataset()
    for ratio, biou in ((0.02, 38 / 114), (0.06, 170 / 238)):  # d = 1 and d = 3 on a 40x40 canvas
        e = evaluated(gt, dets, ratio)
        close(e.mask_ious[2, 1], [[19 / 21]])
        close(e.boundary_ious[2, 1], [[biou]])
        close(e.ious[2, 1], [[min(19 / 21, biou)]])
        close(e.ious[1, 1], [[1.0]])


def test_boundary_ap_hand_values():
    # d = 3 (ratio .06): IoU image 2 = min(.905, .714) = .714, matched at thresholds .50-.70 (5 of 10), mask IoU
    # at .50-.90 (9 of 10). Where both match, AP = 1; where only image 1's (higher-scored) detection does, the
    # precision is 1 up to recall .5 and 0 after: 51 of the 101 recall points, AP = 51/101.
    gt, dets = two_squares_dataset()
    r = boundary_ap(gt, dets, dilation_ratio=0.06)
    half = 51 / 101
    assert r["AP"] == pytest.approx((5 + 5 * half) / 10)
    assert r["AP50"] == pytest.approx(1.0)
    assert r["AP75"] == pytest.approx(half)
    assert r["APs"] == pytest.approx(r["AP"]) and r["APm"] == -1 and r["APl"] == -1
    assert r["AR100"] == pytest.approx((5 * 1 + 5 * 0.5) / 10) and r["AR1"] == pytest.approx(0.75)
    assert r["segm_AP"] == pytest.approx((9 + half) / 10)
    assert r["segm_AP75"] == pytest.approx(1.0)
    assert r["segm_AR100"] == pytest.approx(0.95)
    assert r["AP"] < r["segm_AP"]


def test_boundary_ap_default_ratio_misses_the_shift():
    # d = 1: boundary IoU 1/3 < .5, so the shifted detection never matches; mask IoU .905 matches 9 of 10
    gt, dets = two_squares_dataset()
    r = boundary_ap(gt, dets)
    half = 51 / 101
    assert r["AP"] == pytest.approx(half) and r["AP50"] == pytest.approx(half)
    assert r["AR100"] == pytest.approx(0.5)
    assert r["segm_AP"] == pytest.approx((9 + half) / 10)


# ---------------------------------------------------------------- crowd ground truth keeps the mask IoU

def test_crowd_keeps_mask_iou_pycocotools_squares():
    # worked by hand with pycocotools' conventions: 3x3 squares offset by (1, 1) on 10x10: mask IoU 4/14, crowd
    # (|∩|/|DT|) 4/9; boundaries (d = 1) are the 8-px rings, sharing (3, 4) and (4, 3): 2/14.
    g, d = rect(10, 10, (2, 4), (2, 4)), rect(10, 10, (3, 5), (3, 5))
    gt = make_coco({1: (10, 10)}, [gt_ann(1, 1, g), gt_ann(2, 1, g, iscrowd=1, segmentation=uncompressed_rle(g))])
    e = evaluated(gt, [det(1, d, 0.9)])
    close(e.mask_ious[1, 1], [[4 / 14, 4 / 9]])
    close(e.ious[1, 1], [[2 / 14, 4 / 9]])
    assert e.boundary_ious[1, 1][0, 0] == pytest.approx(2 / 14) and np.isnan(e.boundary_ious[1, 1][0, 1])


def test_detection_inside_crowd_is_ignored():
    # 20x20 (d = 1). A detection inside a crowd region has crowd mask IoU 9/9 = 1 and is ignored; its boundary
    # ring never meets the crowd's frame, so a min() on crowd would make it a top-ranked false positive (AP .5).
    square = rect(20, 20, (2, 6), (2, 6))
    crowd = rect(20, 20, (10, 19), (0, 19))
    inside = rect(20, 20, (12, 14), (5, 7))
    gt = make_coco({1: (20, 20)}, [gt_ann(1, 1, square), gt_ann(2, 1, crowd, iscrowd=1)])
    dets = [det(1, square, 0.9), det(1, inside, 0.95)]
    e = evaluated(gt, dets)
    close(e.ious[1, 1], [[0.0, 1.0], [1.0, 0.0]])  # rows: by score (inside, square)
    r = boundary_ap(gt, dets)
    assert r["AP"] == pytest.approx(1.0) and r["AR100"] == pytest.approx(1.0)


# ---------------------------------------------------------------- against an independent formulation

def _opencv_boundary(mask, ratio):
    h, w = mask.shape
    d = max(int(round(ratio * np.sqrt(h ** 2 + w ** 2))), 1)
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    return mask - cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=d)[1:h + 1, 1:w + 1]


def test_iou_matrices_match_reference_formulation():
    rng = np.random.default_rng(5)
    images = {1: (30, 40), 2: (25, 25), 3: (36, 48)}
    anns, dets, masks = [], [], {}
    for img, (h, w) in images.items():
        for k in range(3):
            y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
            m = rect(h, w, (y, y + rng.integers(3, 12)), (x, x + rng.integers(3, 15)))
            m[rng.random((h, w)) < 0.05] = 0
            anns.append(gt_ann(len(anns) + 1, img, m, iscrowd=int(k == 2 and img == 3)))
            masks["gt", len(anns)] = m
            for _ in range(2):
                p = np.roll(m, (rng.integers(-2, 3), rng.integers(-2, 3)), (0, 1))
                p |= (rng.random((h, w)) < 0.02).astype(np.uint8)
                dets.append(det(img, p, float(rng.random())))
    gt = make_coco(images, anns)
    e = evaluated(gt, dets)
    for img in images:
        g = [a for a in anns if a["image_id"] == img]
        dt = sorted([d for d in dets if d["image_id"] == img], key=lambda d: -d["score"])
        crowd = [a["iscrowd"] for a in g]
        gm = [masks["gt", a["id"]] for a in g]
        dm = [mask_utils.decode(d["segmentation"]) for d in dt]
        mask_iou = np.array(mask_utils.iou([rle(m) for m in dm], [rle(m) for m in gm], crowd))
        band = lambda ms: [rle(_opencv_boundary(m, 0.02)) for m in ms]  # noqa: E731
        b_iou = np.array(mask_utils.iou(band(dm), band(gm), crowd))
        expected = np.where(np.array(crowd, bool)[None], mask_iou, np.minimum(mask_iou, b_iou))
        np.testing.assert_allclose(e.ious[img, 1], expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- convenience function

def test_boundary_ap_from_files_keeps_inputs(tmp_path):
    gt, dets = two_squares_dataset()
    for d in dets:
        d["bbox"] = [0.0, 0.0, 40.0, 40.0]  # ignored: areas come from the masks
    gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_path.write_text(json.dumps(gt.dataset))
    dt_path.write_text(json.dumps(dets))
    before = copy.deepcopy(dets)
    r = boundary_ap(gt_path, dets, dilation_ratio=0.06, include_segm=False)
    assert dets == before
    assert r["AP"] == pytest.approx((5 + 5 * 51 / 101) / 10) and "segm_AP" not in r
    assert boundary_ap(str(gt_path), dt_path, dilation_ratio=0.06) == pytest.approx(
        boundary_ap(gt, json.loads(dt_path.read_text()), dilation_ratio=0.06))


def test_boundary_ap_without_detections_and_bad_input():
    gt, _ = two_squares_dataset()
    r = boundary_ap(gt, [])
    assert r["AP"] == 0.0 and r["AR100"] == 0.0 and r["APm"] == -1.0 and r["segm_AP"] == 0.0
    with pytest.raises(ValueError, match="lacks .*score"):
        boundary_ap(gt, [{"image_id": 1, "category_id": 1, "segmentation": rle(np.ones((40, 40)))}])
    with pytest.raises(ValueError, match="only 'boundary'"):
        BoundaryCOCOeval(gt, gt, iouType="segm")
