import io
import json
import logging
import os
import re
from dataclasses import asdict

import numpy as np
import pytest
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

from datamodules import synthetic as S
from datamodules import synthetic_conversations as C
from datamodules.shard_writer import read_index
from datamodules.streams import ShardReader

TINY = C.ConversationWorldConfig(image_size=48, video_size=48, video_frames=6, fps=4.0,
                                 train_counts={task: 12 for task in C.TASKS}, val_counts={task: 8 for task in C.TASKS},
                                 samples_per_shard=32)
QA_TASKS = [task for task in C.TASKS if task != "image_caption"]


def metas(samples):
    return [json.loads(s["json"]) for s in samples]


@pytest.fixture(scope="module")
def tiny():
    return {split: list(C.generate(TINY, split)) for split in ("train", "val")}


@pytest.fixture(scope="module")
def default_val():
    return metas(C.generate(C.ConversationWorldConfig(), "val"))


def one(label, x=0.5, y=0.5, size=0.2, depth=0, colour="red", vx=0.0, vy=0.0):
    return S.SceneObject(label, colour, "solid", x, y, size, 0.0, depth, vx, vy)


def scene(*objects):
    return S.Scene("solid", ("gray", "cyan"), 0.0, 0, list(objects))


# -- questions about hand-made scenes -------------------------------------------------------------------
CIRCLE, SQUARE, STAR = (S.CLASS_NAMES.index(n) for n in ("circle", "square", "star"))


def test_a_question_names_only_what_it_can_tell_apart():
    two_circles = scene(one(CIRCLE, x=0.25, colour="red"), one(CIRCLE, x=0.75, colour="blue"))
    clip = C.Clip(two_circles, 1, 64)
    assert C.ask_colour(clip, np.random.default_rng(0)) is None  # "the circle" would be either
    assert C.short_name(two_circles, 0) == "the red circle"
    assert C.ask_shape(clip, np.random.default_rng(0)).question in ("What shape is the red object?",
                                                                     "What shape is the blue object?")
    same = scene(one(CIRCLE, x=0.25), one(SQUARE, x=0.75))  # both red
    assert C.ask_shape(C.Clip(same, 1, 64), np.random.default_rng(0)) is None


def test_hidden_objects_are_not_asked_about_or_counted():
    # a small star entirely behind a large square: the caption and count would name an object nobody can see
    hidden = scene(one(SQUARE, size=0.35, depth=1, colour="blue"), one(STAR, size=0.1, depth=0, colour="red"))
    clip = C.Clip(hidden, 1, 64)
    assert clip.visible(1) == 0.0 and clip.visible(0) == 1.0
    rng = np.random.default_rng(0)
    assert C.ask_count(clip, rng) is None and C.ask_caption(clip, rng) is None
    assert C.ask_colour(clip, rng).question == "What colour is the square?"  # the visible one only


def test_position_needs_clear_separation():
    close = scene(one(CIRCLE, x=0.45, y=0.5, size=0.1), one(SQUARE, x=0.55, y=0.2, size=0.1, colour="blue"))
    # 0.1 apart in x (< 0.15): only above/below can be asked; 0.3 apart in y
    assert {axis for _, _, axis in C.position_pairs(C.Clip(close, 1, 64))} == {1}
    qa = C.ask_position(C.Clip(close, 1, 64), np.random.default_rng(0))
    assert (qa.question, qa.answer) in (("Is the circle above or below the square?", "below"),
                                        ("Is the square above or below the circle?", "above"))


@pytest.mark.parametrize("obj, expected", [
    (one(CIRCLE, x=0.3, size=0.1, vx=0.03), "right"),
    (one(CIRCLE, x=0.7, size=0.1, vx=-0.03, vy=0.01), "left"),
    (one(CIRCLE, y=0.7, size=0.1, vy=-0.04), "up"),  # y grows downwards
    (one(CIRCLE, x=0.3, size=0.1, vx=0.03, vy=0.02), None),  # heading 34 degrees off the axis
    (one(CIRCLE, x=0.3, size=0.1, vx=0.01), None),  # 0.07 in 8 frames: too little to see
    (one(CIRCLE, x=0.85, size=0.1, vx=0.03), None),  # bounces off the right border (0.93) on the way
])
def test_motion_direction(obj, expected):
    assert C.direction(C.Clip(scene(obj), 8, 64), 0) == expected


