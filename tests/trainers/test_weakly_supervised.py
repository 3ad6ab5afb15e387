"""SWAG-style hashtag pretraining: the 1/k softmax loss, its targets, validation metrics, optimizers, export."""

import json
import math

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from trainers.weakly_supervised import (WeaklySupervisedPretraining, WSPOptimConfig, export_trunk, hashtag_loss,
                                        trunk_state_dict)

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")

VOCAB = ["a", "b", "c"]
TINY_VIT = {"name": "vit_tiny_patch8", "img_size": 16, "depth": 1, "embed_dim": 24, "num_heads": 2}


def _module(vocab=VOCAB, **kwargs) -> WeaklySupervisedPretraining:
    optim = kwargs.pop("optim", {})
    return WeaklySupervisedPretraining({**TINY_VIT, "num_classes": len(vocab)}, optim, lr=1e-3, total_steps=10,
                                       vocab=vocab, **kwargs)


class FixedLogits(nn.Module):
    """Stands in for the backbone: returns the given logits whatever the images."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, images):
        return self.logits


def test_one_over_k_targets_and_loss_by_hand():
    module = _module()
    target, tagged = module.hashtag_targets([["a", "b"], ["zzz"], ["c", "c", "out-of-vocab"]])
    assert tagged == 2
    assert target.tolist() == [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]  # duplicates count once

    logits = torch.tensor([[2.0, 1.0, 0.0], [9.0, -3.0, 4.0], [0.5, -1.0, 3.0]])
    lse0 = math.log(math.exp(2) + math.exp(1) + math.exp(0))
    lse2 = math.log(math.exp(0.5) + math.exp(-1) + math.exp(3))
    first = -0.5 * ((2 - lse0) + (1 - lse0))  # tags {a, b}: -(1/2) (log p_a + log p_b)
    third = -(3 - lse2)  # tag {c}
    # the untagged sample adds nothing and does not count in the mean
    assert hashtag_loss(logits, target, tagged).item() == pytest.approx((first + third) / 2, rel=1e-6)
    assert hashtag_loss(logits[:1], target[:1], 1).item() == pytest.approx(first, rel=1e-6)


def test_gradient_is_softmax_minus_target():
    # d/dz of -(t . log softmax z) = softmax(z) * sum(t) - t = softmax(z) - t for a tagged row
    logits = torch.tensor([[2.0, 1.0, 0.0]], requires_grad=True)
    target = torch.tensor([[0.5, 0.5, 0.0]])
    hashtag_loss(logits, target, 1).backward()
    assert torch.allclose(logits.grad, logits.detach().softmax(1) - target)


def test_a_batch_without_tags_gives_zero_loss_and_zero_gradient():
    logits = torch.randn(4, 3, requires_grad=True)
    loss = hashtag_loss(logits, torch.zeros(4, 3), 0)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros(4, 3))


def test_training_step_uses_the_backbone_and_logs():
    module = _module()
    batch = {"image": torch.randn(3, 3, 16, 16), "hashtags": [["a"], [], ["b", "c"]]}
    loss = module.training_step(batch, 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert module.model.head.weight.grad is not None


def test_validation_metrics_average_over_tagged_samples():
    module = _module(vocab=["a", "b", "c", "d", "e", "f"], class_to_hashtags=[[0], [1, 2], [3]])
    logits = torch.tensor([
        [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # top-1 a (a tag: hit), class 0
        [0.0, 1.0, 5.0, 0.0, 0.0, 0.0],  # top-1 c (not a tag), class 1
        [0.0, 0.0, 0.0, 9.0, 0.0, 0.0],  # untagged: no precision; class 2
    ])
    module.model = FixedLogits(logits)
    batch = {"image": torch.zeros(3, 3, 16, 16), "hashtags": [["a", "f"], ["b"], []], "label": torch.tensor([0, 1, 0])}
    module.validation_step(batch, 0)
    assert module.val_precision["at1"].compute().item() == pytest.approx(0.5)  # (1 + 0) / 2 tagged samples
    # top-5: sample 0 gets {a,b,c,d,e}: 1 of its tags {a, f}; sample 1 gets {c,b,...}: b -> 1/5 each
    assert module.val_precision["at5"].compute().item() == pytest.approx((1 / 5 + 1 / 5) / 2)
    # uniform prior: class scores are sums of softmax mass; predictions 0, 1, 2 against labels 0, 1, 0
    assert module.val_zero_shot.compute().item() == pytest.approx(2 / 3)


def test_vocabulary_must_match_the_head():
    with pytest.raises(ValueError, match="vocabulary size"):
        WeaklySupervisedPretraining({**TINY_VIT, "num_classes": 4}, {}, 1e-3, 10, vocab=VOCAB)


def test_checkpoint_hooks_carry_the_vocabulary():
    module = _module()
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    other = WeaklySupervisedPretraining({**TINY_VIT, "num_classes": 3}, {}, 1e-3, 10)  # as load_from_checkpoint does
    other.on_load_checkpoint(checkpoint)
    assert other.hashtag_targets([["b"]])[0].tolist() == [[0.0, 1.0, 0.0]]


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_optimizer_choice(name, cls):
    module = _module(optim={"name": name, "weight_decay": 0.1})
    optimizer = module.configure_optimizers()["optimizer"]
    assert type(optimizer) is cls
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    if name == "sgd":  # SWAG's RegNets: SGD with Nesterov momentum 0.9
        assert decay["nesterov"] and decay["momentum"] == 0.9


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="Unknown optim.name 'lamb'"):
        WSPOptimConfig(name="lamb")


def test_export_vit_trunk_without_head_loads_in_timm(tmp_path):
    module = _module()
    path = export_trunk(module.model, {**TINY_VIT, "num_classes": 3}, tmp_path / "encoder.safetensors", step=7)
    weights = load_file(path)
    assert not any(k.startswith("head.") for k in weights)
    with safe_open(path, "pt") as f:
        kwargs = json.loads(f.metadata()["timm_kwargs"])
        assert json.loads(f.metadata()["step"]) == 7
    assert kwargs["num_classes"] == 0
    timm.models.VisionTransformer(**kwargs).load_state_dict(weights, strict=True)
    assert torch.equal(weights["blocks.0.mlp.fc1.weight"], module.model.state_dict()["blocks.0.mlp.fc1.weight"])


def test_export_other_backbones_drops_head_keys(tmp_path):
    net = nn.Sequential()
    net.add_module("stem", nn.Conv2d(3, 4, 3))
    net.add_module("head", nn.Linear(4, 5))
    assert set(trunk_state_dict(net)) == {"stem.weight", "stem.bias"}
    path = export_trunk(net, {"name": "regnety_16gf"}, tmp_path / "encoder.safetensors", step=1)
    assert set(load_file(path)) == {"stem.weight", "stem.bias"}
