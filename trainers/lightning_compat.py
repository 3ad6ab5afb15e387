"""Every place Prism reaches into Lightning's private parts, in one module.

Lightning's public API does not cover a few things Prism needs: switching off a per-step host-device sync,
saving a step's checkpoint from our own hook, keeping metrics.csv across attempts, knowing which steps' metrics
reach the loggers, telling the datamodule where training stands. Each function below names the Lightning file and
function it depends on, and tests/trainers/test_lightning_compat.py checks each one against the installed
Lightning on a real Trainer, so that a release which changes one fails there, naming the version and what moved,
rather than inside a job. At run time a missing attribute raises ``LightningChanged`` with the same information.

No other module touches an underscored Lightning attribute; tests that need one call the readers at the end.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import lightning
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn

TESTED_LIGHTNING = ("2.5", "2.6")
"""The minor releases the functions here were checked against (2.5.6 and 2.6.6); pyproject.toml pins
``lightning>=2.5,<2.7`` to match."""


class LightningChanged(RuntimeError):
    """A private part of Lightning that Prism relies on is not what it was in the tested releases."""


def changed(what: str) -> str:
    """The message for a private part that moved: the installed version, the tested ones, what to do."""
    return (f"Lightning {lightning.__version__} (Prism checked {' and '.join(TESTED_LIGHTNING)}): {what}. "
            "Adapt trainers/lightning_compat.py; tests/trainers/test_lightning_compat.py shows what moved.")


def _private(obj: Any, name: str, where: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise LightningChanged(changed(f"{type(obj).__name__}.{name} is gone (read by {where})")) from None


# ---- the training loop ---------------------------------------------------------------------------------

def _skip_sigterm_broadcast() -> None:
    """Stands in for Lightning's per-step SIGTERM broadcast (see ``disable_sigterm_broadcast``)."""


