"""The 15 ImageNet-C corruptions (Hendrycks & Dietterich, ICLR 2019), five severities each.

Per-severity constants are those of hendrycks/robustness ImageNet-C/create_c/make_imagenet_c.py (identical
in ImageNet-C/imagenet_c/imagenet_c/corruptions.py). They were tuned for 224 x 224 images and are applied
unchanged to any size: lengths stay in pixels, so a 64 x 64 image sees the same pixel-scale blur as a crop of
a 224 x 224 one. The reference draws its noise inside each function; here ``sample_parameters`` draws scalar
choices and a ``seed``, and ``apply`` grows every noise field from ``np.random.default_rng(seed)`` at the
image's size, so one draw gives the same noise on every image of that size.

Like the reference, each ``apply`` works on ``image / 255`` in floating point (frost and motion blur on 0-255),
clips, scales back to 0-255 and truncates to uint8 (the ``np.uint8(img)`` of the reference's saving loop).

Departures from the reference (see each class): no OpenCV, scikit-image or ImageMagick, only numpy, scipy
and PIL (the replacements are in ``_imagenet_c_ops``); ``frost`` blends a procedural frost texture instead
of the six frost photographs; crops and resizes are generalised to non-square images.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from . import _imagenet_c_ops as ops
from .base import Corruption, check_image, check_severity, new_seed, register, to_uint8


def _unit(image: np.ndarray) -> np.ndarray:
    return check_image(image).astype(np.float64) / 255.0


def _to_image(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats back to uint8 as the reference does: clip, scale by 255, truncate."""
    return to_uint8(np.clip(x, 0.0, 1.0) * 255.0)


def _row(table: tuple, severity: int) -> Any:
    return table[check_severity(severity) - 1]


class _ImageNetC(Corruption):
    family = "imagenet_c"


# ---------------------------------------------------------------- noise

@register
class GaussianNoise(_ImageNetC):
    """x + N(0, scale^2) per pixel and channel, on x in [0, 1]."""

    name = "gaussian_noise"
    SCALE = (0.08, 0.12, 0.18, 0.26, 0.38)  # make_imagenet_c.py gaussian_noise

    def sample_parameters(self, severity: int, rng: np.random.Generator) -> dict[str, Any]:
        return {"scale": _row(self.SCALE, severity), "seed": new_seed(rng)}

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        x = _unit(image)
        noise = np.random.default_rng(params["seed"]).normal(size=x.shape)
        return _to_image(x + params["scale"] * noise)


@register
class ShotNoise(_ImageNetC):
    """Poisson(x * rate) / rate per pixel and channel, on x in [0, 1].

    The Poisson counts are drawn by inverting the Poisson CDF at uniforms from the seed, so the same draw
    uses the same uniforms on every image (common random numbers); the counts have exactly the reference's
    Poisson(x * rate) distribution.
    """

    name = "shot_noise"
    RATE = (60, 25, 12, 5, 3)  # make_imagenet_c.py shot_noise

    def sample_parameters(self, severity: int, rng: np.random.Generator) -> dict[str, Any]:
        return {"rate": _row(self.RATE, severity), "seed": new_seed(rng)}

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        x = _unit(image)
        rate = float(params["rate"])
        uniform = np.random.default_rng(params["seed"]).random(size=x.shape)
        return _to_image(ops.poisson_quantile(uniform, x * rate) / rate)


@register
class ImpulseNoise(_ImageNetC):
    """Salt and pepper: each pixel and channel independently flips with probability ``amount``, to 1 or 0
    with equal odds (skimage.util.random_noise(mode='s&p', amount, salt_vs_pepper=0.5) as the reference
    calls it; skimage releases before 0.19 instead set ceil(amount * size / 2) random positions each)."""

    name = "impulse_noise"
    AMOUNT = (0.03, 0.06, 0.09, 0.17, 0.27)  # make_imagenet_c.py impulse_noise

    def sample_parameters(self, severity: int, rng: np.random.Generator) -> dict[str, Any]:
        return {"amount": _row(self.AMOUNT, severity), "seed": new_seed(rng)}

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        x = _unit(image)
        rng = np.random.default_rng(params["seed"])
        flipped = rng.random(size=x.shape) <= params["amount"]
        salted = rng.random(size=x.shape) <= 0.5
        x = np.where(flipped & salted, 1.0, x)
        return _to_image(np.where(flipped & ~salted, 0.0, x))


# ---------------------------------------------------------------- blur

