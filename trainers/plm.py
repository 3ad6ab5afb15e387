"""PerceptionLM training (Cho et al. 2025) as one Prism method; the three stages differ by config only.

Stage 1 trains the projector alone on a tower without LayerScale (pooling 1, drop path 0); stages 2 and 3 train
everything, with LayerScale 0.1 on fresh gammas, drop path 0.1 and 2x2 pooling (facebookresearch/perception_models
apps/plm/configs/stage_{1,2,3}/plm_*.yaml). The next stage starts from the previous one with ``init_from``, which
accepts exactly the gammas as missing.

Batches carry ``media``, ``input_ids``, ``attention_mask`` and ``labels`` (batch_contract). The loss is next-token
cross-entropy on the labelled (assistant) tokens, averaged over the local micro-batch's target tokens as
apps/plm/transformer.py averages its ``loss_mask``ed tokens. Gradient clipping (1.0 in PLM) is the Trainer's
``gradient_clip_val``.

Validation batches carry prompts only, right padded, with ``answer_ids`` (the tokens to generate, ending with the
end-of-turn id), ``choices`` (token ids of each option; [] for an open question), ``answer_index``, ``task`` and
``key``. Open questions are answered by greedy decoding with a KV cache and scored by exact match; multiple-choice
questions by the option with the highest summed log-probability under teacher forcing.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor, nn
from transformers import LlamaForCausalLM

import models
from batch_contract import IGNORE_INDEX
from evaluation.captioning import caption_scores
from models.pe import resample_pe_pos_embed
from models.plm import PLMConfig, PerceptionLM, load_hf, save_hf
from trainers.checkpoint import save_timm_tower
from trainers.distributed import gather_objects
from trainers.handoff import load_state_dict
from trainers.method import Method, as_config
from trainers.optim import OptimConfig, build_optimizer, warmup_cosine_factor

__all__ = ["PARTS", "PLMModelConfig", "PLMOptimConfig", "PLMTraining", "response_loss", "greedy_decode",
           "option_log_probs", "validation_metrics", "caption_metrics", "example_rows", "architecture_differences",
           "load_with_fresh_gammas", "load_pe_tower", "export_pe_lang", "AnswerTableLogger", "VAL_EXAMPLES_PER_TASK"]

PARTS = {"vision": "vision.", "projector": "projector.", "language": "language_model."}
"""The parts that train or stay frozen, by parameter-name prefix of :class:`models.plm.PerceptionLM`."""
ARCHITECTURE = ("vision", "image_size", "vision_layers", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                "ffn_hidden_size", "vocab_size", "image_token_id", "rope_theta", "rope_scaling_factor",
                "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_context", "tie_word_embeddings",
                "rms_norm_eps")
"""PLMConfig fields that must agree between stages; LayerScale, pooling and drop path may change."""
VAL_EXAMPLES_PER_TASK = 2
"""Rows of ``val_examples`` kept for each task."""


@dataclass
class PLMModelConfig:
    name: str = "plm_nano"
    """Registered PerceptionLM (plm_nano, plm_1b, plm_3b, plm_8b)."""
    vocab_size: int | None = None
    """The tokenizer's length (the recipe sets it); None: the registered size's."""
    image_token_id: int | None = None
    """The tokenizer's image placeholder id (the recipe sets it); None: the registered size's."""
    train: list[str] = field(default_factory=lambda: ["projector"])
    """Parts that train (any of vision, projector, language); the others are frozen and left out of the optimizer.
    Stage 1: [projector]; stages 2-3: all three."""
    layer_scale_init: float | None = None
    """LayerScale on the vision blocks: None in stage 1, 0.1 from stage 2 on (fresh gammas)."""
    pooling_ratio: int = 1
    """Side of the average pool after the projector: 1 in stage 1, 2 in stages 2-3 (4x fewer visual tokens)."""
    drop_path_rate: float = 0.0
    """Stochastic depth of the vision blocks: 0 in stage 1, 0.1 in stages 2-3."""
    grad_checkpointing: bool = False
    """Recompute the vision blocks (timm) and decoder layers (transformers) in the backward pass instead of storing
    their activations; the loss and gradients are the same (PLM trains with full activation checkpointing)."""
    vision_layer: int | None = None
    """Blocks of the trained tower that the PE-Lang export keeps (features from the last of them); None: all, the
    layer the projector was trained on."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.train) - set(PARTS))
        if unknown or not self.train:
            raise ValueError(f"model.train must name at least one of {', '.join(PARTS)}; got {self.train}")
        if self.drop_path_rate and "vision" not in self.train:
            raise ValueError("model.drop_path_rate > 0 on a frozen vision tower only randomises the features the "
                             "projector learns from (PLM stage 1 uses 0): set it to 0 or train the vision part")
        if self.vision_layer is not None and self.vision_layer < 1:
            raise ValueError(f"model.vision_layer must be >= 1 (or None), got {self.vision_layer}")

    def build(self) -> PerceptionLM:
        overrides = dict(layer_scale_init=self.layer_scale_init, pooling_ratio=self.pooling_ratio,
                         drop_path_rate=self.drop_path_rate)
        overrides |= {k: getattr(self, k) for k in ("vocab_size", "image_token_id") if getattr(self, k) is not None}
        return models.create(self.name, **overrides)


