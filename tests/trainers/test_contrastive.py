"""The contrastive method: what trains, what decays, the temperature's clamp, LAMB, locked-image tuning."""

import math

import lightning as L
import pytest
import torch
from timm.optim import Lamb

from trainers.contrastive import ContrastiveModelConfig, ContrastiveOptimConfig, ContrastivePretraining

CONTEXT = 32


def batches(n: int, size: int = 32, batch: int = 4, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(batch, 3, size, size, generator=g),
             "text_tokens": torch.randint(1, 49000, (batch, CONTEXT), generator=g)} for _ in range(n)]


def fit(module: ContrastivePretraining, steps: int, **trainer_kwargs) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches(steps), batch_size=None))
    return trainer


def test_weight_decay_spares_vectors_biases_norms_and_the_temperature():
    module = ContrastivePretraining({}, {"weight_decay": 0.2}, 1e-3, 10)
    decay, no_decay = module.param_groups()
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in module.model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert {"logit_scale", "text.ln_final.weight", "visual.trunk.norm.bias", "visual.trunk.blocks.0.attn.qkv.bias",
            "text.transformer.resblocks.0.ln_1.weight"} <= spared
    assert {"text.text_projection", "visual.trunk.head.weight", "text.token_embedding.weight",
            "visual.trunk.blocks.0.mlp.fc1.weight", "text.positional_embedding"} <= decayed
    assert all(module.model.get_parameter(n).ndim < 2 for n in spared)


def test_the_temperature_is_clamped_after_the_step():
    torch.manual_seed(0)
    module = ContrastivePretraining({}, {"warmup_steps": 0}, 0.0, 2)  # rate 0: only the clamp can move it
    with torch.no_grad():
        module.model.logit_scale.fill_(math.log(100) + 0.3)
    fit(module, 1)
    assert module.model.logit_scale.item() == pytest.approx(math.log(100))


def test_lamb_is_timms_with_the_same_groups():
    module = ContrastivePretraining({}, {"name": "lamb", "weight_decay": 0.05}, 2e-3, 10)
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, Lamb)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    with pytest.raises(ValueError, match="adamw, lamb"):
        ContrastiveOptimConfig(name="lars")


def test_locked_image_tuning_trains_the_text_tower_only():
    torch.manual_seed(0)
    model = ContrastiveModelConfig(lock_image=True, image_tower="vit_tiny_patch8")
    module = ContrastivePretraining(model, {"warmup_steps": 0}, 1e-3, 3, image_size=32)
    image_before = {k: v.clone() for k, v in module.model.visual.state_dict().items()}
    text_before = {k: v.clone() for k, v in module.model.text.state_dict().items()}
    assert module.model.text.text_projection.shape[1] == module.model.visual.width == 192  # no image projection
    fit(module, 3)
    for name, value in module.model.visual.state_dict().items():
        assert torch.equal(value, image_before[name]), name
    assert not module.model.visual.training  # the locked tower stays in eval mode while the module trains
    changed = [k for k, v in module.model.text.state_dict().items() if not torch.equal(v, text_before[k])]
    assert "text_projection" in changed and len(changed) > 10


def test_locked_image_needs_the_tower_of_the_earlier_run():
    with pytest.raises(ValueError, match="image_tower"):
        ContrastiveModelConfig(lock_image=True)


@pytest.mark.parametrize("fields,expected", [
    ({"loss": "sigmoid"}, "Unknown model.loss 'sigmoid'. Choose one of: clip, siglip"),
    ({"loss": "siglip", "local_loss": True}, "drop --model.local_loss"),
    ({"mask_fraction": 1.5}, "model.mask_fraction must be in [0, 1]"),
    ({"mask_ratio": 1.0}, "model.mask_ratio in (0, 1); got 0.0 and 1.0"),
    ({"mask_fraction": 0.1, "image_tower": "vit_tiny_patch8"}, "does not apply with model.image_tower"),
])
def test_bad_loss_settings_are_refused_with_the_fix(fields, expected):
    with pytest.raises(ValueError) as error:
        ContrastiveModelConfig(**fields)
    assert expected in str(error.value)


def test_siglip_starts_at_its_temperature_and_bias_and_trains_the_bias_without_decay():
    torch.manual_seed(0)
    module = ContrastivePretraining({"loss": "siglip"}, {"warmup_steps": 0, "weight_decay": 0.5}, 1e-2, 3)
    assert module.model.logit_scale.item() == pytest.approx(math.log(10))
    assert module.model.logit_bias.item() == -10.0
    _, no_decay = module.param_groups()
    assert any(p is module.model.logit_bias for p in no_decay["params"])
    fit(module, 3)
    assert module.model.logit_bias.item() != -10.0  # learned: the positives pull it up from the all-negative prior


def test_mask_regularisation_adds_its_weighted_term_to_the_contrastive_loss():
    torch.manual_seed(0)
    batch = batches(1, size=32, batch=8)[0]
    plain = ContrastivePretraining({}, {}, 1e-3, 10)
    masked = ContrastivePretraining({"mask_fraction": 0.25, "mask_weight": 0.5}, {}, 1e-3, 10)
    masked.load_state_dict(plain.state_dict())
    contrastive = plain.compute_loss(batch)
    total = masked.compute_loss(batch)
    mask_loss = masked.training_metrics()["train/mask_loss"]
    assert 0 < mask_loss < 2
    assert total.item() == pytest.approx(contrastive.item() + 0.5 * mask_loss.item(), rel=1e-5)
    # training costs a quarter of the images' tower again, forward and backward
    image = plain.model.image_complexity(None).flops
    assert masked.flops_per_sample - plain.flops_per_sample == pytest.approx(3 * 0.25 * image)
