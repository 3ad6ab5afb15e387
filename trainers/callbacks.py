"""Callbacks shared by every method: checkpoint cadence, the data position, throughput, image panels, retrieval
panels, clean shutdown, speed options."""

import contextlib
import functools
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from torchvision.utils import make_grid, save_image

from trainers.lightning_compat import last_saved_step, record_saved_step, save_checkpoint_now, training_position


class StepCheckpoint(ModelCheckpoint):
    """Every-N-steps checkpoints that also save the final step.

    ModelCheckpoint with ``every_n_train_steps`` skips the last steps when ``max_steps`` is not a
    multiple of N, and a rerun would then repeat them; here the end of training always saves.
    """

    def note_saved(self, step: int) -> None:
        """Another callback (preemption, the non-finite guard) saved this step: no second save at the end."""
        record_saved_step(self, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0 and last_saved_step(self) != trainer.global_step:
            save_checkpoint_now(self, trainer)
        super().on_train_end(trainer, pl_module)


class DataPosition(Callback):
    """Gives the datamodule Lightning's count of where training stands, which its checkpoint state records.

    A datamodule with a ``training_position`` attribute (``datamodules.sharded.ShardedDataModule``) gets a function
    returning (epoch, batches done in it) during fit, None outside it (``lightning_compat.training_position``).
    The datamodule cannot ask Lightning's loops itself: datamodules import neither trainers/ nor Lightning's
    private parts. Without this callback a mid-epoch checkpoint records only the epoch.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "training_position"):
            datamodule.training_position = functools.partial(training_position, trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "training_position"):
            datamodule.training_position = None  # no reference to a finished Trainer


class ThroughputLogger(Callback):
    """Images/s, step time and (on GPU) MFU, averaged over a window of steps.

    Timing is wall time between windows, so it adds no device synchronisation to the step; over a
    window the queue of asynchronous work evens out.
    """

    def __init__(self, batch_size: int, every_n_steps: int, flops_per_sample: float | None = None,
                 peak_flops: float | None = None):
        self.batch_size = batch_size
        self.every_n_steps = max(1, every_n_steps)
        self.flops_per_sample = flops_per_sample
        self.peak_flops = peak_flops
        self._t0: float | None = None
        self._step0 = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._t0 is None:
            self._t0, self._step0 = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        steps = trainer.global_step - self._step0
        if self._t0 is None or steps < self.every_n_steps:
            return
        elapsed = time.perf_counter() - self._t0
        samples = steps * self.batch_size * trainer.accumulate_grad_batches * trainer.world_size
        metrics = {"perf/images_per_sec": samples / elapsed, "perf/step_time_ms": 1000 * elapsed / steps}
        if self.flops_per_sample and self.peak_flops:
            metrics["perf/mfu"] = samples * self.flops_per_sample / elapsed / (self.peak_flops * trainer.world_size)
        pl_module.log_dict(metrics, rank_zero_only=True)
        self._t0, self._step0 = time.perf_counter(), trainer.global_step


class ImagePanelLogger(Callback):
    """Every N steps, renders ``pl_module.image_panels(images)`` for a fixed set of images to a PNG
    in ``<run_dir>/images`` and to W&B.

    The images are the first validation batch (or the first training batch when there is no
    validation), kept on the CPU so that successive panels show the same inputs.
    """

    def __init__(self, out_dir: str | Path, every_n_steps: int, mean, std, num_images: int = 8):
        self.out_dir = Path(out_dir)
        self.every_n_steps = every_n_steps
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.num_images = num_images
        self.images: torch.Tensor | None = None
        self.last_path: Path | None = None

    def _keep(self, batch) -> None:
        if self.images is None and isinstance(batch, dict) and "image" in batch:
            self.images = batch["image"][: self.num_images].detach().cpu()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._keep(batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._keep(batch)
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self.render(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.every_n_steps > 0:
            self.render(trainer, pl_module)

    @torch.no_grad()
    def render(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank runs the model (ZeRO-3 and FSDP gather sharded weights with collectives all ranks must join);
        # rank 0 writes. The images take the weights' dtype: DeepSpeed's bf16 keeps bf16 weights.
        if self.images is None:
            return
        dtype = next((p.dtype for p in pl_module.parameters() if p.is_floating_point()), torch.float32)
        was_training = pl_module.training
        pl_module.eval()
        with _full_weights(trainer):
            panels = pl_module.image_panels(self.images.to(pl_module.device, dtype))
        pl_module.train(was_training)
        if not trainer.is_global_zero:
            return
        rows = [(p.float().cpu() * self.std + self.mean).clamp(0, 1) for p in panels.values()]
        # one column per image, one row per panel kind
        grid = make_grid(torch.cat(rows), nrow=len(self.images), padding=1)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.last_path = self.out_dir / f"panels-step{trainer.global_step:06d}.png"
        save_image(grid, self.last_path)
        caption = " / ".join(panels)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("images/panels", [grid], step=trainer.global_step, caption=[caption])


class RetrievalPanelLogger(Callback):
    """After each validation, the method's ``retrieval_examples`` (images with their best captions) as a W&B image
    panel ``val/retrieval`` and as ``<out_dir>/retrieval-stepNNNNNN.png`` with the captions in a ``.txt`` beside it."""

    def __init__(self, out_dir: str | Path, mean, std):
        self.out_dir = Path(out_dir)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.last_path: Path | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        examples = getattr(pl_module, "retrieval_examples", None)
        if not trainer.is_global_zero or not examples or trainer.sanity_checking:
            return
        images = [(image.float() * self.std + self.mean).clamp(0, 1) for image, _ in examples]
        if images[0].ndim == 4:  # a video: its middle frame
            images = [frames[len(frames) // 2] for frames in images]
        captions = [" | ".join(f"{rank}. {text}" for rank, text in enumerate(texts, 1)) for _, texts in examples]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.last_path = self.out_dir / f"retrieval-step{trainer.global_step:06d}.png"
        save_image(make_grid(images, nrow=len(images), padding=1), self.last_path)
        self.last_path.with_suffix(".txt").write_text("\n".join(captions) + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("val/retrieval", images, step=trainer.global_step, caption=captions)


def _full_weights(trainer: L.Trainer):
    """FSDP keeps the root module's own weights sharded outside its forward: gather them for a direct call."""
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(trainer.strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False)
    return contextlib.nullcontext()


class DestroyProcessGroup(Callback):
    """Tear the process group down at the end of fit: an orphaned gloo group aborts the process at
    exit now and then ("terminate called without an active exception").

    ``keep_after_finished_fit``: a fit that reached max_steps keeps the group for the validation that follows,
    which tears it down instead. Torn down in between, the ranks would meet again on the same port while rank 0's
    old store may still answer, and a rank that reached it fails when it closes ("Failed to recv, got 0 bytes")."""

    def __init__(self, keep_after_finished_fit: bool = False):
        self.keep_after_finished_fit = keep_after_finished_fit

    def teardown(self, trainer, pl_module, stage):
        if stage == "fit" and self.keep_after_finished_fit and trainer.global_step >= (trainer.max_steps or 0) > 0:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


class SpeedOptions(Callback):
    """Opt-in speed-ups that change how the model runs, not what it computes.

    ``compile``: ``torch.compile`` the LightningModule's ``model`` in place (``nn.Module.compile``, so checkpoint
    keys do not change) before the first step. ``channels_last``: 4-D weights and the training images in the
    channels-last layout, which convolutions (RegNet, the ViT-C stem) run faster in on GPUs; a ViT's only
    convolution is its patch embedding. Whether either pays is measured by ``python -m recipes.benchmark
    --compile / --channels_last`` (BENCHMARKS.md)."""

    def __init__(self, compile: bool = False, channels_last: bool = False):
        self.compile = compile
        self.channels_last = channels_last

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.channels_last:
            pl_module.to(memory_format=torch.channels_last)
        if self.compile:
            model = getattr(pl_module, "model", None)
            if not isinstance(model, torch.nn.Module):
                raise ValueError(f"trainer.compile: {type(pl_module).__name__} has no `model` submodule to compile.")
            model.compile()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        image = batch.get("image") if self.channels_last and isinstance(batch, dict) else None
        if isinstance(image, torch.Tensor) and image.ndim == 4:
            batch["image"] = image.contiguous(memory_format=torch.channels_last)
