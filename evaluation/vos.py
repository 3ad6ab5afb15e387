"""Video object segmentation metrics: J (region IoU), F (boundary F-measure) and J&F, DAVIS 2017 / SA-V protocols.

Reference behaviour (read, not copied): davisvideochallenge/davis2017-evaluation ``davis2017/metrics.py`` and
``davis2017/evaluation.py``; facebookresearch/sam2 ``sav_dataset/utils/sav_benchmark.py`` (after
hkchengrex/vos-benchmark). Per-frame scores are fractions in [0, 1]; every mean is in percent, as both report.

The two protocols (``evaluate_dataset(protocol=...)``) agree on J, F, the empty-mask conventions and the global
average (over objects, not videos), and both skip the first and last frame of each video: DAVIS semi-supervised
slices ``[:, 1:-1]`` in ``evaluation.py``; SA-V does the same by default. They differ in one place: SA-V scores
an object only from the first evaluated frame in which it appears in the ground truth *or* the prediction
(its evaluator registers object ids as it meets them), whereas DAVIS scores every evaluated frame.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image


def _as_masks(x, name: str, min_ndim: int = 2) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim < min_ndim:
        raise ValueError(f"{name}: expected a mask of at least {min_ndim} dims (..., H, W), got shape {a.shape}")
    return a if a.dtype == bool else a != 0


def _check_pair(gt, pred, where: str) -> tuple[np.ndarray, np.ndarray]:
    g, p = _as_masks(gt, f"{where} gt"), _as_masks(pred, f"{where} pred")
    if g.shape != p.shape:
        raise ValueError(f"{where}: gt {g.shape} and pred {p.shape} must have the same shape (..., H, W); "
                         "resize the prediction to the annotation size first")
    return g, p


def region_similarity(gt, pred) -> float | np.ndarray:
    """J: IoU of two binary masks, 1 when both are empty (DAVIS ``db_eval_iou``, SA-V ``get_iou``).

    (H, W) -> float; (..., H, W) stacks -> array of per-frame J. Nonzero pixels are foreground.
    """
    g, p = _check_pair(gt, pred, "region_similarity")
    inter = (g & p).sum(axis=(-2, -1))
    union = (g | p).sum(axis=(-2, -1))
    j = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return float(j) if g.ndim == 2 else j


def region_similarity_torch(gt: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """J for (..., H, W) tensors on any device, without a host sync; both empty -> 1. Returns float (...)."""
    if gt.shape != pred.shape or gt.ndim < 2:
        raise ValueError(f"region_similarity_torch: gt {tuple(gt.shape)} and pred {tuple(pred.shape)} must "
                         "have the same shape (..., H, W)")
    g, p = gt.bool(), pred.bool()
    inter = (g & p).flatten(-2).sum(-1)
    union = (g | p).flatten(-2).sum(-1)
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones((), device=gt.device))


PROMPT_AGREEMENT_WARNING = 0.8
"""Above this :func:`mean_pairwise_iou` between a model's answers to different prompts, the answers are reported as
hardly depending on the prompt (a choice)."""


def mean_pairwise_iou(masks: torch.Tensor) -> torch.Tensor:
    """The mean IoU over every pair of P >= 2 (P, H, W) masks, a 0-d float tensor on their device (two empty masks:
    1, as :func:`region_similarity_torch`). For the answers of a promptable model to different prompts on one image
    it measures how little the answer depends on the prompt: masks of distinct objects score near 0, a model that
    answers every prompt with the same mask scores 1."""
    if masks.ndim != 3 or masks.shape[0] < 2:
        raise ValueError(f"mean_pairwise_iou needs (P, H, W) masks with P >= 2; got {tuple(masks.shape)}")
    flat = masks.bool().flatten(1).float()
    inter = flat @ flat.T
    area = flat.sum(1)
    union = area[:, None] + area[None] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones((), device=masks.device))
    pairs = torch.triu_indices(len(flat), len(flat), 1, device=masks.device)
    return iou[pairs[0], pairs[1]].mean()


def disk(radius: float) -> np.ndarray:
    """Boolean disk footprint {(x, y) : x^2 + y^2 <= radius^2} on the integer grid |x|, |y| <= floor(radius).

    Same as ``skimage.morphology.disk`` for integer radii (the only ones the 0.008 tolerance produces); for a
    non-integer radius skimage samples a half-integer grid, this keeps the integer grid.
    """
    if radius < 0:
        raise ValueError(f"disk: radius must be >= 0, got {radius}")
    r = int(np.floor(radius))
    off = np.arange(-r, r + 1)
    return off[:, None] ** 2 + off[None, :] ** 2 <= radius**2


def boundary_radius(height: int, width: int, bound_th: float = 0.008) -> float:
    """Match tolerance in pixels: ``bound_th`` itself when >= 1, else ceil(bound_th * ||(H, W)||).

    davis2017-evaluation ``f_measure``; 480x854 frames give ceil(7.84) = 8.
    """
    if bound_th <= 0:
        raise ValueError(f"bound_th must be > 0 (a fraction of the diagonal, or pixels if >= 1), got {bound_th}")
    return float(bound_th) if bound_th >= 1 else float(np.ceil(bound_th * np.linalg.norm((height, width))))


def seg_to_boundary(mask) -> np.ndarray:
    """One-pixel boundary map of a binary mask, as DAVIS ``_seg2bmap`` draws it (no resize branch).

    A pixel is on the boundary when it differs from its east, south or south-east neighbour, counting only
    neighbours inside the frame; the boundary therefore sits half a pixel up-left of the true contour, and a
    mask side lying on the right or bottom image edge draws no boundary there (a full-frame mask has none).
    (H, W) or (..., H, W) -> bool of the same shape. The width/height resize arguments of ``_seg2bmap`` are not
    supported: DAVIS and SA-V always call it at the mask's own size.
    """
    s = _as_masks(mask, "seg_to_boundary")
    b = np.zeros_like(s)
    b[..., :, :-1] |= s[..., :, :-1] ^ s[..., :, 1:]
    b[..., :-1, :] |= s[..., :-1, :] ^ s[..., 1:, :]
    b[..., :-1, :-1] |= s[..., :-1, :-1] ^ s[..., 1:, 1:]
    return b


def _dilate(b: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Binary dilation of (..., H, W) by a symmetric row-convex footprint (a disk), zeros outside the frame.

    The disk is a stack of horizontal segments, so the dilation is an OR of row-shifted 1-D dilations, each a
    window sum from one cumulative sum: O(pixels x rows) instead of O(pixels x area) (same output as
    ``cv2.dilate`` / ``scipy.ndimage.binary_dilation``, checked in the tests).
    """
    r = footprint.shape[0] // 2
    h, w = b.shape[-2:]
    half = footprint.sum(axis=1) // 2  # half-width of each footprint row
    cs = np.zeros(b.shape[:-1] + (w + 2 * r + 1,), np.int32)  # zero-padded by r on both sides
    np.cumsum(b, axis=-1, dtype=np.int32, out=cs[..., r + 1:w + r + 1])
    cs[..., w + r + 1:] = cs[..., w + r:w + r + 1]
    rows: dict[int, np.ndarray] = {}
    out = np.zeros_like(b)
    for i, hw in enumerate(half.tolist()):
        dy = i - r
        if abs(dy) >= h:  # the shifted row falls outside the frame
            continue
        if hw not in rows:
            rows[hw] = cs[..., r + hw + 1:r + hw + 1 + w] > cs[..., r - hw:r - hw + w]
        if dy >= 0:
            out[..., :h - dy, :] |= rows[hw][..., dy:, :]
        else:
            out[..., -dy:, :] |= rows[hw][..., :h + dy, :]
    return out


