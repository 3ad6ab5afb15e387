import pytest

from trainers.cluster import AllocationMismatchError, check_allocation, slurm_allocation

# What srun puts into each task's environment for `sbatch --nodes 2 --ntasks-per-node 4` (Slurm 22.05)
STEP = {
    "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4",
    "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_NNODES": "2", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5",
}


def test_outside_slurm_nothing_is_checked():
    assert slurm_allocation({}) is None
    assert check_allocation(3, 7, env={}) == 3
    # an interactive allocation: Lightning starts its own processes there
    assert slurm_allocation({**STEP, "SLURM_JOB_NAME": "interactive"}) is None


def test_matching_allocation_passes_and_auto_becomes_the_tasks_per_node():
    assert check_allocation(4, 2, env=STEP) == 4
    assert check_allocation("auto", 2, env=STEP) == 4


def test_tasks_per_node_from_the_compact_form():
    env = {k: v for k, v in STEP.items() if k != "SLURM_NTASKS_PER_NODE"}
    assert slurm_allocation(env).tasks_per_node == 4
    uneven = {**env, "SLURM_TASKS_PER_NODE": "4,3", "SLURM_NTASKS": "7"}
    with pytest.raises(AllocationMismatchError, match="unevenly"):
        check_allocation("auto", 2, env=uneven)


@pytest.mark.parametrize("devices, nodes, message", [
    (8, 2, "devices is 8 but the job has 4 task"),
    (4, 1, "num_nodes is 1 but the job has 2 node"),
])
def test_mismatch_is_an_error_that_names_both_values(devices, nodes, message):
    with pytest.raises(AllocationMismatchError, match=message) as err:
        check_allocation(devices, nodes, env=STEP)
    assert "4242" in str(err.value) and "slurm.submit" in str(err.value)


def test_a_multi_task_job_started_without_srun_is_an_error_not_a_hang():
    batch_script = {k: v for k, v in STEP.items() if k != "SLURM_STEP_ID"}
    with pytest.raises(AllocationMismatchError, match="not started by srun"):
        check_allocation(4, 2, env=batch_script)


def test_array_jobs_are_requeued_by_array_and_task_id():
    alloc = slurm_allocation({**STEP, "SLURM_ARRAY_JOB_ID": "100", "SLURM_ARRAY_TASK_ID": "3",
                              "SLURM_RESTART_COUNT": "2"})
    assert alloc.job_id == "100_3" and alloc.restart_count == 2
