"""Models: torch.nn modules (on timm blocks) and one registry.

    import models
    mae = models.create("mae_vit_base_patch16", mask_ratio=0.75)
    models.list_models("vit_*")

This package never imports Lightning, data or trainer code.
"""

from . import mae, vit  # noqa: F401  (importing registers the factories)
from .complexity import Complexity
from .registry import create, list_models, register_model

__all__ = ["create", "list_models", "register_model", "Complexity"]
