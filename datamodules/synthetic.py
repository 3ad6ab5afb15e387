"""The synthetic world: one deterministic scene generator behind every modality.

A scene is 1-4 shapes of known class, colour, texture, position, size, depth and velocity on a
background. From it we render the image, instance masks, short videos with per-frame masks, a
caption and noisy hashtags. Everything is a pure function of ``(seed, split, index)``.

Signal, by construction: the label is the class of the largest object, drawn uniformly. Each
object takes its class's typical colour with probability ``CLASS_COLOUR_PROB`` (as bananas tend to
be yellow), so colour statistics alone beat chance while shape is needed to go further; a model
that learns measurably beats one that does not, at tiny scale on a CPU.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from datamodules.shard_writer import ShardWriter

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when rendering changes: it is part of the cache key
CLASS_NAMES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon", "ellipse", "heart")
PALETTE = {  # name -> RGB; the i-th entry is the typical colour of class i
    "red": (220, 50, 47), "orange": (245, 140, 30), "yellow": (240, 215, 50), "green": (60, 170, 70),
    "cyan": (40, 190, 200), "blue": (40, 80, 210), "purple": (130, 60, 180), "pink": (240, 120, 180),
    "brown": (130, 85, 45), "gray": (128, 128, 128),
}
COLOURS = tuple(PALETTE)
TEXTURES = ("solid", "stripes", "checker", "dots")
BACKGROUNDS = ("solid", "gradient", "noise")
MAX_SCENE_OBJECTS = len(COLOURS) - 2
"""Most objects a scene holds: its background's two colours are ones that no object wears."""
CLASS_COLOUR_PROB = 0.5
# Hashtags: each true tag survives with its TAG_KEEP probability; Poisson(POISSON_NOISE_TAGS) noise tags
# are drawn i.i.d. from a truncated Zipf law p(rank k) = k**-s / sum_j j**-s over the 200 NOISE_VOCAB tags
# (in order), s = ZIPF_EXPONENT = 1.1: the top tag takes 21% of the draws, the top 10 take 57%.
TAG_KEEP = {"primary_class": 0.75, "class": 0.4, "primary_colour": 0.5, "colour": 0.25, "texture": 0.4,
            "background": 0.2}
ZIPF_EXPONENT = 1.1
POISSON_NOISE_TAGS = 3.0
NOISE_VOCAB = tuple(a + b for a in ("insta", "photo", "art", "daily", "love", "happy", "best", "my", "new", "fun",
                                    "cool", "summer", "weekend", "travel", "nature", "city", "style", "life",
                                    "food", "work")
                    for b in ("", "gram", "oftheday", "lover", "life", "vibes", "time", "pic", "shot", "mood"))
_TEXTURE_WORD = {"solid": "", "stripes": "striped", "checker": "checkered", "dots": "dotted"}
_BACKGROUND_WORD = {"solid": "plain", "gradient": "gradient", "noise": "mottled"}


@dataclass
class SceneObject:
    label: int
    colour: str
    texture: str
    x: float  # centre, fraction of the image side (0 = left)
    y: float  # centre, fraction of the image side (0 = top)
    size: float  # circumradius, fraction of the image side
    angle: float  # rotation in radians
    depth: int  # drawing order: 0 is at the back
    vx: float = 0.0  # velocity, image sides per frame
    vy: float = 0.0

    def position(self, t: float) -> tuple[float, float]:
        """Centre at frame ``t``: straight motion reflected off the borders (a triangle wave)."""
        lo, span = 0.7 * self.size, 1.0 - 1.4 * self.size  # the centre stays in [lo, lo + span]
        q = [(p + v * t - lo) % (2 * span) for p, v in ((self.x, self.vx), (self.y, self.vy))]
        return lo + min(q[0], 2 * span - q[0]), lo + min(q[1], 2 * span - q[1])


@dataclass
class Scene:
    background: str
    bg_colours: tuple[str, str]
    bg_angle: float
    bg_seed: int
    objects: list[SceneObject] = field(default_factory=list)  # largest first: objects[0] is primary

    @property
    def label(self) -> int:
        return self.objects[0].label


