"""Submit a recipe as a SLURM batch job whose allocation and Lightning settings agree.

    python -m slurm.submit recipes.mae_prepretrain --nodes 4 --gpus-per-node 8 --time 48:00:00 \\
        --partition learn --setup 'source .venv/bin/activate' -- --run_dir runs/mae_l --optim.blr 1.5e-4

Everything after ``--`` goes to the recipe unchanged, except ``--run_dir``, which the script passes as the
absolute path it resolves to. Before anything is queued the recipe checks its flags (``--print_config``),
so a typo fails now rather than hours later on the compute nodes. The batch script is written to
``<run_dir>/slurm/submit.sbatch``; ``sbatch`` on that file resubmits the same run, which resumes from the
run directory's newest checkpoint.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SCRIPT_NAME = "submit.sbatch"
# Flags of the recipe that the allocation decides; the script always passes them last, so they win.
ALLOCATION_FLAGS = ("--trainer.num_nodes", "--trainer.devices", "--trainer.accelerator")
_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


class SubmitError(Exception):
    """A problem with what was asked for; the message says what and how to fix it."""


@dataclass
class SubmitOptions:
    recipe: str
    """Recipe module, e.g. recipes.mae_prepretrain (a bare name gets the recipes. prefix)."""
    time: str
    """Wall-clock limit in a SLURM format: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    nodes: int = 1
    """Nodes to allocate; the recipe gets the same --trainer.num_nodes."""
    gpus_per_node: int = 8
    """GPUs per node, one task (rank) each; 0 makes a CPU job."""
    tasks_per_node: int | None = None
    """Processes per node for CPU jobs (no GPUs); GPU jobs run one per GPU."""
    cpus_per_task: int | None = None
    """CPU cores per task (data loader workers live here); default 10 on GPU jobs, 1 on CPU jobs."""
    mem: str | None = None
    """Memory per node, e.g. 480G (0: all of it); default: the cluster's."""
    partition: str | None = None
    """SLURM partition."""
    account: str | None = None
    """SLURM account to charge."""
    qos: str | None = None
    """SLURM quality of service."""
    constraint: str | None = None
    """Node features to require, e.g. 'h100|a100'."""
    exclusive: bool = False
    """Take whole nodes, sharing them with no other job."""
    job_name: str | None = None
    """Job name; default <recipe>-<run dir name>."""
    signal_seconds: int = 90
    """Send SIGUSR1 this many seconds before the time limit: the run checkpoints and requeues itself."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before srun, e.g. 'module load cuda/12.4' or 'source .venv/bin/activate'."""
    python: str = sys.executable
    """Python interpreter on the compute nodes."""
    sbatch_args: list[str] = field(default_factory=list)
    """Extra raw sbatch options, one per #SBATCH line, e.g. --mail-type=END."""
    dry_run: bool = False
    """Print the batch script; write and submit nothing."""

    def __post_init__(self):
        if "." not in self.recipe:
            self.recipe = f"recipes.{self.recipe}"
        if not _MODULE.match(self.recipe):
            raise SubmitError(f"recipe {self.recipe!r} is not a module name; give one like recipes.mae_prepretrain")
        for name in ("nodes", "signal_seconds"):
            if getattr(self, name) < 1:
                raise SubmitError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.gpus_per_node < 0:
            raise SubmitError(f"--gpus-per-node must be >= 0 (0 for a CPU job), got {self.gpus_per_node}")
        if self.gpus_per_node == 0 and self.tasks_per_node is None:
            raise SubmitError("a CPU job (--gpus-per-node 0) needs --tasks-per-node: the number of processes per node")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise SubmitError(f"--tasks-per-node must be >= 1, got {self.tasks_per_node}")
        if self.gpus_per_node > 0 and self.tasks_per_node not in (None, self.gpus_per_node):
            raise SubmitError(
                f"--tasks-per-node {self.tasks_per_node} disagrees with --gpus-per-node {self.gpus_per_node}: "
                "GPU jobs run one task per GPU (what Lightning's SLURM support expects); drop --tasks-per-node")
        if self.cpus_per_task is None:
            self.cpus_per_task = 10 if self.gpus_per_node else 1
        if self.cpus_per_task < 1:
            raise SubmitError(f"--cpus-per-task must be >= 1, got {self.cpus_per_task}")
        limit = parse_time_limit(self.time)
        if limit is not None and self.signal_seconds >= limit:
            raise SubmitError(f"--signal-seconds {self.signal_seconds} is not shorter than --time {self.time} "
                              f"({limit} s): the job would be signalled before it starts working")
        if self.mem is not None and not re.fullmatch(r"\d+[KMGT]?", self.mem):
            raise SubmitError(f"--mem {self.mem!r} is not a SLURM memory size; write e.g. 480G, 64000M or 0")
        for name in ("partition", "account", "qos", "constraint", "job_name"):
            value = getattr(self, name)
            if value is not None and (not value or re.search(r"\s", value)):
                raise SubmitError(f"--{name.replace('_', '-')} {value!r} must be non-empty without spaces")
        for extra in self.sbatch_args:
            if not extra.startswith("-") or "\n" in extra:
                raise SubmitError(f"--sbatch-arg {extra!r} must be one sbatch option such as --mail-type=END "
                                  "(write it with '=': --sbatch-arg=--mail-type=END)")
        for line in self.setup:
            if "\n" in line:
                raise SubmitError(f"--setup {line!r} holds a newline; pass each shell line as its own --setup")

    @property
    def tasks(self) -> int:
        """Tasks (ranks) per node: one per GPU, or the CPU processes asked for."""
        return self.gpus_per_node or self.tasks_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks

    @property
    def accelerator(self) -> str:
        return "gpu" if self.gpus_per_node else "cpu"


