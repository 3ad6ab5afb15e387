"""Shared callbacks: image panels under a low-precision model, and the speed options."""

import pytest
import torch

from trainers import benchmarking as bench
from trainers.build import LoggingConfig, TrainerConfig, build_trainer
from trainers.callbacks import ImagePanelLogger, SpeedOptions
from trainers.classification import ImageClassification
from trainers.mae import MAEPretraining

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _mae():
    torch.manual_seed(0)
    return MAEPretraining({"name": "mae_vit_tiny_patch8", "img_size": 16, "decoder_embed_dim": 16,
                           "decoder_depth": 1, "decoder_num_heads": 2}, {"warmup_steps": 1}, 1e-3, 2)


@pytest.mark.parametrize("precision", ["bf16-true", "32-true"])
def test_panels_render_whatever_the_weights_dtype(tmp_path, precision):
    # bf16-true keeps bf16 weights, as DeepSpeed's bf16 does; the kept fp32 images must follow them.
    panels = ImagePanelLogger(tmp_path / "images", every_n_steps=2, mean=MEAN, std=STD, num_images=2)
    trainer = build_trainer(TrainerConfig(max_steps=2, accelerator="cpu", devices=1, precision=precision,
                                          checkpoint_every_n_steps=10, val_every_n_steps=10),
                            LoggingConfig(), tmp_path, callbacks=[panels], batch_size_per_device=2)
    trainer.fit(_mae(), train_dataloaders=bench.RepeatedBatch(bench.synthetic_batch(2, 16, "cpu"), 2))
    trainer.loggers[0].experiment.finish()
    assert panels.last_path is not None and panels.last_path.stat().st_size > 0


def test_speed_options_compile_in_place_and_convert_conv_weights():
    module = ImageClassification({"name": "regnety_200mf", "num_classes": 3}, {"warmup_steps": 1}, 1e-3, 2)
    keys = list(module.state_dict())
    SpeedOptions(compile=True, channels_last=True).on_fit_start(None, module)
    assert module.model._compiled_call_impl is not None  # compiled lazily, at its first call
    assert list(module.state_dict()) == keys  # checkpoints keep their keys
    convs = [p for p in module.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                         for p in convs if p.shape[-1] > 1)
    batch = {"image": torch.zeros(2, 3, 8, 8)}
    SpeedOptions(channels_last=True).on_train_batch_start(None, module, batch, 0)
    assert batch["image"].is_contiguous(memory_format=torch.channels_last) and not batch["image"].is_contiguous()


def test_lightnings_per_step_sigterm_broadcast_is_off(tmp_path):
    # Lightning 2.6 broadcasts and reads back its SIGTERM flag every step under DDP (a host-device sync); our
    # preemption handler owns SIGTERM, so that flag is always 0 and the broadcast must not run.
    from lightning.pytorch.loops import _TrainingEpochLoop

    trainer = build_trainer(TrainerConfig(max_steps=1, accelerator="cpu", devices=1, checkpoint_every_n_steps=10,
                                          val_every_n_steps=10), LoggingConfig(), tmp_path, batch_size_per_device=2)
    trainer.fit(_mae(), train_dataloaders=bench.RepeatedBatch(bench.synthetic_batch(2, 16, "cpu"), 1))
    trainer.loggers[0].experiment.finish()
    loop = trainer.fit_loop.epoch_loop
    assert hasattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor")  # still the name Lightning uses
    assert "_broadcast_sigterm_tensor" in vars(loop) and loop._broadcast_sigterm_tensor() is None
