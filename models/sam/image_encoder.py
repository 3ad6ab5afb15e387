"""SAM 2.1 image encoder: timm's HieraDet trunk and SAM 2's feature-pyramid neck.

    from models.sam.image_encoder import SAM2_ENCODERS, SAM2ImageEncoder
    encoder = SAM2ImageEncoder(SAM2_ENCODERS["sam2_hiera_tiny"])
    out = encoder(images)          # (B, 3, 1024, 1024), normalised with the ImageNet mean and std
    out["backbone_fpn"]            # [(B, 256, 256, 256), (B, 256, 128, 128), (B, 256, 64, 64)]: strides 4, 8, 16
    out["vision_pos_enc"]          # the sine position code of each of those maps
    out["vision_features"]         # the stride-16 map, backbone_fpn[-1]

The trunk is timm's ``sam2_hiera_*`` (timm/models/hieradet_sam2.py), which computes what facebookresearch/sam2
sam2/modeling/backbones/hieradet.py:Hiera computes; timm has no neck, so :class:`FpnNeck` follows
sam2/modeling/backbones/image_encoder.py:FpnNeck with SAM 2.1's settings (1x1 laterals, nearest top-down fusion
into the two coarsest levels only, no output convs) and image_encoder.py:ImageEncoder drops the coarsest ``scalp``
levels after the fusion. Parameter names of the neck are sam2's, so an official checkpoint maps by a prefix and
the trunk's ``mlp.layers.{0,1}`` -> ``mlp.fc{1,2}`` rename (:func:`official_image_encoder_state`).

Trained from scratch the trunk starts from timm's initialisation (truncated-normal position embeddings, where
sam2 starts them at zero).
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypedDict

import timm
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg
from timm.models import register_model as register_timm_model
from timm.models.hieradet_sam2 import HieraDet
from torch import Tensor, nn

from .checkpoints import model_state, require_exact_fit
from .position_encoding import PositionEmbeddingSine

__all__ = [
    "SAM2ImageEncoderConfig", "SAM2_ENCODERS", "SAM2ImageFeatures", "FpnNeck", "SAM2ImageEncoder",
    "official_image_encoder_state",
]

POS_TEMPERATURE = 10000.0
"""Temperature of the neck's sine position code (every SAM 2.1 config)."""


@dataclass(frozen=True)
class SAM2ImageEncoderConfig:
    """One image encoder: a timm HieraDet trunk by name and the neck on top of it."""

    trunk: str = "sam2_hiera_tiny"
    """timm architecture of the trunk (``timm.list_models("sam2_hiera_*")``, or ``sam2_hiera_nano`` below)."""
    img_size: int = 1024
    """Side of the square input the model is built for (every SAM 2.1 config: 1024), which fixes the grid of the
    stride-16 embedding at img_size / 16 for the modules after the encoder. The trunk itself has no fixed size: it
    takes any side that is a multiple of ``SAM2ImageEncoder.size_divisor`` (32 for every size here)."""
    d_model: int = 256
    """Channels of every neck output (the SAM 2 transformer width)."""
    scalp: int = 1
    """Coarsest pyramid levels dropped after the top-down fusion: 1 leaves strides 4, 8 and 16."""
    fpn_top_down_levels: tuple[int, ...] = (2, 3)
    """Levels (0 = stride 4) that add the upsampled coarser output to their lateral; the others are lateral only."""
    drop_path_rate: float = 0.0
    """Stochastic depth of the trunk, rising linearly to this rate over the blocks."""


SAM2_ENCODERS: dict[str, SAM2ImageEncoderConfig] = {
    # The four sizes of sam2/configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml; timm's sam2_hiera_* defaults hold the
    # trunk settings of each.
    "sam2_hiera_tiny": SAM2ImageEncoderConfig("sam2_hiera_tiny"),
    "sam2_hiera_small": SAM2ImageEncoderConfig("sam2_hiera_small"),
    "sam2_hiera_base_plus": SAM2ImageEncoderConfig("sam2_hiera_base_plus"),
    "sam2_hiera_large": SAM2ImageEncoderConfig("sam2_hiera_large"),
    # CPU-sized, for tests and smoke runs.
    "sam2_hiera_nano": SAM2ImageEncoderConfig("sam2_hiera_nano", img_size=128, d_model=64),
}
"""The encoder of every SAM 2.1 size by its timm trunk name, and a CPU-sized one."""

