"""Each private part of Lightning that trainers/lightning_compat.py touches, checked against the installed Lightning.

A failure here means a Lightning release changed something Prism relies on; its message names the version and
what changed. Fix trainers/lightning_compat.py (and TESTED_LIGHTNING), not the callers.
"""

import importlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import lightning
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.precision import DeepSpeedPrecision
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy
from torch import nn

from trainers import lightning_compat as compat
from trainers.lightning_compat import changed

BATCHES = 3  # per epoch


def lightning_private(module: str, name: str):
    """A private Lightning object, or a failure that says it is gone (not an ImportError at collection)."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        pytest.fail(changed(f"{module}.{name} is gone"))


class Tiny(L.LightningModule):
    """Counts its own training steps per epoch: the ground truth the loop counters are checked against."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.steps_in_epoch: dict[int, int] = {}

    def training_step(self, batch, batch_idx):
        self.steps_in_epoch[self.current_epoch] = self.steps_in_epoch.get(self.current_epoch, 0) + 1
        return self.layer(batch).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(4 * BATCHES, 4), batch_size=4)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(4, 4), batch_size=4)


def fit(tmp_path, callbacks, **kwargs) -> tuple[L.Trainer, Tiny]:
    settings = dict(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                    limit_val_batches=0, default_root_dir=tmp_path)
    trainer = L.Trainer(callbacks=callbacks, **(settings | kwargs))
    module = Tiny()
    trainer.fit(module)
    return trainer, module


def test_the_installed_lightning_is_a_checked_release():
    minor = ".".join(lightning.__version__.split(".")[:2])
    assert minor in compat.TESTED_LIGHTNING, changed(
        f"release {minor} was never checked; run this file, fix what fails, then add {minor} to TESTED_LIGHTNING")


# ---- the per-step SIGTERM broadcast ------------------------------------------------------------------------

def test_the_sigterm_broadcast_is_looked_up_on_the_loop_at_every_step():
    _TrainingEpochLoop = lightning_private("lightning.pytorch.loops", "_TrainingEpochLoop")
    # An instance attribute replaces it only while advance() calls it through `self`.
    assert hasattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor"), changed(
        "_TrainingEpochLoop._broadcast_sigterm_tensor is gone; find what now syncs the SIGTERM flag per step")
    assert "self._broadcast_sigterm_tensor()" in inspect.getsource(_TrainingEpochLoop.advance), changed(
        "_TrainingEpochLoop.advance no longer calls self._broadcast_sigterm_tensor(); the per-step SIGTERM sync "
        "moved, so disable_sigterm_broadcast no longer switches it off")


def test_disable_sigterm_broadcast_on_a_real_trainer(tmp_path):
    class Disable(Callback):
        def on_train_start(self, trainer, pl_module):
            self.result = compat.disable_sigterm_broadcast(trainer)

    disable = Disable()
    trainer, _ = fit(tmp_path, [disable], max_steps=2)
    assert disable.result is True, changed("disable_sigterm_broadcast found nothing to switch off")
    assert compat.sigterm_broadcast_disabled(trainer)
    assert trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor() is None
    untouched, _ = fit(tmp_path, [], max_steps=1)
    assert not compat.sigterm_broadcast_disabled(untouched)  # other Trainers keep Lightning's broadcast


# ---- where training stands ---------------------------------------------------------------------------------

