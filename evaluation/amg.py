"""Automatic mask generation: prompt a promptable image model with a grid of points and keep the good masks.

    import models.sam.sam  # registers sam_vit_*
    from evaluation.amg import AMGConfig, AutomaticMaskGenerator, render_overlay, write_coco_results
    generator = AutomaticMaskGenerator(sam.eval(), AMGConfig(output_mode="coco_rle"))
    records = generator.generate(image)                     # HWC uint8 RGB -> list of mask records
    write_coco_results(records, image_id=1, path="masks.json")

Computes what facebookresearch/segment-anything segment_anything/automatic_mask_generator.py:
SamAutomaticMaskGenerator computes (and, with :meth:`AMGConfig.sam2` and the ``use_m2m`` / ``multimask_output``
options, facebookresearch/sam2 sam2/automatic_mask_generator.py:SAM2AutomaticMaskGenerator): per crop of the image
and per batch of grid points, one positive point gives the model's masks; masks are kept when their predicted IoU
is above ``pred_iou_thresh`` and their stability score reaches ``stability_score_thresh``, binarised, boxed, dropped
when their box lies on a crop edge that is not an image edge, and deduplicated by box NMS within each crop (scored
by predicted IoU) and across crops (scored by 1 / crop area, so that masks of smaller crops win). Optionally small
holes and islands are removed and NMS runs once more. The records and their order are the reference's.

The model runs through the predictor protocol of :class:`models.sam.sam.ImagePredictor` (``set_image``,
``predict_torch`` in the model's input frame, ``transform.scale_coords``, ``model.mask_threshold``), so any model
behind that protocol (SAM, SAM 2's image path) works unchanged.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from itertools import product
from typing import Any, Literal

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor
from torchvision.ops import batched_nms, box_area
from tqdm.auto import tqdm

from models.sam.sam import ImagePredictor, PromptableImageModel

__all__ = [
    "AMGConfig", "AutomaticMaskGenerator", "build_point_grid", "build_all_layer_point_grids",
    "generate_crop_boxes", "stability_score", "masks_to_boxes_xyxy", "is_box_near_crop_edge", "uncrop_boxes",
    "uncrop_points", "uncrop_masks", "mask_to_rle", "rle_to_mask", "rle_area", "coco_rle", "segmentation_to_mask",
    "remove_small_regions", "coco_results", "write_coco_results", "write_coco_results_of_images", "render_overlay",
]

OutputMode = Literal["binary_mask", "uncompressed_rle", "coco_rle"]
_OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


# -- configuration ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AMGConfig:
    """Settings of :class:`AutomaticMaskGenerator`; the defaults are SamAutomaticMaskGenerator's."""

    points_per_side: int | None = 32
    """Grid points along each side of the image (points_per_side ** 2 prompts on the full image); None when the
    generator is given explicit ``point_grids``."""
    points_per_batch: int = 64
    """Points decoded at once: bounds memory, since each point's masks are held at the crop's full resolution."""
    pred_iou_thresh: float = 0.88
    """Keep masks whose predicted IoU is strictly above this (0 disables the filter). SAM 2 uses 0.8."""
    stability_score_thresh: float = 0.95
    """Keep masks whose stability score (:func:`stability_score`) is at least this (0 disables the filter)."""
    stability_score_offset: float = 1.0
    """How far the logit cutoff moves up and down for the stability score."""
    mask_threshold: float | None = None
    """Logit above which a pixel is in the mask; None takes the model's own ``mask_threshold`` (0.0 for SAM)."""
    box_nms_thresh: float = 0.7
    """Box IoU above which NMS drops the lower-IoU duplicate within one crop."""
    crop_n_layers: int = 0
    """Extra layers of crops: layer i cuts the image into (2 ** i) ** 2 overlapping crops, each run separately."""
    crop_nms_thresh: float = 0.7
    """Box IoU above which NMS drops a duplicate across crops (the mask from the larger crop goes)."""
    crop_overlap_ratio: float = 512 / 1500
    """Overlap of neighbouring crops as a fraction of the short image side in layer 1, halved per later layer."""
    crop_n_points_downscale_factor: int = 1
    """Points per side in crop layer i are points_per_side / factor ** i."""
    min_mask_region_area: int = 0
    """If > 0, fill holes and remove islands smaller than this many pixels, then run NMS once more."""
    output_mode: OutputMode = "binary_mask"
    """Form of each record's ``segmentation``: an (H, W) bool array, an uncompressed RLE, or a COCO RLE (str)."""
    use_m2m: bool = False
    """SAM 2's one-step refinement: decode each mask again with its own low-res logits as the mask prompt."""
    multimask_output: bool = True
    """Three masks per point (SAM's ambiguity-aware output) instead of one."""
    progress: bool = False
    """Show a tqdm bar over the batches of all crops (useful on large images with crop layers)."""

    def __post_init__(self) -> None:
        if self.output_mode not in _OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {_OUTPUT_MODES}, got {self.output_mode!r}")
        if self.points_per_batch < 1:
            raise ValueError(f"points_per_batch must be >= 1, got {self.points_per_batch}")
        if self.crop_n_layers < 0:
            raise ValueError(f"crop_n_layers must be >= 0, got {self.crop_n_layers}")

    @classmethod
    def sam2(cls, **overrides: Any) -> AMGConfig:
        """SAM2AutomaticMaskGenerator's defaults (pred_iou_thresh 0.8, mask_threshold 0.0), then ``overrides``."""
        return replace(cls(pred_iou_thresh=0.8, mask_threshold=0.0), **overrides)


