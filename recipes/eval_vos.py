"""Semi-supervised VOS with a SAM 2 checkpoint as facebookresearch/sam2 tools/vos_inference.py runs it: J&F per video.

    python -m recipes.eval_vos --init_from sam2.1_hiera_tiny.pt --videos JPEGImages/480p --annotations Annotations/480p
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from datamodules.shards import expand_shards
from datamodules.streams import ShardReader
from datamodules.video_segmentation import VideoSegmentationDataConfig, check_video_shards, frame_pairs
from evaluation.vos import DatasetScores, evaluate_video, frame_names, load_masks_from_pngs
from models.sam.sam2 import SAM2
from models.sam.video_predictor import jpeg_frame_paths, save_vos_pngs, segment_video
from recipes.cli import run_command
from trainers.eval_model import load_sam_model
from trainers.run import compute_begins


@dataclass
class Config:
    init_from: str
    """An official sam2*.pt file, or a Prism run dir, .ckpt, DeepSpeed dir or .safetensors export of a SAM 2 model."""
    model: str | None = None
    """Registered SAM 2 name; None: the run's config.yaml model.name, or an official file's name."""
    data: VideoSegmentationDataConfig = field(default_factory=VideoSegmentationDataConfig)
    """Validation video shards (--data.val_shards); with neither them nor --videos: the synthetic world's."""
    videos: str | None = None
    """Instead of shards: a folder with a folder of JPEG frames per video (DAVIS JPEGImages/480p) and ..."""
    annotations: str | None = None
    """... a folder of their annotation folders: palette PNGs (DAVIS) or a folder per object (SA-V, --protocol sav)."""
    protocol: Literal["davis", "sav"] = "davis"
    """davis: a palette PNG per frame, objects kept apart; sav: a PNG per object and frame (evaluation.vos)."""
    output: str = "runs/eval_vos"
    """Where masks/<video>/, jf.csv and jf.json go; shard videos are unpacked to JPEGImages/, Annotations/ there."""
    track_later_objects: bool = False
    """Also track objects that first appear after frame 0, each from its first mask (YouTube-VOS, LVOS)."""
    video_list: str | None = None
    """A text file of the videos to evaluate, a name a line (DAVIS ImageSets/2017/val.txt); None: every video."""


def unpack_shards(spec: str, root: Path):
    reader = ShardReader(required_keys=(), max_corrupt_fraction=0.0, min_samples_for_corrupt_check=1 << 30)
    for sample in reader.tar_samples(reader.finite_urls(expand_shards(spec))):
        for t, fields in enumerate(frame_pairs(sample)):  # the shard's own bytes, as DAVIS folders
            for kind, name in zip(("JPEGImages", "Annotations"), fields):
                if name is not None:
                    (root / kind / sample["__key__"]).mkdir(parents=True, exist_ok=True)
                    (root / kind / sample["__key__"] / f"{t:05d}{Path(name).suffix}").write_bytes(sample[name])
        yield sample["__key__"]


def main(cfg: Config) -> DatasetScores:
    out, sav = Path(cfg.output), cfg.protocol == "sav"
    videos, truth = Path(cfg.videos or out / "JPEGImages"), Path(cfg.annotations or out / "Annotations")
    if not cfg.videos and cfg.data.val_shards is None:
        check_video_shards(cfg.data)  # builds (or finds) the synthetic world: its last shard validates
    names = (sorted(d.name for d in truth.iterdir() if d.is_dir()) if cfg.videos
             else list(unpack_shards(cfg.data.val_shards, out)))
    names = Path(cfg.video_list).read_text().split() if cfg.video_list else names
    model, scores = load_sam_model(cfg.init_from, cfg.model), {}
    if not isinstance(model, SAM2):
        raise ValueError(f"{cfg.init_from} holds a SAM, an image model: VOS needs a SAM 2 (sam2*_hiera_*)")
    model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    compute_begins()
    for name in tqdm(names, desc="videos"):
        stems, annotated = [p.stem for p in jpeg_frame_paths(videos / name)], frame_names(truth / name)
        gt, idx = load_masks_from_pngs(truth / name, annotated), [stems.index(s) for s in annotated]
        pred = segment_video(model, videos / name, gt, idx, later_objects=cfg.track_later_objects, non_overlap=not sav)
        save_vos_pngs(out / "masks" / name, pred, stems, per_object=sav)
        scores[name] = evaluate_video(gt, {k: m[idx] for k, m in pred.items()}, skip_first_and_last=True,
                                      score_from_first_appearance=sav)  # both protocols: frames 1 .. A-2
    j, f = (float(np.mean([x for v in scores.values() for x in getattr(v, a).values()])) for a in ("j_mean", "f_mean"))
    result = DatasetScores(j, f, (j + f) / 2, scores)
    (out / "jf.csv").write_text(result.table() + "\n")
    summary = {"J&F": result.jf, "J": j, "F": f, "protocol": cfg.protocol, "videos": result.per_video_jf}
    (out / "jf.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n".join(f"{k:<32} J&F {v:5.1f}" for k, v in result.per_video_jf.items()))
    print(f"{'mean':<32} J&F {result.jf:5.1f}  J {j:.1f}  F {f:.1f}  ({result.num_objects} objects, {cfg.protocol})")
    return result


if __name__ == "__main__":
    run_command(main, Config, __doc__, with_yaml=False)