def sample_scene(seed: int, index: int, split: str = "train", max_objects: int = 4) -> Scene:
    """Scene number ``index`` of ``split``; the same arguments always give the same scene."""
    if not 1 <= max_objects <= MAX_SCENE_OBJECTS:
        raise ValueError(f"sample_scene: max_objects must be in 1..{MAX_SCENE_OBJECTS}, got {max_objects}: the "
                         f"background takes two of the {len(COLOURS)} colours that no object may wear")
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
    n = int(rng.integers(1, max_objects + 1))
    # The primary object is clearly larger than the others so that "largest" is unambiguous.
    sizes = [rng.uniform(0.22, 0.32)] + sorted(rng.uniform(0.08, 0.15, n - 1), reverse=True)
    depths = rng.permutation(n)
    objects = []
    for i, size in enumerate(sizes):
        label = int(rng.integers(len(CLASS_NAMES)))
        colour = COLOURS[label] if rng.random() < CLASS_COLOUR_PROB else COLOURS[rng.integers(len(COLOURS))]
        lo, hi = 0.7 * size, 1 - 0.7 * size
        speed, heading = rng.uniform(0.01, 0.05), rng.uniform(0, 2 * np.pi)
        objects.append(SceneObject(
            label, colour, TEXTURES[rng.integers(len(TEXTURES))], float(rng.uniform(lo, hi)),
            float(rng.uniform(lo, hi)), float(size), float(rng.uniform(-0.35, 0.35)), int(depths[i]),
            float(speed * np.cos(heading)), float(speed * np.sin(heading))))
    free = [c for c in COLOURS if c not in {o.colour for o in objects}]  # objects never vanish into the background
    bg = rng.choice(len(free), 2, replace=False)
    return Scene(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], (free[bg[0]], free[bg[1]]),
                 float(rng.uniform(0, 2 * np.pi)), int(rng.integers(2**31)), objects)


_SHAPES = {  # inside tests in object coordinates: circumradius 1, v pointing down, rho = hypot(u, v)
    "circle": lambda u, v, rho: rho <= 1,
    "square": lambda u, v, rho: np.maximum(abs(u), abs(v)) <= 0.75,
    "triangle": lambda u, v, rho: _regular_polygon(u, v, 3, np.pi / 2),
    "star": lambda u, v, rho: rho <= 0.45 + 0.55 * ((1 + np.cos(5 * np.arctan2(v, u) + np.pi / 2)) / 2) ** 2,
    "ring": lambda u, v, rho: (rho <= 1) & (rho >= 0.55),
    "cross": lambda u, v, rho: ((abs(u) <= 0.3) & (abs(v) <= 0.95)) | ((abs(v) <= 0.3) & (abs(u) <= 0.95)),
    "diamond": lambda u, v, rho: abs(u) / 0.65 + abs(v) <= 1,
    "hexagon": lambda u, v, rho: _regular_polygon(u, v, 6, 0.0),
    "ellipse": lambda u, v, rho: u**2 + (v / 0.55) ** 2 <= 1,
    "heart": lambda u, v, rho: _heart(1.2 * u, 0.15 - 1.2 * v),
}


def _regular_polygon(u: np.ndarray, v: np.ndarray, n: int, phase: float) -> np.ndarray:
    """Inside all n edges: the projection on each edge normal is at most the apothem cos(pi / n)."""
    normals = phase + 2 * np.pi * np.arange(n) / n
    return (u[..., None] * np.cos(normals) + v[..., None] * np.sin(normals)).max(-1) <= np.cos(np.pi / n)


