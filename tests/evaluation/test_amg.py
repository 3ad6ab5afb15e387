"""Automatic mask generation: the pure functions on hand-computed vectors and against segment-anything's
utils/amg.py, small-region removal against the reference's OpenCV version, and the generator's records equal to
SamAutomaticMaskGenerator's (count, order, masks, boxes, scores) with crops, every output mode and the small-region
postprocessing, both running segment-anything's nano-sized Sam and our copy of it."""

import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from pycocotools.coco import COCO
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.utils import amg as ref_amg

import models.sam.sam  # noqa: F401  (registers sam_vit_*)
from evaluation.amg import (
    AMGConfig,
    AutomaticMaskGenerator,
    build_all_layer_point_grids,
    build_point_grid,
    coco_results,
    coco_rle,
    generate_crop_boxes,
    is_box_near_crop_edge,
    mask_to_rle,
    masks_to_boxes_xyxy,
    remove_small_regions,
    render_overlay,
    rle_area,
    rle_to_mask,
    segmentation_to_mask,
    stability_score,
    uncrop_boxes,
    uncrop_masks,
    uncrop_points,
    write_coco_results,
)
from models.registry import create
from models.sam.sam import ImagePredictor, official_sam_state
from tests.models.test_sam_model import follow_regions, reference_nano

pytestmark = pytest.mark.usefixtures("one_thread")

SCORE_ATOL = 1e-4
LOGIT_TIE = 1e-3  # a mask pixel may differ from the reference's only where the logit is this close to 0


# -- hand-computed vectors -------------------------------------------------------------------------------------
def test_stability_score_vectors():
    logits = torch.tensor([[-5.0, 0.5, 2.0], [1.5, -0.5, 0.9]])
    # > 1: {2, 1.5} = 2 pixels; > -1: {0.5, 2, 1.5, -0.5, 0.9} = 5 pixels
    assert stability_score(logits, 0.0, 1.0).item() == pytest.approx(0.4)
    # exactly at the upper cut: strict > leaves nothing above it
    assert stability_score(torch.tensor([[1.0, 1.0]]), 0.0, 1.0).item() == 0.0
    # nothing above the lower cut: 0 / 0, NaN as in SAM 1
    assert torch.isnan(stability_score(torch.full((1, 2, 3), -10.0), 0.0, 1.0)).all()
    # batched: the leading dims stay
    assert stability_score(torch.zeros(2, 3, 4, 5), 0.0, 1.0).shape == (2, 3)


def test_masks_to_boxes_vectors():
    mask = torch.zeros(6, 8, dtype=torch.bool)
    mask[1:3, 2:5] = True
    assert masks_to_boxes_xyxy(mask).tolist() == [2, 1, 4, 2]  # inclusive ends
    stack = torch.stack([mask, torch.zeros_like(mask)])
    assert masks_to_boxes_xyxy(stack).tolist() == [[2, 1, 4, 2], [0, 0, 0, 0]]  # empty -> zeros
    assert masks_to_boxes_xyxy(torch.zeros(0, 6, 8, dtype=torch.bool)).shape == (0, 4)


def test_point_grids():
    assert build_point_grid(2).tolist() == [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]  # x fastest
    grids = build_all_layer_point_grids(32, 1, 2)
    assert [len(g) for g in grids] == [1024, 256]
    assert grids[1][0].tolist() == [1 / 32, 1 / 32]


def test_crop_boxes_vector():
    boxes, layers = generate_crop_boxes((1500, 2250), 1, 512 / 1500)
    # overlap int(512 / 1500 * 1500) = 512; crop w ceil((512 + 2250) / 2) = 1381, h ceil((512 + 1500) / 2) = 1006;
    # second starts at 1381 - 512 = 869 and 1006 - 512 = 494; x outer, y inner
    assert boxes == [[0, 0, 2250, 1500], [0, 0, 1381, 1006], [0, 494, 1381, 1500], [869, 0, 2250, 1006],
                     [869, 494, 2250, 1500]]
    assert layers == [0, 1, 1, 1, 1]


