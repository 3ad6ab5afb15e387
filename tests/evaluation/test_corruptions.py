"""Properties every corruption keeps (the per-family files test the formulas and constants)."""

import numpy as np
import pytest

from datamodules.synthetic import render_image, sample_scene
from evaluation.corruptions import IMAGENET_C, IMAGENET_C_BAR, SEVERITIES, corrupt, get_corruption

# hendrycks/robustness ImageNet-C/create_c/make_imagenet_c.py (the 15) and augmentation-corruption
# imagenet_c_bar/imagenet_c_bar.csv (the 10), with the references' spellings.
EXPECTED_C = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
              "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
              "jpeg_compression")
EXPECTED_C_BAR = ("blue_noise_sample", "brownish_noise", "caustic_refraction", "checkerboard_cutout",
                  "cocentric_sine_waves", "inverse_sparkles", "perlin_noise", "plasma_noise",
                  "single_frequency_greyscale", "sparkles")
ALL = IMAGENET_C + IMAGENET_C_BAR
DRAWS = 3
# Steps where the reference tables themselves make the mean absolute change drop, measured on this 64 px image
# (the tables are for 224 px; the same happens there for snow and elastic_transform):
# - glass_blur 3 -> 4: (sigma 1, delta 2, 3 passes) moves pixels more than (1.1, 3, 2 passes) at 64 px (9.9 vs 9.5);
# - snow 2 -> 3: both blend at 0.7 with flake layers of about the same mean (76.1 vs 74.2);
# - elastic_transform 1 -> 2 -> 3: severities 1-2 add a large random affine warp (jitter 0.7 and 0.08 of the side)
#   that moves every pixel, 3-5 only small local wiggles (31.0, 29.0, 9.9, 10.3, 11.2).
# The published ImageNet-C errors drop at the same steps: AlexNet's snow error goes .884 -> .865 from severity 2
# to 3 and its elastic error .701 -> .557 (hendrycks/robustness#10).
REFERENCE_DROPS = {"glass_blur": {(3, 4)}, "snow": {(2, 3)}, "elastic_transform": {(1, 2), (2, 3)}}


@pytest.fixture(scope="module")
def image():
    return render_image(sample_scene(0, 3), 64)  # textured objects on a gradient: a natural-looking test image


def test_the_25_corruptions_are_registered_in_order():
    assert IMAGENET_C == EXPECTED_C
    assert IMAGENET_C_BAR == EXPECTED_C_BAR


@pytest.mark.parametrize("name", ALL)
def test_deterministic_given_parameters_and_keeps_size_and_range(name, image):
    corruption = get_corruption(name)
    params = corruption.sample_parameters(3, np.random.default_rng(0))
    first = corruption.apply(image, params)
    assert first.shape == image.shape and first.dtype == np.uint8  # uint8 holds the [0, 255] range
    assert np.array_equal(first, corruption.apply(image.copy(), params))
    assert np.array_equal(image, render_image(sample_scene(0, 3), 64))  # the input is not modified
    wide = np.concatenate([image, image[:, :24]], axis=1)  # 64 x 88: non-square
    assert corruption.apply(wide, corruption.sample_parameters(5, np.random.default_rng(1))).shape == wide.shape


@pytest.mark.parametrize("name", ALL)
def test_stronger_with_severity(name, image):
    """Mean absolute change from the clean image, averaged over a few draws, grows with the severity (except
    where the reference's own table makes it drop, REFERENCE_DROPS)."""
    change = []
    for severity in SEVERITIES:
        rng = np.random.default_rng(0)  # the same draws at every severity: only the severity changes
        diffs = [np.abs(corrupt(image, name, severity, rng).astype(float) - image).mean() for _ in range(DRAWS)]
        change.append(np.mean(diffs))
    allowed = REFERENCE_DROPS.get(name, set())
    rising = [(s, s + 1) for s in SEVERITIES[:-1] if change[s] > change[s - 1]]
    expected = [(s, s + 1) for s in SEVERITIES[:-1] if (s, s + 1) not in allowed]
    assert set(expected) <= set(rising), f"{name}: mean |change| by severity {np.round(change, 2)}"


def test_bad_input_is_explained(image):
    with pytest.raises(KeyError, match="gaussian_noise"):
        get_corruption("gausian_noise")
    with pytest.raises(ValueError, match="severity"):
        corrupt(image, "fog", 6, np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        corrupt(image.astype(np.float32), "fog", 1, np.random.default_rng(0))