def boundary_precision_recall(gt, pred, bound_th: float = 0.008
                              ) -> tuple[float | np.ndarray, float | np.ndarray]:
    """Boundary precision and recall of ``pred`` against ``gt`` (davis2017-evaluation ``f_measure``).

    Boundaries from ``seg_to_boundary``; a predicted boundary pixel is matched when a ground-truth boundary
    pixel lies within ``boundary_radius`` (disk), and vice versa. Precision = matched pred / pred boundary,
    recall = matched gt / gt boundary; an empty boundary scores 1 on its own side, which gives the DAVIS table
    (pred empty: P=1, R=0; gt empty: P=0, R=1; both: P=R=1). (H, W) -> floats; (..., H, W) -> arrays.
    """
    g, p = _check_pair(gt, pred, "boundary_precision_recall")
    fp = disk(boundary_radius(*g.shape[-2:], bound_th))
    gb, pb = seg_to_boundary(g), seg_to_boundary(p)
    n_g, n_p = gb.sum(axis=(-2, -1)), pb.sum(axis=(-2, -1))
    hit_p = (pb & _dilate(gb, fp)).sum(axis=(-2, -1))
    hit_g = (gb & _dilate(pb, fp)).sum(axis=(-2, -1))
    precision = np.where(n_p > 0, hit_p / np.maximum(n_p, 1), 1.0)
    recall = np.where(n_g > 0, hit_g / np.maximum(n_g, 1), 1.0)
    if g.ndim == 2:
        return float(precision), float(recall)
    return precision, recall


