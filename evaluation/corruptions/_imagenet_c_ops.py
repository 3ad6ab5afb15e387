"""Image operations behind the ImageNet-C corruptions, written with numpy, scipy.ndimage and PIL only.

The reference (hendrycks/robustness ImageNet-C/create_c/make_imagenet_c.py) reaches for scikit-image,
OpenCV and ImageMagick (Wand); each function here says which call it stands in for. Images are float arrays
of shape (H, W, C) unless a function says otherwise; every function works for any H, W >= 16.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


def sk_gaussian(image: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """skimage.filters.gaussian(image, sigma, multichannel=True): scipy's filter over the two spatial axes
    only, with skimage's defaults (mode 'nearest', truncate 4)."""
    sigmas = (sigma, sigma) + (0.0,) * (image.ndim - 2)
    return ndimage.gaussian_filter(image, sigmas, mode=mode, truncate=truncate)


def _cv2_gaussian_taps(ksize: int, sigma: float) -> np.ndarray:
    """cv2.getGaussianKernel(ksize, sigma): normalised samples of exp(-x^2 / 2 sigma^2) at x = -(k-1)/2 .. (k-1)/2."""
    x = np.arange(ksize) - (ksize - 1) / 2
    taps = np.exp(-(x**2) / (2.0 * sigma**2))
    return taps / taps.sum()


def disk_kernel(radius: int, alias_blur: float) -> np.ndarray:
    """The defocus kernel of make_imagenet_c.py ``disk``: a normalised aliased disk on a grid of half-width
    max(8, radius), softened by cv2.GaussianBlur (3x3 up to radius 8, 5x5 beyond; OpenCV's default border,
    reflect-101, is scipy's 'mirror')."""
    half = 8 if radius <= 8 else radius
    ksize = 3 if radius <= 8 else 5
    grid = np.arange(-half, half + 1)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float32)
    disk /= disk.sum()
    taps = _cv2_gaussian_taps(ksize, alias_blur).astype(np.float32)
    disk = ndimage.correlate1d(disk, taps, axis=0, mode="mirror")
    return ndimage.correlate1d(disk, taps, axis=1, mode="mirror")


