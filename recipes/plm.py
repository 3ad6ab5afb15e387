"""PerceptionLM's training (Cho et al. 2025, section 3) as one resumable pipeline: PE-Core contrastive pretraining,
then the decoder's language warm-up, then PLM's three stages, each initialised from the one before it.

    python -m recipes.plm                         # every stage on the synthetic world, minutes on a CPU
    python -m recipes.plm --help                  # the pipeline's settings, and every stage's under --stage1, ...
    python -m recipes.plm --vision_from runs/pe_pretrain --skip '[lm]' ...   # skip stages you have

Stages, in <run_dir>/<stage>: pe (recipes.pe_pretrain: PE-Core on image-caption pairs), lm (the decoder alone on the
conversations' text: PLM starts from a trained Llama 3, which cannot be downloaded here), stage1 (projector only, on
captions, one tile, no pooling), stage2 (everything, on the whole mixture: thumbnail + tiles, 2 x 2 pooling,
--layer_scale_init and --drop_path_rate on the tower), stage3 (everything: more tiles and frames, longer sequences).
A finished stage is not rerun (<run_dir>/<stage>/stage.json); an interrupted one resumes, so the same command (or a
SLURM requeue) continues the pipeline. All stages log to one W&B group; the table of held-out accuracies after
each stage, with the data's majority and text-only baselines, ends the run (<run_dir>/results.md).
"""

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path

from datamodules.conversations import SYNTHETIC_CONVERSATIONS, TOKENIZER_DIR, ConversationDataConfig
from datamodules.synthetic_conversations import (IMAGE_TASKS, TASKS, VIDEO_TASKS, ConversationWorldConfig,
                                                 ensure_conversation_world)
from recipes import pe_pretrain as pe_recipe
from recipes import plm_train
from recipes.cli import run_command
from trainers.build import LoggingConfig
from trainers.eval_model import PLM_STAGES
from trainers.pipeline import Cluster, Stage, run_pipeline


MODEL = "plm_micro"
"""The default pipeline's PerceptionLM: PE-Core nano's 4 blocks and a 4-layer, 192-wide decoder (2.2M parameters)."""


def _stage(train: list[str], steps: int, lr: float, warmup: int, **data) -> plm_train.Config:
    """One stage's settings on the synthetic world (``recipes/configs/plm_*`` hold PLM's own)."""
    cfg = plm_train.Config()
    cfg.model = replace(cfg.model, name=MODEL, train=train, pooling_ratio=2 if "vision" in train else 1)
    cfg.data = replace(cfg.data, **data)
    cfg.optim = replace(cfg.optim, lr=lr, warmup_steps=warmup)
    cfg.trainer = replace(cfg.trainer, max_steps=steps, val_every_n_steps=steps, checkpoint_every_n_steps=100)
    return cfg


@dataclass
class Config:
    run_dir: str = "runs/plm"
    """Pipeline directory: one run directory per stage under it, and the results table."""
    seed: int = 0
    """Seed of every stage."""
    vision_from: str | None = None
    """A finished PE-Core contrastive run (recipes.pe_pretrain) for the vision tower; None: the pe stage trains one."""
    layer_scale_init: float | None = None
    """LayerScale on the tower from stage 2 on, fresh gammas (PLM: 0.1). None at this size: on a 4-block tower it
    shrinks most of what the blocks learned, and stage 2 stayed at the majority answer (colour questions after 300
    steps: 12.5% with it and drop path, 26.6% with drop path alone, 37.5% with neither)."""
    drop_path_rate: float = 0.0
    """Stochastic depth of the tower from stage 2 on (PLM: 0.1); 0 at this size, for the same reason."""
    skip: list[str] = field(default_factory=list)
    """PLM stages not to run (of lm, stage1, stage2, stage3), e.g. [lm] when --stage1.init_from brings a trained
    decoder; the next stage starts from the last one that ran (or from --vision_from / pe)."""
    trainer: Cluster = field(default_factory=Cluster)
    """The allocation every stage runs on."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """W&B project and mode for every stage; the group defaults to the pipeline directory's name."""
    pe: pe_recipe.Config = field(default_factory=pe_recipe.Config)
    """PE-Core nano contrastive pretraining on the synthetic image-caption pairs."""
    lm: plm_train.Config = field(default_factory=lambda: _stage(["language"], 600, 1e-3, 50, text_only=True))
    """The decoder alone on the conversations' text (--skip '[lm]' where --stage1.init_from brings a trained
    decoder: a Llama or a Hugging Face PLM directory)."""
    stage1: plm_train.Config = field(
        default_factory=lambda: _stage(["projector"], 300, 1e-3, 20, tasks=["image_caption"]))
    """Projector only, on captions (PLM: 8k steps at 1e-4, batch 512, one 448 px tile, 1024 tokens per tile)."""
    stage2: plm_train.Config = field(default_factory=lambda: _stage(
        ["vision", "projector", "language"], 3000, 1e-3, 60, vision_input="thumb+tile", max_num_tiles=4,
        max_length=1280))
    """Everything, on the mixture (PLM: 35k steps at 4e-5, batch 2048, 16 tiles + thumbnail, 16 frames)."""
    stage3: plm_train.Config = field(default_factory=lambda: _stage(
        ["vision", "projector", "language"], 200, 2e-4, 10, vision_input="thumb+tile", max_num_tiles=9,
        max_length=2048))
    """Everything, more tiles and frames (PLM: 21k steps at 1e-5 (8B) / 4e-5, batch 1024, 36 tiles, 32 frames)."""

    def __post_init__(self):
        unknown = sorted(set(self.skip) - set(PLM_STAGES))
        if unknown:
            raise ValueError(f"--skip {unknown}: not a PLM stage; choose among {', '.join(PLM_STAGES)} (the pe stage is "
                             "skipped by --vision_from)")


