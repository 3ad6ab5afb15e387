"""How many intra-op threads a training process runs with, so that its step and its loader workers share the cores.

torch starts one intra-op (OpenMP) thread per core it may run on, as if the process had the machine to itself.
With loader workers beside it, each decoding on a core of its own, the cores are oversubscribed: an OpenMP
parallel region ends at a barrier that waits for its slowest thread, and a thread the OS has parked behind a
worker stalls every op of the step. ``python -m recipes.mae_prepretrain`` (2 loader workers) on a 2-core machine
shared with other jobs: 0.52-0.63 s per step with 1 thread, 2.5-7.2 s with torch's default of 2. So the step
gets the cores its process is entitled to minus one per loader worker, and never fewer than one:

    threads = max(1, cores_per_process - num_workers)

``cores_per_process`` is SLURM's ``--cpus-per-task`` inside a SLURM task, else the cores this process may run
on (``os.sched_getaffinity``) divided by the processes per node. Reserving a whole core per worker is the safe
end: a worker that waits on a full prefetch queue leaves its core idle, but oversubscription costs far more than
that idle core. Other jobs on the machine oversubscribe it just the same and cannot be seen from here (the same
recipe without workers: 0.7-1.7 s per step with 1 thread, 4.3-6.6 s with 2); ``--trainer.cpu_threads 1`` is the
setting for a shared machine. The loader workers themselves run one thread each:
torch/utils/data/_utils/worker.py:_worker_loop calls ``torch.set_num_threads(1)`` in every worker.

GPU runs get the same share. Their training process does little on the CPU, so a few threads cost nothing,
while torch's default of one thread per core in each of 8 ranks spins 8 threads per core beside the workers
whenever a CPU op runs; torchrun sets OMP_NUM_THREADS=1 for the same reason (torch/distributed/run.py:
config_from_args). An OMP_NUM_THREADS already in the environment is an upper bound (the SLURM template sets it
to the task's CPUs); ``override`` (``--trainer.cpu_threads``) wins over everything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from trainers.lightning_compat import keep_threads_through_launchers

# The OMP_NUM_THREADS value this module wrote: the processes Lightning starts inherit both, and a later call in
# the same process must not read our own earlier choice as the user's limit.
_WRITTEN = "PRISM_OMP_NUM_THREADS"


@dataclass(frozen=True)
class ThreadPlan:
    threads: int
    reason: str
    """One line for the start-of-run printout: the number and where it came from."""


def _positive(name: str, value: str | None) -> int | None:
    if value is None or value.strip() == "":
        return None
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a whole number of threads") from None
    if number < 1:
        raise ValueError(f"{name}={value!r}: need at least 1 thread")
    return number


def plan_threads(cores: int, num_workers: int, processes_per_node: int, override: int | None = None,
                 env: Mapping[str, str] | None = None) -> ThreadPlan:
    """The thread count for one training process, from the cores it may run on and what shares them (no side
    effects). ``env``: the variables read (OMP_NUM_THREADS, SLURM_CPUS_PER_TASK); the process's by default."""
    if num_workers < 0 or processes_per_node < 1 or cores < 1:
        raise ValueError(f"need num_workers >= 0, processes_per_node >= 1 and cores >= 1; got {num_workers}, "
                         f"{processes_per_node}, {cores}")
    if override is not None:
        if override < 1:
            raise ValueError(f"trainer.cpu_threads must be >= 1, got {override}")
        return ThreadPlan(override, f"torch threads: {override} (--trainer.cpu_threads)")
    env = os.environ if env is None else env
    per_task = _positive("SLURM_CPUS_PER_TASK", env.get("SLURM_CPUS_PER_TASK"))
    if per_task is not None:
        share, source = min(per_task, cores), f"{min(per_task, cores)} CPUs of this SLURM task"
    else:
        share = max(1, cores // processes_per_node)
        source = f"{cores} cores / {processes_per_node} process(es) per node"
    threads = max(1, share - num_workers)
    reason = (f"torch threads: {threads} = {source} - {num_workers} loader worker(s), at least 1, so that the "
              "step's threads and the workers do not outnumber the cores")
    omp = env.get("OMP_NUM_THREADS")
    cap = None if omp is not None and omp == env.get(_WRITTEN) else _positive("OMP_NUM_THREADS", omp)
    if cap is not None and cap < threads:
        threads, reason = cap, f"torch threads: {cap} (OMP_NUM_THREADS; the share would be {threads})"
    return ThreadPlan(threads, reason)


def available_cores() -> int:
    """The cores this process may run on (its affinity mask: what taskset, cgroups and SLURM's binding allow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def configure_cpu_threads(num_workers: int, processes_per_node: int, override: int | None = None) -> str:
    """Set torch's intra-op threads for this training process (``plan_threads``) and return the one-line reason.

    Call in every training process before ``fit``. The count also goes into OMP_NUM_THREADS, so that Lightning's
    DDP launchers keep it and the processes they start inherit it (``keep_threads_through_launchers``).
    """
    plan = plan_threads(available_cores(), num_workers, processes_per_node, override)
    torch.set_num_threads(plan.threads)
    keep_threads_through_launchers(plan.threads)
    os.environ[_WRITTEN] = str(plan.threads)
    return plan.reason