def test_rle_vector():
    mask = np.zeros((5, 7), dtype=bool)
    mask[1:4, 2:6] = True
    mask[0, 0] = True
    # column-major: col 0 = [1, 0, 0, 0, 0]; cols 2..5 = [0, 1, 1, 1, 0]; counts start with a background run
    rle = mask_to_rle(torch.from_numpy(mask)[None])[0]
    assert rle == {"size": [5, 7], "counts": [0, 1, 10, 3, 2, 3, 2, 3, 2, 3, 6]}
    assert rle_area(rle) == 13
    np.testing.assert_array_equal(rle_to_mask(rle), mask)
    # a background first pixel: no leading zero
    assert mask_to_rle(torch.from_numpy(mask[1:])[None])[0]["counts"][:2] == [8, 3]


def test_crop_edge_and_uncrop_vectors():
    boxes = torch.tensor([[0, 0, 100, 100], [600, 600, 700, 700]])
    crop, orig = [500, 500, 1000, 1000], [0, 0, 1000, 1000]
    # in the image frame: [500, 500, 600, 600] touches the crop's top-left (not an image edge);
    # [1100, ...] is far from every crop side
    assert is_box_near_crop_edge(boxes, crop, orig).tolist() == [True, False]
    # a box on a crop side that is also the image side stays
    assert is_box_near_crop_edge(torch.tensor([[0, 0, 10, 10]]), [0, 0, 50, 50], [0, 0, 50, 100]).tolist() == [False]
    assert uncrop_boxes(boxes, crop).tolist() == [[500, 500, 600, 600], [1100, 1100, 1200, 1200]]
    assert uncrop_points(torch.tensor([[1.5, 2.0]], dtype=torch.float64), crop).tolist() == [[501.5, 502.0]]
    masks = torch.ones(1, 2, 3, dtype=torch.bool)
    full = uncrop_masks(masks, [4, 1, 7, 3], 5, 9)
    assert full.shape == (1, 5, 9) and full.sum() == 6 and full[0, 1:3, 4:7].all()
    assert uncrop_masks(masks, [0, 0, 3, 2], 2, 3) is masks


# -- the pure functions against segment-anything's ------------------------------------------------------------
@pytest.mark.parametrize("size, layers, ratio", [((97, 130), 2, 512 / 1500), ((480, 360), 3, 0.25), ((50, 50), 1, 0.0)])
def test_crop_boxes_equal_reference(size, layers, ratio):
    assert generate_crop_boxes(size, layers, ratio) == ref_amg.generate_crop_boxes(size, layers, ratio)


def test_point_grids_equal_reference():
    for ours, ref in zip(build_all_layer_point_grids(12, 2, 2), ref_amg.build_all_layer_point_grids(12, 2, 2)):
        np.testing.assert_array_equal(ours, ref)


def random_masks(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Blobby random masks (thresholded upsampled noise) plus an empty and a full one."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.nn.functional.interpolate(torch.randn(n, 1, h // 4 + 1, w // 4 + 1, generator=gen), (h, w),
                                            mode="bilinear")[:, 0]
    masks = noise > 0.3
    masks[0] = False
    masks[1] = True
    return masks


def test_boxes_rle_stability_equal_reference():
    masks = random_masks(6, 23, 31, seed=0)
    assert torch.equal(masks_to_boxes_xyxy(masks), ref_amg.batched_mask_to_box(masks))
    stacked = masks.view(2, 3, 23, 31)
    assert torch.equal(masks_to_boxes_xyxy(stacked), ref_amg.batched_mask_to_box(stacked))
    assert mask_to_rle(masks) == ref_amg.mask_to_rle_pytorch(masks)
    logits = torch.randn(4, 23, 31, generator=torch.Generator().manual_seed(1)) * 2
    for thr, off in [(0.0, 1.0), (0.3, 0.5)]:
        assert torch.equal(stability_score(logits, thr, off), ref_amg.calculate_stability_score(logits, thr, off))
    boxes = torch.tensor([[0, 0, 30, 20], [5, 5, 25, 15], [15, 0, 40, 12]])
    for crop in ([0, 0, 40, 30], [10, 10, 50, 40], [30, 0, 70, 30]):
        assert torch.equal(is_box_near_crop_edge(boxes, crop, [0, 0, 70, 40]),
                           ref_amg.is_box_near_crop_edge(boxes, crop, [0, 0, 70, 40]))