@dataclass
class PLMOptimConfig(OptimConfig):
    lr: float | None = 1e-4
    """Peak learning rate, absolute (PLM does not scale by batch): stage 1 1e-4, stage 2 4e-5, stage 3 4e-5 (1B,
    3B) or 1e-5 (8B)."""
    warmup_steps: int = 20
    """Linear warmup from 0, in optimizer steps (stage 1: 20, stage 2: 120)."""
    weight_decay: float = 0.05
    """AdamW weight decay on every trained parameter, norms, biases and gammas included (8B: 0.05; 1B, 3B: 0.01)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas; eps is torch's default 1e-8, PLM's too."""
    lr_min_ratio: float = 0.01
    """End of the cosine decay as a fraction of the peak rate (replaces min_lr, which must stay 0)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_lr:
            raise ValueError("PLM's schedule ends at a fraction of the peak rate: set optim.lr_min_ratio, not "
                             "optim.min_lr")
        if not 0.0 <= self.lr_min_ratio <= 1.0:
            raise ValueError(f"optim.lr_min_ratio must be in [0, 1], got {self.lr_min_ratio}")


def response_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token cross-entropy averaged over the target tokens, and their count, both on the device.

    transformers' causal-LM loss takes the mean, which is 0 / 0 = NaN (and NaN gradients) for a micro-batch without
    a target; a sum divided by at least one token is the same mean otherwise, and an exact zero then, whose gradient
    (zeros) still reaches every weight the forward used. No value is read back to the host."""
    targets = labels[:, 1:]
    total = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    tokens = (targets != IGNORE_INDEX).sum()
    return total / tokens.clamp(min=1), tokens


