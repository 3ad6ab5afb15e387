"""PerceptionLM (Cho et al. 2025): a PE vision tower, a two-layer MLP projector and a Llama 3 decoder.

    import models
    plm = models.create("plm_nano", vocab_size=len(tokenizer), image_token_id=tokenizer.image_token_id)
    out = plm(media, input_ids, attention_mask, labels)      # out.loss, out.logits

The parts come from the libraries that define them:

- the vision tower is timm's ``vit_pe_core_*`` Eva trunk with Prism's PE position handling
  (:class:`models.pe._PEVisionTrunk`), built as facebookresearch/perception_models apps/plm builds PE: the class
  token (L has one, G none) kept inside and stripped from the output, no attention pooling, no projection, no final
  norm (``use_ln_post: false``), only the first ``vision_layers`` blocks (core/vision_encoder/pe.py:
  VisionTransformer.truncate: 23 of PE-Core-L's 24 blocks, 47 of G's 50), and LayerScale from stage 2 on
  (timm's ``gamma_1`` / ``gamma_2``, init ``layer_scale_init``);
- the projector is transformers' ``PerceptionLMMultiModalProjector``: Linear -> GELU -> Linear, then the 2x2
  adaptive average pool, in the order of perception_models core/vision_projector/base.py:BaseProjector.forward,
  re-initialised as core/vision_projector/mlp.py:MLPProjector.init_tensors does (all four tensors, biases
  included, truncated normal with std 1/sqrt(LLM dim) cut at 3 std);
- the decoder is transformers' ``LlamaForCausalLM`` with SDPA attention.

Hugging Face interop: :func:`save_hf` writes a directory that
``transformers.PerceptionLMForConditionalGeneration.from_pretrained`` loads with identical logits, and
:func:`load_hf` reads one back (Prism's exports, and converted PLM checkpoints whose tower has these settings).
Its vision tower is a TimmWrapper naming the timm architecture; ``vit_pe_core_nano_patch8_64`` is Prism's and
exists in timm only once ``models.pe`` (imported by ``import models``) has registered it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file
from timm.layers import DropPath
from timm.models.eva import Eva
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM, PerceptionLMConfig, TimmWrapperConfig
from transformers.models.perception_lm.modeling_perception_lm import PerceptionLMMultiModalProjector

from .pe import _PEVisionTrunk, resample_pe_pos_embed, use_raw_rope_indices
from .registry import register_config

__all__ = ["IGNORE_INDEX", "PLMConfig", "PLMOutput", "PerceptionLM", "llama3_ffn_hidden_size", "llama_config",
           "hf_config", "hf_state_dict", "save_hf", "load_hf", "config_from_hf"]

IGNORE_INDEX = -100
"""Label of a position that is not a target (``torch.nn.functional.cross_entropy``'s default ignore_index)."""


def llama3_ffn_hidden_size(dim: int, ffn_dim_multiplier: float, multiple_of: int) -> int:
    """The SwiGLU width of meta-llama/llama3 llama/model.py:FeedForward: 2/3 of 4 dim, times the multiplier, rounded
    up to a multiple of ``multiple_of`` (1B: 8192, 3B: 8192, 8B: 14336)."""
    hidden = int(ffn_dim_multiplier * int(2 * 4 * dim / 3))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class PLMConfig:
    """A PerceptionLM: the PE vision tower, the projector and the Llama 3 decoder."""

    vision: str = "vit_pe_core_nano_patch8_64"
    """timm architecture of the vision tower (``timm.list_models("vit_pe_core_*")``)."""
    image_size: int = 64
    """Tile (and video frame) side in pixels, the grid of the absolute position embedding (PLM: 448)."""
    vision_layers: int = 3
    """Blocks kept from the start of the tower; features come from the last one (PLM: 23 of L's 24, 47 of G's 50)."""
    layer_scale_init: float | None = None
    """LayerScale init on every kept block; None: no LayerScale (PLM stage 1), 0.1 from stage 2 on."""
    drop_path_rate: float = 0.0
    """Stochastic depth in the vision tower, the same rate in every block as PE's (PLM stages 2-3: 0.1)."""
    pooling_ratio: int = 1
    """Side of the average pool after the projector MLP: 1 (stage 1) or 2 (stages 2-3, 1024 -> 256 per tile)."""
    hidden_size: int = 64
    """Decoder width (Llama 3 ``dim``)."""
    num_layers: int = 2
    """Decoder blocks."""
    num_heads: int = 4
    """Query heads."""
    num_kv_heads: int = 2
    """Key / value heads (grouped-query attention)."""
    ffn_dim_multiplier: float = 1.0
    """Llama 3 ``ffn_dim_multiplier`` of the SwiGLU width (:func:`llama3_ffn_hidden_size`)."""
    multiple_of: int = 64
    """Llama 3 ``multiple_of``: the SwiGLU width is rounded up to it."""
    intermediate_size: int | None = None
    """SwiGLU width given directly (a converted checkpoint's); None derives it from the two fields above."""
    vocab_size: int = 2048
    """Token vocabulary, the tokenizer's length (Llama 3: 128256)."""
    image_token_id: int = 2047
    """Placeholder id that visual tokens replace, tiles and video frames alike (Llama 3's ``<|image|>``: 128002)."""
    rope_theta: float = 500000.0
    """RoPE base (Llama 3: 5e5)."""
    rope_scaling_factor: float | None = 32.0
    """Llama 3.1 RoPE frequency scaling ``factor``; None: no scaling (PLM-8B)."""
    rope_low_freq_factor: float = 1.0
    """Llama 3.1 RoPE scaling ``low_freq_factor``."""
    rope_high_freq_factor: float = 4.0
    """Llama 3.1 RoPE scaling ``high_freq_factor``."""
    rope_original_context: int = 8192
    """Llama 3.1 RoPE scaling ``original_max_position_embeddings``."""
    max_position_embeddings: int = 131072
    """Longest sequence the decoder is configured for (Llama 3.1 / 3.2: 131072)."""
    tie_word_embeddings: bool = True
    """Share the input embedding and the output head (Llama 3.2 1B / 3B: yes; 3.1 8B: no)."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon of the decoder."""

    def __post_init__(self) -> None:
        if self.vision not in timm.list_models("vit_pe_*"):
            raise ValueError(f"{self.vision!r} is not a timm PE tower; timm has {timm.list_models('vit_pe_*')}")
        if not 0 <= self.image_token_id < self.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} is outside the vocabulary of {self.vocab_size} "
                             "tokens: set both from the tokenizer")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size {self.hidden_size}, num_heads {self.num_heads} and num_kv_heads "
                             f"{self.num_kv_heads} must divide one another")
        if self.pooling_ratio < 1:
            raise ValueError(f"pooling_ratio must be >= 1, got {self.pooling_ratio}")

    @property
    def ffn_hidden_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return llama3_ffn_hidden_size(self.hidden_size, self.ffn_dim_multiplier, self.multiple_of)


