"""A real single-node SLURM on localhost for the ``slurm``-marked tests, and a helper that submits recipes to it.

The setup was worked out and tried here (Debian 12, Slurm 22.05.8): Debian's slurmctld/slurmd/slurm-client/munge
packages, munged running as the munge user, and a slurm.conf of our own (linuxproc/none plugins: no cgroups here)
passed to every daemon and client through SLURM_CONF. Its files live in one fixed directory (default
/tmp/prism-slurm-test, or $PRISM_SLURM_DIR) so that a session which crashed can be cleaned up by the next
one through the pid files the daemons wrote there. munged and the packages stay after the session.

Requeued jobs: ``scontrol requeue`` leaves a job PENDING with Reason=BeginTime for about two minutes
before it runs again. ``release(job_id)`` (``scontrol update JobId=ID StartTime=now``) makes it eligible
at once; on Slurm 22.05.8 here the job reran about 3 s later (the next scheduling pass).
"""

from __future__ import annotations

import fcntl
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
INSTALL_HINT = ("apt-get install -y --no-install-recommends " + " ".join(PACKAGES)
                + " (Debian/Ubuntu, as root), then run the tests as root")
# Not SLURM's default ports (6817/6818), so a site's own daemons are left alone; below 15000 so that no
# job's Lightning MASTER_PORT (15000 + last 4 digits of the job id) can collide with them.
CTLD_PORT, SLURMD_PORT = 6917, 6918
# States after which a job does not change on its own (`man squeue`, JOB STATE CODES).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}


def _which(name: str) -> str | None:
    """Daemons live in /usr/sbin, which is not on every PATH."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def _missing_tools() -> list[str]:
    return [t for t in ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "munged", "munge")
            if _which(t) is None]


def _ensure_installed() -> None:
    missing = _missing_tools()
    if not missing:
        return
    if os.geteuid() != 0:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing) and installing it needs root: "
                    f"{INSTALL_HINT}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except (FileNotFoundError, subprocess.TimeoutExpired) as err:
            pytest.fail(f"could not install SLURM for the slurm tests: `{' '.join(cmd)}` failed: {err}\n"
                        f"Install it by hand: {INSTALL_HINT}")
        if proc.returncode != 0:
            pytest.fail(f"could not install SLURM for the slurm tests: `{' '.join(cmd)}` exited "
                        f"{proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    if missing := _missing_tools():
        pytest.fail(f"installed {' '.join(PACKAGES)} but {', '.join(missing)} are still missing")


def _munge_works() -> bool:
    return subprocess.run([_which("munge"), "-n"], capture_output=True).returncode == 0


def _ensure_munged() -> None:
    """munged authenticates every SLURM message; start it as the munge user unless it already runs."""
    if _munge_works():
        return
    socket_dir = Path("/run/munge")
    socket_dir.mkdir(parents=True, exist_ok=True)
    shutil.chown(socket_dir, "munge", "munge")
    if not Path("/etc/munge/munge.key").exists():  # normally created by the package's postinst
        if _which("mungekey") is None:
            pytest.fail("/etc/munge/munge.key is missing and mungekey is not installed; reinstall the munge package")
        subprocess.run(["runuser", "-u", "munge", "--", _which("mungekey"), "--create"], check=True)
    # munged forks into the background itself; it stays up after the session (cheap, and reused next time)
    proc = subprocess.run(["runuser", "-u", "munge", "--", _which("munged")], capture_output=True, text=True)
    deadline = time.monotonic() + 10
    while not _munge_works():
        if time.monotonic() > deadline:
            pytest.fail(f"munged did not come up (exit {proc.returncode}): {proc.stderr.strip()}\n"
                        "see /var/log/munge/munged.log")
        time.sleep(0.2)


def _short_hostname() -> str:
    try:
        return subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return socket.gethostname().split(".")[0]


def _node_hardware() -> str:
    """This machine's CPU layout and memory as slurm.conf NodeName fields, from `slurmd -C`."""
    proc = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True)
    fields = dict(re.findall(r"(\w+)=(\S+)", proc.stdout.splitlines()[0])) if proc.returncode == 0 else {}
    if "CPUs" not in fields:  # fall back to what Python sees: one socket, one thread per core
        cpus = os.cpu_count() or 1
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        fields = {"CPUs": cpus, "Boards": 1, "SocketsPerBoard": 1, "CoresPerSocket": cpus, "ThreadsPerCore": 1,
                  "RealMemory": mem_kb // 1024}
    # a little under what slurmd measures, so it never drains the node for "Low RealMemory"
    fields["RealMemory"] = int(int(fields["RealMemory"]) * 0.95)
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    return " ".join(f"{k}={fields[k]}" for k in keys)


def _slurm_conf(root: Path, host: str) -> str:
    return f"""\
ClusterName=prismtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={CTLD_PORT}
SlurmdPort={SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
# No cgroups in this sandbox
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
# Finished jobs stay visible to `scontrol show job` for an hour (default 300 s)
MinJobAge=3600
# SIGTERM -> SIGKILL grace on cancel/requeue (default 30 s); checkpoints are saved before requeue
KillWait=10
NodeName={host} NodeAddr=127.0.0.1 {_node_hardware()} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _is_daemon(pid: int, name: str) -> bool:
    try:
        return name in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _stop_by_pid_file(pid_file: Path, name: str, timeout: float = 10) -> None:
    """Stops the daemon that wrote ``pid_file`` (checking the pid still belongs to it), then removes the file."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        pid_file.unlink(missing_ok=True)
        return
    if _is_daemon(pid, name):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _is_daemon(pid, name) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _is_daemon(pid, name):
            os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)


