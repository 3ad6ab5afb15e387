"""ImageNet-C-bar corruptions against the published severity magnitudes and hand-worked pixels of the reference
formulas.

Reference: facebookresearch/augmentation-corruption imagenet_c_bar/corrupt.py (per-pixel kernels) and
imagenet_c_bar/imagenet_c_bar.csv (magnitudes). Expected values below are worked out from those formulas
by hand or with scalar per-pixel arithmetic, never by calling the vectorised code under test.
"""

import json
import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from evaluation.corruptions import IMAGENET_C_BAR, get_corruption, names
from evaluation.corruptions._noise import PerlinNoise2D, caustic_noise, fourier_noise
from evaluation.corruptions.imagenet_c_bar import MAGNITUDES, float_parameter, int_parameter, magnitude

# The five magnitudes of each corruption, as listed in facebookresearch/augmentation-corruption
# imagenet_c_bar/imagenet_c_bar.csv
TABLE = {
    "caustic_refraction": (2.35, 3.2, 4.9, 6.6, 9.15),
    "inverse_sparkles": (1, 2, 4, 9, 10),
    "sparkles": (1, 2, 3, 5, 6),
    "perlin_noise": (4.6, 5.2, 5.8, 7.6, 8.8),
    "blue_noise_sample": (0.8, 1.6, 2.4, 4.0, 5.6),
    "plasma_noise": (4.75, 7, 8.5, 9.25, 10),
    "checkerboard_cutout": (2, 3, 4, 5, 6),
    "cocentric_sine_waves": (3, 5, 8, 9, 10),
    "single_frequency_greyscale": (1, 1.5, 2, 4.5, 5),
    "brownish_noise": (1, 2, 3, 4, 5),
}
ORDER = ("blue_noise_sample", "brownish_noise", "caustic_refraction", "checkerboard_cutout", "cocentric_sine_waves",
         "inverse_sparkles", "perlin_noise", "plasma_noise", "single_frequency_greyscale", "sparkles")

# The severity-dependent parameter of each corruption as the reference computes it from the magnitude m
# (float_parameter(m, max) = m * max / 10); lengths are fractions of the image side here.
SEVERITY_PARAM = {
    "caustic_refraction": [("lens_scale", lambda m: m * 0.05), ("lighting_amount", lambda m: m * 0.2)],
    "inverse_sparkles": [("amount", lambda m: 100 - m * 6.5)],
    "sparkles": [("radii", lambda m: [m * 0.01] * 5)],
    "perlin_noise": [("alpha", lambda m: m * 0.05)],
    "blue_noise_sample": [("threshold", lambda m: m * 0.3 - 2.5)],
    "plasma_noise": [("intensity", lambda m: m * 6.4)],
    "checkerboard_cutout": [("fraction", lambda m: m / 10)],
    "cocentric_sine_waves": [("intensity", lambda m: [m * 12.8] * 3)],
    "single_frequency_greyscale": [("intensity", lambda m: m * 19.6)],
    "brownish_noise": [("intensity", lambda m: m * 6.4)],
}


def const(value, h=16, w=16):
    return np.full((h, w, 3), value, dtype=np.uint8)


def test_registered_names_family_and_order():
    assert IMAGENET_C_BAR == ORDER
    assert names("imagenet_c_bar") == ORDER
    assert all(get_corruption(n).family == "imagenet_c_bar" for n in ORDER)


@pytest.mark.parametrize("name", ORDER)
def test_magnitude_table_and_severity_mapping(name):
    assert MAGNITUDES[name] == pytest.approx(TABLE[name])
    corruption = get_corruption(name)
    for severity, m in enumerate(TABLE[name], start=1):
        assert magnitude(name, severity) == pytest.approx(m)
        params = corruption.sample_parameters(severity, np.random.default_rng(0))
        for key, formula in SEVERITY_PARAM[name]:
            assert params[key] == pytest.approx(formula(m)), (name, severity, key)