def test_rle_round_trip_and_coco():
    masks = random_masks(8, 37, 29, seed=2)
    for mask, rle in zip(masks.numpy(), mask_to_rle(masks)):
        np.testing.assert_array_equal(rle_to_mask(rle), mask)
        assert rle_area(rle) == mask.sum()
        compressed = coco_rle(mask)
        assert isinstance(compressed["counts"], str) and compressed["size"] == [37, 29]
        assert compressed == coco_rle(rle) == ref_amg.coco_encode_rle(rle)
        decoded = mask_utils.decode({"size": compressed["size"], "counts": compressed["counts"].encode()})
        np.testing.assert_array_equal(decoded.astype(bool), mask)
        for form in (mask, rle, compressed):
            np.testing.assert_array_equal(segmentation_to_mask(form), mask)


# -- small regions against the reference's OpenCV version ------------------------------------------------------
def hand_made_masks() -> dict[str, np.ndarray]:
    m = {}
    a = np.zeros((20, 24), dtype=bool)
    a[2:15, 3:20] = True
    a[5, 6] = a[8:10, 10:12] = False  # holes of 1 and 4 pixels
    a[6:9, 15:18] = False  # a hole of 9 pixels
    a[17, 1] = a[18:20, 20:22] = True  # islands of 1 and 4 pixels
    a[12:14, 19:20] = False
    m["holes_and_islands"] = a
    d = np.zeros((12, 12), dtype=bool)
    d[2, 2] = d[3, 3] = True  # diagonal neighbours: one 8-connected island of 2
    d[6:9, 6:9] = True
    d[7, 7] = False  # a hole whose 8-connected background is 1 pixel
    m["diagonals"] = d
    t = np.zeros((10, 12), dtype=bool)
    # all islands small: the largest stays; of the two of 2 pixels, OpenCV numbers (1, 0)-(1, 1) first (its 2 x 2
    # block comes first), scipy (0, 6)-(0, 7) (its first pixel does)
    t[1, 0:2] = t[0, 6:8] = t[5, 5] = True
    m["tied_small_islands"] = t
    e = np.zeros((9, 14), dtype=bool)
    e[3, 2:5] = e[2, 9:12] = e[7, 0:3] = True  # three of 3 pixels: block rows 1, 1, 3; raster rows 3, 2, 7
    m["tied_block_order"] = e
    full = np.ones((8, 9), dtype=bool)
    full[0, 0] = False  # the only background component is small: holes mode fills it
    m["small_background"] = full
    m["empty"] = np.zeros((5, 6), dtype=bool)
    m["full"] = np.ones((5, 6), dtype=bool)
    return m


@pytest.mark.parametrize("area", [2, 3, 4, 5, 10, 1000])
@pytest.mark.parametrize("mode", ["holes", "islands"])
@pytest.mark.parametrize("name", list(hand_made_masks()))
def test_remove_small_regions_equals_reference(name, mode, area):
    mask = hand_made_masks()[name]
    ours, changed = remove_small_regions(mask, area, mode)
    expected, ref_changed = ref_amg.remove_small_regions(mask, area, mode)
    assert changed == ref_changed
    np.testing.assert_array_equal(ours, expected)


def test_remove_small_regions_random_masks_equal_reference():
    for mask in random_masks(6, 40, 52, seed=3).numpy():
        noisy = mask ^ (np.random.default_rng(4).random(mask.shape) < 0.02)  # pepper holes and islands
        for mode in ("holes", "islands"):
            ours, changed = remove_small_regions(noisy, 12, mode)
            expected, ref_changed = ref_amg.remove_small_regions(noisy, 12, mode)
            assert changed == ref_changed
            np.testing.assert_array_equal(ours, expected)