# -- point grids and crops -------------------------------------------------------------------------------------
def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n * n, 2) points (x, y) in [0, 1], the centres of an n x n grid of equal cells, x varying fastest
    (segment_anything/utils/amg.py:build_point_grid)."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs, ys = np.meshgrid(side, side, indexing="xy")
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
    """One normalised grid per crop layer 0..n_layers, layer i with int(n_per_side / scale_per_layer ** i) points
    per side (segment_anything/utils/amg.py:build_all_layer_point_grids)."""
    return [build_point_grid(int(n_per_side / scale_per_layer**i)) for i in range(n_layers + 1)]


def generate_crop_boxes(im_size: tuple[int, int], n_layers: int,
                        overlap_ratio: float) -> tuple[list[list[int]], list[int]]:
    """Crop boxes [x0, y0, x1, y1] (exclusive ends) of an (H, W) image and the layer of each.

    Layer 0 is the whole image; layer i >= 1 has 2 ** i crops per side overlapping by
    int(overlap_ratio * short_side * 2 / 2 ** i) pixels, each ceil((overlap * (n - 1) + side) / n) long, listed
    column by column (x outer, y inner) (segment_anything/utils/amg.py:generate_crop_boxes).
    """
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    boxes, layers = [[0, 0, im_w, im_h]], [0]
    for layer in range(1, n_layers + 1):
        n = 2**layer
        overlap = int(overlap_ratio * short_side * (2 / n))
        crop_w = int(math.ceil((overlap * (n - 1) + im_w) / n))
        crop_h = int(math.ceil((overlap * (n - 1) + im_h) / n))
        xs = [int((crop_w - overlap) * i) for i in range(n)]
        ys = [int((crop_h - overlap) * i) for i in range(n)]
        for x0, y0 in product(xs, ys):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(layer)
    return boxes, layers


# -- mask statistics -------------------------------------------------------------------------------------------
def stability_score(logits: Tensor, mask_threshold: float = 0.0, offset: float = 1.0) -> Tensor:
    """IoU of a mask's logits cut at threshold + offset and at threshold - offset: (..., H, W) -> float (...).

    The higher cut is contained in the lower one, so the IoU is count(l > t + o) / count(l > t - o), both strict
    (segment_anything/utils/amg.py:calculate_stability_score). A mask with no logit above t - o gives 0 / 0 = NaN,
    as SAM 1 does: it fails any positive ``stability_score_thresh`` and survives a disabled one.
    """
    inter = (logits > mask_threshold + offset).flatten(-2).sum(-1)
    union = (logits > mask_threshold - offset).flatten(-2).sum(-1)
    return inter / union