@dataclass
class PLMOutput:
    loss: Tensor | None
    """Mean cross-entropy over the labelled positions of the micro-batch (next-token), None without labels."""
    logits: Tensor
    """(B, L, vocab_size)."""


# -- vision tower ----------------------------------------------------------------------------------------------
class PLMVisionTrunk(_PEVisionTrunk):
    """The PE trunk also without a class token: timm's PE-Core-G has none (``class_token=False``), which the PE
    trunk of models.pe (built for CLIP towers with one) does not cover."""

    def _pos_embed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.cls_token is not None:
            return super()._pos_embed(x)
        batch, height, width, dim = x.shape
        pos_embed = resample_pe_pos_embed(self.pos_embed, (height, width), self.patch_embed.grid_size, 0)
        return self.pos_drop(x.view(batch, -1, dim) + pos_embed), self.rope.get_embed(shape=(height, width))

    def forward(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, H/p * W/p, width): the last kept block's patch tokens, class token stripped."""
        return self.forward_features(images)[:, self.num_prefix_tokens:]


def build_vision_trunk(cfg: PLMConfig) -> PLMVisionTrunk:
    with torch.device("meta"):
        full_depth = len(timm.create_model(cfg.vision).blocks)
    if not 1 <= cfg.vision_layers <= full_depth:
        raise ValueError(f"vision_layers must be in [1, {full_depth}] for {cfg.vision}, got {cfg.vision_layers}")
    trunk = timm.create_model(cfg.vision, img_size=cfg.image_size, depth=cfg.vision_layers, num_classes=0,
                              global_pool="", use_post_transformer_norm=False, init_values=cfg.layer_scale_init,
                              dynamic_img_size=True)
    use_raw_rope_indices(trunk)
    if trunk.num_prefix_tokens != int(trunk.cls_token is not None) or trunk.patch_drop is not None:
        raise ValueError(f"{cfg.vision}: PE towers with at most a class token and no patch dropout are supported")
    for block in trunk.blocks:  # pe.py:Transformer gives every block the same rate; timm ramps it up with depth
        block.drop_path1 = DropPath(cfg.drop_path_rate) if cfg.drop_path_rate > 0 else nn.Identity()
        block.drop_path2 = DropPath(cfg.drop_path_rate) if cfg.drop_path_rate > 0 else nn.Identity()
    trunk.__class__ = PLMVisionTrunk  # only the positions differ; timm builds (and names) everything else
    return trunk


