"""What the official SAM and SAM 2 checkpoint loaders share: unwrapping the file and refusing a state that does not
fit the model exactly."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor


def model_state(checkpoint: Mapping[str, Any]) -> Mapping[str, Tensor]:
    """The state dict of an official checkpoint file's ``{"model": state}`` (SAM 2), or the state itself (SAM)."""
    inner = checkpoint.get("model")
    return inner if isinstance(inner, Mapping) else checkpoint


def require_exact_fit(mapped: Mapping[str, Tensor], expected: Mapping[str, Tensor], model: str,
                      official_name: Callable[[str], str] = str, extra_unexpected: tuple[str, ...] = ()) -> None:
    """Raise a ValueError naming every tensor that ``model`` lacks, does not have, or has in another shape, under
    the checkpoint's own names (``official_name`` maps a model key back), unless ``mapped`` fits ``expected``."""
    missing = sorted(official_name(k) for k in expected.keys() - mapped.keys())
    unexpected = sorted([official_name(k) for k in mapped.keys() - expected.keys()] + list(extra_unexpected))
    mis_shaped = sorted(f"{official_name(k)} {tuple(mapped[k].shape)} (expected {tuple(expected[k].shape)})"
                        for k in expected.keys() & mapped.keys() if mapped[k].shape != expected[k].shape)
    problems = [f"{what}: {', '.join(keys)}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)) if keys]
    if problems:
        raise ValueError(f"checkpoint does not fit {model}: " + "; ".join(problems))
