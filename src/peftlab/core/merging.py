"""Folding adapters into the base weights and taking them out again: when two deltas commute, the
order that merges several exactly, and the checks that refuse a merge or unmerge before any
weight changes (a capability the method lacks, tied weights, a non-commuting neighbour).

A layer's `merged` list records the order its deltas went in. Unmerging is exact: the first merge
into a layer keeps a copy of the base layer's parameters as they were (`AdaptedLayer.unmerged`),
and unmerging puts those bits back and merges again whatever stays merged there. Subtracting ΔW
instead (or dividing by DoRA's row scale) loses a rounding per cycle in bf16 / fp16, which
accumulates (DoRA: 5× the weight's norm after 200 cycles), and would shift the base for good if
the adapter changed while merged (an optimiser step).

A bitsandbytes-quantised base (core/quantised.py) gets a new packed weight: its dequantised W,
the deltas folded into it in fp32 (`merge_into` writes a dense copy, `AdaptedLayer._merging`),
quantised again with the layer's settings, and the requantisation error recorded on the layer
(`AdaptedLayer.requantised`, shown by status, the status table and the card). Each merge folds
everything merged there from the kept original, so the weight is rounded once whatever the
number of merges. A merge whose requantised weight is no closer to the exact W + ΔW than the
weight before it (the rounding undid the adapter: a no-op merge) is refused before anything
changes. The replaced packed weight is the copy an unmerge puts back (a reference: merging never
writes into it). `merge_dense` is merge_and_unload(dtype=...): dense layers, no requantisation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .attach import Adapter, lookup, replace_module
from .errors import AdapterError, CapabilityError
from .geometry import weight_axes
from .layer import AdaptedLayer, Delta
from .quantised import (
    Packed,
    RequantError,
    dense_linear,
    dequantised,
    packed,
    put_back,
    quantisation,
    requantised,
)
from .routing import RoutingState
from .sites import iter_modules


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
    names, plans = _plan(model, state, adapters, names)
    # quantised bases first: their new packed weights are computed (and a merge that the
    # rounding would undo refused) before any weight changes
    new = {id(layer): _requantised(model, layer, order) for layer, order in plans if layer.quantised}
    for layer, _ in plans:   # every copy first: running out of memory here changes no weight
        if keep_copy and not layer.merged:
            layer.__dict__["unmerged"] = _kept(layer)
    for layer, order in plans:
        if layer.quantised:
            _commit(layer, *new[id(layer)])
        else:
            for n in order:
                layer.deltas[n].merge_into(layer)
        layer.merged.extend(order)
    for n in names:
        adapters[n].merged = True
    state.changed()


def _plan(model: nn.Module, state: RoutingState, adapters: Mapping[str, Adapter],
          names: Sequence[str] | None) -> tuple[Sequence[str], list[tuple[AdaptedLayer, list[str]]]]:
    """The adapters to merge and each layer's merge order, after every check that can refuse."""
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
    return names, plans


def merge_dense(model: nn.Module, state: RoutingState, adapters: Mapping[str, Adapter],
                dtype: torch.dtype) -> None:
    """merge_and_unload(dtype=...): merge the active unmerged adapters and make every
    bitsandbytes-quantised layer of `model` (adapted or not) an nn.Linear holding its dequantised
    weight with everything merged there folded in fp32 (from the kept original, so adapters
    merged before are rounded once too), then cast the model's parameters to `dtype` and drop
    transformers' quantisation record from it. Refuses before any change; keeps no copies."""
    names, plans = _plan(model, state, adapters, None)
    order_of = {id(layer): order for layer, order in plans}
    for path, module in list(iter_modules(model)):      # one layer at a time: one dense copy
        base = module.base_layer if isinstance(module, AdaptedLayer) else module
        if not quantisation(base):
            continue
        if isinstance(module, AdaptedLayer):
            order = order_of.pop(id(module), [])
            dense, bias, _ = _folded(module, order)
            module.merged.extend(order)
            module._modules["base_layer"] = dense_linear(base, dense.to(dtype), bias)
            module.__dict__.update(quantised=None, requantised=None, unmerged=None)
        else:
            replace_module(model, path, dense_linear(base, dequantised(base).to(dtype), base.bias))
    for layer, order in plans:
        if id(layer) in order_of:                        # the layers that were never quantised
            for n in order:
                layer.deltas[n].merge_into(layer)
            layer.merged.extend(order)
    quantizer = getattr(model, "hf_quantizer", None)    # transformers: config.quantization_config
    if quantizer is not None:                           # would requantise the saved model
        quantizer.remove_quantization_config(model)
    for p in model.parameters():    # parameters only: buffers such as RoPE's inv_freq stay fp32, as
        if p.is_floating_point():   # from_pretrained(dtype=...) leaves them; in place keeps ties
            p.data = p.data.to(dtype)
    for n in names:
        adapters[n].merged = True
    state.changed()


def _kept(layer: AdaptedLayer) -> dict[str, object]:
    """The base layer's parameters as they are, for an exact unmerge: copies, except a quantised
    layer's packed weight, kept as it is (merging gives the layer a new one)."""
    return {name: None if p is None else packed(layer.base_layer) if layer.quantised and name == "weight"
            else p.detach().clone() for name, p in layer.base_layer._parameters.items()}


