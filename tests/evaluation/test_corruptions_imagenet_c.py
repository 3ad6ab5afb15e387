"""ImageNet-C corruptions: reference constants, hand-checkable formulas, determinism and shared noise.

Constants are typed from hendrycks/robustness ImageNet-C/create_c/make_imagenet_c.py. Where a test needs
OpenCV or scikit-image it uses them only as an independent reference and skips without them.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from evaluation.corruptions import IMAGENET_C, SEVERITIES, get_corruption, names
from evaluation.corruptions import _imagenet_c_ops as ops

CANONICAL = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
             "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
             "jpeg_compression")


def grey(level: int, h: int = 64, w: int = 64) -> np.ndarray:
    return np.full((h, w, 3), level, dtype=np.uint8)


def scene(h: int = 32, w: int = 40) -> np.ndarray:
    """Smooth gradients and a disc: something with structure for warps and blurs."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([40 + 150 * xx / w, 60 + 120 * yy / h, 120 + 60 * np.sin(xx / 4.0)], axis=-1)
    img[(yy - h / 3) ** 2 + (xx - w / 3) ** 2 < (min(h, w) / 5) ** 2] = (230, 40, 30)
    return img.astype(np.uint8)


def params(name: str, severity: int, seed: int = 0) -> dict:
    return get_corruption(name).sample_parameters(severity, np.random.default_rng(seed))


def apply(name: str, image: np.ndarray, p: dict) -> np.ndarray:
    return get_corruption(name).apply(image, p)


# ---------------------------------------------------------------- registry and constants

def test_registered_in_canonical_order_as_imagenet_c_family():
    assert names("imagenet_c") == CANONICAL == IMAGENET_C
    assert all(get_corruption(n).family == "imagenet_c" for n in CANONICAL)


# make_imagenet_c.py, the `c = [...]` table of each function
REFERENCE_TABLES = {
    "gaussian_noise": ("scale", [0.08, 0.12, 0.18, 0.26, 0.38]),
    "shot_noise": ("rate", [60, 25, 12, 5, 3]),
    "impulse_noise": ("amount", [0.03, 0.06, 0.09, 0.17, 0.27]),
    "brightness": ("shift", [0.1, 0.2, 0.3, 0.4, 0.5]),
    "contrast": ("factor", [0.4, 0.3, 0.2, 0.1, 0.05]),
    "pixelate": ("factor", [0.6, 0.5, 0.4, 0.3, 0.25]),
    "jpeg_compression": ("quality", [25, 18, 15, 10, 7]),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_TABLES))
def test_scalar_constants_match_reference(name):
    key, table = REFERENCE_TABLES[name]
    assert [params(name, s)[key] for s in SEVERITIES] == table


def test_tuple_constants_match_reference():
    def rows(name, keys):
        return [tuple(params(name, s)[k] for k in keys) for s in SEVERITIES]

    assert rows("defocus_blur", ("radius", "alias_blur")) == [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)]
    assert rows("glass_blur", ("sigma", "max_delta", "iterations")) == [
        (0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)]
    assert rows("motion_blur", ("radius", "sigma")) == [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)]
    assert rows("frost", ("image_weight", "frost_weight")) == [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7),
                                                               (0.6, 0.75)]
    assert rows("fog", ("strength", "decay")) == [(1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)]
    assert rows("snow", ("mean", "std", "zoom", "threshold", "blur_radius", "blur_sigma", "blend")) == [
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)]
    # the reference keeps 244 where 224 was meant ("ultimately nothing is incorrect")
    expected = [(488, 170.8, 24.4), (488, 19.52, 48.8), (12.2, 2.44, 4.88), (17.08, 2.44, 4.88), (29.28, 2.44, 4.88)]
    for got, want in zip(rows("elastic_transform", ("alpha", "sigma")), expected):
        assert got == pytest.approx(want[:2])
    for s, want in zip(SEVERITIES, expected):
        jitter = [params("elastic_transform", s, seed)["affine_jitter"] for seed in range(20)]
        assert np.abs(jitter).max() <= want[2] and np.abs(jitter).max() > 0.5 * want[2]


