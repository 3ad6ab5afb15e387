"""Label propagation (DINO's protocol) against hand-worked cases: a two-token vote computed by hand, a moving
object whose features make the answer known, and the square neighbourhood."""

import math

import pytest
import torch
import torch.nn.functional as F

from evaluation.label_propagation import (neighbourhood_mask, one_hot_at_grid, propagate_labels,
                                          propagate_segmentation, rescale_channels)


def test_one_vote_by_hand():
    # frame 0: token a = [1, 0] is class 0, token b = [0, 1] is class 1 (a 1 x 2 grid)
    first = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (C, h*w) columns are tokens
    second = torch.tensor([[1.0, 0.6], [0.0, 0.8]])  # target tokens [1, 0] and [0.6, 0.8]
    features = torch.stack([first, second]).view(2, 2, 1, 2)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(2, 1, 2)  # class 0 at a, class 1 at b
    soft = propagate_labels(features, labels, topk=2, radius=None, temperature=0.1)
    # target token 2: cos to a = 0.6, to b = 0.8 -> weights e^6, e^8
    class1 = math.exp(8) / (math.exp(6) + math.exp(8))
    assert soft[1, :, 0, 1].tolist() == pytest.approx([1 - class1, class1], rel=1e-6)
    # target token 1: cos 1 to a, 0 to b -> e^10, e^0
    class0 = math.exp(10) / (math.exp(10) + 1)
    assert soft[1, :, 0, 0].tolist() == pytest.approx([class0, 1 - class0], rel=1e-6)
    # top-1 keeps only the nearest context token
    hard = propagate_labels(features, labels, topk=1, radius=None)
    assert hard[1, :, 0, 1].tolist() == [0.0, 1.0] and hard[1, :, 0, 0].tolist() == [1.0, 0.0]
    assert torch.equal(soft[0], labels)  # frame 0 keeps its given labels


def moving_square(frames: int = 4, grid: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (T, 2, grid, grid): object patches [1, 0], background [0, 1]; a 2 x 2 object moves one patch right
    per frame. And the object's patch ids (T, grid, grid)."""
    ids = torch.zeros(frames, grid, grid, dtype=torch.long)
    for t in range(frames):
        ids[t, 2:4, t:t + 2] = 1
    features = torch.stack([(ids == 1).float(), (ids == 0).float()], dim=1)
    return features, ids


def test_moving_object_is_tracked():
    features, ids = moving_square()
    soft = propagate_labels(features, one_hot_at_grid(ids[0], 1, (6, 6)), topk=5, context=7, radius=2)
    assert torch.equal(soft.argmax(dim=1), ids)  # at the grid: exactly where the object went
    patch = 4
    first = ids[0].repeat_interleave(patch, 0).repeat_interleave(patch, 1)
    pred = propagate_segmentation(features, first, patch, topk=5, context=7, radius=2)
    # in pixels: the exact labels upsampled bilinearly (the protocol rounds the object's outer corners off)
    exact = torch.stack([(ids == 0).float(), (ids == 1).float()], dim=1)
    expected = F.interpolate(exact, scale_factor=patch, mode="bilinear", align_corners=False).argmax(dim=1)
    assert torch.equal(pred[1:], expected[1:])
    assert torch.equal(pred[0], first)
    assert (pred != ids.repeat_interleave(patch, 1).repeat_interleave(patch, 2)).sum() == 4 * 3  # 4 corners a frame


def test_neighbourhood_keeps_look_alike_objects_apart():
    # two objects with the same features, far apart, static: only the neighbourhood can tell them apart
    ids = torch.zeros(3, 1, 8, dtype=torch.long)
    ids[:, 0, 0:2], ids[:, 0, 6:8] = 1, 2
    features = torch.stack([(ids > 0).float(), (ids == 0).float()], dim=1)
    first = one_hot_at_grid(ids[0], 2, (1, 8))
    near = propagate_labels(features, first, topk=3, radius=1).argmax(dim=1)
    assert torch.equal(near, ids)
    far = propagate_labels(features, first, topk=4, radius=None)
    assert far[2, 1, 0, 0] == pytest.approx(0.5) and far[2, 2, 0, 0] == pytest.approx(0.5)  # both objects vote


def test_neighbourhood_mask_by_hand():
    mask = neighbourhood_mask(2, 3, radius=1)
    # tokens row-major: (0,0) (0,1) (0,2) (1,0) (1,1) (1,2); (0,0) and (0,2) are two columns apart
    assert mask[0].tolist() == [True, True, False, True, True, False]
    assert torch.equal(neighbourhood_mask(2, 2, radius=0), torch.eye(4, dtype=torch.bool))
    assert neighbourhood_mask(2, 2, radius=None).all()


def test_one_hot_and_rescale():
    ids = torch.tensor([[0, 0, 2, 2], [0, 0, 2, 2], [1, 1, 0, 0], [1, 1, 0, 0]])
    labels = one_hot_at_grid(ids, 2, (2, 2))
    assert labels.argmax(0).tolist() == [[0, 2], [1, 0]]
    soft = torch.tensor([[[0.2, 0.6]], [[0.0, 0.0]]])
    assert rescale_channels(soft).tolist() == [[[0.0, 1.0]], [[0.0, 0.0]]]