class PLMTraining(Method):
    """Args:
        model: ``PLMModelConfig`` (or its fields); optim: ``PLMOptimConfig`` (or its fields).
        lr: the peak learning rate; total_steps: the schedule's length in optimizer steps.
    """

    batch_keys = ("media", "input_ids", "attention_mask", "labels")

    def __init__(self, model: PLMModelConfig | dict | None = None, optim: PLMOptimConfig | dict | None = None,
                 lr: float = 1e-4, total_steps: int = 1, decode: Callable[[list[int]], str] | None = None):
        super().__init__(as_config(PLMOptimConfig, optim), lr, total_steps)
        self.decode = decode
        """Token ids -> text (the run's tokenizer): with it, validation also scores the captions (caption_scores)."""
        self.model_cfg = as_config(PLMModelConfig, model)
        self.record_hparams(model=self.model_cfg, optim=self.optim_cfg, lr=lr, total_steps=total_steps)
        self.model = self.model_cfg.build()
        depth = self.model.cfg.vision_layers
        if self.model_cfg.vision_layer is not None and self.model_cfg.vision_layer > depth:
            raise ValueError(f"model.vision_layer {self.model_cfg.vision_layer} is past the tower's {depth} blocks")
        self._freeze()
        if self.model_cfg.grad_checkpointing:
            self.model.vision.set_grad_checkpointing(True)
            # non-reentrant by default; the older gradient_checkpointing_enable is a deprecated alias of it
            self.model.language_model.activation_checkpointing_enable()
        self.flops_per_sample = None  # depends on each sample's tokens; no fixed per-sample figure
        self._tokens: Tensor | None = None
        self._val: list[dict] = []
        self.val_examples: list[tuple[str, str, list[int] | int, list[int] | int]] = []
        """After a validation: a few (key, task, prediction, answer) rows of every rank's samples, as token ids (open
        questions) or option indices (multiple choice), for a table callback to decode."""

    def _freeze(self) -> None:
        """Frozen parts stay in train mode: in stage 1 they have nothing that behaves differently there (PE: no
        dropout or batch norm, drop path 0; Llama: attention dropout 0), and transformers' activation checkpointing
        only runs in train mode, which the frozen decoder still needs since the projector's gradients pass
        through it."""
        for name, param in self.model.named_parameters():
            part = next((p for p, prefix in PARTS.items() if name.startswith(prefix)), None)
            if part is None:
                raise ValueError(f"parameter {name!r} belongs to none of the parts {list(PARTS)}")
            param.requires_grad_(part in self.model_cfg.train)

    # -- training ------------------------------------------------------------------------------------------------
    def compute_loss(self, batch) -> Tensor:
        """The response loss. The attention mask is not passed: training batches are right padded (as the chat
        collation pads them), so under causal attention no real token sees a pad and the loss is the same, while
        transformers' SDPA path reads a given mask back to the host (masking_utils.py:_ignore_causal_mask_sdpa)
        every forward and, without one, runs the plain causal kernel. The placeholder count is not read back
        either: the chat collation writes ``tokens_per_tile`` of them per tile it stacks into ``media``."""
        media = batch.get("media")
        media = media if media is not None and len(media) else None  # text only: (0, 3, S, S) from the collation
        logits = self.model(media, batch["input_ids"], check_placeholders=False).logits
        loss, self._tokens = response_loss(logits, batch["labels"])
        if media is None:  # a text-only batch leaves the vision side out of the graph (DDP wants every weight)
            loss = loss + self._zero_through(("vision", "projector"))
        return loss

    def _zero_through(self, parts: tuple[str, ...]) -> Tensor:
        """0, with a gradient path to every trained weight of ``parts``."""
        prefixes = tuple(PARTS[p] for p in parts)
        weights = [p for n, p in self.model.named_parameters() if p.requires_grad and n.startswith(prefixes)]
        return sum((p.sum() for p in weights), torch.zeros((), device=self.device)) * 0.0

    def training_metrics(self) -> dict[str, Tensor]:
        return {} if self._tokens is None else {"train/tokens": self._tokens.detach().float()}

    def param_groups(self) -> list[dict]:
        # Unlike the other methods here, which spare 1-D parameters, PLM decays everything: AdamW over
        # model.parameters() with one weight decay and one rate (perception_models core/optim.py:build_optimizer).
        trained = [p for p in self.model.parameters() if p.requires_grad]
        return [{"params": trained, "weight_decay": self.optim_cfg.weight_decay}]

    def configure_optimizers(self):
        """AdamW, then linear warmup from 0 and a cosine down to ``lr_min_ratio`` of the peak (perception_models
        core/optim.py:lr_cosine with its default theta and cycle length of 1)."""
        o = self.optim_cfg
        optimizer = build_optimizer(self.param_groups(), o, self.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine_factor(step, o.warmup_steps, self.total_steps, o.lr_min_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- validation ----------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch, batch_idx):
        lm = self.model.language_model
        embeds = self.model.input_embeddings(batch["input_ids"], batch.get("media"))
        mask, choices, answers = batch["attention_mask"], batch["choices"], batch["answer_ids"]
        records: list[dict] = [{"key": k, "task": t} for k, t in zip(batch["key"], batch["task"])]
        open_rows = [b for b, options in enumerate(choices) if not options]
        mcq_rows = [b for b, options in enumerate(choices) if options]
        if open_rows:
            wanted = [[int(t) for t in answers[b]] for b in open_rows]
            if not all(wanted):
                raise ValueError("validation: an open question has empty answer_ids (they end with the end-of-turn id)")
            generated = greedy_decode(lm, embeds[open_rows], mask[open_rows], [len(a) for a in wanted],
                                      [a[-1] for a in wanted])
            for b, answer, prediction in zip(open_rows, wanted, generated):
                records[b] |= {"kind": "open", "prediction": prediction, "answer": answer,
                               "correct": prediction == answer}
        if mcq_rows:
            scores = option_log_probs(lm, embeds[mcq_rows], mask[mcq_rows], [choices[b] for b in mcq_rows])
            for b, option_scores in zip(mcq_rows, scores):
                answer = int(batch["answer_index"][b])
                if not 0 <= answer < len(option_scores):
                    raise ValueError(f"validation: answer_index {answer} of {batch['key'][b]} is not one of its "
                                     f"{len(option_scores)} choices")
                best = max(range(len(option_scores)), key=option_scores.__getitem__)
                records[b] |= {"kind": "mcq", "prediction": best, "answer": answer, "correct": best == answer}
        self._val += records

    def on_validation_epoch_end(self) -> None:
        local, self._val = self._val, []
        records = gather_objects(local)  # every rank joins, with or without samples of its own
        self.val_examples = example_rows(records)
        metrics = validation_metrics(records) | (caption_metrics(records, self.decode) if self.decode else {})
        for name, value in metrics.items():  # every rank holds the same gathered numbers
            self.log(f"val/{name}", value, prog_bar=name in ("vqa_accuracy", "mcq_accuracy"))

    # -- weights in and out --------------------------------------------------------------------------------------
    def init_from(self, source) -> list[str]:
        """A Hugging Face PerceptionLM directory (``save_hf``'s, or a converted PLM checkpoint), an earlier Prism run /
        checkpoint of a PLMTraining (keys under ``model.``), or for one part only: a Prism PE-Core contrastive run
        (keys under ``model.visual.trunk.``) or a timm PE tower directory (PE-Core's, or a PE-Lang export) for the
        vision tower, as PLM stage 1 starts from PE-Core, and a Hugging Face Llama directory for the language model,
        as it starts from Llama 3. A list applies each in turn (stage 1: ``[PE-Core, Llama]``). Strict, except that
        the LayerScale gammas may be missing altogether (stage 1 -> 2: they start at ``layer_scale_init``)."""
        if isinstance(source, (list, tuple)):
            return [line for one in source for line in self.init_from(one)]
        path = Path(source)
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else None
        if config is not None and config.get("model_type") == "llama":
            return [f"init_from {source}: Hugging Face Llama directory"] + load_llama(self.model, path)
        if config is not None and str(config.get("architecture", "")).startswith("vit_pe_"):
            weights = [path / name for name in ("model.safetensors", "pytorch_model.bin") if (path / name).is_file()]
            if not weights:
                raise FileNotFoundError(f"{source} holds a timm config.json but no model.safetensors or "
                                        "pytorch_model.bin next to it")
            return [f"init_from {source}: timm PE tower directory ({config['architecture']})"] + \
                load_pe_tower(self.model, load_state_dict(weights[0]), source)
        if config is not None:
            loaded = load_hf(path)
            differences = architecture_differences(self.model.cfg, loaded.cfg)
            if differences:
                raise ValueError(f"{source} holds another PerceptionLM: " + "; ".join(differences))
            state, origin = loaded.state_dict(), "Hugging Face PerceptionLM directory"
        else:
            full = load_state_dict(path)
            if any(k.startswith(PE_TRUNK) for k in full):
                return [f"init_from {source}: PE-Core contrastive run, keys under {PE_TRUNK!r}"] + \
                    load_pe_tower(self.model, {k[len(PE_TRUNK):]: v for k, v in full.items()
                                               if k.startswith(PE_TRUNK)}, source)
            state = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
            origin = "Prism run or checkpoint, keys under 'model.'"
        return [f"init_from {source}: {origin}"] + load_with_fresh_gammas(self.model, state, source)

    def export(self, out_dir: str | Path, tokenizer_dir: str | Path | None = None, **metadata) -> dict[str, Path]:
        """``hf/``: the whole model for ``PerceptionLMForConditionalGeneration.from_pretrained`` (with the
        tokenizer's files when ``tokenizer_dir`` is given); ``pe_lang/``: the aligned vision tower alone
        (:func:`export_pe_lang`)."""
        out_dir = Path(out_dir)
        hf = save_hf(self.model, out_dir / "hf", tokenizer_dir=tokenizer_dir)
        pe_lang = export_pe_lang(self.model, out_dir / "pe_lang", self.model_cfg.vision_layer, **metadata)
        return {"hf": hf, "pe_lang": pe_lang}


# ---- decoding and scoring ------------------------------------------------------------------------------------


def _prefill(lm: nn.Module, embeds: Tensor, mask: Tensor) -> tuple[Tensor, object, Tensor, Tensor]:
    """Run right-padded prompts (B, L, D) through the decoder, left aligned so that every row's last prompt token
    sits at L - 1 and new tokens append after it. Returns the last position's float logits (B, V), the KV cache, the
    left-aligned mask (B, L) and each prompt's length (B,)."""
    width = mask.shape[1]
    lengths = mask.sum(1)
    arange = torch.arange(width, device=mask.device)
    if not torch.equal(mask.bool(), arange < lengths[:, None]):
        raise ValueError("validation prompts must be right padded: each attention_mask row ones, then zeros")
    # row b's token i moves to i + (L - n_b): the pads come first, wrapped around
    index = (arange + lengths[:, None]) % width
    embeds = embeds.gather(1, index[..., None].expand_as(embeds))
    mask = mask.long().gather(1, index)
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # each prompt's own positions 0..n_b - 1, as without padding
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float(), out.cache, mask, lengths


def _until_stop(tokens: list[int], stop: int) -> list[int]:
    return tokens[: tokens.index(stop) + 1] if stop in tokens else tokens


@torch.no_grad()
def greedy_decode(lm: nn.Module, embeds: Tensor, mask: Tensor, max_new_tokens: list[int],
                  stop_ids: list[int]) -> list[list[int]]:
    """Greedy continuations of right-padded prompts (``embeds`` (B, L, D), ``mask`` (B, L)) with a KV cache: row b
    gets at most ``max_new_tokens[b]`` tokens and ends after its first ``stop_ids[b]``. The rows decode together for
    the longest; each is cut afterwards."""
    logits, cache, mask, lengths = _prefill(lm, embeds, mask)
    embed = lm.get_input_embeddings()
    steps, tokens = max(max_new_tokens), []
    for step in range(steps):
        tokens.append(logits.argmax(-1))
        if step + 1 == steps:
            break
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
        out = lm(inputs_embeds=embed(tokens[-1])[:, None], attention_mask=mask, position_ids=(lengths + step)[:, None],
                 cache=cache, use_cache=True)
        logits = out.logits[:, -1].float()
    generated = torch.stack(tokens, 1).tolist()
    return [_until_stop(row[:n], stop) for row, n, stop in zip(generated, max_new_tokens, stop_ids)]


@torch.no_grad()
def option_log_probs(lm: nn.Module, embeds: Tensor, mask: Tensor, choices: list[list[list[int]]]) -> list[list[float]]:
    """Sum of the log-probabilities of each option's tokens after its right-padded prompt (teacher forcing). The
    prompts run once; their KV cache is repeated for every option, and the options run together, right padded."""
    logits, cache, mask, lengths = _prefill(lm, embeds, mask)
    options = [[int(t) for t in option] for row in choices for option in row]
    if not all(options):
        raise ValueError("validation: a multiple-choice option has no tokens")
    device = mask.device
    rows = torch.tensor([b for b, row in enumerate(choices) for _ in row], device=device)
    width = max(len(o) for o in options)
    ids = torch.zeros(len(options), width, dtype=torch.long, device=device)
    valid = torch.zeros(len(options), width, dtype=torch.bool, device=device)
    for r, option in enumerate(options):
        ids[r, : len(option)] = torch.tensor(option, device=device)
        valid[r, : len(option)] = True
    scores = logits.log_softmax(-1)[rows].gather(1, ids[:, :1])[:, 0]  # the first token, from the prompt's end
    if width > 1:
        cache.reorder_cache(rows)  # one copy of the prompt's keys and values per option
        out = lm(inputs_embeds=lm.get_input_embeddings()(ids[:, :-1]),
                 attention_mask=torch.cat([mask[rows], valid[:, :-1].long()], 1),
                 position_ids=lengths[rows, None] + torch.arange(width - 1, device=device), cache=cache,
                 use_cache=True)
        rest = out.logits.float().log_softmax(-1).gather(2, ids[:, 1:, None])[..., 0]  # (R, width - 1)
        scores = scores + torch.where(valid[:, 1:], rest, 0.0).sum(1)
    flat = iter(scores.tolist())
    return [[next(flat) for _ in row] for row in choices]


def validation_metrics(records: list[dict]) -> dict[str, float]:
    """Accuracy in percent: per task (``acc_<task>``), over the open questions (``vqa_accuracy``, exact match) and
    over the multiple-choice ones (``mcq_accuracy``)."""
    by_task: dict[str, list[bool]] = defaultdict(list)
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for record in records:
        by_task[record["task"]].append(record["correct"])
        by_kind[record["kind"]].append(record["correct"])
    metrics = {f"acc_{task}": 100.0 * sum(v) / len(v) for task, v in sorted(by_task.items())}
    for kind, name in (("open", "vqa_accuracy"), ("mcq", "mcq_accuracy")):
        if by_kind[kind]:
            metrics[name] = 100.0 * sum(by_kind[kind]) / len(by_kind[kind])
    return metrics


def caption_metrics(records: list[dict], decode: Callable[[list[int]], str]) -> dict[str, float]:
    """``caption_bleu4`` (x 100) and ``caption_cider`` (CIDEr-D, x 10 as COCO reports it) of the generated captions:
    the open questions of every task whose name says caption, each against its reference answer. {} with fewer than
    two captions (CIDEr's document frequencies need a set)."""
    captions = [r for r in records if r["kind"] == "open" and "caption" in r["task"]]
    if len(captions) < 2:
        return {}
    scores = caption_scores({r["key"]: decode(r["prediction"]) for r in captions},
                            {r["key"]: [decode(r["answer"])] for r in captions})
    return {"caption_bleu4": 100 * scores["bleu4"], "caption_cider": scores["cider"]}


def example_rows(records: list[dict]) -> list[tuple]:
    """The first ``VAL_EXAMPLES_PER_TASK`` (key, task, prediction, answer) rows of each task."""
    shown: dict[str, int] = defaultdict(int)
    rows = []
    for r in records:
        if shown[r["task"]] < VAL_EXAMPLES_PER_TASK:
            shown[r["task"]] += 1
            rows.append((r["key"], r["task"], r["prediction"], r["answer"]))
    return rows


class AnswerTableLogger(Callback):
    """After each validation, the method's ``val_examples`` decoded with the run's tokenizer: a W&B table
    ``val/answers`` (key, task, prediction, answer, right) and ``<out_dir>/answers-stepNNNNNN.md``."""

    def __init__(self, out_dir: str | Path, decode: Callable[[list[int]], str]):
        self.out_dir = Path(out_dir)
        self.decode = decode
        self.last_path: Path | None = None

    def text(self, value: list[int] | int) -> str:
        """Token ids as text (the end-of-turn id dropped); an option index as "option i"."""
        return f"option {value}" if isinstance(value, int) else self.decode(value).strip()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        examples = getattr(pl_module, "val_examples", None)
        if not trainer.is_global_zero or not examples or trainer.sanity_checking:
            return
        rows = [[key, task, self.text(pred), self.text(answer), pred == answer] for key, task, pred, answer in examples]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.last_path = self.out_dir / f"answers-step{trainer.global_step:06d}.md"
        lines = ["| key | task | prediction | answer | right |", "|---|---|---|---|---|"]
        self.last_path.write_text("\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table("val/answers", columns=["key", "task", "prediction", "answer", "right"], data=rows,
                                 step=trainer.global_step)


# ---- weights in and out ----------------------------------------------------------------------------------------


def architecture_differences(ours: PLMConfig, theirs: PLMConfig) -> list[str]:
    """The ``ARCHITECTURE`` fields on which two PerceptionLM configs differ, as "field: ours vs theirs"."""
    return [f"{name}: {getattr(ours, name)!r} here vs {getattr(theirs, name)!r} there" for name in ARCHITECTURE
            if getattr(ours, name) != getattr(theirs, name)]


def _is_gamma(key: str) -> bool:
    return key.startswith("vision.blocks.") and key.rsplit(".", 1)[-1] in ("gamma_1", "gamma_2")


def load_with_fresh_gammas(model: PerceptionLM, state: dict[str, Tensor], source) -> list[str]:
    """Load ``state`` into ``model`` strictly, except that either no key or exactly every LayerScale gamma may be
    missing (a stage-1 source for a stage-2 model: the gammas keep their ``layer_scale_init``). Returns what it did,
    in lines; raises naming the keys that do not fit."""
    target = model.state_dict()
    gammas = {k for k in target if _is_gamma(k)}
    missing, unexpected = target.keys() - state.keys(), state.keys() - target.keys()
    misshaped = sorted(f"{k} {list(state[k].shape)} vs {list(target[k].shape)}"
                       for k in target.keys() & state.keys() if state[k].shape != target[k].shape)
    if unexpected or misshaped or missing not in (set(), gammas):
        raise ValueError(f"The weights in {source} do not fit this PerceptionLM:\n  missing {sorted(missing)}\n"
                         f"  unexpected {sorted(unexpected)}\n  other shape {misshaped}\n  (allowed missing: none, or "
                         f"exactly the LayerScale gammas {sorted(gammas)}). Check model.name, model.layer_scale_init "
                         "and the tokenizer's vocabulary.")
    model.load_state_dict(state, strict=False)
    lines = [f"loaded {len(target) - len(missing)} of {len(target)} tensors"]
    if missing:
        lines.append(f"LayerScale new at {model.cfg.layer_scale_init} (missing from the source): "
                     + ", ".join(sorted(missing)))
    return lines


PE_TRUNK = "model.visual.trunk."
"""Where a PE-Core contrastive run (trainers.contrastive) keeps its vision trunk."""
_PE_ONLY = ("attn_pool.", "head.", "norm.", "fc_norm.")
"""What PE-Core's tower has past the blocks PLM keeps: pooling, projection and the final norm (ln_post)."""


# The decoder's fields that change its numbers; max_position_embeddings does not (Llama 3's RoPE scaling keeps its
# own original length in rope_parameters).
_LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "rope_parameters", "tie_word_embeddings")


