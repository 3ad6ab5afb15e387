"""Conversations about the synthetic world, for PerceptionLM: captions, image questions, video multiple choice.

Every sample is a function of ``(seed, split, task, k)``: the k-th conversation of a task walks the world's scenes
(``synthetic.sample_scene``, stream ``split`` for images and ``split-video`` for videos) from where the (k-1)-th
stopped and takes the first scene about which its question has one clear answer. Train and val read different
scene streams, as the synthetic world's splits do, so val scenes are held out.

Tasks (``task`` in the sample's json), what is asked, and when a scene is passed over:

==============  ===============================================================  ===================================
image_caption   "Describe the image." (4 phrasings) -> ``caption(scene)``         an object shows < MIN_VISIBLE
image_colour    "What colour is the star?" -> "red"                              the shape repeats, or is hidden
image_shape     "What shape is the red object?" -> "star"                        the colour repeats, or is hidden
image_count     "How many objects are there?" / "How many stars are there?"      an object shows < MIN_VISIBLE
image_position  "Is the star left or right of the ring?" -> "left";              centres less than MIN_SEPARATION
                "Is the star above or below the ring?" -> "above"                (and half the radii) apart
video_motion    "Which direction does the star move?" A-D: left/right/up/down    heading off an axis, a bounce
                                                                                 along it, < MIN_TRAVEL moved
video_order     "Which object covers part of the red ring during the video?",    not one object overlapping it on
                "Which object is partly hidden behind the red ring ...?" A-D     that side, < MIN_OCCLUDED hidden
video_colour    "What colour is the star in the video?" A-D: colours             the shape repeats, or is hidden
==============  ===============================================================  ===================================

Why these video questions: an object's depth is fixed for the whole clip and every object is in view from the
first frame to the last (the world bounces objects off the borders), so "which appears first" has no answer and
"which is in front at the end" is the same as at the start; what the frames do show of depth is occlusion where
two objects overlap, which the order questions ask about. Motion is the per-frame velocity, up being -y.

Layout, in the shard and in ``make_shards --format conversation`` alike: ``json`` holds ``conversations``
(``[{"from": "human", "value": "<image>\\n..."}, {"from": "assistant", "value": ...}]``; videos use ``<video>``),
``task``, ``media`` ("image" | "video"), ``answer`` (the answer text, or for multiple choice the index into
``options``), ``scene`` (``{"seed", "split", "index"}``: ``sample_scene``'s arguments) and for videos ``fps`` and
``num_frames``; the pixels are ``jpg`` for an image, ``000.jpg``, ``001.jpg``, ... for a video's frames.
Open questions end with a request for a single word or phrase so that answers exact-match; multiple-choice
questions list ``A. option`` lines and are answered ``"B. left"`` (``mcq_choices`` gives the four candidate answers
an evaluator scores by log-likelihood).

Frame rate: the world moves objects per frame, so ``fps`` only says how long a clip lasts. The default 8 frames at
8 fps are 1 s of video: sampled at 1 fps it has a single frame, fewer than any clip length above 1, so the data side
takes PerceptionLM's fallback to the raw frames (apps/plm: 1-fps frames unless they are too few). With ``fps`` 1
every frame is a 1-fps frame.

Answering without looking: answers are balanced within groups of questions (MAX_SHARE, PRIOR_SHARE) and every
letter answers one in four multiple-choice questions, so that ``majority_baseline`` (always the commonest answer)
and ``text_only_baseline`` (the commonest answer to the same question in train) stay far below 1; world.json
records both for val. The binary position questions name their two possible answers: reading the question is
worth 0.5 there.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from datamodules import synthetic
from datamodules.chat import IMAGE_MARKER, VIDEO_MARKER
from datamodules.shard_writer import ShardWriter
from datamodules.synthetic import CLASS_COLOUR_PROB, CLASS_NAMES, COLOURS, Scene, caption, render_video, sample_scene

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when questions or answers change: it is part of the cache key (with the world's)
IMAGE_TASKS = ("image_caption", "image_colour", "image_shape", "image_count", "image_position")
VIDEO_TASKS = ("video_motion", "video_order", "video_colour")
TASKS = IMAGE_TASKS + VIDEO_TASKS
LETTERS = "ABCD"
DIRECTIONS = ("left", "right", "up", "down")
CAPTION_PROMPTS = ("Describe the image.", "Write a short caption for the image.", "What is in this picture?",
                   "Describe the picture in one sentence.")
SHORT_ANSWER = "Answer the question using a single word or phrase."  # LLaVA-1.5's short-answer prompt
MCQ_INSTRUCTION = "Answer with the option's letter and text."
MIN_VISIBLE = 0.5
"""Fraction of an object's pixels that must show for a question to name it (or a count or caption to include it)."""
MIN_SEPARATION = 0.15
"""image_position: centres at least this far apart along the asked axis (image sides), and at least half the sum of
the two circumradii, so that "left of" holds for most of both shapes."""
MIN_TRAVEL = 0.1
"""video_motion: distance moved along the asked axis over the clip (image sides); 6 px at 64 px."""
DOMINANCE = 2.0
"""video_motion: the asked axis' speed is at least this multiple of the other's (heading within 27 degrees)."""
MIN_OCCLUDED = 0.15
"""video_order: in some frame the front object visibly hides at least this fraction of the back one."""
MAX_SHARE = 0.3
"""Within a group of questions (the task's, or a question form's) no answer takes more than this share: a scene whose
answer already has its share is passed over."""
PRIOR_SHARE = 0.15
"""The same per question for colour and shape questions. The world gives each shape its typical colour half the time
(``synthetic.CLASS_COLOUR_PROB``), so "What colour is the star?" would be "yellow" for 55% of stars and a model
could answer without looking; at 0.15 the typical answer stays near the other nine's 0.094."""
SHAPE_COUNT_SHARE = 0.4
"""The share for "How many <shape>s are there?", mostly 0 or 1 (a shape repeats in a scene now and then)."""
DEFAULT_TRAIN_COUNTS = {"image_caption": 1000, "image_colour": 400, "image_shape": 400, "image_count": 400,
                        "image_position": 400, "video_motion": 300, "video_order": 300, "video_colour": 300}
