"""Weights for the next stage: one loader for every kind of checkpoint a run leaves behind.

    load_state_dict("runs/mae", prefix="model.")        # newest complete checkpoint of a run, any strategy
    load_state_dict("runs/mae/checkpoints/last.ckpt")   # a Lightning file or a DeepSpeed directory
    load_state_dict("runs/mae/export/encoder.safetensors")
    init_backbone(classifier, "runs/mae")              # the next stage's network from any earlier stage

    python -m trainers.handoff convert runs/mae/checkpoints/last.ckpt runs/mae/export/last-fp32.ckpt

A DeepSpeed checkpoint is a directory of per-rank shards whose weights exist in fp32 only inside the
optimizer partitions; DeepSpeed's own ``zero_to_fp32`` merges them (we do not reimplement that). The
result carries the fp32 master weights, not the bf16 copies the model computed with.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from timm.layers import trunc_normal_

from models.pos_embed import interpolate_pos_embed

from trainers.checkpoint import (CHECKPOINT_DIR, COMPLETE_MARKER, AtomicCheckpointIO, find_resume_checkpoint,
                                 read_complete_marker)

log = logging.getLogger(__name__)

# What a converted DeepSpeed checkpoint keeps of Lightning's client state: enough for
# ``LightningModule.load_from_checkpoint`` and for knowing where it came from; not loops or callbacks,
# since without optimizer state it cannot resume training anyway (Lightning-AI/pytorch-lightning
# src/lightning/pytorch/utilities/deepspeed.py:convert_zero_checkpoint_to_fp32_state_dict).
CLIENT_KEYS = ("global_step", "epoch", "pytorch-lightning_version", "hyper_parameters", "hparams_name")
# The model-states file of a ZeRO stage 1/2 checkpoint (one per model-parallel rank) and of stage 3 (one per rank)
_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def load_state_dict(source: str | Path, *, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """CPU tensors of a checkpoint's weights, keyed as the module that was trained names them.

    ``source``: a run directory (its newest complete checkpoint), a DeepSpeed checkpoint directory
    (consolidated to fp32), a Lightning ``.ckpt`` file (its ``state_dict``), a converted fp32 file, a
    plain ``torch.save``d state dict, or a ``.safetensors`` file. Wrapper prefixes never reach the caller:
    DeepSpeed's ``_forward_module.`` and torch.compile's ``_orig_mod.`` are removed. ``prefix`` keeps only
    the keys under it and strips it: ``prefix="model."`` gives the state dict of ``LightningModule.model``.
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {path}: the path does not exist.")
    state = _strip_wrappers(_load_directory(path) if path.is_dir() else _load_file(path), path)
    return _select(state, prefix, path) if prefix else state


def load_into(module: torch.nn.Module, source: str | Path, *, prefix: str | None = None) -> torch.nn.Module:
    """``load_state_dict(source, prefix=prefix)`` loaded strictly into ``module``; a key mismatch is an
    error that lists the missing and unexpected keys."""
    state = load_state_dict(source, prefix=prefix)
    missing, unexpected = module.state_dict().keys() - state.keys(), state.keys() - module.state_dict().keys()
    if missing or unexpected:
        raise ValueError(
            f"The weights in {source} (prefix {prefix!r}) do not fit {type(module).__name__}: "
            f"missing {sorted(missing)[:10]}{' ...' if len(missing) > 10 else ''}, "
            f"unexpected {sorted(unexpected)[:10]}{' ...' if len(unexpected) > 10 else ''}. "
            "Check that the checkpoint comes from the same model (name and image size)."
        )
    module.load_state_dict(state)
    return module


