"""Export of trained weights for the next stage and for other tools (safetensors, timm keys)."""

from dataclasses import asdict
from pathlib import Path

from torch import nn

from models.vit import VisionTransformer, ViTConfig
from trainers.checkpoint import save_safetensors


def timm_kwargs(cfg: ViTConfig) -> dict:
    """Arguments of ``timm.models.VisionTransformer`` that build the same architecture.

    timm's LayerNorm eps is 1e-6, the same as ours; another eps cannot be expressed as a plain kwarg.
    """
    if cfg.ln_eps != 1e-6:
        raise ValueError(f"timm's VisionTransformer uses LayerNorm eps 1e-6; this encoder uses {cfg.ln_eps}.")
    return {
        "img_size": cfg.img_size, "patch_size": cfg.patch_size, "in_chans": cfg.in_chans,
        "embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads, "mlp_ratio": cfg.mlp_ratio,
        "qkv_bias": cfg.qkv_bias, "num_classes": cfg.num_classes, "global_pool": cfg.global_pool,
    }


def export_vit_encoder(encoder: VisionTransformer, path: str | Path, **metadata) -> Path:
    """Write a ViT's weights with timm keys; the metadata says how to rebuild it in timm and in Prism.

    A ViT_C (conv stem) has no timm twin: its metadata carries ``vit_config`` only, for ``models.vit``.
    """
    conv_stem = encoder.cfg.stem == "conv"
    meta = {**({} if conv_stem else {"timm_kwargs": timm_kwargs(encoder.cfg)}), "vit_config": asdict(encoder.cfg),
            **metadata}
    return save_safetensors(encoder.state_dict(), path, meta)


def export_model(model: nn.Module, path: str | Path, **metadata) -> Path:
    """Any trained network as safetensors: a ViT (with or without a head) through ``export_vit_encoder``,
    so that ``timm.models.VisionTransformer(**timm_kwargs)`` loads it strictly; any other model (a timm
    RegNet, say) with its own state-dict keys."""
    if isinstance(model, VisionTransformer):
        return export_vit_encoder(model, path, **metadata)
    return save_safetensors(model.state_dict(), path, {"model_class": type(model).__name__, **metadata})