def disable_sigterm_broadcast(trainer: Trainer) -> bool:
    """Stop Lightning broadcasting its SIGTERM flag from rank 0 at every step; True when it was switched off.

    lightning/pytorch/loops/training_epoch_loop.py:_TrainingEpochLoop.advance calls
    ``self._broadcast_sigterm_tensor()`` before each batch under DDP (Lightning >= 2.5), a broadcast plus a
    ``.item()``: one host-device sync per step. Call only where another handler owns SIGTERM (Prism's
    PreemptionHandler), since the flag it broadcasts is then always 0. Replaced on the instance, so other
    Trainers keep Lightning's behaviour.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    if not hasattr(epoch_loop, "_broadcast_sigterm_tensor"):
        warnings.warn(changed("_TrainingEpochLoop._broadcast_sigterm_tensor is gone, so its per-step SIGTERM "
                              "broadcast could not be switched off (a host-device sync per step if it remains)"),
                      stacklevel=2)
        return False
    epoch_loop._broadcast_sigterm_tensor = _skip_sigterm_broadcast
    return True


def sigterm_broadcast_disabled(trainer: Trainer) -> bool:
    """Whether ``disable_sigterm_broadcast`` is in effect on this Trainer."""
    return vars(trainer.fit_loop.epoch_loop).get("_broadcast_sigterm_tensor") is _skip_sigterm_broadcast


def training_position(trainer: Trainer) -> tuple[int, int] | None:
    """(epoch, batches done in it) of the fit in progress (or where the last fit ended), from Lightning's own loop
    counters; None before any fit, during its sanity check and after another stage (validate, test) started.

    lightning/pytorch/loops/fit_loop.py:_FitLoop.on_advance_end counts an epoch ``processed`` once its batches
    are done, before the epoch-end hooks that save checkpoints, and passes that count to ``set_epoch``
    (_FitLoop.on_advance_start): it names the epoch a resumed run trains next, with 0 batches done. Inside an
    epoch (``processed < started``) the batches done are
    lightning/pytorch/loops/training_epoch_loop.py:_TrainingEpochLoop.batch_progress ``processed``, which
    includes the batch whose step has just been applied (a save in on_train_batch_end) and stays put while a
    mid-epoch validation runs.
    """
    if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
        return None
    fit_loop = trainer.fit_loop
    epochs = _private(fit_loop, "epoch_progress", "training_position").current
    if epochs.processed >= epochs.started:  # between epochs: the next one starts from its first batch
        return epochs.processed, 0
    batches = _private(fit_loop.epoch_loop, "batch_progress", "training_position").current
    return epochs.processed, batches.processed


def logs_this_step(trainer: Trainer) -> bool:
    """Whether what the module logs in the coming (or current) training step reaches the loggers.

    lightning/pytorch/trainer/connectors/logger_connector/logger_connector.py:_LoggerConnector.should_update_logs
    is the test Lightning itself applies before it hands step metrics to the loggers (every
    ``log_every_n_steps`` optimizer steps, and when the run is stopping)."""
    return _private(trainer, "_logger_connector", "logs_this_step").should_update_logs


# ---- checkpoints ---------------------------------------------------------------------------------------

def last_saved_step(callback: ModelCheckpoint) -> int:
    """The global step of the callback's latest save (0 before any): ``ModelCheckpoint._last_global_step_saved``,
    set by lightning/pytorch/callbacks/model_checkpoint.py:ModelCheckpoint._save_checkpoint."""
    return _private(callback, "_last_global_step_saved", "last_saved_step")


def record_saved_step(callback: ModelCheckpoint, step: int) -> None:
    """Tell the callback that ``step`` is saved already (by another callback): ModelCheckpoint then skips its
    own save at that step (ModelCheckpoint._should_skip_saving_checkpoint compares it with the global step)."""
    _private(callback, "_last_global_step_saved", "record_saved_step")
    callback._last_global_step_saved = step


def save_checkpoint_now(callback: ModelCheckpoint, trainer: Trainer) -> None:
    """Save the top-k and ``last`` checkpoints for the current step, as
    lightning/pytorch/callbacks/model_checkpoint.py:ModelCheckpoint.on_train_batch_end does when the step is
    one of its every-N steps (``_monitor_candidates``, then ``_save_topk_checkpoint``, ``_save_last_checkpoint``)."""
    candidates = _private(callback, "_monitor_candidates", "save_checkpoint_now")(trainer)
    _private(callback, "_save_topk_checkpoint", "save_checkpoint_now")(trainer, candidates)
    _private(callback, "_save_last_checkpoint", "save_checkpoint_now")(trainer, candidates)


# ---- loggers -------------------------------------------------------------------------------------------

def wandb_run_started(logger: WandbLogger) -> bool:
    """Whether the logger has a W&B run; reading ``logger.experiment`` would start one.
    lightning/pytorch/loggers/wandb.py:WandbLogger.experiment creates it lazily into ``_experiment``."""
    return _private(logger, "_experiment", "wandb_run_started") is not None


class KeepingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer without its start-up deletion of an existing metrics.csv.

    lightning/fabric/loggers/csv_logs.py:_ExperimentWriter.__init__ calls ``_check_log_dir_exists``, which
    deletes the file when the directory holds anything; here it calls ``continue_file`` instead.
    """

    def _check_log_dir_exists(self) -> None:
        self.continue_file()

    def continue_file(self) -> None:
        """Called where Lightning would delete an existing metrics.csv; the file is left as it is."""


def csv_logger_writer(logger: CSVLogger, make: Callable[[str], ExperimentWriter]) -> ExperimentWriter:
    """The logger's writer, made by ``make(log_dir)`` on first use instead of Lightning's ExperimentWriter.

    lightning/pytorch/loggers/csv_logs.py:CSVLogger.experiment builds its writer into ``_experiment``, which
    ``CSVLogger.finalize`` also reads (it saves only when a writer exists), so ours must live there too.
    """
    if _private(logger, "_experiment", "csv_logger_writer") is None:
        get_filesystem(logger.root_dir).makedirs(logger.root_dir, exist_ok=True)
        logger._experiment = make(logger.log_dir)
    return logger._experiment


# ---- threads -------------------------------------------------------------------------------------------