def parse_time_limit(text: str) -> int | None:
    """Seconds in a SLURM time limit (None for UNLIMITED), per the formats `man sbatch` lists under --time."""
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    match = _TIME.match(text)
    if not match:
        raise SubmitError(f"--time {text!r} is not a SLURM time; "
                          "write MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    days, a, b, c = match.groups()
    parts = [int(p) for p in (a, b, c) if p is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (parts + [0, 0])[:3]
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if len(parts) == 1:  # MM
        return parts[0] * 60
    if len(parts) == 2:  # MM:SS
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]  # HH:MM:SS


def parse_args(argv: list[str] | None = None) -> tuple[SubmitOptions, list[str]]:
    """Splits ``argv`` at ``--``: submit options before it, recipe flags (passed on unchanged) after it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, recipe_args = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(
        prog="python -m slurm.submit", description=__doc__,
        usage="%(prog)s RECIPE --time LIMIT [options] -- [recipe flags]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Recipe flags go after '--'; the script adds --run_dir, --trainer.num_nodes, --trainer.devices and "
               "--trainer.accelerator to match the allocation.")
    parser.add_argument("recipe", help=_doc("recipe"))
    parser.add_argument("--time", required=True, help=_doc("time"))
    parser.add_argument("--nodes", type=int, default=1, help=_doc("nodes"))
    parser.add_argument("--gpus-per-node", type=int, default=8, help=_doc("gpus_per_node"))
    parser.add_argument("--tasks-per-node", type=int, help=_doc("tasks_per_node"))
    parser.add_argument("--cpus-per-task", type=int, help=_doc("cpus_per_task"))
    parser.add_argument("--mem", help=_doc("mem"))
    for name in ("partition", "account", "qos", "constraint", "job_name"):
        parser.add_argument(f"--{name.replace('_', '-')}", help=_doc(name))
    parser.add_argument("--exclusive", action="store_true", help=_doc("exclusive"))
    parser.add_argument("--signal-seconds", type=int, default=90, help=_doc("signal_seconds"))
    parser.add_argument("--setup", action="append", default=[], help=_doc("setup") + " Repeatable.")
    parser.add_argument("--python", default=sys.executable, help=_doc("python"))
    parser.add_argument("--sbatch-arg", dest="sbatch_args", action="append", default=[],
                        help=_doc("sbatch_args") + " Repeatable.")
    parser.add_argument("--dry-run", action="store_true", help=_doc("dry_run"))
    namespace = parser.parse_args(argv)
    try:
        return SubmitOptions(**vars(namespace)), recipe_args
    except SubmitError as err:
        parser.error(str(err))


def _doc(name: str) -> str:
    return _field_docs().get(name, "")


@functools.cache
def _field_docs() -> dict[str, str]:
    """The docstring under each SubmitOptions field, so that --help and the dataclass say the same thing."""
    source = inspect.getsource(SubmitOptions)
    return dict(re.findall(r'^    (\w+): [^\n]*\n    """(.*?)"""', source, flags=re.M | re.S))


def _flag_values(args: list[str], flag: str) -> list[str]:
    """Values given to ``flag`` as ``--flag v`` or ``--flag=v``."""
    values = []
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            values.append(args[i + 1])
        elif arg.startswith(flag + "="):
            values.append(arg[len(flag) + 1:])
    return values


def _allocation_conflicts(opts: SubmitOptions, values: dict[str, str], where: str) -> list[str]:
    """What in ``values`` (recipe setting -> value) disagrees with the allocation, as sentences."""
    wanted = {"trainer.num_nodes": (str(opts.nodes), f"--nodes {opts.nodes}"),
              "trainer.devices": (str(opts.tasks), f"--gpus-per-node {opts.gpus_per_node}" if opts.gpus_per_node
                                  else f"--tasks-per-node {opts.tasks_per_node}"),
              "trainer.accelerator": (opts.accelerator, f"--gpus-per-node {opts.gpus_per_node}")}
    problems = []
    for key, value in values.items():
        expected, source = wanted[key]
        if value is None or str(value) in (expected, "auto"):
            continue
        problems.append(f"--{key} {value} (from {where}) disagrees with {source}, which means {key} = {expected}")
    return problems


def _conflict_error(problems: list[str]) -> SubmitError:
    return SubmitError(
        "the recipe flags disagree with the SLURM allocation:\n  " + "\n  ".join(problems)
        + "\nLightning compares devices and nodes with SLURM's task counts and stops a job where they differ. "
          "Drop these recipe flags (the script passes matching ones), or change the submit options.")


def check_recipe_flags(opts: SubmitOptions, recipe_args: list[str]) -> None:
    """Fast checks of the recipe flags as typed, before the recipe itself is asked."""
    for bad in ("--print_config", "--help", "-h"):
        if any(arg == bad or arg.startswith(bad + "=") for arg in recipe_args):
            raise SubmitError(f"recipe flag {bad} makes no sense in a batch job; run `python -m {opts.recipe} {bad}` "
                              "directly instead")
    given = {flag[2:]: values[-1] for flag in ALLOCATION_FLAGS if (values := _flag_values(recipe_args, flag))}
    if problems := _allocation_conflicts(opts, given, "the recipe flags"):
        raise _conflict_error(problems)


def resolve_recipe_config(opts: SubmitOptions, recipe_args: list[str], cwd: Path) -> dict:
    """The recipe's resolved config for these flags, from ``--print_config`` run in a subprocess.

    The allocation's values go *before* the user's flags: a flag or ``--config`` file that sets them
    overrides them and shows up in the result as a disagreement, while unset ones read back unchanged.
    """
    allocation = ["--trainer.num_nodes", str(opts.nodes), "--trainer.devices", str(opts.tasks),
                  "--trainer.accelerator", opts.accelerator]
    cmd = [opts.python, "-m", opts.recipe, *allocation, *recipe_args, "--print_config"]
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise SubmitError(f"--python {opts.python!r} does not exist; give the interpreter of the environment "
                          "that has Prism installed") from None
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip())[-3000:]
        raise SubmitError(f"the recipe rejected its flags (`{shlex.join(cmd)}` exited {proc.returncode}); "
                          f"nothing was submitted:\n{detail}")
    try:
        config = yaml.safe_load(proc.stdout)
    except yaml.YAMLError as err:
        raise SubmitError(f"could not read the config printed by `{shlex.join(cmd)}`: {err}\n"
                          f"{proc.stdout[-2000:]}") from None
    if not isinstance(config, dict) or "run_dir" not in config:
        raise SubmitError(f"`{shlex.join(cmd)}` printed no run_dir; is {opts.recipe} a Prism recipe?\n"
                          f"{proc.stdout[-2000:]}")
    trainer = config.get("trainer") or {}
    resolved = {f"trainer.{key}": trainer.get(key) for key in ("num_nodes", "devices", "accelerator")}
    if problems := _allocation_conflicts(opts, resolved, "a --config file or the recipe flags"):
        raise _conflict_error(problems)
    return config


def default_job_name(opts: SubmitOptions, run_dir: Path) -> str:
    name = f"{opts.recipe.rsplit('.', 1)[-1]}-{run_dir.name}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:100]


def _without_flag(args: list[str], flag: str) -> list[str]:
    """``args`` less every ``flag value`` and ``flag=value``."""
    out, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
        elif arg == flag and i + 1 < len(args):
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


def recipe_command(opts: SubmitOptions, recipe_args: list[str], run_dir: Path,
                   strategy: str | None = None) -> list[str]:
    """The command every task runs: the user's flags, then the allocation's (later flags win).

    The user's --run_dir is replaced by the absolute path it resolved to at submit time rather than repeated
    before it: the script cds to the submit directory, so both name the same place, but a reader of the srun
    line (or of `ps` on a node) should see one run directory, not two to reconcile.
    """
    user_args = _without_flag(recipe_args, "--run_dir")
    cmd = [opts.python, "-m", opts.recipe, *user_args, "--run_dir", str(run_dir),
           "--trainer.num_nodes", str(opts.nodes), "--trainer.devices", str(opts.tasks),
           "--trainer.accelerator", opts.accelerator]
    if strategy:
        cmd += ["--trainer.strategy", strategy]
    return cmd


def _sbatch_options(opts: SubmitOptions, run_dir: Path) -> list[str]:
    """The script's #SBATCH options: the allocation, then signal, requeue and log, then the user's own."""
    sbatch = [f"--job-name={opts.job_name or default_job_name(opts, run_dir)}",
              f"--nodes={opts.nodes}",
              f"--ntasks-per-node={opts.tasks}"]
    if opts.gpus_per_node:
        sbatch.append(f"--gpus-per-node={opts.gpus_per_node}")
    sbatch += [f"--cpus-per-task={opts.cpus_per_task}", f"--time={opts.time}"]
    for name in ("mem", "partition", "account", "qos", "constraint"):
        if getattr(opts, name) is not None:
            sbatch.append(f"--{name}={getattr(opts, name)}")
    if opts.exclusive:
        sbatch.append("--exclusive")
    sbatch += [f"--signal=USR1@{opts.signal_seconds}", "--requeue", "--open-mode=append",
               f"--output={run_dir}/slurm/%j.out", *opts.sbatch_args]
    return sbatch



def build_script(opts: SubmitOptions, recipe_args: list[str], run_dir: Path, cwd: Path,
                 strategy: str | None = None) -> str:
    """The batch script. ``strategy`` is forced onto the recipe when given (None keeps the recipe's)."""
    run_dir, cwd = Path(run_dir), Path(cwd)
    if not run_dir.is_absolute() or not cwd.is_absolute():
        raise SubmitError(f"run_dir and cwd must be absolute paths, got {run_dir} and {cwd}")
    if re.search(r"[\s%]", str(run_dir)):
        raise SubmitError(f"run_dir {str(run_dir)!r} holds a space or '%', which an #SBATCH --output line cannot "
                          "carry; choose a run directory without them")
    sbatch = _sbatch_options(opts, run_dir)
    submit_cmd = shlex.join(["python", "-m", "slurm.submit", opts.recipe] + _submit_flags(opts) + ["--", *recipe_args])
    lines = [
        "#!/bin/bash",
        f"# Written by: {submit_cmd}".replace("\n", "\\n"),  # a newline in a flag must not end the comment
        f"# Resubmit the same run (it resumes from its newest checkpoint): sbatch {run_dir}/slurm/{SCRIPT_NAME}",
        "# One task per GPU (or CPU process): Lightning's SLURM support starts no processes of its own.",
        "# USR1 goes to the tasks (not B:USR1, which only reaches this shell) so the run checkpoints and requeues.",
        *(f"#SBATCH {arg}" for arg in sbatch),
        "",
        "set -euo pipefail",
    ]
    if opts.setup:
        lines += ["# Environment setup; module and activate scripts may read unset variables, so -u is off here.",
                  "set +u", *opts.setup, "set -u"]
    lines += [
        f"cd {shlex.quote(str(cwd))}",
        "# Log lines reach the log file as they are printed, and none are lost when a rank is killed.",
        "export PYTHONUNBUFFERED=1",
        "# Each rank sizes its thread pool to its own cores instead of every core of the node.",
        "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
        "# Slurm 22.05-23.02 srun no longer inherits --cpus-per-task from the batch job; this restores it.",
        "export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}",
    ]
    if opts.gpus_per_node:
        lines += [
            "# A rank that dies makes the others fail with an error instead of hanging in a collective",
            "# (TORCH_ prefix from torch 2.2, the bare name before).",
            "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
            "export NCCL_ASYNC_ERROR_HANDLING=1",
        ]
    lines += [
        'echo "[$(date -Is)] job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}:'
        ' ${SLURM_JOB_NUM_NODES} node(s) ${SLURM_JOB_NODELIST}, ${SLURM_NTASKS} task(s)"',
        "# --kill-on-bad-exit: one failed rank ends the step rather than leaving the others waiting for it.",
        "exec srun --kill-on-bad-exit=1 " + shlex.join(recipe_command(opts, recipe_args, run_dir, strategy)),
        "",
    ]
    return "\n".join(lines)


def _submit_flags(opts: SubmitOptions) -> list[str]:
    """The submit options that differ from their defaults, as flags (for the script's header comment)."""
    flags = ["--nodes", str(opts.nodes), "--gpus-per-node", str(opts.gpus_per_node), "--time", opts.time]
    if opts.tasks_per_node is not None:
        flags += ["--tasks-per-node", str(opts.tasks_per_node)]
    if opts.cpus_per_task != (10 if opts.gpus_per_node else 1):
        flags += ["--cpus-per-task", str(opts.cpus_per_task)]
    for name in ("mem", "partition", "account", "qos", "constraint", "job_name"):
        if getattr(opts, name) is not None:
            flags += [f"--{name.replace('_', '-')}", getattr(opts, name)]
    if opts.exclusive:
        flags.append("--exclusive")
    if opts.signal_seconds != 90:
        flags += ["--signal-seconds", str(opts.signal_seconds)]
    for line in opts.setup:
        flags += ["--setup", line]
    for extra in opts.sbatch_args:
        flags.append(f"--sbatch-arg={extra}")
    return flags


def write_script(script: str, run_dir: Path) -> Path:
    """Writes ``<run_dir>/slurm/submit.sbatch`` under a temporary name first, so it is never half-written."""
    directory = Path(run_dir) / "slurm"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / SCRIPT_NAME
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{SCRIPT_NAME}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(script)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def sbatch(script: Path, cwd: Path) -> str:
    """Submits ``script``; returns the job id."""
    exe = shutil.which("sbatch")
    if exe is None:
        raise SubmitError(f"sbatch is not on PATH, so nothing was submitted. The batch script is at {script}; "
                          f"submit it from a SLURM login node with: sbatch {script}")
    proc = subprocess.run([exe, "--parsable", str(script)], cwd=cwd, capture_output=True, text=True)
    job_id = proc.stdout.strip().split(";")[0]
    if proc.returncode != 0 or not job_id:
        raise SubmitError(f"sbatch refused {script} (exit {proc.returncode}):\n{proc.stderr.strip()}")
    return job_id


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (2: bad submit options, 1: nothing could be submitted)."""
    try:
        opts, recipe_args = parse_args(argv)
    except SystemExit as exit_:  # argparse's way out, for --help and usage errors
        return exit_.code if isinstance(exit_.code, int) else 2
    cwd = Path.cwd()
    try:
        check_recipe_flags(opts, recipe_args)
        config = resolve_recipe_config(opts, recipe_args, cwd)
        run_dir = (cwd / str(config["run_dir"])).resolve()
        # Lightning would pick no distributed strategy on its own for more than one rank here.
        user_strategy = (config.get("trainer") or {}).get("strategy", "auto")
        strategy = "ddp" if opts.world_size > 1 and user_strategy in (None, "auto") else None
        script = build_script(opts, recipe_args, run_dir, cwd, strategy)
        if opts.dry_run:
            print(script, end="")
            return 0
        path = write_script(script, run_dir)
        job_id = sbatch(path, cwd)
    except SubmitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    log = run_dir / "slurm" / f"{job_id}.out"
    where = f"{opts.nodes} node(s) x " + (f"{opts.gpus_per_node} GPU(s)" if opts.gpus_per_node
                                          else f"{opts.tasks_per_node} CPU process(es)")
    print(f"Submitted job {job_id}: {opts.recipe} on {where}, run dir {run_dir}\n"
          f"  script  {path}  (resubmit the same run: sbatch {path})\n"
          f"  log     {log}\n"
          f"  watch   squeue -j {job_id}   |   tail -f {log}\n"
          f"  cancel  scancel {job_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
