"""Model complexity counted exactly as facebookresearch/pycls counts it, for RegNet/AnyNet and ViT.

pycls's convention differs from :mod:`models.complexity` (ours, used for MFU) and is the one its papers
report (RegNet, "Fast and Accurate Model Scaling", ViT_C) and ``dev/model_complexity.json`` pins:

* ``flops`` are **multiply-adds**: conv ``k^2 w_in w_out h w / groups`` (+ ``w_out h w`` with a bias), linear
  ``w_in w_out L`` (+ ``w_out L`` with a bias), attention ``QK^T`` and ``AV`` ``d L^2`` each. Norms, activations,
  pooling, softmax and residual adds count 0 (pycls/models/blocks.py ``*_cx``).
* ``params``: conv/linear weights and biases, ``2 w`` per BatchNorm/LayerNorm, cls token and position table.
* ``acts``: output elements of conv, linear and patchify layers, plus ``heads L^2`` attention scores.

The counter also keeps the bias adds apart, so :meth:`Counter.ours` gives our convention (2 FLOPs per
multiply-add, biases left out) from the same walk over the architecture.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

from .complexity import Complexity

__all__ = [
    "PyclsComplexity",
    "Counter",
    "RegNetStages",
    "adjust_block_compatibility",
    "regnet_stages",
    "anynet_counter",
    "anynet_complexity",
    "regnet_complexity",
    "stem_counter",
    "vit_counter",
    "vit_complexity_pycls",
]


@dataclass(frozen=True)
class PyclsComplexity:
    """Per-sample forward cost in pycls's convention."""

    flops: int
    """Multiply-adds, bias adds included (pycls ``flops``; half of what MFU tools call FLOPs)."""
    params: int
    """Parameter elements (norms count 2 per channel)."""
    acts: int
    """Output elements of conv/linear/patchify layers and attention score maps."""


class Counter:
    """Walks a network layer by layer, tracking the spatial size like pycls's ``cx`` dict."""

    def __init__(self, h: int, w: int | None = None) -> None:
        self.h, self.w = h, h if w is None else w
        self.macs = self.bias_adds = self.params = self.acts = 0

    def conv(self, w_in: int, w_out: int, k: int, stride: int = 1, groups: int = 1, bias: bool = False) -> None:
        """``k x k`` conv with padding ``(k - 1) // 2`` (pycls ``conv2d_cx``)."""
        self.h, self.w = (self.h - 1) // stride + 1, (self.w - 1) // stride + 1
        hw = self.h * self.w
        self.macs += k * k * w_in * w_out * hw // groups
        self.bias_adds += w_out * hw if bias else 0
        self.params += k * k * w_in * w_out // groups + (w_out if bias else 0)
        self.acts += w_out * hw

    def patchify(self, w_in: int, w_out: int, k: int, bias: bool = True) -> None:
        """``k x k`` conv with stride ``k`` and no padding (pycls ``patchify2d_cx``)."""
        if self.h % k or self.w % k:
            raise ValueError(f"Patchify with patch {k} needs an input side divisible by it, got {self.h}x{self.w}.")
        self.h, self.w = self.h // k, self.w // k
        hw = self.h * self.w
        self.macs += k * k * w_in * w_out * hw
        self.bias_adds += w_out * hw if bias else 0
        self.params += k * k * w_in * w_out + (w_out if bias else 0)
        self.acts += w_out * hw

    def norm(self, width: int) -> None:
        """BatchNorm or LayerNorm: weight + bias, no flops, no acts."""
        self.params += 2 * width

    def linear(self, w_in: int, w_out: int, bias: bool = True, locations: int = 1) -> None:
        """Linear applied at ``locations`` positions (tokens), pycls ``linear_cx``."""
        self.macs += w_in * w_out * locations
        self.bias_adds += w_out * locations if bias else 0
        self.params += w_in * w_out + (w_out if bias else 0)
        self.acts += w_out * locations

    def attention(self, dim: int, heads: int, tokens: int, qkv_bias: bool = True) -> None:
        """Multi-head self-attention (pycls ``MultiheadAttention.complexity``): qkv, scores, AV, out proj."""
        self.linear(dim, 3 * dim, qkv_bias, tokens)
        self.macs += 2 * dim * tokens * tokens  # QK^T and AV, summed over heads: head_d * heads = dim
        self.acts += heads * tokens * tokens + dim * tokens  # score maps + AV output
        self.linear(dim, dim, True, tokens)

    def pycls(self) -> PyclsComplexity:
        """Totals in pycls's convention."""
        return PyclsComplexity(self.macs + self.bias_adds, self.params, self.acts)

    def ours(self) -> Complexity:
        """Totals in :mod:`models.complexity`'s convention: 2 FLOPs per multiply-add, bias adds left out."""
        return Complexity(2 * self.macs, self.params, self.acts)


