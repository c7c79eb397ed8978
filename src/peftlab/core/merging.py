"""Folding adapters into the base weights and taking them out again: when two deltas commute, the
order that merges several exactly, and the checks that refuse a merge or unmerge before any
weight changes (a capability the method lacks, tied weights, a non-commuting neighbour).

A layer's `merged` list records the order its deltas went in. Unmerging is exact: the first merge
into a layer keeps a copy of the base layer's parameters as they were (`AdaptedLayer.unmerged`),
and unmerging puts those bits back and merges again whatever stays merged there. Subtracting ΔW
instead (or dividing by DoRA's row scale) loses a rounding per cycle in bf16 / fp16, which
accumulates (DoRA: 5× the weight's norm after 200 cycles), and would shift the base for good if
the adapter changed while merged (an optimiser step).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .attach import Adapter, lookup
from .errors import AdapterError, CapabilityError
from .layer import AdaptedLayer, Delta
from .routing import RoutingState
from .sites import iter_modules, weight_axes


def commutes(a: Delta, b: Delta) -> bool:
    """Whether merging `a` and `b` into one weight gives the same result in either order
    (see `Delta.algebra`)."""
    if "none" in (a.algebra, b.algebra):
        return False
    return a.algebra == b.algebra or {a.algebra, b.algebra} == {"input", "scale"}


def merge(model: nn.Module, state: RoutingState, adapters: Mapping[str, Adapter],
          names: Sequence[str] | None, *, keep_copy: bool = True) -> None:
    """Fold the named active adapters (None: the active unmerged ones) into `model`'s base
    weights, or raise before any changes.
    `keep_copy`: keep each layer's parameters as they were before its first merge, for an exact
    unmerge (False only when nothing will be unmerged: merge_and_unload)."""
    if names is None:
        names = tuple(n for n in state.active if not adapters[n].merged)
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
    for layer, _ in plans:   # every copy first: running out of memory here changes no weight
        if keep_copy and not layer.merged:
            layer.__dict__["unmerged"] = {name: None if p is None else p.detach().clone()
                                          for name, p in layer.base_layer._parameters.items()}
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
        stay = [n for n in layer.merged if n not in names]
        if len(stay) == len(layer.merged):
            continue
        _restore(layer)
        layer.merged.clear()
        for n in stay:     # in their merge order: the same weight as merging them alone
            layer.deltas[n].merge_into(layer)
            layer.merged.append(n)
        if not stay:
            layer.__dict__["unmerged"] = None
    for n in names:
        adapters[n].merged = False
    state.changed()


def kept_weight(layer: AdaptedLayer) -> torch.Tensor | None:
    """The copy of the base weight that unmerging restores, as an (out, in) view (None while
    nothing is merged into `layer`). A delta that rewrites the base weight outside merging while
    others are merged (KaSA giving back its truncated triplets) rewrites this copy the same way."""
    if layer.unmerged is None:
        return None
    w = layer.unmerged["weight"]
    return w if w.dim() == 1 or weight_axes(layer.base_layer)[0] == 0 else w.t()


@torch.no_grad()
def _restore(layer: AdaptedLayer) -> None:
    """Put back the base layer's parameters as they were before its first merge, bit for bit, into
    the same Parameter objects (optimisers and tied references keep pointing at them); a slot that
    was None (a bias BitFit's merge created) becomes None again."""
    base = layer.base_layer._parameters
    for name, saved in layer.unmerged.items():
        if saved is None:
            base[name] = None
        else:
            base[name].copy_(saved)


def _path_of(model: nn.Module, layer: nn.Module) -> str:
    return next((p for p, m in iter_modules(model) if m is layer), "?")