DEFAULT_VAL_COUNTS = {task: 64 for task in TASKS}


@dataclass
class ConversationWorldConfig:
    """Conversations about the synthetic world: every field is part of the cache key."""

    seed: int = 0
    """Seed of the scenes: a scene is a function of (seed, split, index), as in the synthetic world."""
    image_size: int = 64
    """Side of the square images in pixels (small so that CPU runs stay fast)."""
    video_size: int = 64
    """Side of the square video frames in pixels."""
    video_frames: int = 8
    """Frames per video (>= 2: motion needs two)."""
    fps: float = 8.0
    """Frame rate recorded with each video. 8 frames at 8 fps are 1 s: the data side's 1-fps sampling yields one frame
    and falls back to the raw frames, as PerceptionLM does."""
    train_counts: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_TRAIN_COUNTS))
    """Training conversations per task (tasks left out get none)."""
    val_counts: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_VAL_COUNTS))
    """Validation conversations per task, from scenes that training never sees."""
    samples_per_shard: int = 128
    """Samples per .tar shard."""

    def __post_init__(self) -> None:
        unknown = sorted((set(self.train_counts) | set(self.val_counts)) - set(TASKS))
        if unknown:
            raise ValueError(f"ConversationWorldConfig: unknown task(s) {unknown}; the tasks are {list(TASKS)}")
        counts = list(self.train_counts.values()) + list(self.val_counts.values())
        if min(counts, default=0) < 0 or sum(self.train_counts.values()) < 1 or sum(self.val_counts.values()) < 1:
            raise ValueError(f"ConversationWorldConfig: counts must be >= 0 with at least one sample per split, got "
                             f"train {self.train_counts} and val {self.val_counts}")
        if min(self.image_size, self.video_size) < 16 or self.video_frames < 2 or self.fps <= 0:
            raise ValueError("ConversationWorldConfig: image_size and video_size must be >= 16, video_frames >= 2 "
                             f"and fps > 0, got {self.image_size}, {self.video_size}, {self.video_frames}, {self.fps}")
        if self.samples_per_shard < 1:
            raise ValueError(f"ConversationWorldConfig.samples_per_shard must be >= 1, got {self.samples_per_shard}")

    def counts(self, split: str) -> dict[str, int]:
        return {"train": self.train_counts, "val": self.val_counts}[split]


# ----------------------------------------------------------------------------------------------------
# What the pixels show


