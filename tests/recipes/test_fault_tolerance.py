"""Fault tolerance of a real training process: SIGKILL at random moments, SIGTERM, non-finite losses.

The reference for "nothing lost" is an uninterrupted run of the same command: an interrupted-and-resumed
run must end with exactly the same weights and optimizer state (CPU, deterministic settings), which needs
the data stream's position, every rank's random state, the optimizer and the schedule all restored.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainers.checkpoint import find_resume_checkpoint

from .conftest import ROOT

pytestmark = pytest.mark.slow

STEPS = 12
ARGS = (
    "--trainer.max_steps", str(STEPS), "--trainer.checkpoint_every_n_steps", "2", "--trainer.val_every_n_steps", "4",
    "--data.num_workers", "2", "--data.batch_size", "8", "--data.batches_per_epoch", "5", "--data.val_batches", "1",
    "--trainer.deterministic", "true", "--logging.image_every_n_steps", "0", "--trainer.log_every_n_steps", "1",
)


def _env(prism_cache) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "PRISM_CACHE": str(prism_cache), "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


def _start(run_dir: Path, prism_cache, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "recipes.mae_prepretrain", "--run_dir", str(run_dir), *ARGS, *extra],
        cwd=ROOT, env=_env(prism_cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group: the kill reaches the loader workers and W&B too
    )


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-6000:]
    return out


def _state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _assert_same_training_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for state_a, state_b in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), key


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, prism_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    _finish(_start(run_dir, prism_cache))
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run) -> dict:
    return _state(uninterrupted_run)


def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(tmp_path, prism_cache, uninterrupted):
    run_dir = tmp_path / "run"
    moments = random.Random(1234)
    kills, resumed_from = 0, []
    while True:
        resume = find_resume_checkpoint(run_dir)
        if resume is not None:  # what the next start will pick: it must load completely
            state = torch.load(resume, map_location="cpu", weights_only=True)
            resumed_from.append(state["global_step"])
        proc = _start(run_dir, prism_cache)
        if kills == 4:
            out = _finish(proc)
            break
        time.sleep(moments.uniform(4.0, 12.0))
        if proc.poll() is not None:  # finished before the kill: start over to get the kills in
            out = _finish(proc)
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
    assert "Done at step 12" in out
    assert resumed_from == sorted(resumed_from)  # never back to an older checkpoint
    _assert_same_training_state(_state(run_dir), uninterrupted)


def test_sigterm_saves_and_exits_cleanly_then_resumes_exactly(tmp_path, prism_cache, uninterrupted):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, prism_cache)
    deadline = time.monotonic() + 240
    # SIGTERM once step 4 is saved: the run is well inside its 12 steps
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "checkpoints" / "step-000004.ckpt").exists():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc)
    assert "Stopped by a signal at step" in out and "Done at step" not in out
    hpc = list((run_dir / "checkpoints").glob("hpc_ckpt_*.ckpt"))
    assert len(hpc) == 1
    saved_step = torch.load(hpc[0], map_location="cpu", weights_only=True)["global_step"]
    assert 0 < saved_step < STEPS
    out = _finish(_start(run_dir, prism_cache))
    assert f"Resuming from {hpc[0]}" in out
    assert "Done at step 12" in out
    _assert_same_training_state(_state(run_dir), uninterrupted)


def test_a_run_killed_between_its_final_save_and_last_ends_with_an_up_to_date_last(tmp_path, prism_cache,
                                                                                    uninterrupted_run, uninterrupted):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted_run, run_dir)
    ckpts = run_dir / "checkpoints"
    # the kill landed after step-000012.ckpt was written and before last.ckpt was: last is a save behind
    shutil.copyfile(ckpts / "step-000008.ckpt", ckpts / "last.ckpt")
    out = _finish(_start(run_dir, prism_cache))
    assert f"Resuming from {ckpts / 'step-000012.ckpt'}" in out and "Done at step 12" in out
    _assert_same_training_state(_state(run_dir), uninterrupted)