# -- RegNet / AnyNet (pycls/models/regnet.py, anynet.py, blocks.py) --------------------------------------------------
@dataclass(frozen=True)
class RegNetStages:
    """Per-stage (AnyNet) description of a RegNet: what pycls builds and what the scaler scales."""

    depths: tuple[int, ...]
    """Blocks per stage."""
    widths: tuple[int, ...]
    """Output channels per stage."""
    group_widths: tuple[int, ...]
    """Channels per group of the 3x3 conv in each stage."""
    bottlenecks: tuple[float, ...]
    """Bottleneck multiplier per stage (1.0 for RegNetY)."""


def adjust_block_compatibility(
    widths: Sequence[int], bottlenecks: Sequence[float], group_widths: Sequence[int]
) -> tuple[list[int], list[float], list[int]]:
    """Make every bottleneck width a multiple of its group width (pycls blocks.py ``adjust_block_compatibility``).

    The group width is capped at the bottleneck width; the bottleneck width is rounded (Python ``round``:
    halves to even, as pycls) to a multiple of ``lcm(group, bottleneck)``, never below one multiple.
    """
    if not len(widths) == len(bottlenecks) == len(group_widths):
        raise ValueError(f"Need one width, bottleneck and group width per stage, got {widths}, {bottlenecks}, "
                         f"{group_widths}.")
    if not all(w > 0 and b > 0 and g > 0 for w, b, g in zip(widths, bottlenecks, group_widths)):
        raise ValueError(f"Widths, bottlenecks and group widths must be positive: {widths}, {bottlenecks}, "
                         f"{group_widths}.")
    vs = [int(max(1, w * b)) for w, b in zip(widths, bottlenecks)]
    gs = [int(min(g, v)) for g, v in zip(group_widths, vs)]
    ms = [math.lcm(g, int(b)) if b > 1 else g for g, b in zip(gs, bottlenecks)]
    vs = [max(m, int(round(v / m) * m)) for v, m in zip(vs, ms)]
    ws = [int(v / b) for v, b in zip(vs, bottlenecks)]
    return ws, list(bottlenecks), gs


def regnet_stages(depth: int, w0: int, wa: float, wm: float, group_width: int, bottleneck: float = 1.0,
                  quantum: int = 8) -> RegNetStages:
    """Per-stage depths and widths of a RegNet (pycls regnet.py ``generate_regnet`` + compatibility).

    Block j gets the continuous width ``w0 + wa j``, snapped in log space to ``w0 wm^k`` (k integer) and rounded
    to a multiple of ``quantum``; runs of equal widths form the stages.
    """
    if not (wa >= 0 and w0 > 0 and wm > 1 and w0 % quantum == 0 and depth > 0):
        raise ValueError(f"RegNet needs wa >= 0, w0 > 0 divisible by {quantum}, wm > 1 and depth > 0; got "
                         f"depth={depth}, w0={w0}, wa={wa}, wm={wm}.")
    widths = []
    for j in range(depth):
        k = round(math.log((j * wa + w0) / w0) / math.log(wm))
        widths.append(int(round(w0 * wm**k / quantum) * quantum))
    stage_widths = sorted(set(widths))  # widths never decrease with j, so sorted unique = stage order
    stage_depths = [widths.count(w) for w in stage_widths]
    n = len(stage_widths)
    ws, bs, gs = adjust_block_compatibility(stage_widths, [bottleneck] * n, [group_width] * n)
    return RegNetStages(tuple(stage_depths), tuple(ws), tuple(gs), tuple(bs))


