"""One PerceptionLM training stage (Cho et al. 2025): a PE vision tower, a projector and a Llama decoder trained on
conversations, with the parts named by --model.train and the rest frozen. ``python -m recipes.plm`` runs the
stages in order; this recipe is one of them.

    python -m recipes.plm_train                   # stage 1 settings on the synthetic conversations, minutes on a CPU
    python -m recipes.plm_train --config recipes/configs/plm_1b_stage2.yaml --init_from runs/plm/stage1 \
        --data.train_shards '...' --data.tokenizer llama3_tokenizer/

Validation answers every held-out question by greedy decoding (exact match: vqa_accuracy) and every multiple-choice
one by the options' log-likelihood (mcq_accuracy), per task too, with a table of answers in W&B. The model is
exported to <run_dir>/export/hf (PerceptionLMForConditionalGeneration.from_pretrained loads it, tokenizer
included) and its vision tower alone to <run_dir>/export/pe_lang."""

from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from datamodules.chat import load_tokenizer
from datamodules.conversations import (ConversationDataConfig, ConversationDataModule, check_conversation_shards,
                                       ensure_tokenizer)
from datamodules.synthetic_conversations import TASKS
from recipes.cli import run_command
from trainers.build import LoggingConfig, TrainerConfig
from trainers.plm import AnswerTableLogger, PLMModelConfig, PLMOptimConfig, PLMTraining
from trainers.run import Export, run


@dataclass
class Config:
    run_dir: str = "runs/plm_train"
    """Run directory: config, tokenizer, checkpoints, W&B run, answer tables and exports. Reusing it resumes."""
    seed: int = 0
    """Seed of weights and data order."""
    init_from: str | list[str] | None = None
    """An earlier PLM stage (run directory or checkpoint) or a Hugging Face PerceptionLM directory; or, for one part,
    a PE-Core contrastive run (recipes.pe_pretrain) or timm PE tower directory for the vision tower and a Hugging
    Face Llama directory for the language model. A list loads each in turn: stage 1 from PE-Core and Llama 3 is
    --init_from '[PE_DIR, LLAMA_DIR]'. Ignored when run_dir already has a checkpoint."""
    model: PLMModelConfig = field(default_factory=PLMModelConfig)
    """The model, which parts train, LayerScale, pooling and drop path of the stage."""
    data: ConversationDataConfig = field(default_factory=lambda: ConversationDataConfig(tokens_per_tile=64))
    """Conversation shards, tokenizer, tiles and frames, sequence budget. tokens_per_tile follows the model."""
    optim: PLMOptimConfig = field(default_factory=PLMOptimConfig)
    """AdamW (0.9, 0.95) on every trained weight, linear warmup and cosine to lr_min_ratio."""
    trainer: TrainerConfig = field(
        default_factory=lambda: TrainerConfig(max_steps=300, val_every_n_steps=300, gradient_clip_val=1.0))
    """Devices, strategy, precision, steps, checkpoints; gradient-norm clipping at 1.0 as PLM trains."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """W&B."""


def fit_to_model(m: PLMModelConfig, d: ConversationDataConfig) -> ConversationDataConfig:
    """The model's visual tokens per tile in the data config; a typo in a model name or a tile of another size than
    the tower's fails here, before any data is read."""
    with torch.device("meta"):
        model = m.build()
    if d.tile_size != model.cfg.image_size:
        raise ValueError(f"{m.name} takes {model.cfg.image_size} px tiles, but --data.tile_size is {d.tile_size}: "
                         f"set --data.tile_size {model.cfg.image_size}")
    return replace(d, tokens_per_tile=model.tokens_per_tile)


def main(cfg: Config, config_yaml: str = "") -> dict:
    run_dir = Path(cfg.run_dir).resolve()
    d = fit_to_model(cfg.model, cfg.data)
    check_conversation_shards(d)  # an answerless conversation, too many visual tokens, a bad --data.tokenizer
    tokenizer_dir = ensure_tokenizer(d, run_dir)  # trained once per run (rank 0), reused on resume
    check_conversation_shards(d, tokenizer_dir)  # the first samples encode within --data.max_length
    tokenizer = load_tokenizer(tokenizer_dir)
    m = replace(cfg.model, vocab_size=len(tokenizer), image_token_id=tokenizer.image_token_id)
    datamodule = ConversationDataModule(d, tokenizer, cfg.seed)
    decode = partial(tokenizer.decode, skip_special_tokens=True)
    answers = AnswerTableLogger(run_dir / "answers", decode)

    def method(lr: float) -> PLMTraining:
        return PLMTraining(m, cfg.optim, lr, cfg.trainer.max_steps, decode=decode)

    def export(trained: PLMTraining, out: Export) -> dict:
        return {**trained.export(out.dir, tokenizer_dir=tokenizer_dir, step=out.step), "answers": answers.last_path}

    visual = "text only" if d.text_only else f"{d.vision_input}, {d.tokens_per_tile} tokens per {d.tile_size}px tile"
    headline = (f"PerceptionLM {m.name}: training {', '.join(m.train)}; {visual}; "
                f"tasks {', '.join(d.tasks) if d.tasks else 'all'}; {len(tokenizer)} ids")
    return run(replace(cfg, data=d, model=m), config_yaml, method, datamodule, export=export, callbacks=[answers],
               validate=bool(d.val_shards), headline=headline,
               report=("vqa_accuracy", "mcq_accuracy", "caption_cider", "caption_bleu4",
                       *(f"acc_{task}" for task in TASKS)))


if __name__ == "__main__":
    run_command(main, Config, __doc__)