def test_order_asks_about_the_one_object_that_overlaps():
    back = one(CIRCLE, x=0.5, size=0.25, depth=0, colour="red")
    front = one(SQUARE, x=0.15, size=0.15, depth=1, colour="blue", vx=0.05)  # slides over the circle
    far = one(STAR, x=0.5, y=0.1, size=0.08, depth=2, colour="green")  # in front of both, touches neither
    clip = C.Clip(scene(back, front, far), 8, 64)
    assert sorted(C.order_questions(clip)) == [("back", 1, 0), ("front", 0, 1)]
    qa = C.ask_order(clip, np.random.default_rng(0))
    assert qa.answer in ("the red circle", "the blue square") and len(qa.options) == 4
    assert "the green star" in qa.options  # the scene's other object is a distractor
    clip_apart = C.Clip(scene(back, one(SQUARE, x=0.1, y=0.9, size=0.08, depth=1, colour="blue")), 8, 64)
    assert C.order_questions(clip_apart) == [] and C.ask_order(clip_apart, np.random.default_rng(0)) is None


# -- generated samples ------------------------------------------------------------------------------------
def test_same_config_gives_the_same_bytes(tiny):
    again = list(C.generate(TINY, "train"))
    assert len(again) == len(tiny["train"]) == 8 * 12
    assert all(a == b for a, b in zip(again, tiny["train"]))  # every field, image bytes included
    other = list(C.generate(C.ConversationWorldConfig(**{**asdict(TINY), "seed": 1}), "train"))
    assert [s["json"] for s in other] != [s["json"] for s in again]


def test_sample_layout(tiny):
    for sample in tiny["train"]:
        meta = json.loads(sample["json"])
        human, reply = meta["conversations"]
        assert human["from"] == "human" and reply["from"] == "assistant"
        if meta["media"] == "image":
            assert human["value"].startswith("<image>\n") and "<video>" not in human["value"]
            assert Image.open(io.BytesIO(sample["jpg"])).size == (48, 48)
            assert not any(re.fullmatch(r"\d+\.jpg", k) for k in sample)
        else:
            assert human["value"].startswith("<video>\n") and "<image>" not in human["value"]
            assert sorted(k for k in sample if k.endswith(".jpg")) == [f"{t:03d}.jpg" for t in range(6)]
            assert (meta["fps"], meta["num_frames"]) == (4.0, 6)
        if meta["task"] == "image_caption":
            assert human["value"].split("\n", 1)[1] in C.CAPTION_PROMPTS
        elif "options" not in meta:
            assert human["value"].endswith(C.SHORT_ANSWER) and reply["value"] == meta["answer"]
            assert len(meta["answer"].split()) == 1  # one word or number: exact match is meaningful
    tasks = [json.loads(s["json"])["task"] for s in tiny["train"]]
    assert len(set(tasks[:24])) >= 5  # tasks interleaved, not one after the other


def test_multiple_choice(tiny):
    mcq = [m for m in metas(tiny["train"] + tiny["val"]) if m["task"] in C.VIDEO_TASKS]
    assert mcq
    for meta in mcq:
        options, answer = meta["options"], meta["answer"]
        human, reply = (t["value"] for t in meta["conversations"])
        assert len(options) == 4 == len(set(options)) and options.count(options[answer]) == 1
        assert reply == f"{'ABCD'[answer]}. {options[answer]}" == C.mcq_choices(meta)[answer]
        assert [line for line in human.split("\n") if re.match(r"[A-D]\. ", line)] == C.mcq_choices(meta)
        assert human.endswith(C.MCQ_INSTRUCTION)
    for task in C.VIDEO_TASKS:  # every letter answers one of each four questions
        letters = [m["answer"] for m in metas(C.task_samples(TINY, "train", task))]
        assert all(sorted(letters[k:k + 4]) == [0, 1, 2, 3] for k in range(0, 12, 4))


