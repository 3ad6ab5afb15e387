"""Stage handoff from every kind of checkpoint, including REAL DeepSpeed ZeRO-1/2/3 checkpoint directories.

DeepSpeed runs here on the CPU (gloo, world size 1) in one subprocess (~10 s), so that its global state stays
out of the pytest process. There it trains a tiny model two steps per ZeRO stage, saving through
PrismDeepSpeedStrategy.save_checkpoint (the code under test) with the engine's own weights beside them as the
expected values; then it runs Lightning's fit loop with the strategy twice (4 steps, then resumed to 6).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from trainers.checkpoint import COMPLETE_MARKER, AtomicCheckpointIO, find_resume_checkpoint, read_complete_marker
from trainers.handoff import convert_deepspeed_checkpoint, load_state_dict, main

ROOT = Path(__file__).resolve().parents[2]
STAGES = (1, 2, 3)

DEEPSPEED_SCRIPT = r'''
import json
import sys
from pathlib import Path

import deepspeed
import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

# Its shared-memory all-reduce is JIT-compiled with g++ on first use (~30 s) and buys nothing for one rank.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
from trainers.checkpoint import find_resume_checkpoint
from trainers.lightning_compat import deepspeed_on_cpu
from trainers.strategies import PrismDeepSpeedStrategy


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5))
        self.body.table = nn.Parameter(torch.randn(5), requires_grad=False)  # frozen, like MAE's sin-cos table
        self.head = nn.Linear(5, 3)
        self.register_buffer("seen", torch.tensor(7))

    def forward(self, x):
        return (self.head(self.body(x) + self.body.table) ** 2).mean()


out = Path(sys.argv[1])
deepspeed.init_distributed(dist_backend="gloo")
for stage in (1, 2, 3):
    torch.manual_seed(stage)
    model = Tiny()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    strategy = PrismDeepSpeedStrategy(stage=stage, logging_batch_size_per_gpu=4)
    strategy.model = engine
    ckpts = out / f"stage{stage}" / "checkpoints"
    for step in (1, 2):
        loss = engine(torch.randn(4, 6))
        engine.backward(loss)
        engine.step()
        # Lightning's checkpoint dict; the strategy sends all but weights and optimizer state as client state
        state = {"global_step": step, "epoch": 0, "hyper_parameters": {"width": 5},
                 "pytorch-lightning_version": "2.6.6", "state_dict": {}, "optimizer_states": [{}]}
        strategy.save_checkpoint(state, ckpts / f"step-{step:06d}.ckpt")
        strategy.save_checkpoint(state, ckpts / "last.ckpt")
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # a no-op below stage 3
        expected = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    torch.save(expected, out / f"stage{stage}" / "expected.pt")


# The same strategy inside Lightning's fit loop: ModelCheckpoint saves, prunes and resumes through it.
# Lightning refuses DeepSpeed without CUDA; the compat module's test-only variant runs it on the CPU (gloo).
CPUDeepSpeed = deepspeed_on_cpu(PrismDeepSpeedStrategy)


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.save_hyperparameters()
        self.model = Tiny()

    def training_step(self, batch, batch_idx):
        return self.model(batch)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.05)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(64, 6), batch_size=4)


run = out / "lightning"
report = {}
for steps in (4, 6):
    torch.manual_seed(steps)
    saver = ModelCheckpoint(dirpath=run / "checkpoints", filename="step-{step:06d}", auto_insert_metric_name=False,
                            every_n_train_steps=2, save_last=True, save_top_k=1, monitor="step", mode="max",
                            enable_version_counter=False)
    strategy = CPUDeepSpeed(stage=2, logging_batch_size_per_gpu=4, process_group_backend="gloo")
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, precision="32-true", max_steps=steps,
                        callbacks=[saver], logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=run)
    resume = find_resume_checkpoint(run)
    module = Module()
    trainer.fit(module, ckpt_path=str(resume) if resume else None)
    report[steps] = {"resumed_from": resume and resume.name, "global_step": trainer.global_step,
                     "files": sorted(p.name for p in (run / "checkpoints").iterdir())}
torch.save({k: v.detach().clone() for k, v in module.model.state_dict().items()}, run / "expected.pt")
(run / "report.json").write_text(json.dumps(report))
print("ok")
'''


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deepspeed")
    (out / "make.py").write_text(DEEPSPEED_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(out / "make.py"), str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
    print(f"DeepSpeed subprocess: {time.perf_counter() - start:.1f} s")
    return out


def _expected(ds_runs: Path, stage: int) -> dict[str, torch.Tensor]:
    return torch.load(ds_runs / f"stage{stage}" / "expected.pt", weights_only=True)


def _assert_same(got: dict, expected: dict):
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("stage", STAGES)
def test_real_deepspeed_directory_is_marked_and_resumed_from(ds_runs, stage):
    run = ds_runs / f"stage{stage}"
    last = run / "checkpoints" / "last.ckpt"
    assert (last / "latest").read_text().strip() == "checkpoint"  # DeepSpeed really wrote it
    marker = read_complete_marker(last)
    assert marker["global_step"] == 2 and marker["zero_stage"] == stage and marker["world_size"] == 1
    assert find_resume_checkpoint(run) in {last, run / "checkpoints" / "step-000002.ckpt"}


@pytest.mark.parametrize("stage", STAGES)
def test_fp32_weights_come_back_exactly_from_the_directory_the_file_and_the_run(ds_runs, stage, tmp_path):
    expected = _expected(ds_runs, stage)
    assert "body.table" in expected and "seen" in expected  # the frozen parameter and the buffer
    run = ds_runs / f"stage{stage}"
    out = convert_deepspeed_checkpoint(run / "checkpoints" / "last.ckpt", tmp_path / "export" / "fp32.ckpt")
    converted = torch.load(out, weights_only=True)
    assert converted["global_step"] == 2 and converted["epoch"] == 0
    assert converted["hyper_parameters"] == {"width": 5}
    _assert_same(converted["state_dict"], expected)
    _assert_same(load_state_dict(out), expected)
    _assert_same(load_state_dict(run / "checkpoints" / "last.ckpt"), expected)
    _assert_same(load_state_dict(run), expected)
    body = load_state_dict(run, prefix="body")
    assert sorted(body) == ["0.bias", "0.weight", "1.bias", "1.weight", "table"]
    assert torch.equal(body["table"], expected["body.table"])
    assert [p.name for p in out.parent.iterdir()] == ["fp32.ckpt"]  # no temporary left behind


def test_an_unmarked_directory_is_skipped_and_refused(ds_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ds_runs / "stage2", run)
    ckpts = run / "checkpoints"
    # a save of step 3 cut off before its marker: newest by step, yet never chosen
    shutil.copytree(ckpts / "last.ckpt", ckpts / "step-000003.ckpt")
    (ckpts / "step-000003.ckpt" / COMPLETE_MARKER).unlink()
    assert find_resume_checkpoint(run) in {ckpts / "last.ckpt", ckpts / "step-000002.ckpt"}
    with pytest.raises(ValueError, match="incomplete DeepSpeed checkpoint.*no prism_complete.json"):
        load_state_dict(ckpts / "step-000003.ckpt")
    with pytest.raises(ValueError, match="incomplete"):
        convert_deepspeed_checkpoint(ckpts / "step-000003.ckpt", tmp_path / "x.ckpt")
    # with only step 1 complete, the run resumes from and hands off step 1
    for name in ("last.ckpt", "step-000002.ckpt"):
        (ckpts / name / COMPLETE_MARKER).unlink()
    assert find_resume_checkpoint(run) == ckpts / "step-000001.ckpt"
    step1 = load_state_dict(run)
    assert not torch.equal(step1["head.weight"], _expected(ds_runs, 2)["head.weight"])  # an older state


def test_lightning_fit_saves_prunes_and_resumes_marked_directories(ds_runs):
    run = ds_runs / "lightning"
    report = json.loads((run / "report.json").read_text())
    first, second = report["4"], report["6"]
    # every 2 steps, keeping 1: step-000002 was removed when step-000004 was written
    assert first == {"resumed_from": None, "global_step": 4, "files": ["last.ckpt", "step-000004.ckpt"]}
    assert second["resumed_from"] in {"last.ckpt", "step-000004.ckpt"} and second["global_step"] == 6
    assert second["files"] == ["last.ckpt", "step-000006.ckpt"]
    assert read_complete_marker(run / "checkpoints" / "last.ckpt")["global_step"] == 6
    _assert_same(load_state_dict(run, prefix="model."), torch.load(run / "expected.pt", weights_only=True))


def test_convert_command_prints_what_it_wrote(ds_runs, tmp_path, capsys):
    expected = _expected(ds_runs, 2)
    out = tmp_path / "fp32.ckpt"
    assert main(["convert", str(ds_runs / "stage2" / "checkpoints" / "last.ckpt"), str(out)]) == 0
    numel = sum(v.numel() for v in expected.values())  # 6*5+5 + 5+5 + 5 + 5*3+3 + 1 = 69
    assert numel == 69
    printed = capsys.readouterr().out
    assert f"Wrote {out}: {len(expected)} tensors, {numel:,} parameters (buffers included), step 2" in printed
    assert main(["convert", str(tmp_path), str(out)]) == 2
    assert "not a DeepSpeed checkpoint directory" in capsys.readouterr().err


# ---- files, prefixes, errors (no DeepSpeed needed) ----------------------------------------------------------

def test_lightning_file_with_wrapper_prefixes_and_safetensors(tmp_path):
    w = torch.arange(6.0).view(2, 3)
    ckpt = {"global_step": 3, "state_dict": {"_forward_module.model._orig_mod.fc.weight": w,
                                             "model.encoder._orig_mod.norm.bias": torch.ones(3),
                                             "loss_scale": torch.tensor(1.0)}}
    AtomicCheckpointIO().save_checkpoint(ckpt, tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert sorted(load_state_dict(tmp_path / "run")) == ["loss_scale", "model.encoder.norm.bias", "model.fc.weight"]
    model = load_state_dict(tmp_path / "run" / "checkpoints" / "last.ckpt", prefix="model.")
    assert sorted(model) == ["encoder.norm.bias", "fc.weight"] and torch.equal(model["fc.weight"], w)
    assert sorted(load_state_dict(tmp_path / "run", prefix="model.encoder")) == ["norm.bias"]
    with pytest.raises(KeyError, match="No keys under prefix 'decoder.'.*loss_scale., model."):
        load_state_dict(tmp_path / "run", prefix="decoder")

    save_file({"a": w.to(torch.bfloat16)}, str(tmp_path / "w.safetensors"))
    loaded = load_state_dict(tmp_path / "w.safetensors")
    assert loaded["a"].dtype == torch.bfloat16 and torch.equal(loaded["a"].float(), w)
    torch.save({"a": w}, tmp_path / "plain.pt")  # a bare state dict, as zero_to_fp32.py writes
    assert torch.equal(load_state_dict(tmp_path / "plain.pt")["a"], w)


class Opaque:
    """Any object that torch.load(weights_only=True) has no business unpickling."""


def test_clear_errors_for_missing_strange_or_broken_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_state_dict(tmp_path / "nope")
    (tmp_path / "notes").mkdir()
    with pytest.raises(ValueError, match="neither a run directory.*nor a DeepSpeed checkpoint directory"):
        load_state_dict(tmp_path / "notes")
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="has no complete checkpoint"):
        load_state_dict(tmp_path / "empty_run")
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(64, 64)}}, tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a complete torch checkpoint"):
        load_state_dict(tmp_path / "cut.ckpt")

    torch.save({"state_dict": {"w": torch.ones(1)}, "extra": Opaque()}, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_state_dict(tmp_path / "pickled.ckpt")
