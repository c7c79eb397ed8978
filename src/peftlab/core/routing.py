"""Which adapters contribute: the `RoutingState` every wrapped layer reads, the checks on the active
set and its weights, and the `Router` that gives each example of a batch its own adapter.

The state is one object per model: switching adapters touches it alone, and each layer rebuilds
what it applies lazily when the state's `version` has moved. A routed block (`AdaptedModel.routed`)
overrides the active set with one adapter id per example; the router checks the ids, numbers each
example's slot among the distinct ids, and stamps the routed adapters' tensors so layers can keep
their stacked weights from one routed call to the next.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from .attach import Adapter, lookup
from .errors import AdapterError, CapabilityError
from .method import METHODS, Capability


class RoutingState:
    """What every wrapped layer of one model reads: the active adapters and the on/off switch,
    or, for a routed batch, each example's adapter (which then overrides both).

    `version` grows on every change; layers compare it with the version they last saw.
    """

    __slots__ = ("active", "enabled", "index", "routed", "stamp", "version", "weights")

    def __init__(self) -> None:
        self.active: tuple[str, ...] = ()
        self.enabled = True
        self.version = 0
        self.weights: dict[str, float] = {}   # active adapters whose contribution is scaled (≠ 1)
        # A routed batch: its distinct adapter ids in order of appearance (None: the base model),
        # and each example's slot among them, a LongTensor (B,). None when no routing is set.
        self.routed: tuple[str | None, ...] | None = None
        self.index: torch.Tensor | None = None
        # Stays the same object while the routed adapters' tensors are unchanged (identity and
        # version, checked by `Router.stamp`): layers then reuse their stacked weights.
        self.stamp: object | None = None

    def changed(self) -> None:
        self.version += 1


def check_weights(adapters: Mapping[str, Adapter], names: tuple[str, ...],
                  weights: Sequence[float] | None) -> dict[str, float]:
    """name -> weight for the adapters of `set_active` whose weight is not 1, or AdapterError
    (CapabilityError for an adapter whose effect has no weight: a hook or whole-module copies)."""
    if weights is None:
        return {}
    weights = [float(w) for w in weights]
    if not all(math.isfinite(w) for w in weights):
        raise AdapterError(f"set_active weights must be finite numbers, got {weights}")
    if len(weights) != len(names):
        raise AdapterError(f"set_active got {len(names)} adapters but {len(weights)} weights; "
                           "give one weight per adapter")
    scaled = {n: w for n, w in zip(names, weights, strict=True) if w != 1.0}
    for n in scaled:
        a = adapters[n]
        if a.merged:
            raise AdapterError(f"adapter {n!r} is merged at weight 1; unmerge({n!r}) before "
                               "giving it another weight")
        if a.hook is not None or a.copies:
            what = "a prompt/prefix hook" if a.hook is not None else f"whole-module copies {list(a.copies)}"
            raise CapabilityError(f"adapter {n!r} has {what}, which cannot be scaled by a weight; "
                                  f"make a scaled adapter with peftlab.scale(am, {n!r}, w, name=...) "
                                  "and activate that instead")
    return scaled


def check_id_list(adapter_ids: object) -> None:
    """A non-empty sequence (not a string) of ids, or AdapterError."""
    if isinstance(adapter_ids, str) or not isinstance(adapter_ids, Sequence) or not adapter_ids:
        raise AdapterError(f"adapter_ids must be a non-empty sequence with one adapter name (or None "
                           f"for the base model) per example, got {adapter_ids!r}")


def check_batch(adapter_ids: Sequence[str | None], args: tuple, kwargs: dict) -> None:
    """One id per example of the batch that forward / generate got, or AdapterError."""
    check_id_list(adapter_ids)
    x = args[0] if args else next((kwargs[k] for k in ("input_ids", "inputs_embeds", "inputs")
                                   if kwargs.get(k) is not None), None)
    if isinstance(x, torch.Tensor) and x.dim() and len(adapter_ids) != x.shape[0]:
        raise AdapterError(f"adapter_ids has {len(adapter_ids)} entries but the batch has "
                           f"{x.shape[0]} examples; give one adapter name (or None for the base "
                           "model) per example")


class Router:
    """Opens routed blocks on one model's RoutingState (see `AdaptedModel.routed`).

    It remembers the tensors of the last routed call, so that a call routing the same adapters
    over unchanged tensors gets the same stamp and the layers skip their checks and restacking.
    """

    __slots__ = ("_last", "state")

    def __init__(self, state: RoutingState) -> None:
        self.state = state
        # (routed ids, tensors, their (version, requires_grad) marks, stamp) of the last routed call
        self._last: tuple | None = None

    def forget(self) -> None:
        """Drop the tensors kept from the last routed call (an adapter left the model)."""
        self._last = None

    @contextmanager
    def routed(self, adapters: Mapping[str, Adapter], adapter_ids: Sequence[str | None],
               device: torch.device) -> Iterator[None]:
        """Within the block, example i uses exactly adapter `adapter_ids[i]` (None: the base
        model); refused, with the state as it was, when an id cannot be routed."""
        routed, index = self.slots(adapters, adapter_ids, device)
        state = self.state
        outer = state.routed, state.index, state.stamp
        # compiled (torch.compile): layers read the routed ids, never the version, and cache
        # nothing (AdaptedLayer._forward_compiled), so the version stays: a bump would be a guard
        # that fails on every call
        compiling = torch.compiler.is_compiling()
        state.routed, state.index, state.stamp = routed, index, self.stamp(adapters, routed)
        if not compiling:
            state.changed()
        try:
            yield
        finally:
            state.routed, state.index, state.stamp = outer
            if not compiling:
                state.changed()

    def stamp(self, adapters: Mapping[str, Adapter], routed: tuple[str | None, ...]) -> object:
        """The previous routed batch's stamp when it routed the same adapters and every tensor the
        layers stack from (the deltas' parameters and buffers, the base weights: the same objects,
        at the same versions, none trainable) is unchanged; else a new one. One pass
        over those tensors per routed call; the layers then skip their checks and restacking.
        None under torch.compile: a compiled graph stacks from the tensors themselves, so an
        in-place update (`peftlab.hotswap`) reaches it, and tensors' versions are not traceable."""
        if torch.compiler.is_compiling():
            return None
        tensors: list[torch.Tensor | None] = []
        for n in routed:
            for layer in adapters[n].layers.values() if n is not None else ():
                modules = layer._modules      # plain dicts: this runs for every routed call
                delta = modules["deltas"]._modules[n]
                tensors.append(modules["base_layer"]._parameters["weight"])
                tensors += delta._parameters.values()
                tensors += delta._buffers.values()
        tensors = [t for t in tensors if t is not None]
        marks = [(t._version, t.requires_grad) for t in tensors]
        if any(grad for _, grad in marks):
            # trainable tensors can change in place unseen: fused optimizers (transformers
            # Trainer's default AdamW) do not bump versions. A fresh stamp: stacks are rebuilt.
            self._last = None
            return object()
        last = self._last
        if (last is not None and last[0] == routed and len(last[1]) == len(tensors)
                and all(map(operator.is_, last[1], tensors)) and last[2] == marks):
            return last[3]
        # the tensors are kept referenced, so a later tensor cannot reuse one of their identities
        self._last = (routed, tensors, marks, object())
        return self._last[3]

    @staticmethod
    def slots(adapters: Mapping[str, Adapter], adapter_ids: Sequence[str | None],
              device: torch.device) -> tuple[tuple[str | None, ...], torch.Tensor]:
        """The distinct ids in order of appearance and each example's slot among them (a LongTensor
        on `device`), or an error naming the id that cannot be routed and what to do instead."""
        check_id_list(adapter_ids)
        routed = tuple(dict.fromkeys(adapter_ids))
        for n in routed:
            if n is None:
                continue
            if not isinstance(n, str):
                raise AdapterError(f"adapter_ids holds {n!r}; each entry is an adapter name or None")
            adapter = lookup(adapters, n)
            if adapter.hook is not None:
                raise CapabilityError(
                    f"adapter {n!r} is a {adapter.method.title} adapter, which rewrites the model's "
                    "inputs as a whole (a model-level hook) and cannot differ between the examples of "
                    "one batch; run its examples in their own batch with set_active")
            if not adapter.method.supports("mixed-batch"):
                supported = [m.title for m in METHODS.values() if m.supports("mixed-batch")]
                raise CapabilityError(
                    f"adapter {n!r} is a {adapter.method.title} adapter, a method without a batched "
                    f"(per-example) form; mixed batches support {', '.join(supported)}. Run its "
                    "examples in their own batch with set_active")
            params = [s for s in adapter.sites if s.params]
            if params:
                raise CapabilityError(
                    f"adapter {n!r} adapts parameters that {params[0].type_name} at {params[0].path!r} "
                    f"reads directly ({', '.join(params[0].params)}; {len(params)} such sites), for the "
                    "whole batch at once (an MoE layer mixes the tokens of every example): they have no "
                    "per-example form. Run its examples in their own batch with set_active")
        merged = [n for n, a in adapters.items() if a.merged]
        if merged:
            raise AdapterError(f"adapters {merged} are merged into the base weights, which every example "
                               f"of a routed batch shares; unmerge({merged}) before routing examples")
        slot = {n: i for i, n in enumerate(routed)}
        index = torch.tensor([slot[n] for n in adapter_ids], dtype=torch.long, device=device)
        return routed, index


def check_routed_training(state: RoutingState, adapters: Mapping[str, Adapter]) -> None:
    """CapabilityError when a forward of a routed batch would send gradients to a trainable
    adapter whose method does not declare TRAIN_IN_MIXED_BATCH; called on every forward, so it
    returns at once outside routed training. `adapters`: name -> the model's Adapter records."""
    if state.routed is None or not torch.is_grad_enabled():
        return
    for name in state.routed:
        adapter = adapters.get(name) if name is not None else None
        if adapter is not None and adapter.trainable and \
                Capability.TRAIN_IN_MIXED_BATCH not in adapter.method.capabilities:
            raise adapter.method.refuse(
                Capability.TRAIN_IN_MIXED_BATCH, name, "a routed (adapter_ids) forward with gradients",
                f"Train it on batches of its own (set_active({name!r})), or freeze it "
                "(set_trainable) or run under torch.no_grad() to route it for inference")