def boundary_f_measure(gt, pred, bound_th: float = 0.008) -> float | np.ndarray:
    """F: 2PR / (P + R) of ``boundary_precision_recall``, 0 when P + R = 0. (H, W) -> float; stacks -> array."""
    precision, recall = boundary_precision_recall(gt, pred, bound_th)
    denom = np.asarray(precision + recall, dtype=float)
    f = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1.0), 0.0)
    return float(f) if f.ndim == 0 else f


@dataclass
class VideoScores:
    """Per-object, per-frame J and F of one video."""

    j: dict[Hashable, np.ndarray]
    """Per scored object: J of each scored frame, in [0, 1]."""
    f: dict[Hashable, np.ndarray]
    """Per scored object: F of each scored frame, in [0, 1]."""
    frames: dict[Hashable, np.ndarray]
    """Per scored object: indices into the input T axis of the frames that were scored."""

    @property
    def j_mean(self) -> dict[Hashable, float]:
        """Per object: mean J over its scored frames, in percent."""
        return {k: 100.0 * float(v.mean()) for k, v in self.j.items()}

    @property
    def f_mean(self) -> dict[Hashable, float]:
        """Per object: mean F over its scored frames, in percent."""
        return {k: 100.0 * float(v.mean()) for k, v in self.f.items()}

    @property
    def jf_mean(self) -> dict[Hashable, float]:
        """Per object: (J + F) / 2 in percent."""
        jm, fm = self.j_mean, self.f_mean
        return {k: (jm[k] + fm[k]) / 2 for k in jm}

    @property
    def jf(self) -> float:
        """Video J&F in percent: mean over its objects (NaN if no object was scored)."""
        v = list(self.jf_mean.values())
        return float(np.mean(v)) if v else float("nan")


