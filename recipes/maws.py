"""MAWS (Singh et al. 2023): MAE pre-pretraining -> SWAG weakly-supervised pretraining -> finetune, linear probe and
zero-shot transfer through locked-image tuning (LiT: a text tower trained against the frozen encoder).

    python -m recipes.maws                          # every stage on the built-in synthetic world, minutes on a CPU
    python -m recipes.maws --help                   # the pipeline's settings, and every stage's under --mae, --swag, ...
    python -m recipes.maws --config recipes/configs/maws_vit_huge_ig.yaml

Each stage is a resumable run in <run_dir>/<stage>, initialised from the stage before it. A finished stage
is not rerun (its results are kept in <run_dir>/<stage>/stage.json); an interrupted one resumes, so the same
command (or a SLURM requeue) picks the pipeline up where it stopped. All stages log to one W&B group.

With ``baselines`` (default) the comparison arms of the paper train too, at the same finetune budget:
(a) no pretraining, (b) SWAG only, (c) MAE only, (d) MAE then SWAG; a table of their accuracies ends the run.
"""

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from recipes import finetune as finetune_recipe
from recipes import linear_probe as probe_recipe
from recipes import mae_prepretrain as mae_recipe
from recipes import pe_pretrain as lit_recipe
from recipes import swag_pretrain as swag_recipe
from recipes.cli import run_command
from trainers.build import LoggingConfig
from trainers.pipeline import Cluster, Stage, run_pipeline


# The default pipeline runs on a laptop CPU in about twenty minutes: a ViT-Ti/16 on 64 px images (16 tokens), a few
# hundred steps per stage, validation at each stage's end. The finetune recipe's defaults already suit that (no
# mixup, CutMix, erasing, RandAugment or drop path; lr 5e-4 at batch 32). The probe keeps MAE's LARS rate 6.4: linear
# scaling to batch 32 (0.0125) barely moves the head in 100 LARS steps. LiT trains a text tower from scratch, which
# takes 600 steps (at 300 its zero-shot is still at chance). The paper's settings are in
# recipes/configs/maws_vit_huge_ig.yaml.
SMALL = {"mae": ("mae_vit_tiny_patch16", 400), "swag": ("vit_tiny_patch16", 300),
         "finetune": ("vit_tiny_patch16", 150), "linear_probe": ("vit_tiny_patch16", 100), "lit": ("pe_core_nano", 600)}


def _small(recipe, kind: str):
    def factory():
        cfg = recipe.Config()
        name, steps = SMALL[kind]
        cfg.model = replace(cfg.model, name=name)
        cfg.data = replace(cfg.data, image_size=64)
        cfg.trainer = replace(cfg.trainer, max_steps=steps, val_every_n_steps=steps, checkpoint_every_n_steps=100)
        if kind == "linear_probe":  # LARS scales each step by the weight norm: MAE's rate, not its batch scaling
            cfg.optim = replace(cfg.optim, lr=6.4)
        if kind == "lit":  # the image tower's resolution is the trunk's: no progressive schedule
            cfg.resolution = None
        return cfg

    return factory


@dataclass
class Config:
    run_dir: str = "runs/maws"
    """Pipeline directory: one run directory per stage under it, and the results table."""
    seed: int = 0
    """Seed of every stage."""
    baselines: bool = True
    """Also train the comparison arms (no pretraining, SWAG only, MAE only) at the same finetune budget."""
    probe: bool = True
    """Linear-probe every pretrained trunk as well as finetuning it."""
    zero_shot: bool = True
    """Measure every pretrained trunk's zero-shot transfer: a text tower trained against it, frozen (LiT)."""
    trainer: Cluster = field(default_factory=Cluster)
    """The allocation every stage runs on."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """W&B project and mode for every stage; the group defaults to the pipeline directory's name."""
    mae: mae_recipe.Config = field(default_factory=_small(mae_recipe, "mae"))
    """MAE pre-pretraining (its run_dir, seed, trainer allocation and logging are set by the pipeline)."""
    swag: swag_recipe.Config = field(default_factory=_small(swag_recipe, "swag"))
    """Weakly-supervised pretraining, from the MAE stage in the MAWS arm."""
    finetune: finetune_recipe.Config = field(default_factory=_small(finetune_recipe, "finetune"))
    """Finetuning of every arm, with the same budget."""
    linear_probe: probe_recipe.Config = field(default_factory=_small(probe_recipe, "linear_probe"))
    """Linear probing of every pretrained trunk."""
    lit: lit_recipe.Config = field(default_factory=_small(lit_recipe, "lit"))
    """Locked-image tuning of every pretrained trunk; the image tower is the finetune stage's model at its image size
    unless --lit.model.image_tower names it."""


