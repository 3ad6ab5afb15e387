import torch

from evaluation.classification import TopKAccuracy


def test_top1_top5_in_percent():
    accuracy = TopKAccuracy(6)
    logits = torch.tensor([[9., 8, 7, 6, 5, 0],    # label 0: top-1
                           [9., 8, 7, 6, 5, 0],    # label 4: 5th best, top-5 only
                           [9., 8, 7, 6, 5, 0],    # label 5: neither
                           [0., 1, 9, 2, 3, 4]])   # label 2: top-1
    accuracy.update(logits[:2], torch.tensor([0, 4]))
    accuracy.update(logits[2:], torch.tensor([5, 2]))
    assert {k: v.item() for k, v in accuracy.compute_and_reset().items()} == {"top1": 50.0, "top5": 75.0}
