"""Fast compound model scaling (Dollár, Singh, Girshick, "Fast and Accurate Model Scaling", CVPR 2021).

To scale a model's FLOPs by ``s``, scale depth by ``d``, width by ``w`` and input resolution by ``r`` with
``d w^2 r^2 = s``. Fast scaling ("dWr", alpha = 0.8) puts most of it in width: ``d = s^0.1, w = s^0.4,
r = s^0.05``, so activations grow about as ``s^0.6`` instead of ``s``. The rule and its discretisation follow
facebookresearch/pycls models/scaler.py (``scaling_factors``, ``scale_model``); pycls does not scale ViTs, so
:func:`scale_vit` is our rule, documented there.
"""

from __future__ import annotations

import dataclasses
import math

from .pycls_complexity import adjust_block_compatibility
from .regnet import RegNetConfig
from .vit import ViTConfig

__all__ = ["scaling_factors", "alpha_factors", "scaled_size", "scale_regnet", "scale_vit"]

_DIMS = "dwgr"


def _parse(scaling_type: str) -> dict[str, float]:
    if scaling_type and all(c in _DIMS for c in scaling_type):
        return {c: float(c in scaling_type) for c in _DIMS}  # "dw" == "d1_w1_g0_r0"
    weights = dict.fromkeys(_DIMS, 0.0)
    for part in scaling_type.split("_"):
        try:
            if part[0] not in _DIMS:
                raise ValueError
            weights[part[0]] = float(part[1:])
        except (ValueError, IndexError):
            raise ValueError(f"Bad scaling type {scaling_type!r} at {part!r}: use letters from 'dwgr' (e.g. 'dw') "
                             "or weighted parts like 'd1_w8_g8_r1'.") from None
    return weights


def scaling_factors(scaling_type: str, s: float) -> tuple[float, float, float, float]:
    """Multipliers ``(d, w, g, r)`` for depth, width, group width and resolution that scale FLOPs by ``s``.

    ``scaling_type``: letters ("dw": equal weights on d and w) or weights ("d1_w8_g8_r1": fast scaling). With
    ``S = w_d + w_w + w_r`` (or ``w_g / 2``, or 1 when all are 0): ``d = s^(w_d/S)``, ``w = s^(w_w/2S)``,
    ``g = s^(w_g/2S)``, ``r = s^(w_r/2S)`` (pycls scaler.py), so ``d w^2 r^2 = s``.
    """
    if s <= 0:
        raise ValueError(f"The scale factor must be positive, got {s}.")
    wt = _parse(scaling_type)
    total = wt["d"] + wt["w"] + wt["r"] or wt["g"] / 2 or 1.0
    d, w, g, r = (s ** (wt["d"] / total), s ** (wt["w"] / total / 2), s ** (wt["g"] / total / 2),
                  s ** (wt["r"] / total / 2))
    if not (d == w == r == 1.0 or math.isclose(d * w * w * r * r, s, rel_tol=0.01)):
        raise AssertionError(f"Scaling {scaling_type!r} by {s} gives d w^2 r^2 = {d * w * w * r * r}, not {s}.")
    return d, w, g, r


def alpha_factors(s: float, alpha: float = 0.8) -> tuple[float, float, float]:
    """The paper's form: ``d = s^((1-a)/2)``, ``w = s^(a/2)``, ``r = s^((1-a)/4)``; a = 0.8 is fast scaling,
    a = 1/3 uniform "dwr", a = 1 width only."""
    if s <= 0 or not 0 <= alpha <= 1:
        raise ValueError(f"Need s > 0 and 0 <= alpha <= 1, got s={s}, alpha={alpha}.")
    return s ** ((1 - alpha) / 2), s ** (alpha / 2), s ** ((1 - alpha) / 4)


def scaled_size(size: int, r: float, multiple: int = 4) -> int:
    """Image side scaled by ``r`` and rounded to a multiple (pycls: ``round(size r / 4) * 4``)."""
    return max(multiple, round(size * r / multiple) * multiple)


def scale_regnet(cfg: RegNetConfig, s: float, scaling_type: str = "d1_w8_g8_r1") -> RegNetConfig:
    """Scale a RegNet's FLOPs by about ``s`` (pycls ``scale_model`` on the network converted to AnyNet form).

    Per stage: depth ``max(1, round(d x))``, width ``max(1, round(w x / 8)) 8``, group width
    ``max(1, round(g x))`` then kept if <= 2, 4 if <= 5, else rounded to a multiple of 8; then widths and groups
    are made compatible. ``img_size`` becomes ``round(size r / 4) 4``: train and evaluate at that size. The
    result gives explicit stage lists, so ``RegNet(result)`` builds the scaled network.
    """
    d_s, w_s, g_s, r_s = scaling_factors(scaling_type, s)
    st = cfg.stages()
    ds = [max(1, round(d * d_s)) for d in st.depths]
    ws = [max(1, round(w * w_s / 8)) * 8 for w in st.widths]
    gs = [max(1, round(g * g_s)) for g in st.group_widths]
    gs = [g if g <= 2 else 4 if g <= 5 else round(g / 8) * 8 for g in gs]
    ws, _, gs = adjust_block_compatibility(ws, list(st.bottlenecks), gs)
    return dataclasses.replace(cfg, stage_depths=tuple(ds), stage_widths=tuple(ws), stage_group_widths=tuple(gs),
                               depth=sum(ds), img_size=scaled_size(cfg.img_size, r_s))


def scale_vit(cfg: ViTConfig, s: float, alpha: float = 0.8) -> ViTConfig:
    """Scale a ViT's FLOPs by about ``s`` with the paper's exponents (pycls has no ViT rule; this one is ours).

    With ``(d, w, r) = alpha_factors(s, alpha)``:

    * depth ``max(1, round(depth d))``;
    * width: the head width stays fixed (attention per head unchanged); ``embed_dim w`` is rounded to a
      multiple of ``lcm(8, head_dim)`` (at least one) and ``num_heads = embed_dim / head_dim``; ``mlp_ratio``
      stays, so the MLP widens with the tokens;
    * resolution: ``round(img_size r / p) p`` (at least one patch), so the token grid stays whole;
    * conv stem: strides and kernels stay, hidden stem widths scale by ``w`` (multiples of 8, as pycls scales
      EfficientNet's stem), the last equals the new ``embed_dim``.

    FLOPs grow about as ``s`` (attention's ``L^2`` term grows a little faster, with ``r^4``).
    """
    d_s, w_s, r_s = alpha_factors(s, alpha)
    head_dim = cfg.embed_dim // cfg.num_heads
    q = math.lcm(8, head_dim)
    embed_dim = max(1, round(cfg.embed_dim * w_s / q)) * q
    p = cfg.patch_size
    changes = dict(
        depth=max(1, round(cfg.depth * d_s)),
        embed_dim=embed_dim,
        num_heads=embed_dim // head_dim,
        img_size=scaled_size(cfg.img_size, r_s, p),
    )
    if cfg.stem == "conv":
        hidden = tuple(max(1, round(c * w_s / 8)) * 8 for c in cfg.stem_dims[:-1])
        changes["stem_dims"] = hidden + (embed_dim,)
    return dataclasses.replace(cfg, **changes)
