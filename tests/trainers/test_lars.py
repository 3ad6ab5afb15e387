"""LARS as MAE's linear probe uses it (facebookresearch/mae util/lars.py:LARS, main_linprobe.py), against
hand-worked steps."""

import pytest
import torch
from timm.optim import Lars
from torch import nn

from trainers.optim import LARS, LARSConfig, build_lars, effective_batch, resolve_lr


def _param(values, grad) -> nn.Parameter:
    p = nn.Parameter(torch.tensor(values, dtype=torch.float64))
    p.grad = torch.tensor(grad, dtype=torch.float64)
    return p


def test_one_step_with_weight_decay_matches_the_hand_computation():
    # p = [[3, 4]] (norm 5), g = [[1, 2]], wd = 1: d = g + wd p = [[4, 6]], ||d|| = sqrt(52)
    # trust ratio q = 0.001 * 5 / sqrt(52) = 6.933752e-4; mu = q d = [[2.773501e-3, 4.160251e-3]]; p - 1.0 mu
    weight = _param([[3.0, 4.0]], [[1.0, 2.0]])
    bias = _param([1.0, 2.0], [0.5, -0.5])  # 1-D: no decay, no trust ratio: mu = g, p - lr g
    LARS([weight, bias], lr=1.0, weight_decay=1.0, momentum=0.9).step()
    assert weight.flatten().tolist() == pytest.approx([2.99722650, 3.99583975], abs=1e-8)
    assert bias.tolist() == pytest.approx([0.5, 2.5], abs=1e-12)


def test_trust_ratio_applies_without_weight_decay_and_momentum_accumulates():
    # p = [[0.6, 0.8]] (norm 1), g = [[2, -1]] (norm sqrt 5), wd 0: q = 0.001 / sqrt(5) = 4.472136e-4
    # step 1: mu1 = q g = [[8.944272e-4, -4.472136e-4]]; p1 = p - 10 mu1 = [[0.59105573, 0.80447214]]
    weight = _param([[0.6, 0.8]], [[2.0, -1.0]])
    optimizer = LARS([weight], lr=10.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001)
    optimizer.step()
    assert weight.flatten().tolist() == pytest.approx([0.59105573, 0.80447214], abs=1e-8)
    # step 2, same gradient: ||p1|| = 0.99999995 (p1 = p + 10 q [-2, 1]), q2 = 0.001 * ||p1|| / sqrt(5)
    # mu2 = 0.9 mu1 + q2 g; p2 = p1 - 10 mu2
    p1 = torch.tensor([0.59105573, 0.80447214], dtype=torch.float64)
    q2 = 0.001 * p1.norm().item() / 5 ** 0.5
    mu2 = [0.9 * 8.94427191e-4 + q2 * 2, 0.9 * -4.47213595e-4 - q2]
    optimizer.step()
    assert weight.flatten().tolist() == pytest.approx([0.59105573 - 10 * mu2[0], 0.80447214 - 10 * mu2[1]], abs=1e-8)

    # timm's Lars skips the trust ratio when weight decay is 0: its first step is p - lr g, far from MAE's
    other = _param([[0.6, 0.8]], [[2.0, -1.0]])
    Lars([other], lr=10.0, momentum=0.9, weight_decay=0.0).step()
    assert other.flatten().tolist() == pytest.approx([-19.4, 10.8])


def test_zero_norms_fall_back_to_a_ratio_of_one():
    weight = _param([[0.0, 0.0]], [[1.0, -2.0]])  # ||p|| = 0: plain SGD step
    LARS([weight], lr=0.5, weight_decay=0.1).step()
    assert weight.tolist() == [[-0.5, 1.0]]
    still = _param([[1.0, 1.0]], [[0.0, 0.0]])  # ||d|| = 0: nothing moves, no NaN
    LARS([still], lr=0.5).step()
    assert still.tolist() == [[1.0, 1.0]]


def test_closure_group_scale_and_the_linear_probe_learning_rate():
    weight = _param([[1.0]], [[0.0]])
    optimizer = build_lars([{"params": [weight], "lr_scale": 0.5}], LARSConfig(), lr=2.0)
    assert optimizer.param_groups[0]["lr"] == 1.0
    assert optimizer.step(closure=lambda: torch.tensor(3.0)) == 3.0
    # facebookresearch/mae FINETUNE.md "Linear Probing", worked by hand: lr = 0.1 * 16384 / 256 = 6.4
    assert resolve_lr(LARSConfig(blr=0.1), effective_batch(512, 1, 32)) == pytest.approx(6.4)
    with pytest.raises(ValueError, match="momentum"):
        LARSConfig(momentum=1.0)
