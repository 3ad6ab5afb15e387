import io
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

from datamodules import synthetic as S
from datamodules.shard_writer import read_index

ROOT = Path(__file__).resolve().parents[2]
TINY = S.SyntheticWorldConfig(image_size=32, train_samples=40, val_samples=20, samples_per_shard=16,
                              video_samples=3, video_frames=4, video_size=24)


def one(label, x=0.5, y=0.5, size=0.4, depth=0, colour="red", texture="solid", vx=0.0, vy=0.0):
    return S.SceneObject(label, colour, texture, x, y, size, 0.0, depth, vx, vy)


def scene(*objects, background="solid", bg=("gray", "cyan")):
    return S.Scene(background, bg, 0.0, 0, list(objects))


# -- scenes ------------------------------------------------------------------------------------------
def test_sample_scene_is_a_function_of_seed_split_index():
    assert S.sample_scene(0, 7) == S.sample_scene(0, 7)
    assert S.sample_scene(0, 7) != S.sample_scene(0, 8)
    assert S.sample_scene(0, 7) != S.sample_scene(1, 7)
    assert S.sample_scene(0, 7, "train") != S.sample_scene(0, 7, "val")  # no train/val leakage
    assert np.array_equal(S.render_image(S.sample_scene(3, 1), 48), S.render_image(S.sample_scene(3, 1), 48))


def test_scene_invariants():
    counts = np.zeros(len(S.CLASS_NAMES))
    for i in range(300):
        sc = S.sample_scene(0, i)
        assert 1 <= len(sc.objects) <= 4
        assert sc.label == sc.objects[0].label
        assert all(o.size < sc.objects[0].size for o in sc.objects[1:])  # primary = largest
        assert sorted(o.depth for o in sc.objects) == list(range(len(sc.objects)))
        assert {o.colour for o in sc.objects}.isdisjoint(sc.bg_colours)
        counts[sc.label] += 1
    # uniform labels: each count ~ Binomial(300, 0.1), mean 30, std 5.2; 5 std either side
    assert counts.min() > 30 - 5 * math.sqrt(27) and counts.max() < 30 + 5 * math.sqrt(27)


def test_the_densest_scenes_keep_two_background_colours_no_object_wears():
    # 10 colours: 8 objects wear at most 8 of them, which leaves the background's two; a ninth could take one of those
    assert len(S.COLOURS) == 10
    sizes = set()
    for i in range(400):
        sc = S.sample_scene(0, i, "dense", max_objects=8)
        sizes.add(len(sc.objects))
        assert len(set(sc.bg_colours)) == 2 and {o.colour for o in sc.objects}.isdisjoint(sc.bg_colours)
    assert sizes == set(range(1, 9))
    for bad in (0, 9):
        with pytest.raises(ValueError, match=f"max_objects must be in 1..8, got {bad}"):
            S.sample_scene(0, 0, max_objects=bad)


# -- rendering, against hand-worked geometry --------------------------------------------------------------
def test_square_pixels_and_box():
    # square: |u|, |v| <= 0.75 circumradii = 0.3 of the side around 0.5 -> centres (j + 0.5) / 64 in
    # [0.2, 0.8] -> j in 13..50: 38 x 38 pixels, box [13, 13, 51, 51]
    sc = scene(one(S.CLASS_NAMES.index("square")))
    img, ids, boxes = S._render(sc, 64)
    assert (ids == 1).sum() == 38 * 38
    assert boxes == [[13, 13, 51, 51]]
    assert tuple(img[32, 32]) == S.PALETTE["red"] and tuple(img[0, 0]) == S.PALETTE["gray"]


def test_circle_area():
    ids = S.render_instance_masks(scene(one(S.CLASS_NAMES.index("circle"), size=0.25)), 64)
    assert abs((ids == 1).sum() - math.pi * 16**2) < 0.03 * math.pi * 16**2  # radius 0.25 x 64 = 16 px


def test_every_class_renders_a_distinct_nonempty_shape():
    masks = [S.render_instance_masks(scene(one(k)), 48) for k in range(len(S.CLASS_NAMES))]
    assert all(m.any() for m in masks)
    assert len({m.tobytes() for m in masks}) == len(S.CLASS_NAMES)


