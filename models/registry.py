"""One registry for every model: ``models.create("mae_vit_base_patch16", mask_ratio=0.6)``.

A registered factory is a function ``fn(**overrides) -> nn.Module``; its name is the model name. Factories
build their module from a config dataclass, so ``overrides`` are fields of that dataclass; use
:func:`build_with_overrides` inside a factory to get the checked override handling.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from typing import Any, Callable, TypeVar

from torch import nn

__all__ = ["register_model", "create", "list_models", "build_with_overrides"]

Factory = Callable[..., nn.Module]
F = TypeVar("F", bound=Factory)

_FACTORIES: dict[str, Factory] = {}  # canonical name -> factory
_ALIASES: dict[str, str] = {}  # alias -> canonical name


def register_model(fn: F | None = None, *, aliases: tuple[str, ...] = ()) -> F | Callable[[F], F]:
    """Register a model factory under its function name (and optional aliases).

    Use as ``@register_model`` or ``@register_model(aliases=("other_name",))``.
    """

    def decorator(f: F) -> F:
        for name in (f.__name__, *aliases):
            if name in _FACTORIES or name in _ALIASES:
                raise ValueError(f"Model name {name!r} is registered twice; pick a different function name or alias.")
        _FACTORIES[f.__name__] = f
        for alias in aliases:
            _ALIASES[alias] = f.__name__
        return f

    return decorator(fn) if fn is not None else decorator


def list_models(pattern: str = "*", include_aliases: bool = False) -> list[str]:
    """Sorted registered names matching a shell-style ``pattern`` (e.g. ``"mae_*"``)."""
    names = list(_FACTORIES) + (list(_ALIASES) if include_aliases else [])
    return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))


def create(name: str, **overrides: Any) -> nn.Module:
    """Build the registered model ``name``; ``overrides`` replace fields of its config dataclass."""
    canonical = _ALIASES.get(name, name)
    if canonical not in _FACTORIES:
        known = list_models(include_aliases=True)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(
            f"Unknown model {name!r}.{hint} models.list_models() lists all {len(_FACTORIES)} registered names."
        )
    return _FACTORIES[canonical](**overrides)


def build_with_overrides(model_cls: Callable[[Any], nn.Module], config: Any, overrides: dict[str, Any]) -> nn.Module:
    """``model_cls(dataclasses.replace(config, **overrides))`` with a clear error on unknown fields."""
    valid = [f.name for f in dataclasses.fields(config)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise TypeError(
            f"Unknown override(s) {unknown} for {type(config).__name__} (building {model_cls.__name__}). "
            f"Valid fields: {', '.join(valid)}."
        )
    return model_cls(dataclasses.replace(config, **overrides))


def register_config(name: str, model_cls: Callable[[Any], nn.Module], config: Any, doc: str) -> None:
    """Register ``name`` as ``model_cls(config)``, whose config fields ``create(name, **overrides)`` replaces."""
    def factory(**overrides: Any) -> nn.Module:
        return build_with_overrides(model_cls, config, overrides)

    factory.__name__ = name
    factory.__doc__ = doc
    register_model(factory)
