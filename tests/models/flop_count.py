"""torch's FLOP counter, made independent of which attention kernel the dispatcher picks."""

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def counted_flops(model: nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs of ``model(*inputs)`` as ``FlopCounterMode`` counts them, attention products included.

    FlopCounterMode knows the cost of a fused attention kernel only through a formula registered for that exact
    aten op (pytorch/pytorch torch/utils/flop_counter.py registers the CUDA flash / efficient / cuDNN ops), and
    which fused op ``scaled_dot_product_attention`` dispatches to varies with device, dtype and torch release:
    torch 2.14 on CPU takes ``_scaled_dot_product_flash_attention_for_cpu``, which has no formula, so QK^T and AV
    silently counted 0. The math backend exists on every device and release and decomposes attention into
    ``bmm``, whose formula the counter has always had, so the total no longer depends on kernel selection.
    Counting attention by hand here instead would repeat the formula of the code under test.
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*inputs)
    return counter.get_total_flops()