def masks_to_boxes_xyxy(masks: Tensor) -> Tensor:
    """Tight boxes of binary masks: (..., H, W) -> int64 (..., 4) [x0, y0, x1, y1] with *inclusive* ends (the
    last mask column / row), [0, 0, 0, 0] for an empty mask (segment_anything/utils/amg.py:batched_mask_to_box).
    Unlike torchvision's ``masks_to_boxes`` it takes any leading shape and empty masks."""
    h, w = masks.shape[-2:]
    if masks.numel() == 0:
        return torch.zeros(*masks.shape[:-2], 4, dtype=torch.int64, device=masks.device)
    masks = masks.bool()
    rows, cols = masks.any(-1), masks.any(-2)
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    top = torch.where(rows, ys, h).amin(-1)
    bottom = torch.where(rows, ys, -1).amax(-1)
    left = torch.where(cols, xs, w).amin(-1)
    right = torch.where(cols, xs, -1).amax(-1)
    boxes = torch.stack([left, top, right, bottom], dim=-1)
    return boxes * rows.any(-1, keepdim=True)


def uncrop_boxes(boxes: Tensor, crop_box: Sequence[int]) -> Tensor:
    """Boxes (..., 4) XYXY in a crop's frame -> the image's, shifting by the crop's top-left corner."""
    x0, y0 = crop_box[0], crop_box[1]
    return boxes + torch.tensor([x0, y0, x0, y0], device=boxes.device, dtype=boxes.dtype)


def uncrop_points(points: Tensor, crop_box: Sequence[int]) -> Tensor:
    """Points (..., 2) (x, y) in a crop's frame -> the image's."""
    return points + torch.tensor([crop_box[0], crop_box[1]], device=points.device, dtype=points.dtype)


def uncrop_masks(masks: Tensor, crop_box: Sequence[int], orig_h: int, orig_w: int) -> Tensor:
    """Masks (..., h, w) of a crop -> (..., orig_h, orig_w), zero outside the crop."""
    x0, y0, x1, y1 = crop_box
    if (x0, y0, x1, y1) == (0, 0, orig_w, orig_h):
        return masks
    return F.pad(masks, (x0, orig_w - x1, y0, orig_h - y1), value=0)


def is_box_near_crop_edge(boxes: Tensor, crop_box: Sequence[int], orig_box: Sequence[int],
                          atol: float = 20.0) -> Tensor:
    """Bool (N,): which boxes (N, 4) XYXY in the crop's frame have a side within ``atol`` pixels of a crop side
    that is not also within ``atol`` of the image side (segment_anything/utils/amg.py:is_box_near_crop_edge).
    Such masks are likely cut off by the crop; a larger crop sees them whole."""
    image_boxes = uncrop_boxes(boxes, crop_box).float()
    crop = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    orig = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    near_crop = (image_boxes - crop).abs() <= atol
    near_image = (image_boxes - orig).abs() <= atol
    return (near_crop & ~near_image).any(-1)


# -- run-length encodings --------------------------------------------------------------------------------------
def mask_to_rle(masks: Tensor) -> list[dict[str, Any]]:
    """Binary masks (N, H, W), on any device -> N uncompressed RLEs ``{"size": [H, W], "counts": [...]}``.

    pycocotools' layout: pixels in column-major (Fortran) order, run lengths alternating background / foreground
    and starting with background (a leading 0 when the first pixel is foreground). The change points are found on
    the masks' device and copied to the host once for all N (segment_anything/utils/amg.py:mask_to_rle_pytorch).
    """
    n, h, w = masks.shape
    if n == 0:
        return []
    flat = masks.bool().transpose(1, 2).reshape(n, h * w)
    change = (flat[:, 1:] != flat[:, :-1]).nonzero().cpu().numpy()
    first = flat[:, 0].cpu().numpy()
    bounds = np.searchsorted(change[:, 0], np.arange(n + 1))
    out = []
    for i in range(n):
        edges = np.concatenate([[0], change[bounds[i]:bounds[i + 1], 1] + 1, [h * w]])
        counts = np.diff(edges).tolist()
        out.append({"size": [h, w], "counts": [0] + counts if first[i] else counts})
    return out


