"""The MAWS pipeline end to end on tiny settings: every stage runs once, from the stage it should start from;
a finished stage is not rerun, an interrupted one resumes; the table comes from the stages' own results."""

import json
import re

import pytest

from recipes.cli import parse_config
from recipes.maws import ARMS, STAGES, Config

from ..wandb_offline import records

pytestmark = pytest.mark.slow

STAGE_KINDS = ("mae", "swag", "finetune", "linear_probe", "lit")


def _tiny(kind: str) -> list[str]:
    flags = {"trainer.max_steps": 3, "trainer.val_every_n_steps": 3, "trainer.checkpoint_every_n_steps": 3,
             "trainer.log_every_n_steps": 1, "data.batch_size": 8, "data.num_workers": 1, "data.val_batches": 1,
             "data.batches_per_epoch": 4, "data.image_size": 32, "optim.warmup_steps": 1}
    if kind == "mae":
        flags["logging.image_every_n_steps"] = 0
    return [arg for key, value in flags.items() for arg in (f"--{kind}.{key}", str(value))]


ARGS = [arg for kind in STAGE_KINDS for arg in _tiny(kind)]


def _run_record(stage_dir):
    files = sorted(stage_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no W&B run under {stage_dir}"
    return next(r.run for r in records(files[0]) if r.WhichOneof("record_type") == "run")


def _table_rows(text: str) -> dict[str, list[str]]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| (")]
    return {row[0]: row[1:] for row in rows}


def test_pipeline_runs_every_stage_from_its_predecessor_then_skips_finished_ones(run_recipe, tmp_path):
    run_dir = tmp_path / "maws"
    first = run_recipe("recipes.maws", "--run_dir", str(run_dir), *ARGS, timeout=900)
    log = first.stdout + first.stderr
    for name, kind, init_stage, _ in STAGES:
        assert (run_dir / name / "stage.json").is_file(), name
        start = f"[maws] {name}: {kind}, " + (f"initialised from {run_dir / init_stage}" if init_stage else "from scratch")
        assert start in log, start
    # one W&B run per stage, all in the pipeline's group
    runs = [_run_record(run_dir / name) for name, *_ in STAGES]
    assert len({run.run_id for run in runs}) == len(STAGES) and {run.run_group for run in runs} == {"maws"}

    table = (run_dir / "results.md").read_text()
    rows = _table_rows(table)
    assert list(rows) == [arm for arm, *_ in ARMS]
    for arm, _, finetune_stage, probe_stage, _, lit_stage in ARMS:
        top1 = json.loads((run_dir / finetune_stage / "stage.json").read_text())["top1"]
        assert rows[arm][1] == f"{top1:.1f}" and 0 <= top1 <= 100
        if probe_stage:
            assert rows[arm][2] == f"{json.loads((run_dir / probe_stage / 'stage.json').read_text())['top1']:.1f}"
        if lit_stage:  # zero-shot through a text tower trained against the stage's frozen trunk
            zero_shot = json.loads((run_dir / lit_stage / "stage.json").read_text())["zero_shot_top1"]
            assert rows[arm][4] == f"{zero_shot:.1f}" and 0 <= zero_shot <= 100
    lit_log = (run_dir / "lit_mae_swag" / "config.yaml").read_text()
    assert "lock_image: true" in lit_log and "image_tower: vit_tiny_patch16" in lit_log
    assert table in first.stdout

    # killed after its training but before it was recorded: that stage resumes (and trains no more), the rest skip
    (run_dir / "finetune_mae_swag" / "stage.json").unlink()
    second = run_recipe("recipes.maws", "--run_dir", str(run_dir), *ARGS, timeout=600)
    log = second.stdout + second.stderr
    skipped = re.findall(r"\[maws\] (\w+): finished before", log)
    assert sorted(skipped) == sorted(name for name, *_ in STAGES if name != "finetune_mae_swag")
    assert f"Resuming from {run_dir / 'finetune_mae_swag' / 'checkpoints'}" in log
    assert _table_rows((run_dir / "results.md").read_text()) == rows


def test_pipeline_flags_reach_every_stage():
    cfg, _ = parse_config(Config, ["--trainer.devices", "2", "--finetune.optim.layer_decay", "0.65",
                                   "--swag.model.name", "vit_small_patch16", "--baselines", "false"])
    assert cfg.trainer.devices == 2 and cfg.finetune.optim.layer_decay == 0.65
    assert cfg.swag.model.name == "vit_small_patch16" and not cfg.baselines