class Clip:
    """A scene rendered over ``num_frames`` (1 for an image), computed on first use: the frames, the visible object
    ids and each object's whole (amodal) mask, occluded parts included."""

    def __init__(self, scene: Scene, num_frames: int, size: int) -> None:
        self.scene, self.num_frames, self.size = scene, num_frames, size

    @functools.cached_property
    def _rendered(self) -> tuple[np.ndarray, np.ndarray]:
        return render_video(self.scene, self.num_frames, self.size)

    @property
    def frames(self) -> np.ndarray:
        """(T, S, S, 3) uint8."""
        return self._rendered[0]

    @property
    def ids(self) -> np.ndarray:
        """(T, S, S) uint8: 0 background, i + 1 where ``scene.objects[i]`` shows."""
        return self._rendered[1]

    @functools.cached_property
    def amodal(self) -> np.ndarray:
        """(N, T, S, S) bool: each object rendered alone."""
        alone = [Scene("solid", self.scene.bg_colours, 0.0, 0, [o]) for o in self.scene.objects]
        return np.stack([render_video(s, self.num_frames, self.size)[1] > 0 for s in alone])

    def visible(self, i: int, t: int = 0) -> float:
        """Fraction of object i's pixels that show in frame t."""
        area = self.amodal[i, t].sum()
        return float((self.ids[t] == i + 1).sum() / area) if area else 0.0

    def hidden_by(self, back: int, front: int) -> float:
        """Largest fraction, over the frames, of object ``back`` covered by visible pixels of object ``front``."""
        covered = (self.amodal[back] & (self.ids == front + 1)).sum((1, 2))
        return float((covered / np.maximum(self.amodal[back].sum((1, 2)), 1)).max())

    def overlaps(self, a: int, b: int) -> bool:
        return bool((self.amodal[a] & self.amodal[b]).any())

    def may_overlap(self, a: int, b: int) -> bool:
        """False when objects a and b stay apart in every frame, from their centres alone (every shape fits in 1.1
        circumradii, as ``synthetic._render`` relies on)."""
        oa, ob = self.scene.objects[a], self.scene.objects[b]
        reach = 1.1 * (oa.size + ob.size)
        return any(np.hypot(*np.subtract(oa.position(t), ob.position(t))) < reach for t in range(self.num_frames))


def shape_name(scene: Scene, i: int) -> str:
    return CLASS_NAMES[scene.objects[i].label]


def unique_shape(scene: Scene, i: int) -> bool:
    return sum(o.label == scene.objects[i].label for o in scene.objects) == 1


def unique_colour(scene: Scene, i: int) -> bool:
    return sum(o.colour == scene.objects[i].colour for o in scene.objects) == 1


def short_name(scene: Scene, i: int) -> str | None:
    """"the star" when it is the only star, "the red star" when it is the only red star, else None."""
    obj = scene.objects[i]
    if unique_shape(scene, i):
        return f"the {shape_name(scene, i)}"
    if sum(o.label == obj.label and o.colour == obj.colour for o in scene.objects) == 1:
        return f"the {obj.colour} {shape_name(scene, i)}"
    return None


def full_name(colour: str, label: int) -> str:
    return f"the {colour} {CLASS_NAMES[label]}"


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def all_visible(clip: Clip) -> bool:
    return all(clip.visible(i) >= MIN_VISIBLE for i in range(len(clip.scene.objects)))


# ----------------------------------------------------------------------------------------------------
# Questions: each returns a QA, or None when the scene has no question of its kind with one clear answer.


@dataclass
class QA:
    question: str
    answer: str
    """The answer text; for multiple choice the right option's text."""
    options: list[str] | None = None
    """Multiple choice: the options in the order shown (A, B, ...)."""
    group: str = ""
    """Answers are balanced within a group of questions: no answer takes more than ``max_share`` of its group."""
    max_share: float = 1.0


def ask_caption(clip: Clip, rng: np.random.Generator) -> QA | None:
    if not all_visible(clip):
        return None
    return QA(CAPTION_PROMPTS[rng.integers(len(CAPTION_PROMPTS))], caption(clip.scene))


def _pick(askable: list[int], rng: np.random.Generator) -> int | None:
    return askable[rng.integers(len(askable))] if askable else None


def ask_colour(clip: Clip, rng: np.random.Generator) -> QA | None:
    scene = clip.scene
    i = _pick([i for i in range(len(scene.objects)) if unique_shape(scene, i) and clip.visible(i) >= MIN_VISIBLE], rng)
    if i is None:
        return None
    question = f"What colour is the {shape_name(scene, i)}?"
    return QA(question, scene.objects[i].colour, group=question, max_share=PRIOR_SHARE)


