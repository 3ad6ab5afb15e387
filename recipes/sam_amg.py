"""Automatic masks for a folder of images with SAM or SAM 2 (evaluation.amg: a grid of point prompts, good masks kept).

    python -m recipes.sam_amg --images photos/ --init_from sam_vit_b_01ec64.pth
    python -m recipes.sam_amg --images photos/ --init_from runs/sam2_train --points_per_side 64 --output runs/amg2

Writes to --output: <stem>.png, each image with its masks drawn over it; masks.json, the COCO results of every image
(COCO RLE, score = predicted IoU); images.json, the COCO "images" list (id 1..N in file-name order, file_name,
height, width) that pairs them with a ground truth."""

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from evaluation.amg import AMGConfig, AutomaticMaskGenerator, render_overlay, write_coco_results_of_images
from models.sam.image_predictor import SAM2ImagePredictor
from models.sam.sam import ImagePredictor
from models.sam.sam2 import SAM2
from recipes.cli import run_command
from trainers.eval_model import load_sam_model
from trainers.run import compute_begins

SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class Config:
    images: str
    """A folder of .jpg / .jpeg / .png images (any case), segmented in file-name order."""
    init_from: str
    """An official sam_vit_*.pth or sam2.1_hiera_*.pt / sam2_hiera_*.pt, or a Prism run dir, .ckpt or export."""
    model: str | None = None
    """Registered SAM / SAM 2 name; None: the official file's name (sam_vit_b_01ec64.pth -> sam_vit_b) or the run's."""
    output: str = "runs/sam_amg"
    """Where the overlays, masks.json and images.json go."""
    points_per_side: int | None = None
    """Grid points per side (their square: prompts). None, here and below: the SAM / SAM 2 generator's default: 32."""
    points_per_batch: int | None = None
    """Points decoded at once (memory, not results); default 64."""
    pred_iou_thresh: float | None = None
    """Keep masks whose predicted IoU is above this; default 0.88 for SAM, 0.8 for SAM 2."""
    stability_score_thresh: float | None = None
    """Keep masks whose stability score is at least this; default 0.95."""
    box_nms_thresh: float | None = None
    """Box IoU above which the lower-scored of two masks goes; default 0.7."""
    crop_n_layers: int | None = None
    """Layers of crops run again on their own (finer masks on large images, 4 ** layers times the work); default 0."""
    min_mask_region_area: int | None = None
    """Fill holes and drop islands smaller than this many pixels (0: off); default 0."""


def image_files(folder: Path) -> list[Path]:
    """Every image of ``folder`` by name; a ValueError names the folder if there is none."""
    if not folder.is_dir():
        raise ValueError(f"--images {folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise ValueError(f"--images {folder}: no images in it (read: {', '.join(SUFFIXES)}, in any case)")
    if clash := sorted({p.name for p in files if [q.stem for q in files].count(p.stem) > 1}):
        raise ValueError(f"--images {folder}: {', '.join(clash)} would share one overlay <stem>.png; rename them")
    return files


def mask_generator(cfg: Config, model: torch.nn.Module) -> AutomaticMaskGenerator:
    knobs = {f.name for f in fields(AMGConfig)}  # the fields of Config that are AMGConfig's
    given = {k: v for k, v in vars(cfg).items() if k in knobs and v is not None}
    predictor, family = ((SAM2ImagePredictor(model), AMGConfig.sam2()) if isinstance(model, SAM2)
                         else (ImagePredictor(model), AMGConfig()))
    return AutomaticMaskGenerator(predictor, replace(family, **given, output_mode="coco_rle"))


def main(cfg: Config) -> dict:
    files, out = image_files(Path(cfg.images)), Path(cfg.output)
    if out.resolve() == Path(cfg.images).resolve():
        raise ValueError(f"--output {out} is the images folder: the overlays would overwrite its .png images")
    model = load_sam_model(cfg.init_from, cfg.model).to("cuda" if torch.cuda.is_available() else "cpu").eval()
    generator, images = mask_generator(cfg, model), []
    compute_begins()
    out.mkdir(parents=True, exist_ok=True)

    def segmented():  # one image at a time: masks.json is streamed, not held
        for image_id, path in enumerate(tqdm(files, desc="images"), start=1):
            image = np.array(Image.open(path).convert("RGB"))  # grey, palette, RGBA alike; load() closes the file
            records = generator.generate(image)
            Image.fromarray(render_overlay(image, records)).save(out / f"{path.stem}.png")
            images.append({"id": image_id, "file_name": path.name, "height": image.shape[0], "width": image.shape[1]})
            tqdm.write(f"{path.name:<40} {len(records):5d} masks")
            yield image_id, records

    total = write_coco_results_of_images(segmented(), out / "masks.json")
    (out / "images.json").write_text(json.dumps(images, indent=1) + "\n")
    print(f"{total} masks on {len(files)} images -> {out}/ (<stem>.png overlays, masks.json, images.json)")
    return {"masks": total, "images": len(files), "output": out}


if __name__ == "__main__":
    run_command(main, Config, __doc__, with_yaml=False)
