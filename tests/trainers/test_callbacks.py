"""Shared callbacks: the final-step checkpoint, the data position, metrics.csv across attempts, image panels under a
low-precision model, and the speed options."""

import csv
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from benchmarks import training as bench
from trainers.build import LoggingConfig, TrainerConfig, build_trainer
from trainers.callbacks import DataPosition, DestroyProcessGroup, ImagePanelLogger, SpeedOptions, StepCheckpoint
from trainers.classification import ImageClassification
from trainers.lightning_compat import sigterm_broadcast_disabled
from trainers.mae import MAEPretraining
from trainers.metrics_csv import ResumableCSVLogger

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
    # Lightning broadcasts and reads back its SIGTERM flag every step under DDP (a host-device sync); our
    # preemption handler owns SIGTERM, so that flag is always 0 and the broadcast must not run. That the switch
    # still reaches Lightning's loop is checked in test_lightning_compat.py.
    trainer = build_trainer(TrainerConfig(max_steps=1, accelerator="cpu", devices=1, checkpoint_every_n_steps=10,
                                          val_every_n_steps=10), LoggingConfig(), tmp_path, batch_size_per_device=2)
    assert not sigterm_broadcast_disabled(trainer)
    trainer.fit(_mae(), train_dataloaders=bench.RepeatedBatch(bench.synthetic_batch(2, 16, "cpu"), 1))
    trainer.loggers[0].experiment.finish()
    assert sigterm_broadcast_disabled(trainer)


# ---- checkpoints and the data position, on a tiny module --------------------------------------------------------

class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Positions(L.LightningDataModule):
    """3 batches an epoch; its checkpoint state is whatever ``training_position`` says (the DataPosition contract)."""

    def __init__(self):
        super().__init__()
        self.training_position = None
        self.during_fit = None

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(12, 4), batch_size=4)

    def state_dict(self):
        self.during_fit = self.training_position
        return {"position": self.training_position() if self.training_position else None}


def _fit(tmp_path, callbacks, datamodule=None, max_steps=5):
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path)
    trainer.fit(Tiny(), datamodule=datamodule or Positions())
    return trainer


def _step_files(directory) -> dict[str, int]:
    return {p.name: torch.load(p, weights_only=True)["global_step"] for p in sorted(directory.iterdir())}


def test_step_checkpoint_also_saves_the_final_step(tmp_path):
    _fit(tmp_path, [StepCheckpoint(dirpath=tmp_path / "c", filename="step-{step}", every_n_train_steps=2,
                                   save_top_k=-1)])
    # every 2 steps, and step 5 although 5 is not a multiple of 2: a rerun does not repeat step 5
    assert _step_files(tmp_path / "c") == {"step-step=2.ckpt": 2, "step-step=4.ckpt": 4, "step-step=5.ckpt": 5}
    _fit(tmp_path, [StepCheckpoint(dirpath=tmp_path / "l", every_n_train_steps=2, save_last=True)])
    assert _step_files(tmp_path / "l")["last.ckpt"] == 5


def test_a_step_saved_elsewhere_is_not_saved_again_at_the_end(tmp_path):
    saver = StepCheckpoint(dirpath=tmp_path / "c", filename="step-{step}", every_n_train_steps=2, save_top_k=-1)

    class SavesTheEnd(L.Callback):  # what the preemption handler and the non-finite guard do
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 5:
                trainer.save_checkpoint(tmp_path / "elsewhere.ckpt")
                saver.note_saved(5)

    _fit(tmp_path, [SavesTheEnd(), saver])
    assert _step_files(tmp_path / "c") == {"step-step=2.ckpt": 2, "step-step=4.ckpt": 4}


def test_data_position_reaches_the_datamodules_checkpoint_state(tmp_path):
    datamodule = Positions()
    _fit(tmp_path, [DataPosition(), L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "c", filename="step-{step}", every_n_train_steps=2, save_top_k=-1)], datamodule)
    saved = {p.name: torch.load(p, weights_only=True)["Positions"]["position"]
             for p in sorted((tmp_path / "c").iterdir())}
    # 3 batches an epoch: after step 2, 2 batches of epoch 0 are done; after step 4, 1 batch of epoch 1
    assert saved == {"step-step=2.ckpt": (0, 2), "step-step=4.ckpt": (1, 1)}
    assert datamodule.during_fit is not None and datamodule.training_position is None  # let go after fit


def test_without_data_position_the_datamodule_gets_nothing(tmp_path):
    datamodule = Positions()
    _fit(tmp_path, [L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "c", every_n_train_steps=2)], datamodule,
         max_steps=2)
    assert datamodule.during_fit is None


# ---- metrics.csv over attempts ----------------------------------------------------------------------------------

def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_metrics_csv_is_appended_to_and_cut_back_to_the_checkpoint(tmp_path):
    first = ResumableCSVLogger(str(tmp_path))
    for step in range(4):
        first.log_metrics({"loss": float(step)}, step=step)
    first.finalize("success")
    second = ResumableCSVLogger(str(tmp_path))  # a resumed attempt: Lightning's writer would delete the file
    second.experiment.drop_rows_from(2)  # the checkpoint was at step 2; steps 2 and 3 are logged again
    second.log_metrics({"loss": 20.0, "lr": 0.1}, step=2)
    second.finalize("success")
    rows = _rows(tmp_path / "csv" / "metrics.csv")
    assert [(r["step"], r["loss"], r["lr"]) for r in rows] == [("0", "0.0", ""), ("1", "1.0", ""), ("2", "20.0", "0.1")]


@pytest.mark.parametrize("keep, step, stage, destroyed", [
    (True, 2, "fit", False),       # a finished fit that a validation follows keeps the group for it
    (True, 1, "fit", True),        # a fit stopped early (preempted, guard) has no validation after it
    (True, 2, "validate", True),   # the validation after it tears the group down
    (False, 2, "fit", True),       # no validation follows
])
def test_the_process_group_outlives_a_finished_fit_only_when_a_validation_follows(tmp_path, keep, step, stage,
                                                                                   destroyed):
    torch.distributed.init_process_group("gloo", store=torch.distributed.FileStore(str(tmp_path / "store"), 1),
                                         rank=0, world_size=1)
    try:
        DestroyProcessGroup(keep).teardown(SimpleNamespace(global_step=step, max_steps=2), None, stage)
        assert torch.distributed.is_initialized() != destroyed
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
