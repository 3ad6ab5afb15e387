"""Perception Encoder Core (Bolya et al. 2025): a CLIP model of timm's PE vision tower and open_clip's text tower.

    import models
    pe = models.create("pe_core_base")                  # PE-Core B/16, 224 px, random weights
    image_features, text_features, logit_scale = pe(images, text_tokens)

The towers come from the libraries that define them: timm's ``vit_pe_core_*`` (timm/models/eva.py, equal to
facebookresearch/perception_models core/vision_encoder/pe.py:VisionTransformer at the native grid) and open_clip's
``TextTransformer`` (equal to pe.py:TextTransformer key for key). Three things are fixed here for training:

- positions at any resolution, for progressive-resolution training (PE §2.1): RoPE-2D on the raw integer patch
  indices (pe.py:Rope2D never rescales them, timm rescales to ``ref_feat_shape``), and the absolute position
  embedding resampled bilinearly without antialias (pe.py:VisionTransformer._sample_abs_posemb; timm resamples
  bicubic with antialias);
- the image projection has no bias (pe.py:AttentionPooling is followed by ``x @ proj``);
- the text tower is initialised as open_clip initialises it (pe.py leaves ``positional_embedding`` and
  ``text_projection`` as ``torch.empty``), and ``logit_scale`` starts at ln(1/0.07) (CLIP §2.5).

State-dict keys are open_clip's (``visual.trunk.*``, ``text.*``, ``logit_scale``): :func:`open_clip_state_dict`
gives a file that ``open_clip.create_model("PE-Core-B-16", pretrained=...)`` loads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from functools import partial

import timm
import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm, TextTransformer
from timm.layers import resample_abs_pos_embed
from timm.models import build_model_with_cfg
from timm.models import register_model as register_timm_model
from timm.models.eva import Eva
from torch import Tensor, nn

from .complexity import Complexity, _linear, block_complexity
from .registry import create, register_config

__all__ = ["PECoreConfig", "PECore", "open_clip_state_dict", "open_clip_config"]

INIT_LOGIT_SCALE = math.log(1 / 0.07)
"""CLIP's initial temperature (Radford et al. 2021, §2.5), as PE's ``logit_scale``."""
MAX_LOGIT_SCALE = math.log(100)
"""The clamp open_clip applies after every step (open_clip_train/train.py), so logits stay <= 100 x cosine."""


@dataclass
class PECoreConfig:
    """A PE-Core CLIP model: the vision tower by its timm name (or another registered image model), the text tower."""

    vision: str = "vit_pe_core_tiny_patch16_384"
    """timm architecture of the vision tower (``timm.list_models("vit_pe_core_*")``)."""
    image_size: int = 384
    """Native resolution: the grid of the absolute position embedding; other sizes resample it."""
    embed_dim: int = 512
    """Width of the joint embedding (both projections)."""
    context_length: int = 32
    """Text tokens, start and end included (PE-Core 32; G 72)."""
    vocab_size: int = 49408
    """CLIP BPE vocabulary."""
    text_width: int = 512
    """Text tower width."""
    text_heads: int = 8
    """Text tower attention heads."""
    text_layers: int = 12
    """Text tower blocks."""
    open_clip_name: str | None = "PE-Core-T-16-384"
    """open_clip's name for this architecture (``open_clip.list_models()``), None for Prism-only sizes."""
    drop_path_rate: float = 0.0
    """Stochastic depth in the vision tower (PE-Core: 0)."""
    init_logit_scale: float = INIT_LOGIT_SCALE
    """Initial log-temperature: ln(1/0.07) for the CLIP loss, ln 10 for SigLIP's."""
    init_logit_bias: float | None = None
    """Initial value of a learned logit bias (SigLIP: -10); None: no bias (CLIP)."""
    image_tower: str | None = None
    """A registered image model (e.g. ``vit_tiny_patch16``) in place of the PE vision tower, built at image_size
    without a head: its pooled features are the image embedding and embed_dim becomes its width (locked-image
    tuning, Zhai et al. 2022, uses the frozen model's representation without a projection)."""

    def __post_init__(self) -> None:
        towers = timm.list_models("vit_pe_core_*")
        if self.image_tower is None and self.vision not in towers:
            raise ValueError(f"{self.vision!r} is not a PE-Core vision tower; timm has {towers}")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width {self.text_width} is not divisible by text_heads {self.text_heads}.")


