"""The methods: one file per technique, each declaring a `METHOD` record; one line here registers it."""

from __future__ import annotations

import importlib

from ..core.method import (
    METHODS,
    Capability,
    Method,
    MethodConfig,
    get_method,
    method_of,
    register,
)

_MODULES = ("lora", "ia3", "bitfit", "ln_tuning", "bottleneck", "prompt_tuning", "prefix_tuning", "adalink",
            "kasa", "balora", "s2ft", "context_peft")
for _name in _MODULES:
    _method = importlib.import_module(f"{__name__}.{_name}").METHOD
    if _method is not None:
        register(_method)

__all__ = ["METHODS", "Capability", "Method", "MethodConfig", "get_method", "method_of", "register"]
