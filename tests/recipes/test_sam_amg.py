"""recipes.sam_amg end to end, run as a user runs it, on a folder of small images (RGB JPEG, grey, palette and RGBA
PNGs, and a file that is not an image) with random-weights nano models in the official file layouts: the COCO
results load in pycocotools against the ground-truth pairing images.json gives, and every image's entries are the
records of segment-anything's SamAutomaticMaskGenerator (SAM) or sam2's SAM2AutomaticMaskGenerator (SAM 2) on the
same weights, image and settings; overlays have the images' sizes. Also: one loader for official files and Prism
runs, the defaults of each model family, and the errors for a bad folder or model."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pycocotools.coco import COCO
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from segment_anything import SamAutomaticMaskGenerator

from evaluation.amg import AMGConfig
from models.registry import create
from models.sam.sam import SAM
from models.sam.sam2 import SAM2
from recipes.sam_amg import Config, main, mask_generator
from tests.evaluation.test_amg import scene
from tests.models.test_sam2_model import sam2_nano_checkpoint
from tests.models.test_sam_model import follow_regions, reference_nano
from trainers.eval_model import load_sam_model
from trainers.sam2 import SAM2Training

pytestmark = pytest.mark.slow

SCORE_ATOL = 1e-4
NAMES = ["a.jpg", "b.PNG", "c.png", "d.png"]  # file-name order: the image ids 1..4
# Random weights predict IoUs far below the defaults' thresholds and all-but-zero stability scores: the filters are
# off so that masks survive; NMS is loosened so that several do.
SAM_SETTINGS = dict(points_per_side=6, points_per_batch=5, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                    box_nms_thresh=0.95, min_mask_region_area=100)
# No min_mask_region_area for SAM 2: sam2's generator also fills holes in its predictor's masks (with sam2's
# compiled extension), which evaluation.amg leaves out.
SAM2_SETTINGS = dict(points_per_side=8, points_per_batch=7, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                     box_nms_thresh=0.98)
# sam2's image predictor assumes the feature sizes of 1024-px inputs; the nano model's are an eighth of them.
NANO_FEATURE_SIZES = [(32, 32), (16, 16), (8, 8)]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """The nano models' tiny ops only wait on each other with more threads on a shared 2-core machine."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Scenes of flat discs (regions that even random weights tell apart) in four image modes, and a text file."""
    folder = tmp_path_factory.mktemp("images")
    Image.fromarray(scene(96, 128, 1)).save(folder / "a.jpg", quality=95)
    Image.fromarray(scene(96, 128, 2)).convert("L").save(folder / "b.PNG")
    Image.fromarray(scene(100, 76, 3)).convert("P").save(folder / "c.png")
    Image.fromarray(scene(64, 80, 4)).convert("RGBA").save(folder / "d.png")
    (folder / "notes.txt").write_text("not an image\n")
    return folder


@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory):
    """segment-anything's nano Sam with random weights giving masks that follow the image's regions, saved as an
    official sam_vit_*.pth."""
    torch.manual_seed(0)
    ref = follow_regions(reference_nano(), logit_scale=40)
    path = tmp_path_factory.mktemp("sam") / "sam_vit_nano_0a1b2c.pth"
    torch.save(ref.state_dict(), path)
    return ref, path


@pytest.fixture(scope="module")
def sam2_checkpoint(tmp_path_factory):
    """sam2's SAM2Base at the nano size with random weights whose masks cover parts of the image, saved as an
    official sam2.1_hiera_*.pt."""
    return sam2_nano_checkpoint(tmp_path_factory.mktemp("sam2"))


def flags(settings: dict) -> list[str]:
    return [arg for name, value in settings.items() for arg in (f"--{name}", str(value))]