def ask_shape(clip: Clip, rng: np.random.Generator) -> QA | None:
    scene = clip.scene
    i = _pick([i for i in range(len(scene.objects)) if unique_colour(scene, i) and clip.visible(i) >= MIN_VISIBLE], rng)
    if i is None:
        return None
    question = f"What shape is the {scene.objects[i].colour} object?"
    return QA(question, shape_name(scene, i), group=question, max_share=PRIOR_SHARE)


def ask_count(clip: Clip, rng: np.random.Generator) -> QA | None:
    if not all_visible(clip):
        return None
    labels = [o.label for o in clip.scene.objects]
    if rng.random() < 0.5:
        return QA("How many objects are there?", str(len(labels)), group="objects", max_share=MAX_SHARE)
    # One shape the scene lacks among those it has: "0" is an answer, but not the usual one.
    absent = [k for k in range(len(CLASS_NAMES)) if k not in labels]
    choices = sorted(set(labels)) + [absent[rng.integers(len(absent))]]
    label = choices[rng.integers(len(choices))]
    # Mostly 0 or 1 (a shape repeats in a scene now and then): a looser share keeps "2" from being forced
    # past what scenes offer.
    return QA(f"How many {plural(CLASS_NAMES[label])} are there?", str(labels.count(label)), group="shapes",
              max_share=SHAPE_COUNT_SHARE)


def position_pairs(clip: Clip) -> list[tuple[int, int, int]]:
    """(a, b, axis) with a and b nameable, visible and clearly apart along axis (0: x, 1: y)."""
    scene, out = clip.scene, []
    named = [i for i in range(len(scene.objects)) if short_name(scene, i) and clip.visible(i) >= MIN_VISIBLE]
    for a in named:
        for b in named:
            oa, ob = scene.objects[a], scene.objects[b]
            gap = max(MIN_SEPARATION, 0.5 * (oa.size + ob.size))
            out += [(a, b, axis) for axis, d in enumerate((oa.x - ob.x, oa.y - ob.y)) if a != b and abs(d) >= gap]
    return out


def ask_position(clip: Clip, rng: np.random.Generator) -> QA | None:
    pairs = position_pairs(clip)
    if not pairs:
        return None
    a, b, axis = pairs[rng.integers(len(pairs))]
    scene = clip.scene
    first, second = short_name(scene, a), short_name(scene, b)
    if axis == 0:
        answer = "left" if scene.objects[a].x < scene.objects[b].x else "right"
        return QA(f"Is {first} left or right of {second}?", answer, group="position", max_share=MAX_SHARE)
    answer = "above" if scene.objects[a].y < scene.objects[b].y else "below"  # y grows downwards
    return QA(f"Is {first} above or below {second}?", answer, group="position", max_share=MAX_SHARE)


def direction(clip: Clip, i: int) -> str | None:
    """Where object i goes over the clip, when one axis dominates and it does not bounce along that axis."""
    obj, last = clip.scene.objects[i], clip.num_frames - 1
    axis = int(abs(obj.vy) > abs(obj.vx))
    v, other = (obj.vx, obj.vy)[axis], (obj.vy, obj.vx)[axis]
    path = [obj.position(t)[axis] for t in range(clip.num_frames)]
    straight = all(abs(q - p - v) < 1e-9 for p, q in zip(path, path[1:]))  # a bounce reverses a step
    if abs(v) < DOMINANCE * abs(other) or abs(v) * last < MIN_TRAVEL or not straight:
        return None
    return (("left", "right"), ("up", "down"))[axis][int(v > 0)]


def choice(question: str, answer: str, distractors: list[str], rng: np.random.Generator, **balance) -> QA:
    """Multiple choice: the answer first, then the first distractors in a random order (``task_samples`` then moves
    the answer to its letter)."""
    others = distractors[: len(LETTERS) - 1]
    return QA(question, answer, [answer] + [others[k] for k in rng.permutation(len(others))], **balance)


def ask_motion(clip: Clip, rng: np.random.Generator) -> QA | None:
    scene, last = clip.scene, clip.num_frames - 1
    i = _pick([i for i in range(len(scene.objects)) if short_name(scene, i) and direction(clip, i)
               and min(clip.visible(i, 0), clip.visible(i, last)) >= MIN_VISIBLE], rng)
    if i is None:
        return None
    answer = direction(clip, i)
    return choice(f"Which direction does {short_name(scene, i)} move?", answer, [d for d in DIRECTIONS if d != answer],
                  rng, group="motion", max_share=MAX_SHARE)


