"""Preemption on a real SLURM: SIGUSR1 -> checkpoint -> requeue -> the requeued job resumes and finishes."""

import csv
import glob
import time
from collections import Counter

import pytest
import torch

from tests.slurm.conftest import submit_recipe
from tests.wandb_offline import history, run_id

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 30


def test_sigusr1_checkpoints_requeues_and_the_job_resumes_where_it_stopped(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    job = submit_recipe(
        slurm_cluster, "recipes.mae_prepretrain",
        ["--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2", "--time", "00:15:00"],
        ["--run_dir", str(run_dir), "--trainer.max_steps", str(STEPS), "--trainer.checkpoint_every_n_steps", "8",
         "--trainer.val_every_n_steps", "1000", "--trainer.log_every_n_steps", "1", "--data.num_workers", "1",
         "--data.batch_size", "8", "--logging.image_every_n_steps", "0"],
        env={"PRISM_CACHE": str(tmp_path / "cache")})

    # Signal once the first regular checkpoint exists, so the preemption save lands between two of them.
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoints" / "step-000008.ckpt").exists():
        assert time.monotonic() < deadline, slurm_cluster.describe(job.job_id)
        info = slurm_cluster.job_info(job.job_id) or {}
        assert info.get("JobState") in ("PENDING", "RUNNING"), slurm_cluster.describe(job.job_id)
        time.sleep(0.2)
    slurm_cluster.run(["scancel", "--signal=USR1", job.job_id])  # what --signal=USR1@90 sends near the limit

    held = slurm_cluster.wait_job(job.job_id, "PENDING", restarts=1, timeout=120)
    hpc = sorted((run_dir / "checkpoints").glob("hpc_ckpt_*.ckpt"))
    assert len(hpc) == 1, slurm_cluster.describe(job.job_id)
    saved_step = torch.load(hpc[0], map_location="cpu", weights_only=True)["global_step"]
    assert 8 <= saved_step < STEPS
    slurm_cluster.release(job.job_id)  # skip SLURM's ~2 min hold of requeued jobs
    done = slurm_cluster.wait_job(job.job_id, "COMPLETED", timeout=240)
    assert done["Restarts"] == "1" and held["Reason"] == "BeginTime"

    log = slurm_cluster.job_log(job.job_id)  # both attempts, appended
    assert "Received SIGUSR1" in log and f"Requeued SLURM job {job.job_id}" in log, log[-5000:]
    assert f"Stopped by a signal at step {saved_step}" in log, log[-5000:]
    assert f"Resuming from {hpc[0]}" in log, log[-5000:]
    assert f"Done at step {STEPS}." in log, log[-5000:]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == STEPS

    # One W&B run over both attempts, and no step logged twice.
    files = sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(files) == 2, files
    assert {run_id(f) for f in files} == {(run_dir / "wandb" / "run_id").read_text().strip()}
    steps = [row["trainer/global_step"] for f in files for row in history(f) if "train/loss" in row]
    assert [s for s, n in Counter(steps).items() if n > 1] == []
    assert sorted(steps) == list(range(STEPS)), steps  # every step, once (logged at global_step - 1)
    # the CSV log of both attempts tells the same
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        csv_steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert sorted(csv_steps) == list(range(STEPS)), csv_steps