def named(sc, name):
    """Indices of the objects 'the star' / 'the red star' refers to."""
    words = name.removeprefix("the ").split()
    return [i for i, o in enumerate(sc.objects)
            if S.CLASS_NAMES[o.label] == words[-1] and (len(words) == 1 or o.colour == words[0])]


def visible_fraction(sc, i, t, size):
    ids = S.render_video(sc, t + 1, size)[1][t]
    alone = S.render_video(S.Scene("solid", sc.bg_colours, 0.0, 0, [sc.objects[i]]), t + 1, size)[1][t]
    return (ids == i + 1).sum() / (alone > 0).sum()


def check_image_answer(meta, sc):
    question, answer = C.question_text(meta), meta["answer"]
    if meta["task"] == "image_caption":
        assert answer == S.caption(sc)
    elif meta["task"] in ("image_colour", "image_shape"):
        if meta["task"] == "image_colour":
            (i,) = named(sc, re.fullmatch(r"What colour is (the \w+)\?", question).group(1))  # the only one
            assert sc.objects[i].colour == answer
        else:
            colour = re.fullmatch(r"What shape is the (\w+) object\?", question).group(1)
            (i,) = [k for k, o in enumerate(sc.objects) if o.colour == colour]
            assert S.CLASS_NAMES[sc.objects[i].label] == answer
        assert visible_fraction(sc, i, 0, TINY.image_size) >= 0.5
    elif meta["task"] == "image_count":
        shape = re.fullmatch(r"How many (\w+) are there\?", question).group(1)
        labels = [S.CLASS_NAMES[o.label] for o in sc.objects]
        expected = len(labels) if shape == "objects" else sum(shape in (n + "s", n + "es") for n in labels)
        assert answer == str(expected)
        assert all(visible_fraction(sc, i, 0, TINY.image_size) >= 0.5 for i in range(len(labels)))
    else:
        a, relation, b = re.fullmatch(r"Is (the .+?) (left or right of|above or below) (the .+?)\?", question).groups()
        (i,), (j,) = named(sc, a), named(sc, b)
        axis = 0 if relation.startswith("left") else 1
        d = (sc.objects[i].x - sc.objects[j].x, sc.objects[i].y - sc.objects[j].y)[axis]
        assert abs(d) >= 0.15 and answer == (("right", "left"), ("below", "above"))[axis][int(d < 0)]


def check_video_answer(meta, sc):
    question, answer = C.question_text(meta), meta["options"][meta["answer"]]
    frames = meta["num_frames"]
    if meta["task"] == "video_motion":
        (i,) = named(sc, re.fullmatch(r"Which direction does (the .+) move\?", question).group(1))
        path = np.array([sc.objects[i].position(t) for t in range(frames)])
        step = np.diff(path, axis=0)
        axis = {"left": 0, "right": 0, "up": 1, "down": 1}[answer]
        sign = 1 if answer in ("right", "down") else -1
        assert (sign * step[:, axis] > 0).all()  # every frame moves that way: no bounce on the way
        assert abs(path[-1, axis] - path[0, axis]) >= 2 * abs(path[-1, 1 - axis] - path[0, 1 - axis])
    elif meta["task"] == "video_colour":
        (i,) = named(sc, re.fullmatch(r"What colour is (the \w+) in the video\?", question).group(1))
        assert sc.objects[i].colour == answer
    else:
        covers = re.fullmatch(r"Which object covers part of (the .+) during the video\?", question)
        behind = re.fullmatch(r"Which object is partly hidden behind (the .+) during the video\?", question)
        (i,), (j,) = named(sc, (covers or behind).group(1)), named(sc, answer)
        front, back = (j, i) if covers else (i, j)
        assert sc.objects[front].depth > sc.objects[back].depth
        ids = S.render_video(sc, frames, TINY.video_size)[1]
        alone = S.render_video(S.Scene("solid", sc.bg_colours, 0.0, 0, [sc.objects[back]]), frames,
                               TINY.video_size)[1] > 0
        assert ((ids == front + 1) & alone).sum((1, 2)).max() > 0  # the pixels show it


