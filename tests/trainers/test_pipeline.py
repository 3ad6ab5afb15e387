"""trainers.pipeline without a model: stages are stand-in mains that leave a checkpoint at a chosen step, as a
training recipe's run does, so finishing, recording, skipping and resuming are checked in milliseconds."""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from trainers.checkpoint import CHECKPOINT_DIR, LAST
from trainers.pipeline import STAGE_RESULT, Stage, StageResult, run_stage, run_stages


@dataclass
class TrainerSettings:
    max_steps: int = 3


@dataclass
class StageConfig:
    run_dir: str = "unset"
    init_from: str | None = None
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    augment: tuple[str, ...] = ("flip",)


class FakeRecipe:
    """A recipe's ``main``: trains up to ``stop_at`` (max_steps when None) and returns its outputs."""

    def __init__(self, stop_at: int | None = None):
        self.stop_at, self.calls = stop_at, []

    def __call__(self, cfg: StageConfig, config_yaml: str = "") -> dict:
        self.calls.append((cfg, config_yaml))
        step = cfg.trainer.max_steps if self.stop_at is None else self.stop_at
        checkpoints = Path(cfg.run_dir) / CHECKPOINT_DIR
        checkpoints.mkdir(parents=True, exist_ok=True)
        torch.save({"global_step": step}, checkpoints / LAST)
        return {"run_dir": Path(cfg.run_dir), "top1": 42.5, "steps": step, "note": None}


def test_a_finished_stage_is_recorded_then_skipped(tmp_path):
    main = FakeRecipe()
    stage = Stage("pretrain", main, StageConfig(init_from="elsewhere"), about="pretrain, from scratch")
    outputs = run_stage(tmp_path, stage, pipeline="test")
    stage_dir = tmp_path.resolve() / "pretrain"
    assert outputs == {"run_dir": stage_dir, "top1": 42.5, "steps": 3, "note": None}
    (cfg, config_yaml), = main.calls
    assert cfg.run_dir == str(stage_dir) and cfg.init_from == "elsewhere"
    assert stage.config.run_dir == "unset"  # the caller's config is not changed
    # config.yaml of the stage is its resolved config, as its recipe's --config reads it
    assert yaml.safe_load(config_yaml) == json.loads(json.dumps(asdict(cfg)))

    recorded = json.loads((stage_dir / STAGE_RESULT).read_text())
    assert recorded == {"run_dir": str(stage_dir), "top1": 42.5, "steps": 3, "note": None}
    assert StageResult(stage_dir).read() == recorded
    assert run_stage(tmp_path, stage, pipeline="test") == recorded and len(main.calls) == 1


def test_a_stage_stopped_before_max_steps_is_not_recorded_and_reruns(tmp_path):
    preempted = FakeRecipe(stop_at=2)
    assert run_stage(tmp_path, Stage("finetune", preempted, StageConfig()), pipeline="test") is None
    assert StageResult(tmp_path / "finetune").read() is None

    resumed = FakeRecipe()
    outputs = run_stage(tmp_path, Stage("finetune", resumed, StageConfig()), pipeline="test")
    assert len(resumed.calls) == 1 and outputs["steps"] == 3
    assert StageResult(tmp_path / "finetune").read()["steps"] == 3


def test_a_stage_that_left_no_checkpoint_is_not_finished(tmp_path):
    def no_training(cfg, config_yaml=""):
        Path(cfg.run_dir).mkdir(parents=True)
        return {"top1": 1.0}

    assert run_stage(tmp_path, Stage("empty", no_training, StageConfig()), pipeline="test") is None
    assert not (tmp_path / "empty" / STAGE_RESULT).exists()


def test_stages_stop_at_the_first_unfinished_one_and_resume_there(tmp_path, caplog):
    first, second, third = FakeRecipe(), FakeRecipe(stop_at=1), FakeRecipe()
    stages = lambda: [Stage("a", first, StageConfig()), Stage("b", second, StageConfig()),  # noqa: E731
                      Stage("c", third, StageConfig())]
    assert run_stages(tmp_path, stages(), pipeline="test") is None
    assert (len(first.calls), len(second.calls), len(third.calls)) == (1, 1, 0)

    second.stop_at = None
    with caplog.at_level("INFO"):
        results = run_stages(tmp_path, stages(), pipeline="test")
    assert list(results) == ["a", "b", "c"] and all(r["steps"] == 3 for r in results.values())
    assert (len(first.calls), len(second.calls), len(third.calls)) == (1, 2, 1)
    assert f"[test] a: finished before; results in {tmp_path.resolve() / 'a' / STAGE_RESULT}" in caplog.text
