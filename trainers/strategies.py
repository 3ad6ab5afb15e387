"""Distributed strategies by name: DDP, DeepSpeed ZeRO and FSDP, set up for Prism's loaders and checkpoints.

``build_strategy(name, ...)`` is what ``trainers.build.build_trainer`` passes to ``L.Trainer(strategy=...)``.
It fills in what Lightning cannot know (our loaders are pre-batched, so the micro-batch size) and refuses
settings that would fail later, deep inside a job, with a message that says what to change now.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info
from timm.models.eva import EvaBlock
from timm.models.vision_transformer import Block
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from trainers.checkpoint import remove_complete_marker, write_complete_marker

# name -> (ZeRO stage, optimizer state on the CPU, parameters on the CPU); the names Lightning registers
DEEPSPEED = {
    "deepspeed_stage_1": (1, False, False),
    "deepspeed_stage_2": (2, False, False),
    "deepspeed_stage_2_offload": (2, True, False),
    "deepspeed_stage_3": (3, False, False),
    "deepspeed_stage_3_offload": (3, True, True),
}
LIGHTNING_BUILT = ("auto",)
DDP = ("ddp", "ddp_find_unused_parameters_true")
NAMES = (*LIGHTNING_BUILT, *DDP, *DEEPSPEED, "fsdp")

# DeepSpeed runs its own mixed precision: "bf16-mixed" turns on its bf16 mode and "16-mixed" its fp16 mode
# with loss scaling (not torch AMP, PL#18016). Lightning 2.6 also lets "bf16-true"/"16-true" through, but
# DeepSpeed then does exactly what it does for "-mixed" (bf16 weights, fp32 master copy in the optimizer),
# so the name would promise pure low-precision training that does not happen; older Lightning refused them
# (Lightning-AI/litgpt#116).
DEEPSPEED_PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")
# Lightning's FSDPPrecision takes these; "-true" is real there (sharded low-precision weights, no fp32 copy)
FSDP_PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")
# The transformer block of models/vit.py and models/mae.py: one FSDP unit each. Add the block class of
# other model families here when they train under FSDP.
FSDP_WRAP_CLASSES = frozenset({Block, EvaBlock, LlamaDecoderLayer})
"""FSDP units: the transformer blocks of timm's ViTs, of PE's towers (timm Eva) and of PLM's decoder (Llama), one unit
per block as perception_models shards PLM (apps/plm: fully_shard per layer)."""

_PRECISION_WORDS = {
    "32-true": "fp32",
    "bf16-mixed": "bf16-mixed",
    "16-mixed": "fp16-mixed",
    "bf16-true": "bf16 (no fp32 weights)",
    "16-true": "fp16 (no fp32 weights)",
    "64-true": "fp64",
}
_DEEPSPEED_PRECISION_WORDS = {
    "32-true": "fp32",
    "bf16-mixed": "DeepSpeed bf16 (bf16 weights and activations, fp32 master weights in the optimizer)",
    "16-mixed": "DeepSpeed fp16 (fp16 weights, dynamic loss scaling, fp32 master weights)",
}


class PrismDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeed whose checkpoint directories are either complete or visibly not.

    Every rank writes its own shard files into a DeepSpeed checkpoint directory, so the directory cannot
    be renamed into place the way a single file is (trainers/checkpoint.py). Instead it carries a marker,
    ``prism_complete.json``, written only after every rank has finished: rank 0 removes an old marker
    (when ``last.ckpt`` is overwritten), all ranks wait for that, DeepSpeed writes, all ranks wait again,
    then rank 0 writes the marker atomically. A kill at any moment leaves either the marker over a
    complete directory or no marker, and ``find_resume_checkpoint`` never resumes from the latter.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        path = Path(self.broadcast(str(filepath)))  # every rank writes into rank 0's directory
        if self.is_global_zero:
            remove_complete_marker(path)
        self.barrier("prism_checkpoint_unmarked")  # no rank may write into a directory still marked complete
        super().save_checkpoint(checkpoint, path, storage_options)
        if self.local_rank == 0:
            # DeepSpeed's torch.save does not fsync; without this a node crash could keep the marker
            # (fsynced below) but lose shard data still in the page cache. One sync per node covers all
            # of that node's ranks.
            os.sync()
        self.barrier("prism_checkpoint_written")
        if self.is_global_zero:
            stage = (self.config or {}).get("zero_optimization", {}).get("stage")
            write_complete_marker(path, {
                "global_step": int(checkpoint.get("global_step", 0)),
                "epoch": int(checkpoint.get("epoch", 0)),
                "format": "deepspeed",
                "zero_stage": stage,
                "world_size": self.world_size,
                "tag": "checkpoint",  # the tag Lightning's DeepSpeedStrategy.save_checkpoint passes
            })

    def remove_checkpoint(self, filepath) -> None:
        if not self.is_global_zero:
            return
        path = Path(filepath)
        if path.is_dir():
            remove_complete_marker(path)  # first: a kill halfway through the removal leaves it visibly incomplete
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def describe_strategy(name: str, precision: str, batch_size_per_device: int, accumulate_grad_batches: int = 1) -> str:
    """One line that says what the strategy does, for the start-of-run printout."""
    batch = f"micro-batch {batch_size_per_device} x {accumulate_grad_batches} accumulation per device"
    if name in DEEPSPEED:
        stage, offload_optimizer, offload_params = DEEPSPEED[name]
        parts = [f"DeepSpeed ZeRO-{stage}"]
        if offload_optimizer:
            parts.append("optimizer state and step on the CPU")
        if offload_params:
            parts.append("parameters offloaded to the CPU")
        parts += [_DEEPSPEED_PRECISION_WORDS.get(precision, precision), batch]
        return ", ".join(parts)
    words = _PRECISION_WORDS.get(precision, precision)
    if name == "fsdp":
        return (f"FSDP FULL_SHARD, one unit per transformer block, full-state-dict checkpoints (one file), "
                f"{words}, {batch}")
    if name in DDP:
        unused = ", unused-parameter search on" if name.endswith("_true") else ""
        return f"DDP{unused}, {words}, {batch}"
    return f"Lightning's choice (one device: plain; several: DDP), {words}, {batch}"


def _deepspeed(name: str, precision: str, batch_size_per_device: int) -> "PrismDeepSpeedStrategy":
    if precision not in DEEPSPEED_PRECISIONS:
        raise ValueError(
            f"trainer.precision={precision!r} does not work with {name}: DeepSpeed takes one of "
            f"{', '.join(DEEPSPEED_PRECISIONS)}. Use bf16-mixed for DeepSpeed's bf16 mode (bf16 weights and "
            "activations, fp32 master weights in the optimizer)."
        )
    stage, offload_optimizer, offload_params = DEEPSPEED[name]
    strategy = PrismDeepSpeedStrategy(stage=stage, offload_optimizer=offload_optimizer,
                                      offload_parameters=offload_params,
                                      logging_batch_size_per_gpu=batch_size_per_device)
    if offload_optimizer:
        # Our LightningModules build torch's AdamW; ZeRO-Offload refuses any optimizer but its own CPU Adam
        # unless told otherwise. torch's AdamW on the CPU is correct, only slower than DeepSpeedCPUAdam.
        strategy.config["zero_force_ds_cpu_optimizer"] = False
    return strategy


def _fsdp(precision: str, gradient_clip_val: float | None) -> FSDPStrategy:
    if precision not in FSDP_PRECISIONS:
        raise ValueError(f"trainer.precision={precision!r} does not work with fsdp; choose one of "
                         f"{', '.join(FSDP_PRECISIONS)}.")
    if gradient_clip_val:
        # Lightning's FSDPPrecision.clip_grad_by_norm raises at the first step: clipping a sharded model
        # needs the root FSDP module's clip_grad_norm_, which the precision plugin cannot reach.
        raise ValueError(
            f"trainer.gradient_clip_val={gradient_clip_val} does not work with fsdp in Lightning 2.6 (norm "
            "clipping of sharded gradients is not implemented there). Unset it, or use deepspeed_stage_3, "
            "which shards the same way and clips natively."
        )
    return FSDPStrategy(auto_wrap_policy=set(FSDP_WRAP_CLASSES), sharding_strategy="FULL_SHARD",
                        state_dict_type="full", activation_checkpointing_policy=None)


def build_strategy(name: str, *, batch_size_per_device: int, precision: str, accumulate_grad_batches: int = 1,
                   gradient_clip_val: float | None = None) -> str | Strategy:
    """The ``strategy`` argument of ``L.Trainer`` for a strategy name of ``trainers.build.STRATEGIES``.

    - ``auto``: the name; Lightning picks a plain single-device strategy or DDP.
    - ``ddp``, ``ddp_find_unused_parameters_true``: a ``DDPStrategy`` with ``gradient_as_bucket_view``, so
      that the gradients live in DDP's communication buckets instead of beside them: one model-sized fp32
      buffer less per GPU and one copy less per step (torch DDP docs); nothing else differs from the name.
    - ``deepspeed_*``: a :class:`PrismDeepSpeedStrategy` (marked checkpoint directories) with the
      micro-batch size given (PL#19460: Lightning reads it from ``DataLoader.batch_size``, which is None
      for our pre-batched loaders) and no ``gradient_accumulation_steps`` (Lightning sets it from
      ``accumulate_grad_batches`` and refuses a config that has it, PL#19891).
    - ``fsdp``: an ``FSDPStrategy``, FULL_SHARD, one unit per timm ``Block``, full state dicts, no activation
      checkpointing. Full rather than sharded state dicts: the checkpoint is an ordinary single file that
      rank 0 writes through ``AtomicCheckpointIO`` (atomic by rename), that ``find_resume_checkpoint`` and
      the stage handoff read without any distributed code, and that resumes at any world size. The price:
      each save gathers the full weights and AdamW moments in rank 0's CPU memory (about 12 bytes/param,
      24 GB for ViT-2B) while the other ranks wait. Beyond a few billion parameters, sharded (a DCP
      directory per save) is the better choice and would need the completeness marker that DeepSpeed
      directories get here.
    """
    if name not in NAMES:
        raise ValueError(f"Unknown strategy {name!r}. Choose one of: {', '.join(NAMES)}.")
    if batch_size_per_device < 1 or accumulate_grad_batches < 1:
        raise ValueError(f"batch_size_per_device ({batch_size_per_device}) and accumulate_grad_batches "
                         f"({accumulate_grad_batches}) must both be >= 1.")

    if name in DEEPSPEED:
        strategy: str | Strategy = _deepspeed(name, precision, batch_size_per_device)
    elif name == "fsdp":
        strategy = _fsdp(precision, gradient_clip_val)
    elif name in DDP:
        strategy = DDPStrategy(find_unused_parameters=name.endswith("_true"), gradient_as_bucket_view=True)
    else:
        strategy = name
    rank_zero_info(f"Strategy: {describe_strategy(name, precision, batch_size_per_device, accumulate_grad_batches)}")
    return strategy