def evaluate_video(gt_masks: Mapping[Hashable, np.ndarray], pred_masks: Mapping[Hashable, np.ndarray], *,
                   skip_first_and_last: bool = False, score_from_first_appearance: bool = False,
                   bound_th: float = 0.008) -> VideoScores:
    """J and F of every ground-truth object of one video, frame by frame.

    gt_masks / pred_masks: object id -> (T, H, W) binary masks (nonzero = object). An object whose ground truth
    is empty on every evaluated frame is ignored; prediction-only ids are ignored; a ground-truth object that
    the prediction lacks is scored against an empty mask.
    skip_first_and_last: drop frames 0 and T-1 (the semi-supervised protocol of DAVIS 2017 and SA-V: frame 0
        carries the given mask).
    score_from_first_appearance: SA-V only: start each object at the first evaluated frame where its ground
        truth or its prediction is non-empty (sav_benchmark ``Evaluator`` meets ids frame by frame).
    """
    shape = None
    for name, masks in (("gt_masks", gt_masks), ("pred_masks", pred_masks)):
        for oid, m in masks.items():
            s = np.shape(m)
            if len(s) != 3 or (shape is not None and s != shape):
                raise ValueError(f"evaluate_video: {name}[{oid!r}] has shape {s}; every object mask of a video "
                                 f"must be (T, H, W) with the same T, H, W (first seen: {shape})")
            shape = s
    if shape is None:
        return VideoScores({}, {}, {})
    t = shape[0]
    if skip_first_and_last and t < 3:
        raise ValueError(f"evaluate_video: skip_first_and_last needs at least 3 frames, got T={t}")
    idx = np.arange(1, t - 1) if skip_first_and_last else np.arange(t)
    scores = VideoScores({}, {}, {})
    for oid, gt in gt_masks.items():
        g = _as_masks(gt, f"gt_masks[{oid!r}]")[idx]
        if not g.any():
            continue
        p = _as_masks(pred_masks[oid], f"pred_masks[{oid!r}]")[idx] if oid in pred_masks else np.zeros_like(g)
        frames = idx
        if score_from_first_appearance:
            first = int(np.argmax(g.any(axis=(1, 2)) | p.any(axis=(1, 2))))
            g, p, frames = g[first:], p[first:], idx[first:]
        scores.j[oid] = np.atleast_1d(region_similarity(g, p))
        scores.f[oid] = np.atleast_1d(boundary_f_measure(g, p, bound_th))
        scores.frames[oid] = frames
    return scores


@dataclass
class DatasetScores:
    """Global J, F and J&F of a dataset (percent), and the per-video scores behind them."""

    j: float
    """Global J: mean over all scored objects of all videos of their mean J over frames (percent)."""
    f: float
    """Global F, averaged like ``j`` (percent)."""
    jf: float
    """(j + f) / 2: the headline J&F (percent)."""
    videos: dict[str, VideoScores]
    """Per-video scores, in input order."""

    @property
    def per_video_jf(self) -> dict[str, float]:
        """Video name -> J&F of that video (mean over its objects), percent."""
        return {name: v.jf for name, v in self.videos.items()}

    @property
    def num_objects(self) -> int:
        return sum(len(v.j) for v in self.videos.values())

    def table(self) -> str:
        """CSV with the global row, then one row per (video, object): ``video,object,J&F,J,F``."""
        lines = ["video,object,J&F,J,F", f"global,,{self.jf:.1f},{self.j:.1f},{self.f:.1f}"]
        for name, v in self.videos.items():
            jm, fm, jfm = v.j_mean, v.f_mean, v.jf_mean
            lines += [f"{name},{oid},{jfm[oid]:.1f},{jm[oid]:.1f},{fm[oid]:.1f}" for oid in jm]
        return "\n".join(lines)


def evaluate_dataset(videos: Mapping[str, tuple[Mapping, Mapping]], *, protocol: Literal["davis", "sav"] = "davis",
                     skip_first_and_last: bool | None = None, bound_th: float = 0.008) -> DatasetScores:
    """J, F and J&F of a dataset: video name -> (gt_masks, pred_masks) as in ``evaluate_video``.

    The global J and F average the per-object means over all objects of all videos (not per video first),
    as davis2017-evaluation ``evaluation.py`` and sav_benchmark ``benchmark`` do. ``videos`` may be a lazy
    mapping (``PngVideoFolders``) so that only one video is in memory at a time.
    protocol: "davis" (DAVIS 2017 semi-supervised) or "sav" (SA-V val/test); see the module docstring.
    skip_first_and_last: None = the protocol's choice (True for both); False for unskipped evaluation.
    """
    if protocol not in ("davis", "sav"):
        raise ValueError(f"evaluate_dataset: protocol must be 'davis' or 'sav', got {protocol!r}")
    skip = True if skip_first_and_last is None else skip_first_and_last
    per_video: dict[str, VideoScores] = {}
    for name, pair in videos.items():
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise ValueError(f"evaluate_dataset: videos[{name!r}] must be a (gt_masks, pred_masks) tuple")
        per_video[name] = evaluate_video(pair[0], pair[1], skip_first_and_last=skip,
                                         score_from_first_appearance=protocol == "sav", bound_th=bound_th)
    js = [x for v in per_video.values() for x in v.j_mean.values()]
    fs = [x for v in per_video.values() for x in v.f_mean.values()]
    if not js:
        raise ValueError("evaluate_dataset: no object to score (empty dataset, or every ground truth is empty "
                         "on the evaluated frames)")
    j, f = float(np.mean(js)), float(np.mean(fs))
    return DatasetScores(j=j, f=f, jf=(j + f) / 2, videos=per_video)