def rgb(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def check_output(out, folder, stdout: str, expected: dict[str, list[dict]]) -> None:
    """images.json pairs ids 1..N with the images in name order; masks.json loads against it in pycocotools; each
    image's entries are ``expected[name]``'s records (segment-anything's layout) in order; overlays and printout."""
    pairing = json.loads((out / "images.json").read_text())
    assert [(e["id"], e["file_name"]) for e in pairing] == list(enumerate(NAMES, start=1))
    gt = COCO()
    gt.dataset = {"images": pairing, "annotations": [], "categories": [{"id": 1}]}
    gt.createIndex()
    results = gt.loadRes(str(out / "masks.json"))
    entries = json.loads((out / "masks.json").read_text())
    for image_id, name in enumerate(NAMES, start=1):
        image, want = rgb(folder / name), expected[name]
        assert (pairing[image_id - 1]["height"], pairing[image_id - 1]["width"]) == image.shape[:2]
        got = [e for e in entries if e["image_id"] == image_id]
        anns = results.loadAnns(results.getAnnIds(imgIds=[image_id]))
        assert len(got) == len(anns) == len(want) >= 1, name
        for entry, ann, record in zip(got, anns, want):
            x, y, w, h = record["bbox"]  # SAM's box spans x0..x1 inclusive; COCO's is the pixel extent
            assert entry["bbox"] == ([x, y, w + 1, h + 1] if record["area"] else [0, 0, 0, 0])
            assert entry["area"] == record["area"] and entry["category_id"] == 1
            assert entry["score"] == pytest.approx(record["predicted_iou"], abs=SCORE_ATOL)
            assert entry["stability_score"] == pytest.approx(record["stability_score"], abs=SCORE_ATOL)
            assert entry["point_coords"] == record["point_coords"]
            assert np.array_equal(results.annToMask(ann).astype(bool), record["segmentation"])
        with Image.open(out / f"{name.rsplit('.', 1)[0]}.png") as overlay:
            assert overlay.size == (image.shape[1], image.shape[0]) and overlay.mode == "RGB"
        assert re.search(rf"^{re.escape(name)}\s+{len(want)} masks$", stdout, flags=re.M)
    assert len(entries) > len(NAMES)  # several masks survive on some image
    assert re.search(rf"^{len(entries)} masks on {len(NAMES)} images -> {re.escape(str(out))}/", stdout, flags=re.M)
    assert sorted(p.name for p in out.iterdir()) == sorted(["a.png", "b.png", "c.png", "d.png", "images.json",
                                                            "masks.json"])  # and no temporary file


def test_official_sam_equals_segment_anything(run_recipe, images, sam_checkpoint, tmp_path):
    ref, path = sam_checkpoint
    out = tmp_path / "amg"
    proc = run_recipe("recipes.sam_amg", "--images", str(images), "--init_from", str(path), "--output", str(out),
                      *flags(SAM_SETTINGS))
    expected = {name: SamAutomaticMaskGenerator(ref, **SAM_SETTINGS).generate(rgb(images / name)) for name in NAMES}
    check_output(out, images, proc.stdout, expected)


def test_official_sam2_equals_sam2(run_recipe, images, sam2_checkpoint, tmp_path):
    base, path = sam2_checkpoint
    out = tmp_path / "amg"
    proc = run_recipe("recipes.sam_amg", "--images", str(images), "--init_from", str(path), "--output", str(out),
                      *flags(SAM2_SETTINGS))
    reference = SAM2AutomaticMaskGenerator(base, **SAM2_SETTINGS)
    reference.predictor._bb_feat_sizes = NANO_FEATURE_SIZES
    check_output(out, images, proc.stdout, {name: reference.generate(rgb(images / name)) for name in NAMES})


def test_one_loader_for_official_files_and_prism_runs(sam_checkpoint, sam2_checkpoint, tmp_path):
    """The official file's weights, and the same weights from a Prism run directory (config.yaml names the model,
    the Lightning checkpoint holds it under model.*), with SAM's constants outside the state dict built."""
    official = load_sam_model(str(sam_checkpoint[1]))
    assert isinstance(official, SAM) and official.cfg.encoder == "samvit_nano_patch16"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "sam_vit_nano"}}))
    state = {f"model.{k}": v.clone() for k, v in official.state_dict().items()}
    torch.save({"state_dict": state, "global_step": 1}, run / "checkpoints" / "last.ckpt")
    prism = load_sam_model(str(run))
    assert prism.state_dict().keys() == official.state_dict().keys()
    assert all(torch.equal(prism.state_dict()[k], v) for k, v in official.state_dict().items())
    for model in (official, prism):
        assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
        assert model.pixel_mean.flatten().tolist() == pytest.approx([123.675, 116.28, 103.53])
    sam2 = load_sam_model(str(sam2_checkpoint[1]))
    assert isinstance(sam2, SAM2) and sam2.cfg.version == "2.1"
    renamed = tmp_path / "weights.pt"
    shutil.copy(sam2_checkpoint[1], renamed)
    with pytest.raises(ValueError, match=r"Cannot tell which model .*weights\.pt holds .* Pass --model"):
        load_sam_model(str(renamed))
    assert isinstance(load_sam_model(str(renamed), "sam2.1_hiera_nano"), SAM2)


