"""RegNetY backbones (Radosavovic et al. 2020) on timm's ``RegNet``, with pycls's stage generation.

Parameter names are timm's (``stem.conv``, ``s1.b1.conv1``, ...), so timm / SWAG weights (timm
``regnety_160.swag_ft_in1k``) load strictly. The per-stage widths come from
:func:`models.pycls_complexity.regnet_stages` (pycls regnet.py), and a config may instead give the per-stage
(AnyNet) lists directly: that is what :func:`models.scaling.scale_regnet` produces.

Init follows facebookresearch/pycls ``pycls/models/blocks.py:init_weights`` and facebookresearch/SWAG
``models/regnet.py:RegNet.init_weights``: conv normal(sqrt(2 / fan_out)) with fan_out = k^2 out_channels, BatchNorm
(1, 0) (no zero-init of the last BN), Linear normal(0.01) with a zero bias. SWAG runs it before building its head,
so its head keeps PyTorch's Linear default; pycls's head gets normal(0.01), as here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.layers import calculate_drop_path_rates
from timm.models.regnet import RegNet as TimmRegNet
from timm.models.regnet import RegNetCfg
from torch import nn

from .complexity import Complexity
from .pycls_complexity import RegNetStages, anynet_counter, regnet_stages
from .registry import build_with_overrides, register_model

__all__ = ["RegNetConfig", "RegNet"]


@dataclass
class RegNetConfig:
    """A RegNetY: bottleneck blocks with SE, 3x3 stride-2 stem, four stride-2 stages (defaults: RegNetY-4GF)."""

    depth: int = 22
    """Total number of blocks d."""
    w0: int = 96
    """Initial width w0 (a multiple of 8)."""
    wa: float = 31.41
    """Width slope wa: block j has continuous width w0 + wa j before quantisation."""
    wm: float = 2.24
    """Width multiplier wm between stages (log-space quantisation step)."""
    group_width: int = 64
    """Channels per group of the 3x3 conv (g)."""
    bottleneck: float = 1.0
    """Bottleneck multiplier (1.0 for RegNetY)."""
    se_ratio: float = 0.25
    """SE width as a fraction of the block's input width (0 gives a RegNetX)."""
    stem_width: int = 32
    """Output channels of the 3x3 stride-2 stem."""
    stage_depths: tuple[int, ...] = ()
    """Explicit blocks per stage (AnyNet form, e.g. from scale_regnet); when set, depth/w0/wa/wm are ignored."""
    stage_widths: tuple[int, ...] = ()
    """Explicit output width per stage; set together with stage_depths and stage_group_widths."""
    stage_group_widths: tuple[int, ...] = ()
    """Explicit group width per stage; each stage width times bottleneck must be a multiple of it."""
    num_classes: int = 0
    """Classifier outputs; 0 means no head (forward returns the pooled features)."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate of the last block, rising linearly from 0 over all blocks (timm)."""
    img_size: int = 224
    """Input side in pixels, used only by complexity() (the network takes any size)."""

    def __post_init__(self) -> None:
        self.stage_depths, self.stage_widths, self.stage_group_widths = (
            tuple(self.stage_depths), tuple(self.stage_widths), tuple(self.stage_group_widths)
        )  # config files give lists
        self.stages()  # validates

    def stages(self) -> RegNetStages:
        """Per-stage depths, widths, group widths and bottlenecks of this network."""
        explicit = (self.stage_depths, self.stage_widths, self.stage_group_widths)
        if not any(explicit):
            stages = regnet_stages(self.depth, self.w0, self.wa, self.wm, self.group_width, self.bottleneck)
        else:
            n = len(self.stage_depths)
            if any(len(x) != n for x in explicit) or min(self.stage_depths + self.stage_widths) < 1:
                raise ValueError(f"Explicit stages need positive stage_depths, stage_widths and stage_group_widths "
                                 f"of one length; got {self.stage_depths}, {self.stage_widths}, "
                                 f"{self.stage_group_widths}.")
            bad = [(w, g) for w, g in zip(self.stage_widths, self.stage_group_widths)
                   if g < 1 or int(round(w * self.bottleneck)) % g]
            if bad:
                raise ValueError(f"Stage (width, group width) pairs {bad}: width x bottleneck {self.bottleneck} "
                                 "must be a multiple of the group width (models.pycls_complexity."
                                 "adjust_block_compatibility fixes a set of stages).")
            stages = RegNetStages(self.stage_depths, self.stage_widths, self.stage_group_widths,
                                  (self.bottleneck,) * n)
        if len(stages.depths) != 4:
            raise ValueError(f"timm's RegNet has exactly 4 stages; this config gives {len(stages.depths)} "
                             f"(widths {stages.widths}). Change depth/w0/wa/wm or the explicit stage lists.")
        return stages


