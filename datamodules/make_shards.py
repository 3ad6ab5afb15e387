"""Convert common dataset layouts into WebDataset shards (with the index the datamodule reads).

    python -m datamodules.make_shards --format imagefolder --input train/ --output shards/train
    python -m datamodules.make_shards --format imagefolder --input val/ --output shards/val \
        --classes shards/train/classes.json
    python -m datamodules.make_shards --format captions --input pairs.tsv --output shards/
    python -m datamodules.make_shards --format coco --input instances_val2017.json --images val2017/ --output shards/
    python -m datamodules.make_shards --format video --input DAVIS/ --resolution 480p --output shards/
    python -m datamodules.make_shards --format conversation --input data.jsonl --media-root media/ --output shards/

Every input that cannot be used is counted under a reason (printed at the end and stored in the
index's ``skipped``); nothing is dropped silently. Exit code 0 on success, 1 if nothing could be
written, 2 for bad arguments or a missing input.

Shard sizes: a set of at least min_shards x max_count inputs (default 8 x 1000) goes into shards of
max_count samples; a smaller one into min_shards shards of near-equal size (one input each when there are
fewer), so that several loader processes can each read whole shards of it. --min_shards 1 keeps a small
set in as few shards as max_count allows.

Samples go into the shards in a random order (--seed; --keep_order keeps the input's), so that each shard, and
each batch a loader makes from it, mixes the classes. imagefolder labels the sorted class folders 0, 1, ...
and writes that mapping to classes.json beside the shards; a split converted on its own takes the train
split's labels with --classes (needed when it lacks a class: its folders would otherwise be numbered anew).

conversation reads PerceptionLM's jsonl, one {"image" | "video": path, "conversations": [{"from": "human",
"value": "<image>\\n..."}, {"from": "gpt", "value": "..."}], ...} per line, paths relative to --media_root, and
writes the layout of datamodules.synthetic_conversations: json (every field of the line, speakers renamed to human /
assistant, plus media, line, and for videos num_frames and fps) with jpg, or a video's frames as 000.jpg, 001.jpg,
... (a folder of JPEG / PNG frames in natural name order; a video file only where PyAV can decode it). Lines that
cannot be converted (invalid JSON, no assistant turn, a media marker count that does not match the media, a missing
media file) are all listed with their line numbers before anything is written, and the conversion stops: a training
set with silently dropped conversations is harder to notice than one that does not build.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from datamodules.chat import IMAGE_MARKER, VIDEO_MARKER
from datamodules.shard_writer import ShardWriter, balanced_shard_sizes, index_path


class Skip(Exception):
    """This input cannot become a sample; ``reason`` is the counter it goes to."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UsageError(Exception):
    """The arguments or the input layout are wrong: nothing to skip, the user must fix something."""