def ask_video_colour(clip: Clip, rng: np.random.Generator) -> QA | None:
    scene = clip.scene
    i = _pick([i for i in range(len(scene.objects)) if unique_shape(scene, i) and clip.visible(i) >= MIN_VISIBLE], rng)
    if i is None:
        return None
    answer = scene.objects[i].colour
    # The other objects' colours first, so that telling which colour belongs to which shape is the task.
    others = list(dict.fromkeys(o.colour for o in scene.objects if o.colour != answer))
    rest = [c for c in COLOURS if c != answer and c not in others]
    others = [others[k] for k in rng.permutation(len(others))] + [rest[k] for k in rng.permutation(len(rest))]
    question = f"What colour is the {shape_name(scene, i)} in the video?"
    return choice(question, answer, others, rng, group=question, max_share=PRIOR_SHARE)


def order_questions(clip: Clip) -> list[tuple[str, int, int]]:
    """("front" | "back", asked-about object i, answer object j): j is the one object on that side of i that
    overlaps it during the clip, and visibly hides at least MIN_OCCLUDED of the back one of the two in some frame."""
    scene, n = clip.scene, len(clip.scene.objects)
    near = {(i, j) for i in range(n) for j in range(n) if i != j and clip.may_overlap(i, j)}
    if not near:  # no pair comes close: spares rendering every object alone
        return []
    seen = [max(clip.visible(i, t) for t in range(clip.num_frames)) >= MIN_VISIBLE for i in range(n)]
    out = []
    for i, obj in enumerate(scene.objects):
        touching = [j for j in range(n) if (i, j) in near and clip.overlaps(i, j)]
        for side, ahead in (("front", 1), ("back", -1)):
            on_side = [j for j in touching if (scene.objects[j].depth - obj.depth) * ahead > 0]
            if len(on_side) != 1 or not (seen[i] and seen[on_side[0]]):
                continue
            j = on_side[0]
            back, front = (i, j) if side == "front" else (j, i)
            if clip.hidden_by(back, front) >= MIN_OCCLUDED:
                out.append((side, i, j))
    return out


def world_object(rng: np.random.Generator) -> tuple[str, int]:
    """(colour, label) drawn as ``sample_scene`` draws an object's, so that a made-up option looks like a real one."""
    label = int(rng.integers(len(CLASS_NAMES)))
    colour = COLOURS[label] if rng.random() < CLASS_COLOUR_PROB else COLOURS[rng.integers(len(COLOURS))]
    return colour, label


def ask_order(clip: Clip, rng: np.random.Generator) -> QA | None:
    scene = clip.scene
    kinds = {(o.colour, o.label) for o in scene.objects}
    if len(kinds) < len(scene.objects):  # two objects of one colour and shape: options could not tell them apart
        return None
    questions = order_questions(clip)
    if not questions:
        return None
    side, i, j = questions[rng.integers(len(questions))]
    name = full_name(scene.objects[i].colour, scene.objects[i].label)
    question = (f"Which object covers part of {name} during the video?" if side == "front" else
                f"Which object is partly hidden behind {name} during the video?")
    others = [full_name(o.colour, o.label) for k, o in enumerate(scene.objects) if k not in (i, j)]
    while len(others) < len(LETTERS) - 1:  # objects the scene lacks fill the options up
        colour, label = world_object(rng)
        if (colour, label) not in kinds and full_name(colour, label) not in others:
            others.append(full_name(colour, label))
    return choice(question, full_name(scene.objects[j].colour, scene.objects[j].label), others, rng)


ASK = {"image_caption": ask_caption, "image_colour": ask_colour, "image_shape": ask_shape, "image_count": ask_count,
       "image_position": ask_position, "video_motion": ask_motion, "video_order": ask_order,
       "video_colour": ask_video_colour}


# ----------------------------------------------------------------------------------------------------
# Samples


def format_option(index: int, option: str) -> str:
    return f"{LETTERS[index]}. {option}"


