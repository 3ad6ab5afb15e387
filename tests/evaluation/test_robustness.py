import numpy as np
import pytest
import torch

from evaluation.corruptions import get_corruption
from evaluation.robustness import RobustnessResult, corruption_rng, evaluate_robustness


def test_aggregates_by_hand():
    result = RobustnessResult(10.0, {"fog": {1: 20.0, 2: 40.0}, "contrast": {1: 30.0, 2: 50.0},
                                     "sparkles": {1: 60.0, 2: 80.0}},
                              {"fog": "imagenet_c", "contrast": "imagenet_c", "sparkles": "imagenet_c_bar"}, 10)
    assert result.per_corruption() == {"fog": 30.0, "contrast": 40.0, "sparkles": 70.0}
    assert result.per_severity("imagenet_c") == {1: 25.0, 2: 45.0}
    assert result.overall("imagenet_c") == 35.0 and result.overall("imagenet_c_bar") == 70.0
    assert result.overall() == pytest.approx(140 / 3)
    assert RobustnessResult.from_json(result.to_json()) == result
    table = result.table()
    assert "| fog | imagenet_c | 20.0 | 40.0 | 30.0 |" in table
    assert "| **ImageNet-C mean** | | 25.0 | 45.0 | **35.0** |" in table


def _images(n=8):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8), np.arange(n) % 2


def test_constant_classifier_error_is_the_label_share():
    images, labels = _images()
    always_zero = lambda x: torch.tensor([[1.0, 0.0]]).repeat(len(x), 1)  # noqa: E731
    result = evaluate_robustness(always_zero, images, labels, ["gaussian_noise", "sparkles"], (1, 5), batch_size=3,
                                 progress=False)
    assert result.clean_error == 50.0
    assert result.errors == {"gaussian_noise": {1: 50.0, 5: 50.0}, "sparkles": {1: 50.0, 5: 50.0}}
    assert result.families == {"gaussian_noise": "imagenet_c", "sparkles": "imagenet_c_bar"}


def test_each_image_gets_its_own_draw_from_a_stream_per_corruption_and_severity():
    images, labels = _images(4)
    seen = []

    def record(x):
        seen.append(x.copy())
        return torch.zeros(len(x), 2)

    evaluate_robustness(record, images, labels, ["gaussian_noise"], (2,), seed=7, batch_size=4, progress=False)
    corrupted = seen[1]  # seen[0] is the clean pass
    rng = corruption_rng(7, "gaussian_noise", 2)
    noise = get_corruption("gaussian_noise")
    expected = np.stack([noise.apply(im, noise.sample_parameters(2, rng)) for im in images])
    assert np.array_equal(corrupted, expected)
    # independent of which other corruptions ran before it
    seen.clear()
    evaluate_robustness(record, images, labels, ["contrast", "gaussian_noise"], (2,), seed=7, batch_size=4,
                        progress=False)
    assert np.array_equal(seen[2], expected)


def test_bad_input_is_explained():
    images, labels = _images(2)
    with pytest.raises(KeyError, match="Did you mean"):
        evaluate_robustness(lambda x: torch.zeros(len(x), 2), images, labels, ["gausian_noise"], progress=False)
    with pytest.raises(ValueError, match="no label"):
        evaluate_robustness(lambda x: torch.zeros(len(x), 2), images, -np.ones(2, int), ["fog"], progress=False)


def test_worker_processes_change_nothing_but_speed():
    images, labels = _images(10)
    runs = {}
    for workers in (0, 2):
        seen = []

        def record(x):
            seen.append(x.copy())
            return torch.from_numpy(x[:, 0, 0, :2].astype(np.float32))  # a classifier that depends on the pixels

        result = evaluate_robustness(record, images, labels, ["shot_noise", "plasma_noise"], (1, 4), seed=3,
                                     batch_size=3, workers=workers, progress=False)
        runs[workers] = (result, seen)
    assert runs[0][0] == runs[2][0]
    assert len(runs[0][1]) == len(runs[2][1]) == 4 * 4 + 4  # clean pass + 4 sweeps, 4 batches each
    assert all(np.array_equal(a, b) for a, b in zip(runs[0][1], runs[2][1]))