def parse_scontrol(line: str) -> dict[str, str]:
    """``scontrol show job -o`` output (Key=Value pairs on one line; values may hold spaces) as a dict."""
    keys = list(re.finditer(r"(?:^|\s)([A-Za-z][\w:/]*)=", line))
    return {m.group(1): line[m.end():keys[i + 1].start() if i + 1 < len(keys) else len(line)].strip()
            for i, m in enumerate(keys)}


@dataclass
class LocalSlurm:
    """A running single-node cluster; talk to it with ``env`` (SLURM_CONF set, no SLURM_* job variables)."""

    root: Path
    conf: Path
    host: str
    env: dict[str, str]
    log_dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, cmd: list[str] | str, check: bool = True, timeout: float = 60,
            **kwargs) -> subprocess.CompletedProcess:
        """Runs a command against this cluster (a string is split on spaces); raises with its output on failure."""
        cmd = cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]
        proc = subprocess.run(cmd, env=kwargs.pop("env", self.env), capture_output=True, text=True,
                              timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise AssertionError(f"`{' '.join(cmd)}` exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def job_info(self, job_id: str | int) -> dict[str, str] | None:
        """The job's fields from ``scontrol show job -o`` (JobState, Restarts, ExitCode, StdOut ...), or None.

        Slurm 22.05 calls the requeue count ``Restarts``; newer versions may say ``RestartCnt``. Both keys
        are filled in.
        """
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if proc.returncode != 0 or "JobId=" not in proc.stdout:
            return None
        info = parse_scontrol(proc.stdout.strip().splitlines()[0])
        restarts = info.get("Restarts", info.get("RestartCnt", "0"))
        info["Restarts"] = info["RestartCnt"] = restarts
        return info

    def job_log(self, job_id: str | int) -> str:
        info = self.job_info(job_id) or {}
        path = Path(info.get("StdOut", ""))
        return path.read_text(errors="replace") if path.is_file() else ""

    def describe(self, job_id: str | int) -> str:
        """Everything useful when a job did not do what a test expected."""
        tail = lambda text, n=6000: text[-n:]  # noqa: E731
        logs = "".join(f"\n--- {p.name} (tail) ---\n{tail(p.read_text(errors='replace'), 3000)}"
                       for p in sorted(self.log_dir.glob("*.log")))
        return (f"job {job_id}: {self.job_info(job_id)}\n--- job log (tail) ---\n{tail(self.job_log(job_id))}"
                f"{logs}")

    def wait_job(self, job_id: str | int, states=("COMPLETED",), timeout: float = 120,
                 restarts: int | None = None) -> dict[str, str]:
        """Polls until the job's JobState is one of ``states`` (and, if given, it was requeued ``restarts``
        times: a requeued job is PENDING again, like a new one); fails early on another final state."""
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_info(job_id)
            state = (info or {}).get("JobState")
            if state in states and (restarts is None or info["Restarts"] == str(restarts)):
                return info
            if state in FINAL_STATES:
                raise AssertionError(f"job {job_id} ended {state}, expected {sorted(states)}\n{self.describe(job_id)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {state} after {timeout} s, expected {sorted(states)}"
                                     + (f" after {restarts} requeue(s)" if restarts is not None else "") + "\n"
                                     f"{self.describe(job_id)}")
            time.sleep(0.5)

    def release(self, job_id: str | int) -> None:
        """Makes a requeued job (PENDING, Reason=BeginTime for ~2 min) eligible to run now."""
        self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])

    def node_state(self) -> str:
        return self.run(["sinfo", "-h", "-n", self.host, "-o", "%t"], check=False).stdout.strip()