# -- configs as transformers writes them -----------------------------------------------------------------------
def llama_config(cfg: PLMConfig) -> LlamaConfig:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling_factor is not None:
        rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor, low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_context)
    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.num_kv_heads, rms_norm_eps=cfg.rms_norm_eps,
                       max_position_embeddings=cfg.max_position_embeddings, rope_parameters=rope,
                       tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation="sdpa")


def _hf_config(cfg: PLMConfig, vision: Eva) -> PerceptionLMConfig:
    # The model_args are those of transformers' convert_perception_lm_weights_to_hf.py:write_model; the rope's
    # reference grid is the tile's grid, where timm's rescaled positions equal PE's raw ones.
    grid = cfg.image_size // vision.patch_embed.patch_size[0]
    model_args = {"embed_dim": vision.embed_dim, "depth": cfg.vision_layers, "img_size": [cfg.image_size] * 2,
                  "global_pool": "", "use_post_transformer_norm": False, "init_values": cfg.layer_scale_init,
                  "ref_feat_shape": [grid, grid]}
    vision_config = TimmWrapperConfig(architecture=cfg.vision, model_args=model_args, do_pooling=False)
    # Prism puts video frames under the image placeholder too, so both ids name it.
    return PerceptionLMConfig(vision_config=vision_config, text_config=llama_config(cfg),
                              vision_use_cls_token=vision.cls_token is not None,
                              projector_pooling_ratio=cfg.pooling_ratio, image_token_id=cfg.image_token_id,
                              video_token_id=cfg.image_token_id, tie_word_embeddings=cfg.tie_word_embeddings,
                              architectures=["PerceptionLMForConditionalGeneration"])


def _init_projector(projector: nn.Module, dim: int) -> None:
    std = dim**-0.5
    for tensor in (projector.linear_1.weight, projector.linear_1.bias, projector.linear_2.weight,
                   projector.linear_2.bias):
        nn.init.trunc_normal_(tensor, std=std, a=-3 * std, b=3 * std)


