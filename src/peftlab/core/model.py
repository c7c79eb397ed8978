"""AdaptedModel: named adapters on one base model, their activation, training marks and merging."""

from __future__ import annotations

import copy
import inspect
import math
import operator
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .taps import ActivationTaps
from .errors import (
    AdapterError,
    CapabilityError,
    CheckpointError,
    ConfigError,
    close_matches,
)
from .layer import (
    AdaptedLayer,
    Delta,
    InputHook,
    ModuleCopies,
    RoutingState,
    commutes,
    forwarding_getattr,
    layer_kind,
)
from .method import METHODS, Method, MethodConfig, check_routed_training, method_of
from .terms import LossContext, LossTerm
from .sites import Site, iter_modules, resolve_sites, site_roles, sites_at
from .typology import describe_provenance, render_card, summarise_sites

_KIND_NAMES = {"linear": "Linear", "conv1d": "Conv1D", "embedding": "Embedding", "norm": "a norm"}


@dataclass
class Adapter:
    """One named instance of a method on the model: its config, sites and state."""

    name: str
    config: MethodConfig
    method: Method
    sites: list[Site]
    layers: dict[str, AdaptedLayer]                    # site path -> the wrapper holding a delta
    copies: dict[str, ModuleCopies] = field(default_factory=dict)   # modules_to_save path -> wrapper
    hook: InputHook | None = None                      # model-level methods (prompt, prefix)
    trainable: bool = False
    merged: bool = False
    provenance: dict | None = None                     # how a composed adapter was made (compose.py)

    def parts(self) -> dict[str, nn.Module]:
        """Site path -> the module holding this adapter's tensors there."""
        if not self.layers and self.hook is not None:
            return dict(zip(self.hook.part_paths, self.hook.parts.values(), strict=True))
        return {path: layer.deltas[self.name] for path, layer in self.layers.items()}


@dataclass(frozen=True)
class LayerStatus:
    path: str
    role: str | None
    kind: str
    adapters: tuple[str, ...]
    merged: tuple[str, ...]


def _name_list(names: str | Sequence[str] | None) -> tuple[str, ...]:
    if names is None:
        return ()
    return (names,) if isinstance(names, str) else tuple(names)


def _check_id_list(adapter_ids: object) -> None:
    if isinstance(adapter_ids, str) or not isinstance(adapter_ids, Sequence) or not adapter_ids:
        raise AdapterError(f"adapter_ids must be a non-empty sequence with one adapter name (or None "
                           f"for the base model) per example, got {adapter_ids!r}")