def resample_pe_pos_embed(pos_embed: Tensor, new_size: tuple[int, int], old_size: tuple[int, int],
                          num_prefix_tokens: int) -> Tensor:
    """PE's absolute position table (1, prefix + h*w, C) at another grid as PE resamples it (pe.py:_sample_abs_posemb,
    apps/plm/interpolate_PE_pos_embed.py): bilinear, align_corners False, no antialias, prefix rows kept."""
    return resample_abs_pos_embed(pos_embed, new_size=new_size, old_size=old_size, num_prefix_tokens=num_prefix_tokens,
                                  interpolation="bilinear", antialias=False)


class _PEVisionTrunk(Eva):
    """timm's Eva with PE's positions at every grid: raw RoPE indices (see ``use_raw_rope_indices``) and the
    absolute embedding resampled as pe.py:_sample_abs_posemb does."""

    def _pos_embed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        batch, height, width, dim = x.shape  # dynamic_img_size: the patch embedding keeps the grid
        pos_embed = resample_pe_pos_embed(self.pos_embed, (height, width), self.patch_embed.grid_size, 1)
        x = torch.cat([self.cls_token.expand(batch, -1, -1), x.view(batch, -1, dim)], dim=1) + pos_embed
        return self.pos_drop(x), self.rope.get_embed(shape=(height, width))


def use_raw_rope_indices(trunk: Eva) -> None:
    """pe.py:Rope2D rotates by the raw patch index at every grid; timm rescales indices to the tower's native grid
    (``ref_feat_shape``) off it. timm.create_model drops ``ref_feat_shape=None``, so it is unset here instead."""
    trunk.rope.ref_feat_shape = None


def _vision_trunk(cfg: PECoreConfig) -> Eva:
    trunk = timm.create_model(cfg.vision, img_size=cfg.image_size, num_classes=cfg.embed_dim,
                              dynamic_img_size=True, drop_path_rate=cfg.drop_path_rate)
    use_raw_rope_indices(trunk)
    if trunk.cls_token is None or trunk.num_prefix_tokens != 1 or trunk.patch_drop is not None:
        raise ValueError(f"{cfg.vision}: PE-Core towers with one cls token and no patch dropout are supported")
    trunk.__class__ = _PEVisionTrunk  # only _pos_embed differs; timm builds (and names) everything else
    width = trunk.embed_dim
    trunk.head = nn.Linear(width, cfg.embed_dim, bias=False)
    nn.init.normal_(trunk.head.weight, std=width**-0.5)  # pe.py: proj = width^-0.5 * randn
    return trunk


class PEVisionTower(nn.Module):
    """Images (B, 3, H, W) at any multiple of the patch size -> embeddings (B, embed_dim), unnormalised."""

    def __init__(self, cfg: PECoreConfig):
        super().__init__()
        self.trunk = _vision_trunk(cfg)  # the name open_clip's TimmModel gives it

    @property
    def patch_size(self) -> int:
        return self.trunk.patch_embed.patch_size[0]

    def forward(self, images: Tensor) -> Tensor:
        return self.trunk(images)

    def forward_with_patches(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The embeddings and, from the same pass, the final normalised patch tokens (B, H/p * W/p, width)."""
        tokens = self.trunk.forward_features(images)
        return self.trunk.forward_head(tokens), tokens[:, self.trunk.num_prefix_tokens:]

    def patch_features(self, images: Tensor) -> Tensor:
        """The final normalised patch tokens (B, H/p * W/p, width), without the pooling and projection."""
        return self.trunk.forward_features(images)[:, self.trunk.num_prefix_tokens:]


class ImageModelTower(nn.Module):
    """A registered image model's pooled features (B, width) as the image embedding."""

    def __init__(self, name: str, image_size: int):
        super().__init__()
        self.model = create(name, img_size=image_size, num_classes=0)
        self.width = self.model.num_features

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)


