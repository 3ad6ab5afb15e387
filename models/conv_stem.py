"""The convolutional stem of ViT_C, "Early Convolutions Help Transformers See Better" (Xiao et al., NeurIPS 2021).

The stem replaces the 16x16 patchify conv with a few strided 3x3 convs (BN + ReLU) and a final 1x1 conv to the
token width, as facebookresearch/pycls ``pycls/models/vit.py:ViTStemConv`` (the same stem is SWAG's
``conv_stem_layers``). It sits at ``VisionTransformer.patch_embed`` and exposes what timm's ``PatchEmbed`` does.
It lives apart from :mod:`models.vitc` so that :mod:`models.vit` can build it while :mod:`models.vitc` registers
models built on :mod:`models.vit`, without either importing the other.
"""

from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor, nn

__all__ = ["ConvStem"]


class ConvStem(nn.Module):
    """(B, C, H, W) -> (B, L, D): strided convs, L = (H / p)^2 tokens in row-major order, p = prod(strides).

    Layers before the last: conv (k, stride s, padding (k-1)/2, no bias) -> BatchNorm -> ReLU. Last: conv with a
    bias to D, no norm or activation. pycls hard-codes 3x3 for the non-last layers; here the given kernels are
    used (all ViT_C configs give 3).
    """

    def __init__(self, img_size: int, in_chans: int, kernels: Sequence[int], strides: Sequence[int],
                 dims: Sequence[int]) -> None:
        super().__init__()
        p = math.prod(strides)
        if img_size % p:
            raise ValueError(f"img_size {img_size} is not divisible by the conv stem's total stride {p}.")
        # the attributes timm's PatchEmbed has and our ViT / MAE code reads
        self.img_size = (img_size, img_size)
        self.patch_size = (p, p)
        self.grid_size = (img_size // p, img_size // p)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        w_in = in_chans
        for i, (k, s, w_out) in enumerate(zip(kernels, strides, dims)):
            last = i == len(dims) - 1
            layers.append(nn.Conv2d(w_in, w_out, k, stride=s, padding=(k - 1) // 2, bias=last))
            if not last:
                layers += [nn.BatchNorm2d(w_out), nn.ReLU(inplace=True)]
            w_in = w_out
        self.proj = nn.Sequential(*layers)
        self.init_weights()

    @property
    def convs(self) -> list[nn.Conv2d]:
        return [m for m in self.proj if isinstance(m, nn.Conv2d)]

    def init_weights(self) -> None:
        """facebookresearch/pycls ``pycls/models/vit.py:init_weights_vit`` for the stem: each 3x3 conv
        normal(sqrt(2 / out_channels)), the last 1x1 normal(sqrt(1 / out_channels)) with a zero bias, BatchNorm
        (1, 0)."""
        *hidden, last = self.convs
        for conv in hidden:
            nn.init.normal_(conv.weight, std=math.sqrt(2.0 / conv.out_channels))
        nn.init.normal_(last.weight, std=math.sqrt(1.0 / last.out_channels))
        nn.init.zeros_(last.bias)
        for m in self.proj:
            if isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()  # weight 1, bias 0, fresh running stats

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"Input is {tuple(x.shape[-2:])} but the conv stem was built for {self.img_size}; "
                             "resize the images or build the model with img_size set to their size.")
        return self.proj(x).flatten(2).transpose(1, 2)