def rle_to_mask(rle: Mapping[str, Any]) -> np.ndarray:
    """Uncompressed RLE (:func:`mask_to_rle`) -> (H, W) bool array, C-contiguous."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
    if flat.size != h * w:
        raise ValueError(f"RLE counts sum to {flat.size}, not {h} * {w}")
    return np.ascontiguousarray(flat.reshape(w, h).T)


def rle_area(rle: Mapping[str, Any]) -> int:
    """Foreground pixels of an uncompressed RLE: the sum of its odd (foreground) runs."""
    return int(sum(rle["counts"][1::2]))


def coco_rle(mask_or_rle: np.ndarray | Mapping[str, Any]) -> dict[str, Any]:
    """COCO's compressed RLE ``{"size": [H, W], "counts": str}`` (json-ready) of an (H, W) binary mask (through
    ``pycocotools.mask.encode`` on its Fortran-ordered uint8 copy) or of an uncompressed RLE (through
    ``frPyObjects``, as segment_anything/utils/amg.py:coco_encode_rle; both give the same string)."""
    if isinstance(mask_or_rle, Mapping):
        h, w = mask_or_rle["size"]
        rle = mask_utils.frPyObjects(dict(mask_or_rle), h, w)
    else:
        rle = mask_utils.encode(np.asfortranarray(np.asarray(mask_or_rle, dtype=np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("utf-8")}


def segmentation_to_mask(segmentation: np.ndarray | Mapping[str, Any]) -> np.ndarray:
    """Any record ``segmentation`` (bool array, uncompressed RLE or COCO RLE) -> (H, W) bool array."""
    if not isinstance(segmentation, Mapping):
        return np.asarray(segmentation, dtype=bool)
    if isinstance(segmentation["counts"], list):
        return rle_to_mask(segmentation)
    counts = segmentation["counts"]
    rle = {"size": list(segmentation["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}
    return mask_utils.decode(rle).astype(bool)


# -- small regions ---------------------------------------------------------------------------------------------
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _first_of_largest(labels: np.ndarray, sizes: np.ndarray) -> int:
    """Label of the largest component; among equally large ones the component OpenCV numbers first. OpenCV's
    8-connected labelling scans 2 x 2 blocks in raster order, so its order is that of each component's first block
    (scipy numbers by first pixel in raster order, which can differ)."""
    candidates = np.flatnonzero(sizes == sizes.max()) + 1
    if len(candidates) == 1:
        return int(candidates[0])
    blocks_per_row = (labels.shape[1] + 1) // 2

    def first_block(label: int) -> int:
        rows, cols = np.nonzero(labels == label)
        return int(((rows // 2) * blocks_per_row + cols // 2).min())

    return min(candidates.tolist(), key=first_block)


def remove_small_regions(mask: np.ndarray, area_thresh: float,
                         mode: Literal["holes", "islands"]) -> tuple[np.ndarray, bool]:
    """Fill holes (``"holes"``) or drop islands (``"islands"``) of fewer than ``area_thresh`` pixels in an (H, W)
    mask; returns (mask, changed).

    Components are 8-connected, as segment_anything/utils/amg.py:remove_small_regions labels them with OpenCV
    (here scipy.ndimage.label). In ``"holes"`` mode every background component counts, the one around the mask
    too: it is filled when it is small. In ``"islands"`` mode, when every island is small the largest is kept.
    """
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    mask = np.asarray(mask, dtype=bool)
    holes = mode == "holes"
    working = mask != holes  # the background in "holes" mode, the mask in "islands" mode
    labels, n = ndimage.label(working, structure=_EIGHT_CONNECTED)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    small = np.flatnonzero(sizes < area_thresh) + 1
    if small.size == 0:
        return mask, False
    if holes:
        return mask | np.isin(labels, small), True
    large = np.flatnonzero(sizes >= area_thresh) + 1
    if large.size == 0:
        large = np.array([_first_of_largest(labels, sizes)])
    return np.isin(labels, large), True


# -- the generator ---------------------------------------------------------------------------------------------
@dataclass
class _Masks:
    """Masks that survived so far: RLEs on the host, the rest on the model's device until the records."""

    rles: list[dict[str, Any]]
    boxes: Tensor  # (N, 4) int64 XYXY inclusive, image frame
    iou: Tensor  # (N,) predicted IoU
    stability: Tensor  # (N,)
    point_idx: Tensor  # (N,) int64 row of the generator's point table
    crop_boxes: Tensor  # (N, 4) int64 XYXY exclusive

    def select(self, keep: Tensor) -> _Masks:
        """The masks at the integer indices ``keep``, in that order (one host copy of the indices for the RLEs)."""
        rows = keep.tolist()
        return _Masks([self.rles[i] for i in rows], *(getattr(self, f.name)[keep] for f in fields(self)[1:]))

    @staticmethod
    def cat(parts: Sequence[_Masks]) -> _Masks:
        return _Masks([r for p in parts for r in p.rles],
                      *(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(_Masks)[1:]))

    def to(self, device: torch.device | str) -> _Masks:
        return _Masks(self.rles, *(getattr(self, f.name).to(device) for f in fields(self)[1:]))


