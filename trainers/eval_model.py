"""The network an evaluation recipe measures: any Prism checkpoint as an ``evaluation.model.EvalModel``, and a
SAM or SAM 2 from an official file or a Prism run (:func:`load_sam_model`).

The architecture is read from the source run's config.yaml unless given (an MAE run's ``mae_vit_*`` becomes
its encoder ``vit_*``). A checkpoint without a classifier for the evaluation's classes (MAE, SWAG's hashtag
head, a linear probe run's separate head) gets a linear head fitted on the fly on the frozen pre-logits
features of training images, which the caller reads (trainers do not read data).
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

import models
from evaluation.model import EvalModel, LabelledImages
from models.sam.sam import SAM, official_sam_state
from models.sam.sam2 import SAM2, load_official_sam2
from trainers.classification import classifier_kwargs
from trainers.handoff import classifier_name, init_backbone, load_state_dict
from trainers.pipeline import StageResult
from trainers.sam2 import SAM2ModelConfig

PLM_STAGES = ("lm", "stage1", "stage2", "stage3")
"""The PerceptionLM stages of a pipeline directory (recipes.plm), in order."""


@dataclass
class EvalModelConfig:
    name: str | None = None
    """Registered backbone name; None reads it from the init_from run's config.yaml (model.name, with an MAE
    model's encoder, mae_vit_* -> vit_*)."""
    global_pool: str = "token"
    """ViTs: 'token' (cls token after the final norm, MAE's linear probe features) or 'avg'."""
    head_fit_images: int = 1024
    """Training images whose frozen features fit a linear head when the checkpoint has none for these classes."""
    batch_size: int = 64
    """Images per forward pass."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu' or 'cuda'."""


def source_model_section(init_from: str) -> dict:
    """The ``model`` section of the config.yaml of the run that holds ``init_from`` (a run dir or a file inside
    one) that names a model; empty when there is none."""
    path = Path(init_from).resolve()
    for folder in [path, *path.parents][:4]:
        config = folder / "config.yaml"
        if config.is_file():
            section = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
            if isinstance(section, dict) and section.get("name"):
                return section
    return {}


def source_model_name(init_from: str, flag: str | None = "--model.name", example: str = "vit_tiny_patch8") -> str:
    """model.name from the config.yaml of the run that holds ``init_from`` (an MAE model's encoder for mae_*);
    ``flag`` and ``example``: what the error tells the user to pass instead (None: the recipe has no such flag)."""
    name = source_model_section(init_from).get("name")
    if not name:
        hint = f" Pass {flag} (e.g. {example})." if flag else ""
        raise ValueError(f"Cannot tell which model {init_from} holds: no config.yaml with model.name in it or its "
                         f"parents.{hint}")
    return name.removeprefix("mae_")


def load_eval_model(init_from: str, cfg: EvalModelConfig, num_classes: int, image_size: int,
                    head_images: Callable[[int], LabelledImages] | None) -> EvalModel:
    """Build the backbone, load ``init_from`` into it, and fit a linear head if it has none for ``num_classes``
    on ``head_images(cfg.head_fit_images)``: the first N labelled training images (None: there are none)."""
    name = cfg.name or source_model_name(init_from)
    network = models.create(**classifier_kwargs(name, num_classes, image_size, cfg.global_pool))
    lines = init_backbone(network, init_from)
    for line in lines:
        rank_zero_info(line)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    model = EvalModel(network, torch.device(auto if cfg.device == "auto" else cfg.device))
    # init_backbone reports a head it had to create: the source has no classifier for these classes.
    if any(line.startswith("head: new") for line in lines):
        if head_images is None:
            raise ValueError(f"{init_from} has no classifier for {num_classes} classes and no training images were "
                             "given to fit one on its features")
        fit = head_images(cfg.head_fit_images)
        train_acc = model.fit_head(network.get_submodule(classifier_name(network)), fit, cfg.batch_size)
        rank_zero_info(f"head: fitted a linear head (logistic regression, L-BFGS) on the frozen features of "
                       f"{len(fit.labels)} training images; training accuracy {train_acc:.1f}%")
    return model


def official_sam_name(path: str | Path) -> str:
    """The registered model an official file holds, by its name: ``sam_vit_b_01ec64.pth`` -> ``sam_vit_b`` (SAM
    files carry a hash), ``sam2.1_hiera_base_plus.pt`` / ``sam2_hiera_large.pt`` -> the stem (SAM 2 files do not)."""
    stem = Path(path).stem
    match = re.match(r"sam_vit_[a-z]+(?=_|$)", stem)
    name = match[0] if match else stem
    if name not in models.list_models():
        raise ValueError(f"Cannot tell which model {path} holds from its file name (official files are named "
                         "sam_vit_{b,l,h}_*.pth, sam2.1_hiera_*.pt or sam2_hiera_*.pt). Pass --model, one of: "
                         f"{', '.join(models.list_models('sam*'))}.")
    return name


