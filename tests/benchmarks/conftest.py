import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_benchmark(tmp_path_factory):
    """Runs ``python -m <module> <args>`` from the repository root as a user would; returns the completed process."""
    cache = tmp_path_factory.getbasetemp() / "prism-cache"

    def run(module: str, *args: str, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(PRISM_CACHE=str(cache), WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
        proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
        if check:
            assert proc.returncode == 0, f"{module} {' '.join(args)} exited {proc.returncode}\n" \
                                         f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        return proc

    return run
