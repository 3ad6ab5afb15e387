"""The methods the training benchmark runs, each with its defaults: the LightningModule, its data config, a maker of
fresh datamodules and what its synthetic batches carry besides images."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
from lightning.pytorch import LightningDataModule

from benchmarks.config import Config
from datamodules import IMAGENET_MEAN, IMAGENET_STD
from datamodules.captions import CaptionDataConfig, caption_datamodule
from datamodules.classification import ClassificationDataConfig, prepare_data
from datamodules.conversations import ConversationDataConfig, ensure_tokenizer
from datamodules.hashtags import VOCABULARY_FILE, HashtagDataConfig, ensure_vocabulary, hashtag_datamodule
from datamodules.sharded import DataConfig, ShardedDataModule, resolve_shards
from datamodules.transforms import eval_transform, finetune_train_transform, mae_train_transform
from datamodules.video_segmentation import VideoSegmentationDataConfig, VideoSegmentationDataModule, check_video_shards
from models import list_models
from models.complexity import block_complexity
from models.plm import PerceptionLM
from models.sam.sam2 import SAM2_CONFIGS
from trainers.classification import (AugmentConfig, ClassifierConfig, EMAConfig, FinetuneOptimConfig,
                                     ImageClassification, classifier_kwargs)
from trainers.contrastive import ContrastiveOptimConfig, ContrastivePretraining
from trainers.mae import MAEModelConfig, MAEPretraining
from trainers.optim import OptimConfig, resolve_lr
from trainers.plm import PARTS, PLMModelConfig, PLMOptimConfig, PLMTraining
from trainers.sam2 import SAM2ModelConfig, SAM2OptimConfig, SAM2PromptConfig, SAM2Training
from trainers.weakly_supervised import WeaklySupervisedPretraining, WSPOptimConfig

DEFAULT_MODELS = {"mae": "mae_vit_tiny_patch8", "finetune": "vit_tiny_patch8", "swag": "vit_tiny_patch8",
                  "pe": "pe_core_nano", "sam2": "sam2.1_hiera_nano", "plm": "plm_nano"}


class Method(NamedTuple):
    """A method's module, its data config, a maker of fresh datamodules (one per run, the same seed), what its
    synthetic batches carry besides images (``synthetic_batch``'s num_classes or vocab) and, for a method whose
    cost depends on the batch (PLM: tokens and tiles), the cost of its synthetic batch (:class:`BatchCost`)."""
    module: L.LightningModule
    data: DataConfig
    datamodule: Callable[[], LightningDataModule]
    synthetic: dict
    batch_cost: Callable[[dict], BatchCost] | None = None


class BatchCost(NamedTuple):
    """What one batch costs: FLOPs in ``benchmarks.report.flop_count``'s keys (per sample of the batch), the real
    (non-pad) tokens it holds, and one line for the report's "how measured"."""
    flops: dict
    tokens: int
    how: str


def mae(cfg: Config, name: str, data: DataConfig, total: int, run_dir: Path) -> Method:
    optim, size = OptimConfig(), cfg.image_size
    module = MAEPretraining({**asdict(MAEModelConfig(name=name)), "img_size": size}, asdict(optim),
                            resolve_lr(optim, cfg.batch_size), total)
    return Method(module, data, lambda: ShardedDataModule(data, mae_train_transform(size), eval_transform(size),
                                                          cfg.seed, IMAGENET_MEAN, IMAGENET_STD), {})


def finetune(cfg: Config, name: str, data: DataConfig, total: int, run_dir: Path) -> Method:
    data = ClassificationDataConfig(**asdict(data), num_classes=cfg.num_classes)
    classes = prepare_data(data) if cfg.data == "shards" else cfg.num_classes or 1000  # prepare_data resolves
    model, optim, augment, size = ClassifierConfig(name=name), FinetuneOptimConfig(), AugmentConfig(), cfg.image_size
    module = ImageClassification(classifier_kwargs(name, classes, size, model.global_pool, model.drop_path_rate),
                                 asdict(optim), resolve_lr(optim, cfg.batch_size), total, asdict(augment),
                                 asdict(EMAConfig()))
    return Method(module, data, lambda: ShardedDataModule(
        data, finetune_train_transform(size, augment.rand_augment), eval_transform(size), cfg.seed, IMAGENET_MEAN,
        IMAGENET_STD, required_keys=("jpg", "cls")), {"num_classes": classes})


def swag(cfg: Config, name: str, data: DataConfig, total: int, run_dir: Path) -> Method:
    data, vocabulary, prior = HashtagDataConfig(**asdict(data)), None, None
    if cfg.data == "shards":
        resolve_shards(data)
        vocabulary = ensure_vocabulary(run_dir / VOCABULARY_FILE, data, is_writer=True)
        prior = torch.tensor(vocabulary.training_prior(data.balance_power))
    vocab = vocabulary.tags if vocabulary else [f"tag{i}" for i in range(cfg.num_classes or 1000)]
    optim = WSPOptimConfig()
    module = WeaklySupervisedPretraining({"name": name, "img_size": cfg.image_size, "num_classes": len(vocab)},
                                         asdict(optim), resolve_lr(optim, cfg.batch_size), total, vocab=vocab,
                                         hashtag_prior=prior)
    return Method(module, data, lambda: hashtag_datamodule(data, vocabulary, seed=cfg.seed), {"vocab": vocab})


def pe(cfg: Config, name: str, data: DataConfig, total: int, run_dir: Path) -> Method:
    data, optim = CaptionDataConfig(**asdict(data)), ContrastiveOptimConfig()
    module = ContrastivePretraining({"name": name}, asdict(optim), resolve_lr(optim, cfg.batch_size), total,
                                    image_size=cfg.image_size)
    return Method(module, data, lambda: caption_datamodule(data, cfg.seed), {"context_length": data.context_length})


class StepCountingSAM2(SAM2Training):
    """SAM2Training whose prompt decisions follow the optimizer steps in a plain loop too. They are drawn from
    (seed, global step), and without a Trainer a LightningModule's global step stays 0: a plain loop would repeat
    step 0's decisions (mask prompt or clicks, how many frames get correction clicks, so the work of the step)
    while Lightning draws new ones every step. Here a module without a Trainer counts its own optimizer steps."""

    plain_steps = 0

    @property
    def global_step(self) -> int:
        trainer = self.attached_trainer()
        return trainer.global_step if trainer is not None else self.plain_steps

    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        if self.attached_trainer() is None:
            self.plain_steps += 1


def sam2(cfg: Config, name: str, data: DataConfig, total: int, run_dir: Path) -> Method:
    """SAM 2 video training with the recipe's defaults (recipes/sam2_train.py: one mask on tracked frames, sam2's
    MOSE prompt simulation, AdamW with layer decay); the gradient clipping of the recipe's Trainer is not applied,
    as the plain loop has none."""
    if name not in SAM2_CONFIGS:
        raise ValueError(f"--trainer sam2 trains SAM 2 on clips: --model.name must be one of {', '.join(SAM2_CONFIGS)}")
    side = SAM2_CONFIGS[name].image_size
    if cfg.image_size != side:
        raise ValueError(f"{name} takes {side} x {side} frames: add --image_size {side}")
    if cfg.decode != "host":
        raise ValueError("--trainer sam2 decodes its clips in the loader workers: --decode host")
    data = VideoSegmentationDataConfig(**asdict(data), num_frames=cfg.num_frames, max_objects=cfg.objects)
    if cfg.data == "shards":
        check_video_shards(data)  # without --shards: the synthetic world's videos, not its images
    optim = SAM2OptimConfig()
    module = StepCountingSAM2(SAM2ModelConfig(name=name, multimask_output_for_tracking=False), SAM2PromptConfig(),
                              optim, resolve_lr(optim, cfg.batch_size), total, seed=cfg.seed)
    return Method(module, data, lambda: VideoSegmentationDataModule(data, cfg.seed),
                  {"num_frames": cfg.num_frames, "objects": cfg.objects})


# PLM stage 2 (Cho et al. 2025; facebookresearch/perception_models apps/plm/configs/stage_2/plm_1b.yaml): every part
# trains, with fresh LayerScale gammas at 0.1, drop path 0.1 and 2x2 pooling; thumb+tile images of up to 16 tiles
# and videos of up to 16 frames; peak rate 4e-5 after 120 warm-up steps.
PLM_STAGE2 = dict(train=["vision", "projector", "language"], layer_scale_init=0.1, pooling_ratio=2, drop_path_rate=0.1)
PLM_STAGE2_DATA = dict(vision_input="thumb+tile", max_num_tiles=16, max_video_frames=16, max_length=6144)


def plm_step_flops(model: PerceptionLM, lengths: Sequence[int], tiles: int, train: Sequence[str]) -> dict:
    """Matmul FLOPs (1 multiply-add = 2 FLOPs; norms, activations, RoPE, softmax, pooling and the loss left out) of
    one PerceptionLM training step on conversations of ``lengths`` real tokens each (visual placeholders included)
    with ``tiles`` tiles and frames in all, when the parts ``train`` train. Returns ``forward`` and ``train``.

    Forward (models.complexity conventions): per tile, the vision tower's patch embedding 2 P (3 p^2) w and its
    blocks on P + prefix tokens (``block_complexity``), then the projector's two linears on the P patches (the 2x2
    pool comes after them); per real token, 2 N_dec with N_dec the decoder's matmul weights (q, k, v and output
    projections, the SwiGLU's three, the output head; the embedding lookup is no matmul), and per sequence of T
    tokens 4 T^2 d per layer for QK^T and AV over the whole T x T square, as PaLM (arXiv 2204.02311, appendix B)
    counts attention. Backward: every matmul whose weight trains adds its forward cost for the weight gradient, and
    every matmul whose input carries a gradient adds it again for the input gradient (QK^T and AV twice: both
    operands); inputs carry a gradient from the first trained part on (vision -> projector -> language), except the
    pixels. With every part trained this is 6 N_trained per token plus 3x the attention products, less the patch
    embedding's input gradient: the 6N + 12 L d T of PaLM's MFU, with the vision tower's forward and backward per
    tile. Pad positions are computed but not counted: MFU measures the real tokens' work.
    """
    if unknown := set(train) - set(PARTS):
        raise ValueError(f"unknown part(s) {sorted(unknown)}; the parts are {list(PARTS)}")
    cfg, trunk = model.cfg, model.vision
    grads = {part: any(p in train for p in list(PARTS)[: i + 1]) for i, part in enumerate(PARTS)}

    def cost(flops: float, part: str, input_grad: bool) -> tuple[float, float]:  # (forward, training)
        return flops, flops * (1 + (part in train) + input_grad)

    # vision tower, per tile
    patch, width = trunk.patch_embed.patch_size[0], trunk.embed_dim
    patches = (cfg.image_size // patch) ** 2
    tokens = patches + trunk.num_prefix_tokens
    first = trunk.blocks[0]
    block = block_complexity(tokens, width, first.attn.num_heads, first.mlp.fc1.out_features / width)
    products = 4 * tokens**2 * width  # QK^T and AV inside block.flops
    per_tile = [cost(2 * patches * 3 * patch**2 * width, "vision", False),
                cost(cfg.vision_layers * (block.flops - products), "vision", grads["vision"]),
                (cfg.vision_layers * products, cfg.vision_layers * products * (1 + 2 * grads["vision"])),
                cost(2 * patches * width * cfg.hidden_size, "projector", grads["vision"]),
                cost(2 * patches * cfg.hidden_size**2, "projector", grads["projector"])]
    # decoder, per real token and per sequence
    d, head_dim = cfg.hidden_size, cfg.hidden_size // cfg.num_heads
    weights = cfg.num_layers * (2 * d * d + 2 * d * cfg.num_kv_heads * head_dim + 3 * d * cfg.ffn_hidden_size)
    per_token = cost(2 * (weights + d * cfg.vocab_size), "language", True)
    attention = sum(4 * n**2 * d * cfg.num_layers for n in lengths)
    total = sum(lengths)
    return {"forward": tiles * sum(f for f, _ in per_tile) + total * per_token[0] + attention,
            "train": tiles * sum(t for _, t in per_tile) + total * per_token[1] + 3 * attention}


def _plm_cost(module: PLMTraining, batch: dict) -> BatchCost:
    """The synthetic batch's real tokens (attention_mask), tiles and FLOPs per conversation (plm_step_flops)."""
    lengths = batch["attention_mask"].sum(1).tolist()
    tiles, per_tile = len(batch["media"]), module.model.tokens_per_tile
    flops = plm_step_flops(module.model, lengths, tiles, module.model_cfg.train)
    rows = len(lengths)
    how = (f"{rows} conversations right padded to {batch['input_ids'].shape[1]} tokens: {sum(lengths)} real tokens "
           f"(of them {tiles * per_tile} visual: {tiles} tiles / frames x {per_tile}); an 'image' of the figures is "
           "a conversation; tokens/s counts real tokens")
    source = ("benchmarks.methods.plm_step_flops (per conversation; training: forward + weight and input gradients, "
              f"parts trained: {', '.join(module.model_cfg.train)})")
    return BatchCost({"model_forward_flops_per_image": flops["forward"] / rows,
                      "train_flops_per_image": flops["train"] / rows, "source": source,
                      "train_source": "forward + the gradients of what trains, counted by the same function"},
                     sum(lengths), how)


def plm(cfg: Config, name: str, data: DataConfig, total: int, run_dir: Path) -> Method:
    """PerceptionLM stage 2 (``PLM_STAGE2``) on one batch of the built-in conversation world (thumb+tile images and
    video frames at the model's tile size, the chat layout of datamodules.chat, padded to a fixed length: every step
    costs the same). The recipe's gradient clipping (1.0) is the Trainer's and is not applied, as the plain loop has
    none. The step keeps the method's own choices: no attention mask, no placeholder count read back."""
    if name not in list_models("plm_*"):
        raise ValueError(f"--trainer plm trains a PerceptionLM: --model.name must be one of "
                         f"{', '.join(list_models('plm_*'))}")
    optim = PLMOptimConfig(lr=4e-5, warmup_steps=120)
    module = PLMTraining(PLMModelConfig(name=name, **PLM_STAGE2), optim, optim.lr, total)
    tile = module.model.cfg.image_size
    if cfg.image_size != tile:
        raise ValueError(f"{name} takes {tile} x {tile} tiles: add --image_size {tile}")
    if cfg.data != "synthetic":
        raise ValueError("--trainer plm measures one fixed batch of the built-in conversations (tokens and FLOPs "
                         "are counted on it): --data synthetic")
    limit = cfg.sequence_length or PLM_STAGE2_DATA["max_length"]
    conversations = ConversationDataConfig(**{**asdict(data), **PLM_STAGE2_DATA, "max_length": limit},
                                           tokens_per_tile=module.model.tokens_per_tile, tile_size=tile)
    tokenizer = ensure_tokenizer(conversations, run_dir, is_writer=True)
    synthetic = {"conversations": {"data": conversations, "tokenizer": tokenizer,
                                   "image_token_id": module.model.cfg.image_token_id,
                                   "sequence_length": cfg.sequence_length}}
    # no datamodule: the one batch is made once (training.synthetic_conversations), --data shards is refused above
    return Method(module, conversations, lambda: None, synthetic, lambda batch: _plm_cost(module, batch))


METHODS = {"mae": mae, "finetune": finetune, "swag": swag, "pe": pe, "sam2": sam2, "plm": plm}


def build_method(cfg: Config, total: int, run_dir: Path) -> tuple[str, Method]:
    """The model's name and the method of ``cfg.trainer``, its data config cut to one epoch of ``total`` batches
    (no loader restart) over the shards it will read, without validation."""
    name = cfg.model.name or DEFAULT_MODELS[cfg.trainer]
    data = DataConfig(train_shards=cfg.shards, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                      image_size=cfg.image_size, batches_per_epoch=total, decode=cfg.decode)
    method = METHODS[cfg.trainer](cfg, name, data, total, run_dir)
    if cfg.data == "shards":
        resolve_shards(method.data)  # the synthetic world unless --shards is given; a spec matching nothing fails
        method.data.val_shards = None  # validation stays out of both loops
    return name, method