def test_textures_use_two_tones_of_the_object_colour():
    red = np.array(S.PALETTE["red"])
    for texture in ("stripes", "checker", "dots"):
        img, ids, _ = S._render(scene(one(0, texture=texture)), 64)
        tones = {tuple(c) for c in img[ids == 1]}
        assert tones == {tuple(red), tuple(np.clip(red * 0.45 + 0.5, 0, 255).astype(np.uint8))}, texture


def test_front_object_occludes_back_object():
    back, front = one(0, x=0.4, size=0.3, depth=0, colour="red"), one(1, x=0.6, size=0.3, depth=1, colour="blue")
    overlap = (32, 32)  # image centre lies inside both
    img, ids, _ = S._render(scene(back, front), 64)
    assert ids[overlap] == 2 and tuple(img[overlap]) == S.PALETTE["blue"]
    back.depth, front.depth = 1, 0
    img, ids, _ = S._render(scene(back, front), 64)
    assert ids[overlap] == 1 and tuple(img[overlap]) == S.PALETTE["red"]


def test_bounce_off_the_border():
    obj = one(0, x=0.9, size=0.1, vx=0.05)  # centre stays in [0.07, 0.93]
    assert obj.position(0) == pytest.approx((0.9, 0.5))
    assert obj.position(2)[0] == pytest.approx(0.86)  # 0.9 + 0.1 = 1.0 overshoots 0.93 by 0.07 -> 0.86
    assert obj.position(1)[0] == pytest.approx(0.93 - 0.02)


def test_video_moves_objects_with_their_velocity():
    sc = scene(one(0, x=0.3, size=0.15, vx=0.05))  # no bounce for 4 frames: 0.3 + 0.15 < 0.895
    frames, masks = S.render_video(sc, 4, 64)
    assert frames.shape == (4, 64, 64, 3) and masks.shape == (4, 64, 64) and masks.dtype == np.uint8
    assert np.array_equal(frames[0], S.render_image(sc, 64))
    for t in range(4):
        xs = np.nonzero(masks[t])[1] + 0.5
        assert xs.mean() / 64 == pytest.approx(0.3 + 0.05 * t, abs=0.5 / 64)


def test_video_occlusion_changes_over_time():
    # a small front object crosses a large static back object: the back one's visible area dips
    sc = scene(one(0, x=0.5, size=0.3, depth=0), one(1, x=0.1, size=0.12, depth=1, colour="blue", vx=0.1))
    _, masks = S.render_video(sc, 5, 64)
    visible = [(m == 1).sum() for m in masks]
    assert visible[0] == max(visible) and min(visible) < visible[0]


# -- text ----------------------------------------------------------------------------------------------
def test_caption_hand_written():
    sc = scene(one(0, colour="red", texture="stripes"), one(1, size=0.1, colour="blue"),
               background="gradient", bg=("green", "gray"))
    assert S.caption(sc) == "a large red striped circle and a small blue square on a green gradient background"
    sc = scene(one(3, colour="orange"), one(4, size=0.1, texture="dots"), one(5, size=0.1, texture="checker"),
               background="noise", bg=("orange", "gray"))
    assert S.caption(sc) == ("a large orange star, a small red dotted ring and a small red checkered cross "
                             "on a mottled orange background")


def test_hashtag_rates_follow_the_documented_model():
    # documented model: true tags kept with p = 0.75 (primary class), 0.5 (primary colour), 0.2 (background);
    # Poisson(3) noise tags from p(k) = k^-1.1 / sum_j j^-1.1 over 200 tags. By Poisson thinning tag k is
    # drawn Poisson(3 p(k)) times, so it is present with probability 1 - exp(-3 p(k)).
    sc = scene(one(0, colour="red"))
    n = 3000
    rng = np.random.default_rng(0)
    draws = [S.hashtags(sc, rng) for _ in range(n)]
    p = np.arange(1, 201) ** -1.1
    p /= p.sum()
    expected = {"circle": 0.75, "red": 0.5, "plain": 0.2, S.NOISE_VOCAB[0]: 1 - math.exp(-3 * p[0]),
                S.NOISE_VOCAB[1]: 1 - math.exp(-3 * p[1]), S.NOISE_VOCAB[9]: 1 - math.exp(-3 * p[9])}
    for tag, rate in expected.items():
        observed = sum(tag in d for d in draws) / n
        assert abs(observed - rate) < 4 * math.sqrt(rate * (1 - rate) / n), (tag, observed, rate)
    assert all(len(d) == len(set(d)) for d in draws)
    assert len(S.NOISE_VOCAB) == len(set(S.NOISE_VOCAB)) == 200