class AdaptedModel(nn.Module):
    """A pretrained model with named PEFT adapters attached in place.

    Forward and `generate` pass straight to the wrapped model. Adapters are added inactive and
    frozen: `set_active` chooses which ones contribute (their outputs sum) and `set_trainable`
    chooses which ones get gradients; neither call changes the other. `adapter_ids=` (or the
    `routed` block) gives every example of a batch its own adapter instead.
    """

    def __init__(self, model: nn.Module, *, freeze_base: bool = True) -> None:
        super().__init__()
        self.model = model
        self.state = RoutingState()
        self.adapters: dict[str, Adapter] = {}
        self.hooks = nn.ModuleDict()       # adapter name -> InputHook of model-level adapters
        self._hooks_seen: tuple[int, tuple[InputHook, ...]] = (-1, ())
        self.loss_terms: dict[str, LossTerm] = {}
        self._last_forward: tuple[dict, object] | None = None   # for loss terms that read outputs
        self._last_stamp: tuple | None = None   # routed(): (routed ids, tensors, versions, stamp)
        self.taps = ActivationTaps(model)   # intermediate tensors for loss terms and metrics
        self._roles: dict[str, str] | None = None
        self._unloaded = False
        self._head_hook = None
        if freeze_base:
            for p in model.parameters():
                p.requires_grad_(False)
            self._head_hook = _contiguous_head_input(model)

    # ---- pass-through -------------------------------------------------------------------------
    def forward(self, *args, adapter_ids: Sequence[str | None] | None = None, **kwargs):
        """The wrapped model's forward with the active adapters; with `adapter_ids` (one adapter
        name per example, None for the base model) example i uses exactly adapter_ids[i]
        whatever is active (see `routed`)."""
        if adapter_ids is not None:
            self._check_batch(adapter_ids, args, kwargs)
            with self.routed(adapter_ids):
                return self.forward(*args, **kwargs)
        check_routed_training(self.state, self.adapters)
        hooks = self._active_hooks()
        capture = tap = False
        if self.training and self.loss_terms:
            capture, tap = self._terms_need()
        tap = tap or self.taps.forced
        if not hooks and not capture and not tap:
            return self.model(*args, **kwargs)
        inputs = kwargs = self._as_kwargs(args, kwargs, "forward")
        for hook in hooks:
            kwargs = hook.prepare(self.model, kwargs)
        if tap:
            self.taps.begin(kwargs.get("attention_mask"))
            try:
                out = self.model(**kwargs)
            finally:
                self.taps.end()
        else:
            out = self.model(**kwargs)
        for hook in reversed(hooks):
            out = hook.finish(out, kwargs)
        if capture:
            self.__dict__["_last_forward"] = (inputs, out)
        return out

    def generate(self, *args, adapter_ids: Sequence[str | None] | None = None, **kwargs):
        """The wrapped model's `generate`, with the active adapters applied; with `adapter_ids`
        (one per prompt, None for the base model) prompt i generates with exactly adapter
        adapter_ids[i] (see `routed`), its beams and return sequences too."""
        if adapter_ids is not None:
            self._check_batch(adapter_ids, args, kwargs)
            # generate repeats every prompt max(num_beams, num_return_sequences) times, prompt-major
            config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
            repeat = max(kwargs.get(k, getattr(config, k, None)) or 1
                         for k in ("num_beams", "num_return_sequences"))
            with self.routed([n for n in adapter_ids for _ in range(repeat)]):
                return self.model.generate(*args, **kwargs)
        hooks = self._active_hooks()
        if not hooks:
            return self.model.generate(*args, **kwargs)
        if len(hooks) > 1:
            raise CapabilityError("generate supports one active prompt/prefix adapter at a time")
        return hooks[0].generate(self.model, self._as_kwargs(args, kwargs, "generate"))

    def _active_hooks(self) -> tuple[InputHook, ...]:
        version, hooks = self._hooks_seen
        if version != self.state.version:
            state = self.state
            names = state.active if state.enabled and state.routed is None else ()
            hooks = tuple(self.hooks[n] for n in names if n in self.hooks)
            self.__dict__["_hooks_seen"] = (self.state.version, hooks)
        return hooks

    # ---- per-example routing -------------------------------------------------------------------
    @contextmanager
    def routed(self, adapter_ids: Sequence[str | None]) -> Iterator[None]:
        """Within the block, example i of every batch uses exactly adapter `adapter_ids[i]` (None:
        the base model), whatever `set_active` / `disabled` say; forward and generate take
        `adapter_ids=` and open this block for the call. Training works too: each adapter's
        parameters get the gradients of its own rows.

        Every layer handles the whole batch at once: LoRA (any ranks, rsLoRA, DoRA, PiSSA) as
        one gather + batched matmul pair, IA3, BitFit and LayerNorm tuning as per-row vectors, so
        the cost grows with the rows, not with the number of adapters. Stacked adapter weights are
        built on the first forward and kept while the weights are unchanged (checked when a block
        opens), except in forwards that send gradients to them. `modules_to_save` copies (e.g.
        per-user heads) run each on its own rows. Refused with an error that leaves the model as
        it was: unknown names, merged adapters (every row would share them), prompt / prefix
        adapters and methods without a batched form."""
        routed, index = self._routing(adapter_ids)
        state = self.state
        outer = state.routed, state.index, state.stamp
        state.routed, state.index, state.stamp = routed, index, self._stamp(routed)
        state.changed()
        try:
            yield
        finally:
            state.routed, state.index, state.stamp = outer
            state.changed()

    def _stamp(self, routed: tuple[str | None, ...]) -> object:
        """The previous routed batch's stamp when it routed the same adapters and every tensor the
        layers stack from (the deltas' parameters and buffers, the base weights: the same objects,
        at the same versions, with the same requires_grad) is unchanged; else a new one. One pass
        over those tensors per routed call; the layers then skip their checks and restacking."""
        tensors: list[torch.Tensor | None] = []
        for n in routed:
            for layer in self.adapters[n].layers.values() if n is not None else ():
                modules = layer._modules      # plain dicts: this runs for every routed call
                delta = modules["deltas"]._modules[n]
                tensors.append(modules["base_layer"]._parameters["weight"])
                tensors += delta._parameters.values()
                tensors += delta._buffers.values()
        tensors = [t for t in tensors if t is not None]
        marks = [(t._version, t.requires_grad) for t in tensors]
        last = self._last_stamp
        if (last is not None and last[0] == routed and len(last[1]) == len(tensors)
                and all(map(operator.is_, last[1], tensors)) and last[2] == marks):
            return last[3]
        # the tensors are kept referenced, so a later tensor cannot reuse one of their identities
        self.__dict__["_last_stamp"] = (routed, tensors, marks, object())
        return self._last_stamp[3]

    def _routing(self, adapter_ids: Sequence[str | None]) -> tuple[tuple[str | None, ...], torch.Tensor]:
        """The distinct ids in order of appearance and each example's slot among them, or an error."""
        self._check_usable()
        _check_id_list(adapter_ids)
        routed = tuple(dict.fromkeys(adapter_ids))
        for n in routed:
            if n is None:
                continue
            if not isinstance(n, str):
                raise AdapterError(f"adapter_ids holds {n!r}; each entry is an adapter name or None")
            adapter = self.adapter(n)
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
        merged = [n for n, a in self.adapters.items() if a.merged]
        if merged:
            raise AdapterError(f"adapters {merged} are merged into the base weights, which every example "
                               f"of a routed batch shares; unmerge({merged}) before routing examples")
        slot = {n: i for i, n in enumerate(routed)}
        device = next(self.model.parameters()).device
        index = torch.tensor([slot[n] for n in adapter_ids], dtype=torch.long, device=device)
        return routed, index

    @staticmethod
    def _check_batch(adapter_ids: Sequence[str | None], args: tuple, kwargs: dict) -> None:
        """One id per example of the batch that forward / generate got."""
        _check_id_list(adapter_ids)
        x = args[0] if args else next((kwargs[k] for k in ("input_ids", "inputs_embeds", "inputs")
                                       if kwargs.get(k) is not None), None)
        if isinstance(x, torch.Tensor) and x.dim() and len(adapter_ids) != x.shape[0]:
            raise AdapterError(f"adapter_ids has {len(adapter_ids)} entries but the batch has "
                               f"{x.shape[0]} examples; give one adapter name (or None for the base "
                               "model) per example")

    @staticmethod
    def _as_kwargs(args: tuple, kwargs: dict, what: str) -> dict:
        if len(args) > 1:
            raise TypeError(f"with a prompt/prefix adapter active, pass {what}'s arguments after the "
                            "input ids by keyword (input_ids, attention_mask=..., labels=...)")
        if args:
            if "input_ids" in kwargs:
                raise TypeError(f"{what} got input_ids twice")
            kwargs = {"input_ids": args[0], **kwargs}
        return dict(kwargs)

    __getattr__ = forwarding_getattr("model")   # config, device, ... of the wrapped model

    # ---- adding and removing ------------------------------------------------------------------
    def add_adapter(self, name: str, config: MethodConfig) -> Adapter:
        """Attach a new adapter (inactive, frozen) at the sites `config.targets` name."""
        return self.install(name, config)

    def install(self, name: str, config: MethodConfig, *, sites: Sequence[str] | None = None,
                tensors: Mapping[tuple[str, str], torch.Tensor] | None = None,
                copies: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                trainable: bool = False, provenance: dict | None = None) -> Adapter:
        """Attach adapter `name` of `config`'s method (inactive) and return it; every check runs
        before the model changes, so a refused install leaves it as it was.

        `sites`: the module paths it attaches to (None: resolved from config.targets, layers and
        exclude). `tensors`: (site path, tensor name) -> the values of its deltas (None: freshly
        initialised); every tensor the method expects must be there with its shape, and nothing
        else. `copies`: the state of its modules_to_save copies, module path -> state dict (None:
        copies of config.modules_to_save as they are now); needs `tensors`. `trainable` gives its
        parameters gradients; `provenance` records how a composed adapter was made."""
        self._check_usable()
        self._check_new_name(name)
        config.validate()
        method = method_of(config)
        roles = self.site_roles()
        if sites is None:
            found = resolve_sites(self.model, config.targets, layers=config.layers,
                                  exclude=config.exclude, roles=roles)
        else:
            found = sites_at(self.model, sites, roles)
        if copies is None:
            copy_sites = (resolve_sites(self.model, config.modules_to_save, roles=roles)
                          if config.modules_to_save else [])
        else:
            copy_sites = sites_at(self.model, list(copies), roles)
        if copies is not None and tensors is None:
            raise ConfigError("install got modules_to_save copies without the adapter's tensors; "
                              "give both (a checkpoint) or neither (a fresh adapter)")
        copy_tensors = None if copies is None else {
            (path, pname): t for path, state in copies.items() for pname, t in state.items()}
        adapter = self._attach(name, config, method, found, copy_sites, tensors, copy_tensors, trainable)
        adapter.provenance = provenance
        return adapter

    def _attach(self, name: str, config: MethodConfig, method: Method, sites: list[Site],
                copy_sites: list[Site], tensors: Mapping[tuple[str, str], torch.Tensor] | None,
                copy_tensors: Mapping[tuple[str, str], torch.Tensor] | None,
                trainable: bool) -> Adapter:
        """Build every delta (freshly initialised, or filled from `tensors` keyed by
        (site path, tensor name)), then install them. Nothing changes until all are built.
        Model-level methods (prompt, prefix) get per-site parts gathered by one InputHook and
        wrap no layer."""
        current = dict(iter_modules(self.model))
        model_level = not method.layer_kinds     # prompt, prefix: no layer is wrapped
        for site in sites:
            if isinstance(current[site.path], ModuleCopies):
                raise ConfigError(f"{site.path!r} is trained whole (modules_to_save) by another "
                                  f"adapter; {method.title} cannot also attach there")
            kind = layer_kind(site.module)
            if not model_level and kind not in method.layer_kinds:
                kinds = ", ".join(_KIND_NAMES[k] for k in method.layer_kinds)
                raise ConfigError(
                    f"{method.title} cannot attach to {site.type_name} at {site.path!r} "
                    f"(role {site.role}); it attaches to {kinds}. Narrow the targets or exclude it")
        layers = {} if model_level else {
            s.path: current[s.path] if isinstance(current[s.path], AdaptedLayer)
            else AdaptedLayer(s.module, self.state) for s in sites}
        if tensors is not None:
            self._check_tensors(name, config, method, sites, layers, copy_sites, tensors,
                                copy_tensors or {})
        parts: dict[str, nn.Module] = {}
        try:
            # A build that declares a `model` keyword (e.g. the parallel adapter, which hooks a sibling
            # module) gets this AdaptedModel.
            build_kwargs = {"model": self} if "model" in inspect.signature(method.build).parameters else {}
            for site in sites:
                part = method.build(site, layers.get(site.path), config, initialise=tensors is None,
                                    **build_kwargs)
                parts[site.path] = part
                if tensors is not None:
                    with torch.no_grad():
                        for tname, t in part.state_dict().items():
                            t.copy_(tensors[(site.path, tname)])
                    if isinstance(part, Delta):
                        part.loaded(layers[site.path], site.path)
            hook = method.build_hook(self.model, config, parts) if method.build_hook else None
            terms = method.loss_terms(self, name, config, parts) if method.loss_terms else []
            copies: dict[str, nn.Module] = {}
            for site in copy_sites:
                clone = copy.deepcopy(site.module).requires_grad_(False)
                if copy_tensors is not None:
                    with torch.no_grad():
                        for pname, t in clone.state_dict().items():
                            t.copy_(copy_tensors[(site.path, pname)])
                copies[site.path] = clone
        except BaseException:
            for part in parts.values():   # e.g. hooks a parallel adapter registered on siblings
                if isinstance(part, Delta):
                    part.release()
            raise

        # Install: from here on nothing can fail on bad input.
        if hook is not None:
            self.hooks[name] = hook
        for term in terms:
            self.loss_terms[term.name] = term
        if not model_level:
            for path, delta in parts.items():
                if current[path] is not layers[path]:
                    self._replace(path, layers[path], current)
                layers[path].deltas[name] = delta
        wrappers: dict[str, ModuleCopies] = {}
        for path, clone in copies.items():
            wrapper = current[path]
            if not isinstance(wrapper, ModuleCopies):
                wrapper = ModuleCopies(wrapper, self.state)
                self._replace(path, wrapper, current)
            wrapper.copies[name] = clone
            wrappers[path] = wrapper
        adapter = Adapter(name, config, method, sites, layers, wrappers, hook=hook)
        self.adapters[name] = adapter
        if trainable:   # deltas and copies are created frozen
            self._set_requires_grad(adapter, True)
        self.state.changed()
        return adapter

    def _check_tensors(self, name, config, method, sites, layers, copy_sites, tensors,
                       copy_tensors) -> None:
        """Every expected tensor present with the right shape, and nothing else."""
        expected: set[tuple[str, str]] = set()
        for site in sites:
            for tname, shape in method.tensor_shapes(layers.get(site.path), site, config).items():
                key = (site.path, tname)
                expected.add(key)
                self._check_shape(name, key, tensors, shape)
        for site in copy_sites:
            for pname, t in site.module.state_dict().items():
                key = (site.path, pname)
                expected.add(key)
                self._check_shape(name, key, copy_tensors, tuple(t.shape))
        extra = sorted(set(tensors) - expected) + sorted(set(copy_tensors) - expected)
        if extra:
            path, tname = extra[0]
            raise CheckpointError(f"adapter {name!r} holds tensor {tname!r} for {path!r}, which this "
                                  f"{method.title} config does not produce ({len(extra)} such tensors); "
                                  "the checkpoint and its config disagree")

    def _check_shape(self, name, key, tensors, shape) -> None:
        path, tname = key
        if key not in tensors:
            raise CheckpointError(f"adapter {name!r} has no tensor {tname!r} for site {path!r}; "
                                  "the checkpoint is incomplete or was made for other targets")
        got = tuple(tensors[key].shape)
        if got != tuple(shape):
            raise CheckpointError(
                f"tensor {tname!r} of site {path!r} is {list(got)} in the checkpoint but this model "
                f"needs {list(shape)}: the adapter was made for a different base model "
                f"(this one is {type(self.model).__name__})")

    def _replace(self, path: str, module: nn.Module, modules: dict[str, nn.Module] | None = None) -> None:
        """Put `module` at `path`; `modules` (path -> module) saves walking the tree."""
        parent, _, leaf = path.rpartition(".")
        if not parent:
            owner = self.model
        elif modules is not None and parent in modules:
            owner = modules[parent]
        else:
            owner = self.model.get_submodule(parent)
        # `leaf` is an existing child: replace it in place, skipping Module.__setattr__'s checks
        owner._modules[leaf] = module

    def site_roles(self) -> dict[str, str]:
        """Module path -> PEFT-Ref role for the wrapped model (computed once: wrapping a layer
        keeps its path)."""
        if self._roles is None:
            self._roles = site_roles(self.model)
        return self._roles

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter; layers left with no deltas become their plain base layer again."""
        adapter = self.adapter(name)
        if adapter.merged:
            raise AdapterError(f"adapter {name!r} is merged into the base weights; "
                               f"call unmerge({name!r}) before deleting it")
        self.__dict__["_last_stamp"] = None    # routed batches keep stacks of their adapters' tensors
        for path, layer in adapter.layers.items():
            layer.__dict__["_mixed_memo"] = (None, None)
            layer.deltas[name].release()
            del layer.deltas[name]
            if not layer.deltas:
                self._replace(path, layer.base_layer)
        if adapter.hook is not None:
            del self.hooks[name]
        for term_name in [n for n, t in self.loss_terms.items() if t.adapter == name]:
            self.remove_loss_term(term_name)
        for path, wrapper in adapter.copies.items():
            del wrapper.copies[name]
            if not wrapper.copies:
                self._replace(path, wrapper.original_module)
        del self.adapters[name]
        self.state.active = tuple(n for n in self.state.active if n != name)
        self.state.weights.pop(name, None)
        self.state.changed()

    # ---- activation and training marks ----------------------------------------------------------
    @property
    def active(self) -> list[str]:
        """Names of the active adapters, in the order given to set_active."""
        return list(self.state.active)

    def set_active(self, names: str | Sequence[str], weights: Sequence[float] | None = None) -> None:
        """Make exactly these adapters contribute, in this order (additive deltas sum). `weights`
        scales each one's effect about its identity: w·ΔW for additive deltas, 1 + w·(l − 1) for
        rescaling vectors (None: all 1). Does not touch requires_grad."""
        names = _name_list(names)
        for n in names:
            self.adapter(n)
        if len(set(names)) != len(names):
            raise AdapterError(f"set_active got a name twice: {list(names)}")
        scaled = self._check_weights(names, weights)
        for n, adapter in self.adapters.items():
            if n not in names and adapter.merged:
                raise AdapterError(f"adapter {n!r} is merged into the base weights and cannot be "
                                   f"deactivated; call unmerge({n!r}) first")
        self.state.active = names
        self.state.weights = scaled
        self.state.changed()

    def _check_weights(self, names: tuple[str, ...], weights: Sequence[float] | None) -> dict[str, float]:
        """name -> weight for the adapters whose weight is not 1, or AdapterError."""
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
            a = self.adapters[n]
            if a.merged:
                raise AdapterError(f"adapter {n!r} is merged at weight 1; unmerge({n!r}) before "
                                   "giving it another weight")
            if a.hook is not None or a.copies:
                what = "a prompt/prefix hook" if a.hook is not None else f"whole-module copies {list(a.copies)}"
                raise CapabilityError(f"adapter {n!r} has {what}, which cannot be scaled by a weight; "
                                      f"make a scaled adapter with peftlab.scale(am, {n!r}, w, name=...) "
                                      "and activate that instead")
        return scaled

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Within the block the model computes exactly the base model's outputs."""
        merged = [n for n, a in self.adapters.items() if a.merged]
        if merged:
            raise AdapterError(f"adapters {merged} are merged into the base weights; unmerge them "
                               "before disabling adapters")
        before = self.state.enabled
        self.state.enabled = False
        self.state.changed()
        try:
            yield
        finally:
            self.state.enabled = before
            self.state.changed()

    def set_trainable(self, names: str | Sequence[str] | None) -> None:
        """Give exactly these adapters' parameters gradients (None: freeze all adapters).
        Does not change which adapters are active, nor the base model's parameters."""
        names = _name_list(names)
        for n in names:
            self.adapter(n)
        for adapter in self.adapters.values():
            self._set_requires_grad(adapter, adapter.name in names)

    def _set_requires_grad(self, adapter: Adapter, on: bool) -> None:
        for p in self.adapter_parameters(adapter.name):
            p.requires_grad_(on)
        adapter.trainable = on

    # ---- auxiliary losses ----------------------------------------------------------------------
    def add_loss_term(self, term: LossTerm) -> None:
        """Register an auxiliary loss term (replacing one of the same name); the activation
        points it reads are tapped from now on."""
        if term.adapter is not None:
            self.adapter(term.adapter)
        for point in term.activations:
            self.taps.require(point)
        if term.name in self.loss_terms:
            self.remove_loss_term(term.name)
        self.loss_terms[term.name] = term

    def remove_loss_term(self, name: str) -> None:
        if name not in self.loss_terms:
            raise ConfigError(f"no loss term {name!r}; registered: {list(self.loss_terms) or 'none'}")
        for point in self.loss_terms.pop(name).activations:
            self.taps.release(point)

    def active_loss_terms(self) -> list[LossTerm]:
        """The terms that count now: unowned ones, and those of active, trainable adapters."""
        on = set(self.state.active) if self.state.enabled else set()
        return [t for t in self.loss_terms.values()
                if t.adapter is None or (t.adapter in on and self.adapters[t.adapter].trainable)]

    def _terms_need(self) -> tuple[bool, bool]:
        """Whether the active terms read the forward's outputs, and activations."""
        terms = self.active_loss_terms()
        return any(t.needs_outputs for t in terms), any(t.activations for t in terms)

    def auxiliary_loss(self, step: int = 0, total_steps: int | None = None
                       ) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Σ weight · term over the active terms for the last training forward, and each
        weighted term's value (for logging). Releases the kept forward inputs and outputs."""
        inputs, outputs = self._last_forward or (None, None)
        self.__dict__["_last_forward"] = None
        total, parts = None, {}
        try:
            for term in self.active_loss_terms():
                factor = term.factor(step, total_steps)
                if factor == 0.0:
                    continue
                if term.needs_outputs and outputs is None:
                    raise AdapterError(f"loss term {term.name!r} reads the model's outputs, but no training "
                                       "forward ran through this AdaptedModel since the last auxiliary_loss()")
                if term.activations and not self.taps.get(term.activations[0]):
                    raise AdapterError(f"loss term {term.name!r} reads activations {term.activations}, but "
                                       "no training forward ran through this AdaptedModel since the last "
                                       "auxiliary_loss()")
                value = factor * term.compute(LossContext(self, inputs, outputs, step, total_steps))
                parts[term.name] = float(value.detach())
                total = value if total is None else total + value
        finally:
            self.taps.clear()
        return total, parts

    # ---- tensors and counts -------------------------------------------------------------------
    def adapter_tensors(self, name: str) -> dict[tuple[str, str], torch.Tensor]:
        """(site path, tensor name) -> tensor: every saved tensor of the adapter (deltas'
        parameters and buffers, then the modules_to_save copies' state)."""
        adapter = self.adapter(name)
        out: dict[tuple[str, str], torch.Tensor] = {}
        for path, part in adapter.parts().items():
            for tname, t in part.state_dict().items():
                out[(path, tname)] = t
        for path, wrapper in adapter.copies.items():
            for pname, t in wrapper.copies[name].state_dict().items():
                out[(path, pname)] = t
        return out

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        adapter = self.adapter(name)
        for part in adapter.parts().values():
            yield from part.parameters()
        for wrapper in adapter.copies.values():
            yield from wrapper.copies[name].parameters()

    def num_parameters(self, name: str) -> int:
        """Parameters the adapter adds (its deltas and modules_to_save copies)."""
        return sum(p.numel() for p in self.adapter_parameters(name))

    def trainable_parameters(self) -> int:
        """Parameters that currently receive gradients (adapters and any unfrozen base ones)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def base_parameters(self) -> int:
        """Parameters of the base model alone."""
        ids = {id(p) for n in self.adapters for p in self.adapter_parameters(n)}
        return sum(p.numel() for p in self.model.parameters() if id(p) not in ids)

    # ---- merging ------------------------------------------------------------------------------
    def merge(self, names: str | Sequence[str] | None = None) -> None:
        """Fold active mergeable adapters into the base weights (default: the active unmerged ones)."""
        self._check_usable()
        if names is None:
            names = tuple(n for n in self.state.active if not self.adapters[n].merged)
        names = _name_list(names)
        for n in names:
            adapter = self.adapter(n)
            if not adapter.method.supports("merge"):
                raise CapabilityError(f"{adapter.method.title} adapter {n!r} cannot be merged: "
                                      "the method does not declare the 'merge' capability")
            if adapter.merged:
                raise AdapterError(f"adapter {n!r} is already merged; unmerge({n!r}) first")
            if n not in self.state.active:
                raise AdapterError(f"adapter {n!r} is not active; only active adapters can be merged "
                                   f"(set_active([..., {n!r}]) first)")
            if n in self.state.weights:
                raise AdapterError(f"adapter {n!r} is active at weight {self.state.weights[n]:g}; merge "
                                   f"folds it in at weight 1. Merge a composed adapter instead "
                                   f"(peftlab.scale(am, {n!r}, {self.state.weights[n]:g}, name=...))")
        layers = {id(layer): layer for n in names for layer in self.adapters[n].layers.values()}
        self._check_untied(list(layers.values()))
        plans = [(layer, self._merge_order(layer, names)) for layer in layers.values()]
        for layer, order in plans:
            for n in order:
                layer.deltas[n].check_merge(layer)
        for layer, order in plans:
            for n in order:
                layer.deltas[n].merge_into(layer)
                layer.merged.append(n)
        for n in names:
            self.adapters[n].merged = True
        self.state.changed()

    def _merge_order(self, layer: AdaptedLayer, names: Sequence[str]) -> list[str]:
        """The order that folds `names` into this layer's weight exactly: output-side deltas in
        activation order, then input-side ones (the output-side ones read the rescaled input).
        Refuses when an active delta left unmerged here does not commute with one merged."""
        here = [n for n in self.state.active if n in names and n in layer.deltas]
        order = [n for n in here if layer.deltas[n].stage != "input"]
        order += [n for n in here if layer.deltas[n].stage == "input"]
        others = [n for n in self.state.active
                  if n in layer.deltas and n not in names and n not in layer.merged]
        for n in order:
            for m in others:
                if not commutes(layer.deltas[n], layer.deltas[m]):
                    raise AdapterError(
                        f"merging {n!r} alone would change the output at {self._path_of(layer)}: "
                        f"the active adapter {m!r} there does not commute with it; merge both "
                        f"together (merge([{n!r}, {m!r}])) or deactivate {m!r} first")
        return order

    def _path_of(self, layer: nn.Module) -> str:
        return next((p for p, m in iter_modules(self.model) if m is layer), "?")

    def _check_untied(self, layers: list[AdaptedLayer]) -> None:
        owners: dict[int, list[str]] = {}
        for pname, p in self.model.named_parameters(remove_duplicate=False):
            owners.setdefault(id(p), []).append(pname)
        for layer in layers:
            tied = owners.get(id(layer.base_layer.weight), [])
            if len(tied) > 1:
                raise CapabilityError(
                    f"the weight {tied[0]!r} is tied to {tied[1:]}; merging would change every "
                    "tied copy. Keep this adapter unmerged or untie the weights first")

    def unmerge(self, names: str | Sequence[str] | None = None) -> None:
        """Take merged adapters back out of the base weights (default: all merged ones)."""
        self._check_usable()
        wanted = _name_list(names) if names is not None else tuple(self.adapters)
        for n in wanted:
            if names is not None and not self.adapter(n).merged:
                raise AdapterError(f"adapter {n!r} is not merged")
        layers = {id(layer): layer for n in wanted for layer in self.adapters[n].layers.values()}
        for layer in layers.values():   # a delta merged after one unmerged must commute with it
            for i, n in enumerate(layer.merged):
                later = [m for m in layer.merged[i + 1:] if m not in wanted]
                bad = [m for m in later if n in wanted and not commutes(layer.deltas[n], layer.deltas[m])]
                if bad:
                    raise AdapterError(f"{bad[0]!r} was merged after {n!r} at {self._path_of(layer)} "
                                       f"and does not commute with it; unmerge both together")
        for layer in layers.values():
            for n in reversed(list(layer.merged)):  # last merged first
                if n in wanted:
                    layer.deltas[n].unmerge_from(layer)
                    layer.merged.remove(n)
        for n in wanted:
            self.adapters[n].merged = False
        self.state.changed()

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapters and return the plain base model with no peftlab modules;
        modules_to_save copies of the first active adapter replace the originals."""
        self._check_usable()
        self.merge()
        return self.unload(_merged_ok=True)

    def unload(self, *, _merged_ok: bool = False) -> nn.Module:
        """Remove every peftlab module and return the base model (merged weights stay merged)."""
        self._check_usable()
        if not _merged_ok and any(a.merged for a in self.adapters.values()):
            raise AdapterError("some adapters are merged; use merge_and_unload() or unmerge() first")
        for path, module in list(iter_modules(self.model)):
            if isinstance(module, AdaptedLayer):
                for delta in module.deltas.values():
                    delta.release()
                self._replace(path, module.base_layer)
            elif isinstance(module, ModuleCopies):
                self._replace(path, module.chosen())
        self.adapters.clear()
        self.hooks.clear()
        if self._head_hook is not None:
            self._head_hook.remove()
        self._unloaded = True
        return self.model

    # ---- checkpoints --------------------------------------------------------------------------
    def save_adapter(self, directory: str | Path, name: str) -> Path:
        """Write `adapter_config.json` and `adapter_model.safetensors` atomically."""
        from .io import save_adapter
        return save_adapter(self, directory, name)

    def load_adapter(self, directory: str | Path, name: str, *, trainable: bool = False) -> Adapter:
        """Load a saved adapter under `name` (inactive). Checks the fit before changing anything."""
        from .io import load_adapter
        return load_adapter(self, directory, name, trainable=trainable)

    # ---- reporting ----------------------------------------------------------------------------
    def status(self) -> list[LayerStatus]:
        """One row per wrapped layer: which adapters it holds and which are merged."""
        roles = site_roles(self.model)
        rows = []
        for path, module in iter_modules(self.model):
            if isinstance(module, AdaptedLayer):
                rows.append(LayerStatus(path, roles.get(path), module.kind,
                                        tuple(module.deltas), tuple(module.merged)))
            elif isinstance(module, ModuleCopies):
                rows.append(LayerStatus(path, roles.get(path), "copy", tuple(module.copies), ()))
        return rows

    def status_table(self) -> str:
        """`status()` as an aligned text table, headed by the adapters' summary."""
        lines = [f"adapters enabled: {self.state.enabled}; active: {list(self.state.active) or 'none'}"]
        for a in self.adapters.values():
            lines.append(f"  {a.name}: {a.method.name} ({a.method.describe(a.config)}), "
                         f"{len(a.sites)} sites, {self.num_parameters(a.name):,} params, "
                         f"{'trainable' if a.trainable else 'frozen'}")
        rows = [("path", "role", "kind", "adapters", "merged")]
        rows += [(r.path, r.role or "-", r.kind, ",".join(r.adapters), ",".join(r.merged) or "-")
                 for r in self.status()]
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        return "\n".join(lines)

    def card(self, name: str) -> str:
        """The adapter's PEFT-Ref typology card with its actual sites and parameter count."""
        a = self.adapter(name)
        facts = [
            ("adapter", name),
            ("method", f"{a.method.name} ({a.method.describe(a.config)})"),
            ("sites", summarise_sites((s.role, s.layer) for s in a.sites)),
            ("modules to save", ", ".join(a.copies) or "none"),
            ("parameters", (f"{self.num_parameters(name):,} "
                            f"({100 * self.num_parameters(name) / max(self.base_parameters(), 1):.3f}% of base)")),
            *([("provenance", describe_provenance(a.provenance))] if a.provenance else []),
            ("state", (f"{'active' if name in self.state.active else 'inactive'}, "
                       f"{'trainable' if a.trainable else 'frozen'}, "
                       f"{'merged' if a.merged else 'unmerged'}")),
        ]
        return render_card(f"{a.method.title} adapter {name!r}", a.method.typology, facts)

    # ---- checks -------------------------------------------------------------------------------
    def adapter(self, name: str) -> Adapter:
        """The adapter called `name`; AdapterError names the close ones when there is none."""
        try:
            return self.adapters[name]
        except KeyError:
            hint = close_matches(name, self.adapters)
            raise AdapterError(f"no adapter {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                               + f" Adapters: {list(self.adapters) or 'none'}") from None

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not name or any(c in name for c in ".:/\\ "):
            raise AdapterError(f"adapter name {name!r} must be a non-empty string without '.', ':', "
                               "'/', '\\' or spaces")
        # adapters are keys of ModuleDicts inside the layers; an instance is asked so that
        # attributes set in __init__ (`training`, `_modules`) count too
        if hasattr(nn.ModuleDict(), name):
            raise AdapterError(f"adapter name {name!r} is an attribute of torch modules; pick another "
                               f"name (e.g. {name + '_adapter'!r})")
        if name in self.adapters:
            raise AdapterError(f"an adapter named {name!r} already exists; pick another name or "
                               f"delete_adapter({name!r}) first")

    def _check_usable(self) -> None:
        if self._unloaded:
            raise AdapterError("this AdaptedModel was unloaded; wrap the returned model again with "
                               "peftlab.adapt(model)")


def _contiguous_head_input(model: nn.Module):
    """Make the output head's (B, T, d) input contiguous when it is not; the hook's handle, or None
    for a model without a Linear head.

    torch's matmul runs a Linear on a (B, T, d) input as one (B·T, d) GEMM only when the input
    folds without a copy or the weight requires grad; a frozen weight with a strided input is
    instead expanded to (B, d, vocab) and copied. transformers hands the head the last position
    of the prompt (`hidden[:, -1:]`, strided), so freezing the base made SmolLM2's prefill copy a
    (16, 576, 49152) weight: 3.2× the whole generate time of the unfrozen model (bf16, CPU). The
    contiguous copy of one position per row costs nothing next to that."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        return None

    def contiguous_input(module: nn.Module, args: tuple) -> tuple | None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() > 2 and not x.is_contiguous():
            return (x.contiguous(), *args[1:])
        return None

    return head.register_forward_pre_hook(contiguous_input)


def adapt(model: nn.Module, *, freeze_base: bool = True) -> AdaptedModel:
    """Make `model` adaptable, in place: its layers get wrapped as adapters are added.
    `freeze_base` turns off gradients of every base parameter (the point of PEFT)."""
    if isinstance(model, AdaptedModel):
        raise AdapterError("this model is already an AdaptedModel")
    if any(isinstance(m, (AdaptedLayer, ModuleCopies)) for m in model.modules()):
        raise AdapterError("this model already holds peftlab layers: wrap it once and keep the "
                           "AdaptedModel")
    return AdaptedModel(model, freeze_base=freeze_base)
