"""PerceptionLM's visual inputs (Cho et al. 2025): images as a grid of tiles (plus a thumbnail), videos as a fixed
number of frames, every tile and frame S x S pixels (S = 448) and normalised as PE is (mean = std = 0.5).

Tiling follows facebookresearch/perception_models core/transforms/image_transform.py:VariableSizeImageTransform
(transformers models/perception_lm/image_processing_perception_lm.py ports the same rules):

- a canvas is a grid of ``n_w x n_h`` tiles with ``n_w n_h <= max_num_tiles``;
- when the image fits inside some canvas at its own size, the canvas is the one on which an aspect-preserving
  resize makes the image's shorter side longest, so small images are *upsampled* (300 x 300 with 16 tiles: the
  4 x 4 canvas, 1792 x 1792); on a tie the last candidate in the order of :func:`find_supported_aspect_ratios`
  wins;
- when it fits none, the canvas is the grid whose aspect ratio is closest from below (landscape) or above
  (portrait), the largest such grid;
- the image is then squashed (bicubic, no padding) to the whole canvas and cut into tiles row by row; in
  ``thumb+tile`` mode a thumbnail, the whole image squashed to S x S, comes first.

``vanilla`` mode (stage 1) is a single tile: the image squashed to S x S (image_transform.py:ImageTransform).
Resampling is PIL's bicubic, which the reference applies to PIL images (its ``_resize``). transformers' port
resamples uint8 tensors with torchvision's antialiased bicubic: the same filter, but PIL also rounds to 8 bits
between its horizontal and vertical passes, which moves image-like inputs by at most 2 levels on a few pixels
(pixel noise, whose bicubic overshoot is clipped there, by more).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .captions import PE_MEAN, PE_STD
from .make_shards import FRAME_FILES, frame_files, video_reader
from .transforms import normalize_on_device

__all__ = ["TILE_SIZE", "VisionInput", "find_supported_aspect_ratios", "fit_image_to_canvas", "find_closest_canvas",
           "canvas_grid", "tile_image", "PLMImageTransform", "uniform_sample", "sample_video_frames",
           "video_frames", "read_image", "read_video"]

TILE_SIZE = 448
"""PLM's tile and frame side (all stages, 1B to 8B)."""
VisionInput = Literal["vanilla", "thumb+tile"]