# -- signal ----------------------------------------------------------------------------------------------
def _ridge_accuracy(train_x, train_y, test_x, test_y, lam=1e-2):
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a = np.c_[(train_x - mu) / sd, np.ones(len(train_x))]
    b = np.c_[(test_x - mu) / sd, np.ones(len(test_x))]
    w = np.linalg.solve(a.T @ a + lam * len(a) * np.eye(a.shape[1]), a.T @ np.eye(10)[train_y])
    return float(((b @ w).argmax(1) == test_y).mean())


def _colour_hist(images):  # 4 levels per channel -> 64 bins
    q = images // 64
    idx = (q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).reshape(len(images), -1)
    return np.stack([np.bincount(i, minlength=64) for i in idx]) / idx.shape[1]


def _edge_orientation_hist(images, bins=12):  # colour-blind: sees only shape outlines
    g = images.astype(np.float64).mean(-1)
    gx, gy = np.zeros_like(g), np.zeros_like(g)
    gx[:, :, 1:-1], gy[:, 1:-1] = g[:, :, 2:] - g[:, :, :-2], g[:, 2:] - g[:, :-2]
    b = (np.arctan2(gy, gx) % np.pi / np.pi * bins).astype(int) % bins
    h = np.stack([np.bincount(i.ravel(), w.ravel(), bins) for i, w in zip(b, np.hypot(gx, gy))])
    return h / (h.sum(1, keepdims=True) + 1e-9)


def test_labels_are_learnable_from_pixels():
    def data(split, n):
        scenes = [S.sample_scene(0, i, split) for i in range(n)]
        return np.stack([S.render_image(s, 48) for s in scenes]), np.array([s.label for s in scenes])

    train_x, train_y = data("train", 1000)
    test_x, test_y = data("val", 400)
    # chance is 1/10; a classifier that learned nothing stays within a few binomial std of it
    bar = 0.1 + 5 * math.sqrt(0.1 * 0.9 / len(test_y))
    assert _ridge_accuracy(_colour_hist(train_x), train_y, _colour_hist(test_x), test_y) > bar
    edges = _edge_orientation_hist(train_x), _edge_orientation_hist(test_x)
    assert _ridge_accuracy(edges[0], train_y, edges[1], test_y) > bar  # shape alone carries signal


# -- the shard world -----------------------------------------------------------------------------------
def _samples(spec):
    return list(wds.WebDataset(list(braceexpand(spec)), shardshuffle=False, empty_check=False))


