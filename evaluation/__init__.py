"""Metrics (pure tensor / numpy functions and torchmetrics wrappers) and evaluation harnesses.

boundary (Boundary IoU), boundary_ap (COCO Boundary AP), vos (J&F), zero_shot (zero-shot and retrieval),
classification (top-k), hashtags (SWAG precision@k and zero-shot), corruptions (ImageNet-C and -C-bar),
robustness (error under corruptions), msd (Minimal Sample Distance), linear_head (a head fitted on features).
"""
