"""The SLURM allocation a training process runs in: reading it, checking the Trainer against it, requeueing.

Lightning takes ranks from SLURM when the job was started with srun (``SLURMEnvironment``). Its own checks
catch some mismatches, but not a script that starts one process where the allocation has several tasks
(every process waits for ranks that never come: a hang, not an error). ``check_allocation`` turns every
mismatch into an error at start that says what to change.
"""

import os
import re
import subprocess
from dataclasses import dataclass

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment


class AllocationMismatchError(ValueError):
    """The Trainer's devices/num_nodes disagree with the SLURM allocation."""


@dataclass(frozen=True)
class SlurmAllocation:
    job_id: str
    """The job to requeue: ``<array job>_<task>`` for array jobs."""
    num_tasks: int
    tasks_per_node: int | None
    num_nodes: int
    in_step: bool
    """True inside an srun step (one process per task); False in the batch script itself."""
    restart_count: int


def _tasks_per_node(env: dict[str, str]) -> int | None:
    if env.get("SLURM_NTASKS_PER_NODE"):
        return int(env["SLURM_NTASKS_PER_NODE"])
    # SLURM_TASKS_PER_NODE is "8(x4)" or "8,8" or "2": uniform counts only
    counts = set()
    for part in env.get("SLURM_TASKS_PER_NODE", "").split(","):
        match = re.fullmatch(r"(\d+)(\(x\d+\))?", part.strip())
        if match:
            counts.add(int(match.group(1)))
    return counts.pop() if len(counts) == 1 else None


def slurm_allocation(env: dict[str, str] | None = None) -> SlurmAllocation | None:
    """The allocation, when Lightning would treat this process as a SLURM task; else None."""
    env = dict(os.environ if env is None else env)
    if "SLURM_JOB_ID" not in env or "SLURM_NTASKS" not in env:
        return None
    if env.get("SLURM_JOB_NAME") in ("bash", "interactive"):  # Lightning's rule: an interactive shell
        return None
    job_id = env["SLURM_JOB_ID"]
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return SlurmAllocation(
        job_id=job_id,
        num_tasks=int(env["SLURM_NTASKS"]),
        tasks_per_node=_tasks_per_node(env),
        num_nodes=int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or 1),
        in_step="SLURM_STEP_ID" in env or "SLURM_STEPID" in env,
        restart_count=int(env.get("SLURM_RESTART_COUNT", 0)),
    )


def check_allocation(devices: int | str, num_nodes: int, env: dict[str, str] | None = None) -> int | str:
    """Raise if the Trainer would not match the allocation; returns the devices value to use.

    ``devices="auto"`` under SLURM becomes the tasks per node: with one task per GPU a task may see one
    GPU or all of them, and only the task count is what Lightning checks ranks against.
    """
    alloc = slurm_allocation(env)
    if alloc is None:
        return devices
    fix = ("Submit with `python -m slurm.submit` (it passes both from the allocation), or pass "
           "--trainer.devices $SLURM_NTASKS_PER_NODE --trainer.num_nodes $SLURM_NNODES.")
    if not alloc.in_step and alloc.num_tasks > 1:
        raise AllocationMismatchError(
            f"This process runs in SLURM job {alloc.job_id}, which has {alloc.num_tasks} tasks, but it was not started "
            "by srun: it would wait forever for the other ranks. Launch the training command with "
            "`srun python -m recipes.<name> ...` inside the sbatch script (one task per GPU)."
        )
    if alloc.tasks_per_node is None:
        raise AllocationMismatchError(
            f"SLURM job {alloc.job_id} has {alloc.num_tasks} tasks spread unevenly over {alloc.num_nodes} node(s); "
            "Lightning needs the same number of tasks on every node. Request them with --ntasks-per-node."
        )
    problems = []
    if devices != "auto" and int(devices) != alloc.tasks_per_node:
        problems.append(f"--trainer.devices is {devices} but the job has {alloc.tasks_per_node} task(s) per node")
    if num_nodes != alloc.num_nodes:
        problems.append(f"--trainer.num_nodes is {num_nodes} but the job has {alloc.num_nodes} node(s)")
    if problems:
        raise AllocationMismatchError(f"SLURM job {alloc.job_id}: " + "; ".join(problems) + ". " + fix)
    return alloc.tasks_per_node if devices == "auto" else devices


def slurm_plugins() -> list:
    """Lightning's SLURM environment with its own requeue handler off: ``PreemptionHandler`` does it at a
    step boundary, where every rank can take part (Lightning's saves inside the signal handler)."""
    if slurm_allocation() is None or not SLURMEnvironment.detect():
        return []
    return [SLURMEnvironment(auto_requeue=False)]


def requeue(job_id: str) -> tuple[bool, str]:
    """``scontrol requeue``: the job goes back to the queue and reruns the same script."""
    if not re.fullmatch(r"[0-9]+(_[0-9]+)?", job_id):
        return False, f"not a SLURM job id: {job_id!r}"
    try:
        proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return False, f"scontrol requeue {job_id} could not run ({err}); is scontrol on PATH inside the job?"
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


def max_over_ranks(trainer, value: int | torch.Tensor) -> int:
    """The largest of every rank's value, known to all ranks: how ranks agree on a stop or a skip. One tiny
    all-reduce and one device-to-host read."""
    tensor = torch.as_tensor(value, device=trainer.strategy.root_device).to(torch.int32).reshape(1)
    if trainer.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return int(tensor.item())


def max_over_ranks_on_device(trainer, value: torch.Tensor) -> torch.Tensor:
    """The largest of every rank's ``value``, left on the device: the all-reduce is queued on the stream and
    nothing waits for it, so a step can use the agreed value without a host-device synchronisation."""
    if trainer.world_size > 1 and torch.distributed.is_initialized():
        value = value.clone()
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return value
