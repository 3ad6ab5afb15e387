"""MAE pretraining under DeepSpeed ZeRO-1/2/3 and FSDP on one GPU: train, resume, hand the weights on.

Needs CUDA (Lightning refuses both strategies on the CPU); skipped elsewhere by the ``gpu`` marker.
"""

import re

import pytest
import torch

import models
from trainers.checkpoint import checkpoint_step, find_resume_checkpoint, read_complete_marker
from trainers.handoff import load_state_dict

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

TINY_GPU = ["--data.batch_size", "8", "--data.num_workers", "1", "--data.image_size", "64",
            "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision", "bf16-mixed",
            "--trainer.checkpoint_every_n_steps", "2", "--trainer.val_every_n_steps", "2", "--data.val_batches", "1",
            "--trainer.log_every_n_steps", "1", "--logging.image_every_n_steps", "0", "--optim.warmup_steps", "1"]


@pytest.mark.parametrize("strategy", ["deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3", "fsdp"])
def test_train_resume_and_hand_off(run_recipe, tmp_path, strategy):
    run_dir = tmp_path / strategy
    args = ["--run_dir", str(run_dir), "--trainer.strategy", strategy, *TINY_GPU]
    run_recipe("recipes.mae_prepretrain", *args, "--trainer.max_steps", "4")

    last = run_dir / "checkpoints" / "last.ckpt"
    if strategy.startswith("deepspeed"):
        # a DeepSpeed directory, marked complete by PrismDeepSpeedStrategy after every rank wrote
        assert last.is_dir() and read_complete_marker(last)["global_step"] == 4
        assert read_complete_marker(last)["zero_stage"] == int(strategy[-1])
    else:
        assert last.is_file()  # FSDP with full state dicts: one file, written atomically by rank 0
    assert checkpoint_step(last) == 4
    assert find_resume_checkpoint(run_dir) in {last, run_dir / "checkpoints" / "step-000004.ckpt"}

    # same command, more steps: resumes at step 4 instead of starting over
    second = run_recipe("recipes.mae_prepretrain", *args, "--trainer.max_steps", "6")
    assert re.search(r"Resuming from \S+(last|step-000004)\.ckpt", second.stdout + second.stderr)
    assert checkpoint_step(last) == 6

    # the next stage: fp32 weights (DeepSpeed's master copy, not the bf16 compute copy), strict load
    weights = load_state_dict(run_dir, prefix="model.")
    assert all(t.dtype == torch.float32 for t in weights.values() if t.is_floating_point())
    mae = models.create("mae_vit_tiny_patch8", img_size=64)
    mae.load_state_dict(weights, strict=True)
    at_step4 = load_state_dict(run_dir / "checkpoints" / "step-000004.ckpt", prefix="model.")
    assert sorted(at_step4) == sorted(weights)
    assert not torch.equal(weights["encoder.blocks.0.attn.qkv.weight"], at_step4["encoder.blocks.0.attn.qkv.weight"])