# -- the generator against SamAutomaticMaskGenerator -----------------------------------------------------------
def scene(height: int, width: int, seed: int) -> np.ndarray:
    """A flat background with discs of random colours: regions that even random weights tell apart."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = rng.integers(0, 256, 3)
    yy, xx = np.mgrid[:height, :width]
    for _ in range(10):
        cy, cx, r = rng.integers(0, height), rng.integers(0, width), rng.integers(6, 25)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
    return image


@pytest.fixture(scope="module")
def pair():
    """segment-anything's nano Sam with random weights and ours with its state. Random transposed-conv kernels
    paint a 2 x 2 checkerboard over every mask, so that every box spans the image; the kernels are made constant
    over their taps to give masks that follow the image's regions, and the hypernetwork output is scaled up so
    that logits sit well away from the threshold."""
    torch.manual_seed(0)
    ref = follow_regions(reference_nano(), logit_scale=10)
    ours = create("sam_vit_nano").eval()
    ours.load_state_dict(official_sam_state({k: v.clone() for k, v in ref.state_dict().items()}, ours))
    return ref, ours


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return scene(150, 200, seed=0)


# A stability offset of 0.05 spreads the random model's stability scores over (0, 1]; the default 1.0 puts them
# all at 0 or 1. The thresholds are lowered so that several masks survive.
BASE = dict(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, stability_score_offset=0.05)
CASES = {
    "full_image_coco": dict(output_mode="coco_rle"),
    "crops_binary": dict(crop_n_layers=1, output_mode="binary_mask"),
    "crops_small_regions_uncompressed": dict(crop_n_layers=1, min_mask_region_area=50, points_per_batch=20,
                                             output_mode="uncompressed_rle"),
    "thresholds_small_regions": dict(stability_score_thresh=0.13, min_mask_region_area=200, output_mode="coco_rle"),
    "iou_threshold": dict(pred_iou_thresh=0.1, output_mode="coco_rle"),
}


def reference_logits(ref, image: np.ndarray, record: dict, mask: np.ndarray) -> np.ndarray:
    """The reference's logits of a record's mask in the image frame: its crop re-embedded, its point re-decoded,
    the one of the three outputs that binarises to the record's mask."""
    x0, y0, w, h = record["crop_box"]
    predictor = SamPredictor(ref)
    predictor.set_image(image[y0:y0 + h, x0:x0 + w])
    point = np.array(record["point_coords"]) - [x0, y0]
    logits, _, _ = predictor.predict(point, np.array([1]), return_logits=True)
    full = np.zeros((len(logits), *image.shape[:2]), dtype=np.float32)
    full[:, y0:y0 + h, x0:x0 + w] = logits
    return full[np.argmin([((f > 0) != mask).sum() for f in full])]


def assert_records_equal(ours: list[dict], expected: list[dict], ref, image: np.ndarray) -> None:
    assert len(ours) == len(expected)
    for got, exp in zip(ours, expected):
        assert got.keys() == exp.keys()
        assert got["bbox"] == exp["bbox"] and got["crop_box"] == exp["crop_box"] and got["area"] == exp["area"]
        assert got["point_coords"] == exp["point_coords"]
        assert got["predicted_iou"] == pytest.approx(exp["predicted_iou"], abs=SCORE_ATOL)
        assert got["stability_score"] == pytest.approx(exp["stability_score"], abs=SCORE_ATOL, nan_ok=True)
        mask, exp_mask = segmentation_to_mask(got["segmentation"]), segmentation_to_mask(exp["segmentation"])
        if isinstance(exp["segmentation"], dict):
            assert type(got["segmentation"]["counts"]) is type(exp["segmentation"]["counts"])
        differ = mask != exp_mask
        if differ.any():  # only where the logit ties with the threshold (float noise of the two models)
            tie = np.abs(reference_logits(ref, image, exp, exp_mask)) < LOGIT_TIE
            assert differ.sum() <= 3 and tie[differ].all(), f"{differ.sum()} mask pixels differ"


