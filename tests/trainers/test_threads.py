"""The training process's torch threads: the share arithmetic, the override, and that the number is applied."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainers.threads import plan_threads

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("cores, workers, processes, expected", [
    (2, 2, 1, 1),    # the loaded 2-core machine: both cores go to the workers, the step keeps its floor of 1
    (2, 0, 1, 2),    # loading runs in the training process between steps: the step may use every core
    (16, 2, 1, 14),
    (96, 8, 8, 4),   # 8 ranks on a 96-core node: 12 cores each, 8 of them for that rank's workers
    (96, 12, 8, 1),  # more workers than the rank's share: never below 1
    (4, 0, 8, 1),    # more processes than cores
])
def test_threads_are_the_process_share_minus_the_workers(cores, workers, processes, expected):
    plan = plan_threads(cores, workers, processes, env={})
    assert plan.threads == expected
    assert plan.reason.startswith(f"torch threads: {expected} = ") and f"{workers} loader worker" in plan.reason


def test_a_slurm_task_shares_its_own_cpus_not_the_node():
    # --cpus-per-task=10 on a 96-core node with 8 tasks: each task owns 10 CPUs, whatever the affinity shows
    assert plan_threads(96, 8, 8, env={"SLURM_CPUS_PER_TASK": "10"}).threads == 2
    assert plan_threads(4, 0, 1, env={"SLURM_CPUS_PER_TASK": "10"}).threads == 4  # never more than it may run on


def test_override_wins_and_omp_num_threads_only_lowers():
    assert plan_threads(2, 2, 1, override=6, env={"OMP_NUM_THREADS": "1"}).threads == 6
    assert "--trainer.cpu_threads" in plan_threads(2, 2, 1, override=6, env={}).reason
    assert plan_threads(16, 2, 1, env={"OMP_NUM_THREADS": "3"}).threads == 3
    assert plan_threads(16, 2, 1, env={"OMP_NUM_THREADS": "32"}).threads == 14  # the template's CPUs, not a wish
    # our own earlier choice, inherited or from an earlier run in this process, is not a user's limit
    assert plan_threads(16, 2, 1, env={"OMP_NUM_THREADS": "3", "PRISM_OMP_NUM_THREADS": "3"}).threads == 14


@pytest.mark.parametrize("kwargs, match", [
    (dict(override=0), "cpu_threads must be >= 1"),
    (dict(env={"OMP_NUM_THREADS": "four"}), "OMP_NUM_THREADS='four'"),
    (dict(env={"SLURM_CPUS_PER_TASK": "0"}), "SLURM_CPUS_PER_TASK='0'"),
])
def test_bad_settings_fail_with_their_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_threads(2, 2, 1, **kwargs)


PROBE = r"""
import json, sys, torch
from trainers.threads import configure_cpu_threads


class Threads(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield torch.get_num_threads()


if __name__ == "__main__":
    reason = configure_cpu_threads(num_workers=int(sys.argv[1]), processes_per_node=1,
                                   override=None if sys.argv[2] == "none" else int(sys.argv[2]))
    worker = []
    if sys.argv[3] == "loader":  # forkserver: how datamodules/streams.py:ShardLoader starts its workers
        loader = torch.utils.data.DataLoader(Threads(), batch_size=None, num_workers=1,
                                             multiprocessing_context="forkserver")
        worker = [int(t) for t in loader]
    print(json.dumps({"main": torch.get_num_threads(), "worker": worker, "reason": reason}))
"""


def _probe(tmp_path: Path, workers: int, override: int | None, cores: str, loader: bool = False) -> dict:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PRISM_OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    # taskset: the same answer on any machine; the child sees only the listed cores
    command = ["taskset", "-c", cores, sys.executable, str(script), str(workers), str(override).lower(),
               "loader" if loader else "-"]
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs 2 cores to pin the probe to")
def test_the_chosen_number_is_applied_and_workers_run_one_thread(tmp_path):
    cores = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:2])
    applied = _probe(tmp_path, workers=2, override=None, cores=cores, loader=True)
    assert applied["main"] == 1 and applied["worker"] == [1]
    assert applied["reason"].startswith("torch threads: 1 = 2 cores / 1 process(es) per node - 2 loader worker(s)")
    assert _probe(tmp_path, workers=0, override=None, cores=cores)["main"] == 2
    assert _probe(tmp_path, workers=2, override=3, cores=cores)["main"] == 3
