"""The 10 ImageNet-C-bar corruptions (Mintun, Kirillov, Xie, NeurIPS 2021).

Mathematics from facebookresearch/augmentation-corruption ``imagenet_c_bar/corrupt.py`` (one class per
corruption, already split into ``sample_parameters`` and ``transform``), severities from
``imagenet_c_bar/imagenet_c_bar.csv``. The reference severity is a magnitude on a 0..10 scale; severity
s in 1..5 here is the s-th magnitude of the table (``MAGNITUDES``) fed to the reference formulas.

Image size. The reference runs on square ``im_size`` (224) images and draws some parameters in pixels.
Since ``sample_parameters`` does not see the image, those are drawn here as fractions and turned into
pixels in ``apply``: positions as a fraction of their own axis, lengths (radii, scales, frequencies'
units) as a fraction of ``side = sqrt(H * W)``, which is ``im_size`` for a square image and keeps the
corrupted area fraction independent of the aspect ratio.

Randomness. Everything random is drawn in ``sample_parameters`` from the caller's generator, and the
draws do not depend on the severity, so the same generator state gives the same pattern at every
severity, only stronger. Fields sized by the image (noise, checkerboard grid, ray lengths) come from
``np.random.default_rng(params["seed"])`` inside ``apply``; they are not the reference's bytes (it used
the legacy global ``np.random`` state), only its distributions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from ._noise import PerlinNoise2D, bilinear_sample, caustic_noise, fourier_noise, zero_padded_shift
from .base import Corruption, check_image, check_severity, new_seed, register, to_uint8

# imagenet_c_bar/imagenet_c_bar.csv: the five reference magnitudes (0..10 scale) of each corruption.
MAGNITUDES: dict[str, tuple[float, float, float, float, float]] = {
    "caustic_refraction": (2.35, 3.2, 4.9, 6.6, 9.15),
    "inverse_sparkles": (1.0, 2.0, 4.0, 9.0, 10.0),
    "sparkles": (1.0, 2.0, 3.0, 5.0, 6.0),
    "perlin_noise": (4.6, 5.2, 5.8, 7.6, 8.8),
    "blue_noise_sample": (0.8, 1.6, 2.4, 4.0, 5.6),
    "plasma_noise": (4.75, 7.0, 8.5, 9.25, 10.0),
    "checkerboard_cutout": (2.0, 3.0, 4.0, 5.0, 6.0),
    "cocentric_sine_waves": (3.0, 5.0, 8.0, 9.0, 10.0),
    "single_frequency_greyscale": (1.0, 1.5, 2.0, 4.5, 5.0),
    "brownish_noise": (1.0, 2.0, 3.0, 4.0, 5.0),
}

# Rec. 709 luma weights, used by the reference's ``luma_at_offset``.
_LUMA = (0.2126, 0.7152, 0.0722)


def float_parameter(level: float, maxval: float) -> float:
    """The reference's magnitude scaling: ``level * maxval / 10`` (corrupt.py)."""
    return float(level) * maxval / 10.0


def int_parameter(level: float, maxval: float) -> int:
    """The reference's integer magnitude scaling: ``int(level * maxval / 10)``, truncated (corrupt.py)."""
    return int(level * maxval / 10)


def magnitude(name: str, severity: int) -> float:
    """The reference magnitude (0..10 scale) that ImageNet-C-bar uses for ``name`` at ``severity`` 1..5."""
    if name not in MAGNITUDES:
        raise KeyError(f"{name!r} is not an ImageNet-C-bar corruption; known: {', '.join(MAGNITUDES)}")
    return MAGNITUDES[name][check_severity(severity) - 1]


def _side(h: int, w: int) -> float:
    """The length the reference calls ``im_size``, for a possibly non-square image."""
    return math.sqrt(h * w)


