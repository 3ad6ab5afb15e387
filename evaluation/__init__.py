"""Metrics (pure tensor functions and torchmetrics wrappers) and evaluation harnesses.

Boundary IoU, J&F, zero-shot, robustness and MSD land here; see the evaluation issue.
"""
