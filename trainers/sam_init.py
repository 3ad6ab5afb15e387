"""SAM's image encoder from an MAE pre-trained ViT.

SAM's image encoder is "an MAE pre-trained ViT minimally adapted to process high resolution inputs" (Kirillov et al.
2023, §3; appendix A: windowed attention with a few global blocks, following ViTDet, Li et al. 2022, §3). The
adaptation adds nothing to a block's own weights: timm's ``VisionTransformerSAM`` blocks carry the plain ViT's
``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2`` under the same names, so those, and the
patch embedding, load tensor for tensor. What the ViT does not have starts fresh: the relative-position tables (zeros,
so attention starts as the ViT's within each window), the neck, the prompt encoder and the mask decoder. The ViT's
absolute table is resized to the high-resolution grid once, bicubic with align_corners=False, the interpolation
ViTDet applies at every forward (detectron2 projects/ViTDet, modeling/backbone/utils.py:get_abs_pos).

    vit = read_vit("runs/mae_b")                # an MAE run, its export, or mae_pretrain_vit_base.pth; None if other
    lines = init_sam_from_vit(sam, vit, "sam_vit_b")
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

import models
from models.pos_embed import interpolate_pos_embed
from models.sam.checkpoints import model_state
from models.sam.sam import SAM
from trainers.handoff import load_state_dict

__all__ = ["ViTSource", "read_vit", "init_sam_from_vit"]

# Where a plain ViT (timm names) sits in what a run or tool leaves behind; tried in order.
VIT_LAYOUTS = (
    ("model.encoder.", "the encoder of an MAE run, its decoder left behind"),
    ("encoder.", "the encoder of an MAE model's state dict, its decoder left behind"),
    ("model.", "the ViT of a Prism run"),
    ("", "a ViT under timm's names, as an MAE encoder export or facebookresearch/mae's mae_pretrain_vit_*.pth"),
)
# Parts of a ViT (or of MAE around it) with no counterpart in SAM's trunk: SAM reads the tokens of the last block
# through its neck, without a cls token, a final norm or a head.
UNUSED = re.compile(r"^(cls_token|norm\.|fc_norm\.|head\.|head_drop\.|mask_token|decoder_)")
# What SAM's encoder has and a plain ViT lacks: the adaptation's relative positions and the neck.
FRESH = re.compile(r"(^|\.)attn\.rel_pos_[hw]$|^neck\.")


@dataclass
class ViTSource:
    """A plain ViT's weights under timm's names, and where they came from."""

    state: dict[str, Tensor]
    source: str
    layout: str

    def shape_text(self) -> str:
        """Width, depth and patch of the ViT, as the model names state them."""
        width = self.state["cls_token"].shape[-1]
        depth = len({k.split(".")[1] for k in self.state if k.startswith("blocks.")})
        stem = self.state.get("patch_embed.proj.weight")
        return f"width {width}, depth {depth}, " + (f"patch {stem.shape[-1]}" if stem is not None else "conv stem")


def read_vit(source: str | Path) -> ViTSource | None:
    """The plain ViT held by ``source``, or None when it holds something else (a SAM, a SAM 2, a file torch cannot
    read): then the other loaders judge it.

    A directory counts when its run's config.yaml names an MAE model (``model.name: mae_vit_*``), so that a SAM 2
    run is never read here (a DeepSpeed run would be consolidated twice). A file counts when it holds ``cls_token``
    and ``blocks.0.attn.qkv.weight`` under one of ``VIT_LAYOUTS``' prefixes; SAM's encoder has neither a cls token
    nor keys outside ``image_encoder.``.
    """
    path = Path(source)
    state = _state_of(path)
    if state is None:
        return None
    for prefix, layout in VIT_LAYOUTS:
        if f"{prefix}cls_token" in state and f"{prefix}blocks.0.attn.qkv.weight" in state:
            vit = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            return ViTSource(vit, str(source), layout)
    if path.is_dir():
        raise ValueError(f"{source} is an MAE run, but its checkpoint holds no ViT encoder (no model.encoder.cls_token"
                         " and model.encoder.blocks.0.attn.qkv.weight).")
    return None


def _state_of(path: Path) -> Mapping[str, Tensor] | None:
    if path.is_dir():
        return load_state_dict(path) if _run_model_name(path).startswith("mae_vit") else None
    if not path.is_file():
        return None
    if path.suffix == ".safetensors":
        return load_state_dict(path)
    try:  # mmap: a Lightning file's optimizer state, or a whole SAM, is not read to look at its keys
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError):
        return None
    if not isinstance(checkpoint, Mapping):
        return None
    if isinstance(checkpoint.get("state_dict"), Mapping):
        return load_state_dict(path)  # Lightning: handoff removes DeepSpeed / torch.compile wrapper prefixes
    return model_state(checkpoint)  # facebookresearch/mae keeps its weights under "model", as sam2 does


def _run_model_name(path: Path) -> str:
    """model.name of the run that holds ``path`` (a run directory or a DeepSpeed directory inside one), or ""."""
    for folder in [path, *path.parents][:3]:
        config = folder / "config.yaml"
        if config.is_file():
            return str(((yaml.safe_load(config.read_text()) or {}).get("model") or {}).get("name") or "")
    return ""


def init_sam_from_vit(model: nn.Module, vit: ViTSource, name: str) -> list[str]:
    """Load ``vit`` into the trunk of ``model``'s image encoder (a SAM named ``name``); returns what it did, in lines,
    every tensor left fresh or unused among them.

    The patch embedding and every block's weights are copied as they are; ``pos_embed`` loses the cls row and is
    resized to the encoder's grid. Anything else must match exactly: a tensor of another shape, a trunk tensor the
    ViT lacks or a ViT tensor that is neither used nor in ``UNUSED`` raises ValueError naming each, with the model
    that fits the ViT.
    """
    if not isinstance(model, SAM):
        raise ValueError(
            f"{vit.source} holds {vit.layout}, which initialises the image encoder of a SAM (sam_vit_*, "
            f"--model.mode image) only. {name} is a SAM 2, whose image encoder is Hiera: SAM 2 starts it from an MAE "
            "pre-trained Hiera (Ravi et al. 2024, §4), which Prism does not train; start from an official sam2 "
            "checkpoint, or choose a sam_vit_* model.")
    encoder = model.image_encoder
    target = encoder.state_dict()
    lines = [f"init_from {vit.source}: {vit.layout}, {vit.shape_text()} -> {name}'s image encoder trunk "
             "(an MAE pre-trained ViT, Kirillov et al. 2023, §3)"]
    mapped, misshaped, missing = _map_trunk(vit, target, name, lines)
    unused = sorted(vit.state.keys() - mapped.keys() - ({"pos_embed"} if "pos_embed" in target else set()))
    unexpected = [k for k in unused if not UNUSED.match(k)]
    if misshaped or missing or unexpected:
        raise ValueError(_misfit(vit, name, misshaped, missing, unexpected))
    encoder.load_state_dict(mapped, strict=False)
    lines.append(f"loaded {len(mapped)} tensors: patch_embed, pos_embed and blocks.*.{{norm1, attn.qkv, attn.proj, "
                 "norm2, mlp.fc1, mlp.fc2}, bit for bit but for pos_embed's resize")
    fresh = sorted(f"image_encoder.{k}" for k in target.keys() - mapped.keys())
    fresh += sorted(k for k in model.state_dict() if not k.startswith("image_encoder."))
    lines.append(f"fresh, as built ({len(fresh)} tensors a plain ViT has no counterpart for; relative positions "
                 "start at zero): " + _compact(fresh))
    if unused:
        lines.append(f"unused ({len(unused)} tensors of the source; SAM's neck reads the last block's tokens, without "
                     "a cls token, final norm or head): " + _unused_text(vit.state, unused))
    return lines


def _map_trunk(vit: ViTSource, target: Mapping[str, Tensor], name: str,
               lines: list[str]) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """The ViT's tensors under the trunk's keys, the mis-shaped ones and the trunk keys the ViT lacks."""
    trunk = {k for k in target if not FRESH.search(k)}
    mapped = {k: vit.state[k] for k in target if k in trunk - {"pos_embed"} and k in vit.state}
    misshaped = [f"{k}: {list(v.shape)} in the ViT, {list(target[k].shape)} in {name}"
                 for k, v in mapped.items() if v.shape != target[k].shape]
    missing = [k for k in target if k in trunk - {"pos_embed"} and k not in mapped]
    if "pos_embed" in trunk and "pos_embed" not in vit.state:
        missing.append("pos_embed")
    elif "pos_embed" in trunk:
        table, line = _pos_embed(vit, target["pos_embed"].shape, name)
        if table is None:
            misshaped.append(line)
        else:
            mapped["pos_embed"] = table
            lines.append(line)
    return mapped, misshaped, missing


def _pos_embed(vit: ViTSource, shape: torch.Size, name: str) -> tuple[Tensor | None, str]:
    """The ViT's (1, prefix + h*w, C) table as SAM's (1, H, W, C) one, or None and why it cannot be."""
    table = vit.state["pos_embed"]
    prefix = int("cls_token" in vit.state)
    side = int(round((table.shape[1] - prefix) ** 0.5)) if table.ndim == 3 else 0
    if table.ndim != 3 or side * side != table.shape[1] - prefix or table.shape[-1] != shape[-1]:
        return None, f"pos_embed: {list(table.shape)} in the ViT, {list(shape)} in {name}"
    grid = (int(shape[1]), int(shape[2]))
    resized = interpolate_pos_embed(table, grid, num_prefix_tokens=prefix)[:, prefix:]  # (1, H*W, C)
    line = (f"pos_embed: the ViT's {side}x{side} table without its cls row, resized to the {grid[0]}x{grid[1]} grid "
            "(bicubic, align_corners=False, as ViTDet's get_abs_pos); MAE's fixed sin-cos table is the learned "
            "table's starting value")
    return resized.reshape(1, *grid, shape[-1]), line


def _misfit(vit: ViTSource, name: str, misshaped: list[str], missing: list[str], unexpected: list[str]) -> str:
    problems = [f"  {what}: {'; '.join(keys[:4])}{f' ... ({len(keys) - 4} more)' if len(keys) > 4 else ''}"
                for what, keys in (("other shape", misshaped), ("missing in the ViT", missing),
                                   ("unexpected", unexpected)) if keys]
    fits = _fitting_models(vit)
    advice = (f"the ViT fits --model.name {' or '.join(fits)}" if fits else
              "no registered sam_vit_* model has this trunk (width, depth and patch must match)")
    return (f"{vit.source} holds {vit.layout}; its {vit.shape_text()} do not fit the trunk of {name}'s image "
            "encoder (image_encoder.*):\n"
            + "\n".join(problems) + f"\n  {advice}.")


def _fitting_models(vit: ViTSource) -> list[str]:
    """The registered SAMs whose trunk has the ViT's tensor shapes (built on the meta device: no memory)."""
    fits = []
    for candidate in models.list_models("sam_vit_*"):
        with torch.device("meta"):
            trunk = models.create(candidate).image_encoder.state_dict()
        shared = [k for k in trunk if not FRESH.search(k) and k != "pos_embed"]
        if all(k in vit.state and vit.state[k].shape == trunk[k].shape for k in shared):
            fits.append(candidate)
    return fits


def _unused_text(state: Mapping[str, Tensor], unused: list[str]) -> str:
    decoder = [k for k in unused if k.startswith(("decoder_", "mask_token"))]
    parts = [f"{k} {list(state[k].shape)}" for k in unused if k not in decoder]
    return ", ".join(parts + ([f"MAE's decoder and mask token ({len(decoder)} tensors)"] if decoder else []))


def _compact(keys: list[str]) -> str:
    """Keys with block indices folded: ``image_encoder.blocks.*.attn.rel_pos_h (12)``; the prompt encoder and mask
    decoder by module."""
    groups = Counter(re.sub(r"\.\d+(?=\.)", ".*", k) if k.startswith("image_encoder.") else k.split(".")[0] + ".*"
                     for k in keys)
    return ", ".join(f"{group} ({count})" for group, count in groups.items())