class PECore(nn.Module):
    """The two towers and the learned temperature; ``forward`` returns what the contrastive loss takes."""

    def __init__(self, cfg: PECoreConfig):
        super().__init__()
        if cfg.image_tower:
            self.visual: nn.Module = ImageModelTower(cfg.image_tower, cfg.image_size)
            cfg = replace(cfg, embed_dim=self.visual.width, open_clip_name=None)
        else:
            self.visual = PEVisionTower(cfg)
        self.cfg = cfg
        self.image_locked = False
        # open_clip's PE-Core text settings (open_clip/model_configs/PE-Core-*.json): causal, argmax (EOT) pooling,
        # a bias-free projection, no LayerScale; its constructor initialises every weight (init_parameters).
        self.text = TextTransformer(context_length=cfg.context_length, vocab_size=cfg.vocab_size,
                                    width=cfg.text_width, heads=cfg.text_heads, layers=cfg.text_layers,
                                    output_dim=cfg.embed_dim, norm_layer=LayerNorm)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = None  # SigLIP's learned bias; open_clip's name and shape
        if cfg.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_logit_bias)))

    def lock_image(self) -> None:
        """Freeze the image tower (LiT): no gradients, eval mode from now on, and no graph kept for it."""
        self.image_locked = True
        self.visual.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> PECore:
        super().train(mode)
        if self.image_locked:
            self.visual.eval()
        return self

    def encode_image(self, images: Tensor) -> Tensor:
        if self.image_locked:
            with torch.no_grad():
                return self.visual(images)
        return self.visual(images)

    def encode_video(self, frames: Tensor) -> Tensor:
        """(B, T, 3, H, W) -> (B, embed_dim): the mean of the frames' embeddings, not renormalised
        (pe.py:CLIP.encode_video)."""
        batch, num_frames = frames.shape[:2]
        return self.encode_image(frames.flatten(0, 1)).view(batch, num_frames, -1).mean(dim=1)

    def encode_text(self, text_tokens: Tensor) -> Tensor:
        return self.text(text_tokens)

    def forward(self, images: Tensor, text_tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Unit-norm image and text embeddings, and exp(logit_scale). Images (B, 3, H, W) or videos (B, T, 3, H, W)."""
        visual = self.encode_video(images) if images.ndim == 5 else self.encode_image(images)
        return (F.normalize(visual, dim=-1), F.normalize(self.encode_text(text_tokens), dim=-1),
                self.logit_scale.exp())

    def forward_with_patches(self, images: Tensor, text_tokens: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``forward``'s three outputs and the vision tower's final patch tokens (B*T, N, width) from the same pass
        (videos: every frame's). Only the trainable PE vision tower has them."""
        if not isinstance(self.visual, PEVisionTower) or self.image_locked:
            raise ValueError("Patch features come from a trainable PE vision tower, not a locked or external one")
        frames = images.flatten(0, 1) if images.ndim == 5 else images
        visual, patches = self.visual.forward_with_patches(frames)
        if images.ndim == 5:
            visual = visual.view(*images.shape[:2], -1).mean(dim=1)  # encode_video's mean over frames
        return (F.normalize(visual, dim=-1), F.normalize(self.encode_text(text_tokens), dim=-1),
                self.logit_scale.exp(), patches)

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep the temperature in [0, ln 100], as open_clip does after every optimizer step (PE's code has no
        clamp; without one the scale can grow until the loss saturates)."""
        self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def complexity(self, image_size: int | None = None, num_frames: int = 1) -> Complexity:
        """Forward cost of one image-text pair (``num_frames`` > 1: a video of that many frames)."""
        return self.image_complexity(image_size, num_frames) + text_complexity(self.cfg)

    def image_complexity(self, image_size: int | None = None, num_frames: int = 1) -> Complexity:
        """Forward cost of the image tower on one image (or video of ``num_frames`` frames)."""
        size = image_size or self.cfg.image_size
        if isinstance(self.visual, ImageModelTower):
            if size != self.cfg.image_size:
                raise ValueError(f"{self.cfg.image_tower} is built for {self.cfg.image_size} px, not {size}")
            single = self.visual.model.complexity()
        else:
            single = vision_complexity(self.cfg, self.visual.trunk, size)
        return Complexity(single.flops * num_frames, single.params, single.activations * num_frames)


def vision_complexity(cfg: PECoreConfig, trunk: Eva, image_size: int) -> Complexity:
    """Matmul FLOPs and parameters (models.complexity conventions) of the PE vision tower at ``image_size``."""
    patch, width = trunk.patch_embed.patch_size[0], trunk.embed_dim
    heads, mlp = trunk.blocks[0].attn.num_heads, trunk.blocks[0].mlp.fc1.out_features / width
    patches = (image_size // patch) ** 2
    tokens = patches + 1
    embed = _linear(3 * patch * patch, width, patches, bias=False)
    block = block_complexity(tokens, width, heads, mlp)
    # attention pooling (timm AttentionPoolLatent, pe.py:AttentionPooling): one query against every token
    pool = (_linear(width, width, 1) + _linear(width, 2 * width, tokens) + Complexity(4 * tokens * width, 0, 0)
            + _linear(width, width, 1) + _linear(width, int(mlp * width), 1) + _linear(int(mlp * width), width, 1))
    head = _linear(width, cfg.embed_dim, 1, bias=False)
    vision = embed + _times(block, len(trunk.blocks)) + pool + head
    return Complexity(vision.flops, sum(p.numel() for p in trunk.parameters()), vision.activations)


def text_complexity(cfg: PECoreConfig) -> Complexity:
    """The text tower on one caption, plus the temperature's parameter (and the logit bias's)."""
    block = block_complexity(cfg.context_length, cfg.text_width, cfg.text_heads, 4.0)
    text = _times(block, cfg.text_layers) + _linear(cfg.text_width, cfg.embed_dim, 1, bias=False)
    embeddings = (cfg.vocab_size + cfg.context_length + 2) * cfg.text_width  # tokens, positions, ln_final
    scalars = 1 + (cfg.init_logit_bias is not None)
    return Complexity(text.flops, text.params + embeddings + scalars, text.activations)


def _times(c: Complexity, n: int) -> Complexity:
    return Complexity(c.flops * n, c.params * n, c.activations * n)


# -- open_clip format ------------------------------------------------------------------------------------------
def open_clip_config(cfg: PECoreConfig) -> dict:
    """The open_clip model config (model_configs/*.json) that builds this architecture (a SigLIP-trained model
    has a logit bias, which open_clip's own PE-Core configs do not: load it with this config)."""
    return {"embed_dim": cfg.embed_dim, "custom_text": True,
            "vision_cfg": {"image_size": cfg.image_size, "timm_model_name": cfg.vision,
                           "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": None},
            "text_cfg": {"context_length": cfg.context_length, "vocab_size": cfg.vocab_size,
                         "width": cfg.text_width, "heads": cfg.text_heads, "layers": cfg.text_layers},
            **({} if cfg.init_logit_scale == INIT_LOGIT_SCALE else {"init_logit_scale": cfg.init_logit_scale}),
            **({} if cfg.init_logit_bias is None else {"init_logit_bias": cfg.init_logit_bias})}


def open_clip_state_dict(model: PECore) -> dict[str, Tensor]:
    """The weights under open_clip's keys. open_clip's PE head has a bias that PE does not: it is written as zeros,
    so that open_clip computes what PE computes."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    head = state["visual.trunk.head.weight"]
    state["visual.trunk.head.bias"] = torch.zeros(head.shape[0], dtype=head.dtype)
    return state


# -- registered sizes ------------------------------------------------------------------------------------------
@register_timm_model
def vit_pe_core_nano_patch8_64(pretrained: bool = False, **kwargs) -> Eva:
    """Prism's CPU-sized PE-Core vision tower (4 blocks of width 96 on 8-px patches at 64 px): the PE architecture
    (RoPE-2D, cls token, attention pooling) at a size that trains in minutes on a laptop. Registered with timm so
    that open_clip can build it from an exported config."""
    if pretrained:
        raise ValueError("vit_pe_core_nano_patch8_64 has no pretrained weights")
    args = dict(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0, global_pool="map",
                attn_type="rope", use_pre_transformer_norm=True, use_rot_pos_emb=True, ref_feat_shape=(8, 8),
                rope_grid_offset=1.0, rope_grid_indexing="xy", attn_pool_num_heads=8, attn_pool_mlp_ratio=4.0,
                norm_layer=partial(nn.LayerNorm, eps=1e-5))
    kwargs.pop("pretrained_cfg", None)  # none exists: the tower has no weights to download
    return build_model_with_cfg(Eva, "vit_pe_core_nano_patch8_64", pretrained=False, **dict(args, **kwargs),
                                pretrained_cfg={"input_size": (3, 64, 64), "mean": (0.5,) * 3, "std": (0.5,) * 3})


_SIZES = {
    "pe_core_nano": PECoreConfig("vit_pe_core_nano_patch8_64", 64, 128, 32, text_width=128, text_heads=4,
                                 text_layers=4, open_clip_name=None),
    "pe_core_tiny": PECoreConfig("vit_pe_core_tiny_patch16_384", 384, 512, open_clip_name="PE-Core-T-16-384"),
    "pe_core_small": PECoreConfig("vit_pe_core_small_patch16_384", 384, 512, open_clip_name="PE-Core-S-16-384"),
    "pe_core_base": PECoreConfig("vit_pe_core_base_patch16_224", 224, 1024, text_width=1024, text_heads=16,
                                 text_layers=24, open_clip_name="PE-Core-B-16"),
    "pe_core_large": PECoreConfig("vit_pe_core_large_patch14_336", 336, 1024, text_width=1024, text_heads=16,
                                  text_layers=24, open_clip_name="PE-Core-L-14-336"),
}


for _name, _cfg in _SIZES.items():
    register_config(_name, PECore, _cfg, f"PE-Core {asdict(_cfg)}")
