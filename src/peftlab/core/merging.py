"""Folding adapters into the base weights and taking them out again: when two deltas commute, the
order that merges several exactly, and the checks that refuse a merge or unmerge before any
weight changes (a capability the method lacks, tied weights, a non-commuting neighbour).

A layer's `merged` list records the order its deltas went in; unmerging takes them out last first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from .attach import Adapter, lookup
from .errors import AdapterError, CapabilityError
from .layer import AdaptedLayer, Delta
from .routing import RoutingState
from .sites import iter_modules


def commutes(a: Delta, b: Delta) -> bool:
    """Whether merging `a` and `b` into one weight gives the same result in either order
    (see `Delta.algebra`)."""
    if "none" in (a.algebra, b.algebra):
        return False
    return a.algebra == b.algebra or {a.algebra, b.algebra} == {"input", "scale"}


def merge(model: nn.Module, state: RoutingState, adapters: Mapping[str, Adapter],
          names: Sequence[str]) -> None:
    """Fold the named active adapters into `model`'s base weights, or raise before any changes."""
    for n in names:
        adapter = lookup(adapters, n)
        if not adapter.method.supports("merge"):
            raise CapabilityError(f"{adapter.method.title} adapter {n!r} cannot be merged: "
                                  "the method does not declare the 'merge' capability")
        if adapter.merged:
            raise AdapterError(f"adapter {n!r} is already merged; unmerge({n!r}) first")
        if n not in state.active:
            raise AdapterError(f"adapter {n!r} is not active; only active adapters can be merged "
                               f"(set_active([..., {n!r}]) first)")
        if n in state.weights:
            raise AdapterError(f"adapter {n!r} is active at weight {state.weights[n]:g}; merge "
                               f"folds it in at weight 1. Merge a composed adapter instead "
                               f"(peftlab.scale(am, {n!r}, {state.weights[n]:g}, name=...))")
    layers = {id(layer): layer for n in names for layer in adapters[n].layers.values()}
    check_untied(model, list(layers.values()))
    plans = [(layer, merge_order(model, state, layer, names)) for layer in layers.values()]
    for layer, order in plans:
        for n in order:
            layer.deltas[n].check_merge(layer)
    for layer, order in plans:
        for n in order:
            layer.deltas[n].merge_into(layer)
            layer.merged.append(n)
    for n in names:
        adapters[n].merged = True
    state.changed()


def merge_order(model: nn.Module, state: RoutingState, layer: AdaptedLayer,
                names: Sequence[str]) -> list[str]:
    """The order that folds `names` into this layer's weight exactly: output-side deltas in
    activation order, then input-side ones (the output-side ones read the rescaled input).
    Refuses when an active delta left unmerged here does not commute with one merged."""
    here = [n for n in state.active if n in names and n in layer.deltas]
    order = [n for n in here if layer.deltas[n].stage != "input"]
    order += [n for n in here if layer.deltas[n].stage == "input"]
    others = [n for n in state.active
              if n in layer.deltas and n not in names and n not in layer.merged]
    for n in order:
        for m in others:
            if not commutes(layer.deltas[n], layer.deltas[m]):
                raise AdapterError(
                    f"merging {n!r} alone would change the output at {_path_of(model, layer)}: "
                    f"the active adapter {m!r} there does not commute with it; merge both "
                    f"together (merge([{n!r}, {m!r}])) or deactivate {m!r} first")
    return order


def check_untied(model: nn.Module, layers: list[AdaptedLayer]) -> None:
    """CapabilityError when a layer's base weight is tied to another parameter of `model`:
    merging into it would change every tied copy."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for layer in layers:
        tied = owners.get(id(layer.base_layer.weight), [])
        if len(tied) > 1:
            raise CapabilityError(
                f"the weight {tied[0]!r} is tied to {tied[1:]}; merging would change every "
                "tied copy. Keep this adapter unmerged or untie the weights first")


def unmerge(model: nn.Module, state: RoutingState, adapters: Mapping[str, Adapter],
            names: Sequence[str], *, named: bool) -> None:
    """Take the named adapters back out of the base weights; `named`: the caller chose them, so
    each must be merged. Refuses before any change when a delta merged after one taken out
    stays in and does not commute with it."""
    for n in names:
        if named and not lookup(adapters, n).merged:
            raise AdapterError(f"adapter {n!r} is not merged")
    layers = {id(layer): layer for n in names for layer in adapters[n].layers.values()}
    for layer in layers.values():   # a delta merged after one unmerged must commute with it
        for i, n in enumerate(layer.merged):
            later = [m for m in layer.merged[i + 1:] if m not in names]
            bad = [m for m in later if n in names and not commutes(layer.deltas[n], layer.deltas[m])]
            if bad:
                raise AdapterError(f"{bad[0]!r} was merged after {n!r} at {_path_of(model, layer)} "
                                   f"and does not commute with it; unmerge both together")
    for layer in layers.values():
        for n in reversed(list(layer.merged)):  # last merged first
            if n in names:
                layer.deltas[n].unmerge_from(layer)
                layer.merged.remove(n)
    for n in names:
        adapters[n].merged = False
    state.changed()


def _path_of(model: nn.Module, layer: nn.Module) -> str:
    return next((p for p, m in iter_modules(model) if m is layer), "?")