def _nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """torchvision's batched_nms with one category, the reference's call (its two internal paths may order score
    ties differently, so plain ``nms`` would not always give the same order)."""
    return batched_nms(boxes.float(), scores, torch.zeros_like(scores), iou_threshold)


class AutomaticMaskGenerator:
    """Masks for a whole image from a grid of point prompts (SamAutomaticMaskGenerator's pipeline and records).

    ``predictor_or_model`` is an :class:`~models.sam.sam.ImagePredictor` (or anything with its protocol) or a model
    that one wraps; put the model in eval mode first. ``point_grids`` replaces the generated grids: one (P, 2)
    array of normalised (x, y) per crop layer.

    Within the batch loop the only host sync is the one that counts the survivors of the filters (their number
    sizes every later tensor); all filters are applied together to make it one. Each crop then syncs for its NMS
    and to copy the run lengths of its kept masks; the boxes and scores leave the device once, at the end. The
    binary masks that pass the filters are held on the device, at the crop's resolution, until the crop's NMS.
    """

    def __init__(self, predictor_or_model: ImagePredictor | PromptableImageModel, cfg: AMGConfig | None = None,
                 point_grids: Sequence[np.ndarray] | None = None) -> None:
        self.cfg = cfg = cfg or AMGConfig()
        is_predictor = hasattr(predictor_or_model, "predict_torch") and hasattr(predictor_or_model, "set_image")
        self.predictor = predictor_or_model if is_predictor else ImagePredictor(predictor_or_model)
        if (cfg.points_per_side is None) == (point_grids is None):
            raise ValueError("give exactly one of cfg.points_per_side and point_grids")
        if point_grids is None:
            point_grids = build_all_layer_point_grids(cfg.points_per_side, cfg.crop_n_layers,
                                                      cfg.crop_n_points_downscale_factor)
        if len(point_grids) < cfg.crop_n_layers + 1:
            raise ValueError(f"{len(point_grids)} point grids for {cfg.crop_n_layers + 1} crop layers")
        self.point_grids = [np.asarray(g, dtype=np.float64) for g in point_grids]

    @property
    def mask_threshold(self) -> float:
        """The logit cut of a mask pixel: the config's, else the model's."""
        t = self.cfg.mask_threshold
        return float(self.predictor.model.mask_threshold if t is None else t)

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Masks of an (H, W, 3) uint8 RGB image -> records, in the reference's order, each with

        ``segmentation`` (per ``output_mode``), ``area`` (pixels), ``bbox`` ([x, y, w, h] from the inclusive box,
        so w = x1 - x0 as SAM writes it, one less than the pixel extent COCO's toBbox gives), ``predicted_iou``,
        ``point_coords`` ([[x, y]] in image pixels), ``stability_score``, ``crop_box`` ([x, y, w, h]).
        """
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"generate takes an (H, W, 3) image, got shape {image.shape}")
        masks, points = self._generate_masks(image)
        if self.cfg.min_mask_region_area > 0:
            masks = self._remove_small_regions(masks)
        return self._records(masks, points)

    def _generate_masks(self, image: np.ndarray) -> tuple[_Masks, np.ndarray]:
        """All crops, then NMS across crops; returns the masks on the host and the point table (P, 2) float64."""
        cfg, orig_size = self.cfg, tuple(image.shape[:2])
        crop_boxes, layers = generate_crop_boxes(orig_size, cfg.crop_n_layers, cfg.crop_overlap_ratio)
        n_batches = sum(math.ceil(len(self.point_grids[layer]) / cfg.points_per_batch) for layer in layers)
        parts, tables = [], []
        with tqdm(total=n_batches, disable=not cfg.progress, desc="masks", unit="batch") as bar:
            for crop_box, layer in zip(crop_boxes, layers):
                first = sum(len(t) for t in tables)
                part, table = self._process_crop(image, crop_box, layer, orig_size, first, bar)
                parts.append(part)
                tables.append(table)
        masks = _Masks.cat(parts)
        if len(crop_boxes) > 1:
            masks = masks.select(_nms(masks.boxes, 1 / box_area(masks.crop_boxes), cfg.crop_nms_thresh))
        return masks.to("cpu"), np.concatenate(tables)

    def _process_crop(self, image: np.ndarray, crop_box: list[int], layer: int, orig_size: tuple[int, int],
                      first: int, bar: tqdm) -> tuple[_Masks, np.ndarray]:
        """One crop: embed it, decode its grid in batches, NMS by predicted IoU, RLEs of the kept masks in the
        image frame. Returns the masks and the crop's grid points in image pixels (float64, the reference's)."""
        cfg = self.cfg
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1]
        crop_size = tuple(crop.shape[:2])
        self.predictor.set_image(crop)
        points = self.point_grids[layer] * np.array([[crop_size[1], crop_size[0]]])
        device = self.predictor.device
        coords = self.predictor.transform.scale_coords(points, crop_size).to(device)
        batches = []
        for start in range(0, len(points), cfg.points_per_batch):
            batch = coords[start:start + cfg.points_per_batch]
            batches.append(self._process_batch(batch, first + start, crop_box, orig_size))
            bar.update(1)
        self.predictor.reset_image()
        binary, boxes, iou, stability, point_idx = (torch.cat(t) for t in zip(*batches))
        keep = _nms(boxes, iou, cfg.box_nms_thresh)
        rles = []
        for chunk in keep.split(cfg.points_per_batch):
            rles += mask_to_rle(uncrop_masks(binary[chunk], crop_box, *orig_size))
        crop_t = torch.tensor(crop_box, dtype=torch.int64, device=device).expand(len(keep), 4)
        part = _Masks(rles, uncrop_boxes(boxes[keep], crop_box), iou[keep], stability[keep], point_idx[keep], crop_t)
        return part, points + np.array([[x0, y0]])

    def _process_batch(self, coords: Tensor, first: int, crop_box: list[int],
                       orig_size: tuple[int, int]) -> tuple[Tensor, ...]:
        """Decode one batch of points (input-frame coordinates) and filter its masks -> (binary masks at crop
        resolution, boxes in the crop frame, predicted IoU, stability score, point index) of the survivors."""
        cfg, threshold = self.cfg, self.mask_threshold
        n = coords.shape[0]
        labels = torch.ones(n, 1, dtype=torch.int, device=coords.device)
        logits, iou, low_res = self.predictor.predict_torch(
            coords[:, None], labels, multimask_output=cfg.multimask_output, return_logits=True)
        per_point = logits.shape[1]
        point_idx = (first + torch.arange(n, device=coords.device)).repeat_interleave(per_point)
        logits, iou = logits.flatten(0, 1), iou.flatten(0, 1)
        if cfg.use_m2m:
            logits, iou = self._refine(coords.repeat_interleave(per_point, 0), low_res.flatten(0, 1))
        keep = torch.ones_like(iou, dtype=torch.bool)
        if cfg.pred_iou_thresh > 0.0:
            keep &= iou > cfg.pred_iou_thresh
        stability = stability_score(logits, threshold, cfg.stability_score_offset)
        if cfg.stability_score_thresh > 0.0:
            keep &= stability >= cfg.stability_score_thresh
        binary = logits > threshold
        boxes = masks_to_boxes_xyxy(binary)
        keep &= ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_size[1], orig_size[0]])
        rows = keep.nonzero().squeeze(1)  # the batch's one host sync: how many masks survive
        return binary[rows], boxes[rows], iou[rows], stability[rows], point_idx[rows]

    def _refine(self, coords: Tensor, low_res: Tensor) -> tuple[Tensor, Tensor]:
        """SAM 2's mask-to-mask step (sam2/automatic_mask_generator.py:refine_with_m2m): each mask decoded again
        from its point and its own low-res logits, one output per prompt, in chunks of points_per_batch."""
        labels = torch.ones(coords.shape[0], 1, dtype=torch.int, device=coords.device)
        logits, ious = [], []
        for rows in torch.arange(coords.shape[0], device=coords.device).split(self.cfg.points_per_batch):
            masks, iou, _ = self.predictor.predict_torch(coords[rows][:, None], labels[rows],
                                                         mask_input=low_res[rows][:, None], multimask_output=False,
                                                         return_logits=True)
            logits.append(masks[:, 0])
            ious.append(iou[:, 0])
        return torch.cat(logits), torch.cat(ious)

    def _remove_small_regions(self, masks: _Masks) -> _Masks:
        """Fill small holes, drop small islands, then NMS at max(box, crop) threshold preferring unchanged masks
        (score 1) over changed ones (score 0); kept changed masks get a new RLE and box
        (segment_anything/automatic_mask_generator.py:SamAutomaticMaskGenerator.postprocess_small_regions)."""
        if not masks.rles:
            return masks
        area = self.cfg.min_mask_region_area
        changed, boxes, scores = {}, [], []
        for i, rle in enumerate(masks.rles):
            mask, filled = remove_small_regions(rle_to_mask(rle), area, "holes")
            mask, dropped = remove_small_regions(mask, area, "islands")
            if filled or dropped:
                changed[i] = mask
            boxes.append(masks_to_boxes_xyxy(torch.from_numpy(mask)))
            scores.append(0.0 if filled or dropped else 1.0)
        boxes = torch.stack(boxes)
        keep = _nms(boxes, torch.tensor(scores), max(self.cfg.box_nms_thresh, self.cfg.crop_nms_thresh))
        rles, new_boxes = list(masks.rles), masks.boxes.clone()
        for i in keep.tolist():
            if i in changed:
                rles[i] = mask_to_rle(torch.from_numpy(changed[i])[None])[0]
                new_boxes[i] = boxes[i]
        return replace(masks, rles=rles, boxes=new_boxes).select(keep)

    def _records(self, masks: _Masks, points: np.ndarray) -> list[dict[str, Any]]:
        """The host-side masks -> the reference's record dicts, segmentations per ``output_mode``."""
        mode = self.cfg.output_mode
        boxes, crops = masks.boxes.tolist(), masks.crop_boxes.tolist()
        ious, stabilities = masks.iou.tolist(), masks.stability.tolist()
        point_rows = points[masks.point_idx.numpy()].tolist()
        records = []
        for i, rle in enumerate(masks.rles):
            if mode == "coco_rle":
                segmentation = coco_rle(rle)
            elif mode == "binary_mask":
                segmentation = rle_to_mask(rle)
            else:
                segmentation = rle
            (bx0, by0, bx1, by1), (cx0, cy0, cx1, cy1) = boxes[i], crops[i]
            records.append({
                "segmentation": segmentation, "area": rle_area(rle), "bbox": [bx0, by0, bx1 - bx0, by1 - by0],
                "predicted_iou": ious[i], "point_coords": [point_rows[i]], "stability_score": stabilities[i],
                "crop_box": [cx0, cy0, cx1 - cx0, cy1 - cy0],
            })
        return records


