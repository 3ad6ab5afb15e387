import multiprocessing

import pytest

from trainers.lightning_compat import checkpoint_every_n_train_steps
from trainers.build import LoggingConfig, TrainerConfig, build_trainer, resolve_precision, wandb_run_id


def test_unknown_strategy_names_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown trainer.strategy 'dpp'.*ddp.*deepspeed_stage_2.*fsdp"):
        TrainerConfig(strategy="dpp")


@pytest.mark.parametrize("strategy", ["deepspeed_stage_2", "deepspeed_stage_3", "fsdp"])
def test_gpu_only_strategies_fail_clearly_on_cpu(tmp_path, strategy):
    with pytest.raises(ValueError, match="needs CUDA GPUs.*--trainer.strategy ddp"):
        build_trainer(TrainerConfig(strategy=strategy, accelerator="cpu"), LoggingConfig(), tmp_path,
                      batch_size_per_device=4)


def test_precision_defaults_to_fp32_on_cpu_and_respects_a_choice():
    assert resolve_precision(TrainerConfig(accelerator="cpu")) == "32-true"
    assert resolve_precision(TrainerConfig(accelerator="cpu", precision="bf16-mixed")) == "bf16-mixed"
    with pytest.raises(ValueError, match="precision"):
        TrainerConfig(precision="fp8")


def test_bad_counts_and_devices_are_refused():
    with pytest.raises(ValueError, match="max_steps"):
        TrainerConfig(max_steps=0)
    with pytest.raises(ValueError, match="devices"):
        TrainerConfig(devices="two")


def test_wandb_run_id_is_stable_for_a_run_dir_and_survives_a_move(tmp_path):
    run = tmp_path / "exp 1"
    first = wandb_run_id(run)
    assert first == wandb_run_id(run)
    assert first.startswith("exp-1-") and all(c.isalnum() or c in "-_" for c in first)
    assert wandb_run_id(tmp_path / "other") != first
    run.rename(tmp_path / "moved")
    assert wandb_run_id(tmp_path / "moved") == first


def test_trainer_writes_into_the_run_dir(tmp_path):
    trainer = build_trainer(TrainerConfig(accelerator="cpu", max_steps=3, checkpoint_every_n_steps=2),
                            LoggingConfig(), tmp_path, batch_size_per_device=4)
    ckpt = trainer.checkpoint_callback
    assert ckpt.dirpath == str(tmp_path / "checkpoints") and checkpoint_every_n_train_steps(ckpt) == 2
    assert trainer.default_root_dir == str(tmp_path) and trainer.max_steps == 3


def _run_id_after(barrier, run_dir, ids):
    barrier.wait()  # every process asks at once, as the ranks of a new run do
    ids.put(wandb_run_id(run_dir))


def test_wandb_run_id_is_never_read_half_written_by_ranks_that_start_together(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for attempt in range(10):
        run_dir, barrier, ids = tmp_path / f"run{attempt}", ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_run_id_after, args=(barrier, run_dir, ids)) for _ in range(6)]
        for p in procs:
            p.start()
        got = [ids.get(timeout=60) for _ in procs]
        for p in procs:
            p.join()
        assert set(got) == {wandb_run_id(run_dir)} and got[0].startswith(f"run{attempt}-")