SAM2_HIERA_NANO_ARGS = dict(embed_dim=32, num_heads=1, stages=(1, 1, 2, 1), global_att_blocks=(3,),
                            window_spec=(4, 4, 4, 2), global_pos_size=(4, 4))
"""HieraDet arguments of ``sam2_hiera_nano``: four stages of one or two blocks at width 32 to 256, windows that
divide the 32 x 32 token grid of a 128-px image, one global block in the third stage as in every SAM 2 size."""


@register_timm_model
def sam2_hiera_nano(pretrained: bool = False, **kwargs) -> HieraDet:
    """Prism's CPU-sized SAM 2 trunk (5 blocks, 1.2M parameters): the HieraDet architecture (windowed and
    global attention, query pooling between stages, windowed position embedding) at a size that runs in
    milliseconds. Registered with timm so that ``features_only`` and the rest of timm's API apply."""
    if pretrained:
        raise ValueError("sam2_hiera_nano has no pretrained weights")
    kwargs.pop("pretrained_cfg", None)  # none exists: the trunk has no weights to download
    return build_model_with_cfg(
        HieraDet, "sam2_hiera_nano", pretrained=False, **dict(SAM2_HIERA_NANO_ARGS, **kwargs),
        feature_cfg=dict(out_indices=4, feature_cls="getter"),
        pretrained_cfg={"input_size": (3, 128, 128), "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
                        "num_classes": 0},
    )


class SAM2ImageFeatures(TypedDict):
    """What sam2/modeling/backbones/image_encoder.py:ImageEncoder.forward returns, under its keys."""

    vision_features: Tensor
    """(B, d_model, H/16, W/16) with scalp 1: the coarsest kept level, ``backbone_fpn[-1]``."""
    vision_pos_enc: list[Tensor]
    """Sine position code of each ``backbone_fpn`` map, same shape and dtype; broadcast views over the batch,
    so clone one before writing into it."""
    backbone_fpn: list[Tensor]
    """Neck outputs, finest (stride 4) first."""


