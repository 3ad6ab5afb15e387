"""The real recipe through `python -m slurm.submit` on a real (local, single-node) SLURM."""

import csv
import glob
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from datamodules.synthetic import ensure_synthetic_world
from tests.slurm.conftest import submit_and_wait

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 12


def test_mae_prepretrain_runs_as_a_two_task_slurm_job(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    # Build the synthetic world here while the submit helper checks the flags (~10 s saved: otherwise both
    # ranks build it at once on the job's two cores). Building is safe to race; the job reuses the result.
    cache = tmp_path / "cache"
    prebuild = ThreadPoolExecutor(1).submit(ensure_synthetic_world, root=str(cache))
    job = submit_and_wait(
        slurm_cluster, "recipes.mae_prepretrain",
        ["--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2", "--time", "00:15:00"],
        ["--run_dir", str(run_dir), "--trainer.max_steps", str(STEPS), "--trainer.checkpoint_every_n_steps", "4",
         "--trainer.val_every_n_steps", "1000", "--trainer.log_every_n_steps", "4",
         "--data.num_workers", "0", "--data.batch_size", "8", "--logging.image_every_n_steps", "0"],
        env={"PRISM_CACHE": str(cache)}, timeout=240)
    prebuild.result()
    log = job.log

    assert job.run_dir == run_dir
    assert job.info["Restarts"] == "0" and job.info["ExitCode"] == "0:0", job.info
    # The allocation: 1 node x 2 tasks, and the log where the submit helper said it would be.
    assert job.info["NumNodes"] == "1" and job.info["NumTasks"] == "2", job.info
    assert job.info["StdOut"] == str(run_dir / "slurm" / f"{job.job_id}.out")
    assert (run_dir / "slurm" / "submit.sbatch").is_file()
    # World size 2, both ranks started by SLURM: had Lightning launched its own processes in each of the
    # two tasks, there would be four "Initializing distributed" lines (or a clash on the port).
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log, log[-4000:]
    assert log.count("Initializing distributed:") == 2, log[-4000:]
    assert "x 2 devices" in log, log[-4000:]
    assert f"Done at step {STEPS}." in log, log[-4000:]

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS
    assert glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb")), sorted(run_dir.rglob("*"))


def test_a_requeued_job_runs_again_at_once_after_release_and_appends_to_its_log(slurm_cluster, tmp_path):
    # What preemption handling relies on: `scontrol requeue` from inside the job puts it back in the queue
    # under the same id, with --open-mode=append keeping the first attempt's output.
    script = tmp_path / "requeue.sbatch"
    script.write_text(f"""#!/bin/bash
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={tmp_path}/%j.out
echo "attempt ${{SLURM_RESTART_COUNT:-0}}"
if [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ]; then scontrol requeue "$SLURM_JOB_ID"; sleep 120; fi
""")
    job_id = slurm_cluster.run(["sbatch", "--parsable", script]).stdout.strip().split(";")[0]
    held = slurm_cluster.wait_job(job_id, "PENDING", restarts=1, timeout=60)
    assert held["Reason"] == "BeginTime", held  # SLURM holds a requeued job back for ~2 minutes ...
    slurm_cluster.release(job_id)
    done = slurm_cluster.wait_job(job_id, "COMPLETED", timeout=60)  # ... which release() cuts short
    assert done["Restarts"] == "1"
    log = (tmp_path / f"{job_id}.out").read_text()
    assert [line for line in log.splitlines() if line.startswith("attempt")] == ["attempt 0", "attempt 1"], log


def test_sam2_train_runs_as_a_two_task_slurm_job_and_validates_across_both(slurm_cluster, tmp_path):
    """SAM 2's prompt paths leave some parameters without gradient on a step: the recipe turns the DDP strategy the
    submit helper picks for two ranks into DDP with the unused-parameter search, and validation gathers the
    videos of both ranks."""
    run_dir = tmp_path / "sam2"
    job = submit_and_wait(
        slurm_cluster, "recipes.sam2_train",
        ["--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2", "--time", "00:15:00"],
        ["--run_dir", str(run_dir), "--trainer.max_steps", "4", "--trainer.val_every_n_steps", "4",
         "--trainer.checkpoint_every_n_steps", "2", "--trainer.log_every_n_steps", "1", "--trainer.cpu_threads", "1",
         "--data.num_workers", "1", "--data.batch_size", "1", "--data.num_frames", "3", "--data.val_batches", "1"],
        env={"PRISM_CACHE": str(tmp_path / "cache")}, timeout=300)
    log = job.log
    assert job.info["ExitCode"] == "0:0" and job.info["NumTasks"] == "2", job.info
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log, log[-4000:]
    assert "Strategy: DDP, unused-parameter search on" in log, log[-4000:]
    assert "Done at step 4." in log and re.search(r"^  J&F\s+\d", log, flags=re.M), log[-4000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    with open(run_dir / "csv" / "metrics.csv") as f:
        assert {row["val/videos"] for row in csv.DictReader(f) if row.get("val/videos")} == {"2.0"}
    exported = torch.load(run_dir / "export" / "sam2.1_hiera_nano.pt", map_location="cpu", weights_only=True)
    assert torch.equal(exported["model"]["no_mem_embed"], ckpt["state_dict"]["model.no_mem_embed"])
