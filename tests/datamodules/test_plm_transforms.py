import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.plm_transforms import (TILE_SIZE, PLMImageTransform, canvas_grid, find_closest_canvas,
                                        find_supported_aspect_ratios, fit_image_to_canvas, sample_video_frames,
                                        tile_image, uniform_sample, video_frames)

LEVEL = 2 / 255
"""One 8-bit level in PE-normalised units ((x / 255 - 0.5) / 0.5)."""


def smooth_image(width, height, seed=0):
    """Random colour blobs (an upsampled 8x coarser noise image), nearer a photograph than pixel noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8))
    return coarse.resize((width, height), Image.BILINEAR)


def noise_image(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_the_worked_example_upsamples_300_square_to_a_4x4_canvas():
    assert TILE_SIZE == 448
    assert canvas_grid(300, 300, TILE_SIZE, 16) == (4, 4)  # 1792 x 1792: the 300-pixel side becomes 1792
    tiles = tile_image(smooth_image(300, 300), TILE_SIZE, 16, thumbnail=True)
    assert tiles.shape == (17, 3, 448, 448) and tiles.dtype == torch.float32
    assert -1 <= tiles.min() and tiles.max() <= 1


def test_supported_grids_come_in_the_reference_order():
    # the example of perception_models core/transforms/image_transform.py:_find_supported_aspect_ratios
    assert list(find_supported_aspect_ratios(5).items()) == [
        (0.2, [(1, 5)]), (5.0, [(5, 1)]), (0.25, [(1, 4)]), (1.0, [(2, 2), (1, 1)]), (4.0, [(4, 1)]),
        (1 / 3, [(1, 3)]), (3.0, [(3, 1)]), (0.5, [(1, 2)]), (2.0, [(2, 1)])]
    grids = [g for group in find_supported_aspect_ratios(16).values() for g in group]
    assert len(grids) == len(set(grids)) == sum(len([w for w in range(1, n + 1) if n % w == 0]) for n in range(1, 17))
    assert all(w * h <= 16 for w, h in grids)


@pytest.mark.parametrize("size, grid", [
    # portrait 200 x 900: canvases need 3+ rows; on 2 x 8 (896 x 3584) the image scales by min(4.48, 3.98), its
    # width becomes 796, more than on 2 x 7 (697), 3 x 5 (497), 1 x 16 (448) or 4 x 4 (398)
    ((200, 900), (2, 8)),
    # 640 x 480: 4 x 4, 5 x 3 and 4 x 3 all give a 1344-pixel height (scale 2.8); the last listed, 4 x 3, wins
    ((640, 480), (4, 3)),
    # 1000 x 300: 8 x 2 and 7 x 2 both give an 896 height (the 896-row canvas binds); 7 x 2 is listed later
    ((1000, 300), (7, 2)),
    # larger than any 16-tile canvas: the closest ratio not above 5.0 is 5.0 itself, grids [(5, 1)]
    ((5000, 1000), (5, 1)),
    # portrait 1:5, too tall for any canvas: the closest ratio above 0.2 in 1/ratio is 0.25, its tallest grid 2 x 8
    ((1000, 5000), (2, 8)),
    ((10, 10), (4, 4)),      # tiny: upsampled to the largest square canvas
    ((448, 448), (4, 4)),    # exactly one tile still goes to 4 x 4 (1792 > 448)
    # one pixel taller than 4 x 4: holding it would take 4 x 5 tiles, so no canvas fits; the closest ratio above
    # 1792 / 1793 is 1.0, its tallest grid 4 x 4 (a one-pixel downsample)
    ((1792, 1793), (4, 4)),
])
def test_grids_computed_by_hand(size, grid):
    assert canvas_grid(*size, 448, 16) == grid


def test_fit_and_closest_split_the_cases():
    assert fit_image_to_canvas(5000, 1000, 448, 16) is None and find_closest_canvas(5000, 1000, 16) == (5, 1)
    assert fit_image_to_canvas(300, 300, 448, 16) == (4, 4)
    assert canvas_grid(3000, 100, 448, 1) == (1, 1)  # one tile: always the whole image squashed


def test_tiles_are_the_squashed_canvas_row_by_row_after_the_thumbnail():
    # four flat quadrants on a 2 x 2 canvas of 32-pixel tiles: each tile is one colour, in reading order
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    image = Image.new("RGB", (50, 50))
    for k, colour in enumerate(colours):
        image.paste(colour, (25 * (k % 2), 25 * (k // 2), 25 * (k % 2) + 25, 25 * (k // 2) + 25))
    tiles = tile_image(image, tile_size=32, max_num_tiles=4, thumbnail=True, normalize=False)
    assert tiles.shape == (5, 3, 32, 32) and tiles.dtype == torch.uint8
    assert [tuple(t[:, 8, 8].tolist()) for t in tiles[1:]] == colours
    assert torch.equal(tiles[0], torch.from_numpy(np.array(image.resize((32, 32), Image.BICUBIC))).permute(2, 0, 1))
    canvas = torch.from_numpy(np.array(image.resize((64, 64), Image.BICUBIC))).permute(2, 0, 1)
    assert torch.equal(tiles[2], canvas[:, :32, 32:]) and torch.equal(tiles[3], canvas[:, 32:, :32])
    normalised = tile_image(image, tile_size=32, max_num_tiles=4)
    assert torch.allclose(normalised, tiles.float() / 255 * 2 - 1, atol=1e-6)  # PE: mean = std = 0.5


def test_vanilla_is_one_squashed_tile():
    image = smooth_image(300, 120)
    transform = PLMImageTransform("vanilla", tile_size=64, max_num_tiles=16, normalize=False)
    tiles = transform(image)
    assert tiles.shape == (1, 3, 64, 64) and transform.num_tiles(300, 120) == 1
    assert torch.equal(tiles[0], torch.from_numpy(np.array(image.resize((64, 64), Image.BICUBIC))).permute(2, 0, 1))


def test_the_transform_knows_its_tile_count_and_pickles():
    transform = pickle.loads(pickle.dumps(PLMImageTransform("thumb+tile", tile_size=32, max_num_tiles=6)))
    for size in [(20, 20), (100, 30), (30, 100), (500, 60)]:
        assert len(transform(smooth_image(*size))) == transform.num_tiles(*size)
    with pytest.raises(ValueError, match="vanilla"):
        PLMImageTransform("tiles")


def _hf_processor(tile_size, max_num_tiles, vision_input_type="thumb+tile"):
    from transformers import PerceptionLMImageProcessor

    return PerceptionLMImageProcessor(tile_size=tile_size, max_num_tiles=max_num_tiles,
                                      vision_input_type=vision_input_type, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def test_grids_equal_transformers_on_many_sizes():
    processor = _hf_processor(448, 36)
    rng = np.random.default_rng(0)
    for max_num_tiles in (2, 4, 6, 9, 16, 36):
        processor.max_num_tiles = max_num_tiles
        for width, height in rng.integers(1, 6000, (300, 2)).tolist():
            expected = (processor._fit_image_to_canvas(width, height, 448)
                        or processor._find_closest_aspect_ratio(width, height, 448))
            assert canvas_grid(width, height, 448, max_num_tiles) == tuple(expected), (width, height, max_num_tiles)


def _difference_in_levels(image, tile_size, max_num_tiles, vision_input_type="thumb+tile"):
    processor = _hf_processor(tile_size, max_num_tiles, vision_input_type)
    expected = processor(images=image, return_tensors="pt")["pixel_values"][0]
    tiled = vision_input_type == "thumb+tile"
    tiles = tile_image(image, tile_size, max_num_tiles if tiled else 1, thumbnail=tiled)
    assert tiles.shape == expected.shape
    return (tiles - expected).abs() / LEVEL


SIZES = [((300, 300), 448, 16), ((640, 480), 96, 16), ((100, 450), 64, 9), ((900, 120), 64, 6), ((33, 77), 32, 4),
         ((1000, 700), 64, 4)]


@pytest.mark.parametrize("size, tile_size, max_num_tiles", SIZES)
def test_pixels_match_transformers_within_two_levels(size, tile_size, max_num_tiles):
    # transformers resamples uint8 tensors with torchvision's antialiased bicubic, PIL's filter in float with a
    # single rounding at the end; PIL rounds to 8 bits between its horizontal and vertical passes too. On these
    # image-like inputs that leaves at most 2 levels (measured: 2), on a few values (mean measured <= 0.15 level);
    # a wrong grid, tile order or canvas size would be tens of levels off nearly everywhere.
    image = smooth_image(*size)
    for mode in ("thumb+tile", "vanilla"):
        difference = _difference_in_levels(image, tile_size, max_num_tiles, mode)
        assert difference.max() <= 2 + 1e-3 and difference.mean() < 0.25


@pytest.mark.parametrize("size, tile_size, max_num_tiles", SIZES)
def test_on_pixel_noise_only_the_8bit_rounding_differs(size, tile_size, max_num_tiles):
    # Pixel noise makes bicubic overshoot [0, 255] everywhere, so PIL's clipping between passes shows (measured:
    # up to 16 levels on single values, 2.3% of the values beyond 1 level, mean <= 0.38 level)...
    difference = _difference_in_levels(noise_image(*size), tile_size, max_num_tiles)
    assert difference.mean() < 0.5 and (difference > 1 + 1e-3).float().mean() < 0.03
    # ...while the filters themselves agree: PIL in float ("F" mode) equals torchvision in float
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    channel = np.array(noise_image(*size))[..., 0].astype(np.float32)
    pil = np.array(Image.fromarray(channel, mode="F").resize((tile_size, tile_size), Image.BICUBIC))
    torchvision = TF.resize(torch.from_numpy(channel)[None], [tile_size, tile_size],
                            interpolation=InterpolationMode.BICUBIC, antialias=True)[0].numpy()
    assert np.abs(pil - torchvision).max() < 0.01  # in 8-bit levels


# ----------------------------------------------------------------------------------------------------
# Video


def test_uniform_sample_rounds_halves_to_even():
    assert uniform_sample(10, 8) == [0, 1, 3, 4, 5, 6, 8, 9]  # round(i 9 / 7)
    assert uniform_sample(6, 3) == [0, 2, 5]   # 2.5 -> 2 (half up would give 3)
    assert uniform_sample(4, 3) == [0, 2, 3]   # 1.5 -> 2
    assert uniform_sample(10, 3) == [0, 4, 9]  # 4.5 -> 4
    assert uniform_sample(6, 3) == np.round(np.arange(3) * 5 / 2).astype(int).tolist()  # numpy rounds alike
    assert uniform_sample(5, 5) == [0, 1, 2, 3, 4] and uniform_sample(7, 1) == [0]
    with pytest.raises(ValueError):
        uniform_sample(3, 4)


@pytest.mark.parametrize("raw, fps, max_frames, expected", [
    # 10 frames at 30 fps: 1 fps gives a single frame, too few, so 8 of the 10 raw frames
    (10, 30, 8, [0, 1, 3, 4, 5, 6, 8, 9]),
    # 300 frames at 30 fps: the 1-fps frames are 0, 30, ..., 270; 8 of those 10
    (300, 30, 8, [0, 30, 90, 120, 150, 180, 240, 270]),
    # exactly 8 seconds: the 8 1-fps frames themselves
    (240, 30, 8, [0, 30, 60, 90, 120, 150, 180, 210]),
    # NTSC: frames floor(k 29.97) for k = 0..10 (299 is on screen at 10 s), then round(i 10 / 7)
    (300, 29.97, 8, [0, 29, 89, 119, 179, 209, 269, 299]),
    # 7 seconds at 30 fps give 7 < 8 frames at 1 fps: from the raw frames, round(i 209 / 7)
    (210, 30, 8, [round(i * 209 / 7) for i in range(8)]),
    (5, 30, 8, [0, 1, 2, 3, 4]),           # a clip shorter than the clip length: all its frames
    (100, None, 4, [0, 33, 66, 99]),        # frame rate unknown: the raw frames
    (100, 0.5, 4, [0, 33, 66, 99]),         # slower than 1 fps: every frame is already a 1-fps frame
])
def test_frame_indices_computed_by_hand(raw, fps, max_frames, expected):
    assert sample_video_frames(raw, fps, max_frames) == expected


def test_video_frames_match_transformers_video_processor():
    from transformers import PerceptionLMVideoProcessor

    frames = np.stack([np.array(smooth_image(120, 90, seed)) for seed in range(4)])
    frames = torch.from_numpy(frames).permute(0, 3, 1, 2)  # uint8 (T, 3, H, W), as a video decoder gives
    processor = PerceptionLMVideoProcessor(size={"height": 64, "width": 64})
    expected = processor(videos=[frames], return_tensors="pt", do_sample_frames=False)["pixel_values_videos"][0]
    assert torch.allclose(video_frames(frames, tile_size=64), expected, atol=1e-5)  # the same torchvision resize
    pil = [Image.fromarray(f.permute(1, 2, 0).numpy()) for f in frames]
    ours = video_frames(pil, tile_size=64)
    assert ours.shape == (4, 3, 64, 64) and (ours - expected).abs().max() <= 2 * LEVEL + 1e-5
    assert video_frames(pil, tile_size=64, normalize=False).dtype == torch.uint8
