import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def prism_cache(tmp_path_factory):
    """One synthetic world for the session, built by the first recipe that needs it."""
    return tmp_path_factory.mktemp("prism-cache")


def _recipe_runner(prism_cache: Path):
    """Runs ``python -m <module> <args>`` as a user would; returns the completed process."""

    def run(module: str, *args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(PRISM_CACHE=str(prism_cache), WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
        try:
            proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise AssertionError(f"{module} {' '.join(args)} ran past {timeout} s\n"
                                 f"{(err.stdout or b'')[-4000:]}\n{(err.stderr or b'')[-6000:]}") from None
        if check and proc.returncode != 0:
            raise AssertionError(f"{module} {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
        return proc

    return run


@pytest.fixture
def run_recipe(prism_cache):
    return _recipe_runner(prism_cache)


@pytest.fixture(scope="module")
def run_recipe_module(prism_cache):
    """``run_recipe`` for module-scoped fixtures."""
    return _recipe_runner(prism_cache)


def summary(stdout: str) -> dict[str, str]:
    """The "where everything is" lines a classification recipe prints last (trainers/run.py), by name."""
    return dict(re.findall(r"^  (run_dir|checkpoint|model|encoder|top1|top5|wandb)\s+(\S+)$", stdout, flags=re.M))
