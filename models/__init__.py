"""Models: torch.nn modules (on timm blocks) and one registry.

    import models
    mae = models.create("mae_vit_base_patch16", mask_ratio=0.75)
    models.list_models("vit_*")

Model families: ViT (``vit_*``), MAE (``mae_*``), ViT_C / ViT_P pairs (``vitc_*``, ``vitp_*``), RegNetY
(``regnety_*``), Perception Encoder CLIP models (``pe_core_*``), SAM (``sam_vit_*``) and SAM 2
(``sam2.1_hiera_*``, ``sam2_hiera_*`` for 2.0). Complexity: :mod:`models.complexity` (ours, for MFU),
:mod:`models.pycls_complexity` (pycls's convention, for papers and scaling); model scaling: :mod:`models.scaling`.

This package never imports Lightning, data or trainer code.
"""

from . import mae, pe, plm, regnet, sam, vit, vitc  # noqa: F401  (importing registers the factories)
from .complexity import Complexity
from .registry import create, list_models, register_model

__all__ = ["create", "list_models", "register_model", "Complexity"]