# ---------------------------------------------------------------------------------------------------- PNG I/O

def frame_names(video_dir: str | Path) -> list[str]:
    """Sorted frame stems of a video folder: its PNGs, or those of its first object subfolder (SA-V)."""
    d = Path(video_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"frame_names: {d} is not a directory")
    subdirs = sorted(e for e in d.iterdir() if e.is_dir())
    return sorted(e.stem for e in (subdirs[0] if subdirs else d).glob("*.png"))


def _read_indices(folder: Path, frames: Sequence[str]) -> np.ndarray:
    out = []
    for name in frames:
        path = folder / f"{name}.png"
        if not path.is_file():
            raise FileNotFoundError(f"missing mask {path} (every annotated frame needs a PNG)")
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "1", "I", "I;16"):
                raise ValueError(f"{path}: mode {im.mode}; expected a palette or grayscale PNG whose pixel values "
                                 "are object ids")
            out.append(np.array(im))
        if out[-1].shape != out[0].shape:
            raise ValueError(f"{path}: size {out[-1].shape} differs from {out[0].shape} of the first frame")
    if not out:
        raise FileNotFoundError(f"no frame PNGs in {folder}")
    return np.stack(out)


def load_masks_from_pngs(video_dir: str | Path, frames: Sequence[str] | None = None) -> dict[Hashable, np.ndarray]:
    """Object id -> (T, H, W) bool masks of one video folder.

    DAVIS layout ``<video>/<frame>.png``: palette index = object id (int keys), 0 = background.
    SA-V layout ``<video>/<obj_id>/<frame>.png``: one binary PNG per object and frame (keys = folder names).
    frames: frame stems to read (default: all, sorted); pass the ground truth's to read a prediction.
    """
    d = Path(video_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"load_masks_from_pngs: {d} is not a directory")
    frames = list(frames) if frames is not None else frame_names(d)
    subdirs = sorted(e for e in d.iterdir() if e.is_dir())
    if subdirs:
        return {e.name: _read_indices(e, frames) != 0 for e in subdirs}
    idx = _read_indices(d, frames)
    return {int(i): idx == i for i in np.unique(idx) if i != 0}


class PngVideoFolders(Mapping):
    """Lazy ``evaluate_dataset`` input from ``<gt_root>/<video>`` and ``<pred_root>/<video>`` PNG folders.

    Videos are the ground-truth subfolders (or ``videos``); each prediction is read at the ground truth's frames.
    """

    def __init__(self, gt_root: str | Path, pred_root: str | Path, videos: Sequence[str] | None = None):
        self.gt_root, self.pred_root = Path(gt_root), Path(pred_root)
        self.names = list(videos) if videos is not None else sorted(
            e.name for e in self.gt_root.iterdir() if e.is_dir())

    def __getitem__(self, name: str) -> tuple[dict, dict]:
        if name not in self.names:
            raise KeyError(name)
        pred_dir = self.pred_root / name
        if not pred_dir.is_dir():
            raise FileNotFoundError(f"no prediction folder {pred_dir} for ground-truth video {name!r}")
        frames = frame_names(self.gt_root / name)
        return load_masks_from_pngs(self.gt_root / name, frames), load_masks_from_pngs(pred_dir, frames)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)
