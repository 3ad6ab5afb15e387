import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from datamodules import make_shards as M
from datamodules.shard_writer import ShardWriter, balanced_shard_sizes, read_index, read_shard_counts


def jpeg_bytes(colour=(200, 30, 30), size=(40, 32)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def noisy_jpeg_bytes():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def read_shards(out: Path, prefix="train"):
    paths = sorted(str(p) for p in out.glob(f"{prefix}-*.tar"))
    return list(wds.WebDataset(paths, shardshuffle=False, empty_check=False))


def index(out: Path, prefix="train"):
    return json.loads((out / f"{prefix}-index.json").read_text())


# -- shard_writer --------------------------------------------------------------------------------------
def test_writer_splits_by_count_and_writes_the_index(tmp_path):
    with ShardWriter(str(tmp_path), "train", max_count=10, source="unit test") as w:
        for i in range(25):
            w.write({"__key__": f"k{i:03d}", "txt": str(i)})
        w.skip("broken", 2)
    assert index(tmp_path) == {"num_samples": 25, "source": "unit test", "skipped": {"broken": 2},
                               "shards": {"train-000000.tar": 10, "train-000001.tar": 10, "train-000002.tar": 5}}
    assert sorted(os.listdir(tmp_path)) == ["train-000000.tar", "train-000001.tar", "train-000002.tar",
                                            "train-index.json"]  # no temporary files left
    assert [s["txt"] for s in read_shards(tmp_path)] == [str(i).encode() for i in range(25)]
    paths = [str(tmp_path / f"train-00000{i}.tar") for i in range(3)]
    assert read_index(paths) == 25 and read_index(paths[1:2]) == 10
    assert read_index(paths + [str(tmp_path / "train-000003.tar")]) is None  # not in the index
    assert read_index([str(tmp_path / "val-000000.tar")]) is None  # no index at all


def test_writer_splits_by_size(tmp_path):
    # max_size counts payload bytes (tar headers and padding excluded), and a shard is closed once it holds
    # >= max_size: 1000-byte samples -> 3000 >= 2500 after 3 samples
    with ShardWriter(str(tmp_path), "s", max_count=100, max_size=2500) as w:
        for i in range(5):
            w.write({"__key__": f"k{i}", "bin": bytes(1000)})
    assert list(index(tmp_path, "s")["shards"].values()) == [3, 2]


def test_writer_crash_leaves_no_complete_looking_files(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(str(tmp_path), "train", max_count=10) as w:
            for i in range(12):
                w.write({"__key__": f"k{i}", "txt": "x"})
            raise RuntimeError("crash")
    assert os.listdir(tmp_path) == ["train-000000.tar"]  # the finished shard only: no index, no temp file


def test_writer_refuses_to_mix_with_an_old_set_unless_overwriting(tmp_path):
    with ShardWriter(str(tmp_path), "train", max_count=1) as w:
        for i in range(3):
            w.write({"__key__": f"k{i}", "txt": "x"})
    (tmp_path / "trainx-000000.tar").write_bytes(b"")  # another prefix: not ours to delete
    with pytest.raises(FileExistsError, match="train"):
        ShardWriter(str(tmp_path), "train")
    with ShardWriter(str(tmp_path), "train", overwrite=True) as w:
        w.write({"__key__": "only", "txt": "x"})
    assert sorted(os.listdir(tmp_path)) == ["train-000000.tar", "train-index.json", "trainx-000000.tar"]
    assert index(tmp_path)["num_samples"] == 1


def test_writer_follows_planned_shard_sizes_then_max_count(tmp_path):
    with ShardWriter(str(tmp_path), "train", max_count=5, shard_sizes=[4, 1, 2]) as w:
        for i in range(14):
            w.write({"__key__": f"k{i:03d}", "txt": str(i)})
    assert list(index(tmp_path)["shards"].values()) == [4, 1, 2, 5, 2]  # 14 = 4 + 1 + 2, then 5 + 2
    assert [s["txt"] for s in read_shards(tmp_path)] == [str(i).encode() for i in range(14)]  # order kept
    paths = sorted(str(p) for p in tmp_path.glob("train-*.tar"))
    assert read_shard_counts(paths[::-1]) == [2, 5, 2, 1, 4]  # in the order asked for
    with pytest.raises(ValueError, match="shard_sizes"):
        ShardWriter(str(tmp_path / "other"), "train", shard_sizes=[3, 0])


@pytest.mark.parametrize("num_samples, max_count, min_shards, expected", [
    (1800, 1000, 8, [225] * 8),  # ~1,800 images: 8 shards, not one
    (20, 1000, 8, [3, 3, 3, 3, 2, 2, 2, 2]),  # 20 = 4 x 3 + 4 x 2
    (5, 1000, 8, [1] * 5),  # fewer samples than shards: one each
    (7999, 1000, 8, [1000] * 7 + [999]),  # just under 8 x 1000
    (8000, 1000, 8, None),  # 8 full shards: max_count decides
    (30, 1000, 1, [30]),  # --min_shards 1: as few shards as max_count allows
    (32, 4, 8, None),  # 32 = 8 x 4
    (30, 4, 8, [4] * 6 + [3] * 2),  # 30 = 6 x 4 + 2 x 3, none over max_count
    (0, 1000, 8, None),
])
def test_balanced_shard_sizes(num_samples, max_count, min_shards, expected):
    assert balanced_shard_sizes(num_samples, max_count, min_shards) == expected


def test_writer_with_nothing_written(tmp_path):
    with ShardWriter(str(tmp_path), "train") as w:
        w.skip("corrupt_image")
    assert os.listdir(tmp_path) == ["train-index.json"]
    assert index(tmp_path) == {"num_samples": 0, "shards": {}, "skipped": {"corrupt_image": 1}, "source": ""}


# -- masks ---------------------------------------------------------------------------------------------
def test_rle_strings_hand_encoded():
    # COCO compressed RLE: chr(48 + 5-bit group), 0x20 = continue, 0x10 = negative, deltas from the 4th run on
    assert M.rle_counts("1233") == [1, 2, 3, 5]  # 4th: 3 + counts[1] = 5
    assert M.rle_counts("X1") == [40]  # 'X' = 48 + 40 = 0x20 | 8, '1' = 1 -> 8 + (1 << 5)
    assert M.rle_counts("153M") == [1, 5, 3, 2]  # 'M' = 48 + 29 -> 29 - 32 = -3, + counts[1] = 2
    # size (3, 2), runs 0,1,1 | 0,0,0 down the columns
    assert M.rle_decode({"size": [3, 2], "counts": [1, 2, 3]}).tolist() == [[0, 0], [1, 0], [1, 0]]
    assert M.rle_decode({"size": [3, 2], "counts": "123"}).tolist() == [[0, 0], [1, 0], [1, 0]]


def test_polygon_mask_uses_pixel_centres():
    # box polygon x 10..30, y 10..20: centres x + 0.5 in [10, 30] -> x = 10..29, y = 10..19
    m = M.polygon_mask([[10, 10, 30, 10, 30, 20, 10, 20]], 32, 40)
    expected = np.zeros((32, 40), bool)
    expected[10:20, 10:30] = True
    assert np.array_equal(m, expected)
    # right triangle (0,0)-(16,0)-(0,16): centre inside iff (x + 0.5) + (y + 0.5) < 16, i.e. x + y <= 14
    t = M.polygon_mask([[0, 0, 16, 0, 0, 16]], 20, 20)
    y, x = np.mgrid[0:20, 0:20]
    assert np.array_equal(t, x + y <= 14)


# -- converters ------------------------------------------------------------------------------------------
@pytest.fixture
def imagefolder(tmp_path):
    root = tmp_path / "folder"
    write(root / "cat" / "a.jpg", jpeg_bytes((10, 200, 10)))
    buf = io.BytesIO()
    Image.new("RGBA", (20, 10), (0, 0, 255, 255)).save(buf, "PNG")
    write(root / "cat" / "b.png", buf.getvalue())
    write(root / "dog" / "sub" / "c.jpg", jpeg_bytes())
    write(root / "dog" / "truncated.jpg", noisy_jpeg_bytes()[:400])
    write(root / "dog" / "notes.txt", b"not an image")
    write(root / "bird" / "garbage.jpg", bytes(np.random.default_rng(1).integers(0, 255, 300, dtype=np.uint8)))
    write(root / "README.md", b"stray file")
    return root


def test_imagefolder(imagefolder, tmp_path, capsys):
    out = tmp_path / "out"
    assert M.main(["--format", "imagefolder", "--input", str(imagefolder), "--output", str(out),
                   "--max_count", "2", "--min_shards", "1", "--keep_order"]) == 0
    assert json.loads((out / "classes.json").read_text()) == {"bird": 0, "cat": 1, "dog": 2}
    idx = index(out)
    assert idx["num_samples"] == 3 and idx["shards"] == {"train-000000.tar": 2, "train-000001.tar": 1}
    assert idx["skipped"] == {"corrupt_image": 1, "not_an_image": 2, "not_in_a_class_folder": 1}
    samples = read_shards(out)
    assert [s["__key__"] for s in samples] == ["train-00000000", "train-00000001", "train-00000002"]
    metas = [json.loads(s["json"]) for s in samples]
    assert [(m["class_name"], m["label"]) for m in metas] == [("cat", 1), ("cat", 1), ("dog", 2)]
    assert [int(s["cls"]) for s in samples] == [1, 1, 2]
    assert samples[0]["jpg"] == (imagefolder / "cat" / "a.jpg").read_bytes()  # JPEG kept as is
    png = Image.open(io.BytesIO(samples[1]["jpg"]))  # PNG re-encoded
    assert png.format == "JPEG" and png.mode == "RGB" and png.size == (20, 10)
    assert np.abs(np.asarray(png).astype(int) - (0, 0, 255)).max() < 10
    printed = capsys.readouterr().out
    assert "wrote 3 samples in 2 shard(s)" in printed and "corrupt_image 1" in printed
    # converting again into the same place must not silently mix two shard sets
    assert M.main(["--format", "imagefolder", "--input", str(imagefolder), "--output", str(out)]) == 2
    assert "already holds a shard set" in capsys.readouterr().err
    assert M.main(["--format", "imagefolder", "--input", str(imagefolder), "--output", str(out), "--overwrite"]) == 0
    # by default 6 inputs make 6 shards of one (fewer inputs than --min_shards 8); the 3 skipped leave 3
    assert index(out)["shards"] == {f"train-00000{i}.tar": 1 for i in range(3)}


def test_a_small_set_is_cut_into_min_shards_shards(tmp_path, capsys):
    root = tmp_path / "small"
    for i in range(20):
        write(root / ("a" if i % 2 else "b") / f"{i:02d}.jpg", jpeg_bytes((10 * i, 0, 0)))
    out = tmp_path / "out"
    assert M.main(["--format", "imagefolder", "--input", str(root), "--output", str(out)]) == 0
    assert list(index(out)["shards"].values()) == [3, 3, 3, 3, 2, 2, 2, 2]  # 20 over the default 8 shards
    assert "wrote 20 samples in 8 shard(s)" in capsys.readouterr().out
    assert M.main(["--format", "imagefolder", "--input", str(root), "--output", str(out), "--overwrite",
                   "--min_shards", "1"]) == 0
    assert index(out)["shards"] == {"train-000000.tar": 20}
    with pytest.raises(SystemExit) as exit_:
        M.main(["--format", "imagefolder", "--input", str(root), "--output", str(out), "--min_shards", "0"])
    assert exit_.value.code == 2 and "--min_shards must be >= 1, got 0" in capsys.readouterr().err


def class_folder(root: Path, classes: list[str], per_class: int) -> Path:
    for i, name in enumerate(classes):
        for j in range(per_class):
            write(root / name / f"{j:03d}.jpg", jpeg_bytes((20 * i, 5 * j, 0), size=(8, 8)))
    return root


def _labels_by_class(out: Path) -> dict[str, set[int]]:
    labels: dict[str, set[int]] = {}
    for sample in read_shards(out):
        meta = json.loads(sample["json"])
        assert int(sample["cls"]) == meta["label"]
        labels.setdefault(meta["class_name"], set()).add(meta["label"])
    return labels


def test_separately_converted_splits_give_a_class_the_same_label(tmp_path, capsys):
    names = ["0", "1", "2", "3", "10", "cat"]  # sorted as strings: "10" before "2"
    train = class_folder(tmp_path / "train", names, 3)
    val = class_folder(tmp_path / "val", names, 2)
    val_lacking = class_folder(tmp_path / "val_lacking", ["0", "2", "cat"], 2)  # no "1", "3" or "10" images
    assert M.main(["--format", "imagefolder", "--input", str(train), "--output", str(tmp_path / "s_train")]) == 0
    assert M.main(["--format", "imagefolder", "--input", str(val), "--output", str(tmp_path / "s_val")]) == 0
    expected = {"0": 0, "1": 1, "10": 2, "2": 3, "3": 4, "cat": 5}  # the sorted class folders, by hand
    for split in ("s_train", "s_val"):  # recorded beside the shards, and used in them
        assert json.loads((tmp_path / split / "classes.json").read_text()) == expected
        assert _labels_by_class(tmp_path / split) == {name: {label} for name, label in expected.items()}
    # a split lacking classes takes the train split's labels with --classes; its own folders would renumber
    train_classes = str(tmp_path / "s_train" / "classes.json")
    assert M.main(["--format", "imagefolder", "--input", str(val_lacking), "--output", str(tmp_path / "s_lacking"),
                   "--classes", train_classes]) == 0
    assert json.loads((tmp_path / "s_lacking" / "classes.json").read_text()) == expected
    assert _labels_by_class(tmp_path / "s_lacking") == {"0": {0}, "2": {3}, "cat": {5}}
    # a folder naming a class the mapping lacks cannot be labelled: a clear error, nothing written
    class_folder(tmp_path / "val_extra", ["0", "dog"], 1)
    assert M.main(["--format", "imagefolder", "--input", str(tmp_path / "val_extra"), "--output",
                   str(tmp_path / "s_extra"), "--classes", train_classes]) == 2
    assert "['dog']" in capsys.readouterr().err and not (tmp_path / "s_extra").exists()


def test_samples_are_written_in_a_seeded_random_order(tmp_path):
    root = class_folder(tmp_path / "sorted", [str(c) for c in range(4)], 8)  # 32 images, 4 classes

    def convert(name: str, *flags: str) -> list[list[int]]:
        out = tmp_path / name
        assert M.main(["--format", "imagefolder", "--input", str(root), "--output", str(out), *flags]) == 0
        return [[int(s["cls"]) for s in read_shards(out, "train") if s["__url__"].endswith(shard)]
                for shard in sorted(index(out)["shards"])]

    kept = convert("kept", "--keep_order")
    assert [set(shard) for shard in kept] == [{0}, {0}, {1}, {1}, {2}, {2}, {3}, {3}]  # 8 shards of one class each
    shuffled = convert("shuffled")
    assert sorted(sum(shuffled, [])) == sorted(sum(kept, []))  # every sample once
    assert sum(len(set(shard)) > 1 for shard in shuffled) >= 6  # most shards mix classes
    assert convert("again") == shuffled  # the default seed gives the same order again
    assert convert("seed1", "--seed", "1") != shuffled


def test_captions_csv_and_tsv(tmp_path):
    write(tmp_path / "imgs" / "a.jpg", jpeg_bytes())
    write(tmp_path / "imgs" / "bad.jpg", noisy_jpeg_bytes()[:300])
    absolute = write(tmp_path / "elsewhere" / "b.jpg", jpeg_bytes((0, 0, 200)))
    (tmp_path / "pairs.csv").write_text(
        'image,caption\nimgs/a.jpg,"a red box, small"\n' f"{absolute},a blue box\n"
        "imgs/missing.jpg,gone\nimgs/a.jpg,  \nimgs/bad.jpg,broken\n")
    out = tmp_path / "out"
    assert M.main(["--format", "captions", "--input", str(tmp_path / "pairs.csv"), "--output", str(out),
                   "--keep_order"]) == 0
    assert [s["txt"] for s in read_shards(out)] == [b"a red box, small", b"a blue box"]
    assert index(out)["skipped"] == {"corrupt_image": 1, "empty_caption": 1, "missing_file": 1}

    (tmp_path / "pairs.txt").write_text("path\ttext\nimgs/a.jpg\tfirst\nimgs/a.jpg\tsecond\n")  # sniffed
    assert M.main(["--format", "captions", "--input", str(tmp_path / "pairs.txt"), "--output", str(out),
                   "--prefix", "val", "--image_column", "path", "--caption_column", "text"]) == 0
    assert [set(s) - {"__url__", "__local_path__"} for s in read_shards(out, "val")] == [{"__key__", "jpg", "txt"}] * 2


def test_coco(tmp_path):
    images = tmp_path / "images"
    write(images / "one.jpg", jpeg_bytes(size=(40, 32)))
    box = [10, 10, 30, 10, 30, 20, 10, 20]
    crowd = {"size": [32, 40], "counts": [0, 2, 30, 2, 1246]}  # column 0: rows 0-1; column 1: rows 0-1
    coco = {
        "images": [{"id": 1, "file_name": "one.jpg", "width": 40, "height": 32},
                   {"id": 2, "file_name": "missing.jpg", "width": 40, "height": 32}],
        "annotations": [
            {"id": 7, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 10], "area": 200.0, "iscrowd": 0,
             "segmentation": [box]},
            {"id": 8, "image_id": 1, "category_id": 5, "bbox": [0, 0, 2, 2], "area": 4.0, "iscrowd": 1,
             "segmentation": crowd}],
        "categories": [{"id": 3, "name": "box"}, {"id": 5, "name": "crowd"}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    out = tmp_path / "out"
    assert M.main(["--format", "coco", "--input", str(tmp_path / "instances.json"), "--images", str(images),
                   "--output", str(out)]) == 0
    assert index(out)["skipped"] == {"missing_file": 1}
    (sample,) = read_shards(out)
    meta = json.loads(sample["json"])
    assert [a["segmentation"] for a in meta["annotations"]] == [[box], crowd]  # as given
    assert [(a["category_id"], a["iscrowd"], a["area"]) for a in meta["annotations"]] == [(3, 0, 200.0), (5, 1, 4.0)]
    mask = np.asarray(Image.open(io.BytesIO(sample["mask.png"])))
    expected = np.zeros((32, 40), np.uint8)
    expected[10:20, 10:30] = 1  # pixel centres inside the box polygon
    expected[0:2, 0:2] = 2
    assert np.array_equal(mask, expected)
    assert json.loads((out / "categories.json").read_text()) == coco["categories"]


def test_davis_video(tmp_path):
    root = tmp_path / "DAVIS"
    palette_mask = Image.new("P", (40, 32), 0)
    palette_mask.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
    palette_mask.paste(2, (5, 5, 15, 10))  # object 2 at x 5..14, y 5..9
    for t in range(3):
        write(root / "JPEGImages" / "480p" / "bear" / f"{t:05d}.jpg", jpeg_bytes())
    buf = io.BytesIO()
    palette_mask.save(buf, "PNG")
    write(root / "Annotations" / "480p" / "bear" / "00000.png", buf.getvalue())
    write(root / "Annotations" / "480p" / "bear" / "00002.png", buf.getvalue())
    write(root / "JPEGImages" / "480p" / "cow" / "00000.jpg", jpeg_bytes())
    write(root / "JPEGImages" / "480p" / "cow" / "00001.jpg", noisy_jpeg_bytes()[:300])
    (root / "JPEGImages" / "480p" / "empty").mkdir()
    out = tmp_path / "out"
    assert M.main(["--format", "video", "--input", str(root), "--output", str(out)]) == 0
    assert index(out)["skipped"] == {"corrupt_image": 1, "no_frames": 1}
    (sample,) = read_shards(out)
    meta = json.loads(sample["json"])
    assert meta["name"] == "bear" and meta["num_frames"] == 3 and meta["annotated_frames"] == [0, 2]
    assert {"000.jpg", "001.jpg", "002.jpg", "000.mask.png", "002.mask.png"} <= set(sample)
    assert "001.mask.png" not in sample
    mask = np.asarray(Image.open(io.BytesIO(sample["002.mask.png"])))
    expected = np.zeros((32, 40), np.uint8)
    expected[5:10, 5:15] = 2
    assert np.array_equal(mask, expected)


def test_errors_are_clear(tmp_path, capsys):
    assert M.main(["--format", "imagefolder", "--input", str(tmp_path / "nope"), "--output", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err

    write(tmp_path / "only_bad" / "cls" / "x.jpg", b"\xff\xd8 garbage")
    assert M.main(["--format", "imagefolder", "--input", str(tmp_path / "only_bad"),
                   "--output", str(tmp_path / "o1")]) == 1
    assert "nothing could be written" in capsys.readouterr().err

    (tmp_path / "p.csv").write_text("file,text\na.jpg,x\n")
    assert M.main(["--format", "captions", "--input", str(tmp_path / "p.csv"), "--output", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "'caption'" in err and "'image'" in err and "['file', 'text']" in err

    (tmp_path / "c.json").write_text('{"images": []}')
    assert M.main(["--format", "coco", "--input", str(tmp_path / "c.json"), "--output", str(tmp_path / "o3")]) == 2
    assert "--images" in capsys.readouterr().err

    assert M.main(["--format", "video", "--input", str(tmp_path), "--output", str(tmp_path / "o4")]) == 2
    assert "JPEGImages" in capsys.readouterr().err


# -- conversations (PerceptionLM jsonl) -------------------------------------------------------------------
def jsonl(path: Path, *records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def turns(question: str, answer: str | None = "an answer", reply_from: str = "gpt") -> list[dict]:
    out = [{"from": "human", "value": question}]
    return out + ([{"from": reply_from, "value": answer}] if answer is not None else [])


@pytest.fixture
def media(tmp_path):
    root = tmp_path / "media"
    write(root / "imgs" / "a.jpg", jpeg_bytes((10, 200, 10)))
    for name, red in (("f1.jpg", 0), ("f2.jpg", 100), ("f10.jpg", 200)):  # 10 after 2, not after 1
        write(root / "clips" / "one" / name, jpeg_bytes((red, 0, 0), size=(16, 16)))
    write(root / "clips" / "one" / "notes.txt", b"not a frame")
    return root


def test_conversation_images_and_frame_folders(tmp_path, media):
    data = jsonl(tmp_path / "data.jsonl",
                 {"id": "q1", "image": "imgs/a.jpg", "conversations": turns("<image>\nWhat colour?", "green")},
                 "",  # blank lines are not lines of data
                 {"video": "clips/one", "fps": 2, "conversations": [
                     {"from": "system", "value": "Be brief."}, *turns("<video>\nWhat happens?", "it reddens"),
                     {"from": "user", "value": "And then?"}, {"from": "assistant", "value": "nothing"}]},
                 {"video": "clips/one", "conversations": turns("Watch: <video>", "frames", "assistant")})
    out = tmp_path / "out"
    assert M.main(["--format", "conversation", "--input", str(data), "--media-root", str(media), "--output",
                   str(out), "--keep_order", "--fps", "4"]) == 0
    image, video, default_fps = read_shards(out)
    meta = json.loads(image["json"])
    assert meta == {"id": "q1", "image": "imgs/a.jpg", "media": "image", "line": 1,
                    "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                      {"from": "assistant", "value": "green"}]}  # gpt is written as assistant
    assert image["jpg"] == (media / "imgs" / "a.jpg").read_bytes()
    meta = json.loads(video["json"])
    assert [t["from"] for t in meta["conversations"]] == ["system", "human", "assistant", "human", "assistant"]
    assert (meta["media"], meta["line"], meta["num_frames"], meta["fps"]) == ("video", 3, 3, 2)  # the line's fps
    assert sorted(k for k in video if k.endswith(".jpg")) == ["000.jpg", "001.jpg", "002.jpg"]
    reds = [np.asarray(Image.open(io.BytesIO(video[f"00{t}.jpg"])))[..., 0].mean() for t in range(3)]
    assert reds == pytest.approx([0, 100, 200], abs=5)  # f1, f2, f10
    assert json.loads(default_fps["json"])["fps"] == 4.0  # no fps in the line: --fps
    assert index(out)["num_samples"] == 3 and index(out)["skipped"] == {}


def test_conversation_media_default_to_the_jsonl_folder_and_corrupt_images_are_skipped(tmp_path):
    write(tmp_path / "a.jpg", jpeg_bytes())
    write(tmp_path / "bad.jpg", noisy_jpeg_bytes()[:300])
    data = jsonl(tmp_path / "data.jsonl", {"image": "a.jpg", "conversations": turns("<image>\nQ")},
                 {"image": "bad.jpg", "conversations": turns("<image>\nQ")})
    assert M.main(["--format", "conversation", "--input", str(data), "--output", str(tmp_path / "out")]) == 0
    assert index(tmp_path / "out")["skipped"] == {"corrupt_image": 1}
    assert "fps" not in json.loads(read_shards(tmp_path / "out")[0]["json"])


@pytest.mark.parametrize("record, message", [
    ('{"image": "imgs/a.jpg", "conversations": [}',
     "line 1: not valid JSON (Expecting value: line 1 column 43 (char 42)): each line must be one JSON object"),
    ('["imgs/a.jpg"]', "line 1: is a JSON list, not an object"),
    ({"image": "imgs/gone.jpg", "conversations": turns("<image>\nQ")},
     "line 1: 'image' 'imgs/gone.jpg' not found (looked for MEDIA/imgs/gone.jpg): fix the path or --media_root"),
    ({"video": "clips/none", "conversations": turns("<video>\nQ")}, "line 1: 'video' 'clips/none' not found"),
    ({"image": "imgs/a.jpg", "conversations": turns("<image>\nQ", None)},
     "line 1: 'conversations' has no assistant turn (from 'gpt' or 'assistant') with text, so nothing to train on"),
    ({"image": "imgs/a.jpg", "conversations": turns("<image>\nQ", "  ")}, "has no assistant turn"),
    ({"image": "imgs/a.jpg", "conversations": turns("Describe the image.")},
     "line 1: 'image' is given but the human turns hold 0 '<image>' markers: put exactly one where the image goes, "
     'e.g. "<image>\\nDescribe the image."'),
    ({"image": "imgs/a.jpg", "conversations": turns("<image><image>\nQ")}, "human turns hold 2 '<image>' markers"),
    ({"image": "imgs/a.jpg", "conversations": turns("<image>\n<video>\nQ")},
     "line 1: 'image' is given but the human turns hold '<video>': an image line takes '<image>' only"),
    ({"video": "clips/one", "conversations": turns("<image>\nQ")}, "'video' is given but the human turns hold 0 "
                                                                   "'<video>' markers"),
    ({"image": "imgs/a.jpg", "conversations": turns("<image>\nQ", "see <image>")},
     "line 1: an assistant turn holds the marker '<image>': markers go in human turns only"),
    ({"image": "imgs/a.jpg", "conversations": [{"from": "bot", "value": "<image>"}]},
     "line 1: conversations[0].from is 'bot': use 'human' (or 'user'), 'gpt' (or 'assistant') or 'system'"),
    ({"image": "imgs/a.jpg", "conversations": "<image> hi"}, "'conversations' must be a non-empty list"),
    ({"image": ["imgs/a.jpg", "imgs/a.jpg"], "conversations": turns("<image><image>\nQ")},
     "'image' must be one path (a string), got [\"imgs/a.jpg\", \"imgs/a.jpg\"]: lines with several images are not"),
    ({"conversations": turns("Q")}, "line 1: has neither 'image' nor 'video' (text-only conversations are not"),
    ({"image": "imgs/a.jpg", "video": "clips/one", "conversations": turns("<image>\nQ")},
     "line 1: has both 'image' and 'video'"),
])
def test_conversation_errors_name_the_line_the_field_and_the_fix(tmp_path, media, capsys, record, message):
    data = jsonl(tmp_path / "data.jsonl", record)
    out = tmp_path / "out"
    assert M.main(["--format", "conversation", "--input", str(data), "--media-root", str(media), "--output",
                   str(out)]) == 2
    err = capsys.readouterr().err
    assert message.replace("MEDIA", str(media)) in err
    assert "1 of 1 lines cannot be converted, so nothing was written" in err and not out.exists()


def test_conversation_lists_every_bad_line_before_writing(tmp_path, media, capsys):
    good = {"image": "imgs/a.jpg", "conversations": turns("<image>\nQ")}
    bad = {"image": "imgs/a.jpg", "conversations": turns("Q")}
    data = jsonl(tmp_path / "data.jsonl", good, *[bad] * 12, good, "{oops")
    assert M.main(["--format", "conversation", "--input", str(data), "--media-root", str(media), "--output",
                   str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "13 of 15 lines cannot be converted" in err
    assert [int(n) for n in re.findall(r"line (\d+):", err)] == list(range(2, 12))  # the first 10 shown
    assert "... and 3 more" in err and not (tmp_path / "out").exists()
    assert M.main(["--format", "conversation", "--input", str(data), "--media-root", str(tmp_path / "nope"),
                   "--output", str(tmp_path / "out")]) == 2
    assert "--media_root" in capsys.readouterr().err


def test_conversation_video_files(tmp_path, media, monkeypatch, capsys):
    write(media / "clip.mp4", b"\x00\x00\x00\x18ftypmp42")
    data = jsonl(tmp_path / "data.jsonl", {"video": "clip.mp4", "conversations": turns("<video>\nQ")})
    args = ["--format", "conversation", "--input", str(data), "--media-root", str(media), "--output",
            str(tmp_path / "out")]
    monkeypatch.setattr(M, "video_reader", lambda: None)  # PyAV not installed
    assert M.main(args) == 2
    err = capsys.readouterr().err
    assert "'video' 'clip.mp4' is a video file, and PyAV (the 'av' package)" in err
    assert "extract its frames into a folder first" in err

    frames = [np.full((8, 8, 3), (50 * t, 0, 0), np.uint8) for t in range(3)]
    monkeypatch.setattr(M, "video_reader", lambda: lambda path: (frames, 25.0))  # stands in for PyAV's decode
    assert M.main(args) == 0
    (sample,) = read_shards(tmp_path / "out")
    meta = json.loads(sample["json"])
    assert (meta["num_frames"], meta["fps"]) == (3, 25.0)
    assert [int(np.asarray(Image.open(io.BytesIO(sample[f"00{t}.jpg"])))[..., 0].mean() + 0.5) // 10
            for t in range(3)] == [0, 5, 10]

    def broken(path):
        raise ValueError("moov atom not found")

    monkeypatch.setattr(M, "video_reader", lambda: broken)
    assert M.main(args + ["--overwrite"]) == 1
    assert index(tmp_path / "out")["skipped"] == {"corrupt_video": 1}