def _heart(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0  # the classic implicit heart curve, y up


def _texture(texture: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """True where the object shows its own colour, False where the second (shaded) colour."""
    if texture == "stripes":
        return np.floor(2 * u) % 2 == 0
    if texture == "checker":
        return (np.floor(2 * u) + np.floor(2 * v)) % 2 == 0
    if texture == "dots":
        return np.hypot(2 * u - np.round(2 * u), 2 * v - np.round(2 * v)) > 0.3
    return np.ones_like(u, dtype=bool)


def _shade(rgb: np.ndarray) -> np.ndarray:
    """Second texture colour: darker for light colours, lighter for dark ones (same hue)."""
    return rgb * 0.45 if rgb @ (0.299, 0.587, 0.114) > 90 else rgb + (255 - rgb) * 0.5


def _background(scene: Scene, size: int, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    c0, c1 = (np.array(PALETTE[c], np.float32) for c in scene.bg_colours)
    if scene.background == "solid":
        w = np.zeros_like(px)
    elif scene.background == "gradient":
        w = np.clip(0.5 + (px - 0.5) * np.cos(scene.bg_angle) + (py - 0.5) * np.sin(scene.bg_angle), 0, 1)
    else:  # low-frequency noise: a random 4x4 grid, bilinearly upsampled
        grid = np.random.default_rng(scene.bg_seed).random((4, 4), dtype=np.float32)
        w = np.asarray(Image.fromarray(grid, "F").resize((size, size), Image.BILINEAR))
    return c0 + (c1 - c0) * w[..., None]


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> np.ndarray:
    """Pixel-centre coordinates (2, H, W) in image sides; read-only, shared between renders."""
    grid = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    grid.setflags(write=False)
    return grid


def _render(scene: Scene, size: int, t: float = 0.0) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """(image uint8 HxWx3, instance ids uint8 HxW, per-object amodal boxes [x0, y0, x1, y1])."""
    py, px = _grid(size)
    img = _background(scene, size, px, py)
    ids = np.zeros((size, size), np.uint8)
    boxes: list[list[int]] = [[0, 0, 0, 0]] * len(scene.objects)
    for i in sorted(range(len(scene.objects)), key=lambda k: scene.objects[k].depth):
        obj = scene.objects[i]
        cx, cy = obj.position(t)
        # Work in the window that can hold the shape (all shapes fit in 1.1 circumradii): ~3x faster.
        x0, y0 = (max(0, int((c - 1.1 * obj.size) * size)) for c in (cx, cy))
        x1, y1 = (min(size, int(np.ceil((c + 1.1 * obj.size) * size))) for c in (cx, cy))
        dx, dy = (px[y0:y1, x0:x1] - cx) / obj.size, (py[y0:y1, x0:x1] - cy) / obj.size
        cos, sin = np.cos(obj.angle), np.sin(obj.angle)
        u, v = dx * cos + dy * sin, dy * cos - dx * sin
        inside = _SHAPES[CLASS_NAMES[obj.label]](u, v, np.hypot(u, v))
        rgb = np.array(PALETTE[obj.colour], np.float32)
        img[y0:y1, x0:x1][inside] = np.where(_texture(obj.texture, u, v)[inside, None], rgb, _shade(rgb))
        ids[y0:y1, x0:x1][inside] = i + 1
        ys, xs = np.nonzero(inside)
        if len(xs):  # x1, y1 exclusive, in pixels; the whole shape, occluded parts included
            boxes[i] = [x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1]
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), ids, boxes


def render_image(scene: Scene, size: int) -> np.ndarray:
    return _render(scene, size)[0]


def render_instance_masks(scene: Scene, size: int) -> np.ndarray:
    """0 = background, i = ``scene.objects[i - 1]`` where it is visible (front objects occlude)."""
    return _render(scene, size)[1]


def render_video(scene: Scene, num_frames: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames (T, H, W, 3) and instance masks (T, H, W); objects move with their velocity."""
    out = [_render(scene, size, t)[:2] for t in range(num_frames)]
    return np.stack([f for f, _ in out]), np.stack([m for _, m in out])


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


CAPTION_TEMPLATES = ("a large {}", "a {}", "a large {} on a background")
"""Zero-shot prompts worded as ``caption`` words its captions ("a large red striped circle and a small ... on a plain
blue background"), '{}' being a class name: the prompt set for this world, as CLIP writes one per dataset."""


def caption(scene: Scene) -> str:
    parts = [_with_article(" ".join(w for w in ("large" if i == 0 else "small", o.colour,
                                                 _TEXTURE_WORD[o.texture], CLASS_NAMES[o.label]) if w))
             for i, o in enumerate(scene.objects)]
    things = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    colour, kind = scene.bg_colours[0], _BACKGROUND_WORD[scene.background]
    bg = f"{colour} {kind}" if scene.background == "gradient" else f"{kind} {colour}"
    return f"{things} on {_with_article(bg)} background"


def hashtags(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Weak labels: true tags each kept with TAG_KEEP probability, plus Zipf noise tags, shuffled."""
    true = [(CLASS_NAMES[o.label], "primary_class" if i == 0 else "class") for i, o in enumerate(scene.objects)]
    true += [(o.colour, "primary_colour" if i == 0 else "colour") for i, o in enumerate(scene.objects)]
    true += [(o.texture, "texture") for o in scene.objects if o.texture != "solid"]
    true += [(_BACKGROUND_WORD[scene.background], "background")]
    tags = [tag for tag, kind in true if rng.random() < TAG_KEEP[kind]]
    p = np.arange(1, len(NOISE_VOCAB) + 1, dtype=np.float64) ** -ZIPF_EXPONENT
    tags += [NOISE_VOCAB[k] for k in rng.choice(len(NOISE_VOCAB), rng.poisson(POISSON_NOISE_TAGS), p=p / p.sum())]
    tags = list(dict.fromkeys(tags))  # dedupe, keep first occurrence
    return [tags[k] for k in rng.permutation(len(tags))]


@dataclass
class SyntheticWorldConfig:
    """The synthetic world: every field is part of the cache key."""

    seed: int = 0
    """Seed of the world: every scene is a function of (seed, split, index)."""
    image_size: int = 96
    """Side of the square images in pixels."""
    train_samples: int = 2048
    """Number of training images."""
    val_samples: int = 256
    """Number of validation images (scenes distinct from training)."""
    samples_per_shard: int = 128
    """Samples per .tar shard (keep training shards >= ranks x workers, so that every reader has its own)."""
    video_samples: int = 0
    """Number of videos; 0 writes no video split."""
    video_frames: int = 8
    """Frames per video."""
    video_size: int = 64
    """Side of the square video frames in pixels."""


@dataclass
class SyntheticWorld:
    """Where a built world lives; ``*_shards`` are brace specs such as ``/dir/train-{000000..000015}.tar``."""

    root: str
    train_shards: str
    val_shards: str
    video_shards: str | None
    num_train: int
    num_val: int


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _image_sample(cfg: SyntheticWorldConfig, split: str, index: int) -> dict:
    scene = sample_scene(cfg.seed, index, split)
    img, ids, boxes = _render(scene, cfg.image_size)
    text = caption(scene)
    tags = hashtags(scene, np.random.default_rng([cfg.seed, zlib.crc32(split.encode()), index, 1]))
    objects = [{"class_name": CLASS_NAMES[o.label], "label": o.label, "colour": o.colour, "texture": o.texture,
                "bbox": box} for o, box in zip(scene.objects, boxes)]
    meta = {"label": scene.label, "class_name": CLASS_NAMES[scene.label], "hashtags": tags, "caption": text,
            "objects": objects}
    return {"__key__": f"{split}-{index:08d}", "jpg": _encode(img, "JPEG"), "cls": str(scene.label).encode(),
            "txt": text.encode(), "mask.png": _encode(ids, "PNG"), "json": json.dumps(meta).encode()}


def _video_sample(cfg: SyntheticWorldConfig, index: int) -> dict:
    scene = sample_scene(cfg.seed, index, "video")
    frames, masks = render_video(scene, cfg.video_frames, cfg.video_size)
    meta = {"scene": asdict(scene), "num_frames": cfg.video_frames, "label": scene.label,
            "class_name": CLASS_NAMES[scene.label], "caption": caption(scene)}
    sample = {"__key__": f"video-{index:08d}", "json": json.dumps(meta).encode()}
    for t in range(cfg.video_frames):
        sample[f"{t:03d}.jpg"], sample[f"{t:03d}.mask.png"] = _encode(frames[t], "JPEG"), _encode(masks[t], "PNG")
    return sample


def _brace(names: list[str]) -> str:
    prefix = names[0].rsplit("-", 1)[0]
    return f"{prefix}-{{000000..{len(names) - 1:06d}}}.tar"


def load_synthetic_world(directory: str) -> SyntheticWorld:
    with open(os.path.join(directory, "world.json")) as f:
        w = json.load(f)
    path = lambda name: os.path.join(directory, name) if name else None  # noqa: E731
    return SyntheticWorld(directory, path(w["train"]), path(w["val"]), path(w["video"]), w["num_train"], w["num_val"])


def write_synthetic_world(cfg: SyntheticWorldConfig, output_dir: str) -> SyntheticWorld:
    """Render the world into ``output_dir`` (must not exist): built in a temporary sibling, then renamed."""
    if os.path.exists(output_dir):
        raise FileExistsError(f"{output_dir} already exists; pick a new --output directory")
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(output_dir)}.tmp-")
    try:
        names: dict[str, str | None] = {"video": None}
        source = f"datamodules.synthetic v{GENERATOR_VERSION} {json.dumps(asdict(cfg), sort_keys=True)}"
        if min(cfg.train_samples, cfg.val_samples, cfg.samples_per_shard) < 1:
            raise ValueError(f"train_samples, val_samples and samples_per_shard must be >= 1, got {cfg}")
        for split, n in [("train", cfg.train_samples), ("val", cfg.val_samples), ("video", cfg.video_samples)]:
            if n <= 0:  # only video can get here: no video split
                continue
            with ShardWriter(tmp, split, max_count=cfg.samples_per_shard, source=source) as writer:
                for i in range(n):
                    writer.write(_video_sample(cfg, i) if split == "video" else _image_sample(cfg, split, i))
            names[split] = _brace(sorted(writer.shards))
        meta = {"config": asdict(cfg), "version": GENERATOR_VERSION, "num_train": cfg.train_samples,
                "num_val": cfg.val_samples, "num_video": cfg.video_samples, **names}
        with open(os.path.join(tmp, "world.json"), "w") as f:
            json.dump(meta, f, indent=1)
        os.rename(tmp, output_dir)  # fails if another process got there first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_synthetic_world(output_dir)


def ensure_synthetic_world(cfg: SyntheticWorldConfig = SyntheticWorldConfig(), root: str | None = None) -> SyntheticWorld:
    """Shards of the world described by ``cfg``, built on first use and cached under ``root``.

    ``root`` defaults to ``$PRISM_CACHE`` or ``~/.cache/prism``. Safe when several processes (DDP
    ranks) call it at once: each may build, the first rename wins and the others use its result.
    """
    root = root or os.environ.get("PRISM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "prism")
    key = json.dumps({"version": GENERATOR_VERSION, **asdict(cfg)}, sort_keys=True)
    final = os.path.join(root, "synthetic", hashlib.sha1(key.encode()).hexdigest()[:12])
    if os.path.exists(os.path.join(final, "world.json")):
        return load_synthetic_world(final)
    if os.path.exists(final):
        raise RuntimeError(f"{final} exists but holds no world.json (not written by Prism?); delete it to rebuild")
    start = time.perf_counter()
    try:
        world = write_synthetic_world(cfg, final)
    except OSError:  # lost the race (rename onto a non-empty directory, or the existence check)
        if not os.path.exists(os.path.join(final, "world.json")):
            raise
        return load_synthetic_world(final)
    log.info("synthetic world: built %d train + %d val + %d video samples in %s (%.1f s)", cfg.train_samples,
             cfg.val_samples, cfg.video_samples, final, time.perf_counter() - start)
    return world


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docstrings become --help
    parser = ArgumentParser(prog="python -m datamodules.synthetic", description="Write a synthetic world's shards.")
    parser.add_argument("--output", type=str, required=True, help="New directory to write the shards into.")
    parser.add_class_arguments(SyntheticWorldConfig, None, as_group=True)
    args = vars(parser.parse_args(argv))
    output = args.pop("output")
    world = write_synthetic_world(SyntheticWorldConfig(**args), output)
    print(f"wrote {world.num_train} train and {world.num_val} val samples to {world.root}\n"
          f"  train: {world.train_shards}\n  val:   {world.val_shards}\n  video: {world.video_shards}")


if __name__ == "__main__":
    main()
