"""The method registry: one file per technique, one line here."""

from __future__ import annotations

import importlib

from ..errors import ConfigError, close_matches
from .base import Method, MethodConfig

_MODULES = ("lora", "ia3", "bitfit", "ln_tuning", "bottleneck", "prompt_tuning", "prefix_tuning", "adalink",
            "kasa", "balora", "s2ft", "context_peft")
METHODS: dict[str, Method] = {}
for _name in _MODULES:
    _method = importlib.import_module(f"{__name__}.{_name}").METHOD
    if _method is not None:
        METHODS[_method.name] = _method


def get_method(name: str) -> Method:
    """The registered method called `name`; ConfigError lists close names when there is none."""
    try:
        return METHODS[name]
    except KeyError:
        hint = close_matches(name, METHODS)
        raise ConfigError(f"no method {name!r}" + (f"; did you mean {', '.join(hint)}?" if hint else "")
                          + f" Registered: {', '.join(METHODS)}") from None


def method_of(config: MethodConfig) -> Method:
    """The method a config belongs to."""
    return get_method(config.method)


__all__ = ["METHODS", "Method", "MethodConfig", "get_method", "method_of"]
