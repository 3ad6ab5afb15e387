"""SAM and SAM 2 modules: torch.nn only.

Importing the package registers ``sam_vit_{b,l,h,nano}`` (:mod:`models.sam.sam`) and ``sam2.1_hiera_*`` /
``sam2_hiera_*`` (:mod:`models.sam.sam2`) in the model registry.
"""

from . import sam, sam2  # noqa: F401  (importing registers the factories)