@pytest.mark.parametrize("case", list(CASES))
def test_generator_equals_sam_automatic_mask_generator(pair, image, case):
    ref, ours = pair
    kwargs = dict(BASE, **CASES[case])
    expected = SamAutomaticMaskGenerator(ref, **kwargs).generate(image)
    got = AutomaticMaskGenerator(ours, AMGConfig(**kwargs)).generate(image)
    assert len(expected) >= 1
    assert_records_equal(got, expected, ref, image)
    if kwargs.get("crop_n_layers"):
        assert any(r["crop_box"] != [0, 0, 200, 150] for r in expected), "no mask from a crop survived"
    if kwargs["pred_iou_thresh"] or kwargs["stability_score_thresh"]:
        plain = SamAutomaticMaskGenerator(ref, **BASE).generate(image)
        assert len(plain) > len(expected), "the thresholds removed nothing"
    if kwargs.get("min_mask_region_area"):
        plain = AutomaticMaskGenerator(ours, AMGConfig(**dict(kwargs, min_mask_region_area=0))).generate(image)
        assert [r["area"] for r in plain] != [r["area"] for r in got], "the postprocessing changed nothing"


def test_threshold_comparisons(pair, image):
    """Thresholds set exactly at a mask's scores: the stability filter is inclusive (the mask stays, as in the
    reference), the IoU filter strict (the mask goes; checked on our scores alone, since the two models' IoUs may
    differ in the last float32 bit)."""
    ref, ours = pair
    unfiltered = SamAutomaticMaskGenerator(ref, **BASE).generate(image)
    second_best = sorted({r["stability_score"] for r in unfiltered})[-2]
    kwargs = dict(BASE, stability_score_thresh=second_best)
    expected = SamAutomaticMaskGenerator(ref, **kwargs).generate(image)
    assert second_best in [r["stability_score"] for r in expected]
    assert_records_equal(AutomaticMaskGenerator(ours, AMGConfig(**kwargs)).generate(image), expected, ref, image)

    ours_unfiltered = AutomaticMaskGenerator(ours, AMGConfig(**BASE)).generate(image)
    best = max(r["predicted_iou"] for r in ours_unfiltered)
    got = AutomaticMaskGenerator(ours, AMGConfig(**dict(BASE, pred_iou_thresh=best))).generate(image)
    assert best not in [r["predicted_iou"] for r in got]
    assert len(AutomaticMaskGenerator(ours, AMGConfig(**dict(BASE, pred_iou_thresh=best - 1e-6))).generate(image))


def test_generator_accepts_a_predictor_and_shows_progress(pair, image):
    _, ours = pair
    generator = AutomaticMaskGenerator(ImagePredictor(ours), AMGConfig(**BASE, progress=True))
    expected = AutomaticMaskGenerator(ours, AMGConfig(**BASE)).generate(image)
    got = generator.generate(image)
    assert len(got) == len(expected) and all(np.array_equal(a["segmentation"], b["segmentation"])
                                             for a, b in zip(got, expected))


