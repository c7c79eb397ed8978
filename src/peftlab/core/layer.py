"""The one wrapper class: `AdaptedLayer` holds a base layer and the deltas of every adapter on it.

A delta acts at one of three stages of the layer's forward (its `stage`):
  "input"  — rewrites the input the base layer and later deltas see (IA3 on an FFN input);
  "params" — adds to named base parameters for this call (LayerNorm tuning);
  "output" — adds its contribution to the running output (LoRA, biases, adapters, scalings).
When its method declares the MERGE capability (core/method.py), a delta folds itself into the
base weight (`merge_into`); whether a method merges is stated on its record, never on the delta
class. Layers read the active adapters from a `RoutingState` (routing.py) shared by the whole model, so
switching adapters touches one object, and each layer rebuilds its tuples of active deltas lazily
on its next forward.

Model-level methods (prompt and prefix tuning) do not live in a layer: their `InputHook` rewrites
the model's forward arguments (`AdaptedModel.forward`).

A routed batch (`AdaptedModel.routed`) gives every example its own adapter. Deltas with a batched
form (`Delta.mixed`, a `MixedDeltas` class) are then stacked per layer, one slot per distinct
adapter, and each example gathers its slot: one batched computation per kind of delta, never a
loop over the adapters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .errors import AdapterError, CapabilityError
from .geometry import TORCH_CONVS, dims, weight_out_in
from .quantised import quantisation

if TYPE_CHECKING:
    # annotations only: the router (routing.py) looks up methods, whose records name this module's
    # classes, so routing.py sits above this module
    from .routing import RoutingState

LAYER_KINDS = ("linear", "conv1d", "embedding", "norm", "conv", "params")


def layer_kind(module: nn.Module, params: Sequence[str] = ()) -> str | None:
    """'linear' (bitsandbytes' quantised Linear4bit / Linear8bitLt included: they subclass
    nn.Linear), 'conv1d' (GPT-2's transposed Linear), 'embedding', 'norm' (LayerNorm, RMSNorm
    and the like: an elementwise weight over the last dimension), 'conv' (torch's nn.Conv1d /
    Conv2d / Conv3d: channels are dim 1 of their activations), or None for other modules.
    Given targeted parameter names (a parameter site, core/sites.py), any other module holding
    them is 'params': its deltas act at the "params" stage, on the parameters its forward reads."""
    if params and all(isinstance(module._parameters.get(n), torch.Tensor) for n in params):
        other = layer_kind(module)
        return "params" if other is None else other
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, TORCH_CONVS):
        return "conv"
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


class Delta(nn.Module):
    """Base of all deltas. Subclasses set `stage` (see the module docstring), `algebra`, and
    implement the method of their stage plus, when their method declares MERGE, `merge_into`
    (and `check_merge` for its merge condition). Unmerging needs nothing from the delta: the
    machinery puts back the base parameters it copied before the first merge (core/merging.py).

    `algebra` says which deltas it commutes with when merged: "add" (additive deltas commute with
    each other), "scale" (output rescalings), "input" (input rescalings: they commute with
    rescalings but not with additive deltas, which read the rescaled input) and "none" (DoRA's
    renormalisation commutes with nothing); `merging.commutes` reads it.
    """

    stage = "output"
    algebra = "add"
    mixed: type[MixedDeltas] | None = None   # the batched form for routed batches, if any

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
        """Fold this delta into `layer`'s base parameters in place (rewriting them, or creating a
        missing bias), so that the base layer alone computes what it computed with the delta live."""
        raise NotImplementedError


def _like(t: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == base.dtype else t.to(base.dtype)


def per_example(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-example vectors (B, d) as (B, 1, ..., 1, d), broadcasting over the positions of `like`."""
    return values.view(values.shape[0], *([1] * (like.dim() - 2)), values.shape[-1])