def mcq_choices(meta: dict) -> list[str]:
    """The candidate assistant answers of a multiple-choice sample's json, in option order ("A. left", ...); the
    right one is ``mcq_choices(meta)[meta["answer"]]``."""
    return [format_option(k, option) for k, option in enumerate(meta["options"])]


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _sample(cfg: ConversationWorldConfig, key: str, task: str, clip: Clip, qa: QA, scene_ref: dict) -> dict:
    video = task in VIDEO_TASKS
    meta: dict = {"task": task, "media": "video" if video else "image"}
    if qa.options is not None:
        index = qa.options.index(qa.answer)
        prompt = "\n".join([qa.question, *mcq_choices({"options": qa.options}), MCQ_INSTRUCTION])
        reply, meta["options"], meta["answer"] = format_option(index, qa.answer), qa.options, index
    else:
        prompt = qa.question if task == "image_caption" else f"{qa.question}\n{SHORT_ANSWER}"
        reply = meta["answer"] = qa.answer
    marker = VIDEO_MARKER if video else IMAGE_MARKER
    meta["conversations"] = [{"from": "human", "value": f"{marker}\n{prompt}"}, {"from": "assistant", "value": reply}]
    meta["scene"] = scene_ref
    sample = {"__key__": key}
    if video:
        meta.update(fps=cfg.fps, num_frames=clip.num_frames)
        sample.update({f"{t:03d}.jpg": _jpeg(frame) for t, frame in enumerate(clip.frames)})
    else:
        sample["jpg"] = _jpeg(clip.frames[0])
    sample["json"] = json.dumps(meta).encode()
    return sample