def load_sam_model(init_from: str, name: str | None = None, flag: str | None = "--model") -> nn.Module:
    """A SAM or SAM 2 on the CPU with the weights of ``init_from``: an official segment-anything ``sam_vit_*.pth``
    (its state dict), an official sam2 ``sam2*.pt`` (``{"model": state}``), or a Prism run directory, ``.ckpt``,
    DeepSpeed directory or export. ``name`` is the registered model; None: the official file's name
    (:func:`official_sam_name`) or the run's config.yaml model.name. ``flag``: the recipe's flag that names the model,
    for the error when neither tells (None: it has none). The model is left in train mode, as built."""
    path = Path(init_from)
    checkpoint = (torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
                  if path.is_file() and path.suffix in (".pt", ".pth") else {})
    # Lightning checkpoints hold state_dict, a plainly saved LightningModule state model.*; official files neither
    official = bool(checkpoint) and "state_dict" not in checkpoint and not any(
        str(k).startswith("model.") for k in checkpoint)
    name = name or (official_sam_name(path) if official
                    else source_model_name(init_from, flag, "sam2.1_hiera_tiny"))
    with torch.device("meta"):  # the file's tensors replace the parameters: no random init of a ViT-H
        model = _sam_as_trained(name, {} if official else source_model_section(init_from))
    if not isinstance(model, (SAM, SAM2)):
        raise ValueError(f"{name} is a {type(model).__name__}, not a SAM (sam_vit_*) or SAM 2 (sam2*_hiera_*) model")
    if set(dict(model.named_buffers())) - model.state_dict().keys():
        model = models.create(name)  # constants outside the state dict (SAM's pixel mean / std) need a real build
    if official and isinstance(model, SAM2):
        return load_official_sam2(model, path)
    if official:
        state = official_sam_state(checkpoint, model)
    else:
        state = load_state_dict(path)  # a LightningModule's model.*, or the model's own keys (an export)
        state = {k[6:]: v for k, v in state.items() if k.startswith("model.")} or state
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _sam_as_trained(name: str, section: dict) -> nn.Module:
    """The model ``name`` as the Prism run whose config ``section`` is given trained it: SAM 2's version and its
    multimask choice on tracked frames change the architecture or the masks, so they come from the run."""
    if section.get("name") != name or name.startswith("sam_vit_"):
        return models.create(name)
    fields = ("version", "multimask_output_for_tracking")
    return SAM2ModelConfig(name=name, **{k: section[k] for k in fields if section.get(k) is not None}).build()


def plm_export(init_from: str | Path) -> tuple[Path, dict]:
    """The Hugging Face PerceptionLM directory of ``init_from`` and the ``data`` settings (tiles, frames) its run
    trained with: a stage run's ``export/hf`` and its config.yaml's data section, a pipeline's last finished stage's,
    or a Hugging Face directory itself (and {}). A ValueError says why there is none (what to rerun)."""
    path = Path(init_from)
    if not path.is_dir():
        raise ValueError(f"{path}: no such directory (a PLM run, a PLM pipeline or a Hugging Face PerceptionLM one)")
    if (path / "config.json").is_file():
        if (kind := json.loads((path / "config.json").read_text()).get("model_type")) != "perception_lm":
            raise ValueError(f"{path} is not a PerceptionLM: its config.json has model_type {kind!r}")
        return path, {}
    if finished := [s for s in PLM_STAGES if StageResult(path / s).read() is not None]:
        rank_zero_info(f"{path} is a PLM pipeline: using its last finished stage, {finished[-1]}")
        path = path / finished[-1]
    elif any((path / s).is_dir() for s in PLM_STAGES):
        raise ValueError(f"{path}: no stage of this PLM pipeline has finished; rerun its training command to finish "
                         f"one: python -m recipes.plm --config {path / 'config.yaml'}")
    config = path / "config.yaml"
    run = yaml.safe_load(config.read_text()) if config.is_file() else None
    model, data = (run.get("model"), run.get("data")) if isinstance(run, dict) else (None, None)
    if not (isinstance(model, dict) and str(model.get("name")).startswith("plm_") and isinstance(data, dict)):
        raise ValueError(f"{path} is not a PerceptionLM run: it has no config.yaml of recipes.plm_train (model.name "
                         "plm_*), no finished stage of recipes.plm and no Hugging Face config.json")
    if not (path / "export" / "hf" / "config.json").is_file():
        raise ValueError(f"{path}: the run has not finished (no export/hf yet); rerun its training command to finish "
                         f"it: python -m recipes.plm_train --config {config}")
    return path / "export" / "hf", data