def load_jpeg(path: Path) -> tuple[bytes, tuple[int, int]]:
    """JPEG bytes of the image at ``path`` and its (width, height); RGB JPEGs are kept byte for byte."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise Skip("missing_file") from None
    except OSError:
        raise Skip("unreadable_file") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # structure and checksums; a truncated file is only caught by decoding
        im = Image.open(io.BytesIO(data))
        im.load()
    except UnidentifiedImageError:
        raise Skip("not_an_image") from None
    except Image.DecompressionBombError:
        raise Skip("too_many_pixels") from None
    except (OSError, SyntaxError, ValueError):
        raise Skip("corrupt_image") from None
    if im.format == "JPEG" and im.mode == "RGB":
        return data, im.size
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue(), im.size


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def rle_counts(counts: str | bytes) -> list[int]:
    """Run lengths from COCO's compressed RLE string: 5-bit little-endian groups in chars offset by 48,
    0x20 = more groups follow, 0x10 in the last group = negative; from the fourth run on each value is
    a delta to the run two places back (the format of cocodataset/cocoapi common/maskApi.c rleToString)."""
    s = counts.decode() if isinstance(counts, bytes) else counts
    out: list[int] = []
    i = 0
    while i < len(s):
        value, shift, more = 0, 0, True
        while more:
            c = ord(s[i]) - 48
            i += 1
            value |= (c & 0x1F) << shift
            shift += 5
            more = bool(c & 0x20)
        if c & 0x10:
            value -= 1 << shift
        out.append(value + (out[-2] if len(out) > 2 else 0))
    return out


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """Binary (H, W) mask of a COCO RLE: alternating runs of 0 and 1, column-major, starting with 0."""
    height, width = rle["size"]
    counts = rle["counts"] if isinstance(rle["counts"], list) else rle_counts(rle["counts"])
    flat = np.repeat(np.arange(len(counts), dtype=np.uint8) % 2, counts)
    if flat.size != height * width:
        raise Skip("bad_rle")
    return flat.reshape(width, height).T


def polygon_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """bool (H, W): pixels whose centre (x + 0.5, y + 0.5) lies inside any polygon (even-odd rule).

    The convention of COCO's rasteriser: an axis-aligned box polygon covers exactly its area in pixels.
    (PIL's ImageDraw also fills the outline, which makes small objects visibly fatter.)
    """
    out = np.zeros((height, width), bool)
    for poly in polygons:
        if len(poly) < 6:
            continue
        xs, ys = np.asarray(poly[0::2], np.float64), np.asarray(poly[1::2], np.float64)
        x0, x1 = max(int(xs.min()), 0), min(int(np.ceil(xs.max())), width)
        y0, y1 = max(int(ys.min()), 0), min(int(np.ceil(ys.max())), height)
        if x0 >= x1 or y0 >= y1:
            continue
        py, px = np.mgrid[y0:y1, x0:x1] + 0.5  # only the polygon's box: COCO objects are mostly small
        inside = np.zeros(px.shape, bool)
        for xa, ya, xb, yb in zip(xs, ys, np.roll(xs, -1), np.roll(ys, -1)):
            if ya != yb:  # count crossings of a ray going right from the pixel centre
                inside ^= ((ya > py) != (yb > py)) & (px < xa + (py - ya) * (xb - xa) / (yb - ya))
        out[y0:y1, x0:x1] |= inside
    return out


def instance_mask(annotations: list[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """uint8 (H, W): 0 background, i = annotations[i - 1] (the first 255); later ones drawn on top."""
    try:
        from pycocotools import mask as coco_mask  # optional: COCO's own polygon rasteriser when installed
    except ImportError:
        coco_mask = None
    out = np.zeros((height, width), np.uint8)
    for i, ann in enumerate(annotations[:255], 1):
        seg = ann.get("segmentation")
        if not seg:
            continue
        if isinstance(seg, dict):
            binary = rle_decode(seg)
        elif coco_mask is not None:
            binary = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(seg, height, width)))
        else:
            binary = polygon_mask(seg, height, width)
        if binary.shape != out.shape:
            raise Skip("mask_size_mismatch")
        out[binary.astype(bool)] = i
    return out


def read_mask(path: Path) -> np.ndarray:
    """Object ids of a DAVIS-style annotation: palette index (P/L images) or one id per RGB colour."""
    try:
        im = Image.open(path)
        im.load()
    except (OSError, SyntaxError, ValueError):
        raise Skip("corrupt_mask") from None
    if im.mode in ("P", "L"):
        return np.asarray(im)
    rgb = np.asarray(im.convert("RGB")).reshape(-1, 3)
    colours, ids = np.unique(rgb, axis=0, return_inverse=True)  # black sorts first: it stays 0
    if len(colours) > 256:
        raise Skip("too_many_objects")
    return ids.reshape(im.height, im.width).astype(np.uint8)


Format = tuple[list, Callable[[Any], dict], Counter, dict[str, Any]]  # items, make_sample, skipped, extra files


def class_mapping(root: Path, classes_file: str | None) -> dict[str, int]:
    """Class name -> label: the sorted sub-folder names of ``root``, or the mapping of another shard set's
    classes.json, so that a split converted on its own (a val folder lacking a class) gets the same labels."""
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise UsageError(f"{root} has no class sub-folders; expected {root}/<class_name>/<image files>")
    if classes_file is None:
        return {name: i for i, name in enumerate(folders)}
    try:
        mapping = json.loads(Path(classes_file).read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"--classes {classes_file} cannot be read as a classes.json ({err})") from None
    unknown = sorted(set(folders) - set(mapping))
    if unknown:
        raise UsageError(f"{root} has class folder(s) {unknown[:10]} that --classes {classes_file} does not name "
                         f"({len(unknown)} in all): their labels would be undefined")
    return mapping


def imagefolder(args: argparse.Namespace) -> Format:
    root = Path(args.input)
    mapping = class_mapping(root, args.classes)
    classes = {label: name for name, label in mapping.items()}
    old = Path(args.output, "classes.json")
    if old.exists() and json.loads(old.read_text()) != mapping and not args.overwrite:
        raise UsageError(f"{old} maps other classes than {root}: labels would disagree between shard sets; "
                         "use another --output, or --overwrite")
    items = [(p, label) for name, label in mapping.items() if (root / name).is_dir()
             for p in sorted((root / name).rglob("*")) if p.is_file()]
    skipped = Counter(not_in_a_class_folder=sum(p.is_file() for p in root.iterdir()))

    def make(item: tuple[Path, int]) -> dict:
        path, label = item
        jpg, _ = load_jpeg(path)
        meta = {"label": label, "class_name": classes[label], "source": str(path.relative_to(root))}
        return {"jpg": jpg, "cls": str(label).encode(), "json": json.dumps(meta).encode()}

    return items, make, skipped, {"classes.json": mapping}


def captions(args: argparse.Namespace) -> Format:
    path = Path(args.input)
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() in (".tsv", ".csv"):
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    else:
        try:
            delimiter = csv.Sniffer().sniff(text[:8192], delimiters=",\t;|").delimiter
        except csv.Error:
            raise UsageError(f"cannot tell the delimiter of {path}; name it .csv or .tsv") from None
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    missing = {args.image_column, args.caption_column} - set(reader.fieldnames or [])
    if missing:
        raise UsageError(f"{path} has no column(s) {sorted(missing)}; its header is {reader.fieldnames}; "
                         "pass --image_column / --caption_column")

    def make(row: dict) -> dict:
        image, text = row.get(args.image_column), row.get(args.caption_column)
        if image is None or text is None:
            raise Skip("malformed_row")
        if not text.strip():
            raise Skip("empty_caption")
        jpg, _ = load_jpeg(path.parent / image.strip())  # an absolute path stays absolute
        return {"jpg": jpg, "txt": text.strip().encode()}

    return list(reader), make, Counter(), {}


def coco(args: argparse.Namespace) -> Format:
    if not args.images or not Path(args.images).is_dir():
        raise UsageError(f"--format coco needs --images DIR with the image files (got {args.images!r})")
    try:
        data = json.loads(Path(args.input).read_text())
    except ValueError as err:
        raise UsageError(f"{args.input} is not a JSON file ({err})") from None
    if not isinstance(data, dict) or "images" not in data:
        raise UsageError(f"{args.input} is not a COCO instances file: no top-level 'images' list")
    by_image = defaultdict(list)
    for ann in data.get("annotations", []):
        by_image[ann["image_id"]].append(ann)

    def make(image: dict) -> dict:
        jpg, (width, height) = load_jpeg(Path(args.images, image["file_name"]))
        anns = [{k: a.get(k) for k in ("id", "bbox", "category_id", "segmentation", "iscrowd", "area")}
                for a in by_image[image["id"]]]
        meta = {"image_id": image["id"], "file_name": image["file_name"], "width": width, "height": height,
                "annotations": anns}
        return {"jpg": jpg, "json": json.dumps(meta).encode(), "mask.png": png(instance_mask(anns, height, width))}

    return data["images"], make, Counter(), {"categories.json": data.get("categories", [])}


def video(args: argparse.Namespace) -> Format:
    frames_root = Path(args.input, "JPEGImages", args.resolution)
    masks_root = Path(args.input, "Annotations", args.resolution)
    if not frames_root.is_dir():
        raise UsageError(f"{frames_root} does not exist: expected ROOT/JPEGImages/<resolution>/<video>/*.jpg "
                         "(check --input and --resolution)")

    def make(name: str) -> dict:
        frames = sorted(p for p in (frames_root / name).iterdir() if p.is_file())
        if not frames:
            raise Skip("no_frames")
        sample: dict[str, Any] = {}
        annotated = []
        for t, frame in enumerate(frames):  # one bad frame skips the video: a gap would break its timing
            sample[f"{t:03d}.jpg"], (width, height) = load_jpeg(frame)
            mask_path = masks_root / name / f"{frame.stem}.png"
            if mask_path.exists():
                ids = read_mask(mask_path)
                if ids.shape != (height, width):
                    raise Skip("mask_size_mismatch")
                sample[f"{t:03d}.mask.png"] = png(ids)
                annotated.append(t)
        meta = {"name": name, "num_frames": len(frames), "frames": [p.stem for p in frames],
                "annotated_frames": annotated}
        return {**sample, "json": json.dumps(meta).encode()}

    return sorted(d.name for d in frames_root.iterdir() if d.is_dir()), make, Counter(), {}


# -- conversations (PerceptionLM's jsonl) -------------------------------------------------------------------------
ROLES = {"human": "human", "user": "human", "gpt": "assistant", "assistant": "assistant", "system": "system"}
"""Speaker names accepted in ``from``, and the name written: PLM's human / assistant (and system)."""
MARKERS = {"image": IMAGE_MARKER, "video": VIDEO_MARKER}
VIDEO_FILES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
FRAME_FILES = (".jpg", ".jpeg", ".png")
SHOWN_PROBLEMS = 10


class LineError(Exception):
    """A jsonl line that cannot become a sample; the message names the field and how to fix it."""


def video_reader() -> Callable[[Path], tuple[list[np.ndarray], float | None]] | None:
    """Decoder of video files, (RGB frames, fps or None), through PyAV where it is installed; None where not.
    (torchvision's read_video, in the releases that still have it, decodes with PyAV too.)"""
    try:
        import av
    except ImportError:
        return None

    def read(path: Path) -> tuple[list[np.ndarray], float | None]:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
            rate = stream.average_rate
        return frames, float(rate) if rate else None

    return read


def _natural(path: Path) -> list:
    """Sort key in which frame 2 comes before frame 10 (digit runs compare as numbers)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def frame_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_FILES), key=_natural)


def _check_turns(record: dict) -> list[dict]:
    """The turns with PLM's speaker names; at least one assistant turn with text."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise LineError("'conversations' must be a non-empty list of {\"from\": ..., \"value\": ...} turns")
    out = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise LineError(f"conversations[{k}] must be {{\"from\": ..., \"value\": \"text\"}}, got "
                            f"{json.dumps(turn)[:80]}")
        if turn.get("from") not in ROLES:
            raise LineError(f"conversations[{k}].from is {turn.get('from')!r}: use 'human' (or 'user'), 'gpt' (or "
                            "'assistant') or 'system'")
        out.append({**turn, "from": ROLES[turn["from"]]})
    if not any(t["from"] == "assistant" and t["value"].strip() for t in out):
        raise LineError("'conversations' has no assistant turn (from 'gpt' or 'assistant') with text, so nothing to "
                        "train on: add the answer, or drop the line")
    return out


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _check_markers(turns: list[dict], kind: str) -> None:
    """One marker of the line's medium, in a human turn, and none of the other: the model puts the media tokens
    where the marker is, so a missing or extra one misplaces them (or feeds none)."""
    for medium, marker in sorted(MARKERS.items(), key=lambda item: item[0] != kind):  # the line's own first
        stray = [t["from"] for t in turns if t["from"] != "human" and marker in t["value"]]
        if stray:
            raise LineError(f"{_a(stray[0])} turn holds the marker '{marker}': markers go in human turns only")
        found = sum(t["value"].count(marker) for t in turns)
        if medium == kind and found != 1:
            raise LineError(f"'{kind}' is given but the human turns hold {found} '{marker}' markers: put exactly one "
                            f"where the {kind} goes, e.g. \"{marker}\\nDescribe the {kind}.\"")
        if medium != kind and found:
            raise LineError(f"'{kind}' is given but the human turns hold '{marker}': {_a(kind)} line takes "
                            f"'{MARKERS[kind]}' only")


def _check_media(record: dict, media_root: Path) -> tuple[str, Path]:
    kinds = [k for k in MARKERS if k in record]
    if len(kinds) != 1:
        raise LineError("has both 'image' and 'video': one medium per line, split it in two" if kinds else
                        "has neither 'image' nor 'video' (text-only conversations are not converted): add the media "
                        "path, relative to --media_root")
    kind, name = kinds[0], record[kinds[0]]
    if not isinstance(name, str) or not name:
        raise LineError(f"'{kind}' must be one path (a string), got {json.dumps(name)[:80]}: lines with several "
                        f"{kind}s are not converted; split them, one {kind} per line")
    path = media_root / name  # an absolute path stays absolute
    if kind == "video" and path.is_dir():
        if not frame_files(path):
            raise LineError(f"video folder {path} holds no frames ({', '.join(FRAME_FILES)} files)")
    elif kind == "video" and path.is_file():
        if path.suffix.lower() not in VIDEO_FILES:
            raise LineError(f"'video' {name!r} is neither a folder of frames nor a video file "
                            f"({', '.join(VIDEO_FILES)})")
        if video_reader() is None:
            raise LineError(f"'video' {name!r} is a video file, and PyAV (the 'av' package), which would decode it, is "
                            "not installed: extract its frames into a folder first (e.g. ffmpeg -i VIDEO -q:v 2 "
                            "FOLDER/%05d.jpg) and give the folder as 'video', or install av")
    elif not path.is_file():
        raise LineError(f"'{kind}' {name!r} not found (looked for {path}): fix the path or --media_root, which paths "
                        "are relative to, or drop the line")
    return kind, path


def parse_conversation_line(line: str, media_root: Path) -> dict:
    """A jsonl line, checked: {"record", "turns", "kind" ("image" | "video"), "path"}; LineError says what is wrong."""
    try:
        record = json.loads(line)
    except ValueError as err:
        raise LineError(f"not valid JSON ({err}): each line must be one JSON object") from None
    if not isinstance(record, dict):
        raise LineError(f"is a JSON {type(record).__name__}, not an object: each line must be one {{...}}")
    kind, path = _check_media(record, media_root)
    turns = _check_turns(record)
    _check_markers(turns, kind)
    return {"record": record, "turns": turns, "kind": kind, "path": path}


def _video_frames(path: Path) -> tuple[list[bytes], float | None]:
    if path.is_dir():
        return [load_jpeg(frame)[0] for frame in frame_files(path)], None
    read = video_reader()
    assert read is not None  # parse_conversation_line refuses video files without a decoder
    try:
        frames, rate = read(path)
    except Exception:  # noqa: BLE001 - whatever the decoder raises on a broken file
        raise Skip("corrupt_video") from None
    if not frames:
        raise Skip("no_frames")
    out = []
    for frame in frames:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out, rate


def conversation_sample(parsed: dict, line: int, default_fps: float | None) -> dict:
    """The sample of a checked line: its fields, the turns renamed, ``media`` and ``line``; ``jpg`` or ``NNN.jpg``
    frames plus ``num_frames`` and ``fps`` (the line's own, else the video file's, else ``default_fps``)."""
    record, kind = parsed["record"], parsed["kind"]
    meta = {**record, "conversations": parsed["turns"], "media": kind, "line": line}
    if kind == "image":
        jpg, _ = load_jpeg(parsed["path"])
        return {"jpg": jpg, "json": json.dumps(meta).encode()}
    frames, rate = _video_frames(parsed["path"])
    fps = record.get("fps", rate if rate is not None else default_fps)
    meta.update(num_frames=len(frames), **({"fps": fps} if fps is not None else {}))
    return {**{f"{t:03d}.jpg": frame for t, frame in enumerate(frames)}, "json": json.dumps(meta).encode()}


def conversation(args: argparse.Namespace) -> Format:
    path = Path(args.input)
    media_root = Path(args.media_root) if args.media_root else path.parent
    if not media_root.is_dir():
        raise UsageError(f"--media_root {media_root} is not a folder")
    items, problems = [], []
    with open(path, encoding="utf-8-sig") as f:  # lines end at newlines only: JSON strings may hold U+2028
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                items.append((number, parse_conversation_line(line, media_root)))
            except LineError as err:
                problems.append(f"line {number}: {err}")
    if problems:
        more = f"\n  ... and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        raise UsageError(f"{path}: {len(problems)} of {len(problems) + len(items)} lines cannot be converted, so "
                         "nothing was written:\n  " + "\n  ".join(problems[:SHOWN_PROBLEMS]) + more)

    def make(item: tuple[int, dict]) -> dict:
        return conversation_sample(item[1], item[0], args.fps)

    return items, make, Counter(), {}


