import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from trainers.callbacks import StepCheckpoint
from trainers.guards import NonFiniteLossGuard
from trainers.method import Method


class _Regression(Method):
    """Loss (w - 3)^2, except on the listed (micro-)batches, where it is NaN or inf. Records w before each batch.
    ``optimizer``: "sgd" (the guard skips on the host) or "fused_adamw" (on the device). The training step is the
    shared one of every method, which hands the loss to the guard."""

    def __init__(self, bad_batches: dict[int, float], optimizer: str = "sgd"):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.bad_batches = bad_batches
        self.optimizer = optimizer
        self.before: dict[int, float] = {}
        self.batches = 0

    def compute_loss(self, batch):
        self.before[self.global_step] = self.w.item()
        loss = ((self.w - 3) ** 2).sum()
        if self.batches in self.bad_batches:
            loss = loss * self.bad_batches[self.batches]
        self.batches += 1
        return loss

    def configure_optimizers(self):
        if self.optimizer == "fused_adamw":
            return torch.optim.AdamW(self.parameters(), lr=0.5, weight_decay=0.1, fused=True)
        return torch.optim.SGD(self.parameters(), lr=0.25)


def _fit(tmp_path, bad_steps, max_steps, max_consecutive=3, optimizer="sgd", check_every=1, accumulate=1):
    guard = NonFiniteLossGuard(tmp_path, max_consecutive=max_consecutive, check_every_n_steps=check_every)
    model = _Regression(bad_steps, optimizer)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, accumulate_grad_batches=accumulate,
                        callbacks=[guard, StepCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)])
    trainer.fit(model, DataLoader(range(100), batch_size=1))
    return trainer, model, guard


def _adamw_reference(applied: list[bool]) -> list[float]:
    """w before each step when only the steps marked True are applied: torch's single-tensor AdamW (not the fused
    kernel under test) on the same loss, stepping only on the applied steps."""
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([w], lr=0.5, weight_decay=0.1, foreach=False, fused=False)
    before = []
    for apply in applied:
        before.append(w.item())
        if apply:
            opt.zero_grad()
            ((w - 3) ** 2).sum().backward()
            opt.step()
    return before + [w.item()]


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


def test_fused_adamw_skips_on_the_device_with_the_same_result(tmp_path):
    trainer, model, guard = _fit(tmp_path, {2: math.nan, 3: math.inf}, max_steps=6, optimizer="fused_adamw",
                                 check_every=4)
    assert guard.on_device
    expected = _adamw_reference([s not in (2, 3) for s in range(6)])
    assert [model.before[s] for s in range(6)] == pytest.approx(expected[:6], rel=1e-5)
    assert model.w.item() == pytest.approx(expected[6], rel=1e-5)
    assert trainer.optimizers[0].state[model.w]["step"].item() == 4  # the skipped steps were rolled back
    assert guard.skipped == 2 and guard.stopped is None and trainer.global_step == 6


def test_on_the_device_the_limit_holds_every_step_until_the_next_read(tmp_path):
    # Bad steps 4, 5, 6 reach the limit (3); step 7's loss is fine but must not be applied: the counts are read at
    # step 8 (every 4 steps), where the run stops with the weights from before step 4.
    trainer, model, guard = _fit(tmp_path, {4: math.nan, 5: math.nan, 6: math.inf}, max_steps=20,
                                 optimizer="fused_adamw", check_every=4)
    assert trainer.global_step == 8
    assert guard.stopped == tmp_path / "checkpoints" / "before-nonfinite-step-000004.ckpt"
    saved = torch.load(guard.stopped, weights_only=True)
    assert saved["state_dict"]["w"].item() == pytest.approx(model.before[4])
    assert model.w.item() == pytest.approx(model.before[4]) and model.before[7] == pytest.approx(model.before[4])
    assert saved["optimizer_states"][0]["state"][0]["step"].item() == 4
    assert guard.skipped == 3


def test_on_the_device_one_bad_micro_batch_skips_its_whole_step(tmp_path):
    # Two micro-batches per step: batch 3 is the second half of step 1, so step 1 is skipped as a whole.
    trainer, model, guard = _fit(tmp_path, {3: math.nan}, max_steps=4, optimizer="fused_adamw", accumulate=2)
    assert guard.on_device and guard.skipped == 1 and trainer.global_step == 4
    assert trainer.optimizers[0].state[model.w]["step"].item() == 3


def test_sgd_falls_back_to_the_host_check(tmp_path):
    _, _, guard = _fit(tmp_path, {}, max_steps=2)
    assert not guard.on_device