class FpnNeck(nn.Module):
    """A 1x1 lateral conv per trunk level to ``d_model`` channels, and a top-down path adding the nearest-upsampled
    coarser output into ``top_down_levels`` only (sam2/modeling/backbones/image_encoder.py:FpnNeck with
    ``fpn_interp_model="nearest"``, ``fuse_type="sum"``; no output conv).

    ``in_channels`` are finest first, as timm reports them; ``convs`` is coarsest first, as upstream's
    ``backbone_channel_list``, so that ``convs.{i}.conv.*`` holds the same tensor as in a sam2 checkpoint.
    """

    def __init__(self, in_channels: Sequence[int], d_model: int = 256, top_down_levels: Sequence[int] = (2, 3),
                 temperature: float = POS_TEMPERATURE) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        self.top_down_levels = tuple(top_down_levels)
        self.convs = nn.ModuleList(
            nn.Sequential(OrderedDict(conv=nn.Conv2d(c, d_model, kernel_size=1))) for c in reversed(self.in_channels)
        )
        self.position_encoding = PositionEmbeddingSine(d_model, temperature=temperature, normalize=True)

    def forward(self, features: Sequence[Tensor], keep: int | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Trunk maps (finest first) -> (outputs, position codes) of the ``keep`` finest levels (default: all)."""
        levels = len(self.convs)
        if len(features) != levels:
            raise ValueError(f"FpnNeck expects {levels} trunk levels, got {len(features)}")
        outputs: list[Tensor] = [None] * levels  # type: ignore[list-item]
        coarser = None
        for level in reversed(range(levels)):
            lateral = self.convs[levels - 1 - level](features[level])
            if coarser is not None and level in self.top_down_levels:
                # Upsampled in float32 as upstream does; under autocast the sum is then float32 as well.
                lateral = lateral + F.interpolate(coarser.float(), scale_factor=2.0, mode="nearest")
            outputs[level] = coarser = lateral
        outputs = outputs[:keep]
        return outputs, [self.position_code(x) for x in outputs]

    def position_code(self, x: Tensor) -> Tensor:
        """The (B, d_model, H, W) sine code of ``x``'s grid in ``x``'s dtype, one map expanded over the batch."""
        code = self.position_encoding.grid(x.shape[-2], x.shape[-1], device=x.device).to(x.dtype)
        return code[None].expand(x.shape[0], -1, -1, -1)


class SAM2ImageEncoder(nn.Module):
    """The SAM 2.1 image encoder: HieraDet trunk (``trunk``, timm's ``features_only`` wrapper around the timm model,
    which holds it as ``trunk.model``) and :class:`FpnNeck` (``neck``), the coarsest ``scalp`` levels dropped."""

    def __init__(self, cfg: SAM2ImageEncoderConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or SAM2ImageEncoderConfig()
        self.trunk = timm.create_model(cfg.trunk, features_only=True, out_indices=(0, 1, 2, 3),
                                       drop_path_rate=cfg.drop_path_rate)
        channels = self.trunk.feature_info.channels()
        self.neck = FpnNeck(channels, cfg.d_model, cfg.fpn_top_down_levels)
        self.scalp = cfg.scalp
        # Trunk widths coarsest first, as upstream's Hiera.channel_list and FpnNeck.backbone_channel_list.
        self.channel_list = channels[::-1]
        # Input sides must be multiples of this: every query pooling halves exactly (the top-down path doubles
        # back), and the first-stage window tiles the stride-4 grid a whole number of times
        # (hieradet.py:Hiera._get_pos_embed).
        windows = self.trunk.model.window_spec
        self.size_divisor = math.lcm(max(self.trunk.feature_info.reduction()), 4 * windows[0])

    def forward(self, images: Tensor) -> SAM2ImageFeatures:
        height, width = images.shape[-2:]
        if height % self.size_divisor or width % self.size_divisor:
            raise ValueError(f"{self.cfg.trunk} takes image sides that are multiples of {self.size_divisor}, "
                             f"got {height} x {width}")
        levels = len(self.neck.convs)
        features, pos = self.neck(self.trunk(images), keep=levels - self.scalp)
        return SAM2ImageFeatures(vision_features=features[-1], vision_pos_enc=pos, backbone_fpn=features)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each trunk block in the backward pass instead of keeping its activations (timm's
        ``HieraDet.set_grad_checkpointing``; the 1x1 neck keeps its few activations)."""
        self.trunk.model.set_grad_checkpointing(enable)


# -- official checkpoints --------------------------------------------------------------------------------------
_OFFICIAL_TRUNK = "image_encoder.trunk."
_OFFICIAL_NECK = "image_encoder.neck."
_OURS_TRUNK = "trunk.model."
_OURS_NECK = "neck."
_SAM2_MLP = re.compile(r"\.mlp\.layers\.([01])\.")
_TIMM_MLP = re.compile(r"\.mlp\.fc([12])\.")


def _our_key(official: str) -> str:
    """``image_encoder.*`` key of a sam2 checkpoint -> this module's key (unknown parts keep their name)."""
    if official.startswith(_OFFICIAL_TRUNK):
        rest = _SAM2_MLP.sub(lambda m: f".mlp.fc{int(m.group(1)) + 1}.", official[len(_OFFICIAL_TRUNK):])
        return _OURS_TRUNK + rest
    if official.startswith(_OFFICIAL_NECK):
        return _OURS_NECK + official[len(_OFFICIAL_NECK):]
    return official[len("image_encoder."):]


def _official_key(ours: str) -> str:
    """The inverse of :func:`_our_key`, to name a missing tensor as the checkpoint would."""
    if ours.startswith(_OURS_TRUNK):
        rest = _TIMM_MLP.sub(lambda m: f".mlp.layers.{int(m.group(1)) - 1}.", ours[len(_OURS_TRUNK):])
        return _OFFICIAL_TRUNK + rest
    if ours.startswith(_OURS_NECK):
        return _OFFICIAL_NECK + ours[len(_OURS_NECK):]
    return "image_encoder." + ours


def official_image_encoder_state(sam2_state: Mapping[str, Tensor], encoder: SAM2ImageEncoder) -> dict[str, Tensor]:
    """The ``image_encoder.*`` tensors of an official SAM 2 / 2.1 checkpoint (the state dict, or the file's
    ``{"model": state}``) under ``encoder``'s keys, ready for a strict ``encoder.load_state_dict``. Keys of the
    other SAM 2 modules are ignored. Raises ValueError naming every missing, unexpected or mis-shaped tensor, so
    a checkpoint of another size fails here with the official key names rather than deep inside loading."""
    sam2_state = model_state(sam2_state)
    mapped = {_our_key(k): v for k, v in sam2_state.items() if k.startswith("image_encoder.")}
    require_exact_fit(mapped, encoder.state_dict(), f"{encoder.cfg.trunk} (d_model {encoder.cfg.d_model})",
                      _official_key)
    return mapped