def test_zoom_factors_follow_the_reference_float_arange():
    # np.arange(1, 1.11, 0.01) etc.: float rounding makes the first table end at 1.11 (12 factors)
    expected = [(12, 0.01), (16, 0.01), (11, 0.02), (13, 0.02), (11, 0.03)]
    for s, (count, step) in zip(SEVERITIES, expected):
        zooms = params("zoom_blur", s)["zooms"]
        assert len(zooms) == count
        assert zooms == pytest.approx([1 + k * step for k in range(count)])


def test_random_angles_stay_in_reference_ranges():
    motion = [params("motion_blur", 3, seed)["angle"] for seed in range(50)]
    snow = [params("snow", 3, seed)["angle"] for seed in range(50)]
    assert -45 <= min(motion) and max(motion) < 45 and max(motion) - min(motion) > 45
    assert -135 <= min(snow) and max(snow) < -45 and max(snow) - min(snow) > 45


def test_parameters_are_plain_values():
    for name in CANONICAL:
        json.dumps(params(name, 5))  # no arrays, nothing sized by an image


# ---------------------------------------------------------------- hand-checkable formulas

def test_brightness_by_hand():
    # grey: S = 0, so every channel becomes V + shift; 100/255 + 0.1 -> 125.5 -> 125 after truncation
    assert np.all(apply("brightness", grey(100, 16, 16), {"shift": 0.1}) == 125)
    # (200, 100, 50): V = 200/255, S = 0.75, H = 1/18.  +0.1: V' = 225.5/255 and every channel scales by
    # 225.5/200 -> (225.5, 112.75, 56.375).  +0.3: V' clips to 1 -> (255, 127.5, 63.75).
    pixel = np.tile(np.array([200, 100, 50], np.uint8), (16, 16, 1))
    assert np.all(apply("brightness", pixel, {"shift": 0.1}) == [225, 112, 56])
    assert np.all(apply("brightness", pixel, {"shift": 0.3}) == [255, 127, 63])


def test_brightness_matches_skimage_hsv_round_trip():
    color = pytest.importorskip("skimage.color")
    img = np.random.default_rng(0).integers(0, 256, (24, 24, 3)).astype(np.uint8)
    img[0, :4] = [(0, 0, 0), (90, 90, 90), (200, 200, 40), (200, 40, 200)]  # black, grey, tied maxima
    for s in SEVERITIES:
        shift = params("brightness", s)["shift"]
        hsv = color.rgb2hsv(img / 255.0)
        hsv[..., 2] = np.clip(hsv[..., 2] + shift, 0, 1)
        want = (np.clip(color.hsv2rgb(hsv), 0, 1) * 255).astype(np.uint8)
        np.testing.assert_array_equal(apply("brightness", img, {"shift": shift}), want)


def test_contrast_scales_around_the_channel_mean():
    img = grey(41, 16, 16)
    img[:, 8:] = 200  # mean 120.5 in every channel
    out = apply("contrast", img, {"factor": 0.4})
    assert np.all(out[:, :8] == 88)  # (41 - 120.5) * 0.4 + 120.5 = 88.7
    assert np.all(out[:, 8:] == 152)  # (200 - 120.5) * 0.4 + 120.5 = 152.3


def test_gaussian_noise_std_is_scale_times_255():
    p = params("gaussian_noise", 1)
    change = apply("gaussian_noise", grey(128), p).astype(float) - 128
    assert change.std() == pytest.approx(0.08 * 255, rel=0.03)
    assert abs(change.mean()) < 1.2  # zero-mean noise; truncation takes 0.5 on average


def test_shot_noise_keeps_the_mean_with_poisson_spread():
    # x = 60/255, rate 25: counts ~ Poisson(5.88), output counts * 255 / 25 (mean 60, std sqrt(5.88)*10.2)
    out = apply("shot_noise", grey(60), params("shot_noise", 2)).astype(float)
    assert abs(out.mean() - 60) < 1.5
    assert out.std() == pytest.approx(math.sqrt(60 / 255 * 25) / 25 * 255, rel=0.05)
    # the outputs are multiples of 255 / 25, truncated
    counts = np.round(out / 10.2)
    assert np.all(out == np.floor(counts * 10.2 + 1e-9))