def load_llama(model: PerceptionLM, directory: Path) -> list[str]:
    """A Hugging Face Llama directory (``LlamaForCausalLM.save_pretrained``: Llama 3.2 1B / 3B or Llama 3.1 8B
    Instruct) into the language model, strictly, as PLM stage 1 starts its decoder from Llama 3. Every field of the
    decoder that changes its numbers must match; the vision tower and projector keep their start."""
    loaded = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    ours = model.language_model.config
    differences = [f"{name} {getattr(loaded.config, name, None)!r} (this model: {getattr(ours, name, None)!r})"
                   for name in _LLAMA_FIELDS if getattr(loaded.config, name, None) != getattr(ours, name, None)]
    if differences:
        raise ValueError(f"The Llama in {directory} does not fit this PerceptionLM's decoder: {'; '.join(differences)}"
                         ". Pick the PLM size of that Llama (--model.name plm_1b for Llama 3.2 1B, plm_3b for 3.2 3B, "
                         "plm_8b for 3.1 8B) and its tokenizer (--data.tokenizer DIR), whose length sets vocab_size.")
    model.language_model.load_state_dict(loaded.state_dict(), strict=True)
    count = sum(p.numel() for p in loaded.parameters())
    return [f"language model: {count / 1e6:.1f}M parameters from the Llama; vision tower and projector keep theirs"]