def keep_threads_through_launchers(threads: int) -> None:
    """Make Lightning's process launchers keep ``threads`` intra-op threads.

    lightning/fabric/utilities/distributed.py:_set_num_threads_if_needed, called by the DDP launchers
    (lightning/pytorch/strategies/launchers/subprocess_script.py:_SubprocessScriptLauncher.launch and
    multiprocessing.py:_MultiProcessingLauncher.launch) inside ``fit``, resets torch to cores // processes
    unless OMP_NUM_THREADS is set; the processes it starts inherit the variable.
    """
    os.environ["OMP_NUM_THREADS"] = str(threads)


# ---- strategies: what Lightning made of our settings (tests, a CPU stand-in for DeepSpeed) ---------------

def ddp_kwargs(strategy: DDPStrategy) -> dict:
    """What DDPStrategy passes to DistributedDataParallel
    (lightning/pytorch/strategies/ddp.py:DDPStrategy._setup_model)."""
    return dict(_private(strategy, "_ddp_kwargs", "ddp_kwargs"))


def fsdp_state_dict_type(strategy: FSDPStrategy) -> str:
    """How FSDPStrategy saves, "full" or "sharded"
    (lightning/pytorch/strategies/fsdp.py:FSDPStrategy.save_checkpoint)."""
    return _private(strategy, "_state_dict_type", "fsdp_state_dict_type")


def fsdp_activation_checkpointing(strategy: FSDPStrategy) -> dict:
    """The activation-checkpointing wrapper settings FSDPStrategy._setup_model applies ({} for none)."""
    return dict(_private(strategy, "_activation_checkpointing_kwargs", "fsdp_activation_checkpointing") or {})


def deepspeed_config_for(strategy: DeepSpeedStrategy, trainer: Trainer) -> dict:
    """The DeepSpeed config as Lightning completes it at setup for ``trainer`` (accumulation, clipping, the
    precision plugin's fp16/bf16 section): lightning/pytorch/strategies/deepspeed.py:DeepSpeedStrategy._format_config,
    run without CUDA. It raises where Lightning would (a config that sets gradient_accumulation_steps, PL#19891)."""
    stand_in = LightningModule()
    stand_in.trainer = trainer  # _format_config reads the accumulation and clipping through the module
    strategy.connect(stand_in)
    _private(strategy, "_format_config", "deepspeed_config_for")()
    return strategy.config


def checkpoint_every_n_train_steps(callback: ModelCheckpoint) -> int:
    """ModelCheckpoint's step cadence (``_every_n_train_steps``, read by ModelCheckpoint.on_train_batch_end)."""
    return _private(callback, "_every_n_train_steps", "checkpoint_every_n_train_steps")


def deepspeed_on_cpu(strategy_cls: type[DeepSpeedStrategy]) -> type[DeepSpeedStrategy]:
    """Test-only: ``strategy_cls`` made to run on the CPU (gloo, 32-true), which Lightning refuses.

    Three overrides of lightning/pytorch/strategies/deepspeed.py:DeepSpeedStrategy: ``setup_environment`` is
    DDP's (Lightning's raises without CUDA); ``setup_distributed`` skips ``_validate_device_index_selection``
    (a CPU device has no index) and keeps the seed reset, ranks and ``_init_deepspeed_distributed``;
    ``_setup_model_and_optimizer`` gives ``deepspeed.initialize`` the local rank as device rank (Lightning passes
    ``root_device.index``, None on the CPU, a TypeError inside the engine).
    """
    import argparse

    from lightning.fabric.utilities.seed import reset_seed

    init_distributed = _private(strategy_cls, "_init_deepspeed_distributed", "deepspeed_on_cpu")
    _private(strategy_cls, "_setup_model_and_optimizer", "deepspeed_on_cpu")

    class OnCPU(strategy_cls):
        def setup_environment(self) -> None:
            DDPStrategy.setup_environment(self)

        def setup_distributed(self) -> None:
            reset_seed()
            self.set_world_ranks()
            init_distributed(self)

        def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
            import deepspeed

            engine, optimizer, _, _ = deepspeed.initialize(
                args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
                model_parameters=[p for p in model.parameters() if p.requires_grad], optimizer=optimizer,
                lr_scheduler=lr_scheduler, dist_init_required=False)
            return engine, optimizer

    OnCPU.__name__ = OnCPU.__qualname__ = f"{strategy_cls.__name__}OnCPU"
    return OnCPU