class RegNet(TimmRegNet):
    """timm ``RegNet`` built from a :class:`RegNetConfig`, reporting its own complexity."""

    def __init__(self, cfg: RegNetConfig) -> None:
        stages = cfg.stages()
        # timm's __init__ calls _get_stage_args (overridden below), which reads the stages: store them first
        object.__setattr__(self, "_stages", stages)
        timm_cfg = RegNetCfg(depth=sum(stages.depths), w0=cfg.w0, wa=cfg.wa, wm=cfg.wm, group_size=cfg.group_width,
                             bottle_ratio=cfg.bottleneck, se_ratio=cfg.se_ratio, stem_width=cfg.stem_width)
        super().__init__(timm_cfg, num_classes=cfg.num_classes, drop_path_rate=cfg.drop_path_rate,
                         zero_init_last=False)
        self.cfg = cfg
        self.init_weights()

    def _get_stage_args(self, cfg: RegNetCfg, default_stride: int = 2, output_stride: int = 32,
                        drop_path_rate: float = 0.0):
        s = self._stages
        rates = calculate_drop_path_rates(drop_path_rate, list(s.depths), stagewise=True)
        per_stage = [
            dict(out_chs=w, stride=default_stride, dilation=1, depth=d, bottle_ratio=b, group_size=g,
                 drop_path_rates=r)
            for d, w, g, b, r in zip(s.depths, s.widths, s.group_widths, s.bottlenecks, rates)
        ]
        common = dict(downsample=cfg.downsample, se_ratio=cfg.se_ratio, linear_out=cfg.linear_out,
                      act_layer=cfg.act_layer, norm_layer=cfg.norm_layer)
        return per_stage, common

    @torch.no_grad()
    def init_weights(self) -> None:
        """pycls blocks.py ``init_weights``: conv normal(sqrt(2 / (k^2 out))), BN (1, 0), Linear normal(0.01).

        Unlike timm, fan_out is not divided by the groups. SE conv biases start at 0 (timm; pycls leaves
        PyTorch's default there).
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, std=math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """No parameter is exempt by name (recipes exempt norms and biases by shape)."""
        return set()

    def complexity(self) -> Complexity:
        """Per-sample forward cost at ``cfg.img_size`` in :mod:`models.complexity`'s convention (2 FLOPs per MAC)."""
        c = self.cfg
        return anynet_counter(self._stages, c.se_ratio, c.stem_width, c.img_size, c.num_classes).ours()


# -- registered sizes: (depth, w0, wa, wm, group width), pycls configs/dds_baselines/regnety (= timm regnety_*) -----
_SIZES = {
    "200mf": (13, 24, 36.44, 2.49, 8),
    "400mf": (16, 48, 27.89, 2.09, 8),
    "4gf": (22, 96, 31.41, 2.24, 64),
    "16gf": (18, 200, 106.23, 2.48, 112),
    "32gf": (20, 232, 115.89, 2.53, 232),
    "128gf": (27, 456, 160.83, 2.52, 264),  # SWAG
}


def _regnety(size: str, overrides: dict) -> RegNet:
    d, w0, wa, wm, g = _SIZES[size]
    return build_with_overrides(RegNet, RegNetConfig(depth=d, w0=w0, wa=wa, wm=wm, group_width=g), overrides)


@register_model
def regnety_200mf(**overrides) -> RegNet:
    """RegNetY-200MF: d 13, w0 24, wa 36.44, wm 2.49, g 8 (3.2 M params with a 1000-class head)."""
    return _regnety("200mf", overrides)


@register_model
def regnety_400mf(**overrides) -> RegNet:
    """RegNetY-400MF: d 16, w0 48, wa 27.89, wm 2.09, g 8."""
    return _regnety("400mf", overrides)


@register_model
def regnety_4gf(**overrides) -> RegNet:
    """RegNetY-4.0GF: d 22, w0 96, wa 31.41, wm 2.24, g 64."""
    return _regnety("4gf", overrides)


@register_model
def regnety_16gf(**overrides) -> RegNet:
    """RegNetY-16GF (pycls, SWAG): d 18, w0 200, wa 106.23, wm 2.48, g 112."""
    return _regnety("16gf", overrides)


@register_model
def regnety_32gf(**overrides) -> RegNet:
    """RegNetY-32GF (pycls, SWAG): d 20, w0 232, wa 115.89, wm 2.53, g 232."""
    return _regnety("32gf", overrides)


@register_model
def regnety_128gf(**overrides) -> RegNet:
    """RegNetY-128GF (SWAG): d 27, w0 456, wa 160.83, wm 2.52, g 264. Build on ``torch.device("meta")`` to inspect."""
    return _regnety("128gf", overrides)