def test_float_and_int_parameter_hand_values():
    assert float_parameter(5, 196) == pytest.approx(98.0)
    assert float_parameter(2.35, 112) == pytest.approx(26.32)
    assert float_parameter(0, 64) == 0.0
    assert int_parameter(3, 10) == 3
    assert int_parameter(7, 5) == 3  # 3.5 truncates
    assert int_parameter(9.15, 1) == 0
    assert int_parameter(10, 14) == 14


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="severity"):
        magnitude("sparkles", 6)
    with pytest.raises(KeyError, match="not an ImageNet-C-bar"):
        magnitude("gaussian_blur", 1)
    c = get_corruption("sparkles")
    with pytest.raises(ValueError, match="uint8"):
        c.apply(np.zeros((16, 16, 3), np.float32), c.sample_parameters(1, np.random.default_rng(0)))


@pytest.mark.parametrize("name", ORDER)
def test_parameters_are_plain_and_share_their_random_draws_across_severities(name):
    c = get_corruption(name)
    p1 = c.sample_parameters(1, np.random.default_rng(3))
    p5 = c.sample_parameters(5, np.random.default_rng(3))
    json.dumps(p1)  # plain numbers, lists and seeds only
    changed = {k for k in p1 if p1[k] != p5[k]}
    assert changed <= {k for k, _ in SEVERITY_PARAM[name]}


@pytest.mark.parametrize("name", ORDER)
@pytest.mark.parametrize("shape", [(16, 16), (16, 41), (37, 16)])
def test_any_size_keeps_shape_and_dtype_and_is_deterministic(name, shape):
    image = np.random.default_rng(1).integers(0, 256, size=shape + (3,), dtype=np.uint8)
    c = get_corruption(name)
    params = c.sample_parameters(5, np.random.default_rng(2))
    out = c.apply(image, params)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, c.apply(image.copy(), params))


def test_single_frequency_greyscale_hand_pixels():
    # clip(img + intensity * sin(x f0 + y f1 + phase)), intensity = 196 * 1 / 10 = 19.6 at severity 1
    params = {"freq": [math.pi / 3, math.pi], "phase": math.pi / 6, "intensity": 19.6}
    out = get_corruption("single_frequency_greyscale").apply(const(100), params)
    # sin at 30, 90, 150, 210, 270, 330 degrees = .5, 1, .5, -.5, -1, -.5; row 1 adds 180 degrees
    # 100 + 9.8 -> 109, 100 + 19.6 -> 119, 100 - 9.8 -> 90, 100 - 19.6 -> 80 (truncated)
    assert out[0, :6, 0].tolist() == [109, 119, 109, 90, 80, 90]
    assert out[1, :6, 0].tolist() == [90, 80, 90, 109, 119, 109]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    clipped = get_corruption("single_frequency_greyscale").apply(const(250), params)
    assert clipped[0, 1, 0] == 255  # 250 + 19.6 clips


