"""No host-device synchronisation inside a training step: every hook of a step, the fault-tolerance
callbacks included, runs with CUDA's sync debug mode set to "error" (any synchronising call raises)."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks import training as bench
from trainers.build import LoggingConfig, TrainerConfig, build_trainer
from trainers.mae import MAEPretraining

STEPS = 8
WATCHED = range(3, 7)  # after warm-up; logging, validation and checkpoints fall outside (every 50 / 100 steps)


class _SyncsRaise(Callback):
    """From the start of each watched step to the start of the next: the step, its hooks, the next batch's fetch."""

    def __init__(self):
        self.watched: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.cuda.set_sync_debug_mode("default")
        if trainer.global_step in WATCHED:
            self.watched.append(trainer.global_step)
            torch.cuda.set_sync_debug_mode("error")

    def on_train_end(self, trainer, pl_module):
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_a_training_step_never_waits_for_the_gpu(tmp_path):
    torch.manual_seed(0)
    module = MAEPretraining({"name": "mae_vit_tiny_patch8", "img_size": 32, "decoder_embed_dim": 16,
                             "decoder_depth": 1, "decoder_num_heads": 2}, {"warmup_steps": 1}, 1e-3, STEPS)
    batches = bench.RepeatedBatch(bench.synthetic_batch(8, 32, "cuda", seed=0), STEPS)
    watch = _SyncsRaise()
    trainer = build_trainer(TrainerConfig(max_steps=STEPS, devices=1, log_every_n_steps=50,
                                          checkpoint_every_n_steps=100, val_every_n_steps=100),
                            LoggingConfig(), tmp_path, callbacks=[watch], batch_size_per_device=8)
    try:
        trainer.fit(module, train_dataloaders=batches)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert watch.watched == list(WATCHED) and trainer.global_step == STEPS
    guard = next(c for c in trainer.callbacks if type(c).__name__ == "NonFiniteLossGuard")
    assert guard.on_device  # fused AdamW: the guard skips on the device