def convert_deepspeed_checkpoint(ckpt_dir: str | Path, out_path: str | Path) -> Path:
    """One fp32 Lightning-style checkpoint file from a DeepSpeed checkpoint directory, written atomically.

    The file holds ``state_dict`` (fp32 master weights, module keys) and the plain parts of Lightning's
    state (``global_step``, ``epoch``, ``hyper_parameters``, ...); it loads with
    ``torch.load(weights_only=True)``. It has no optimizer state, so it starts a new stage; it does not
    resume this one.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.exists():
        raise FileNotFoundError(f"No DeepSpeed checkpoint at {ckpt_dir}: the path does not exist.")
    if not ckpt_dir.is_dir() or not _looks_like_deepspeed(ckpt_dir):
        raise ValueError(f"{ckpt_dir} is not a DeepSpeed checkpoint directory (one with a 'latest' file and "
                         f"a tag folder of *_states.pt shards), e.g. <run_dir>/{CHECKPOINT_DIR}/last.ckpt.")
    weights, client = _consolidate_deepspeed(ckpt_dir)
    marker = read_complete_marker(ckpt_dir)  # present: _consolidate_deepspeed refuses unmarked directories
    checkpoint: dict[str, Any] = {"state_dict": _strip_wrappers(weights, ckpt_dir)}
    for key in CLIENT_KEYS:
        if key in client and _loads_weights_only(client[key]):
            checkpoint[key] = client[key]
        elif key in client:
            log.warning("Leaving %r out of %s: it pickles objects that torch.load(weights_only=True) refuses.",
                        key, out_path)
    checkpoint.setdefault("global_step", marker["global_step"])
    checkpoint["prism_converted_from"] = {"path": str(ckpt_dir.resolve()), "zero_stage": marker.get("zero_stage"),
                                          "world_size": marker.get("world_size")}
    out_path = Path(out_path)
    AtomicCheckpointIO().save_checkpoint(checkpoint, out_path)
    return out_path


# ---- the next stage ------------------------------------------------------------------------------------

# Where a run keeps its network (trainers/*: every LightningModule holds it at ``self.model``); tried in order.
LAYOUTS = (
    ("model.encoder.", "MAE run: its encoder (the decoder is left behind)"),
    ("model.", "run of a classifier, backbone or probe (SWAG, finetune, linear probe)"),
)


def init_backbone(model: torch.nn.Module, source: str | Path, *, reset_head: bool = False,
                  state: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Initialise ``model`` (a backbone or classifier) from any earlier stage; returns what it did, in lines.

    ``source``: a run directory, Lightning ``.ckpt``, DeepSpeed directory, converted file or ``.safetensors``
    export (``load_state_dict``; ``state``: what that returned, when the caller has read it already). Its network
    is found by key layout: ``model.encoder.*`` (MAE), else ``model.*`` (SWAG, finetune, linear probe), else plain
    keys (an export). Then, as MAE fine-tuning does (facebookresearch/mae main_finetune.py):

    - the source's classifier is dropped when ``model`` has none, or one of another shape (or ``reset_head``);
    - ``pos_embed`` is resized to ``model``'s grid (bicubic, align_corners=False, cls row kept) when the
      source ran at another resolution; MAE's fixed sin-cos table becomes the learned table's start;
    - what is left must fit exactly: the only keys allowed missing are the new head's and the norm that
      the change of pooling adds (``fc_norm.*`` for global average pooling from a cls-token source, the
      final ``norm.*`` the other way), and the only unexpected keys the norm that pooling removes. Any other
      difference raises ValueError naming every missing, unexpected and mis-shaped key and the source;
    - a new head starts at trunc_normal(std=2e-5) with zero bias (MAE).
    """
    state, layout = _network_of(load_state_dict(source) if state is None else state, Path(source))
    lines = [f"init_from {source}: {layout}, {len(state)} tensors"]
    target = model.state_dict()

    head = classifier_name(model)
    head_keys = {k for k in target if head and k.startswith(head + ".")}
    source_head = {k for k in state if head and k.startswith(head + ".")}
    fits = head_keys and source_head == head_keys and all(state[k].shape == target[k].shape for k in head_keys)
    new_head = bool(head_keys) and (reset_head or not fits)
    if source_head and (new_head or not head_keys):
        shapes = ", ".join(f"{k} {list(state[k].shape)}" for k in sorted(source_head))
        why = ("reset_head=True" if reset_head else "the model has another" if head_keys else "the model has none")
        lines.append(f"head: dropped the source's {shapes} ({why})")
        state = {k: v for k, v in state.items() if k not in source_head}

    if "pos_embed" in state and "pos_embed" in target and state["pos_embed"].shape != target["pos_embed"].shape:
        lines.append(_resize_pos_embed(model, state))
    if "pos_embed" in state and layout.startswith("MAE") and getattr(model, "pos_embed", None) is not None \
            and model.pos_embed.requires_grad:
        lines.append("pos_embed: MAE's fixed sin-cos table is the learned table's starting value")

    expected_missing, expected_unexpected = _pooling_change(target, state, lines)
    expected_missing |= set(head_keys) if new_head else set()
    missing, unexpected = target.keys() - state.keys(), state.keys() - target.keys()
    misshaped = sorted(f"{k} {list(state[k].shape)} vs {list(target[k].shape)}"
                       for k in target.keys() & state.keys() if state[k].shape != target[k].shape)
    if missing != expected_missing or unexpected != expected_unexpected or misshaped:
        raise ValueError(
            f"The weights in {source} ({layout}) do not fit {type(model).__name__}:\n"
            f"  missing {sorted(missing)}\n  unexpected {sorted(unexpected)}\n  other shape {misshaped}\n"
            f"  (allowed: missing exactly {sorted(expected_missing)}, unexpected exactly "
            f"{sorted(expected_unexpected)}). Check that the model name (width, depth, patch size) is the one "
            "the earlier stage trained."
        )
    model.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False)
    if new_head:
        _init_new_head(model, head)
        lines.append(f"head: new {', '.join(f'{k} {list(target[k].shape)}' for k in sorted(head_keys))}, "
                     "trunc_normal(std=2e-5), zero bias")
    lines.append(f"loaded {len(target) - len(missing)} of {len(target)} tensors"
                 + (f"; new: {', '.join(sorted(missing))}" if missing else ""))
    return lines


