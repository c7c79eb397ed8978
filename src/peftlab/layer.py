"""The one wrapper class: `AdaptedLayer` holds a base layer and the deltas of every adapter on it.

A delta acts at one of three stages of the layer's forward (its `stage`):
  "input"  — rewrites the input the base layer and later deltas see (IA3 on an FFN input);
  "params" — adds to named base parameters for this call (LayerNorm tuning);
  "output" — adds its contribution to the running output (LoRA, biases, adapters, scalings).
When mergeable, a delta folds itself into the base weight (`merge_into`). Layers read the active
adapters from a `RoutingState` shared by the whole model, so switching adapters touches one object,
and each layer rebuilds its tuples of active deltas lazily on its next forward.

Model-level methods (prompt and prefix tuning) do not live in a layer: their `InputHook` rewrites
the model's forward arguments (`AdaptedModel.forward`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

LAYER_KINDS = ("linear", "conv1d", "embedding", "norm")


def layer_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d' (GPT-2's transposed Linear), 'embedding', 'norm' (LayerNorm, RMSNorm
    and the like: an elementwise weight over the last dimension), or None for other modules."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    if name == "Conv1D" and weight is not None:
        return "conv1d"
    if "Norm" in name and isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return "norm"
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

    __slots__ = ("active", "enabled", "version", "weights")

    def __init__(self) -> None:
        self.active: tuple[str, ...] = ()
        self.enabled = True
        self.version = 0
        self.weights: dict[str, float] = {}   # active adapters whose contribution is scaled (≠ 1)

    def changed(self) -> None:
        self.version += 1


class Delta(nn.Module):
    """Base of all deltas. Subclasses set `stage` (see the module docstring), `algebra`, and
    implement the method of their stage plus, when mergeable, `merge_into` / `unmerge_from`.

    `algebra` says which deltas it commutes with when merged: "add" (additive deltas commute with
    each other), "scale" (output rescalings), "input" (input rescalings: they commute with
    rescalings but not with additive deltas, which read the rescaled input) and "none" (DoRA's
    renormalisation commutes with nothing).
    """

    stage = "output"
    algebra = "add"

    def contribute(self, layer: AdaptedLayer, x: torch.Tensor, base_out: torch.Tensor,
                   out: torch.Tensor) -> torch.Tensor:
        """`out` plus this delta's contribution (base_out is the base layer's own output)."""
        raise NotImplementedError

    def transform_input(self, layer: AdaptedLayer, x: torch.Tensor) -> torch.Tensor:
        """stage "input": the input the base layer and the later deltas see."""
        raise NotImplementedError

    def param_deltas(self, layer: AdaptedLayer) -> dict[str, torch.Tensor]:
        """stage "params": base parameter name -> tensor added to it for this forward."""
        raise NotImplementedError

    def release(self) -> None:
        """Called when the delta leaves the model: drop hooks it registered elsewhere."""

    def loaded(self, layer: AdaptedLayer, path: str) -> None:
        """Called after a checkpoint's tensors were copied into this delta at `path`; raise
        CheckpointError when they do not fit the base layer (e.g. KaSA's dropped components)."""

    def check_merge(self, layer: AdaptedLayer) -> None:
        """Raise when this delta cannot be merged into `layer`; called for every layer before
        any weight changes, so a refused merge leaves the model as it was."""

    def merge_into(self, layer: AdaptedLayer) -> None:
        raise NotImplementedError

    def unmerge_from(self, layer: AdaptedLayer) -> None:
        raise NotImplementedError


def commutes(a: Delta, b: Delta) -> bool:
    """Whether merging `a` and `b` into one weight gives the same result in either order."""
    if "none" in (a.algebra, b.algebra):
        return False
    return a.algebra == b.algebra or {a.algebra, b.algebra} == {"input", "scale"}


class AdaptedLayer(nn.Module):
    """A base Linear / GPT-2 Conv1D / Embedding / norm plus named deltas; the output is the base
    output plus the active, unmerged deltas' contributions, applied in activation order."""

    is_peftlab_wrapper = True

    def __init__(self, base_layer: nn.Module, state: RoutingState) -> None:
        super().__init__()
        kind = layer_kind(base_layer)
        if kind is None:
            raise TypeError(f"cannot wrap {type(base_layer).__name__}; supported: {LAYER_KINDS}")
        self._modules["base_layer"] = base_layer
        self._modules["deltas"] = nn.ModuleDict()
        # plain __dict__ writes: a model gets hundreds of wrappers, Module.__setattr__ is slow
        self.__dict__.update(kind=kind, state=state, merged=[], _active=(), _before=(), _params=(),
                             _weighted={}, _seen_version=-1)

    @property
    def original_module(self) -> nn.Module:
        return self.base_layer

    # Shapes in the (out, in) convention of nn.Linear; an embedding reads token ids as "in".
    @property
    def in_features(self) -> int:
        w = self.base_layer.weight
        return w.shape[0] if self.kind != "linear" else w.shape[-1]

    @property
    def out_features(self) -> int:
        w = self.base_layer.weight   # a norm's weight is 1-D: in = out = its size
        return w.shape[-1] if self.kind != "linear" else w.shape[0]

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
        live = [deltas[n] for n in names if n in deltas and n not in self.merged]
        # plain __dict__ writes: nn.Module.__setattr__ costs microseconds per call
        self.__dict__.update(
            _before=tuple(d for d in live if d.stage == "input"),
            _params=tuple(d for d in live if d.stage == "params"),
            _active=tuple(d for d in live if d.stage == "output"),
            _weighted={deltas[n]: state.weights[n] for n in names
                       if n in state.weights and n in deltas and n not in self.merged},
            _seen_version=state.version)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._seen_version != self.state.version:
            self._refresh()
        if self._weighted:
            return self._forward_weighted(x, args, kwargs)
        for delta in self._before:
            x = delta.transform_input(self, x)
        if self._params:
            base_out = self._call_with_param_deltas(x, args, kwargs)
        else:
            base_out = self._modules["base_layer"](x, *args, **kwargs)
        out = base_out
        for delta in self._active:  # the active adapters here: one in the common case
            out = delta.contribute(self, x, base_out, out)
        return out

    def _call_with_param_deltas(self, x: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        base = self._modules["base_layer"]
        weighted = self._weighted
        params: dict[str, torch.Tensor] = {}
        for delta in self._params:
            w = weighted.get(delta, 1.0)
            for name, d in delta.param_deltas(self).items():
                params[name] = params.get(name, base.get_parameter(name)) + (d if w == 1.0 else w * d)
        return functional_call(base, params, (x, *args), kwargs)

    def _forward_weighted(self, x: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        """The forward with some adapters' effects scaled by w (`set_active(..., weights=)`): each
        delta's change is scaled about its identity, t ↦ t + w·(delta(t) − t), which is w·ΔW for an
        additive delta and 1 + w·(l − 1) for a rescaling vector."""
        weighted = self._weighted
        for delta in self._before:
            w = weighted.get(delta, 1.0)
            x = delta.transform_input(self, x) if w == 1.0 else torch.lerp(x, delta.transform_input(self, x), w)
        if self._params:
            base_out = self._call_with_param_deltas(x, args, kwargs)
        else:
            base_out = self._modules["base_layer"](x, *args, **kwargs)
        out = base_out
        for delta in self._active:
            w = weighted.get(delta, 1.0)
            new = delta.contribute(self, x, base_out, out)
            out = new if w == 1.0 else torch.lerp(out, new, w)
        return out

    def extra_repr(self) -> str:
        return f"kind={self.kind}, merged={self.merged}"


class InputHook(nn.Module):
    """A model-level part of an adapter (prompt and prefix tuning): it rewrites the keyword
    arguments of the model's forward and generate, and trims what it added from the outputs.
    Its per-site tensors live in `parts` (site path -> module), which is what is saved."""

    def __init__(self, parts: dict[str, nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleDict({str(i): m for i, m in enumerate(parts.values())})
        self.__dict__["part_paths"] = list(parts)

    def prepare(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The forward arguments with this adapter's inputs added."""
        raise NotImplementedError

    def finish(self, output: Any, kwargs: dict[str, Any]) -> Any:
        """The model's output with the positions this hook added removed (default: unchanged)."""
        return output

    def generate(self, model: nn.Module, kwargs: dict[str, Any]) -> Any:
        """`model.generate(**kwargs)` with this adapter applied; returns what generate returns,
        prompt ids included, as the plain model would."""
        raise NotImplementedError


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
