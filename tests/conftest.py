import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _clean_cluster_env(monkeypatch):
    """Tests must not inherit a SLURM allocation or talk to the W&B servers."""
    for name in list(os.environ):
        if name.startswith("SLURM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    yield
    # An in-process wandb.init exports the address of its service process. Recipes started afterwards would
    # attach to it and share its run registry, so the id of a run killed by a test would stay "in use" on resume.
    os.environ.pop("WANDB_SERVICE", None)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops on a shared 2-core machine: intra-op threads only add waits (a test module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_xdist_make_scheduler(config, log):
    """How pytest-xdist shares the tests out: a test file's tests run on one worker, so its module-scoped fixtures
    (a trained run that several tests read) are built once, and every test under tests/slurm runs on one worker,
    because they start and stop the one local cluster (fixed ports and directory; a second worker would wait for the
    first one's whole session). By node id, since pytest 9 ignores the id suffix of xdist's own loadgroup."""
    from xdist.scheduler import LoadScopeScheduling

    class FilesAndCluster(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "tests/slurm" if nodeid.startswith("tests/slurm/") else nodeid.split("::")[0]

    return FilesAndCluster(config, log)