# -- the model -------------------------------------------------------------------------------------------------
class PerceptionLM(nn.Module):
    """Tiles / frames and token ids -> next-token logits (and the loss on labelled positions)."""

    def __init__(self, cfg: PLMConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = build_vision_trunk(cfg)
        self.projector = PerceptionLMMultiModalProjector(_hf_config(cfg, self.vision))
        _init_projector(self.projector, cfg.hidden_size)
        self.language_model = LlamaForCausalLM(llama_config(cfg))

    @property
    def tokens_per_tile(self) -> int:
        """Image placeholders the data side writes per tile or frame of ``image_size``."""
        grid = self.cfg.image_size // self.vision.patch_embed.patch_size[0]
        return (grid // self.cfg.pooling_ratio) ** 2

    def encode_media(self, media: Tensor) -> Tensor:
        """(N, 3, S, S) normalised tiles / frames -> (N, tokens per tile, hidden_size) visual tokens."""
        return self.projector(self.vision(media))

    def input_embeddings(self, input_ids: Tensor, media: Tensor | None = None, check_placeholders: bool = True
                         ) -> Tensor:
        """(B, L) ids -> (B, L, hidden_size) decoder inputs, the visual tokens placed at the image placeholders in
        row-major order (tile by tile, each tile's tokens in order). ``check_placeholders`` compares their count
        with the visual tokens', which reads a value back from the device; a training step whose data side writes
        ``tokens_per_tile`` placeholders per tile turns it off."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        placeholders = input_ids == self.cfg.image_token_id
        if media is None or not len(media):  # a text-only batch may carry (0, 3, S, S) media
            if check_placeholders and (count := int(placeholders.sum())):
                raise ValueError(f"{count} image tokens in input_ids but no media (0 visual tokens)")
            return embeds
        visual = self.encode_media(media)
        if check_placeholders and (count := int(placeholders.sum())) != visual.shape[0] * visual.shape[1]:
            raise ValueError(f"{count} image tokens in input_ids but {visual.shape[0] * visual.shape[1]} "
                             f"visual tokens ({visual.shape[0]} tiles x {visual.shape[1]} tokens)")
        return embeds.masked_scatter(placeholders.unsqueeze(-1), visual.to(embeds.dtype))

    def forward(self, media: Tensor | None, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, check_placeholders: bool = True) -> PLMOutput:
        """``media`` (N, 3, S, S) holds the tiles and frames of the whole batch in placeholder order (None: text
        only); ``labels`` (B, L) is ``IGNORE_INDEX`` where the position is not a target. The loss is
        transformers' causal-LM loss: position t predicts label t + 1, averaged over the labelled positions."""
        embeds = self.input_embeddings(input_ids, media, check_placeholders)
        out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels,
                                  use_cache=False)
        return PLMOutput(loss=out.loss, logits=out.logits)

    @classmethod
    def from_hf(cls, directory: str | Path, **overrides) -> PerceptionLM:
        """:func:`load_hf`."""
        return load_hf(directory, **overrides)


# -- Hugging Face format ---------------------------------------------------------------------------------------
_HF_PREFIXES = (("vision.", "model.vision_tower.timm_model."), ("projector.", "model.multi_modal_projector."),
                ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."))
"""Prism's state-dict prefixes and transformers' PerceptionLMForConditionalGeneration's."""


def _rename(key: str, pairs: tuple[tuple[str, str], ...]) -> str | None:
    for source, target in pairs:
        if key.startswith(source):
            return target + key[len(source):]
    return None


def hf_config(model: PerceptionLM) -> PerceptionLMConfig:
    """The transformers config of ``model``'s architecture."""
    return _hf_config(model.cfg, model.vision)


def hf_state_dict(model: PerceptionLM) -> dict[str, Tensor]:
    """The weights under transformers' keys; a tied output head is left out, as transformers saves it."""
    state = {_rename(k, _HF_PREFIXES): v.detach() for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        del state["lm_head.weight"]
    return state


def save_hf(model: PerceptionLM, directory: str | Path, tokenizer_dir: str | Path | None = None,
            max_shard_size: int | str = "5GB") -> Path:
    """Write ``config.json`` and safetensors weights (sharded past ``max_shard_size``) that
    ``PerceptionLMForConditionalGeneration.from_pretrained(directory)`` loads; the files of ``tokenizer_dir``
    (a ``save_pretrained`` tokenizer) are copied next to them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = hf_state_dict(model)
    config = hf_config(model)
    config.dtype = next(iter(state.values())).dtype
    config.save_pretrained(directory)
    save_torch_state_dict(state, directory, metadata={"format": "pt"}, max_shard_size=max_shard_size)
    if tokenizer_dir is not None:
        written = {p.name for p in directory.iterdir()}
        for path in sorted(Path(tokenizer_dir).iterdir()):
            if path.is_file() and path.name not in written:
                shutil.copy2(path, directory / path.name)
    return directory


def _read_hf_config(directory: Path) -> PerceptionLMConfig:
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory} is not a PerceptionLM checkpoint: it has no config.json")
    model_type = json.loads(path.read_text()).get("model_type")
    if model_type != "perception_lm":
        raise ValueError(f"{directory} is not a PerceptionLM checkpoint: its config.json has model_type "
                         f"{model_type!r}, not 'perception_lm'")
    return PerceptionLMConfig.from_pretrained(directory)


def _vision_fields(config: PerceptionLMConfig) -> dict:
    args = dict(config.vision_config.model_args or {})
    if args.get("use_post_transformer_norm") or args.get("global_pool", "") or "depth" not in args:
        raise ValueError(f"Unsupported PLM vision tower {args}: Prism's has an explicit depth, no final norm and "
                         "no pooling")
    size = args.get("img_size")
    sizes = [size, size] if isinstance(size, int) else list(size or [])
    if len(sizes) != 2 or sizes[0] != sizes[1]:
        raise ValueError(f"PLM vision tower needs a square img_size in its model_args, got {size!r}")
    return dict(vision=config.vision_config.architecture, image_size=sizes[0], vision_layers=args["depth"],
                layer_scale_init=args.get("init_values"), pooling_ratio=config.projector_pooling_ratio)


def _text_fields(config: PerceptionLMConfig) -> dict:
    text = config.text_config
    if text.head_dim != text.hidden_size // text.num_attention_heads or text.attention_bias or text.mlp_bias:
        raise ValueError("Unsupported Llama decoder: Prism's has head_dim = hidden / heads and no biases")
    rope = dict(text.rope_parameters or {})
    if rope.get("rope_type", "default") not in ("default", "llama3"):
        raise ValueError(f"Unsupported rope_parameters {rope}: Prism's decoder has Llama 3 RoPE (scaled or not)")
    scaled = rope.get("rope_type") == "llama3"
    fields = dict(hidden_size=text.hidden_size, num_layers=text.num_hidden_layers,
                  num_heads=text.num_attention_heads, num_kv_heads=text.num_key_value_heads,
                  intermediate_size=text.intermediate_size, vocab_size=text.vocab_size,
                  rope_theta=rope.get("rope_theta", 10000.0), rope_scaling_factor=rope["factor"] if scaled else None,
                  max_position_embeddings=text.max_position_embeddings, rms_norm_eps=text.rms_norm_eps,
                  tie_word_embeddings=bool(config.tie_word_embeddings), image_token_id=config.image_token_id)
    if scaled:
        fields.update(rope_low_freq_factor=rope["low_freq_factor"], rope_high_freq_factor=rope["high_freq_factor"],
                      rope_original_context=rope["original_max_position_embeddings"])
    return fields


def config_from_hf(config: PerceptionLMConfig, **overrides) -> PLMConfig:
    """The :class:`PLMConfig` of a transformers PerceptionLM config; ``overrides`` replace its fields (e.g. the
    stage's ``drop_path_rate``)."""
    return PLMConfig(**{**_vision_fields(config), **_text_fields(config), **overrides})


def _check_vision_matches(model: PerceptionLM, config: PerceptionLMConfig) -> None:
    args = config.vision_config.model_args
    grid = model.cfg.image_size // model.vision.patch_embed.patch_size[0]
    problems = []
    if config.vision_use_cls_token != (model.vision.cls_token is not None):
        problems.append(f"vision_use_cls_token {config.vision_use_cls_token} for a tower with"
                        f"{'' if model.vision.cls_token is not None else 'out'} a class token")
    if args.get("embed_dim", model.vision.embed_dim) != model.vision.embed_dim:
        problems.append(f"embed_dim {args['embed_dim']} != {model.vision.embed_dim} of {model.cfg.vision}")
    if args.get("ref_feat_shape") is not None and list(args["ref_feat_shape"]) != [grid, grid]:
        # timm rescales RoPE positions to this grid, PE (and Prism) use them raw: equal only at the tile's grid
        problems.append(f"ref_feat_shape {args['ref_feat_shape']} is not the tile's grid {[grid, grid]}")
    if problems:
        raise ValueError("The checkpoint's vision tower differs from Prism's: " + "; ".join(problems))


def _read_hf_weights(directory: Path) -> dict[str, Tensor]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{directory} has no safetensors weights (model.safetensors or an index of shards)")
    state: dict[str, Tensor] = {}
    for name in files:
        state.update(load_file(directory / name))
    return state


def load_hf(directory: str | Path, **overrides) -> PerceptionLM:
    """A :class:`PerceptionLM` from a transformers PerceptionLM directory (``save_hf``'s or a converted PLM
    checkpoint), loaded strictly; ``overrides`` replace fields of the config read from it."""
    directory = Path(directory)
    config = _read_hf_config(directory)
    model = PerceptionLM(config_from_hf(config, **overrides))
    _check_vision_matches(model, config)
    inverse = tuple((target, source) for source, target in _HF_PREFIXES)
    state, unknown = {}, []
    for key, value in _read_hf_weights(directory).items():
        ours = _rename(key, inverse)
        if ours is None:
            unknown.append(key)
        else:
            state[ours] = value
    if unknown:
        raise ValueError(f"{directory}: weights outside a PerceptionLM: {unknown[:10]}")
    head, embed = "language_model.lm_head.weight", "language_model.model.embed_tokens.weight"
    if model.cfg.tie_word_embeddings and head not in state and embed in state:
        state[head] = state[embed]  # transformers leaves a tied head out of the file
    model.load_state_dict(state, strict=True)
    return model


# -- registered sizes ------------------------------------------------------------------------------------------
_LLAMA_1B = dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, ffn_dim_multiplier=1.5,
                 multiple_of=256)
_LLAMA_3B = dict(hidden_size=3072, num_layers=28, num_heads=24, num_kv_heads=8, ffn_dim_multiplier=1.0,
                 multiple_of=256)
_LLAMA_8B = dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, ffn_dim_multiplier=1.3,
                 multiple_of=1024, rope_scaling_factor=None, tie_word_embeddings=False)
_PE_L_448 = dict(vision="vit_pe_core_large_patch14_336", image_size=448, vision_layers=23)
_PE_G_448 = dict(vision="vit_pe_core_gigantic_patch14_448", image_size=448, vision_layers=47)
_LLAMA3_VOCAB = dict(vocab_size=128256, image_token_id=128002)

_SIZES = {
    "plm_nano": PLMConfig(),
    "plm_micro": PLMConfig(vision_layers=4, hidden_size=192, num_layers=4, num_heads=6, num_kv_heads=2),
    "plm_1b": PLMConfig(**_PE_L_448, **_LLAMA_1B, **_LLAMA3_VOCAB),
    "plm_3b": PLMConfig(**_PE_L_448, **_LLAMA_3B, **_LLAMA3_VOCAB),
    "plm_8b": PLMConfig(**_PE_G_448, **_LLAMA_8B, **_LLAMA3_VOCAB),
}

for _name, _cfg in _SIZES.items():
    register_config(_name, PerceptionLM, _cfg, f"PerceptionLM (stage-1 settings) {_cfg}")