def test_ensure_builds_readable_shards_and_caches(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="datamodules.synthetic"):
        world = S.ensure_synthetic_world(TINY, root=str(tmp_path))
    assert len([r for r in caplog.records if r.name == "datamodules.synthetic"]) == 1
    assert world.root.startswith(str(tmp_path / "synthetic"))
    assert (world.num_train, world.num_val) == (40, 20)
    assert world.train_shards == os.path.join(world.root, "train-{000000..000002}.tar")  # ceil(40 / 16) = 3
    assert world.val_shards == os.path.join(world.root, "val-{000000..000001}.tar")
    assert read_index(list(braceexpand(world.train_shards))) == 40
    train = _samples(world.train_shards)
    assert [s["__key__"] for s in train] == [f"train-{i:08d}" for i in range(40)]
    for s in train[:10]:
        meta = json.loads(s["json"])
        assert int(s["cls"]) == meta["label"] == S.CLASS_NAMES.index(meta["class_name"])
        assert s["txt"].decode() == meta["caption"]
        image = Image.open(io.BytesIO(s["jpg"]))
        mask = np.asarray(Image.open(io.BytesIO(s["mask.png"])))
        assert image.format == "JPEG" and image.size == (32, 32) and mask.shape == (32, 32)
        assert set(np.unique(mask)) <= set(range(len(meta["objects"]) + 1))
        assert meta["objects"][0]["class_name"] == meta["class_name"]
        assert {"label", "colour", "texture", "bbox"} <= set(meta["objects"][0])
    videos = _samples(world.video_shards)
    assert len(videos) == 3 and json.loads(videos[0]["json"])["num_frames"] == 4
    assert {f"{t:03d}.{ext}" for t in range(4) for ext in ("jpg", "mask.png")} <= set(videos[0])

    caplog.clear()
    stamp = os.path.getmtime(os.path.join(world.root, "world.json"))
    with caplog.at_level(logging.INFO, logger="datamodules.synthetic"):
        again = S.ensure_synthetic_world(TINY, root=str(tmp_path))
    assert again == world and not caplog.records  # cache hit: silent, nothing rebuilt
    assert os.path.getmtime(os.path.join(world.root, "world.json")) == stamp
    assert S.ensure_synthetic_world(TINY, root=str(tmp_path)).root != \
        S.ensure_synthetic_world(S.SyntheticWorldConfig(**{**vars(TINY), "seed": 1}), root=str(tmp_path)).root


def test_env_var_sets_the_default_root(tmp_path, monkeypatch):
    monkeypatch.setenv("PRISM_CACHE", str(tmp_path))
    small = S.SyntheticWorldConfig(image_size=16, train_samples=4, val_samples=2)
    assert S.ensure_synthetic_world(small).root.startswith(str(tmp_path / "synthetic"))


def test_crashed_build_is_not_reused(tmp_path, monkeypatch):
    real = S._image_sample

    def crash(cfg, split, index):
        if index == 5:
            raise RuntimeError("boom")
        return real(cfg, split, index)

    monkeypatch.setattr(S, "_image_sample", crash)
    with pytest.raises(RuntimeError, match="boom"):
        S.ensure_synthetic_world(TINY, root=str(tmp_path))
    assert os.listdir(tmp_path / "synthetic") == []  # no half-built world, no temp directory left
    monkeypatch.setattr(S, "_image_sample", real)
    assert len(_samples(S.ensure_synthetic_world(TINY, root=str(tmp_path)).val_shards)) == 20


def test_loser_of_the_rename_race_uses_the_winner(tmp_path, monkeypatch, caplog):
    real_rename = os.rename

    def rival_wins_first(src, dst):  # another rank finishes its build while ours is still running
        monkeypatch.setattr(os, "rename", real_rename)
        S.write_synthetic_world(TINY, dst)
        real_rename(src, dst)  # raises: dst is a non-empty directory

    monkeypatch.setattr(os, "rename", rival_wins_first)
    with caplog.at_level(logging.INFO, logger="datamodules.synthetic"):
        world = S.ensure_synthetic_world(TINY, root=str(tmp_path))
    assert os.listdir(tmp_path / "synthetic") == [os.path.basename(world.root)]
    assert not caplog.records and len(_samples(world.train_shards)) == 40


def test_two_processes_at_once(tmp_path):
    code = ("import sys; from datamodules import synthetic as S; "
            "print(S.ensure_synthetic_world(S.SyntheticWorldConfig(image_size=16, train_samples=64, "
            "val_samples=8, samples_per_shard=8), root=sys.argv[1]).root)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    roots = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert roots[0] == roots[1] and os.listdir(tmp_path / "synthetic") == [os.path.basename(roots[0])]
    assert read_index(list(braceexpand(os.path.join(roots[0], "train-{000000..000007}.tar")))) == 64


def test_cli_writes_a_world(tmp_path, capsys):
    S.main(["--output", str(tmp_path / "w"), "--train_samples", "5", "--val_samples", "3", "--image_size", "16"])
    assert str(tmp_path / "w") in capsys.readouterr().out
    world = S.load_synthetic_world(str(tmp_path / "w"))
    assert len(_samples(world.train_shards)) == 5 and len(_samples(world.val_shards)) == 3
    with pytest.raises(FileExistsError):
        S.main(["--output", str(tmp_path / "w")])
