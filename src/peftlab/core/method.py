"""The contract between a method file and the shared machinery: the config every method extends,
the `Method` record a method file declares, and the registry the machinery looks methods up in
(filled by `peftlab.methods`, which imports every method file)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from .errors import ConfigError, close_matches
from .layer import AdaptedLayer, Delta, InputHook
from .terms import LossTerm
from .sites import Site
from .typology import Typology

CAPABILITIES = ("merge", "mixed-batch", "train-in-mixed-batch", "quantised-base")


@dataclass
class MethodConfig:
    """Fields every method shares: where it attaches and which whole modules get trained copies."""

    method: ClassVar[str] = ""
    targets: str | list[str] = field(default_factory=list)
    layers: int | list[int] | None = None
    exclude: str | list[str] | None = None
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field and what would be valid."""
        if not self.targets:
            raise ConfigError(f"{type(self).__name__}.targets is empty; name roles such as "
                              "'attn.q', module names, globs, 're:...' or 'all-linear'")
        items = [self.targets] if isinstance(self.targets, str) else self.targets
        if not isinstance(items, (list, tuple)) or not all(isinstance(t, str) and t for t in items):
            raise ConfigError(f"{type(self).__name__}.targets must be a list of roles, module names, "
                              f"globs, 're:...' regexes or 'all-linear' (or one such string); got "
                              f"{self.targets!r}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MethodConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__} has no field(s) {unknown}; known: {sorted(names)}")
        return cls(**data)


def pattern_value(patterns: Mapping[str, Any], site: Site) -> Any | None:
    """The first pattern value whose key names this site: its role, or (as peft matches) a regex
    matching the module path at a dotted boundary. None when no key matches."""
    for key, value in patterns.items():
        if key == site.role or re.match(rf"(.*\.)?({key})$", site.path):
            return value
    return None


@dataclass(frozen=True)
class Method:
    """A registered PEFT method: everything the shared machinery needs to know about it."""

    name: str
    title: str
    config_cls: type[MethodConfig]
    typology: Typology
    layer_kinds: tuple[str, ...]            # base layer kinds it wraps; () = model-level method
    capabilities: frozenset[str]
    # build(site, layer, config, initialise=True): the delta for one site; `layer` wraps the
    # site's base layer; initialise=False leaves tensors unset for a checkpoint to fill.
    # Model-level methods (layer_kinds empty) get layer=None and return a plain module of tensors.
    # A build that declares a `model` keyword also gets the AdaptedModel (to find sibling sites).
    build: Callable[..., Delta | nn.Module]
    # Tensor names and shapes a delta at this site holds, for checking checkpoints before loading
    # (layer is None for model-level methods).
    tensor_shapes: Callable[[AdaptedLayer | None, Site, MethodConfig], dict[str, tuple[int, ...]]]
    describe: Callable[[MethodConfig], str] = lambda config: ""
    # build_hook(model, config, parts): an InputHook that rewrites the model's forward inputs
    # (prompt/prefix tuning; per-token routing masks), from the per-site parts (site path -> module).
    build_hook: Callable[[nn.Module, MethodConfig, dict[str, nn.Module]], InputHook] | None = None
    # The peft format (shared/specs/peft-format.md), for methods peft also has:
    # to_peft(am, adapter) -> (peft config fields beyond the common header, {full peft key: tensor});
    # from_peft(am, peft config, {peft key: tensor}, directory) -> (config, sites,
    # {(site path, tensor name): tensor}). Raise CheckpointError/ConfigError on a mismatch.
    # A learning rate known to work for this method in `peftlab train` when none is given
    # (None: the model's default, tuned for LoRA). Prompt-like methods need far larger ones.
    train_lr: float | None = None
    # loss_terms(am, adapter name, config, parts) -> [LossTerm]: auxiliary losses the adapter
    # brings (objectives.py), registered with it and removed with it.
    loss_terms: Callable[..., list[LossTerm]] | None = None
    # How adapters of this method combine in peftlab.compose: "lowrank" (ΔW = s·B A, combined as
    # ΔW), "additive" (every tensor adds to the base, identity 0), "scale" (every tensor rescales,
    # identity 1); None: not composable.
    composition: str | None = None
    peft_type: str | None = None
    to_peft: Callable[..., tuple[dict[str, Any], dict[str, Any]]] | None = None
    from_peft: Callable[..., tuple[MethodConfig, list[Site], dict[tuple[str, str], Any]]] | None = None

    def supports(self, capability: str) -> bool:
        return capability in self.capabilities



METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method record to the registry (a method file's `METHOD`)."""
    METHODS[method.name] = method
    return method


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
