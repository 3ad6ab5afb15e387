"""The linear segmentation probe: mIoU by hand, majority patch labels, and a separable toy it must solve."""

import pytest
import torch

from evaluation.segmentation_probe import (fit_segmentation_probe, mean_iou, patch_majority_labels,
                                           predict_segmentation)


def test_mean_iou_by_hand():
    target = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 1]])
    # class 0: inter 1, union 2 -> 0.5; class 1: inter 2, union 3 -> 2/3
    assert mean_iou(pred, target, 2) == pytest.approx(100 * (0.5 + 2 / 3) / 2)
    assert mean_iou(target, target, 3) == 100.0  # class 2 is absent from both: not averaged


def test_patch_majority_labels():
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :2, :2] = torch.tensor([[1, 1], [1, 0]])  # 3 of 4 pixels
    labels[0, 2:, 2:] = torch.tensor([[1, 0], [0, 0]])  # 1 of 4
    assert patch_majority_labels(labels, (2, 2), 2).tolist() == [[[1, 0], [0, 0]]]


def test_probe_separates_a_separable_toy():
    torch.manual_seed(0)
    patch, grid = 4, 6
    ids = (torch.rand(20, grid, grid) > 0.6).long()  # the class of each patch
    features = torch.randn(20, 8, grid, grid)
    features[:, 3] = 3.0 * (2 * ids - 1) + 0.1 * torch.randn(20, grid, grid)  # channel 3 carries the class
    pixels = ids.repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    probe = fit_segmentation_probe(features[:10], pixels[:10], num_classes=2)
    pred = predict_segmentation(probe, features[10:], (grid * patch, grid * patch))
    assert pred.shape == pixels[10:].shape
    # bilinear upsampling may move a boundary pixel between two patches of different classes; nothing else
    assert mean_iou(pred, pixels[10:], 2) > 90.0
    assert mean_iou(predict_segmentation(probe, features[10:], (grid, grid)), ids[10:], 2) == 100.0
