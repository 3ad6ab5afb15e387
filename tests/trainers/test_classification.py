"""Fine-tuning and linear-probe modules: losses, device-side augmentation, EMA, metrics, optimizers, timm export."""

import json
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from timm.loss import SoftTargetCrossEntropy

from trainers.classification import (AugmentConfig, EMAConfig, FinetuneOptimConfig, ImageClassification, LinearProbe,
                                     classifier_kwargs)
from trainers.export import export_model
from trainers.optim import LARS, LARSConfig

pytestmark = pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")
NO_AUG = asdict(AugmentConfig(reprob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0))


def _finetune(num_classes=5, augment=NO_AUG, ema=None, **optim) -> ImageClassification:
    torch.manual_seed(0)
    kwargs = classifier_kwargs("vit_tiny_patch8", num_classes, 16, "avg", 0.0)
    return ImageClassification(kwargs, asdict(FinetuneOptimConfig(**optim)), 1e-3, 10, augment, ema)


def _batch(n=4, num_classes=5):
    return {"image": torch.randn(n, 3, 16, 16), "label": torch.arange(n) % num_classes}


def test_without_mixing_the_loss_is_plain_cross_entropy_and_labels_out_of_range_are_named():
    module = _finetune()
    batch = _batch()
    expected = F.cross_entropy(module.model(batch["image"]), batch["label"])
    assert torch.allclose(module.training_step(batch, 0), expected)
    bad = _finetune(num_classes=3)
    with pytest.raises(ValueError, match=r"\[0, 3\] but the classifier has 3 classes.*--data.num_classes"):
        bad.training_step(_batch(4), 0)


def test_mixup_cutmix_and_smoothing_follow_mae_and_need_an_even_batch():
    module = _finetune(augment=asdict(AugmentConfig(reprob=0.0)))
    mixup = module.mixup
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.mix_prob, mixup.switch_prob, mixup.label_smoothing,
            mixup.mode, mixup.num_classes) == (0.8, 1.0, 1.0, 0.5, 0.1, "batch", 5)
    assert isinstance(module.criterion, SoftTargetCrossEntropy)
    assert torch.isfinite(module.training_step(_batch(4), 0))
    with pytest.raises(ValueError, match="even batch size"):
        module.training_step(_batch(3), 1)


def test_random_erasing_runs_on_the_device_batch_after_normalisation():
    module = _finetune(augment=asdict(AugmentConfig(reprob=1.0, mixup=0.0, cutmix=0.0, smoothing=0.0)))
    assert (module.erasing.probability, module.erasing.mode, module.erasing.max_count) == (1.0, "pixel", 1)
    images = torch.zeros(4, 3, 16, 16)
    module.erasing(images)
    assert all(images[i].count_nonzero() > 0 for i in range(4))  # every image got one box of N(0, 1) noise
    assert _finetune().erasing is None


def test_ema_averages_after_each_optimizer_step_copies_in_warmup_and_is_checkpointed():
    module = _finetune(ema=asdict(EMAConfig(enabled=True, decay=0.75)), warmup_steps=1)
    assert not any(p.requires_grad for p in module.ema.parameters())
    start = module.model.head.weight.detach().clone()
    module.trainer = SimpleNamespace(global_step=2)  # an optimizer step happened: global_step moved
    with torch.no_grad():
        module.model.head.weight.add_(1.0)
    module.on_train_batch_end(None, None, 0)
    assert torch.allclose(module.ema.module.head.weight, 0.75 * start + 0.25 * (start + 1))  # decay x old + rest
    module.on_train_batch_end(None, None, 1)  # same step (gradient accumulation): no second update
    assert torch.allclose(module.ema.module.head.weight, 0.75 * start + 0.25 * (start + 1))
    assert "ema.module.head.weight" in module.state_dict()

    warm = _finetune(ema=asdict(EMAConfig(enabled=True, decay=0.75, copy_during_warmup=True)), warmup_steps=5)
    warm.trainer = SimpleNamespace(global_step=1)
    with torch.no_grad():
        warm.model.head.weight.add_(1.0)
    warm.on_train_batch_end(None, None, 0)
    assert torch.equal(warm.ema.module.head.weight, warm.model.head.weight)


def test_adamw_over_layer_decay_groups():
    module = _finetune(layer_decay=0.5)
    config = module.configure_optimizers()
    optimizer = config["optimizer"]
    assert optimizer.defaults["betas"] == (0.9, 0.999)
    assert sorted({g["initial_lr"] for g in optimizer.param_groups}) == pytest.approx([1e-3 * 0.5 ** k for k in
                                                                                       range(13, -1, -1)])


def test_linear_probe_freezes_the_backbone_updates_bn_statistics_and_trains_the_head_with_lars():
    torch.manual_seed(0)
    probe = LinearProbe(classifier_kwargs("vit_tiny_patch8", 0, 16, "token"), 5, asdict(LARSConfig()), 0.1, 10)
    bn, fc = probe.head
    assert (bn.affine, bn.eps, fc.in_features) == (False, 1e-6, 192)
    assert 0.008 < fc.weight.std() < 0.012  # trunc_normal(0.01)
    assert not any(p.requires_grad for p in probe.model.parameters())
    probe.train()
    assert bn.training and not probe.model.training
    loss = probe.training_step(_batch(8), 0)
    assert bn.num_batches_tracked == 1 and bn.running_mean.abs().sum() > 0  # BN statistics moved (mae#54)
    loss.backward()
    assert all(p.grad is None for p in probe.model.parameters()) and fc.weight.grad is not None
    optimizer = probe.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, LARS)
    assert [p for g in optimizer.param_groups for p in g["params"]] == [fc.weight, fc.bias]


def test_exports_load_into_timm_with_the_same_logits(tmp_path):
    module = _finetune(num_classes=5)
    module.model.eval()
    images = torch.randn(2, 3, 16, 16)
    path = export_model(module.model, tmp_path / "model.safetensors", step=3)
    with safe_open(str(path), "pt") as f:
        kwargs = json.loads(f.metadata()["timm_kwargs"])
    assert kwargs["global_pool"] == "avg" and kwargs["num_classes"] == 5
    vit = timm.models.VisionTransformer(**kwargs).eval()
    vit.load_state_dict(load_file(path), strict=True)
    assert torch.allclose(vit(images), module.model(images), atol=1e-5)
    named = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=16, patch_size=8, global_pool="avg",
                              checkpoint_path=str(path)).eval()
    assert torch.allclose(named(images), module.model(images), atol=1e-5)

    # the linear probe exports as a classifier: BatchNorm folded into the Linear gives the probe's eval logits
    probe = LinearProbe(classifier_kwargs("vit_tiny_patch8", 0, 16, "token"), 5, asdict(LARSConfig()), 0.1, 10)
    probe.train()
    for _ in range(3):
        probe(torch.randn(8, 3, 16, 16) * 2 + 1)  # give the BatchNorm non-trivial running statistics
    probe.eval()
    path = export_model(probe.as_classifier(), tmp_path / "probe.safetensors")
    with safe_open(str(path), "pt") as f:
        vit = timm.models.VisionTransformer(**json.loads(f.metadata()["timm_kwargs"])).eval()
    vit.load_state_dict(load_file(path), strict=True)
    assert torch.allclose(vit(images), probe(images), atol=1e-4)