def _network_of(full: dict, source: Path) -> tuple[dict, str]:
    """The network's weights in a checkpoint of any stage (``LAYOUTS``) and a description of where they were."""
    for prefix, description in LAYOUTS:
        if any(k.startswith(prefix) for k in full):
            return _select(full, prefix, source), f"{description}, keys under {prefix!r}"
    return full, "export or plain state dict (keys as the module names them)"


def _pooling_change(target: dict, state: dict, lines: list[str]) -> tuple[set[str], set[str]]:
    """The norm keys a change of pooling adds (missing) and removes (unexpected): global average pooling has
    ``fc_norm``, cls-token pooling the final ``norm`` (facebookresearch/mae models_vit.py:VisionTransformer)."""
    expected_missing, expected_unexpected = set(), set()
    for gained, lost in (("fc_norm.", "norm."), ("norm.", "fc_norm.")):
        gains = {k for k in target if k.startswith(gained)} - state.keys()
        losses = {k for k in state if k.startswith(lost)} - target.keys()
        if gains and losses:
            expected_missing |= gains
            expected_unexpected |= losses
            lines.append(f"{gained.rstrip('.')}: new LayerNorm (1, 0); the source's {lost.rstrip('.')} is unused "
                         "(the pooling differs: MAE models_vit.py)")
    return expected_missing, expected_unexpected


def classifier_name(model: torch.nn.Module) -> str | None:
    """Qualified name of the classifier: timm's ``get_classifier()`` (RegNet: ``head.fc``), else ``head``."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "head", None)
    if not isinstance(head, torch.nn.Module):
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


def _resize_pos_embed(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> str:
    old, new = state["pos_embed"], model.state_dict()["pos_embed"]
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    if old.shape[-1] != new.shape[-1]:
        return f"pos_embed: width {old.shape[-1]} vs {new.shape[-1]}, not resized"
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None:  # a stem without timm's attribute: the table of a square grid
        side = int(round((new.shape[1] - prefix) ** 0.5))
        grid = (side, side)
    state["pos_embed"] = interpolate_pos_embed(old, tuple(grid), num_prefix_tokens=prefix)
    side = int(round((old.shape[1] - prefix) ** 0.5))
    return (f"pos_embed: resized from the {side}x{side} to the {grid[0]}x{grid[1]} grid (bicubic, align_corners=False, "
            f"{prefix} prefix row(s) kept): the source ran at another resolution")


@torch.no_grad()
def _init_new_head(model: torch.nn.Module, head: str) -> None:
    module = model.get_submodule(head)
    trunc_normal_(module.weight, std=2e-5)  # MAE main_finetune.py: a near-zero start keeps early logits flat
    if getattr(module, "bias", None) is not None:
        torch.nn.init.zeros_(module.bias)


# ---- sources -------------------------------------------------------------------------------------------

def _load_directory(path: Path) -> dict[str, torch.Tensor]:
    if _looks_like_deepspeed(path):
        return _consolidate_deepspeed(path)[0]
    if (path / CHECKPOINT_DIR).is_dir() or any(path.glob("hpc_ckpt_*.ckpt")):
        newest = find_resume_checkpoint(path)
        if newest is None:
            raise FileNotFoundError(f"Run directory {path} has no complete checkpoint (looked at "
                                    f"{path / CHECKPOINT_DIR}/*.ckpt and {path}/hpc_ckpt_*.ckpt).")
        log.info("Loading weights of %s from %s", path, newest)
        return _load_directory(newest) if newest.is_dir() else _load_file(newest)
    raise ValueError(
        f"{path} is a directory but neither a run directory (one with a '{CHECKPOINT_DIR}/' folder) nor a "
        "DeepSpeed checkpoint directory (one with a 'latest' file and shard folder). Pass one of those, or a "
        ".ckpt / .safetensors file."
    )


def _looks_like_deepspeed(path: Path) -> bool:
    return (path / "latest").is_file() or (path / COMPLETE_MARKER).is_file() or any(path.glob("*/*_states.pt"))


def _consolidate_deepspeed(ckpt_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """fp32 weights merged by DeepSpeed's zero_to_fp32, and the client state saved beside them."""
    if read_complete_marker(ckpt_dir) is None:
        raise ValueError(
            f"{ckpt_dir} is an incomplete DeepSpeed checkpoint: it has no {COMPLETE_MARKER}, so its save was "
            "cut off (or it was written without trainers.strategies.PrismDeepSpeedStrategy). Load an earlier "
            "checkpoint, or the run directory, which picks the newest complete one. If you know this one is "
            f"complete, declare it: echo '{{\"global_step\": N}}' > {ckpt_dir / COMPLETE_MARKER}"
        )
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # it narrates every step on stdout
        weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir))
    log.debug("zero_to_fp32: %s", printed.getvalue())

    tag_dir = ckpt_dir / (ckpt_dir / "latest").read_text().strip()
    states_file = next((tag_dir / name for name in _MODEL_STATES if (tag_dir / name).is_file()), None)
    if states_file is None:
        raise FileNotFoundError(f"{tag_dir} has none of {', '.join(_MODEL_STATES)}: the checkpoint is damaged.")
    states = _torch_load_trusted(states_file)
    if states_file.name == _MODEL_STATES[0]:
        # ZeRO-1 gives zero_to_fp32 no record of frozen parameters (it keeps their shapes from stage 2 on),
        # so e.g. MAE's fixed sin-cos tables would be missing. Stages 1-2 store the whole module here, in the
        # dtype it computed in; frozen parameters never change, so that copy is their true value.
        for key, value in states.get("module", {}).items():
            if key not in weights and value.numel() > 0:
                weights[key] = value.float() if value.is_floating_point() else value
                log.debug("%s: %s taken from the module copy (frozen under ZeRO-1)", ckpt_dir, key)
    client = {k: v for k, v in states.items() if k in CLIENT_KEYS}
    return weights, client