@pytest.mark.parametrize("use_m2m", [False, True])
def test_single_mask_and_m2m_follow_the_predictor(pair, image, use_m2m):
    """Without NMS (threshold 1) and filters every record is one decoder output: with ``multimask_output=False``
    the predictor's single mask per point; with ``use_m2m`` each of the three masks decoded again with its own
    low-res logits as the mask prompt (SAM 2's refinement)."""
    _, ours = pair
    cfg = AMGConfig(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0,
                    multimask_output=use_m2m, use_m2m=use_m2m)
    records = AutomaticMaskGenerator(ours, cfg).generate(image)
    predictor = ImagePredictor(ours)
    predictor.set_image(image)
    expected = []
    for x, y in build_point_grid(2) * [200, 150]:
        point = dict(point_coords=np.array([[x, y]]), point_labels=np.array([1]), return_logits=True)
        if use_m2m:
            _, _, low = predictor.predict(**point)
            outputs = [predictor.predict(**point, mask_input=m[None], multimask_output=False) for m in low]
        else:
            outputs = [predictor.predict(**point, multimask_output=False)]
        expected += [([x, y], float(iou[0]), logits[0]) for logits, iou, _ in outputs]
    assert len(records) == len(expected) == (12 if use_m2m else 4)
    for point, iou, logits in expected:
        same_point = [r for r in records if r["point_coords"] == [point]]
        record = min(same_point, key=lambda r: abs(r["predicted_iou"] - iou))
        assert record["predicted_iou"] == pytest.approx(iou, abs=SCORE_ATOL)
        differ = record["segmentation"] != (logits > 0)
        assert np.all(np.abs(logits[differ]) < LOGIT_TIE), f"{differ.sum()} pixels differ away from the threshold"


def test_config():
    assert AMGConfig().pred_iou_thresh == 0.88 and AMGConfig().mask_threshold is None
    sam2 = AMGConfig.sam2(points_per_side=16)
    assert (sam2.pred_iou_thresh, sam2.mask_threshold, sam2.points_per_side) == (0.8, 0.0, 16)
    with pytest.raises(ValueError, match="output_mode"):
        AMGConfig(output_mode="polygons")


def test_generator_needs_exactly_one_point_source(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="exactly one"):
        AutomaticMaskGenerator(ours, AMGConfig(points_per_side=None))
    with pytest.raises(ValueError, match="exactly one"):
        AutomaticMaskGenerator(ours, AMGConfig(), point_grids=[build_point_grid(2)])
    assert AutomaticMaskGenerator(ours, AMGConfig(points_per_side=None), [build_point_grid(2)]).point_grids[0].shape \
        == (4, 2)


# -- output helpers --------------------------------------------------------------------------------------------
def test_write_coco_results_loads_in_pycocotools(pair, image, tmp_path):
    _, ours = pair
    records = AutomaticMaskGenerator(ours, AMGConfig(**BASE)).generate(image)
    path = tmp_path / "out" / "masks.json"
    write_coco_results(records, image_id=7, path=path)
    gt = COCO()
    gt.dataset = {"images": [{"id": 7, "height": 150, "width": 200}], "annotations": [], "categories": [{"id": 1}]}
    gt.createIndex()
    results = gt.loadRes(str(path))
    anns = results.loadAnns(results.getAnnIds(imgIds=[7]))
    assert len(anns) == len(records)
    for ann, record in zip(anns, records):
        np.testing.assert_array_equal(results.annToMask(ann).astype(bool), record["segmentation"])
        x, y, w, h = record["bbox"]
        assert ann["bbox"] == ([x, y, w + 1, h + 1] if record["area"] else [0, 0, 0, 0])  # pixel extent
        assert ann["score"] == record["predicted_iou"] and ann["category_id"] == 1
    assert json.loads(path.read_text())[0]["segmentation"] == coco_rle(records[0]["segmentation"])
    assert coco_results(records, 7) == json.loads(path.read_text())
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_render_overlay():
    image = np.full((6, 8, 3), 100, dtype=np.uint8)
    mask = np.zeros((6, 8), dtype=bool)
    mask[1:3, 2:5] = True
    records = [{"segmentation": mask, "area": 6}, {"segmentation": mask_to_rle(torch.from_numpy(mask[None]))[0],
                                                   "area": 6}]
    out = render_overlay(image, records, alpha=0.5, seed=1)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[~mask], image[~mask])
    assert (out[mask] != 100).any()
    np.testing.assert_array_equal(render_overlay(image, records, alpha=0.0), image)
    opaque = render_overlay(image, records[:1], alpha=1.0, seed=1)
    assert len(np.unique(opaque[mask], axis=0)) == 1 and not np.array_equal(opaque[mask][0], [100, 100, 100])