def load_pe_tower(model: PerceptionLM, trunk: dict[str, Tensor], source) -> list[str]:
    """PE-Core's trunk into the vision tower as perception_models apps/plm loads it (``strict=False`` into the kept
    blocks): blocks past ``vision_layers``, the attention pooling, projection and final norm are left out, and the
    LayerScale gammas, which PE-Core lacks, keep their start. Anything else that does not fit raises."""
    target = model.vision.state_dict()
    depth = model.cfg.vision_layers
    trunk, resampled = _pos_embed_to_grid(model, trunk)
    past = {k for k in trunk if k.startswith("blocks.") and int(k.split(".")[1]) >= depth}
    unused = past | {k for k in trunk if k.startswith(_PE_ONLY) and k not in target}
    missing = {k for k in target.keys() - trunk.keys() if not _is_gamma("vision." + k)}
    unexpected = trunk.keys() - target.keys() - unused
    misshaped = sorted(f"{k} {list(trunk[k].shape)} vs {list(target[k].shape)}"
                       for k in target.keys() & trunk.keys() if trunk[k].shape != target[k].shape)
    if missing or unexpected or misshaped:
        raise ValueError(f"The PE tower in {source} does not fit {model.cfg.vision} with {depth} blocks:\n  missing "
                         f"{sorted(missing)}\n  unexpected {sorted(unexpected)}\n  other shape {misshaped}\n  Check "
                         "that the PE tower (pe_core_*) is this PerceptionLM's vision tower (--model.name), and that "
                         "a tower with LayerScale gammas goes into a model with --model.layer_scale_init.")
    model.vision.load_state_dict({k: v for k, v in trunk.items() if k in target}, strict=False)
    return [f"vision tower: {len(target.keys() & trunk.keys())} of {len(target)} tensors from PE-Core; left out "
            f"{len(past)} tensors of blocks >= {depth} and {sorted({k.split('.')[0] for k in unused - past})}; "
            "projector and language model keep their initialisation" + resampled]


