import numpy as np
import pytest
import torch

from evaluation.msd import (SeededAugmentation, augmentation_policy, distance_of_means, minimal_sample_distance,
                            transform_feature, transform_features)


def test_msd_and_distance_of_means_on_hand_features():
    aug = torch.tensor([[0.0, 0.0], [4.0, 0.0], [10.0, 10.0]])
    corr = torch.tensor([[3.0, 1.0], [5.0, -1.0]])  # mean (4, 0)
    assert minimal_sample_distance(aug, corr) == pytest.approx(0.0)  # one augmentation sits on the mean
    # means: aug (14/3, 10/3), corr (4, 0): distance sqrt((2/3)^2 + (10/3)^2)
    assert distance_of_means(aug, corr) == pytest.approx(np.hypot(2 / 3, 10 / 3))
    # asymmetric: the minimum is on the augmentation side, the corruption side is averaged
    assert minimal_sample_distance(corr, aug) == pytest.approx(min(np.hypot(3 - 14 / 3, 1 - 10 / 3),
                                                                    np.hypot(5 - 14 / 3, -1 - 10 / 3)))


class AddConstant:
    """A toy transform: adds the sampled constant to every pixel (clipped)."""

    def sample_parameters(self, rng):
        return {"c": int(rng.integers(0, 50))}

    def apply(self, image, params):
        return np.clip(image.astype(int) + params["c"], 0, 255).astype(np.uint8)


def test_transform_feature_is_the_mean_feature_over_the_image_set():
    images = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (10, 20, 30, 40, 50)])
    extract = lambda x: torch.from_numpy(x.reshape(len(x), -1)[:, :2].astype(np.float32))  # noqa: E731
    feature = transform_feature(extract, images, AddConstant(), {"c": 5}, batch_size=2)  # batches 2+2+1
    assert torch.allclose(feature, torch.tensor([35.0, 35.0], dtype=torch.float64))  # mean(10..50) + 5
    feats = transform_features(extract, images, AddConstant(), 3, np.random.default_rng(0))
    expected = [30 + c for c in np.random.default_rng(0).integers(0, 50, size=3)]
    assert feats[:, 0].tolist() == pytest.approx(expected)


def test_seeded_augmentation_applies_the_same_ops_to_every_image():
    policy = augmentation_policy("rand-m9-mstd0.5-inc1", 32)
    rng = np.random.default_rng(0)
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    params = policy.sample_parameters(rng)
    first = policy.apply(image, params)
    assert np.array_equal(first, policy.apply(image, params))  # deterministic given params
    assert first.shape == image.shape and first.dtype == np.uint8
    others = [policy.apply(image, policy.sample_parameters(rng)) for _ in range(6)]
    assert any(not np.array_equal(first, o) for o in others)  # different draws differ
    # the draw does not depend on the global generators' state
    np.random.seed(123)
    torch.manual_seed(5)
    assert np.array_equal(first, policy.apply(image, params))


def test_seeded_augmentation_restores_global_random_state():
    policy = SeededAugmentation(lambda im: im, "identity")
    np.random.seed(7)
    expected = np.random.rand()
    np.random.seed(7)
    policy.apply(np.zeros((8, 8, 3), np.uint8), {"seed": 99})
    assert np.random.rand() == expected


def test_crop_flip_policy_keeps_size_and_unknown_policy_is_explained():
    policy = augmentation_policy("crop_flip", 16)
    out = policy.apply(np.zeros((16, 16, 3), np.uint8), policy.sample_parameters(np.random.default_rng(0)))
    assert out.shape == (16, 16, 3)
    with pytest.raises(ValueError, match="RandAugment"):
        augmentation_policy("mixup", 16)