FORMATS = {"imagefolder": imagefolder, "captions": captions, "coco": coco, "video": video,
           "conversation": conversation}


def convert(args: argparse.Namespace) -> dict[str, Any]:
    """Write the shards; returns the index (num_samples, shards, skipped, source)."""
    items, make, skipped, extras = FORMATS[args.format](args)
    if not args.keep_order:
        # Folder listings group a class (or a video category) together, and a loader reads a shard front to
        # back: in input order, whole shards and whole batches would hold one class, and training on them
        # learns the current shard's class instead of the task.
        random.Random(args.seed).shuffle(items)
    source = f"make_shards --format {args.format} --input {Path(args.input).resolve()}"
    # Planned from the inputs, skipped ones included: a few skips leave the last shards a little short.
    sizes = balanced_shard_sizes(len(items), args.max_count, args.min_shards)
    with ShardWriter(args.output, args.prefix, args.max_count, args.max_size, source, args.overwrite,
                     shard_sizes=sizes) as writer:
        for reason, count in skipped.items():
            if count:
                writer.skip(reason, count)
        for item in tqdm(items, desc=f"{args.format} -> {args.output}", unit="sample"):
            try:
                sample = make(item)
            except Skip as skip:
                writer.skip(skip.reason)
                continue
            writer.write({"__key__": f"{args.prefix}-{writer.num_samples:08d}", **sample})
    for name, obj in extras.items():
        Path(args.output, name).write_text(json.dumps(obj, indent=1))
    return {"num_samples": writer.num_samples, "shards": writer.shards, "skipped": dict(writer.skipped)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datamodules.make_shards", description=__doc__.split("\n")[0],
                                     epilog=__doc__[__doc__.index("Shard sizes:"):])
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--input", required=True,
                        help="dataset folder (imagefolder, video) or file (captions, coco, conversation)")
    parser.add_argument("--output", required=True, help="folder for the shards and the index")
    parser.add_argument("--prefix", default="train", help="shard names: PREFIX-000000.tar, ... (default train)")
    parser.add_argument("--max_count", type=int, default=1000, help="samples per shard at most (default 1000)")
    parser.add_argument("--min_shards", type=int, default=8,
                        help="shards a set smaller than min_shards x max_count is cut into, with near-equal sizes "
                             "(fewer when there are fewer inputs); 1: fill shards up to max_count (default 8)")
    parser.add_argument("--max_size", type=float, default=1e9, help="bytes per shard at most")
    parser.add_argument("--overwrite", action="store_true", help="replace a shard set with the same prefix")
    parser.add_argument("--keep_order", action="store_true",
                        help="write samples in the input's order (default: a random order drawn from --seed, so "
                             "that every shard and batch mixes classes)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order (default 0)")
    parser.add_argument("--classes", help="imagefolder: a classes.json (e.g. the train shards') whose labels to use, "
                                          "for a split converted on its own; default: the sorted class folders")
    parser.add_argument("--images", help="coco: folder holding the images named by file_name")
    parser.add_argument("--image_column", default="image", help="captions: column with the image path")
    parser.add_argument("--caption_column", default="caption", help="captions: column with the caption")
    parser.add_argument("--resolution", default="480p", help="video: sub-folder of JPEGImages/ and Annotations/")
    parser.add_argument("--media_root", "--media-root", dest="media_root",
                        help="conversation: folder the lines' image / video paths are relative to (default: the "
                             "jsonl's folder)")
    parser.add_argument("--fps", type=float, help="conversation: frame rate recorded for a frame-folder video whose "
                                                  "line has no 'fps' (default: none recorded)")
    args = parser.parse_args(argv)
    for name in ("max_count", "min_shards"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not Path(args.input).exists():
        print(f"error: --input {args.input} does not exist", file=sys.stderr)
        return 2
    try:
        index = convert(args)
    except (UsageError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(index["skipped"].items())) or "none"
    print(f"wrote {index['num_samples']} samples in {len(index['shards'])} shard(s) to {args.output}\n"
          f"skipped {sum(index['skipped'].values())}: {skipped}\nindex: {index_path(args.output, args.prefix)}")
    if index["num_samples"] == 0:
        print(f"error: nothing could be written from {args.input} (see the skip reasons above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
