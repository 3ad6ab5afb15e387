"""Noise fields and sampling helpers for the ImageNet-C-bar corruptions, vectorised over the image.

The reference (facebookresearch/augmentation-corruption ``imagenet_c_bar/corrupt.py`` and
``utils/perlin_noise.py``, ``utils/image.py``) evaluates these per pixel in Python loops on a square
``im_size`` grid. Here each is one numpy expression over an (H, W) grid with the same mathematics; the
only randomness is the ``np.random.Generator`` passed in, seeded from the corruption's parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# The reference writes 2*pi with this literal in its shader-style kernels.
_TWO_PI_LITERAL = 6.28318530718


def fourier_noise(rng: np.random.Generator, h: int, w: int,
                  spectrum: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Zero-mean, unit-std noise with amplitude ``spectrum(|k|^2)`` and random phases (blue / brownish noise).

    Follows ``gen_noise`` of BlueNoise/BrownishNoise and BlueNoiseSample.transform: amplitudes on a centred
    frequency grid, phases uniform in [0, 2pi) for the left half and mirrored (``[::-1, ::-1]``) into the
    right half, a rolled inverse FFT whose real part is kept, then division by the std. For a non-square
    image |k|^2 is measured in cycles per sqrt(H*W) pixels (kx^2 H/W + ky^2 W/H), which is the reference's
    (x - c)^2 + (y - c)^2 when H == W; an odd width with an even height has no middle zero in the centre
    column (the reference, square only, never meets that case).
    """
    ky = np.arange(h, dtype=np.float64)[:, None] - h / 2
    kx = np.arange(w, dtype=np.float64)[None, :] - w / 2
    amplitude = spectrum(kx**2 * (h / w) + ky**2 * (w / h))
    left = rng.uniform(0.0, 2 * np.pi, size=(h, w // 2))
    if w % 2 == 0:
        phases = np.concatenate((left, left[::-1, ::-1]), axis=1)
    else:
        centre = rng.uniform(0.0, 2 * np.pi, size=(h // 2, 1))
        centre = np.concatenate((centre, np.zeros((h % 2, 1)), centre[::-1]), axis=0)
        phases = np.concatenate((left, centre, left[::-1, ::-1]), axis=1)
    spectrum_field = np.roll(amplitude * np.exp(1j * phases), (h // 2, w // 2), axis=(0, 1))
    noise = np.real(np.fft.ifft2(spectrum_field))
    return noise / np.std(noise)


class PerlinNoise2D:
    """Ken Perlin's original 2-D gradient noise, as ``PerlinNoiseGenerator`` in the reference.

    (augmentation-corruption ``experiments/overlap/augmentations/utils/noise.py``, the copy imported by
    ``imagenet_c_bar/corrupt.py``): B = 256 lattice gradients drawn from integer pairs in [-256, 256) / 256
    and normalised; a permutation table built by swapping each of p[255..0] with a uniform entry of p[0..255];
    tables repeated so lookups never wrap; s-curve t^2 (3 - 2t); output scaled by 1.5.
    One departure: the reference divides by the norm even when both integers are 256 (a zero vector, about
    one table in a thousand), which makes NaNs; here that gradient stays zero.
    """

    B = 256
    N = 16 * 256

    def __init__(self, rng: np.random.Generator):
        raw = (rng.integers(0, 2 * self.B, size=(self.B, 2)) - self.B) / self.B
        norm = np.linalg.norm(raw, axis=1, keepdims=True)
        grad = np.divide(raw, norm, out=np.zeros_like(raw), where=norm > 0)
        perm = np.arange(self.B)
        for i, j in zip(range(self.B - 1, -1, -1), rng.integers(0, self.B, size=self.B)):
            perm[i], perm[j] = perm[j], perm[i]
        self.p = np.concatenate((perm, perm, perm[:2]))
        self.g = grad

    def noise(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        tx, ty = x + self.N, y + self.N
        bx0 = tx.astype(np.int64) % self.B
        by0 = ty.astype(np.int64) % self.B
        bx1, by1 = (bx0 + 1) % self.B, (by0 + 1) % self.B
        rx0, ry0 = tx % 1, ty % 1
        rx1, ry1 = rx0 - 1.0, ry0 - 1.0
        i, j = self.p[bx0], self.p[bx1]
        g00, g10 = self.g[self.p[i + by0]], self.g[self.p[j + by0]]
        g01, g11 = self.g[self.p[i + by1]], self.g[self.p[j + by1]]
        sx = rx0**2 * (3.0 - 2.0 * rx0)
        sy = ry0**2 * (3.0 - 2.0 * ry0)
        u = rx0 * g00[..., 0] + ry0 * g00[..., 1]
        v = rx1 * g10[..., 0] + ry0 * g10[..., 1]
        a = u + sx * (v - u)
        u = rx0 * g01[..., 0] + ry1 * g01[..., 1]
        v = rx1 * g11[..., 0] + ry1 * g11[..., 1]
        b = u + sx * (v - u)
        return 1.5 * (a + sy * (b - a))

    def turbulence(self, x: np.ndarray, y: np.ndarray, octaves: float) -> np.ndarray:
        """Sum of |noise(f x, f y)| / f for f = 1, 2, 4, ... while f <= octaves."""
        total = np.zeros(np.broadcast(x, y).shape)
        f = 1.0
        while f <= octaves:
            total += np.abs(self.noise(f * x, f * y)) / f
            f *= 2
        return total


def caustic_noise(h: int, w: int, time: float, size: float) -> np.ndarray:
    """The caustic pattern of CausticRefraction's ``caustic_noise_kernel``, one value per pixel, in [0, 1].

    A five-step iterated shader on the tiled coordinate ((y, x) / size mod 1) * 2pi - 250.
    """
    y = np.arange(h, dtype=np.float64)[:, None] / size
    x = np.arange(w, dtype=np.float64)[None, :] / size
    p0 = np.broadcast_to((y % 1) * _TWO_PI_LITERAL - 250, (h, w))
    p1 = np.broadcast_to((x % 1) * _TWO_PI_LITERAL - 250, (h, w))
    i0, i1 = p0.copy(), p1.copy()
    c = np.ones((h, w))
    inten = 0.005
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for n in range(5):
            t = time * (1.0 - (3.5 / (n + 1)))
            i0, i1 = (p0 + np.cos(t - i0) + np.sin(t + i1), p1 + np.sin(t - i1) + np.cos(t + i0))
            length = np.sqrt((p0 / (np.sin(i0 + t) / inten)) ** 2 + (p1 / (np.cos(i1 + t) / inten)) ** 2)
            c += 1.0 / length
    c = 1.17 - (c / 5.0) ** 1.4
    return np.clip(np.abs(c) ** 8.0, 0, 1)


def zero_padded_shift(field: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """out[y, x] = field[y + dy, x + dx], zero where that falls outside (the reference's ``luma_at_offset``)."""
    padded = np.pad(field, 1)
    h, w = field.shape
    return padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


def bilinear_sample(image: np.ndarray, py: np.ndarray, px: np.ndarray) -> np.ndarray:
    """Bilinear lookup of ``image`` (H, W, C) at float positions, zero outside (``utils/image.py``)."""
    h, w = image.shape[:2]
    y0 = np.floor(py).astype(np.int64)
    x0 = np.floor(px).astype(np.int64)
    wy = (py - y0)[..., None]
    wx = (px - x0)[..., None]

    def corner(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        values = image[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]
        return np.where(inside[..., None], values, 0.0)

    top = corner(y0, x0) * (1.0 - wx) + corner(y0, x0 + 1) * wx
    bottom = corner(y0 + 1, x0) * (1.0 - wx) + corner(y0 + 1, x0 + 1) * wx
    return top * (1.0 - wy) + bottom * wy