@register
class DefocusBlur(_ImageNetC):
    """Correlation with an anti-aliased disk of ``radius`` pixels (reference: cv2.filter2D with ``disk``)."""

    name = "defocus_blur"
    RADIUS_ALIAS = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))  # make_imagenet_c.py defocus_blur

    def sample_parameters(self, severity: int, rng: np.random.Generator) -> dict[str, Any]:
        radius, alias_blur = _row(self.RADIUS_ALIAS, severity)
        return {"radius": radius, "alias_blur": alias_blur}

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        kernel = ops.disk_kernel(int(params["radius"]), float(params["alias_blur"]))
        return _to_image(ops.filter2d(_unit(image), kernel))


@register
class GlassBlur(_ImageNetC):
    """Gaussian blur, ``iterations`` passes of the reference's local pixel shuffle, Gaussian blur again.

    The shuffle keeps the reference's sequential semantics exactly, including that its numpy "swap" of two
    views is really a copy (see ``_imagenet_c_ops.glass_shuffle``); it is vectorised, not a Python loop.
    The blurred image is truncated to uint8 before the shuffle, as in the reference.
    """

    name = "glass_blur"
    # (sigma, max_delta, iterations), make_imagenet_c.py glass_blur
    SIGMA_DELTA_ITERS = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))

    def sample_parameters(self, severity: int, rng: np.random.Generator) -> dict[str, Any]:
        sigma, delta, iterations = _row(self.SIGMA_DELTA_ITERS, severity)
        return {"sigma": sigma, "max_delta": delta, "iterations": iterations, "seed": new_seed(rng)}

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        sigma, delta = float(params["sigma"]), int(params["max_delta"])
        x = _unit(image)
        h, w = x.shape[:2]
        blurred = (ops.sk_gaussian(x, sigma) * 255).astype(np.uint8)
        shape = (int(params["iterations"]), len(range(h - delta, delta, -1)), len(range(w - delta, delta, -1)), 2)
        offsets = np.random.default_rng(params["seed"]).integers(-delta, delta, size=shape)
        shuffled = ops.glass_shuffle(blurred, delta, offsets)
        return _to_image(ops.sk_gaussian(shuffled / 255.0, sigma))


@register
class MotionBlur(_ImageNetC):
    """ImageMagick's motion blur (a one-sided Gaussian-weighted line of taps) at a random angle in
    [-45, 45) degrees; rebuilt in numpy (``_imagenet_c_ops.motion_blur``), rounded as ImageMagick does."""

    name = "motion_blur"
    RADIUS_SIGMA = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))  # make_imagenet_c.py motion_blur

    def sample_parameters(self, severity: int, rng: np.random.Generator) -> dict[str, Any]:
        radius, sigma = _row(self.RADIUS_SIGMA, severity)
        return {"radius": radius, "sigma": sigma, "angle": float(rng.uniform(-45, 45))}

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        blurred = ops.motion_blur(check_image(image).astype(np.float64), params["radius"], params["sigma"],
                                  params["angle"])
        return to_uint8(np.round(blurred))


@register
class ZoomBlur(_ImageNetC):
    """Mean of the image and its central zooms by each factor (scipy zoom, order 1), as the reference."""

    name = "zoom_blur"
    # make_imagenet_c.py zoom_blur; float arange gives 12, 16, 11, 13, 11 factors (1.0 .. 1.11, 1.15, 1.2, 1.24, 1.3)
    ZOOMS = tuple(tuple(float(z) for z in np.arange(*args)) for args in (
        (1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03)))

    def sample_parameters(self, severity: int, rng: np.random.Generator) -> dict[str, Any]:
        return {"zooms": _row(self.ZOOMS, severity)}

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        x = _unit(image)
        total = x.copy()
        for factor in params["zooms"]:
            total += ops.clipped_zoom(x, float(factor))
        return _to_image(total / (len(params["zooms"]) + 1))


# ---------------------------------------------------------------- weather