def test_answers_are_true_of_the_scene(tiny):
    for meta in metas(tiny["train"] + tiny["val"]):
        ref = meta["scene"]
        sc = S.sample_scene(ref["seed"], ref["index"], ref["split"])
        (check_video_answer if meta["media"] == "video" else check_image_answer)(meta, sc)


def test_val_scenes_are_held_out(tiny):
    def scenes(split):
        return {json.dumps(asdict(S.sample_scene(**m["scene"]))) for m in metas(tiny[split])}

    refs = {split: {(m["scene"]["split"]) for m in metas(tiny[split])} for split in tiny}
    assert refs == {"train": {"train", "train-video"}, "val": {"val", "val-video"}}
    assert not scenes("train") & scenes("val")


def test_answers_are_balanced(default_val):
    assert len(default_val) == 8 * 64
    majority = C.majority_baseline(default_val)
    assert set(majority) == set(C.TASKS)
    for task in QA_TASKS:
        assert majority[task] < 0.45, (task, majority[task])
    # "What colour is the star?" is not "yellow" by default although the world draws stars yellow half the time
    prior = metas(C.generate(C.ConversationWorldConfig(train_counts={t: 150 for t in QA_TASKS}), "train"))
    text_only = C.text_only_baseline(default_val, prior)
    for task in QA_TASKS:
        assert text_only[task] < 0.6, (task, text_only[task])
    assert text_only["image_colour"] < 0.3 and text_only["image_shape"] < 0.3


def test_baselines_hand_worked():
    def open_q(task, question, answer):
        return {"task": task, "answer": answer, "conversations": [{"from": "human", "value": f"<image>\n{question}"}]}

    def mcq(question, options, answer):
        return {"task": "video_colour", "options": options, "answer": answer,
                "conversations": [{"from": "human", "value": f"<video>\n{question}\nA. x"}]}

    val = [open_q("image_colour", "What colour is the star?", a) for a in ("red", "red", "blue", "green")]
    # letters: A and B answer 2 of 4 each (0.5); options: "red" is the answer 3 times, but each question's own
    # answer is left out of its counts: q1 red (2) > blue (0), right; q2 the same; q3 red (3) > green (0), wrong;
    # q4 red (2) > green (1), right -> 0.75
    val += [mcq("q", ["red", "blue"], 0), mcq("q", ["blue", "red"], 1), mcq("q", ["red", "green"], 1),
            mcq("q", ["red", "green"], 0)]
    assert C.majority_baseline(val) == {"image_colour": 0.5, "video_colour": 0.75}
    prior = [open_q("image_colour", "What colour is the star?", "blue")] * 5
    prior += [open_q("image_colour", "What colour is the ring?", "green")] * 4  # fewer than MIN_PRIOR
    prior += [open_q("image_colour", "What colour is the heart?", "red")] * 2
    assert C.question_form("What colour is the star?") == "What colour is the {}?"
    rings = [open_q("image_colour", "What colour is the ring?", "blue")]  # the form's answer: blue (5 + 0 + 0)
    assert C.text_only_baseline(val[:4] + rings, prior) == {"image_colour": 0.4}  # blue, blue, blue, blue, blue


def test_config_is_checked():
    with pytest.raises(ValueError, match="unknown task"):
        C.ConversationWorldConfig(train_counts={"image_colours": 3})
    with pytest.raises(ValueError, match="video_frames"):
        C.ConversationWorldConfig(video_frames=1)
    # 2 frames move an object 0.05 at most, under MIN_TRAVEL: no motion question has a visible answer
    with pytest.raises(RuntimeError, match="video_motion: only 0 of 1 val questions .* too few video_frames"):
        list(C.task_samples(C.ConversationWorldConfig(video_frames=2, val_counts={"video_motion": 1}), "val",
                            "video_motion"))