# -- output ----------------------------------------------------------------------------------------------------
def coco_results(records: Sequence[Mapping[str, Any]], image_id: int, category_id: int = 1) -> list[dict[str, Any]]:
    """Records -> COCO result entries ``{image_id, category_id, segmentation (COCO RLE), bbox, area, score}``.

    ``bbox`` is COCO's [x, y, w, h] of the mask (pycocotools' toBbox: w is the pixel extent, unlike the record's
    SAM-style bbox), ``score`` the predicted IoU; ``stability_score`` and ``point_coords`` ride along.
    """
    out = []
    for rec in records:
        seg = rec["segmentation"]
        if not (isinstance(seg, Mapping) and isinstance(seg["counts"], str)):
            seg = coco_rle(seg) if isinstance(seg, Mapping) else coco_rle(np.asarray(seg, dtype=bool))
        bbox = mask_utils.toBbox({"size": seg["size"], "counts": seg["counts"].encode()}).tolist()
        out.append({"image_id": image_id, "category_id": category_id, "segmentation": seg, "bbox": bbox,
                    "area": int(rec["area"]), "score": float(rec["predicted_iou"]),
                    "stability_score": float(rec["stability_score"]), "point_coords": rec["point_coords"]})
    return out


def write_coco_results(records: Sequence[Mapping[str, Any]], image_id: int, path: str | os.PathLike,
                       category_id: int = 1) -> None:
    """Write :func:`coco_results` of one image as a COCO results json (:func:`write_coco_results_of_images`)."""
    write_coco_results_of_images([(image_id, records)], path, category_id)