def _grids(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates (y, x) as broadcastable float arrays."""
    return np.arange(h, dtype=np.float64)[:, None], np.arange(w, dtype=np.float64)[None, :]


class _CBar(Corruption):
    family = "imagenet_c_bar"

    def _magnitude(self, severity: int) -> float:
        return magnitude(self.name, severity)


@register
class BlueNoiseSample(_CBar):
    """Keep pixels where a unit-std blue noise field (amplitude ~ |k|) exceeds a threshold; black elsewhere."""

    name = "blue_noise_sample"

    def sample_parameters(self, severity: int, rng: np.random.Generator) -> dict[str, Any]:
        return {"seed": new_seed(rng), "threshold": float_parameter(self._magnitude(severity), 3.0) - 2.5}

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        h, w = check_image(image).shape[:2]
        noise = fourier_noise(np.random.default_rng(params["seed"]), h, w, np.sqrt)
        return to_uint8(image * (noise > params["threshold"])[..., None])


@register
class BrownishNoise(_CBar):
    """Add unit-std noise with amplitude 1 / (|k|^2 + 1), an independent field per channel."""

    name = "brownish_noise"

    def sample_parameters(self, severity: int, rng: np.random.Generator) -> dict[str, Any]:
        return {"seed": new_seed(rng), "intensity": float_parameter(self._magnitude(severity), 64)}

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        h, w = check_image(image).shape[:2]
        rng = np.random.default_rng(params["seed"])
        noise = np.stack([fourier_noise(rng, h, w, lambda k2: 1.0 / (k2 + 1.0)) for _ in range(3)], axis=2)
        return to_uint8(image + params["intensity"] * noise)


@register
class CausticRefraction(_CBar):
    """Refract the image through a lens whose height is a blurred caustic pattern, and light it by its slope.

    CausticRefraction in the reference: the normal of the height field (central differences with zero
    outside the image) refracts the viewing ray (0, 0, 1) with eta = 4; the ray's (y, x) part, scaled by
    ``lens_scale`` and rounded to 3 decimals, offsets a bilinear lookup (zero outside); the two differences
    times ``lighting_amount`` are added as light.
    """

    name = "caustic_refraction"
    eta = 4.0
    softening = 1.0

    def sample_parameters(self, severity: int, rng: np.random.Generator) -> dict[str, Any]:
        mag = self._magnitude(severity)
        return {
            "time": float(rng.uniform(0.5, 2.0)),
            "size": float(rng.uniform(0.75, 1.25)),  # fraction of the side
            "lens_scale": float_parameter(mag, 0.5),  # fraction of the side
            "lighting_amount": float_parameter(mag, 2.0),
        }

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        h, w = check_image(image).shape[:2]
        side = _side(h, w)
        # gaussian_filter's default reflect border, as the reference's gaussian_filter(noise, sigma=softening)
        height = gaussian_filter(caustic_noise(h, w, params["time"], params["size"] * side), self.softening)
        luma = height * _LUMA[0] + height * _LUMA[1] + height * _LUMA[2]
        north, south = zero_padded_shift(luma, 0, -1), zero_padded_shift(luma, 0, 1)
        west, east = zero_padded_shift(luma, -1, 0), zero_padded_shift(luma, 1, 0)

        # Unit normal of the lens; its first component is along rows (the reference's 'east - west').
        n0, n1 = east - west, south - north
        norm = np.sqrt(n0**2 + n1**2 + 1.0)
        n0, n1, nz = n0 / norm, n1 / norm, 1.0 / norm
        rho = np.sqrt(n0**2 + n1**2)
        # Snell: angle of incidence theta = acos(nz), out angle asin(sin(theta) / eta); the refracted ray is
        # cos(out) * normal + sin(out) * o with o = normal x (z x normal) / rho, the in-plane direction
        # orthogonal to the normal (the reference's rotation-matrix construction, solved in closed form).
        out_angle = np.arcsin(np.sin(np.arccos(np.clip(nz, -1.0, 1.0))) / self.eta)
        along = np.cos(out_angle) - np.sin(out_angle) * nz / np.where(rho > 0, rho, 1.0)
        straight = np.abs(nz) >= 1.0 - 1e-3  # the reference returns the incident ray unchanged there
        lens_scale = params["lens_scale"] * side
        dy = np.where(straight, 0.0, np.round(n0 * along * lens_scale, 3))
        dx = np.where(straight, 0.0, np.round(n1 * along * lens_scale, 3))

        y, x = _grids(h, w)
        out = bilinear_sample(image.astype(np.float32) / 255, y + dy, x + dx)
        light = ((north - south) * params["lighting_amount"] + (east - west) * params["lighting_amount"])
        return to_uint8(np.clip(out + light[..., None], 0, 1) * 255)


@register
class CheckerBoardCutOut(_CBar):
    """Grey out (128) a random subset of the 'black' squares of a rotated checkerboard."""

    name = "checkerboard_cutout"

    def sample_parameters(self, severity: int, rng: np.random.Generator) -> dict[str, Any]:
        return {
            "angle": float(rng.uniform(0.0, 2 * np.pi)),
            "scale": float(rng.uniform(0.1, 0.25)),  # square side as a fraction of the image side
            "fraction": float_parameter(self._magnitude(severity), 1.0),
            "seed": new_seed(rng),
        }

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        h, w = check_image(image).shape[:2]
        scale = max(params["scale"] * _side(h, w), 1.0)
        # The reference's grid has int(4 * im_size // scale) cells a side, enough for rotated coordinates of
        # either sign (negative cell indices wrap around, as numpy indexing does there); max(H, W) keeps that
        # true for a non-square image.
        cells = int(4 * max(h, w) // scale)
        grid = np.random.default_rng(params["seed"]).uniform(size=(cells, cells)) < params["fraction"]
        y, x = _grids(h, w)
        a = params["angle"]
        u = (np.cos(a) * y + np.sin(a) * x) / scale
        v = (-np.sin(a) * y + np.cos(a) * x) / scale
        # Parity from floor (Python's % on floats), cell index from truncation (int()), as in the reference.
        same_parity = np.floor(u % 2) == np.floor(v % 2)
        chosen = grid[np.trunc(u).astype(np.int64), np.trunc(v).astype(np.int64)]
        return np.where((same_parity & chosen)[..., None], np.uint8(128), image).astype(np.uint8)


@register
class CocentricSineWaves(_CBar):
    """Add concentric rings (a sawtooth of the distance to a centre, wobbled by a sine of the angle)."""

    name = "cocentric_sine_waves"

    def sample_parameters(self, severity: int, rng: np.random.Generator) -> dict[str, Any]:
        offset = rng.uniform(0.0, 1.0, size=2)  # (x0 / W, y0 / H)
        return {
            "offset": [float(offset[0]), float(offset[1])],
            "freq": float(rng.uniform(0.0, 10.0)),
            "amplitude": float(rng.uniform(0.0, 0.1)),  # fraction of the side
            "ring_width": float(rng.uniform(0.0, 0.1)),  # fraction of the side
            "intensity": [float_parameter(self._magnitude(severity), 128)] * 3,
        }

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        h, w = check_image(image).shape[:2]
        side = _side(h, w)
        y, x = _grids(h, w)
        x0, y0 = params["offset"][0] * w, params["offset"][1] * h
        amplitude = params["amplitude"] * side
        ring_width = max(params["ring_width"] * side, 1e-12)  # uniform(0, .) can return exactly 0
        angle = np.arctan2(x - x0, y - y0) * params["freq"]
        ring = ((np.sqrt((x - x0) ** 2 + (y - y0) ** 2) + np.sin(angle) * amplitude) % ring_width) / ring_width
        noise = (ring - 0.5)[..., None] * np.asarray(params["intensity"], dtype=np.float64)
        return to_uint8(image + noise)


def _ray_blend(h: int, w: int, centre: tuple[float, float], ray_lengths: np.ndarray,
               exponent: float) -> np.ndarray:
    """Blend weight in [0, 1] of one sparkle (the ``kernel`` of Sparkles / InverseSparkles).

    Rays split the angle around the centre into ``len(ray_lengths)`` sectors; the length is interpolated
    between neighbouring rays, falls off as (length^2 / dist^2) ** exponent and is shaped by 1 - (f - 1/2)^2
    where f is the position inside the sector.
    """
    rays = len(ray_lengths)
    y, x = _grids(h, w)
    dy, dx = y - centre[0], x - centre[1]
    d = (np.arctan2(dx, dy) + np.pi) / (2 * np.pi) * rays
    i = d.astype(np.int64)
    f = d - i
    lo, hi = ray_lengths[i % rays], ray_lengths[(i + 1) % rays]
    length = lo + f * (hi - lo)
    g = (length**2 / (dy**2 + dx**2 + 1e-4)) ** exponent
    return np.clip((1 - (f - 0.5) ** 2) * g, 0, 1)


@register
class InverseSparkles(_CBar):
    """One starburst that keeps the image near its centre and fades the rest to white."""

    name = "inverse_sparkles"

    def sample_parameters(self, severity: int, rng: np.random.Generator) -> dict[str, Any]:
        centre = rng.uniform(0.25, 0.75, size=2)  # (y / H, x / W)
        return {
            "center": [float(centre[0]), float(centre[1])],
            "radius": 0.25,  # fraction of the side
            "amount": 100 - float_parameter(self._magnitude(severity), 65),
            "color": [255, 255, 255],
            "randomness": 25,
            "seed": new_seed(rng),
            "rays": int(rng.integers(50, 200)),
        }

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        h, w = check_image(image).shape[:2]
        radius = params["radius"] * _side(h, w)
        normal = np.random.default_rng(params["seed"]).standard_normal(params["rays"])
        ray_lengths = radius + params["randomness"] / 100.0 * radius * normal
        centre = (params["center"][0] * h, params["center"][1] * w)
        f = _ray_blend(h, w, centre, ray_lengths, (100 - params["amount"]) / 50.0)[..., None]
        color = np.asarray(params["color"], dtype=np.float64)
        return to_uint8(color + f * (image.astype(np.float32) - color))


@register
class PerlinNoise(_CBar):
    """Blend towards grey-level Perlin turbulence (16 octaves' worth: f = 1..16), 32 px features at 224 px."""

    name = "perlin_noise"
    turbulence = 16.0
    gain = 0.5
    bias = 0.5

    def sample_parameters(self, severity: int, rng: np.random.Generator) -> dict[str, Any]:
        return {"alpha": float_parameter(self._magnitude(severity), 0.50), "seed": new_seed(rng)}

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        h, w = check_image(image).shape[:2]
        # The reference's m = I / (32 * im_size / 224): the lattice period is 1/7 of the side.
        inv_period = 1.0 / (32 * _side(h, w) / 224)
        y, x = _grids(h, w)
        gen = PerlinNoise2D(np.random.default_rng(params["seed"]))
        field = gen.turbulence(y * inv_period, x * inv_period, self.turbulence)
        field = np.clip(self.gain * field + self.bias, 0, 1.0)
        alpha = params["alpha"]
        return to_uint8((1 - alpha) * image.astype(np.float32) + 255 * alpha * field[..., None])


@register
class PlasmaNoise(_CBar):
    """Blend with a coloured 'plasma' shader (iterated sine warps of the pixel grid)."""

    name = "plasma_noise"

    def sample_parameters(self, severity: int, rng: np.random.Generator) -> dict[str, Any]:
        return {
            "time": float(rng.uniform(0.0, 6 * np.pi)),
            "iterations": int(rng.integers(4, 7)),
            "sharpness": float(rng.uniform(0.5, 1.0)),
            "scale": float(rng.uniform(0.075, 0.2)),  # fraction of the side
            "intensity": float_parameter(self._magnitude(severity), 64),
        }

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        h, w = check_image(image).shape[:2]
        scale = params["scale"] * _side(h, w)
        t, sharp = params["time"], params["sharpness"]
        y, x = _grids(h, w)
        x, y = np.broadcast_to(x / scale, (h, w)).copy(), np.broadcast_to(y / scale, (h, w)).copy()
        # The reference's i = (1, 1, 1, 0) is multiplied by (1.93, 1.15, 2.25 - sharpness, t * i[1]) each
        # step; its last entry starts at 0 and so stays 0.
        i0, i1, i2 = 1.0, 1.0, 1.0
        for _ in range(params["iterations"]):
            r0 = np.cos(y * i0 + t / i1) / i2
            r1 = np.sin(x * i0 + t / i1) / i2
            r0, r1 = r0 - 0.3 * r1, r1 + 0.3 * r0
            x, y = x + r0, y + r1
            i0, i1, i2 = i0 * 1.93, i1 * 1.15, i2 * (2.25 - sharp)
        noise = np.stack((np.sin(x - t), np.sin((x + y + np.sin(t)) * 0.5), np.sin(y + t)), axis=2)
        intensity = params["intensity"]
        return to_uint8((1 - intensity / 255) * image + intensity * noise)


@register
class SingleFrequencyGreyscale(_CBar):
    """Add one grey sinusoidal grating: intensity * sin(x f0 + y f1 + phase)."""

    name = "single_frequency_greyscale"

    def sample_parameters(self, severity: int, rng: np.random.Generator) -> dict[str, Any]:
        freq_mag = float(rng.uniform(-np.pi, np.pi))
        freq_2 = float(rng.uniform(-abs(freq_mag), abs(freq_mag)))
        freq = [freq_mag, freq_2] if rng.permutation(2)[0] == 0 else [freq_2, freq_mag]
        return {
            "freq": freq,
            "phase": float(rng.uniform(0.0, 2 * np.pi)),
            "intensity": float_parameter(self._magnitude(severity), 196),
        }

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        h, w = check_image(image).shape[:2]
        y, x = _grids(h, w)
        f0, f1 = params["freq"]
        noise = np.sin(x * f0 + y * f1 + params["phase"])
        return to_uint8(image + params["intensity"] * noise[..., None])


@register
class Sparkles(_CBar):
    """Five white starbursts of radius proportional to the severity."""

    name = "sparkles"

    def sample_parameters(self, severity: int, rng: np.random.Generator) -> dict[str, Any]:
        centres = rng.uniform(0.0, 1.0, size=(5, 2))  # (y / H, x / W)
        return {
            "centers": [[float(a), float(b)] for a, b in centres],
            "radii": [float_parameter(self._magnitude(severity), 0.1)] * 5,  # fractions of the side
            "amounts": [50] * 5,
            "color": [255, 255, 255],
            "randomness": 25,
            "seed": new_seed(rng),
            "nrays": [int(n) for n in rng.integers(50, 200, size=5)],
        }

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        h, w = check_image(image).shape[:2]
        side = _side(h, w)
        rng = np.random.default_rng(params["seed"])
        color = np.asarray(params["color"], dtype=np.float64)
        out = image.astype(np.float64)
        for centre, rays, amount, radius in zip(params["centers"], params["nrays"], params["amounts"],
                                                params["radii"]):
            radius = radius * side
            ray_lengths = np.maximum(1.0, radius + params["randomness"] / 100.0 * radius * rng.standard_normal(rays))
            f = _ray_blend(h, w, (centre[0] * h, centre[1] * w), ray_lengths, (100 - amount) / 50.0)
            out = out + f[..., None] * (color - out)
        return to_uint8(out)