class _Balance:
    """Passes over a question whose answer already has its share of the question's group (one answer of slack, so
    that the first questions of a group are not refused)."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter] = defaultdict(Counter)

    def admit(self, qa: QA) -> bool:
        group = self.counts[qa.group]
        if group[qa.answer] + 1 > qa.max_share * (sum(group.values()) + 1) + 1:
            return False
        group[qa.answer] += 1
        return True


def task_samples(cfg: ConversationWorldConfig, split: str, task: str) -> Iterator[dict]:
    """The task's conversations of ``split`` in order, ``cfg.counts(split)[task]`` of them."""
    count = cfg.counts(split).get(task, 0)
    video = task in VIDEO_TASKS
    stream = f"{split}-video" if video else split
    num_frames, size = (cfg.video_frames, cfg.video_size) if video else (1, cfg.image_size)
    balance, index, made, limit = _Balance(), 0, 0, 200 * count + 1000
    while made < count:
        if index >= limit:
            raise RuntimeError(f"{task}: only {made} of {count} {split} questions found in {limit} scenes: too "
                               "small an image_size / video_size hides objects, too few video_frames hide motion "
                               f"(MIN_TRAVEL {MIN_TRAVEL})")
        clip = Clip(sample_scene(cfg.seed, index, stream), num_frames, size)
        qa = ASK[task](clip, np.random.default_rng([cfg.seed, zlib.crc32(f"{split}/{task}".encode()), index]))
        index += 1
        if qa is None or not balance.admit(qa):
            continue
        if qa.options is not None:  # every letter answers one of each four questions: no letter is a safe guess
            slot = np.random.default_rng([cfg.seed, zlib.crc32(f"{split}/{task}".encode()), 3, made // 4])
            qa.options.insert(int(slot.permutation(len(LETTERS))[made % 4]), qa.options.pop(0))
        yield _sample(cfg, f"{split}-{task}-{made:06d}", task, clip, qa,
                      {"seed": cfg.seed, "split": stream, "index": index - 1})
        made += 1


def generate(cfg: ConversationWorldConfig, split: str) -> Iterator[dict]:
    """Every conversation of ``split``, tasks interleaved in a seeded order (so that a shard, and a batch read from
    it, mixes them)."""
    counts = cfg.counts(split)
    slots = [task for task in TASKS for _ in range(counts.get(task, 0))]
    streams = {task: task_samples(cfg, split, task) for task in counts}
    for k in np.random.default_rng([cfg.seed, zlib.crc32(split.encode()), 2]).permutation(len(slots)):
        yield next(streams[slots[k]])


def _meta(sample: dict) -> dict:
    meta = sample["json"] if "json" in sample else sample
    return json.loads(meta) if isinstance(meta, (bytes, str)) else meta


def answer_text(meta: dict) -> str:
    return meta["options"][meta["answer"]] if "options" in meta else meta["answer"]


def question_text(meta: dict) -> str:
    """The question alone: the human turn's first line after the media marker (no options, no instruction)."""
    lines = [line for line in meta["conversations"][0]["value"].split("\n") if line not in (IMAGE_MARKER, VIDEO_MARKER)]
    return lines[0]


_NAME_WORDS = re.compile(r"\b(" + "|".join(sorted({*CLASS_NAMES, *map(plural, CLASS_NAMES), *COLOURS}, key=len,
                                                    reverse=True)) + r")\b")


def question_form(question: str) -> str:
    """The question with its shape and colour words blanked: "Is the {} left or right of the {}?"."""
    return _NAME_WORDS.sub("{}", question)


def majority_baseline(samples: Iterable[dict]) -> dict[str, float]:
    """Accuracy per task of always giving the task's most frequent answer in ``samples`` (the val split's, so a bound
    on what a model that learned only the answer prior scores). Multiple choice: the better of always the most
    frequent letter and always the option that is most often the answer among the other questions. Takes samples
    (with ``json``) or their json dicts.
    """
    by_task: dict[str, list[dict]] = defaultdict(list)
    for sample in samples:
        meta = _meta(sample)
        by_task[meta["task"]].append(meta)
    out = {}
    for task, metas in sorted(by_task.items()):
        prior = Counter(answer_text(m) for m in metas)
        if "options" not in metas[0]:
            out[task] = prior.most_common(1)[0][1] / len(metas)
            continue
        letters = Counter(m["answer"] for m in metas).most_common(1)[0][1]
        # Each question's own answer is left out of the counts: options are many and mostly rare, so counting it
        # would rank the right option first just for having been counted.
        by_prior = sum(max(range(len(m["options"])), key=lambda k: (prior[m["options"][k]] - (k == m["answer"]), -k))
                       == m["answer"] for m in metas)
        out[task] = max(letters, by_prior) / len(metas)
    return out


MIN_PRIOR = 5
"""text_only_baseline trusts a question's (or form's) answer counts from this many samples on."""


def text_only_baseline(samples: Iterable[dict], prior: Iterable[dict]) -> dict[str, float]:
    """Accuracy per task of a model that reads the question but not the pixels and has learned the answers of
    ``prior`` (the train split): it gives the answer most frequent in ``prior`` for the same question, else for the
    same question form (``question_form``; "Is the {} left or right of the {}?" gives left or right), else for the
    task, a table deciding once it has MIN_PRIOR answers. Multiple choice: the option so ranked first (the first
    shown on a tie). Above ``majority_baseline`` wherever the question gives the answer away in part.
    """
    tables: dict[tuple, Counter] = defaultdict(Counter)
    for meta in map(_meta, prior):
        question, task = question_text(meta), meta["task"]
        for key in ((task, question), (task, question_form(question)), (task,)):
            tables[key][answer_text(meta)] += 1
    hits: dict[str, list[bool]] = defaultdict(list)
    for meta in map(_meta, samples):
        question, task = question_text(meta), meta["task"]
        keys = [(task, question), (task, question_form(question)), (task,)]
        counts = [tables[k] for k in keys if k in tables]
        counts = [c for k, c in enumerate(counts) if sum(c.values()) >= MIN_PRIOR or k == len(counts) - 1]
        counts = counts or [Counter()]
        candidates = meta["options"] if "options" in meta else list(counts[0]) or [""]
        ranked = max(range(len(candidates)), key=lambda k: (tuple(c[candidates[k]] for c in counts), -k))
        hits[task].append(candidates[ranked] == answer_text(meta))
    return {task: float(np.mean(h)) for task, h in sorted(hits.items())}


# ----------------------------------------------------------------------------------------------------
# The cached shard world


@dataclass
class ConversationWorld:
    """Where a built conversation world lives; ``*_shards`` are brace specs (``/dir/train-{000000..000027}.tar``)."""

    root: str
    train_shards: str
    val_shards: str
    num_train: int
    num_val: int
    baseline: dict[str, float]
    """Majority baseline per task on val (``majority_baseline``)."""
    text_only: dict[str, float]
    """Text-only baseline per task on val, learned from train (``text_only_baseline``)."""


def load_conversation_world(directory: str) -> ConversationWorld:
    with open(os.path.join(directory, "world.json")) as f:
        w = json.load(f)
    return ConversationWorld(directory, os.path.join(directory, w["train"]), os.path.join(directory, w["val"]),
                             w["num_train"], w["num_val"], w["majority_baseline"],
                             w["text_only_baseline"])


def _write_split(cfg: ConversationWorldConfig, split: str, directory: str, source: str) -> tuple[str, list[dict]]:
    metas = []
    with ShardWriter(directory, split, max_count=cfg.samples_per_shard, source=source) as writer:
        for sample in generate(cfg, split):
            writer.write(sample)
            metas.append(json.loads(sample["json"]))
    return f"{split}-{{000000..{len(writer.shards) - 1:06d}}}.tar", metas


def write_conversation_world(cfg: ConversationWorldConfig, output_dir: str) -> ConversationWorld:
    """Write the world into ``output_dir`` (must not exist): built in a temporary sibling, then renamed."""
    if os.path.exists(output_dir):
        raise FileExistsError(f"{output_dir} already exists; pick a new --output directory")
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(output_dir)}.tmp-")
    start = time.perf_counter()
    try:
        source = f"datamodules.synthetic_conversations v{GENERATOR_VERSION} {json.dumps(asdict(cfg), sort_keys=True)}"
        train, train_metas = _write_split(cfg, "train", tmp, source)
        val, val_metas = _write_split(cfg, "val", tmp, source)
        meta = {"config": asdict(cfg), "version": GENERATOR_VERSION, "world_version": synthetic.GENERATOR_VERSION,
                "num_train": len(train_metas), "num_val": len(val_metas), "train": train, "val": val,
                "majority_baseline": majority_baseline(val_metas),
                "text_only_baseline": text_only_baseline(val_metas, train_metas),
                "answers": {split: _answer_counts(metas) for split, metas in (("train", train_metas),
                                                                               ("val", val_metas))},
                "build_seconds": round(time.perf_counter() - start, 2)}
        with open(os.path.join(tmp, "world.json"), "w") as f:
            json.dump(meta, f, indent=1)
        os.rename(tmp, output_dir)  # fails if another process got there first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_conversation_world(output_dir)


def _answer_counts(metas: list[dict]) -> dict[str, dict[str, int]]:
    """Per task, how often each answer occurs (options' text for multiple choice); captions are left out."""
    out: dict[str, Counter] = defaultdict(Counter)
    for m in metas:
        if m["task"] != "image_caption":
            out[m["task"]][answer_text(m)] += 1
    return {task: dict(c.most_common()) for task, c in sorted(out.items())}


def ensure_conversation_world(cfg: ConversationWorldConfig | None = None, root: str | None = None) -> ConversationWorld:
    """Shards of the conversations described by ``cfg``, built on first use and cached under ``root``.

    ``root`` defaults to ``$PRISM_CACHE`` or ``~/.cache/prism``. Safe when several processes (DDP ranks) call it at
    once: each may build, the first rename wins and the others use its result.
    """
    cfg = cfg or ConversationWorldConfig()
    root = root or os.environ.get("PRISM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "prism")
    key = json.dumps({"version": GENERATOR_VERSION, "world_version": synthetic.GENERATOR_VERSION, **asdict(cfg)},
                     sort_keys=True)
    final = os.path.join(root, "conversations", hashlib.sha1(key.encode()).hexdigest()[:12])
    if os.path.exists(os.path.join(final, "world.json")):
        return load_conversation_world(final)
    if os.path.exists(final):
        raise RuntimeError(f"{final} exists but holds no world.json (not written by Prism?); delete it to rebuild")
    start = time.perf_counter()
    try:
        world = write_conversation_world(cfg, final)
    except OSError:  # lost the race (rename onto a non-empty directory, or the existence check)
        if not os.path.exists(os.path.join(final, "world.json")):
            raise
        return load_conversation_world(final)
    log.info("synthetic conversations: built %d train + %d val in %s (%.1f s)", world.num_train, world.num_val, final,
             time.perf_counter() - start)
    return world


def main(argv: list[str] | None = None) -> None:
    from jsonargparse import ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # field docstrings become --help
    parser = ArgumentParser(prog="python -m datamodules.synthetic_conversations",
                            description="Write the synthetic world's conversation shards.")
    parser.add_argument("--output", type=str, required=True, help="New directory to write the shards into.")
    parser.add_class_arguments(ConversationWorldConfig, None, as_group=True)
    args = vars(parser.parse_args(argv))
    output = args.pop("output")
    world = write_conversation_world(ConversationWorldConfig(**args), output)
    with open(os.path.join(world.root, "world.json")) as f:
        seconds = json.load(f)["build_seconds"]
    print(f"wrote {world.num_train} train and {world.num_val} val conversations to {world.root} in {seconds:.1f} s\n"
          f"  train: {world.train_shards}\n  val:   {world.val_shards}\n  val accuracy without looking (majority / "
          "text-only):\n" + "\n".join(f"    {task:15s} {acc:.2f} / {world.text_only[task]:.2f}"
                                      for task, acc in world.baseline.items()))


if __name__ == "__main__":
    main()