def test_checkerboard_cutout_greys_exactly_the_chosen_squares():
    image = np.random.default_rng(0).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    c = get_corruption("checkerboard_cutout")
    # angle 0, squares of 0.25 * 16 = 4 px; fraction 1 chooses every cell of the grid
    params = {"angle": 0.0, "scale": 0.25, "fraction": 1.0, "seed": 5}
    out = c.apply(image, params)
    y, x = np.mgrid[0:16, 0:16]
    grey = ((y // 4 + x // 4) % 2 == 0)
    assert (out[grey] == 128).all()
    np.testing.assert_array_equal(out[~grey], image[~grey])
    np.testing.assert_array_equal(c.apply(image, {**params, "fraction": 0.0}), image)
    # a partial fraction greys whole squares, only among the same-parity ones
    half = c.apply(const(7, 32, 32), {**params, "scale": 0.125, "fraction": 0.5})[..., 0]
    blocks = half.reshape(8, 4, 8, 4).transpose(0, 2, 1, 3).reshape(8, 8, 16)
    assert ((blocks == 128).all(-1) | (blocks == 7).all(-1)).all()
    by, bx = np.mgrid[0:8, 0:8]
    assert not (blocks[(by + bx) % 2 == 1] == 128).any()


def test_cocentric_sine_waves_hand_pixels():
    # centre x0 = .5 * 16 = 8, y0 = .25 * 16 = 4; wobble amplitude .1 * 16 = 1.6 px; rings 4 px wide
    params = {"offset": [0.5, 0.25], "freq": 2.0, "amplitude": 0.1, "ring_width": 0.25, "intensity": [38.4] * 3}
    out = get_corruption("cocentric_sine_waves").apply(const(100), params)[..., 0]
    # (y, x) = (4, 11): distance 3, angle atan2(3, 0) * 2 = pi -> (3 % 4) / 4 - .5 = .25 -> +9.6 -> 109
    assert out[4, 11] == 109
    assert out[7, 8] == 109  # distance 3 straight down, angle 0
    assert out[4, 8] == 80  # the centre: -.5 * 38.4 = -19.2
    # (6, 10): distance 2 sqrt 2, angle pi/4 * 2 -> sin = 1 -> 4.4284 % 4 / 4 - .5 = -.39289 -> -15.087 -> 84
    assert out[6, 10] == 84


def _plasma_pixel(x, y, t, iters, sharp, scale):
    # the reference kernel with its 4-vector i, written out per pixel
    x, y = x / scale, y / scale
    i = [1.0, 1.0, 1.0, 0.0]
    for _ in range(iters):
        r0 = math.cos(y * i[0] - i[3] + t / i[1]) / i[2]
        r1 = math.sin(x * i[0] - i[3] + t / i[1]) / i[2]
        r0, r1 = r0 - r1 * 0.3, r1 + r0 * 0.3
        x, y = x + r0, y + r1
        i = [i[0] * 1.93, i[1] * 1.15, i[2] * (2.25 - sharp), i[3] * t * i[1]]
    return math.sin(x - t), math.sin((x + y + math.sin(t)) * 0.5), math.sin(y + t)


def test_plasma_noise_matches_the_per_pixel_kernel():
    params = {"time": 4.2, "iterations": 5, "sharpness": 0.7, "scale": 0.15, "intensity": 54.4}
    out = get_corruption("plasma_noise").apply(const(90), params)
    for y, x in [(0, 0), (3, 11), (15, 15), (9, 2)]:
        noise = _plasma_pixel(float(x), float(y), 4.2, 5, 0.7, 0.15 * 16)
        expected = [int(min(max((1 - 54.4 / 255) * 90 + 54.4 * n, 0), 255)) for n in noise]
        assert out[y, x].tolist() == expected, (y, x)


def _caustic_pixel(y, x, time, size):
    p = [(y / size % 1) * 6.28318530718 - 250, (x / size % 1) * 6.28318530718 - 250]
    i, c = list(p), 1.0
    for n in range(5):
        t = time * (1.0 - 3.5 / (n + 1))
        i = [p[0] + math.cos(t - i[0]) + math.sin(t + i[1]), p[1] + math.sin(t - i[1]) + math.cos(t + i[0])]
        c += 1.0 / math.hypot(p[0] / (math.sin(i[0] + t) / 0.005), p[1] / (math.cos(i[1] + t) / 0.005))
    return min(abs(1.17 - (c / 5.0) ** 1.4) ** 8.0, 1.0)


def test_caustic_noise_matches_the_per_pixel_kernel():
    field = caustic_noise(16, 20, 1.3, 17.0)
    for y, x in [(0, 0), (5, 7), (15, 19), (11, 3)]:
        assert field[y, x] == pytest.approx(_caustic_pixel(y, x, 1.3, 17.0), rel=1e-9, abs=1e-12)


def test_caustic_refraction_matches_the_rotation_matrix_construction():
    h = w = 16
    image = np.random.default_rng(4).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    params = {"time": 1.1, "size": 1.0, "lens_scale": 0.33, "lighting_amount": 1.32}
    out = get_corruption("caustic_refraction").apply(image, params)
    height = gaussian_filter(np.array([[_caustic_pixel(y, x, 1.1, 16.0) for x in range(w)] for y in range(h)]), 1)
    at = lambda y, x: height[y, x] if 0 <= y < h and 0 <= x < w else 0.0  # noqa: E731
    img = image.astype(np.float64) / 255
    for y, x in [(5, 5), (8, 11), (0, 7), (15, 15)]:
        north, south, west, east = at(y, x - 1), at(y, x + 1), at(y - 1, x), at(y + 1, x)
        normal = np.array([east - west, south - north, 1.0])
        normal /= np.linalg.norm(normal)
        ray = np.array([0.0, 0.0, 1.0])
        if abs(normal[2]) < 1 - 1e-3:  # Snell's law in the frame (normal, in-plane, spectator)
            theta_out = math.asin(math.sin(math.acos(normal[2])) / 4.0)
            spectator = np.cross(ray, normal)
            spectator /= np.linalg.norm(spectator)
            frame = np.stack((normal, np.cross(normal, spectator), spectator))
            ray = np.linalg.inv(frame) @ np.array([math.cos(theta_out), math.sin(theta_out), 0.0])
        py, px = np.round(ray * 0.33 * 16, 3)[:2] + (y, x)
        y0, x0 = math.floor(py), math.floor(px)
        pixel = np.zeros(3)
        for yy, xx, wgt in [(y0, x0, (1 - py + y0) * (1 - px + x0)), (y0, x0 + 1, (1 - py + y0) * (px - x0)),
                            (y0 + 1, x0, (py - y0) * (1 - px + x0)), (y0 + 1, x0 + 1, (py - y0) * (px - x0))]:
            if 0 <= yy < h and 0 <= xx < w:
                pixel += wgt * img[yy, xx]
        pixel += (north - south) * 1.32 + (east - west) * 1.32
        expected = (np.clip(pixel, 0, 1) * 255).astype(np.uint8)
        assert np.abs(out[y, x].astype(int) - expected).max() <= 1, (y, x)  # float32 vs float64 truncation


def test_sparkles_single_starburst_hand_pixels():
    # one sparkle at (8, 8), 4 rays all of length .25 * 16 = 4 px (randomness 0), amount 50 -> exponent 1:
    # f = (1 - (sector position - 1/2)^2) * 16 / (d^2 + 1e-4), clipped to 1; black -> 255 f
    params = {"centers": [[0.5, 0.5]], "radii": [0.25], "amounts": [50], "color": [255, 255, 255],
              "randomness": 0, "seed": 0, "nrays": [4]}
    out = get_corruption("sparkles").apply(const(0), params)[..., 0]
    assert out[8, 8] == 255
    assert out[8, 12] == 191  # on a ray: .75 * 16 / 16.0001 * 255 = 191.25
    assert out[12, 12] == 127  # mid-sector: 1 * 16 / 32.0001 * 255 = 127.5
    assert out[0, 0] == 31  # mid-sector: 16 / 128.0001 * 255 = 31.87
    white = const(255)
    np.testing.assert_array_equal(get_corruption("sparkles").apply(white, params), white)


def test_inverse_sparkles_hand_pixels():
    params = {"center": [0.5, 0.5], "radius": 0.25, "amount": 50, "color": [255, 255, 255],
              "randomness": 0, "seed": 0, "rays": 4}
    c = get_corruption("inverse_sparkles")
    out = c.apply(const(0), params)[..., 0]  # white + f * (black - white) = 255 (1 - f)
    assert out[8, 8] == 0
    assert out[8, 12] == 63  # 255 * (1 - .74999)
    assert out[12, 12] == 127  # 255 * .5000016
    assert out[0, 0] == 223  # 255 * (1 - .125)
    # severity 5: amount 100 - 65 = 35, exponent 1.3: 255 * (1 - .125 ** 1.3)
    strong = c.apply(const(0), {**params, "amount": 35})[..., 0]
    assert strong[0, 0] == int(255 * (1 - 0.125**1.3))
    np.testing.assert_array_equal(c.apply(const(255), params), const(255))


def test_perlin_noise_is_one_half_on_the_lattice():
    # Perlin noise vanishes at lattice points, so turbulence = 0 and the field is bias = .5 there; the
    # lattice period is 32 px at 224 px, and octaves 2..16 keep integer points integer.
    alpha = 0.44
    out = get_corruption("perlin_noise").apply(const(200, 224, 224), {"alpha": alpha, "seed": 9})[..., 0]
    expected = int((1 - alpha) * 200 + 255 * alpha * 0.5)
    for y, x in [(0, 0), (32, 64), (192, 96), (224 - 32, 224 - 32)]:
        assert out[y, x] == expected
    assert not (out == expected).all()


def test_perlin_gradient_noise_against_its_tables():
    gen = PerlinNoise2D(np.random.default_rng(2))
    assert sorted(gen.p[:256].tolist()) == list(range(256))
    assert np.allclose(np.linalg.norm(gen.g, axis=1), 1.0)

    def scalar(x, y):
        bx, by = int(x) % 256, int(y) % 256
        fx, fy = x % 1, y % 1
        s = lambda t: t * t * (3 - 2 * t)  # noqa: E731
        dot = lambda b, dx, dy: gen.g[b][0] * dx + gen.g[b][1] * dy  # noqa: E731
        b00, b10 = gen.p[gen.p[bx] + by], gen.p[gen.p[(bx + 1) % 256] + by]
        b01, b11 = gen.p[gen.p[bx] + (by + 1) % 256], gen.p[gen.p[(bx + 1) % 256] + (by + 1) % 256]
        a = dot(b00, fx, fy) + s(fx) * (dot(b10, fx - 1, fy) - dot(b00, fx, fy))
        b = dot(b01, fx, fy - 1) + s(fx) * (dot(b11, fx - 1, fy - 1) - dot(b01, fx, fy - 1))
        return 1.5 * (a + s(fy) * (b - a))

    for x, y in [(0.5, 0.5), (3.25, 7.75), (200.9, 12.1)]:
        assert gen.noise(np.array(x), np.array(y)) == pytest.approx(scalar(x + 4096, y + 4096))
    turb = gen.turbulence(np.array(0.3), np.array(0.6), 16.0)
    assert turb == pytest.approx(sum(abs(scalar(f * 0.3 + 4096, f * 0.6 + 4096)) / f for f in (1, 2, 4, 8, 16)))


def _phi(t):
    return 0.5 * (1 + math.erf(t / math.sqrt(2)))


def _low_high_power(field):
    h, w = field.shape
    power = np.abs(np.fft.fftshift(np.fft.fft2(field - field.mean()))) ** 2
    ky, kx = np.mgrid[0:h, 0:w]
    r = np.hypot(ky - h // 2, kx - w // 2)
    return power[(r > 0) & (r <= h / 8)].mean(), power[(r >= 3 * h / 8) & (r <= h / 2)].mean()


@pytest.mark.parametrize("n", [8, 9])
def test_fourier_noise_follows_the_reference_construction(n):
    # gen_noise of BlueNoise / BlueNoiseSample for a square image, written with explicit loops: amplitude
    # |(x, y) - n/2|, phases of the left half drawn first, then (odd n) the centre column's upper half;
    # the right half is the left one reversed in both axes; the spectrum is rolled by n // 2 on each axis.
    draws = np.random.default_rng(5)
    left = draws.uniform(0, 2 * np.pi, size=(n, n // 2))
    centre = draws.uniform(0, 2 * np.pi, size=n // 2) if n % 2 else None
    spectrum = np.zeros((n, n), complex)
    for y in range(n):
        for x in range(n):
            if x < n // 2:
                phase = left[y, x]
            elif n % 2 and x == n // 2:
                phase = centre[y] if y < n // 2 else (0.0 if y == n // 2 else centre[n - 1 - y])
            else:
                phase = left[n - 1 - y, n - 1 - x]
            spectrum[(y + n // 2) % n, (x + n // 2) % n] = math.hypot(x - n / 2, y - n / 2) * complex(
                math.cos(phase), math.sin(phase))
    expected = np.real(np.fft.ifft2(spectrum))
    expected /= expected.std()
    np.testing.assert_allclose(fourier_noise(np.random.default_rng(5), n, n, np.sqrt), expected, atol=1e-12)


def test_blue_noise_sample_blacks_out_a_gaussian_tail_with_a_blue_spectrum():
    c = get_corruption("blue_noise_sample")
    for severity in (3, 5):
        fractions = []
        for seed in range(3):
            params = c.sample_parameters(severity, np.random.default_rng(seed))
            out = c.apply(const(200, 64, 64), params)
            assert set(np.unique(out).tolist()) <= {0, 200}
            dropped = (out[..., 0] == 0)
            assert (out[dropped] == 0).all()
            fractions.append(dropped.mean())
            if severity == 5:
                low, high = _low_high_power(dropped.astype(float))
                assert high > 1.3 * low  # blue: more power at high frequencies
        # noise ~ N(0, 1) per pixel, dropped where below threshold = .3 m - 2.5
        threshold = 0.3 * TABLE["blue_noise_sample"][severity - 1] - 2.5
        assert np.mean(fractions) == pytest.approx(_phi(threshold), abs=0.015)


def test_brownish_noise_has_a_falling_spectrum_and_unit_std_scaled_by_intensity():
    c = get_corruption("brownish_noise")
    params = c.sample_parameters(1, np.random.default_rng(0))  # intensity 6.4, so no clipping around 128
    out = c.apply(const(128, 64, 64), params).astype(float) - 128
    for k in range(3):
        low, high = _low_high_power(out[..., k])
        assert low > 100 * high
        assert np.std(out[..., k]) == pytest.approx(6.4, rel=0.1)  # truncation adds ~1/sqrt(12) levels
    assert not np.array_equal(out[..., 0], out[..., 1])  # one field per channel


@pytest.mark.parametrize("name", ORDER)
def test_same_parameters_give_the_same_pattern_on_two_images(name):
    c = get_corruption(name)
    params = c.sample_parameters(1, np.random.default_rng(7))
    lo, hi = 100, 110
    a = c.apply(const(lo, 32, 48), params).astype(int)
    b = c.apply(const(hi, 32, 48), params).astype(int)
    if name in ("brownish_noise", "single_frequency_greyscale", "cocentric_sine_waves"):  # additive
        np.testing.assert_array_equal(a - lo, b - hi)
    elif name in ("perlin_noise", "plasma_noise"):  # (1 - alpha) image + pattern: a constant shift
        assert (b - a).max() - (b - a).min() <= 1
    elif name in ("blue_noise_sample", "checkerboard_cutout"):  # a mask
        np.testing.assert_array_equal(a == lo, b == hi)
        assert (a != lo).any()
    elif name in ("sparkles", "inverse_sparkles"):  # blend weight towards white
        fa, fb = (a - lo) / (255 - lo), (b - hi) / (255 - hi)
        assert np.abs(fa - fb).max() <= 2 / (255 - hi)
    else:  # caustic refraction of a constant is the constant, plus the same light (away from the border)
        inner = (slice(8, -8), slice(8, -8))
        assert np.abs((a - lo) - (b - hi))[inner].max() <= 1