def _stop_cluster(root: Path, procs: dict[str, subprocess.Popen]) -> None:
    for name in ("slurmd", "slurmctld"):
        _stop_by_pid_file(root / f"{name}.pid", name)
        if name in procs:
            proc = procs[name]
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _lock(path: Path, timeout: float = 900):
    """An exclusive lock on ``path``, so that two test sessions on one machine never share (or stop) one
    cluster. The kernel drops it when its holder dies, so a crashed session never blocks the next."""
    handle = open(path, "a+")
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.close()
                pytest.fail(f"another test session held {path} (the local SLURM) for {timeout} s; wait for it to "
                            "finish, or set PRISM_SLURM_DIR to another directory (the ports are shared, though)")
            time.sleep(1)


def _start_cluster(root: Path) -> LocalSlurm:
    _stop_cluster(root, {})  # with the lock ours, daemons named in pid files were left by a session that crashed
    for sub in ("state", "spool", "log"):  # their jobs and logs too: job ids restart at 1
        shutil.rmtree(root / sub, ignore_errors=True)
        (root / sub).mkdir(parents=True)
    host = _short_hostname()
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, host))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_CONF"] = str(conf)
    cluster = LocalSlurm(root=root, conf=conf, host=host, env=env, log_dir=root / "log")
    try:
        for name in ("slurmctld", "slurmd"):
            # -D: stay in the foreground as our child, so it is ours to stop; own session: a Ctrl-C meant for
            # pytest must not kill it before teardown has cancelled the jobs
            with open(root / "log" / f"{name}.stdout.log", "w") as out:
                cluster.procs[name] = subprocess.Popen([_which(name), "-D", "-f", str(conf)], env=env, stdout=out,
                                                       stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while (state := cluster.node_state()) != "idle":
            dead = [n for n, p in cluster.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "".join(f"\n--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}"
                               for p in sorted(cluster.log_dir.glob("*.log")))
                raise RuntimeError(f"local SLURM did not come up (node state {state!r}, exited: {dead}); "
                                   f"conf {conf}{logs}")
            time.sleep(0.3)
    except BaseException:
        _stop_cluster(root, cluster.procs)
        raise
    return cluster


def _shutdown(cluster: LocalSlurm) -> None:
    if cluster.procs["slurmctld"].poll() is None:
        # end the jobs' processes through SLURM while it still runs, so that no rank outlives the cluster
        cluster.run(["scancel", "--user", pwd.getpwuid(os.geteuid()).pw_name], check=False)
        deadline = time.monotonic() + 15
        while cluster.run(["squeue", "-h", "-t", "R,CG"], check=False).stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.3)
    _stop_cluster(cluster.root, cluster.procs)


@pytest.fixture(scope="session")
def slurm_cluster():
    """Starts slurmctld + slurmd on localhost (installing SLURM first when root) and stops them afterwards."""
    _ensure_installed()
    if os.geteuid() != 0:
        pytest.skip(f"the local SLURM needs root to run munged and slurmd; {INSTALL_HINT}")
    _ensure_munged()
    root = Path(os.environ.get("PRISM_SLURM_DIR", "/tmp/prism-slurm-test"))
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / "session.lock"):  # held until teardown; another session waits for it
        cluster = _start_cluster(root)
        try:
            yield cluster
        finally:
            _shutdown(cluster)


@dataclass
class SubmittedJob:
    job_id: str
    run_dir: Path
    submit_output: str
    info: dict[str, str] | None = None
    log: str = ""


def submit_recipe(cluster: LocalSlurm, recipe: str, submit_args: list[str], recipe_args: list[str],
                  env: dict[str, str] | None = None, cwd: Path = ROOT) -> SubmittedJob:
    """``python -m slurm.submit <recipe> <submit_args> -- <recipe_args>`` against ``cluster``, as a user would.

    ``env`` adds to the cluster's environment (sbatch exports the submitting environment to the job, so
    this is also the job's environment). Returns the job id parsed from the submit output.
    """
    full_env = {**cluster.env, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    cmd = [sys.executable, "-m", "slurm.submit", recipe, *submit_args, "--", *recipe_args]
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"`{' '.join(cmd)}` exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    match = re.search(r"^Submitted job (\d+)", proc.stdout, flags=re.M)
    assert match, f"no job id in the submit output:\n{proc.stdout}"
    run_dir = re.search(r"run dir (\S+)", proc.stdout).group(1)
    return SubmittedJob(job_id=match.group(1), run_dir=Path(run_dir), submit_output=proc.stdout)


def submit_and_wait(cluster: LocalSlurm, recipe: str, submit_args: list[str], recipe_args: list[str],
                    env: dict[str, str] | None = None, states=("COMPLETED",), timeout: float = 180,
                    cwd: Path = ROOT) -> SubmittedJob:
    """Submits like :func:`submit_recipe`, then waits for one of ``states``; fills in ``info`` and ``log``."""
    job = submit_recipe(cluster, recipe, submit_args, recipe_args, env=env, cwd=cwd)
    job.info = cluster.wait_job(job.job_id, states, timeout=timeout)
    job.log = cluster.job_log(job.job_id)
    return job
