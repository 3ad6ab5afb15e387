"""COCO Boundary AP (Cheng et al., CVPR 2021) on top of the installed pycocotools.

Follows bowenc0221/boundary-iou-api coco_instance_api/cocoeval.py (``iouType="boundary"``): every ground truth
and detection gets a boundary band (``mask_to_boundary`` at its image's canvas, ``dilation_ratio`` 0.02 by
default), and the IoU that COCOeval matches on is min(mask IoU, boundary IoU) for non-crowd ground truth.
Crowd ground truth keeps pycocotools' crowd mask IoU |D ∩ G| / |D|. Matching, accumulation and the 12 summary
numbers are pycocotools' own, unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import pycocotools.mask as mask_utils
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from evaluation.boundary import boundary_width, mask_to_boundary

__all__ = ["BoundaryCOCOeval", "boundary_ap", "STAT_NAMES"]

# The order of COCOeval.stats after summarize() (pycocotools cocoeval.py _summarizeDets).
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

# Masks decoded and eroded at once per image; bounds memory on images with many large detections.
_CHUNK = 64


class BoundaryCOCOeval(COCOeval):
    """COCOeval whose IoU is min(mask IoU, boundary IoU) for non-crowd ground truth (Boundary AP).

    Use it like COCOeval: ``E = BoundaryCOCOeval(coco_gt, coco_dt); E.evaluate(); E.accumulate();
    E.summarize(); E.stats``. ``params.iouType`` stays ``"segm"`` internally so that pycocotools' own
    ``_prepare`` (polygons -> RLE), ``evaluate`` and ``summarize`` take their mask paths; the boundary semantics
    live in ``computeIoU``. After ``evaluate()``, ``self.ious`` holds the combined IoUs (detections sorted by
    score, as pycocotools does), ``self.mask_ious`` the plain mask IoUs and ``self.boundary_ious`` the boundary
    IoUs (NaN in crowd columns, where they are not used), keyed by (image id, category id).
    """

    iou_type = "boundary"

    def __init__(self, cocoGt: COCO | None = None, cocoDt: COCO | None = None, iouType: str = "boundary",
                 dilation_ratio: float = 0.02) -> None:
        if iouType != "boundary":
            raise ValueError(f"BoundaryCOCOeval: iouType={iouType!r}; only 'boundary' is supported here, use "
                             "pycocotools.cocoeval.COCOeval for 'segm' or 'bbox'")
        boundary_width(1, 1, dilation_ratio)  # validate now
        super().__init__(cocoGt, cocoDt, iouType="segm")
        self.dilation_ratio = dilation_ratio
        # RLE boundary per annotation, keyed by ("gt" | "dt", annotation id); kept across evaluate() calls.
        self._boundaries: dict[tuple[str, int], dict] = {}
        self.mask_ious: dict = {}
        self.boundary_ious: dict = {}

    def _prepare(self) -> None:
        super()._prepare()  # segmentations are RLEs from here on
        for kind, groups in (("gt", self._gts), ("dt", self._dts)):
            self._add_boundaries(kind, [ann for anns in groups.values() for ann in anns])

    def _add_boundaries(self, kind: str, anns: Sequence[dict]) -> None:
        by_canvas: dict[tuple, list[dict]] = defaultdict(list)
        for ann in anns:
            # crowd ground truth keeps the mask IoU, so it needs no boundary
            if (kind, ann["id"]) not in self._boundaries and not (kind == "gt" and ann.get("iscrowd", 0)):
                h, w = ann["segmentation"]["size"]
                by_canvas[ann["image_id"], int(h), int(w)].append(ann)
        for group in by_canvas.values():
            for start in range(0, len(group), _CHUNK):
                chunk = group[start:start + _CHUNK]
                masks = mask_utils.decode([ann["segmentation"] for ann in chunk])  # (H, W, N), Fortran order
                # (N, W, H) is a C-contiguous view of that memory. Erosion by a square and d = f(h^2 + w^2) are
                # symmetric in H and W, so the boundary of the transposed masks is the transposed boundary; the
                # result transposes back to an (H, W, N) Fortran array, which is what RLE encoding wants.
                bands = mask_to_boundary(torch.from_numpy(masks.transpose(2, 1, 0)), self.dilation_ratio)
                rles = mask_utils.encode(np.asfortranarray(bands.numpy().transpose(2, 1, 0)))
                for ann, rle in zip(chunk, rles):
                    self._boundaries[kind, ann["id"]] = rle

    def computeIoU(self, imgId, catId):
        mask_ious = super().computeIoU(imgId, catId)
        gt, dt = self._gt_dt(imgId, catId)
        self.mask_ious[imgId, catId] = mask_ious
        if len(gt) == 0 or len(dt) == 0:  # pycocotools returns [] then; nothing to combine
            self.boundary_ious[imgId, catId] = mask_ious
            return mask_ious
        ious = np.array(mask_ious, dtype=np.float64)
        bious = np.full_like(ious, np.nan)
        cols = [j for j, g in enumerate(gt) if not g["iscrowd"]]
        if cols:
            # boundary-iou-api cocoeval.py computeBoundaryIoU: min(mask, boundary) for non-crowd ground truth.
            bious[:, cols] = mask_utils.iou([self._boundaries["dt", d["id"]] for d in dt],
                                            [self._boundaries["gt", gt[j]["id"]] for j in cols], [0] * len(cols))
            ious[:, cols] = np.minimum(ious[:, cols], bious[:, cols])
        self.boundary_ious[imgId, catId] = bious
        return ious

    def _gt_dt(self, imgId, catId) -> tuple[list[dict], list[dict]]:
        """The ground truths and detections in the order COCOeval.computeIoU uses (rows = detections by
        descending score, mergesort, at most maxDets[-1]; columns = ground truths as stored)."""
        p = self.params
        if p.useCats:
            gt, dt = self._gts[imgId, catId], self._dts[imgId, catId]
        else:
            gt = [g for c in p.catIds for g in self._gts[imgId, c]]
            dt = [d for c in p.catIds for d in self._dts[imgId, c]]
        order = np.argsort([-d["score"] for d in dt], kind="mergesort")
        return gt, [dt[i] for i in order][: p.maxDets[-1]]


def _load_gt(coco_gt) -> COCO:
    if isinstance(coco_gt, COCO):
        return coco_gt
    if isinstance(coco_gt, (str, os.PathLike)):
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(os.fspath(coco_gt))
    raise TypeError(f"boundary_ap: coco_gt is {type(coco_gt).__name__}; pass a pycocotools COCO or the path of "
                    "a COCO instances json")


def _load_dt(coco_gt: COCO, detections) -> COCO:
    if isinstance(detections, COCO):
        return detections
    if isinstance(detections, (str, os.PathLike)):
        with open(detections) as f:
            detections = json.load(f)
    if not isinstance(detections, list):
        raise TypeError(f"boundary_ap: detections is {type(detections).__name__}; pass a list of result dicts "
                        "(image_id, category_id, segmentation as RLE, score), a path to such a json, or a COCO")
    dets = copy.deepcopy(detections)  # loadRes and _prepare write into the dicts
    for i, det in enumerate(dets):
        missing = {"image_id", "category_id", "segmentation", "score"} - det.keys()
        if missing:
            raise ValueError(f"boundary_ap: detection {i} lacks {sorted(missing)}; every result needs image_id, "
                             "category_id, segmentation (RLE) and score")
        # loadRes takes a result's area from its bbox whenever a bbox is present; segm evaluation wants the
        # mask area (detectron2 evaluation/coco_evaluation.py drops the bbox for segm for the same reason).
        det.pop("bbox", None)
    with contextlib.redirect_stdout(io.StringIO()):
        if dets:
            return coco_gt.loadRes(dets)
        empty = COCO()  # loadRes cannot take an empty list; no detections scores AP 0 where there is ground truth
        empty.dataset = {"images": list(coco_gt.dataset["images"]),
                         "categories": copy.deepcopy(coco_gt.dataset["categories"]), "annotations": []}
        empty.createIndex()
        return empty


def _run(evaluator: COCOeval, verbose: bool) -> np.ndarray:
    out = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with out:
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def boundary_ap(coco_gt: COCO | str | os.PathLike, detections: list[dict] | str | os.PathLike | COCO,
                dilation_ratio: float = 0.02, *, include_segm: bool = True,
                verbose: bool = False) -> dict[str, float]:
    """COCO Boundary AP: the 12 standard numbers by name (``STAT_NAMES``: AP, AP50, ..., ARl).

    With ``include_segm`` the plain mask AP of the same detections is added as ``segm_AP``, ``segm_AP50``, ...
    (it costs one more mask-IoU pass, no boundaries). Numbers follow pycocotools, including -1 for an area
    range without ground truth. ``detections`` are COCO results with RLE segmentations; a ``bbox`` in them is
    ignored so that areas come from the masks. ``verbose`` prints pycocotools' tables.
    """
    gt = _load_gt(coco_gt)
    dt = _load_dt(gt, detections)
    stats = _run(BoundaryCOCOeval(gt, dt, dilation_ratio=dilation_ratio), verbose)
    result = {name: float(v) for name, v in zip(STAT_NAMES, stats)}
    if include_segm:
        segm = _run(COCOeval(gt, dt, iouType="segm"), verbose)
        result.update({f"segm_{name}": float(v) for name, v in zip(STAT_NAMES, segm)})
    return result