def anynet_counter(stages: RegNetStages, se_ratio: float = 0.25, stem_width: int = 32, img_size: int = 224,
                   num_classes: int = 1000, in_chans: int = 3) -> Counter:
    """Walk an AnyNet of residual bottleneck blocks (pycls ``SimpleStem`` + ``ResBottleneckBlock`` + ``AnyHead``).

    Stem: 3x3 stride-2 conv + BN. Each stage strides 2 in its first block. Block: optional 1x1 strided
    projection + BN, 1x1 -> 3x3 grouped (stride) -> SE on the bottleneck with ``round(se_ratio w_in)`` channels
    -> 1x1, each conv followed by BN. Head: global pool + linear (none when ``num_classes`` is 0).
    """
    cx = Counter(img_size)
    cx.conv(in_chans, stem_width, 3, stride=2)
    cx.norm(stem_width)
    w_in = stem_width
    for d, w_out, gw, bm in zip(stages.depths, stages.widths, stages.group_widths, stages.bottlenecks):
        for i in range(d):
            stride = 2 if i == 0 else 1
            if w_in != w_out or stride != 1:
                h, w = cx.h, cx.w
                cx.conv(w_in, w_out, 1, stride=stride)
                cx.norm(w_out)
                cx.h, cx.w = h, w  # parallel branch: the transform strides again below
            w_b = int(round(w_out * bm))
            cx.conv(w_in, w_b, 1)
            cx.norm(w_b)
            cx.conv(w_b, w_b, 3, stride=stride, groups=w_b // gw)
            cx.norm(w_b)
            w_se = int(round(w_in * se_ratio))
            if w_se:
                h, w = cx.h, cx.w
                cx.h = cx.w = 1  # SE acts on the pooled 1x1 map
                cx.conv(w_b, w_se, 1, bias=True)
                cx.conv(w_se, w_b, 1, bias=True)
                cx.h, cx.w = h, w
            cx.conv(w_b, w_out, 1)
            cx.norm(w_out)
            w_in = w_out
    if num_classes:
        cx.linear(w_in, num_classes, bias=True)
    return cx


def anynet_complexity(stages: RegNetStages, se_ratio: float = 0.25, stem_width: int = 32, img_size: int = 224,
                      num_classes: int = 1000) -> PyclsComplexity:
    """pycls ``AnyNet.complexity`` for residual bottleneck (SE) blocks."""
    return anynet_counter(stages, se_ratio, stem_width, img_size, num_classes).pycls()


def regnet_complexity(depth: int, w0: int, wa: float, wm: float, group_w: int, se_ratio: float = 0.25,
                      bottleneck: float = 1.0, img_size: int = 224, num_classes: int = 1000) -> PyclsComplexity:
    """pycls ``RegNet.complexity`` of a RegNet(Y) given its (d, w0, wa, wm, g) parameters; ``se_ratio=0`` is RegNetX."""
    stages = regnet_stages(depth, w0, wa, wm, group_w, bottleneck)
    return anynet_complexity(stages, se_ratio, 32, img_size, num_classes)


# -- ViT (pycls/models/vit.py) ---------------------------------------------------------------------------------------
def stem_counter(cfg) -> Counter:
    """Walk only the stem of a ``ViTConfig`` (pycls ``ViTStemPatchify`` / ``ViTStemConv``).

    Patchify: one conv with kernel = stride = p and a bias. Conv stem: convs + BN, the last conv with a bias
    and no BN.
    """
    cx = Counter(cfg.img_size)
    if cfg.stem == "conv":
        w_in, n = cfg.in_chans, len(cfg.stem_dims)
        for i, (k, s, w_out) in enumerate(zip(cfg.stem_kernels, cfg.stem_strides, cfg.stem_dims)):
            last = i == n - 1
            cx.conv(w_in, w_out, k, stride=s, bias=last)
            if not last:
                cx.norm(w_out)
            w_in = w_out
    else:
        cx.patchify(cfg.in_chans, cfg.embed_dim, cfg.patch_size)
    return cx


def vit_counter(cfg) -> Counter:
    """Walk a :class:`~models.vit.VisionTransformer` described by a ``ViTConfig``, pycls-style.

    Stem: :func:`stem_counter`. Tokens: grid + 1 (our ViT always has a cls token; pycls has one with its
    'token' classifier). Blocks: LN, attention, LN, MLP; final LN (fc_norm with avg pooling: same count);
    linear head when ``cfg.num_classes`` > 0.
    """
    d = cfg.embed_dim
    cx = stem_counter(cfg)
    tokens = cx.h * cx.w + 1
    cx.params += d + tokens * d  # cls token + position table
    mlp = int(d * cfg.mlp_ratio)
    for _ in range(cfg.depth):
        cx.norm(d)
        cx.attention(d, cfg.num_heads, tokens, cfg.qkv_bias)
        cx.norm(d)
        cx.linear(d, mlp, True, tokens)
        cx.linear(mlp, d, True, tokens)
    cx.norm(d)
    if cfg.num_classes:
        cx.linear(d, cfg.num_classes, bias=True)
    return cx


def vit_complexity_pycls(cfg, num_classes: int = 1000) -> PyclsComplexity:
    """pycls ``ViT.complexity`` for a ``ViTConfig`` (patchify or conv stem) with a ``num_classes`` head.

    ``num_classes`` replaces ``cfg.num_classes`` (pycls always counts the 1000-class head in its tables).
    """
    return vit_counter(dataclasses.replace(cfg, num_classes=num_classes)).pycls()
