"""The one wrapper class: `AdaptedLayer` holds a base layer and the deltas of every adapter on it.

A delta is a small module that adds its contribution to the base layer's output
(`contribute`) and, when mergeable, folds itself into the base weight (`merge_into`). Layers read
the active adapters from a `RoutingState` shared by the whole model, so switching adapters touches
one object, and each layer rebuilds its tuple of active deltas lazily on its next forward.
"""

from __future__ import annotations

import torch
import torch.nn as nn

LAYER_KINDS = ("linear", "conv1d", "embedding")


def layer_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d' (GPT-2's transposed Linear), 'embedding', or None for other modules."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return "conv1d"
    return None


def forwarding_getattr(child: str):
    """A `__getattr__` for wrappers: attributes the wrapper lacks are read from its `child`."""
    def __getattr__(self, name: str):
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            if name in (child, "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self._modules[child], name)
    return __getattr__


class RoutingState:
    """What every wrapped layer of one model reads: the active adapters and the on/off switch.

    `version` grows on every change; layers compare it with the version they last saw.
    """

    __slots__ = ("active", "enabled", "version")

    def __init__(self) -> None:
        self.active: tuple[str, ...] = ()
        self.enabled = True
        self.version = 0

    def changed(self) -> None:
        self.version += 1


class Delta(nn.Module):
    """Base of all deltas. Subclasses set `mergeable` and implement the methods below."""

    mergeable = False

    def contribute(self, layer: AdaptedLayer, x: torch.Tensor, base_out: torch.Tensor,
                   out: torch.Tensor) -> torch.Tensor:
        """`out` plus this delta's contribution (base_out is the base layer's own output)."""
        raise NotImplementedError

    def merge_into(self, layer: AdaptedLayer) -> None:
        raise NotImplementedError

    def unmerge_from(self, layer: AdaptedLayer) -> None:
        raise NotImplementedError


class AdaptedLayer(nn.Module):
    """A base Linear / GPT-2 Conv1D / Embedding plus named deltas; the output is the base output
    plus the sum of the active, unmerged deltas' contributions."""

    is_peftlab_wrapper = True

    def __init__(self, base_layer: nn.Module, state: RoutingState) -> None:
        super().__init__()
        kind = layer_kind(base_layer)
        if kind is None:
            raise TypeError(f"cannot wrap {type(base_layer).__name__}; supported: {LAYER_KINDS}")
        self._modules["base_layer"] = base_layer
        self._modules["deltas"] = nn.ModuleDict()
        # plain __dict__ writes: a model gets hundreds of wrappers, Module.__setattr__ is slow
        self.__dict__.update(kind=kind, state=state, merged=[], _active=(), _seen_version=-1)

    @property
    def original_module(self) -> nn.Module:
        return self.base_layer

    # Shapes in the (out, in) convention of nn.Linear; an embedding reads token ids as "in".
    @property
    def in_features(self) -> int:
        w = self.base_layer.weight
        return w.shape[0] if self.kind != "linear" else w.shape[1]

    @property
    def out_features(self) -> int:
        w = self.base_layer.weight
        return w.shape[1] if self.kind != "linear" else w.shape[0]

    def weight_out_in(self) -> torch.Tensor:
        """The base weight as an (out, in) view: Conv1D and Embedding store it transposed."""
        w = self.base_layer.weight
        return w if self.kind == "linear" else w.t()

    # Model code reads attributes of the layer it built (weight, padding_idx, nf ...).
    __getattr__ = forwarding_getattr("base_layer")

    def _refresh(self) -> None:
        state = self.state
        deltas = self._modules["deltas"]._modules     # plain dict: no nn.Module lookups
        names = state.active if state.enabled else ()
        # plain __dict__ writes: nn.Module.__setattr__ costs microseconds per call
        self.__dict__["_active"] = tuple(deltas[n] for n in names if n in deltas and n not in self.merged)
        self.__dict__["_seen_version"] = state.version

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._seen_version != self.state.version:
            self._refresh()
        base_out = self._modules["base_layer"](x, *args, **kwargs)
        out = base_out
        for delta in self._active:  # the active adapters here: one in the common case
            out = delta.contribute(self, x, base_out, out)
        return out

    def extra_repr(self) -> str:
        return f"kind={self.kind}, merged={self.merged}"


class ModuleCopies(nn.Module):
    """`modules_to_save`: per-adapter trained copies of a whole module (e.g. a classifier head).

    The first active adapter that owns a copy answers; with none active, the original does.
    """

    is_peftlab_wrapper = True

    def __init__(self, original: nn.Module, state: RoutingState) -> None:
        super().__init__()
        self.original_module = original
        self.copies = nn.ModuleDict()
        self.state = state
        self.__dict__["_chosen"] = original   # a plain reference, not a registered submodule
        self._seen_version = -1

    __getattr__ = forwarding_getattr("original_module")

    def chosen(self) -> nn.Module:
        """The module that answers for the current routing state."""
        if self._seen_version != self.state.version:
            state = self.state
            names = state.active if state.enabled else ()
            copies = self._modules["copies"]._modules
            chosen = next((copies[n] for n in names if n in copies), self._modules["original_module"])
            self.__dict__["_chosen"] = chosen
            self.__dict__["_seen_version"] = state.version
        return self._chosen

    def forward(self, *args, **kwargs):
        return self.chosen()(*args, **kwargs)