def filter2d(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """cv2.filter2D(channel, -1, kernel) on every channel: correlation, anchor at the centre, reflect-101 border."""
    out = np.empty_like(image)
    for ch in range(image.shape[2]):
        out[..., ch] = ndimage.correlate(image[..., ch], kernel, mode="mirror")
    return out


def glass_shuffle(image: np.ndarray, delta: int, offsets: np.ndarray) -> np.ndarray:
    """The "local pixel shuffle" loop of glass_blur, vectorised but with the same sequential result.

    The reference visits h = H-delta .. delta+1 and, inside, w = W-delta .. delta+1 (both descending), draws
    (dx, dy) in [-delta, delta) and runs ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on numpy views. Because
    the right-hand side holds views, that line is not a swap: it copies x[h', w'] into x[h, w] and leaves
    x[h', w'] as it was. So each visited pixel takes the value its source has at that moment: the value
    written there earlier in this pass if the source was visited before, its value from the start of the
    pass otherwise. Following those links (pointer doubling) gives every pixel's origin in O(log) passes.

    offsets: int array (passes, n_rows, n_cols, 2) holding (dx, dy) per visited pixel in visiting order.
    """
    h, w, c = image.shape
    rows = np.arange(h - delta, delta, -1)
    cols = np.arange(w - delta, delta, -1)
    n = h * w
    visit_time = np.full(n, -1, dtype=np.int64)
    target = (rows[:, None] * w + cols[None, :]).ravel()
    visit_time[target] = np.arange(target.size)
    origin = np.arange(n)
    for dx_dy in offsets:
        source = ((rows[:, None] + dx_dy[..., 1]) * w + (cols[None, :] + dx_dy[..., 0])).ravel()
        # Nodes 0..n-1: "the value written at p"; nodes n..2n-1: "the value q had when the pass began".
        link = np.concatenate([np.arange(n) + n, np.arange(n) + n])
        t_src = visit_time[source]
        written_before = (t_src >= 0) & (t_src < visit_time[target])
        link[target] = np.where(written_before, source, source + n)
        while True:
            jumped = link[link]
            if np.array_equal(jumped, link):
                break
            link = jumped
        origin = origin[link[:n] - n]
    return image.reshape(n, c)[origin].reshape(h, w, c)


def clipped_zoom(image: np.ndarray, factor: float) -> np.ndarray:
    """make_imagenet_c.py ``clipped_zoom`` for any H, W: take the central ceil(side / factor) crop, zoom it
    by ``factor`` (scipy, order 1), and cut the central H x W back out."""
    h, w = image.shape[:2]
    ch, cw = int(math.ceil(h / factor)), int(math.ceil(w / factor))
    top, left = (h - ch) // 2, (w - cw) // 2
    zooms = (factor, factor) + (1,) * (image.ndim - 2)
    zoomed = ndimage.zoom(image[top:top + ch, left:left + cw], zooms, order=1)
    trim_top, trim_left = (zoomed.shape[0] - h) // 2, (zoomed.shape[1] - w) // 2
    return zoomed[trim_top:trim_top + h, trim_left:trim_left + w]


def plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square height map on a periodic size x size grid (size a power of two), scaled to [0, 1].

    make_imagenet_c.py ``plasma_fractal``: corner (0, 0) starts at 0, every new point is the mean of its
    four neighbours plus wibble * U(-wibble, wibble), and wibble starts at 100 and is divided by ``decay``
    after each halving of the step.
    """
    if size & (size - 1):
        raise ValueError(f"plasma_fractal needs a power-of-two size, got {size}")
    m = np.zeros((size, size))
    step, wibble = size, 100.0

    def jitter(shape: tuple[int, ...]) -> np.ndarray:
        return wibble * rng.uniform(-wibble, wibble, shape)

    while step >= 2:
        half = step // 2
        corners = m[0::step, 0::step]
        # square step: centres of the step x step cells
        ring = corners + np.roll(corners, -1, axis=0)
        ring = ring + np.roll(ring, -1, axis=1)
        m[half::step, half::step] = ring / 4 + jitter(ring.shape)
        centres = m[half::step, half::step]
        # diamond step: mid-points of the cell edges, from the two corners and the two centres beside them
        horizontal = (centres + np.roll(centres, 1, axis=0)) + (corners + np.roll(corners, -1, axis=1))
        m[0::step, half::step] = horizontal / 4 + jitter(horizontal.shape)
        vertical = (centres + np.roll(centres, 1, axis=1)) + (corners + np.roll(corners, -1, axis=0))
        m[half::step, 0::step] = vertical / 4 + jitter(vertical.shape)
        step = half
        wibble /= decay
    m -= m.min()
    return m / m.max()


def motion_blur(image: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick MotionBlurImage(radius, sigma, angle) (MagickCore/effect.c), which the reference calls
    through Wand: a one-sided line kernel of width 2*ceil(radius)+1 with weights exp(-i^2 / 2 sigma^2),
    i = 0..width-1 (normalised), whose i-th tap sits at (round(i cos a), round(i sin a)) pixels (x right,
    y down), rounding halves down as ceil(v - 0.5) does; pixels beyond the border repeat the edge
    (ImageMagick's default virtual-pixel method). An approximation only in floating-point detail: ImageMagick
    works in its quantum depth and the reference round-trips through PNG."""
    h, w = image.shape[:2]
    width = int(2 * math.ceil(radius) + 1)
    taps = np.arange(width)
    weights = np.exp(-(taps.astype(np.float64) ** 2) / (2.0 * max(sigma, 1e-12) ** 2))
    weights /= weights.sum()
    px, py = width * math.sin(math.radians(angle)), width * math.cos(math.radians(angle))
    norm = math.hypot(px, py)
    off_x = np.ceil(taps * py / norm - 0.5).astype(int)
    off_y = np.ceil(taps * px / norm - 0.5).astype(int)
    rows, cols = np.arange(h), np.arange(w)
    out = np.zeros(image.shape, dtype=np.float64)
    for k, dx, dy in zip(weights, off_x, off_y):
        out += k * image[np.clip(rows + dy, 0, h - 1)][:, np.clip(cols + dx, 0, w - 1)]
    return out


def poisson_quantile(uniform: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """The smallest k with PoissonCDF(k; lam) >= uniform, elementwise: Poisson(lam) counts from uniforms
    (inverse-CDF sampling, summing the pmf term by term). Stops at lam + 20 sqrt(lam) + 20, beyond which
    the tail is below 1e-80, so that a uniform rounded above the float sum of the pmf cannot loop forever."""
    lam = np.asarray(lam, dtype=np.float64)
    term = np.exp(-lam)
    cdf = term.copy()
    count = np.zeros(lam.shape)
    active = uniform > cdf
    top = float(lam.max(initial=0.0))
    for k in range(1, int(top + 20 * math.sqrt(top) + 20) + 1):
        if not active.any():
            break
        term = term * lam / k
        cdf += term
        count += active
        active &= uniform > cdf
    return count


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """HSV of RGB in [0, 1] with skimage.color.rgb2hsv's conventions: V = max, S = (max - min) / max
    (0 for black), H in [0, 1) from the sector of the largest channel (0 for greys)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    spread = v - rgb.min(axis=-1)
    safe_spread = np.where(spread == 0, 1.0, spread)
    s = np.where(v == 0, 0.0, spread / np.where(v == 0, 1.0, v))
    # ties for the maximum resolve as in skimage (blue, then green, then red wins)
    hue = np.where(r == v, (g - b) / safe_spread, 0.0)
    hue = np.where(g == v, 2.0 + (b - r) / safe_spread, hue)
    hue = np.where(b == v, 4.0 + (r - g) / safe_spread, hue)
    hue = np.where(spread == 0, 0.0, (hue / 6.0) % 1.0)
    return np.stack([hue, s, v], axis=-1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of rgb_to_hsv (skimage.color.hsv2rgb): the standard six-sector formula."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    sector = np.floor(h * 6.0)
    f = h * 6.0 - sector
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    sector = sector.astype(int) % 6
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(hsv.shape)
    for k, (r_, g_, b_) in enumerate(table):
        mask = sector == k
        out[mask] = np.stack([r_[mask], g_[mask], b_[mask]], axis=-1)
    return out


def affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """cv2.getAffineTransform: the 2x3 matrix M (x, y convention) with M @ [src_i, 1] = dst_i for 3 points."""
    a = np.concatenate([src, np.ones((3, 1))], axis=1)
    return np.linalg.solve(a, dst).T


def warp_affine_reflect101(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """cv2.warpAffine(image, M, (W, H), INTER_LINEAR, BORDER_REFLECT_101): out(x, y) = image(M^-1 (x, y)),
    bilinear, reflect-101 border (scipy 'mirror'). OpenCV rounds its bilinear weights to 1/32; scipy does not."""
    inv = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))[:2]
    # scipy indexes (row, col) = (y, x): swap both the axes and the rows of the x, y matrix.
    rc_matrix = np.array([[inv[1, 1], inv[1, 0]], [inv[0, 1], inv[0, 0]]])
    rc_offset = np.array([inv[1, 2], inv[0, 2]])
    out = np.empty_like(image)
    for ch in range(image.shape[2]):
        out[..., ch] = ndimage.affine_transform(image[..., ch], rc_matrix, rc_offset, order=1, mode="mirror")
    return out


def frost_texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A procedural stand-in for the reference's frost photographs: (h, w, 3) float RGB in [0, 255].

    Structure: six-armed dendritic crystals (one per 30 x 30 cell at a random place in it, random
    orientation, arms of 6-28 px with side branches at +-60 degrees) drawn as thin lines with a soft glow,
    plus faint large-scale haze and sparkles. Sizes are in pixels, as the reference crops 224 x 224 windows
    from full-resolution photos. Brightness: the structure's ranks are mapped onto one fixed histogram, a
    dark blue-black background (65% of pixels, 5-31 of 255 in grey), a 10% glow ramp and 25% bright
    bluish-white ice (140-255), so every draw has the same brightness distribution and only the layout
    varies. That histogram is a guess at frost-on-a-dark-window photographs, not measured from frost1-6.
    """
    # one crystal per 30 x 30 cell at a random place in it (jittered grid): even coverage, so the share of
    # frosted pixels varies little from seed to seed
    cell = 30.0
    gy, gx = np.meshgrid(np.arange(-0.5, h / cell + 0.5), np.arange(-0.5, w / cell + 0.5), indexing="ij")
    ys = ((gy.ravel() + rng.random(gy.size)) * cell)
    xs = ((gx.ravel() + rng.random(gx.size)) * cell)
    n_seeds = ys.size
    n_arms, n_side = 6, 6
    angle = (rng.uniform(0, 2 * np.pi, (n_seeds, 1)) + np.arange(n_arms) * (2 * np.pi / n_arms)
             + rng.normal(0, 0.25, (n_seeds, n_arms))).ravel()
    length = rng.uniform(6, 28, n_seeds * n_arms)
    bright = np.repeat(rng.uniform(0.5, 1.0, n_seeds), n_arms)
    x0, y0 = np.repeat(xs, n_arms), np.repeat(ys, n_arms)
    # side branches start at evenly spaced points of each arm and shrink toward its tip
    along = length[:, None] * ((np.arange(n_side) + 1) / (n_side + 1))[None, :]
    side_sign = np.where(np.arange(n_side) % 2 == 0, 1.0, -1.0)[None, :]
    seg_x = np.concatenate([x0, (x0[:, None] + along * np.cos(angle)[:, None]).ravel()])
    seg_y = np.concatenate([y0, (y0[:, None] + along * np.sin(angle)[:, None]).ravel()])
    seg_angle = np.concatenate([angle, (angle[:, None] + side_sign * np.pi / 3
                                        + rng.normal(0, 0.15, along.shape)).ravel()])
    seg_len = np.concatenate([length, ((length[:, None] - along) * rng.uniform(0.25, 0.6, along.shape)).ravel()])
    seg_bright = np.concatenate([bright, np.repeat(0.8 * bright, n_side)])
    # rasterise every segment by sampling it twice per pixel of the longest one
    t = np.linspace(0.0, 1.0, int(2 * seg_len.max()) + 2)[None, :]
    px = np.round(seg_x[:, None] + t * (seg_len * np.cos(seg_angle))[:, None]).astype(np.int64)
    py = np.round(seg_y[:, None] + t * (seg_len * np.sin(seg_angle))[:, None]).astype(np.int64)
    value = seg_bright[:, None] * (1.0 - 0.5 * t)
    inside = (px >= 0) & (px < w) & (py >= 0) & (py < h)
    lines = np.zeros(h * w)
    np.maximum.at(lines, (py * w + px)[inside], np.broadcast_to(value, px.shape)[inside])
    lines = ndimage.gaussian_filter(lines.reshape(h, w), 0.6, mode="wrap") * 2.2
    glow = ndimage.gaussian_filter(lines, 3.0, mode="wrap")
    haze = ndimage.gaussian_filter(rng.normal(size=(h, w)), 12, mode="wrap")
    haze /= haze.std() + 1e-12
    sparkle = ndimage.gaussian_filter(rng.normal(size=(h, w)), 0.8, mode="wrap")
    sparkle = 0.25 * np.clip(sparkle / (sparkle.std() + 1e-12) - 2.0, 0.0, None)
    ice = np.clip(0.05 + 0.04 * haze + lines + 0.8 * glow + sparkle, 0.0, 1.0)
    # pin the histogram: the pixel of rank r gets the level of quantile r / (n - 1) of the target
    order = np.argsort(ice.ravel(), kind="stable")
    quantile = np.empty(ice.size)
    quantile[order] = np.arange(ice.size) / (ice.size - 1)
    level = np.interp(quantile, (0.0, 0.65, 0.75, 1.0), (0.02, 0.12, 0.55, 1.0)).reshape(h, w)
    return np.clip(level[..., None] * np.array([0.78, 0.9, 1.0]) * 255 + np.array([3.0, 5.0, 10.0]), 0, 255)