class MixedDeltas:
    """The deltas of one batched form at one layer for a routed batch (`AdaptedModel.routed`).

    Slot s holds the delta of the batch's s-th distinct adapter, or None where that adapter (or the
    base model) has no delta of this form here; a None slot acts as the identity.
    Subclasses stack the slots' tensors (`stack`) and implement their stage's method, where every
    row gathers its slot's tensors with `index` (B,): one batched computation for all adapters.

    Forwards that send gradients to the deltas stack on every call, so each adapter's parameters
    get theirs; otherwise the stacks are built once, and the layer keeps this object for later
    routed batches while `RoutingState.stamp` says the routed adapters' tensors are unchanged.
    """

    stage = "output"

    def __init__(self, layer: AdaptedLayer, slots: list[Delta | None]) -> None:
        self.slots = slots
        self.grad = any(p.requires_grad for d in slots if d is not None for p in d.parameters())
        self._stacks: dict[tuple, Any] = {}

    def stack(self, layer: AdaptedLayer, *key: Any) -> Any:
        """The slots' tensors stacked along a new first dimension (S, ...); `key` is what
        `stacks` got besides the layer (LoRA: the dtype to compute in)."""
        raise NotImplementedError

    @staticmethod
    def rows(stacked: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Row b's slot of a stack (S, ...) -> (B, ...). Slots are numbered in order of first
        appearance, so with as many slots as rows (every example on its own adapter) row b is
        slot b and the stack is used as it is, without a gathered copy."""
        return stacked if stacked.shape[0] == index.shape[0] else stacked.index_select(0, index)

    def stacks(self, layer: AdaptedLayer, *key: Any) -> Any:
        if (self.grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
            # compiled: the stacking is part of the graph, which reads the deltas' tensors
            # themselves (an in-place `peftlab.hotswap` reaches it without a recompile)
            return self.stack(layer, *key)
        cached = self._stacks.get(key)
        if cached is None:
            # ordinary tensors even under inference_mode, so a later no-grad forward may reuse them
            with torch.no_grad(), torch.inference_mode(False):
                cached = self._stacks[key] = self.stack(layer, *key)
        return cached

    def transform_input(self, layer: AdaptedLayer, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """stage "input": every row's input as its own delta rewrites it."""
        raise NotImplementedError

    def param_deltas(self, layer: AdaptedLayer, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """stage "params": base parameter name -> per-example deltas (B, ...) added to it."""
        raise NotImplementedError

    def contribute(self, layer: AdaptedLayer, x: torch.Tensor, base_out: torch.Tensor,
                   out: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """stage "output": `out` plus every row's own delta contribution."""
        raise NotImplementedError


class AdaptedLayer(nn.Module):
    """A base Linear / GPT-2 Conv1D / Embedding / norm / torch convolution plus named deltas; the
    output is the base output plus the active, unmerged deltas' contributions, applied in
    activation order. A module wrapped for its parameters (kind 'params': MoE experts, a Mamba
    mixer) gets deltas on them at the "params" stage, called with its usual arguments."""

    is_peftlab_wrapper = True

    def __init__(self, base_layer: nn.Module, state: RoutingState, params: Sequence[str] = ()) -> None:
        super().__init__()
        kind = layer_kind(base_layer, params)
        if kind is None:
            raise TypeError(f"cannot wrap {type(base_layer).__name__}; supported: {LAYER_KINDS}")
        self._modules["base_layer"] = base_layer
        self._modules["deltas"] = nn.ModuleDict()
        # plain __dict__ writes: a model gets hundreds of wrappers, Module.__setattr__ is slow
        # merged: adapter names in merge order; unmerged: the base layer's parameters before the
        # first merge, for an exact unmerge (core/merging.py), or None. quantised: "nf4", "fp4",
        # "int8" for a bitsandbytes base (core/quantised.py); requantised: the error of the last
        # merge into it; _merging: the dense weight merge_into writes while a merge folds deltas
        # into a quantised base
        self.__dict__.update(kind=kind, state=state, merged=[], unmerged=None, _active=(), _before=(),
                             _params=(), _weighted={}, _seen_version=-1, _mixed=None,
                             _mixed_memo=(None, None), quantised=quantisation(base_layer),
                             requantised=None, _merging=None)

    @property
    def original_module(self) -> nn.Module:
        return self.base_layer

    # Shapes in the (out, in) convention of nn.Linear; an embedding reads token ids as "in".
    @property
    def in_features(self) -> int:
        return dims(self.base_layer)[0]

    @property
    def out_features(self) -> int:
        return dims(self.base_layer)[1]

    def weight_out_in(self) -> torch.Tensor:
        """The base weight as an (out, in) view: Conv1D and Embedding store it transposed. A
        quantised base's is dequantised into a new fp32 tensor, except while a merge folds deltas
        into it: then it is the dense weight that merge requantises (core/merging.py)."""
        dense = self.__dict__["_merging"]
        return dense if dense is not None else weight_out_in(self.base_layer)

    def remove_delta(self, name: str) -> None:
        """Take adapter `name`'s delta off this layer (its `release` runs); the caller puts the
        base layer back in the model when no delta is left."""
        self.__dict__["_mixed_memo"] = (None, None)   # a routed batch's stacks hold the delta
        self.deltas[name].release()
        del self.deltas[name]

    # Model code reads attributes of the layer it built (weight, padding_idx, nf ...).
    __getattr__ = forwarding_getattr("base_layer")

    def _refresh(self) -> None:
        state = self.state
        deltas = self._modules["deltas"]._modules     # plain dict: no nn.Module lookups
        if state.routed is not None:
            self._refresh_routed(deltas)
            return
        names = state.active if state.enabled else ()
        live = [deltas[n] for n in names if n in deltas and n not in self.merged]
        # plain __dict__ writes: nn.Module.__setattr__ costs microseconds per call
        self.__dict__.update(
            _before=tuple(d for d in live if d.stage == "input"),
            _params=tuple(d for d in live if d.stage == "params"),
            _active=tuple(d for d in live if d.stage == "output"),
            _weighted={deltas[n]: state.weights[n] for n in names
                       if n in state.weights and n in deltas and n not in self.merged},
            _mixed=None, _seen_version=state.version)

    def _refresh_routed(self, deltas: dict[str, Delta]) -> None:
        """Group this layer's deltas of the routed adapters by batched form, one slot per routed
        adapter; the groups (with their stacked weights) of the previous routed batch are kept
        while the routing state's stamp is the same, so inference stacks once."""
        state = self.state
        stamp, mixed = self._mixed_memo
        if stamp is not state.stamp:
            mixed = self._routed_groups(deltas)
        self.__dict__.update(_mixed=mixed, _mixed_memo=(state.stamp, mixed), _weighted={},
                             _seen_version=state.version)

    def _routed_groups(self, deltas: dict[str, Delta]) -> tuple[tuple[MixedDeltas, ...], ...]:
        """This layer's deltas of the routed adapters as batched groups, one slot per routed
        adapter: (input-stage, params-stage, output-stage) groups."""
        routed = self.state.routed
        slots: dict[type[MixedDeltas], list[Delta | None]] = {}
        for s, name in enumerate(routed):
            delta = deltas.get(name) if name is not None else None
            if delta is not None:
                slots.setdefault(delta.mixed, [None] * len(routed))[s] = delta
        groups = [cls(self, members) for cls, members in slots.items()]
        return tuple(tuple(g for g in groups if g.stage == stage) for stage in ("input", "params", "output"))

    def _forward_compiled(self, x: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        """The forward as torch.compile traces it: which deltas apply is read from the routing
        state's contents (active names, weights, routed ids: dynamo guards on those, so switching
        adapters recompiles once per setting and switching back reuses its graph), never from
        its version counter, and nothing is cached on the layer (no side effects for dynamo to
        replay after every call). The deltas' own forwards trace their tensors without caches
        (core/precision.py `cast_at_use`, MixedDeltas.stacks)."""
        state = self.state
        deltas = self._modules["deltas"]._modules
        if state.routed is not None:
            return self._forward_mixed(x, args, kwargs, self._routed_groups(deltas))
        names = state.active if state.enabled else ()
        live = [deltas[n] for n in names if n in deltas and n not in self.merged]
        weighted = {deltas[n]: state.weights[n] for n in names
                    if n in state.weights and n in deltas and n not in self.merged}
        before = [d for d in live if d.stage == "input"]
        params = tuple(d for d in live if d.stage == "params")
        for delta in before:
            w = weighted.get(delta, 1.0)
            x = delta.transform_input(self, x) if w == 1.0 else torch.lerp(x, delta.transform_input(self, x), w)
        if params:
            base_out = self._call_with_param_deltas(x, args, kwargs, params, weighted)
        else:
            base_out = self._modules["base_layer"](x, *args, **kwargs)
        out = base_out
        for delta in live:
            if delta.stage == "output":
                w = weighted.get(delta, 1.0)
                new = delta.contribute(self, x, base_out, out)
                out = new if w == 1.0 else torch.lerp(out, new, w)
        return out

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._forward_compiled(x, args, kwargs)
        if self._seen_version != self.state.version:
            self._refresh()
        if self._mixed is not None:
            return self._forward_mixed(x, args, kwargs)
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

    def _call_with_param_deltas(self, x: torch.Tensor, args: tuple, kwargs: dict[str, Any],
                                live: tuple[Delta, ...] | None = None,
                                weighted: dict[Delta, float] | None = None) -> torch.Tensor:
        """The base layer's forward with the "params"-stage deltas `live` (default: the kept
        ones) added to its parameters, each scaled by its weight in `weighted`."""
        base = self._modules["base_layer"]
        weighted = self._weighted if weighted is None else weighted
        params: dict[str, torch.Tensor] = {}
        for delta in self._params if live is None else live:
            w = weighted.get(delta, 1.0)
            for name, d in delta.param_deltas(self).items():
                params[name] = params.get(name, base.get_parameter(name)) + (d if w == 1.0 else w * d)
        # summed in the wider dtype (fp32 deltas on a bf16 norm), rounded once to the base's
        params = {n: _like(t, base.get_parameter(n)) for n, t in params.items()}
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

    def _forward_mixed(self, x: torch.Tensor, args: tuple, kwargs: dict[str, Any],
                       mixed: tuple[tuple[MixedDeltas, ...], ...] | None = None) -> torch.Tensor:
        """The forward of a routed batch: every example as if its own adapter alone were active.
        Each group applies its stage to all rows at once; a row whose adapter has no delta of that
        kind here gets the identity (adds 0, scales by 1). `mixed`: the groups (default: kept)."""
        before, params, after = self._mixed if mixed is None else mixed
        if not (before or params or after):
            # no routed adapter has a delta here: the base layer alone, whatever its input's shape
            # (an MoE experts module gets the batch's tokens flattened)
            return self._modules["base_layer"](x, *args, **kwargs)
        index = self.state.index                                   # (B,) slot of each example
        if x.shape[0] != index.shape[0]:
            raise AdapterError(
                f"adapter_ids routes {index.shape[0]} examples but a wrapped {self.kind} layer got a "
                f"batch of {x.shape[0]}; give one adapter id per example (for generate: one per "
                "prompt) and pass inputs batch-first")
        for group in before:
            x = group.transform_input(self, x, index)
        if params:
            base_out = self._call_per_example(x, args, kwargs, params, index)
        else:
            base_out = self._modules["base_layer"](x, *args, **kwargs)
        out = base_out
        for group in after:
            out = group.contribute(self, x, base_out, out, index)
        return out

    def _call_per_example(self, x: torch.Tensor, args: tuple, kwargs: dict[str, Any],
                          groups: tuple[MixedDeltas, ...], index: torch.Tensor) -> torch.Tensor:
        """A norm's forward with per-example parameter deltas ((B, d) each). A norm's output is
        affine in its elementwise weight and bias, so each row's parameters broadcast over its
        positions; torch's fused LayerNorm / RMSNorm kernels take a single (d,) weight, so for
        them the normalisation runs without affine parameters and the rows' affine part after."""
        base = self._modules["base_layer"]
        deltas: dict[str, torch.Tensor] = {}
        for group in groups:
            for name, d in group.param_deltas(self, index).items():
                deltas[name] = deltas[name] + d if name in deltas else d
        params = {n: per_example(_like(base.get_parameter(n) + d, base.get_parameter(n)), x)
                  for n, d in deltas.items()}                                      # (B, 1.., d)
        if isinstance(base, (nn.LayerNorm, nn.RMSNorm)):
            if isinstance(base, nn.LayerNorm):
                y = F.layer_norm(x, base.normalized_shape, None, None, base.eps)
            else:
                y = F.rms_norm(x, base.normalized_shape, None, base.eps)
            y = y * params.get("weight", base.weight)
            bias = params.get("bias", getattr(base, "bias", None))
            return y if bias is None else y + bias
        return functional_call(base, params, (x, *args), kwargs)

    def extra_repr(self) -> str:
        quantised = f", quantised={self.quantised}" if self.quantised else ""
        return f"kind={self.kind}{quantised}, merged={self.merged}"


class InputHook(nn.Module):
    """A model-level part of an adapter (prompt and prefix tuning): it rewrites the keyword
    arguments of the model's forward and generate, and trims what it added from the outputs.
    Its per-site tensors live in `parts` (site path -> module), which is what is saved."""

    uses_cache = False   # passes the attention cache (prefix): checkpointed layers must keep it

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

    def release(self, model: nn.Module) -> None:
        """Undo what `prepare` set on the model for one forward (default: nothing); called once
        the forward is over, whether it succeeded or raised."""

    def generate(self, model: nn.Module, kwargs: dict[str, Any]) -> Any:
        """`model.generate(**kwargs)` with this adapter applied; returns what generate returns,
        prompt ids included, as the plain model would."""
        raise NotImplementedError


class ModuleCopies(nn.Module):
    """`modules_to_save`: per-adapter trained copies of a whole module (e.g. a classifier head).

    The first active adapter that owns a copy answers; with none active, the original does. In a
    routed batch each example's adapter picks its module, and every distinct module runs on its
    own rows: a whole module (a head), not a layer on the hot path, so one call per module used.
    """

    is_peftlab_wrapper = True

    def __init__(self, original: nn.Module, state: RoutingState) -> None:
        super().__init__()
        self.original_module = original
        self.copies = nn.ModuleDict()
        self.state = state
        self.__dict__["_chosen"] = original   # a plain reference, not a registered submodule
        self.__dict__["_groups"] = None       # routed batch: ((module, rows (n,)), ...)
        self._seen_version = -1

    __getattr__ = forwarding_getattr("original_module")

    def chosen(self) -> nn.Module:
        """The module that answers for the current routing state (in a routed batch whose rows
        use different modules: the first row's)."""
        if self._seen_version != self.state.version:
            self._refresh()
        return self._chosen

    def _refresh(self) -> None:
        state = self.state
        copies = self._modules["copies"]._modules
        original = self._modules["original_module"]
        groups = None
        if state.routed is not None:
            owners = [copies.get(n, original) if n is not None else original for n in state.routed]
            modules = list(dict.fromkeys(owners))                # distinct, in slot order
            chosen = modules[0]
            if len(modules) > 1:
                group_of_row = torch.tensor([modules.index(m) for m in owners],
                                            device=state.index.device)[state.index]   # (B,)
                groups = tuple((m, (group_of_row == g).nonzero().squeeze(1)) for g, m in enumerate(modules))
        else:
            names = state.active if state.enabled else ()
            chosen = next((copies[n] for n in names if n in copies), original)
        self.__dict__.update(_chosen=chosen, _groups=groups, _seen_version=state.version)

    def forward(self, *args, **kwargs):
        module = self.chosen()
        if self._groups is None:
            return module(*args, **kwargs)
        return self._forward_grouped(args, kwargs)

    def _forward_grouped(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        """Each module on its rows of every batch-first tensor argument; the outputs scattered back."""
        n = self.state.index.shape[0]
        first = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(first, torch.Tensor) or first.dim() == 0 or first.shape[0] != n:
            raise AdapterError(f"adapter_ids routes {n} examples but a modules_to_save module got an "
                               "input that is not a batch of as many rows; pass inputs batch-first")

        def rows_of(v: Any, rows: torch.Tensor) -> Any:
            return v.index_select(0, rows) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v

        out = None
        for module, rows in self._groups:
            y = module(*(rows_of(a, rows) for a in args), **{k: rows_of(v, rows) for k, v in kwargs.items()})
            if not isinstance(y, torch.Tensor):
                raise CapabilityError(f"a modules_to_save copy ({type(module).__name__}) returned "
                                      f"{type(y).__name__}; routing rows to different copies needs a "
                                      "module that returns one tensor")
            out = (y.new_zeros((n, *y.shape[1:])) if out is None else out).index_copy(0, rows, y)
        return out