def test_a_prism_sam2_run_loads_as_it_was_trained(tmp_path):
    """The run's config.yaml decides the SAM 2 version and whether tracked frames give three candidate masks
    (recipes.sam2_train's default: one), as training built the model."""
    trained = SAM2Training({"version": "2.0", "multimask_output_for_tracking": False})
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "sam2.1_hiera_nano", "version": "2.0",
                                                               "multimask_output_for_tracking": False}}))
    torch.save({"state_dict": trained.state_dict(), "global_step": 1}, run / "checkpoints" / "last.ckpt")
    loaded = load_sam_model(str(run))
    assert (loaded.cfg.version, loaded.cfg.multimask_output_for_tracking) == ("2.0", False)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained.model.state_dict().items())


def test_family_defaults():
    """Unset settings are the family's generator defaults (SAM's pred_iou_thresh 0.88, SAM 2's 0.8); set ones win."""
    sam, sam2 = create("sam_vit_nano").eval(), create("sam2.1_hiera_nano").eval()
    unset = Config(images="x", init_from="y")
    assert mask_generator(unset, sam).cfg == AMGConfig(output_mode="coco_rle")
    assert mask_generator(unset, sam2).cfg == AMGConfig.sam2(output_mode="coco_rle")
    given = dict(points_per_side=4, points_per_batch=3, pred_iou_thresh=0.5, stability_score_thresh=0.6,
                 box_nms_thresh=0.4, crop_n_layers=1, min_mask_region_area=7)
    for model, family in ((sam, AMGConfig()), (sam2, AMGConfig.sam2())):
        cfg = mask_generator(Config(images="x", init_from="y", **given), model).cfg
        assert cfg.mask_threshold == family.mask_threshold and cfg.output_mode == "coco_rle"
        assert {k: getattr(cfg, k) for k in given} == given


def test_errors_name_the_problem(images, sam_checkpoint, tmp_path):
    path = str(sam_checkpoint[1])
    with pytest.raises(ValueError, match=r"--images .*missing: no such folder"):
        main(Config(images=str(tmp_path / "missing"), init_from=path))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image\n")
    with pytest.raises(ValueError, match=r"empty: no images in it \(read: \.jpg, \.jpeg, \.png, in any case"):
        main(Config(images=str(empty), init_from=path))
    with pytest.raises(ValueError, match=r"Unknown model 'sam_vit_q'"):
        main(Config(images=str(images), init_from=path, model="sam_vit_q", output=str(tmp_path / "a")))
    with pytest.raises(ValueError, match=r"vit_base_patch16 is a VisionTransformer, not a SAM"):
        main(Config(images=str(images), init_from=path, model="vit_base_patch16", output=str(tmp_path / "b")))
    with pytest.raises(ValueError, match=r"the overlays would overwrite its \.png images"):
        main(Config(images=str(images), init_from=path, output=str(images)))
    clash = tmp_path / "clash"
    shutil.copytree(images, clash)
    shutil.copy(images / "c.png", clash / "a.png")
    with pytest.raises(ValueError, match=r"a\.jpg, a\.png would share one overlay"):
        main(Config(images=str(clash), init_from=path))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