def find_supported_aspect_ratios(max_num_tiles: int) -> dict[float, list[tuple[int, int]]]:
    """Every tile grid ``(n_w, n_h)`` with at most ``max_num_tiles`` tiles, grouped by aspect ratio ``n_w / n_h``.

    The order is the reference's and decides ties in :func:`fit_image_to_canvas`: tile counts from
    ``max_num_tiles`` down to 1, and within a count widths ascending; a ratio's group sits where the ratio first
    appears (so 5 tiles give ``{0.2: [(1, 5)], 5.0: [(5, 1)], 0.25: [(1, 4)], 1.0: [(2, 2), (1, 1)], ...}``).
    """
    if max_num_tiles < 1:
        raise ValueError(f"max_num_tiles must be >= 1, got {max_num_tiles}")
    ratios: dict[float, list[tuple[int, int]]] = {}
    for count in range(max_num_tiles, 0, -1):
        for width in (w for w in range(1, count + 1) if count % w == 0):
            ratios.setdefault(width / (count // width), []).append((width, count // width))
    return ratios


def _shorter_side_on(width: int, height: int, canvas_width: int, canvas_height: int) -> float:
    """The image's shorter side after the largest aspect-preserving resize into the canvas, computed with the
    reference's arithmetic (its ``_get_image_height_width``: the longer side is scaled, the shorter one derived
    from it and floored, except for square images), so that ties between canvases fall as they do there."""
    scale = width / height
    factor = min(canvas_width / width, canvas_height / height)
    if scale > 1:
        return math.floor(factor * width / scale)
    if scale < 1:
        return math.floor(factor * height * scale)
    return factor * height


def fit_image_to_canvas(width: int, height: int, tile_size: int, max_num_tiles: int) -> tuple[int, int] | None:
    """The grid ``(n_w, n_h)`` whose canvas holds the image at its own size and on which the image's shorter side
    becomes longest (the last such grid on a tie); None when no canvas holds it."""
    best, best_side = None, -math.inf
    for grids in find_supported_aspect_ratios(max_num_tiles).values():
        for n_w, n_h in grids:
            if n_w * tile_size < width or n_h * tile_size < height:
                continue
            side = _shorter_side_on(width, height, n_w * tile_size, n_h * tile_size)
            if side >= best_side:
                best, best_side = (n_w, n_h), side
    return best


def find_closest_canvas(width: int, height: int, max_num_tiles: int) -> tuple[int, int]:
    """For an image larger than every canvas: the grid with the closest aspect ratio not wider than a landscape
    image (not taller than a portrait one, strictly), the one with the most tiles among grids of that ratio."""
    ratios = find_supported_aspect_ratios(max_num_tiles)
    target = width / height
    if target >= 1:
        ratio = min((r for r in ratios if r <= target), key=lambda r: abs(r - target))
        return max(ratios[ratio], key=lambda grid: grid[0])
    ratio = min((r for r in ratios if r > target), key=lambda r: abs(1 / r - 1 / target))
    return max(ratios[ratio], key=lambda grid: grid[1])


def canvas_grid(width: int, height: int, tile_size: int, max_num_tiles: int) -> tuple[int, int]:
    """The tile grid ``(n_w, n_h)`` of a ``width x height`` image: the fitting canvas, else the closest one."""
    if width < 1 or height < 1:
        raise ValueError(f"an image needs a positive size, got {width} x {height}")
    if max_num_tiles == 1:
        return 1, 1
    grid = fit_image_to_canvas(width, height, tile_size, max_num_tiles)
    return grid if grid is not None else find_closest_canvas(width, height, max_num_tiles)


def _squash(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """uint8 ``(3, height, width)``: the whole image resized (bicubic) to exactly that size, aspect ignored."""
    resized = image if image.size == (width, height) else image.resize((width, height), Image.BICUBIC)
    return TF.pil_to_tensor(resized)


def _split_tiles(canvas: torch.Tensor, n_w: int, n_h: int, tile_size: int) -> torch.Tensor:
    # (3, n_h S, n_w S) -> (n_h n_w, 3, S, S), row by row, left to right
    tiles = canvas.view(3, n_h, tile_size, n_w, tile_size).permute(1, 3, 0, 2, 4)
    return tiles.reshape(n_h * n_w, 3, tile_size, tile_size)


def _normalize(pixels: torch.Tensor, normalize: bool) -> torch.Tensor:
    return normalize_on_device(pixels, PE_MEAN, PE_STD) if normalize else pixels


def tile_image(image: Image.Image, tile_size: int = TILE_SIZE, max_num_tiles: int = 1, thumbnail: bool = True,
               normalize: bool = True) -> torch.Tensor:
    """An image -> its tiles ``(n, 3, S, S)``: the thumbnail first when ``thumbnail``, then the canvas's
    ``n_w n_h`` tiles row by row. Float normalised with PE's mean and std, or uint8 when not ``normalize`` (to
    normalise on the device). ``max_num_tiles=1, thumbnail=False`` is ``vanilla`` mode: one squashed tile."""
    image = image.convert("RGB")
    n_w, n_h = canvas_grid(*image.size, tile_size, max_num_tiles)
    tiles = _split_tiles(_squash(image, n_w * tile_size, n_h * tile_size), n_w, n_h, tile_size)
    if thumbnail:
        tiles = torch.cat([_squash(image, tile_size, tile_size).unsqueeze(0), tiles])
    return _normalize(tiles, normalize)


class PLMImageTransform:
    """A PLM stage's image input as a picklable callable: ``vanilla`` (one squashed tile) or ``thumb+tile`` (the
    thumbnail, then up to ``max_num_tiles`` tiles)."""

    def __init__(self, vision_input: VisionInput = "thumb+tile", tile_size: int = TILE_SIZE,
                 max_num_tiles: int = 16, normalize: bool = True):
        if vision_input not in ("vanilla", "thumb+tile"):
            raise ValueError(f"vision_input must be 'vanilla' or 'thumb+tile', got {vision_input!r}")
        if max_num_tiles < 1:
            raise ValueError(f"max_num_tiles must be >= 1, got {max_num_tiles}")
        self.vision_input = vision_input
        self.tile_size = tile_size
        self.max_num_tiles = max_num_tiles if vision_input == "thumb+tile" else 1
        self.normalize = normalize

    def num_tiles(self, width: int, height: int) -> int:
        """Tiles of a ``width x height`` image, thumbnail included: the number of visual tokens over the tokens
        per tile, known before any pixel is touched."""
        if self.vision_input == "vanilla":
            return 1
        n_w, n_h = canvas_grid(width, height, self.tile_size, self.max_num_tiles)
        return n_w * n_h + 1

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return tile_image(image, self.tile_size, self.max_num_tiles, self.vision_input == "thumb+tile",
                          self.normalize)


# ----------------------------------------------------------------------------------------------------
# Video


def uniform_sample(m: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``range(m)`` from the first to the last: ``round(i (m - 1) / (n - 1))``.

    Python's ``round`` rounds halves to even (as ``numpy.round`` does), so ``uniform_sample(6, 3) == [0, 2, 5]``;
    the quotient of two integers is exact at a half, so ties are real ties. ``n = 1`` picks the first index.
    """
    if not 1 <= n <= m:
        raise ValueError(f"uniform_sample picks 1 <= n <= m indices, got n={n} of m={m}")
    if n == 1:
        return [0]
    return [round(i * (m - 1) / (n - 1)) for i in range(n)]


def sample_video_frames(num_raw_frames: int, fps: float | None, max_frames: int) -> list[int]:
    """The raw frame indices a PLM clip uses: ``max_frames`` of them, uniformly from the 1-fps frames (the frame
    on screen at each whole second, ``floor(k fps)``), or from all raw frames when 1 fps gives fewer than
    ``max_frames`` (short clips, or ``fps`` unknown or <= 1); every raw frame when the clip has fewer."""
    if num_raw_frames < 1 or max_frames < 1:
        raise ValueError(f"a clip needs >= 1 frame and >= 1 frame to take, got {num_raw_frames} and {max_frames}")
    if num_raw_frames <= max_frames:
        return list(range(num_raw_frames))
    candidates = list(range(num_raw_frames))
    if fps is not None and fps > 1:
        seconds = math.ceil(num_raw_frames / fps)
        per_second = [math.floor(k * fps) for k in range(seconds)]
        per_second = [index for index in per_second if index < num_raw_frames]
        if len(per_second) >= max_frames:
            candidates = per_second
    return [candidates[i] for i in uniform_sample(len(candidates), max_frames)]


def video_frames(frames: Sequence[Image.Image] | torch.Tensor, tile_size: int = TILE_SIZE,
                 normalize: bool = True) -> torch.Tensor:
    """Frames (PIL images, or a uint8 ``(T, 3, H, W)`` tensor) -> ``(T, 3, S, S)``, each squashed to S x S
    (bicubic, no thumbnail, no tiles) and normalised as :func:`tile_image` does.

    PIL frames resample with PIL; a tensor with torchvision's antialiased bicubic, as transformers'
    PerceptionLMVideoProcessor does (the same filter without PIL's 8-bit rounding between passes)."""
    if isinstance(frames, torch.Tensor):
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"video frames must be uint8 (T, 3, H, W), got {frames.dtype} {tuple(frames.shape)}")
        pixels = TF.resize(frames, [tile_size, tile_size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    else:
        if not frames:
            raise ValueError("a video needs at least one frame")
        pixels = torch.stack([_squash(frame.convert("RGB"), tile_size, tile_size) for frame in frames])
    return _normalize(pixels, normalize)


# ----------------------------------------------------------------------------------------------------
# Files


def read_image(path: str | Path) -> Image.Image:
    """The RGB image of a .jpg / .png file (any format PIL reads); a ValueError when there is none to read."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as err:  # missing, a folder, not an image, truncated
        raise ValueError(f"{path} is not a readable image ({type(err).__name__}: {err})") from None


def read_video(path: str | Path, max_frames: int, fps: float | None = None) -> list[Image.Image]:
    """The frames a PLM clip uses (:func:`sample_video_frames`) of a folder of .jpg / .png frames in natural name
    order (only those frames are decoded) or of a video file, which needs PyAV (``make_shards.video_reader``; its
    own frame rate unless ``fps`` is given). A ValueError says what cannot be read."""
    path = Path(path)
    if path.is_dir():
        files = frame_files(path)
        if not files:
            raise ValueError(f"{path}: no frames in the folder ({', '.join(FRAME_FILES)} files)")
        return [read_image(files[i]) for i in sample_video_frames(len(files), fps, max_frames)]
    if not path.is_file() or path.suffix.lower() in FRAME_FILES:
        return [read_image(path)]  # a single frame, or the error of a missing path
    if (read := video_reader()) is None:
        raise ValueError(f"{path}: reading a video file needs PyAV (pip install av); or give a folder of its frames "
                         "(ffmpeg -i VIDEO FOLDER/%05d.jpg)")
    try:
        frames, rate = read(path)
    except Exception as err:  # noqa: BLE001 - whatever the decoder raises on a broken file
        raise ValueError(f"{path} is not a readable video ({type(err).__name__}: {err})") from None
    if not frames:
        raise ValueError(f"{path}: the video has no frames")
    return [Image.fromarray(frames[i]) for i in sample_video_frames(len(frames), fps or rate, max_frames)]