def test_impulse_noise_flips_the_expected_fraction():
    out = apply("impulse_noise", grey(128), params("impulse_noise", 4))
    changed = out != 128
    assert changed.mean() == pytest.approx(0.17, abs=0.015)
    assert np.all(np.isin(out[changed], [0, 255]))
    assert (out == 255).mean() == pytest.approx(0.085, abs=0.012)


def test_impulse_noise_matches_skimage_salt_and_pepper():
    util = pytest.importorskip("skimage.util")
    img = scene()
    p = params("impulse_noise", 3)
    want = (np.clip(util.random_noise(img / 255.0, mode="s&p", amount=p["amount"], rng=p["seed"]), 0, 1)
            * 255).astype(np.uint8)
    np.testing.assert_array_equal(apply("impulse_noise", img, p), want)


def test_pixelate_is_block_mean_then_nearest():
    rng = np.random.default_rng(3)
    means = rng.integers(20, 230, (10, 10))
    img = np.kron(means, np.ones((2, 2), int))
    img = img + np.kron(np.ones((10, 10), int), np.array([[-2, 2], [-1, 1]]))  # each 2x2 block averages to its mean
    img = np.repeat(img[..., None], 3, axis=2).astype(np.uint8)
    out = apply("pixelate", img, {"factor": 0.5})  # 20 -> 10 -> 20
    np.testing.assert_array_equal(out[..., 0], np.kron(means, np.ones((2, 2), int)))


def test_jpeg_equals_pil_round_trip():
    img = scene()
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, format="JPEG", quality=18)
    want = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    np.testing.assert_array_equal(apply("jpeg_compression", img, params("jpeg_compression", 2)), want)


def test_motion_blur_kernel_by_hand():
    # one bright pixel; the output at (x, y) reads the taps at (x + round(i cos a), y + round(i sin a)),
    # weights exp(-i^2 / 2 sigma^2) / sum for i = 0 .. 2 * radius (ImageMagick MotionBlurImage)
    img = np.zeros((41, 41, 1))
    img[20, 30] = 1000.0
    weights = np.exp(-np.arange(21) ** 2 / (2 * 3.0**2))
    weights /= weights.sum()
    along_x = ops.motion_blur(img, 10, 3, 0.0)[..., 0]
    np.testing.assert_allclose(along_x[20, 10:31][::-1], 1000 * weights)
    assert along_x.sum() == pytest.approx(1000 * weights.sum())
    img = np.zeros((41, 41, 1))
    img[35, 20] = 1000.0
    along_y = ops.motion_blur(img, 10, 3, 90.0)[..., 0]  # y points down the rows
    np.testing.assert_allclose(along_y[15:36, 20][::-1], 1000 * weights)


def test_glass_shuffle_equals_the_reference_loop():
    """The reference's loop typed out, including its tuple assignment of numpy views."""
    rng = np.random.default_rng(5)
    for h, w, delta, passes in [(18, 16, 1, 2), (20, 23, 2, 3), (24, 20, 4, 2)]:
        img = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        offsets = rng.integers(-delta, delta, size=(passes, h - 2 * delta, w - 2 * delta, 2))
        x = img.copy()
        for i in range(passes):
            for a, hh in enumerate(range(h - delta, delta, -1)):
                for b, ww in enumerate(range(w - delta, delta, -1)):
                    dx, dy = offsets[i, a, b]
                    x[hh, ww], x[hh + dy, ww + dx] = x[hh + dy, ww + dx], x[hh, ww]
        np.testing.assert_array_equal(ops.glass_shuffle(img, delta, offsets), x)


def test_defocus_matches_opencv_disk_and_filter2d():
    cv2 = pytest.importorskip("cv2")
    img = scene()
    for radius, alias in [(3, 0.1), (10, 0.5)]:
        half = max(8, radius)
        grid = np.arange(-half, half + 1)
        xx, yy = np.meshgrid(grid, grid)
        disk = ((xx**2 + yy**2) <= radius**2).astype(np.float32)
        disk = cv2.GaussianBlur(disk / disk.sum(), (3, 3) if radius <= 8 else (5, 5), alias)
        want = np.stack([cv2.filter2D(img[..., c] / 255.0, -1, disk) for c in range(3)], axis=-1)
        got = apply("defocus_blur", img, {"radius": radius, "alias_blur": alias})
        assert np.abs(got.astype(int) - (np.clip(want, 0, 1) * 255).astype(int)).max() <= 1