class RecordPosition(Callback):
    def __init__(self):
        self.seen: list[tuple[str, tuple[int, int] | None, tuple[int, int]]] = []

    def _note(self, hook, trainer, pl_module):
        epoch = trainer.current_epoch
        truth = (epoch, pl_module.steps_in_epoch.get(epoch, 0))  # what the module itself trained on so far
        self.seen.append((hook, compat.training_position(trainer), truth))

    def on_train_batch_end(self, trainer, pl_module, *args):
        self._note("batch", trainer, pl_module)

    def on_validation_end(self, trainer, pl_module):
        self._note("validation", trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self._note("epoch_end", trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._note("train_end", trainer, pl_module)


def test_training_position_counts_what_the_module_trained_on(tmp_path):
    record = RecordPosition()
    trainer, module = fit(tmp_path, [record], limit_val_batches=1, val_check_interval=2)
    what = changed("Lightning's fit-loop counters (_FitLoop.epoch_progress, _TrainingEpochLoop.batch_progress) no "
                   "longer mean (epoch, batches trained in it); a resumed data stream would skip or repeat batches")
    for hook, position, (epoch, trained) in record.seen:
        if hook in ("batch", "validation"):  # inside the epoch: the batches trained so far, the last included
            assert position == (epoch, trained), (what, hook, record.seen)
        elif hook == "epoch_end":  # the epoch is done: a resumed run starts the next one from its first batch
            assert trained == BATCHES and position == (epoch + 1, 0), (what, hook, record.seen)
        else:  # the end of fit, where current_epoch has moved on to the epoch that never started
            assert position == (epoch, 0) == (2, 0), (what, hook, record.seen)
    assert [h for h, *_ in record.seen].count("validation") >= 2  # mid-epoch validations were covered
    assert compat.training_position(L.Trainer(logger=False, enable_progress_bar=False)) is None  # before any fit
    assert compat.training_position(trainer) == (2, 0)  # a save after fit records where it ended
    trainer.validate(module, verbose=False)
    assert compat.training_position(trainer) is None


class LogsStep(Tiny):
    """Logs its step number, on every step or only on the steps ``logs_this_step`` names."""

    def __init__(self, only_logging_steps: bool):
        super().__init__()
        self.only_logging_steps = only_logging_steps
        self.logged_on: list[int] = []

    def training_step(self, batch, batch_idx):
        if not self.only_logging_steps or compat.logs_this_step(self.trainer):
            self.logged_on.append(self.trainer.global_step)
            self.log("seen_step", float(self.trainer.global_step))
        return super().training_step(batch, batch_idx)


def test_logging_only_where_logs_this_step_says_gives_the_loggers_the_same_rows(tmp_path):
    rows = {}
    for only in (False, True):
        logger = CSVLogger(tmp_path / str(only), name="", version="")
        # 2 epochs of 3 batches, with a cadence that falls inside the epochs and a max_steps off the cadence
        trainer = L.Trainer(accelerator="cpu", max_epochs=3, max_steps=5, log_every_n_steps=2, logger=logger,
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                            limit_val_batches=0)
        module = LogsStep(only)
        trainer.fit(module)
        with open(Path(logger.log_dir) / "metrics.csv") as f:
            rows[only] = [line for line in f if "seen_step" not in line]
    what = changed("_LoggerConnector.should_update_logs no longer names the steps whose metrics reach the loggers; "
                   "logging only on those steps (trainers/method.py) would lose or move logged values")
    assert rows[True] == rows[False], (what, rows)
    assert len(rows[False]) == 2  # steps 1 and 3 (0-based) reached the CSV: the test saw the cadence work
    assert module.logged_on == [1, 3]  # and the other steps logged nothing


# ---- ModelCheckpoint ---------------------------------------------------------------------------------------

def test_save_checkpoint_now_writes_top_k_and_last_at_the_current_step(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="step-{step}", every_n_train_steps=2,
                            save_top_k=-1, save_last=True)
    assert compat.last_saved_step(saver) == 0

    class SaveAtEnd(Callback):
        def on_train_end(self, trainer, pl_module):  # runs before ModelCheckpoint's own hooks
            self.before = compat.last_saved_step(saver)
            # Lightning 2.5 also saves last.ckpt at every epoch end, 2.6 only after a save at the same step
            self.newest = max(torch.load(p, weights_only=True)["global_step"] for p in (tmp_path / "ckpt").iterdir())
            compat.save_checkpoint_now(saver, trainer)

    at_end = SaveAtEnd()
    fit(tmp_path, [at_end, saver], enable_checkpointing=True, max_steps=5)  # ends inside epoch 1
    assert at_end.before == at_end.newest, changed(
        "ModelCheckpoint._last_global_step_saved no longer holds the step saved last")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["last.ckpt", "step-step=2.ckpt", "step-step=4.ckpt", "step-step=5.ckpt"], changed(
        f"ModelCheckpoint's _monitor_candidates/_save_topk_checkpoint/_save_last_checkpoint wrote {files}")
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 5
    assert compat.last_saved_step(saver) == 5


def test_record_saved_step_makes_model_checkpoint_skip_that_step(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="step-{step}", every_n_train_steps=1, save_top_k=-1)

    class SavedElsewhere(Callback):
        def on_train_batch_end(self, trainer, *args):  # before ModelCheckpoint's, which Lightning runs last
            if trainer.global_step == 2:
                compat.record_saved_step(saver, 2)

    fit(tmp_path, [SavedElsewhere(), saver], enable_checkpointing=True, max_steps=3)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["step-step=1.ckpt", "step-step=3.ckpt"], changed(
        f"ModelCheckpoint ignores _last_global_step_saved when deciding to save (wrote {files})")
    assert compat.checkpoint_every_n_train_steps(saver) == 1


# ---- loggers -----------------------------------------------------------------------------------------------

def test_wandb_run_started_reads_the_run_the_logger_made_or_was_given(tmp_path):
    assert not compat.wandb_run_started(WandbLogger(save_dir=tmp_path, offline=True))
    run = object()  # a started run, as far as the logger can tell
    given = WandbLogger(save_dir=tmp_path, offline=True, experiment=run)
    assert compat.wandb_run_started(given) and given.experiment is run, changed(
        "WandbLogger._experiment no longer holds the run that WandbLogger.experiment returns")


def test_keeping_writer_replaces_the_deletion_of_an_existing_metrics_file(tmp_path):
    metrics = tmp_path / ExperimentWriter.NAME_METRICS_FILE
    metrics.write_text("step,loss\n0,1.0\n")
    with pytest.warns(UserWarning, match="will be deleted"):
        ExperimentWriter(log_dir=str(tmp_path))
    assert not metrics.exists(), changed("ExperimentWriter no longer deletes an existing metrics.csv at start; "
                                         "KeepingExperimentWriter may be unnecessary")

    class Keeping(compat.KeepingExperimentWriter):
        def continue_file(self):
            self.continued = True

    metrics.write_text("step,loss\n0,1.0\n")
    writer = Keeping(log_dir=str(tmp_path))
    assert metrics.read_text() == "step,loss\n0,1.0\n" and writer.continued, changed(
        "_ExperimentWriter.__init__ no longer deletes through _check_log_dir_exists")


def test_csv_logger_writer_is_the_one_lightning_saves_and_finalizes(tmp_path):
    class Mine(ExperimentWriter):
        pass

    logger = CSVLogger(save_dir=tmp_path, name="", version="csv")
    writer = compat.csv_logger_writer(logger, Mine)
    assert type(writer) is Mine and compat.csv_logger_writer(logger, Mine) is writer
    assert logger.experiment is writer, changed("CSVLogger.experiment no longer returns the writer in _experiment")
    logger.log_metrics({"loss": 0.5}, step=0)
    logger.finalize("success")  # saves only through a writer it finds in _experiment
    assert (tmp_path / "csv" / "metrics.csv").read_text().splitlines() == ["loss,step", "0.5,0"], changed(
        "CSVLogger.finalize no longer saves through the writer in _experiment")


# ---- threads ------------------------------------------------------------------------------------------------

def test_lightnings_launchers_keep_the_thread_count_we_set(monkeypatch):
    _set_num_threads_if_needed = lightning_private("lightning.fabric.utilities.distributed",
                                                   "_set_num_threads_if_needed")
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(1)
        compat.keep_threads_through_launchers(1)
        _set_num_threads_if_needed(num_processes=1)
        assert torch.get_num_threads() == 1, changed(
            "lightning/fabric/utilities/distributed.py:_set_num_threads_if_needed overrides OMP_NUM_THREADS")
    finally:
        torch.set_num_threads(before)


# ---- strategies ---------------------------------------------------------------------------------------------

def test_strategy_readers_return_what_the_constructors_were_given():
    ddp = DDPStrategy(find_unused_parameters=True, gradient_as_bucket_view=True)
    assert compat.ddp_kwargs(ddp) == {"find_unused_parameters": True, "gradient_as_bucket_view": True}
    assert compat.fsdp_state_dict_type(FSDPStrategy()) == "full"
    assert compat.fsdp_state_dict_type(FSDPStrategy(state_dict_type="sharded")) == "sharded"
    assert compat.fsdp_activation_checkpointing(FSDPStrategy()) == {}
    wrapped = compat.fsdp_activation_checkpointing(FSDPStrategy(activation_checkpointing_policy={nn.Linear}))
    assert "auto_wrap_policy" in wrapped, changed("FSDPStrategy._activation_checkpointing_kwargs changed shape")


def test_deepspeed_config_gets_accumulation_clipping_and_precision_from_the_trainer():
    strategy = DeepSpeedStrategy(stage=2, logging_batch_size_per_gpu=8)
    strategy.precision_plugin = DeepSpeedPrecision("bf16-mixed")
    trainer = L.Trainer(accelerator="cpu", accumulate_grad_batches=4, gradient_clip_val=1.0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    config = compat.deepspeed_config_for(strategy, trainer)
    got = {k: config.get(k) for k in ("gradient_accumulation_steps", "gradient_clipping", "bf16")}
    assert got == {"gradient_accumulation_steps": 4, "gradient_clipping": 1.0, "bf16": {"enabled": True}}, changed(
        f"DeepSpeedStrategy._format_config now fills {got}")


def test_the_deepspeed_methods_the_cpu_stand_in_overrides_are_still_there():
    params = list(inspect.signature(DeepSpeedStrategy._setup_model_and_optimizer).parameters)
    assert params == ["self", "model", "optimizer", "lr_scheduler"], changed(
        f"DeepSpeedStrategy._setup_model_and_optimizer takes {params}")
    assert "self._setup_model_and_optimizer(" in inspect.getsource(DeepSpeedStrategy._setup_model_and_optimizers)
    distributed = inspect.getsource(DeepSpeedStrategy.setup_distributed)
    for step in ("_validate_device_index_selection", "reset_seed()", "self.set_world_ranks()",
                 "self._init_deepspeed_distributed()"):
        assert step in distributed, changed(f"DeepSpeedStrategy.setup_distributed no longer does {step}")
    on_cpu = compat.deepspeed_on_cpu(DeepSpeedStrategy)
    assert issubclass(on_cpu, DeepSpeedStrategy) and on_cpu.__name__ == "DeepSpeedStrategyOnCPU"


DEEPSPEED_ON_CPU = r"""
import sys

import deepspeed
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # JIT-compiled on first use, useless for one rank
from trainers.lightning_compat import deepspeed_on_cpu
from lightning.pytorch.strategies import DeepSpeedStrategy


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = torch.nn.Linear(6, 3)

    def training_step(self, batch, batch_idx):
        return self.model(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(16, 6), batch_size=4)


if __name__ == "__main__":
    strategy = deepspeed_on_cpu(DeepSpeedStrategy)(stage=2, logging_batch_size_per_gpu=4, process_group_backend="gloo")
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, precision="32-true", max_steps=2,
                        callbacks=[ModelCheckpoint(dirpath=sys.argv[1], save_last=True)], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=sys.argv[1])
    trainer.fit(Module())
    print("global_step", trainer.global_step)
"""


def test_deepspeed_on_cpu_trains_and_saves_in_lightnings_fit_loop(tmp_path):
    # In a subprocess: DeepSpeed's process group and accelerator choice are global state.
    pytest.importorskip("deepspeed")
    script = tmp_path / "fit.py"
    script.write_text(DEEPSPEED_ON_CPU)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "global_step 2" in proc.stdout, changed(
        "DeepSpeed no longer runs on the CPU through deepspeed_on_cpu's overrides") + proc.stderr[-3000:]
    assert (tmp_path / "ckpt" / "last.ckpt").is_dir()  # a DeepSpeed checkpoint directory