def _torch_load_trusted(path: Path) -> dict[str, Any]:
    """A DeepSpeed model-states file. DeepSpeed's zero_to_fp32 reads the same file with weights_only=False,
    so falling back to that when Lightning's client state holds other objects exposes nothing new."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        log.debug("%s holds non-tensor objects; reading it as DeepSpeed itself does", path)
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    zipped = zipfile.is_zipfile(path)  # every torch.save since torch 1.6; mmap avoids reading optimizer state
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} cannot be read with torch.load(weights_only=True): it pickles objects other than tensors "
            f"and plain containers ({err}). Prism's checkpoints never do; re-save its weights alone "
            "(torch.save(module.state_dict(), ...)) or as .safetensors."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path} is not a complete torch checkpoint (truncated or another format): {err}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict or state dict.")
    if isinstance(obj.get("state_dict"), dict):  # Lightning checkpoint, or one converted from DeepSpeed
        obj = obj["state_dict"]
    elif "buffer_names" in obj and "module" in obj:
        raise ValueError(f"{path} is one shard file of a DeepSpeed checkpoint; pass its checkpoint directory "
                         f"(the folder that holds 'latest'): {path.parent.parent}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path} has neither a 'state_dict' nor tensors at its top level; its keys: "
                         f"{', '.join(map(str, list(obj)[:12]))}")
    if len(tensors) < len(obj):
        log.warning("%s: ignoring non-tensor entries %s", path, sorted(set(obj) - set(tensors))[:12])
    return tensors


# ---- keys ----------------------------------------------------------------------------------------------

_WRAPPER = re.compile(r"(^|\.)_orig_mod\.")  # torch.compile's wrapper, wherever a submodule was compiled


def _strip_wrappers(state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        clean = key.removeprefix("_forward_module.")  # Lightning < 2.1's DeepSpeed wrapper
        clean = _WRAPPER.sub(r"\1", clean)
        if clean in out:
            raise ValueError(f"{source}: keys {key!r} and another both become {clean!r} once wrapper prefixes "
                             "are removed; the checkpoint holds two copies of one module.")
        out[clean] = value
    return out


def _select(state: dict[str, torch.Tensor], prefix: str, source: Path) -> dict[str, torch.Tensor]:
    prefix = prefix.rstrip(".") + "."
    picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not picked:
        tops = sorted({k.split(".")[0] + "." for k in state})
        raise KeyError(f"No keys under prefix {prefix!r} in {source}; its top-level prefixes are: "
                       f"{', '.join(tops[:20])}")
    return picked


def _loads_weights_only(obj: Any) -> bool:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
        return True
    except pickle.UnpicklingError:
        return False


# ---- command line --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers.handoff", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="DeepSpeed checkpoint directory -> one fp32 checkpoint file")
    convert.add_argument("ckpt_dir", help="the DeepSpeed checkpoint directory, e.g. <run_dir>/checkpoints/last.ckpt")
    convert.add_argument("out", help="the file to write, e.g. <run_dir>/export/last-fp32.ckpt")
    args = parser.parse_args(argv)
    try:
        path = convert_deepspeed_checkpoint(args.ckpt_dir, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    written = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    weights = written["state_dict"]
    numel = sum(t.numel() for t in weights.values())
    print(f"Wrote {path}: {len(weights)} tensors, {numel:,} parameters (buffers included), "
          f"step {written['global_step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