def test_affine_warp_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    img = scene().astype(np.float32) / 255
    src = np.float32([[30, 26], [30, 6], [10, 6]])
    dst = src + np.float32([[2, -1], [-3, 2], [1, 1]])
    m = cv2.getAffineTransform(src, dst)
    np.testing.assert_allclose(ops.affine_from_points(src.astype(float), dst.astype(float)), m, atol=1e-5)
    want = cv2.warpAffine(img, m, (img.shape[1], img.shape[0]), borderMode=cv2.BORDER_REFLECT_101)
    np.testing.assert_allclose(ops.warp_affine_reflect101(img, m), want, atol=2e-3)


# ---------------------------------------------------------------- shapes, determinism, shared noise

@pytest.mark.parametrize("name", CANONICAL)
def test_any_size_keeps_shape_and_dtype(name):
    for h, w in [(16, 16), (17, 40), (40, 17)]:
        img = scene(h, w)
        for s in (1, 5):
            out = apply(name, img, params(name, s))
            assert out.shape == (h, w, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("name", CANONICAL)
def test_apply_is_deterministic(name):
    img = scene()
    p = params(name, 4, seed=7)
    before = img.copy()
    np.testing.assert_array_equal(apply(name, img, p), apply(name, img, p))
    np.testing.assert_array_equal(img, before)  # the input is left alone


def test_same_draw_same_noise_gaussian_impulse_shot():
    p = params("gaussian_noise", 1, seed=3)
    a, b = apply("gaussian_noise", grey(100), p).astype(int), apply("gaussian_noise", grey(150), p).astype(int)
    assert np.abs((a - 100) - (b - 150)).max() <= 1  # same field; 1 from truncation
    p = params("impulse_noise", 5, seed=3)
    a, b = apply("impulse_noise", grey(100), p), apply("impulse_noise", grey(150), p)
    np.testing.assert_array_equal(a == 255, b == 255)
    np.testing.assert_array_equal(a == 0, b == 0)
    # shot noise inverts the Poisson CDF at shared uniforms, so a brighter image never gets fewer photons
    p = params("shot_noise", 3, seed=3)
    assert np.all(apply("shot_noise", grey(150), p) >= apply("shot_noise", grey(100), p))


def test_same_draw_same_layer_frost_fog_snow():
    # frost: out = 0.7 x + 0.7 F, so two grey images differ by 0.7 * 50 everywhere (+-1 truncation)
    p = params("frost", 3, seed=4)
    bright = apply("frost", grey(150), p).astype(int)
    diff = (bright - apply("frost", grey(100), p))[bright < 255]
    assert set(np.unique(diff)) <= {34, 35, 36} and diff.size > 1000
    # fog on a grey image a: out = (a + s P) a / (a + s); recover P from both
    p = params("fog", 2, seed=4)
    s = p["strength"]
    plasma = [(apply("fog", grey(a), p) / 255.0 * (a / 255 + s) / (a / 255) - a / 255) / s for a in (120, 200)]
    assert np.abs(plasma[0] - plasma[1]).max() < 0.03
    assert plasma[0].max() - plasma[0].min() > 0.1
    # snow on dark greys: the same flakes are added to two flat backgrounds
    p = params("snow", 2, seed=4)
    a, b = apply("snow", grey(40), p).astype(int), apply("snow", grey(60), p).astype(int)
    unclipped = (a < 255) & (b < 255)
    diff = (b - a)[unclipped]
    assert diff.max() - diff.min() <= 1 and (a != a[0, 0, 0]).any()


@pytest.mark.parametrize("name,tolerance", [("elastic_transform", 2), ("glass_blur", 3)])
def test_same_draw_same_geometry(name, tolerance):
    # both are linear in the image up to truncation (one or two uint8 roundings, each off by one at most
    # or exactly at an integer), so the complement of the input maps to the complement of the output
    # when the same displacements are used, and not with another draw
    img = scene()
    for s in (2, 5):
        p = params(name, s, seed=9)
        complement_of_output = 255 - apply(name, img, p).astype(int)
        assert np.abs(apply(name, 255 - img, p) - complement_of_output).max() <= tolerance
        other = params(name, s, seed=10)
        assert np.abs(apply(name, 255 - img, other) - complement_of_output).max() > 10