# -- the shard world -----------------------------------------------------------------------------------
def test_ensure_builds_readable_shards_and_caches(tmp_path, caplog, tiny):
    with caplog.at_level(logging.INFO, logger="datamodules.synthetic_conversations"):
        world = C.ensure_conversation_world(TINY, root=str(tmp_path))
    assert len(caplog.records) == 1 and world.root.startswith(str(tmp_path / "conversations"))
    assert (world.num_train, world.num_val) == (96, 64)
    assert world.train_shards == os.path.join(world.root, "train-{000000..000002}.tar")  # 96 / 32
    assert read_index(list(braceexpand(world.val_shards))) == 64
    written = list(wds.WebDataset(list(braceexpand(world.train_shards)), shardshuffle=False, empty_check=False))
    assert [s["json"] for s in written] == [s["json"] for s in tiny["train"]]
    assert all(s["jpg"] == t["jpg"] for s, t in zip(written, tiny["train"]) if "jpg" in t)
    assert world.baseline == C.majority_baseline(tiny["val"])
    reader = ShardReader(("json",), 0.0, 1 << 30)
    decoded = list(reader.decode(reader.tar_samples(ShardReader.finite_urls(list(braceexpand(world.val_shards))))))
    assert len(decoded) == 64 and all(isinstance(s["json"], dict) for s in decoded)  # wds decodes json
    images = ShardReader(("jpg", "json"), 0.0, 1 << 30)
    first = next(images.decode(images.tar_samples(ShardReader.finite_urls(list(braceexpand(world.val_shards))))))
    assert first["jpg"].size == (48, 48)

    caplog.clear()
    stamp = os.path.getmtime(os.path.join(world.root, "world.json"))
    with caplog.at_level(logging.INFO, logger="datamodules.synthetic_conversations"):
        again = C.ensure_conversation_world(TINY, root=str(tmp_path))
    assert again == world and not caplog.records  # cache hit: silent, nothing rebuilt
    assert os.path.getmtime(os.path.join(world.root, "world.json")) == stamp
    other = C.ConversationWorldConfig(**{**asdict(TINY), "fps": 1.0})
    assert C.ensure_conversation_world(other, root=str(tmp_path)).root != world.root


def test_loser_of_the_rename_race_uses_the_winner(tmp_path, monkeypatch, caplog):
    real_rename = os.rename
    small = C.ConversationWorldConfig(image_size=32, video_size=32, video_frames=3, val_counts={"image_count": 2},
                                      train_counts={"image_caption": 4, "video_colour": 2})

    def rival_wins_first(src, dst):  # another rank finishes its build while ours is still running
        monkeypatch.setattr(os, "rename", real_rename)
        C.write_conversation_world(small, dst)
        real_rename(src, dst)  # raises: dst is a non-empty directory

    monkeypatch.setattr(os, "rename", rival_wins_first)
    with caplog.at_level(logging.INFO, logger="datamodules.synthetic_conversations"):
        world = C.ensure_conversation_world(small, root=str(tmp_path))
    assert os.listdir(tmp_path / "conversations") == [os.path.basename(world.root)]
    assert not caplog.records and world.num_train == 6


def test_cli_writes_a_world(tmp_path, capsys):
    C.main(["--output", str(tmp_path / "w"), "--image_size", "32", "--video_size", "32", "--video_frames", "6",
            "--train_counts", '{"image_colour": 3}', "--val_counts", '{"video_motion": 2}'])
    printed = capsys.readouterr().out
    assert "wrote 3 train and 2 val conversations" in printed and "video_motion" in printed
    world = C.load_conversation_world(str(tmp_path / "w"))
    assert set(world.baseline) == {"video_motion"}
    with pytest.raises(FileExistsError):
        C.main(["--output", str(tmp_path / "w")])