@register
class Snow(_ImageNetC):
    """Thresholded, zoomed Gaussian noise as flakes, motion-blurred at an angle in [-135, -45) degrees and
    added twice (as is and rotated 180 degrees) to a brightened image, as the reference. The motion blur is
    the numpy rebuild of ImageMagick's (``_imagenet_c_ops.motion_blur``); the flake layer is rounded to
    uint8 after it, as the reference's PNG round trip does."""

    name = "snow"
    # (mean, std, zoom, threshold, blur radius, blur sigma, blend), make_imagenet_c.py snow
    TABLE = ((0.1, 0.3, 3, 0.5, 10, 4, 0.8),
             (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
             (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
             (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
             (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55))
    KEYS = ("mean", "std", "zoom", "threshold", "blur_radius", "blur_sigma", "blend")

    def sample_parameters(self, severity: int, rng: np.random.Generator) -> dict[str, Any]:
        params = dict(zip(self.KEYS, _row(self.TABLE, severity)))
        params["seed"] = new_seed(rng)
        params["angle"] = float(rng.uniform(-135, -45))
        return params

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        x = _unit(image)
        flakes = np.random.default_rng(params["seed"]).normal(params["mean"], params["std"], size=x.shape[:2])
        flakes = ops.clipped_zoom(flakes, float(params["zoom"]))
        flakes[flakes < params["threshold"]] = 0
        flakes = (np.clip(flakes, 0, 1) * 255).astype(np.uint8)
        streaks = ops.motion_blur(flakes[..., None].astype(np.float64), params["blur_radius"],
                                  params["blur_sigma"], params["angle"])
        streaks = np.clip(np.round(streaks), 0, 255) / 255.0
        # cv2.COLOR_RGB2GRAY weights
        grey = (x @ np.array([0.299, 0.587, 0.114]))[..., None]
        blend = params["blend"]
        x = blend * x + (1 - blend) * np.maximum(x, grey * 1.5 + 0.5)
        return _to_image(x + streaks + np.rot90(streaks, k=2))


@register
class Frost(_ImageNetC):
    """image_weight * image + frost_weight * frost, clipped (reference coefficients).

    Departure: the reference blends a random 224 x 224 crop of one of its frost photographs (frost1-6,
    which cannot be redistributed). Here the frost layer is a procedural texture grown from the seed at the
    image's size (``_imagenet_c_ops.frost_texture``: six-armed dendritic crystals, bright and bluish-white,
    over a dark background), so the look and the numbers differ from published ImageNet-C frost.
    """

    name = "frost"
    WEIGHTS = ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))  # make_imagenet_c.py frost

    def sample_parameters(self, severity: int, rng: np.random.Generator) -> dict[str, Any]:
        image_weight, frost_weight = _row(self.WEIGHTS, severity)
        return {"image_weight": image_weight, "frost_weight": frost_weight, "seed": new_seed(rng)}

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        x = check_image(image).astype(np.float64)
        texture = ops.frost_texture(x.shape[0], x.shape[1], np.random.default_rng(params["seed"]))
        return to_uint8(params["image_weight"] * x + params["frost_weight"] * texture)


@register
class Fog(_ImageNetC):
    """(x + strength * plasma) * max(x) / (max(x) + strength), with a diamond-square plasma map.

    The reference cuts a 224 x 224 corner from a 256 x 256 map (and its 64 px variant,
    make_imagenet_64_c.py, a 64 x 64 corner of the same 256 map); here the map is 256 or the next power of
    two that covers the image, and its top-left H x W corner is used, so the fog's scale stays in pixels.
    Its strength is the same (2.5) at severities 3 and 4, which differ only in the map's roughness.
    """

    name = "fog"
    STRENGTH_DECAY = ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))  # make_imagenet_c.py fog

    def sample_parameters(self, severity: int, rng: np.random.Generator) -> dict[str, Any]:
        strength, decay = _row(self.STRENGTH_DECAY, severity)
        return {"strength": strength, "decay": decay, "seed": new_seed(rng)}

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        x = _unit(image)
        h, w = x.shape[:2]
        size = max(256, 1 << (max(h, w) - 1).bit_length())
        plasma = ops.plasma_fractal(size, params["decay"], np.random.default_rng(params["seed"]))[:h, :w]
        strength, peak = params["strength"], x.max()
        return _to_image((x + strength * plasma[..., None]) * peak / (peak + strength))


# ---------------------------------------------------------------- digital

@register
class Brightness(_ImageNetC):
    """Add ``shift`` to the HSV value channel (clipped to 1) and convert back (reference: skimage
    rgb2hsv / hsv2rgb; here the same formulas in numpy)."""

    name = "brightness"
    SHIFT = (0.1, 0.2, 0.3, 0.4, 0.5)  # make_imagenet_c.py brightness

    def sample_parameters(self, severity: int, rng: np.random.Generator) -> dict[str, Any]:
        return {"shift": _row(self.SHIFT, severity)}

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        hsv = ops.rgb_to_hsv(_unit(image))
        hsv[..., 2] = np.clip(hsv[..., 2] + params["shift"], 0, 1)
        return _to_image(ops.hsv_to_rgb(hsv))


