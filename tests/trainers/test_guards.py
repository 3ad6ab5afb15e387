import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from trainers.callbacks import StepCheckpoint
from trainers.guards import NonFiniteLossGuard


class _Regression(L.LightningModule):
    """Loss (w - 3)^2, except on the listed steps, where it is NaN or inf. Records w before each step."""

    def __init__(self, bad_steps: dict[int, float]):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.bad_steps = bad_steps
        self.before: dict[int, float] = {}

    def training_step(self, batch, batch_idx):
        self.before[self.global_step] = self.w.item()
        loss = ((self.w - 3) ** 2).sum()
        if self.global_step in self.bad_steps:
            loss = loss * self.bad_steps[self.global_step]
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.25)


def _fit(tmp_path, bad_steps, max_steps, max_consecutive=3):
    guard = NonFiniteLossGuard(tmp_path, max_consecutive=max_consecutive)
    model = _Regression(bad_steps)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[guard, StepCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)])
    trainer.fit(model, DataLoader(range(100), batch_size=1))
    return trainer, model, guard


def test_bad_steps_are_skipped_and_counted(tmp_path):
    trainer, model, guard = _fit(tmp_path, {2: math.nan, 3: math.inf}, max_steps=6)
    # SGD on (w-3)^2 with lr 0.25: w <- w - 0.5 (w - 3), i.e. halfway to 3 at each applied step
    expected, w = [], 0.0
    for step in range(6):
        expected.append(w)
        if step not in (2, 3):
            w = w + 0.5 * (3 - w)
    assert [model.before[s] for s in range(6)] == pytest.approx(expected)
    assert model.w.item() == pytest.approx(w)
    assert guard.skipped == 2 and guard.stopped is None and trainer.global_step == 6


def test_too_many_in_a_row_stops_with_the_weights_from_before_the_first(tmp_path):
    trainer, model, guard = _fit(tmp_path, {4: math.nan, 5: math.nan, 6: math.nan, 7: math.nan}, max_steps=20)
    assert trainer.global_step == 7  # the third bad step in a row stops the run
    assert guard.stopped == tmp_path / "checkpoints" / "before-nonfinite-step-000004.ckpt"
    saved = torch.load(guard.stopped, weights_only=True)
    assert saved["state_dict"]["w"].item() == pytest.approx(model.before[4])
