"""The MAE recipe end to end, run as a user runs it, on tiny settings."""

import csv
import json
import re

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

TINY = ["--data.batch_size", "8", "--data.num_workers", "1", "--trainer.accelerator", "cpu",
        "--trainer.val_every_n_steps", "3", "--data.val_batches", "2", "--trainer.log_every_n_steps", "1",
        "--logging.image_every_n_steps", "3", "--optim.warmup_steps", "2"]


def _summary(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"^  (run_dir|checkpoint|encoder|wandb|images)\s+(\S+)$", stdout, flags=re.M))


def _wandb_runs(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_train_export_and_resume(run_recipe, tmp_path):
    run_dir = tmp_path / "mae"
    first = run_recipe("recipes.mae_prepretrain", "--run_dir", str(run_dir), "--trainer.max_steps", "5",
                       "--trainer.checkpoint_every_n_steps", "4", *TINY)
    out = _summary(first.stdout)
    assert set(out) == {"run_dir", "checkpoint", "encoder", "wandb", "images"}, first.stdout
    assert re.search(r"lr 3\.125e-05 = blr 1\.000e-03 x 8 / 256", first.stdout + first.stderr)

    # Checkpoints: every 4 steps and at the end, plain values only (weights_only loading).
    ckpts = run_dir / "checkpoints"
    assert {p.name for p in ckpts.glob("*.ckpt")} == {"step-000004.ckpt", "step-000005.ckpt", "last.ckpt"}
    last = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert last["global_step"] == 5
    assert last["hyper_parameters"]["model"]["name"] == "mae_vit_tiny_patch8"

    # The config is saved, and reloading it reproduces the run's settings.
    assert "max_steps: 5" in (run_dir / "config.yaml").read_text()

    # Exported encoder: timm keys, loads strictly into timm's VisionTransformer, equals the checkpoint's encoder.
    encoder = load_file(out["encoder"])
    with safe_open(out["encoder"], "pt") as f:
        kwargs = json.loads(f.metadata()["timm_kwargs"])
    vit = timm.models.VisionTransformer(**kwargs)
    vit.load_state_dict(encoder, strict=True)
    assert torch.equal(encoder["blocks.0.attn.qkv.weight"], last["state_dict"]["model.encoder.blocks.0.attn.qkv.weight"])

    # W&B wrote a real offline run; the CSV has the training metrics.
    runs = _wandb_runs(run_dir)
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("train/loss") for r in rows) and any(r.get("val/loss") for r in rows)
    assert (run_dir / "images").is_dir() and out["images"].endswith(".png")

    # Same command, more steps: resumes at step 5 and continues the same W&B run id.
    second = run_recipe("recipes.mae_prepretrain", "--run_dir", str(run_dir), "--trainer.max_steps", "8",
                        "--trainer.checkpoint_every_n_steps", "4", *TINY)
    assert re.search(r"Resuming from \S+step-000005\.ckpt|Resuming from \S+last\.ckpt", second.stdout + second.stderr)
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 8
    runs = _wandb_runs(run_dir)
    assert len(runs) == 2 and runs[0].name.split("-")[-1] == runs[1].name.split("-")[-1]
    with open(run_dir / "csv" / "metrics.csv") as f:
        steps = sorted({int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")})
    assert steps == list(range(8))  # both attempts in one file (a step's metrics are logged under step - 1)

    # A new run initialised from this one: with lr 0 its weights stay exactly the ones it was given.
    third = run_recipe("recipes.mae_prepretrain", "--run_dir", str(tmp_path / "from_init"), "--init_from", str(run_dir),
                       "--trainer.max_steps", "1", "--optim.lr", "0", *TINY)
    assert f"Initialised the model from {run_dir}" in third.stdout + third.stderr
    given = torch.load(ckpts / "last.ckpt", weights_only=True)["state_dict"]
    kept = torch.load(tmp_path / "from_init" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert given.keys() == kept.keys() and all(torch.equal(given[k], kept[k]) for k in given)


RECORDING_SCRIPT = '''
import os, sys
import recipes.mae_prepretrain as recipe
from recipes.cli import parse_config


class Recording(recipe.MAEPretraining):
    """Writes the sample keys of every training batch, one line per batch, to a file per rank."""

    def training_step(self, batch, batch_idx):
        with open(os.path.join(os.environ["KEYS_DIR"], f"rank{self.global_rank}.txt"), "a") as f:
            f.write(" ".join(batch["key"]) + "\\n")
        return super().training_step(batch, batch_idx)


if __name__ == "__main__":  # loader workers start from a forkserver, which imports this module
    recipe.MAEPretraining = Recording
    recipe.main(*parse_config(recipe.Config, sys.argv[1:]))
'''


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_reads_disjoint_samples_in_equal_batches(run_recipe, tmp_path, monkeypatch):
    script = tmp_path / "record_keys.py"
    script.write_text(RECORDING_SCRIPT)
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    monkeypatch.setenv("KEYS_DIR", str(keys_dir))
    monkeypatch.syspath_prepend(str(tmp_path))
    import os
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    proc = run_recipe("record_keys", "--run_dir", str(tmp_path / "ddp"), "--trainer.max_steps", "4",
                      "--trainer.devices", "2", "--trainer.strategy", "ddp", *TINY, timeout=90)
    assert "effective batch 16 = 8 per device x 1 accumulation x 2 devices" in proc.stdout + proc.stderr
    per_rank = {}
    for rank in (0, 1):
        lines = (keys_dir / f"rank{rank}.txt").read_text().splitlines()
        per_rank[rank] = [line.split() for line in lines]
    assert len(per_rank[0]) == len(per_rank[1]) == 4  # the same number of batches on each rank
    assert all(len(batch) == 8 for rank in per_rank.values() for batch in rank)
    keys0 = {k for batch in per_rank[0] for k in batch}
    keys1 = {k for batch in per_rank[1] for k in batch}
    assert keys0.isdisjoint(keys1)  # each rank reads its own shards
    assert torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