@register
class Contrast(_ImageNetC):
    """(x - mean) * factor + mean, with the mean of each channel over the image."""

    name = "contrast"
    FACTOR = (0.4, 0.3, 0.2, 0.1, 0.05)  # make_imagenet_c.py contrast

    def sample_parameters(self, severity: int, rng: np.random.Generator) -> dict[str, Any]:
        return {"factor": _row(self.FACTOR, severity)}

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        x = _unit(image)
        means = x.mean(axis=(0, 1), keepdims=True)
        return _to_image((x - means) * params["factor"] + means)


@register
class ElasticTransform(_ImageNetC):
    """A random affine warp (three points jittered by up to ``affine`` pixels) followed by a smooth random
    displacement field (uniform noise blurred with ``sigma``, scaled by ``alpha``), both bilinear.

    Reference: cv2.getAffineTransform + cv2.warpAffine (reflect-101 border) and skimage gaussian (reflect,
    truncate 3) + scipy map_coordinates (reflect); here scipy's affine_transform ('mirror' = reflect-101).
    The three anchor points sit around the image centre in (x, y) order; the reference builds them from
    (H // 2, W // 2) as (x, y), which only differs for non-square images.
    """

    name = "elastic_transform"
    # (alpha, sigma, affine), make_imagenet_c.py elastic_transform, with its "244 should have been 224"
    TABLE = ((244 * 2, 244 * 0.7, 244 * 0.1),
             (244 * 2, 244 * 0.08, 244 * 0.2),
             (244 * 0.05, 244 * 0.01, 244 * 0.02),
             (244 * 0.07, 244 * 0.01, 244 * 0.02),
             (244 * 0.12, 244 * 0.01, 244 * 0.02))

    def sample_parameters(self, severity: int, rng: np.random.Generator) -> dict[str, Any]:
        alpha, sigma, affine = _row(self.TABLE, severity)
        jitter = tuple(float(v) for v in rng.uniform(-affine, affine, size=6))
        return {"alpha": alpha, "sigma": sigma, "affine_jitter": jitter, "seed": new_seed(rng)}

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        x = _unit(image)
        h, w = x.shape[:2]
        cx, cy, half = w // 2, h // 2, min(h, w) // 3
        anchors = np.array([[cx + half, cy + half], [cx + half, cy - half], [cx - half, cy - half]], float)
        moved = anchors + np.asarray(params["affine_jitter"], dtype=float).reshape(3, 2)
        x = ops.warp_affine_reflect101(x, ops.affine_from_points(anchors, moved))
        rng = np.random.default_rng(params["seed"])
        fields = [ops.sk_gaussian(rng.uniform(-1, 1, size=(h, w)), params["sigma"], mode="reflect", truncate=3)
                  * params["alpha"] for _ in range(2)]
        dx, dy = fields  # drawn in the reference's order: dx first
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        coords = np.stack([rows + dy, cols + dx])
        out = np.stack([ndimage.map_coordinates(x[..., ch], coords, order=1, mode="reflect")
                        for ch in range(x.shape[2])], axis=-1)
        return _to_image(out)


@register
class Pixelate(_ImageNetC):
    """PIL BOX resize down to int(side * factor), then BOX back up (which for upsampling is nearest
    neighbour), as the reference."""

    name = "pixelate"
    FACTOR = (0.6, 0.5, 0.4, 0.3, 0.25)  # make_imagenet_c.py pixelate

    def sample_parameters(self, severity: int, rng: np.random.Generator) -> dict[str, Any]:
        return {"factor": _row(self.FACTOR, severity)}

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        pil = Image.fromarray(check_image(image))
        w, h = pil.size
        small = pil.resize((max(1, int(w * params["factor"])), max(1, int(h * params["factor"]))), Image.BOX)
        return np.asarray(small.resize((w, h), Image.BOX))


@register
class JpegCompression(_ImageNetC):
    """A round trip through PIL's JPEG encoder at ``quality`` (PIL's default chroma subsampling)."""

    name = "jpeg_compression"
    QUALITY = (25, 18, 15, 10, 7)  # make_imagenet_c.py jpeg_compression

    def sample_parameters(self, severity: int, rng: np.random.Generator) -> dict[str, Any]:
        return {"quality": _row(self.QUALITY, severity)}

    def apply(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(check_image(image)).save(buffer, format="JPEG", quality=int(params["quality"]))
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            return np.asarray(decoded.convert("RGB"))