def stages(cfg: Config) -> list[Stage]:
    """pe (unless --vision_from), then the PLM stages with a step budget, each from the one before; every stage with
    the pipeline's seed, allocation, W&B group and (after the first) the first stage's tokenizer."""
    run_dir = Path(cfg.run_dir).resolve()
    source = cfg.vision_from or str(run_dir / "pe")
    planned = [] if cfg.vision_from else [("pe", pe_recipe.main, copy.deepcopy(cfg.pe), "PE-Core contrastive")]
    tokenizer = None
    for name in PLM_STAGES:
        stage = copy.deepcopy(getattr(cfg, name))
        if name in cfg.skip:
            continue
        if "vision" in stage.model.train:
            stage.model = replace(stage.model, layer_scale_init=cfg.layer_scale_init, drop_path_rate=cfg.drop_path_rate)
        stage.init_from = stage.init_from or source
        stage.data = replace(stage.data, tokenizer=stage.data.tokenizer or tokenizer)
        tokenizer = stage.data.tokenizer or str(run_dir / name / TOKENIZER_DIR)
        planned.append((name, plm_train.main, stage, f"training {', '.join(stage.model.train)}"))
        source = str(run_dir / name)
    for name, main, stage, about in planned:
        stage.seed = cfg.seed
        stage.trainer = replace(stage.trainer, **vars(cfg.trainer))
        stage.logging = replace(cfg.logging, name=name, group=cfg.logging.group or run_dir.name)
    return [Stage(name, main, stage, f"{about}, from {getattr(stage, 'init_from', None) or 'scratch'}")
            for name, main, stage, about in planned]


def results_table(results: dict[str, dict], data: ConversationDataConfig) -> str:
    """Markdown: held-out accuracy (%) after each PLM stage that ran, per task and over the open (exact match) and
    multiple-choice questions, and the captions' CIDEr-D and BLEU-4 (x 100); on the built-in data also each task's
    majority and text-only baselines."""
    world = None if data.train_shards else ensure_conversation_world(ConversationWorldConfig(**SYNTHETIC_CONVERSATIONS))
    ran = [name for name in PLM_STAGES if name in results]
    baselines = ["majority answer", "text-only prior"] if world else []
    columns = baselines + ran
    lines = ["| held-out | " + " | ".join(columns) + " |", "|---" * (1 + len(columns)) + "|"]
    for row in ("vqa_accuracy", "mcq_accuracy", "caption_cider", "caption_bleu4", *(f"acc_{task}" for task in TASKS)):
        task = row.removeprefix("acc_")
        # the world's tasks have equal validation counts: a kind's baseline is the mean of its tasks'
        tasks = {"vqa_accuracy": IMAGE_TASKS, "mcq_accuracy": VIDEO_TASKS}.get(row, [task] if task in TASKS else [])
        known = ([100 * sum(b[t] for t in tasks) / len(tasks) for b in (world.baseline, world.text_only)]
                 if world and tasks else [None] * len(baselines))
        values = known + [results[name].get(row) for name in ran]
        lines.append(f"| {task} | " + " | ".join("-" if v is None else f"{float(v):.1f}" for v in values) + " |")
    return "\n".join(lines)


def main(cfg: Config, config_yaml: str = "") -> dict[str, dict]:
    def table(results: dict[str, dict]) -> str:
        return results_table({k: v for k, v in results.items() if k in PLM_STAGES}, cfg.lm.data)

    return run_pipeline(Path(cfg.run_dir), config_yaml, stages(cfg), pipeline="plm", table=table)


if __name__ == "__main__":
    run_command(main, Config, __doc__)