@torch.no_grad()
def _folded(layer: AdaptedLayer, order: Sequence[str]
            ) -> tuple[torch.Tensor, nn.Parameter | None, Packed | None]:
    """A quantised layer's dense fp32 (out, in) weight and its bias with what is merged there and
    the deltas `order` folded in, from the parameters before its first merge (as they are, when
    nothing is merged): `merge_into` writes into a dequantised copy and a copy of the bias, so
    the layer is left as it was. Third: the packed weight it started from when no delta wrote
    into the weight (BitFit changes the bias only), which then needs no requantisation."""
    base = layer.base_layer
    kept = layer.unmerged if layer.merged else None      # None after merge_and_unload's merges
    names = [*layer.merged, *order] if kept else list(order)
    source = kept["weight"] if kept else packed(base)
    dense = dequantised(base, source)
    version = dense._version
    start = kept.get("bias") if kept else base._parameters.get("bias")
    bias = base._parameters.get("bias")
    base._parameters["bias"] = None if start is None else nn.Parameter(start.detach().clone(),
                                                                       requires_grad=False)
    layer.__dict__["_merging"] = dense
    try:
        for n in names:
            layer.deltas[n].merge_into(layer)
        folded = base._parameters["bias"]
    finally:
        layer.__dict__["_merging"] = None
        base._parameters["bias"] = bias
    return dense, folded, source if dense._version == version else None


@torch.no_grad()
def _requantised(model: nn.Module, layer: AdaptedLayer, order: Sequence[str], *, refuse: bool = True
                 ) -> tuple[Packed, nn.Parameter | None, RequantError]:
    """A quantised layer's new packed weight (`_folded`, requantised), its bias and the error.
    `refuse`: CapabilityError when the new weight is no closer to the exact W + ΔW than the
    current one, i.e. the rounding undid the merge."""
    exact, bias, unchanged = _folded(layer, order)
    weight = unchanged or requantised(layer.base_layer, exact)
    err = dequantised(layer.base_layer, weight) - exact
    error = RequantError(layer.quantised, float(err.abs().max()),
                         float(err.norm() / exact.norm().clamp_min(torch.finfo(torch.float32).tiny)))
    if refuse and order:
        change = float((exact - dequantised(layer.base_layer)).norm())
        if change > 0 and float(err.norm()) >= change:
            raise CapabilityError(
                f"merging {list(order)} into the {layer.quantised} layer {_path_of(model, layer)} would "
                f"change nothing: requantising W + ΔW rounds the adapters away (error ‖·‖_F "
                f"{float(err.norm()):.3g} ≥ the merge's change {change:.3g}). Keep them unmerged (they "
                "run beside the quantised base at full precision), or get an unquantised merged model "
                "with am.merge_and_unload(dtype=torch.bfloat16)")
    return weight, bias, error


def _commit(layer: AdaptedLayer, weight: Packed, bias: nn.Parameter | None, error: RequantError) -> None:
    """Give a quantised layer its requantised weight and folded bias (written into the bias
    Parameter where there is one, so references to it stay valid) and record the error."""
    base = layer.base_layer
    put_back(base, weight)
    current = base._parameters.get("bias")
    if current is not None and bias is not None:
        current.copy_(bias)
    else:
        base._parameters["bias"] = bias
    layer.__dict__["requantised"] = error


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
        base = layer.base_layer
        # a module wrapped for its parameters: merging writes into those (core/layer.py)
        written = [p for p in base._parameters.values() if p is not None] if layer.kind == "params" \
            else [base.weight]
        tied = max((owners.get(id(p), []) for p in written), key=len, default=[])
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
        if layer.quantised and stay:   # as merging them alone: folded, requantised once
            _commit(layer, *_requantised(model, layer, stay, refuse=False))
        else:
            for n in stay:     # in their merge order: the same weight as merging them alone
                layer.deltas[n].merge_into(layer)
        layer.merged.extend(stay)
        if not stay:
            layer.__dict__.update(unmerged=None, requantised=None)
    for n in names:
        adapters[n].merged = False
    state.changed()


def kept_weight(layer: AdaptedLayer) -> torch.Tensor | None:
    """The copy of the base weight that unmerging restores, as an (out, in) view (None while
    nothing is merged into `layer`). A delta that rewrites the base weight outside merging while
    others are merged (KaSA giving back its truncated triplets) rewrites this copy the same way."""
    if layer.unmerged is None:
        return None
    if layer.quantised:   # packed: a dense view would be a copy, and writing into it would be lost
        raise CapabilityError(f"the copy kept for unmerging a {layer.quantised} layer is packed; it "
                              "has no dense view to rewrite")
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
        elif isinstance(saved, Packed):   # a quantised weight: the packed original itself
            put_back(layer.base_layer, saved)
        else:
            base[name].copy_(saved)


def _path_of(model: nn.Module, layer: nn.Module) -> str:
    return next((p for p, m in iter_modules(model) if m is layer), "?")
