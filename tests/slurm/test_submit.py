"""`python -m slurm.submit` without a cluster: the batch script, the checks, the written file.

Expected values come from the arguments each test passes (4 nodes x 8 GPUs -> --ntasks-per-node=8 and
--trainer.devices 8, ...) and from the formats in `man sbatch`, not from running the code.
"""

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from slurm import submit
from slurm.submit import SubmitError, SubmitOptions, build_script, main, parse_time_limit, sbatch

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "recipes.mae_prepretrain"


def sbatch_lines(script: str) -> list[str]:
    return [line[len("#SBATCH "):] for line in script.splitlines() if line.startswith("#SBATCH ")]


def srun_argv(script: str) -> list[str]:
    (line,) = [line for line in script.splitlines() if line.startswith("exec srun ")]
    return shlex.split(line)


def last_value(argv: list[str], flag: str) -> str:
    """What the recipe sees for ``flag``: jsonargparse keeps the last occurrence."""
    values = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]
    assert values, f"{flag} not in {argv}"
    return values[-1]


def bash_syntax_ok(script: str, tmp_path: Path) -> None:
    path = tmp_path / "check.sbatch"
    path.write_text(script)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_gpu_dry_run_asks_for_one_task_per_gpu_and_tells_the_recipe_the_same(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a relative run dir resolves against the submit directory
    rc = main(["mae_prepretrain", "--nodes", "4", "--gpus-per-node", "8", "--time", "48:00:00",
               "--partition", "learn", "--dry-run", "--", "--run_dir", "runs/big", "--optim.blr", "1.5e-4"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    run_dir = tmp_path / "runs" / "big"
    assert out.startswith("#!/bin/bash\n")
    lines = sbatch_lines(out)
    for expected in ["--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10",
                     "--time=48:00:00", "--partition=learn", "--signal=USR1@90", "--requeue", "--open-mode=append",
                     f"--output={run_dir}/slurm/%j.out", "--job-name=mae_prepretrain-big"]:
        assert expected in lines, (expected, lines)
    assert not any("B:USR1" in line for line in lines)
    assert f"cd {tmp_path}" in out.splitlines()
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in out.splitlines()

    argv = srun_argv(out)
    assert argv[:3] == ["exec", "srun", "--kill-on-bad-exit=1"]
    assert argv[4:6] == ["-m", RECIPE]
    assert argv[6:8] == ["--optim.blr", "1.5e-4"]  # the user's other flags, unchanged
    # the user's relative --run_dir is replaced by the absolute path, not repeated before it
    assert [arg for arg in argv if arg.startswith("--run_dir")] == ["--run_dir"]
    assert last_value(argv, "--run_dir") == str(run_dir)
    assert "runs/big" not in argv
    assert last_value(argv, "--trainer.num_nodes") == "4"
    assert last_value(argv, "--trainer.devices") == "8"
    assert last_value(argv, "--trainer.accelerator") == "gpu"
    assert last_value(argv, "--trainer.strategy") == "ddp"  # 32 ranks and no strategy given
    assert not run_dir.exists()  # a dry run writes nothing
    bash_syntax_ok(out, tmp_path)


def test_cpu_job_runs_the_asked_processes_per_node_without_gpu_lines(tmp_path):
    opts = SubmitOptions(recipe="mae_prepretrain", time="00:15:00", nodes=2, gpus_per_node=0, tasks_per_node=3,
                         setup=["source /opt/venv/bin/activate"], exclusive=True, mem="16G", account="vision",
                         sbatch_args=["--mail-type=END"])
    run_dir = tmp_path / "run"
    script = build_script(opts, ["--seed", "3"], run_dir, tmp_path, strategy="ddp")
    lines = sbatch_lines(script)
    for expected in ["--nodes=2", "--ntasks-per-node=3", "--cpus-per-task=1", "--time=00:15:00", "--exclusive",
                     "--mem=16G", "--account=vision", "--mail-type=END", "--signal=USR1@90", "--requeue",
                     f"--output={run_dir}/slurm/%j.out"]:
        assert expected in lines, (expected, lines)
    assert not any(line.startswith(("--gpus", "--gres")) for line in lines)
    assert "NCCL" not in script
    body = script.splitlines()
    assert body.index("source /opt/venv/bin/activate") < body.index(next(x for x in body if x.startswith("exec srun")))
    argv = srun_argv(script)
    assert argv[4:6] == ["-m", RECIPE]
    assert (last_value(argv, "--trainer.num_nodes"), last_value(argv, "--trainer.devices"),
            last_value(argv, "--trainer.accelerator"), last_value(argv, "--seed")) == ("2", "3", "cpu", "3")
    bash_syntax_ok(script, tmp_path)


@pytest.mark.parametrize("given", [["--run_dir", "rel/run"], ["--run_dir=rel/run"],
                                   ["--run_dir", "rel/old", "--run_dir=rel/run"]])
def test_the_srun_line_passes_one_absolute_run_dir_whatever_form_the_user_gave(tmp_path, given):
    opts = SubmitOptions(recipe="mae_prepretrain", time="10", gpus_per_node=2)
    run_dir = tmp_path / "rel" / "run"  # what main() resolves the last --run_dir to, from tmp_path
    argv = srun_argv(build_script(opts, [*given, "--seed", "3", "--data.val_shards", "v/run_dir-*.tar"],
                                  run_dir, tmp_path))
    assert [arg for arg in argv if arg.startswith("--run_dir")] == ["--run_dir"]
    assert argv[argv.index("--run_dir") + 1] == str(run_dir)
    assert not any(arg.startswith("rel/") for arg in argv)
    # other flags, even ones whose value mentions run_dir, pass through in their order
    assert argv[6:10] == ["--seed", "3", "--data.val_shards", "v/run_dir-*.tar"]


def test_devices_that_disagree_with_the_allocation_are_refused_naming_both(tmp_path, capsys):
    rc = main([RECIPE, "--nodes", "1", "--gpus-per-node", "8", "--time", "1:00:00", "--dry-run", "--",
               "--run_dir", str(tmp_path / "run"), "--trainer.devices", "2"])
    out, err = capsys.readouterr()
    assert rc != 0 and out == ""
    assert "--trainer.devices 2" in err and "--gpus-per-node 8" in err, err


def test_nodes_set_by_a_config_file_that_disagree_are_refused(tmp_path, capsys):
    config = tmp_path / "big.yaml"
    config.write_text("trainer:\n  num_nodes: 32\n  devices: 8\n")
    rc = main([RECIPE, "--nodes", "4", "--time", "1:00:00", "--dry-run", "--",
               "--config", str(config), "--run_dir", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert rc != 0 and out == ""
    assert "--trainer.num_nodes 32" in err and "--nodes 4" in err, err
    assert "trainer.devices" not in err  # 8 per node agrees with the default --gpus-per-node 8


def test_a_typo_in_the_recipe_flags_fails_at_submit_with_the_recipe_message(tmp_path, monkeypatch, capsys):
    fake = fake_sbatch(tmp_path, monkeypatch)
    run_dir = tmp_path / "run"
    rc = main([RECIPE, "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2", "--time", "10",
               "--", "--run_dir", str(run_dir), "--trainer.max_step", "5"])
    out, err = capsys.readouterr()
    assert rc != 0
    assert "unrecognized arguments: --trainer.max_step" in err, err
    assert not (run_dir / "slurm").exists() and not (fake / "args").exists()  # nothing written or submitted


def fake_sbatch(tmp_path: Path, monkeypatch) -> Path:
    """An `sbatch` on PATH that records its arguments and answers like `sbatch --parsable`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "sbatch"
    exe.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\necho "4242;cluster"\n')
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return bin_dir


def test_the_written_script_is_the_dry_run_script_and_is_submitted(tmp_path, monkeypatch, capsys):
    fake = fake_sbatch(tmp_path, monkeypatch)
    # The recipe answers the same flags the same way; ask it once (each --print_config costs ~5 s of imports).
    real, answers = submit.resolve_recipe_config, {}

    def ask_once(opts, recipe_args, cwd):
        key = (tuple(recipe_args), cwd)
        if key not in answers:
            answers[key] = real(opts, recipe_args, cwd)
        return answers[key]

    monkeypatch.setattr(submit, "resolve_recipe_config", ask_once)
    run_dir = tmp_path / "run"
    args = [RECIPE, "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2", "--time", "00:15:00",
            "--setup", "echo ready", "--", "--run_dir", str(run_dir), "--trainer.max_steps", "12"]
    assert main([*args[:9], "--dry-run", *args[9:]]) == 0
    dry, _ = capsys.readouterr()
    assert main(args) == 0
    out, err = capsys.readouterr()

    script = run_dir / "slurm" / "submit.sbatch"
    assert script.read_text() == dry
    assert (fake / "args").read_text().split() == ["--parsable", str(script)]
    assert "Submitted job 4242" in out
    for expected in (str(run_dir / "slurm" / "4242.out"), "squeue -j 4242", "scancel 4242", f"sbatch {script}"):
        assert expected in out, (expected, out)
    # 2 ranks on one node and no strategy given: DDP, with CPU settings
    argv = srun_argv(dry)
    assert (last_value(argv, "--trainer.devices"), last_value(argv, "--trainer.accelerator"),
            last_value(argv, "--trainer.strategy")) == ("2", "cpu", "ddp")
    assert [p.name for p in script.parent.iterdir()] == ["submit.sbatch"]  # no temporary file left behind


def test_without_sbatch_on_path_the_error_says_where_the_script_is(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    script = tmp_path / "submit.sbatch"
    with pytest.raises(SubmitError, match=f"sbatch is not on PATH.*sbatch {re.escape(str(script))}"):
        sbatch(script, tmp_path)


@pytest.mark.parametrize("text, seconds", [
    ("48:00:00", 48 * 3600), ("2-00:00:00", 48 * 3600), ("90", 90 * 60), ("1:30", 90), ("1-12", 36 * 3600),
    ("0-0:1", 60), ("3-04:05:06", ((3 * 24 + 4) * 60 + 5) * 60 + 6), ("UNLIMITED", None)])
def test_time_limits_in_every_sbatch_format(text, seconds):
    assert parse_time_limit(text) == seconds


@pytest.mark.parametrize("argv, message", [
    (["--time", "48h"], "--time '48h' is not a SLURM time"),
    (["--time", "1"], "--signal-seconds 90 is not shorter than --time 1"),
    (["--time", "10", "--gpus-per-node", "0"], "needs --tasks-per-node"),
    (["--time", "10", "--gpus-per-node", "8", "--tasks-per-node", "4"],
     "--tasks-per-node 4 disagrees with --gpus-per-node 8"),
    (["--time", "10", "--mem", "lots"], "--mem 'lots' is not a SLURM memory size"),
    (["--time", "10", "--partition", "a b"], "--partition 'a b' must be non-empty without spaces"),
])
def test_bad_submit_options_exit_2_with_the_reason(argv, message, capsys):
    assert main([RECIPE, *argv, "--dry-run", "--", "--run_dir", "/tmp/x"]) == 2
    assert message in capsys.readouterr().err


def test_flags_that_would_not_run_the_recipe_are_refused(tmp_path, capsys):
    assert main([RECIPE, "--time", "10", "--dry-run", "--", "--print_config"]) == 1
    assert "--print_config makes no sense in a batch job" in capsys.readouterr().err


def test_template_holds_the_lines_that_must_agree(tmp_path):
    text = (ROOT / "slurm" / "template.sbatch").read_text()
    lines = sbatch_lines(text)
    for expected in ["--nodes=NODES", "--ntasks-per-node=GPUS_PER_NODE", "--gpus-per-node=GPUS_PER_NODE",
                     "--signal=USR1@90", "--requeue", "--open-mode=append", "--output=RUN_DIR/slurm/%j.out"]:
        assert expected in lines, (expected, lines)
    assert not any("B:USR1" in line for line in lines)
    srun = text[text.index("exec srun"):]
    for expected in ("--run_dir RUN_DIR", "--trainer.num_nodes NODES", "--trainer.devices GPUS_PER_NODE"):
        assert expected in srun, expected
    # every #SBATCH line has a comment right above it saying why
    rows = text.splitlines()
    assert all(rows[i - 1].startswith("# ") for i, row in enumerate(rows) if row.startswith("#SBATCH"))
    bash_syntax_ok(text, tmp_path)