def write_coco_results_of_images(images: Iterable[tuple[int, Sequence[Mapping[str, Any]]]],
                                 path: str | os.PathLike, category_id: int = 1) -> int:
    """Write :func:`coco_results` of every ``(image_id, records)`` pair as one COCO results json (loadable by
    ``COCO.loadRes``) and return how many entries it holds. The pairs are taken one at a time, so a generator
    that segments each image as it is asked for keeps only one image's records in memory. The file is written
    through a temporary file and a rename, so that a reader never sees half a file, nor one of a run that
    failed part-way."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".amg-", suffix=".json")
    count = 0
    try:
        with os.fdopen(fd, "w") as f:
            f.write("[")  # json.dump's own list layout, entry by entry
            for image_id, records in images:
                for entry in coco_results(records, image_id, category_id):
                    f.write(", " if count else "")
                    json.dump(entry, f)
                    count += 1
            f.write("]")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return count


def render_overlay(image: np.ndarray, records: Sequence[Mapping[str, Any]], alpha: float = 0.5,
                   seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 image with every record's mask blended in a random colour: largest first, so that small
    masks stay visible on top (as segment-anything's notebooks draw them). Deterministic for a given seed."""
    out = image.astype(np.float32).copy()
    colours = np.random.default_rng(seed).integers(0, 256, (len(records), 3)).astype(np.float32)
    order = sorted(range(len(records)), key=lambda i: -records[i]["area"])
    for colour, i in zip(colours, order):
        mask = segmentation_to_mask(records[i]["segmentation"])
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
