"""Pipelines of training runs (MAWS: MAE -> SWAG -> finetune; later PE -> alignment -> PLM): each stage is one
recipe's ``main`` run in <pipeline dir>/<stage>, usually initialised from an earlier stage's directory.

A finished stage is not rerun: its outputs are kept in <stage dir>/stage.json, written once its training reached
max_steps. An interrupted one resumes, since its run directory holds its checkpoints, so rerunning the pipeline's
command (or a SLURM requeue) continues where it stopped. A stage is given as its ``main`` and its config, so this
module imports no recipe.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from trainers.checkpoint import checkpoint_step, find_resume_checkpoint, write_json_atomically
from trainers.run import save_config

STAGE_RESULT = "stage.json"


@dataclass(frozen=True)
class StageResult:
    """<stage dir>/stage.json: a finished stage's outputs; that it exists is what marks the stage finished."""

    stage_dir: Path

    @property
    def path(self) -> Path:
        return self.stage_dir / STAGE_RESULT

    def read(self) -> dict | None:
        """The recorded outputs, or None when the stage has not finished."""
        return json.loads(self.path.read_text()) if self.path.is_file() else None

    def write(self, outputs: dict) -> None:
        """Record ``outputs``, numbers as they are and anything else (paths) as text, in one atomic write so
        that a kill leaves either no record (the stage resumes) or a whole one."""
        plain = {k: v if v is None or isinstance(v, (int, float)) else str(v) for k, v in outputs.items()}
        write_json_atomically(self.path, plain)


@dataclass
class Cluster:
    """Where every stage runs (``slurm.submit`` fills in nodes and devices from the allocation)."""

    devices: int | str = "auto"
    """Devices per node for every stage; "auto" takes every visible GPU, or 1 CPU process."""
    num_nodes: int = 1
    """Number of nodes for every stage."""
    accelerator: str = "auto"
    """"auto", "gpu" or "cpu"."""
    strategy: str = "auto"
    """Distributed strategy of every stage (see a stage's --help for the choices)."""
    precision: str | None = None
    """Lightning precision; None picks bf16-mixed on GPU and 32-true on CPU."""


@dataclass
class Stage:
    name: str
    """Its directory under the pipeline's."""
    main: Callable[[Any, str], dict]
    """A training recipe's ``main(cfg, config_yaml)``, returning its outputs on rank 0 ({} elsewhere)."""
    config: Any
    """That recipe's config dataclass (``run_dir``, ``trainer.max_steps``); the pipeline sets its run_dir."""
    about: str = ""
    """What the log says when the stage starts (its recipe, what it starts from)."""


def run_stage(run_dir: Path, stage: Stage, *, pipeline: str) -> dict | None:
    """``stage`` in <run_dir>/<stage.name>: its recorded outputs when it finished before, else run (or resumed)
    to its end. Returns its outputs (on rank 0; {} elsewhere), or None when it stopped early (preempted): the
    same command resumes it. ``pipeline`` prefixes the log lines."""
    stage_dir = Path(run_dir).resolve() / stage.name
    record = StageResult(stage_dir)
    recorded = record.read()
    if recorded is not None:
        rank_zero_info(f"[{pipeline}] {stage.name}: finished before; results in {record.path}")
        return recorded
    config = replace(stage.config, run_dir=str(stage_dir))
    rank_zero_info(f"\n[{pipeline}] {stage.name}: {stage.about}")
    outputs = stage.main(config, config_yaml(config))
    if not reached_max_steps(stage_dir, config.trainer.max_steps):
        return None
    if rank_zero_only.rank == 0:
        record.write(outputs)
    return outputs


def run_stages(run_dir: Path, stages: Iterable[Stage], *, pipeline: str) -> dict[str, dict] | None:
    """Every stage in order (see ``run_stage``); their outputs by name, or None when one stopped before its end,
    which ends the pipeline there: a later stage would start from an unfinished one."""
    results: dict[str, dict] = {}
    for stage in stages:
        outputs = run_stage(run_dir, stage, pipeline=pipeline)
        if outputs is None:
            rank_zero_info(f"[{pipeline}] {stage.name} stopped before its end; rerun the same command to resume the "
                           "pipeline there")
            return None
        results[stage.name] = outputs
    return results


def run_pipeline(run_dir: Path, config_yaml: str, stages: Iterable[Stage], *, pipeline: str,
                 table: Callable[[dict[str, dict]], str]) -> dict[str, dict]:
    """A pipeline recipe's whole run: its config in ``run_dir`` (rank 0), ``run_stages``, then, once every stage
    finished, ``table(results)`` in <run_dir>/results.md and on stdout (rank 0). Returns the stages' outputs ({} when
    one stopped early)."""
    run_dir = Path(run_dir).resolve()
    if rank_zero_only.rank == 0:
        save_config(config_yaml, run_dir)
    results = run_stages(run_dir, stages, pipeline=pipeline)
    if results is None:
        return {}
    if rank_zero_only.rank == 0:
        text = table(results)
        (run_dir / "results.md").write_text(text + "\n")
        print(f"\n{text}\n\n  run_dir  {run_dir}\n  table    {run_dir / 'results.md'}")
    return results


def reached_max_steps(stage_dir: Path, max_steps: int) -> bool:
    """Whether the stage's newest complete checkpoint is at max_steps: the same answer on every rank, unlike the
    outputs ``main`` returns."""
    newest = find_resume_checkpoint(stage_dir)
    return newest is not None and checkpoint_step(newest) >= max_steps


def config_yaml(config: Any) -> str:
    """A stage's resolved config as its recipe's ``--config`` file reads it, for the stage's config.yaml (what a
    later evaluation reads the architecture from)."""
    return yaml.safe_dump(asdict(config), sort_keys=False)
