"""The README's "Add a method" example, run as a user would copy it: a method of ~20 lines on the shared run shape."""

import os
import re

import pytest
import torch
from safetensors.torch import load_file

from tests.recipes.conftest import ROOT

TINY = ("--data.batch_size", "8", "--data.num_workers", "1", "--trainer.accelerator", "cpu",
        "--trainer.val_every_n_steps", "3", "--data.val_batches", "2", "--trainer.log_every_n_steps", "1",
        "--optim.warmup_steps", "2", "--data.image_size", "32")


def _readme_example() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- add-a-method-example:[^>]*-->\n```python\n(.*?)```", readme, re.S)
    assert match, "README.md lost its add-a-method example"
    return match.group(1)


@pytest.mark.slow
def test_the_readme_example_trains_exports_and_resumes(run_recipe, tmp_path, monkeypatch):
    code = _readme_example()
    assert len(code.splitlines()) < 80
    (tmp_path / "rotation.py").write_text(code)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run_dir = tmp_path / "run"
    first = run_recipe("rotation", "--run_dir", str(run_dir), "--trainer.max_steps", "3", *TINY)
    log = first.stdout + first.stderr
    assert "Rotation prediction, vit_tiny_patch8" in log and "lr 3.125e-05 = blr 1.000e-03 x 8 / 256" in log
    assert "Done at step 3." in first.stdout
    weights = load_file(run_dir / "export" / "model.safetensors")
    assert weights["head.weight"].shape == (4, 192)  # four rotations
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3 and checkpoint["hyper_parameters"]["optim"]["blr"] == 1e-3
    second = run_recipe("rotation", "--run_dir", str(run_dir), "--trainer.max_steps", "5", *TINY)
    assert "Resuming from" in second.stdout + second.stderr and "Done at step 5." in second.stdout