RECIPES = {"mae": mae_recipe, "swag": swag_recipe, "finetune": finetune_recipe, "linear_probe": probe_recipe,
           "lit": lit_recipe}
# (stage, recipe, the stage it starts from, part of): in dependency order
STAGES = (
    ("mae", "mae", None, "maws"),
    ("mae_swag", "swag", "mae", "maws"),
    ("finetune_mae_swag", "finetune", "mae_swag", "maws"),
    ("probe_mae_swag", "linear_probe", "mae_swag", "probe"),
    ("swag", "swag", None, "baselines"),
    ("finetune_scratch", "finetune", None, "baselines"),
    ("finetune_swag", "finetune", "swag", "baselines"),
    ("finetune_mae", "finetune", "mae", "baselines"),
    ("probe_swag", "linear_probe", "swag", "baselines+probe"),
    ("probe_mae", "linear_probe", "mae", "baselines+probe"),
    ("lit_mae_swag", "lit", "mae_swag", "zero_shot"),
    ("lit_swag", "lit", "swag", "baselines+zero_shot"),
    ("lit_mae", "lit", "mae", "baselines+zero_shot"),
)
# (arm, pretraining stages, finetune stage, linear-probe stage, weakly-supervised stage, LiT stage)
ARMS = (
    ("(a) no pretraining", "-", "finetune_scratch", None, None, None),
    ("(b) SWAG only", "swag", "finetune_swag", "probe_swag", "swag", "lit_swag"),
    ("(c) MAE only", "mae", "finetune_mae", "probe_mae", None, "lit_mae"),
    ("(d) MAE -> SWAG (MAWS)", "mae -> mae_swag", "finetune_mae_swag", "probe_mae_swag", "mae_swag", "lit_mae_swag"),
)


def _wanted(part: str, cfg: Config) -> bool:
    return {"maws": True, "probe": cfg.probe, "baselines": cfg.baselines, "zero_shot": cfg.zero_shot,
            "baselines+probe": cfg.baselines and cfg.probe,
            "baselines+zero_shot": cfg.baselines and cfg.zero_shot}[part]


def _locked_image(stage: lit_recipe.Config, cfg: Config) -> lit_recipe.Config:
    """LiT on the trunk the finetune stage evaluates (its model and image size), frozen."""
    tower = stage.model.image_tower or cfg.finetune.model.name
    stage.model = replace(stage.model, lock_image=True, image_tower=tower)
    stage.data = replace(stage.data, image_size=cfg.finetune.data.image_size)
    return stage


def stages(cfg: Config) -> Iterator[Stage]:
    """The wanted stages in dependency order, each with the pipeline's seed, allocation and W&B group."""
    run_dir = Path(cfg.run_dir).resolve()
    for name, kind, init_stage, part in STAGES:
        if not _wanted(part, cfg):
            continue
        stage = copy.deepcopy(getattr(cfg, kind))
        stage.seed = cfg.seed
        stage.init_from = str(run_dir / init_stage) if init_stage else None
        stage.trainer = replace(stage.trainer, **vars(cfg.trainer))
        stage.logging = replace(cfg.logging, name=name, group=cfg.logging.group or run_dir.name,
                                image_every_n_steps=stage.logging.image_every_n_steps)
        if kind == "lit":
            stage = _locked_image(stage, cfg)
        about = f"{kind}, " + (f"initialised from {stage.init_from}" if init_stage else "from scratch")
        yield Stage(name, RECIPES[kind].main, stage, about)


def results_table(results: dict[str, dict]) -> str:
    """Markdown: finetune (and linear-probe, zero-shot) top-1 of every arm that ran."""
    def top1(stage: str | None, key: str = "top1", scale: float = 1.0) -> str:
        value = results.get(stage, {}).get(key) if stage else None
        return f"{scale * value:.1f}" if isinstance(value, (int, float)) else "-"

    lines = ["| arm | pretraining stages | finetune top-1 | linear probe top-1 | SWAG zero-shot top-1 "
             "| LiT zero-shot top-1 |", "|---|---|---|---|---|---|"]
    for arm, pretraining, ft, probe, swag, lit in ARMS:
        if ft in results:
            lines.append(f"| {arm} | {pretraining} | {top1(ft)} | {top1(probe)} | "
                         f"{top1(swag, 'zero_shot_top1', scale=100)} | {top1(lit, 'zero_shot_top1')} |")
    return "\n".join(lines)


def main(cfg: Config, config_yaml: str = "") -> dict[str, dict]:
    return run_pipeline(Path(cfg.run_dir), config_yaml, stages(cfg), pipeline="maws", table=results_table)


if __name__ == "__main__":
    run_command(main, Config, __doc__)