def _pos_embed_to_grid(model: PerceptionLM, trunk: dict[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """PE's position table resampled to the tower's tile grid when it was trained at another size, as PLM-1B/3B
    start from PE-Core-L14-336 at 448 px: bilinear, align_corners False, the class token's row kept
    (perception_models apps/plm/interpolate_PE_pos_embed.py). Returns the trunk and a note for the log."""
    ours, theirs = model.vision.pos_embed, trunk.get("pos_embed")
    if ours is None or theirs is None or theirs.shape == ours.shape or theirs.shape[-1] != ours.shape[-1]:
        return trunk, ""  # the same grid, or a mismatch that the caller reports
    prefix = 0 if model.vision.no_embed_class else model.vision.num_prefix_tokens
    old = math.isqrt(theirs.shape[1] - prefix)
    grid = tuple(model.vision.patch_embed.grid_size)
    resampled = resample_pe_pos_embed(theirs, grid, (old, old), prefix)
    return {**trunk, "pos_embed": resampled}, f"; position table resampled from {old}x{old} to {grid[0]}x{grid[1]}"


def export_pe_lang(model: PerceptionLM, out_dir: str | Path, vision_layer: int | None = None, **metadata) -> Path:
    """The vision tower alone (PE-Lang: PE-Core aligned by PLM training, cut at an intermediate layer, no projection,
    no final norm) as a timm model directory: ``model.safetensors`` under timm's keys and ``config.json`` in timm's
    layout, so that ``timm.create_model(config["architecture"], **config["model_args"])`` loads it strictly (and
    ``timm.create_model("local-dir:<dir>", pretrained=True)`` where the architecture has a pretrained config).

    Only the first ``vision_layer`` blocks are kept (None: all of the tower's). Its features are
    ``forward_features(x)[:, num_prefix_tokens:]``: the last kept block's patch tokens, at the tile size (the
    exported model has a fixed grid)."""
    tower, cfg = model.vision, model.cfg
    kept = vision_layer or cfg.vision_layers
    state = {k: v for k, v in tower.state_dict().items()
             if not k.startswith("blocks.") or int(k.split(".")[1]) < kept}
    # RoPE positions are scaled by ref_feat_shape / grid; the tower's own reference (None: raw positions, which
    # the tile's grid as reference gives) keeps the export's features equal to the tower's
    grid = cfg.image_size // tower.patch_embed.patch_size[0]
    ref = getattr(tower.rope, "ref_feat_shape", None)
    model_args = {"depth": kept, "init_values": cfg.layer_scale_init,
                  "ref_feat_shape": list(ref) if ref is not None else [grid, grid]}
    return save_timm_tower(tower, state, out_dir, cfg.vision, cfg.image_size, model_args,
                           {"vision_layer": kept, "tower_blocks": cfg.vision_layers,
                            "source": "PerceptionLM vision tower", **metadata})
