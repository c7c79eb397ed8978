"""AdaptedModel: named adapters on one base model, and the one object users call.

Its methods are the public API. The machinery of each concern lives in its own module:
attach.py (`install`), routing.py (the state layers read, `routed`), merging.py (`merge`,
`unmerge`), terms.py (`auxiliary_loss`), report.py (`status`, `card`), io.py (checkpoints).
Here stay the forward / generate pass-through (prompt and prefix hooks, activation taps, the
training forward kept for loss terms), activation and training marks, loss-term registration,
parameter counts and unloading; the transformers-facing methods (save_pretrained, counts,
checkpointing) come from `HFCompat` (hf.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from . import attach, io, merging, pretrained, report
from .attach import Adapter, claim, lookup, name_list, remove_delta, replace_module
from .errors import AdapterError, CapabilityError, ConfigError
from .hf import HFCompat, contiguous_head_input, signed_forward
from .layer import AdaptedLayer, InputHook, ModuleCopies, forwarding_getattr
from .method import MethodConfig
from .precision import dtype_named
from .probe import ForwardCheck
from .quantised import keep_layout, parameter_count
from .report import LayerStatus
from .routing import (
    Router,
    RoutingState,
    check_batch,
    check_routed_training,
    check_weights,
)
from .sites import RowSlice, iter_modules, site_roles
from .taps import ActivationTaps
from .terms import LossContext, LossTerm, weighted_sum

__all__ = ["AdaptedModel", "Adapter", "LayerStatus", "adapt"]


class AdaptedModel(HFCompat, nn.Module):
    """A pretrained model with named PEFT adapters attached in place.

    Forward and `generate` pass straight to the wrapped model; `am` is a `model=` for
    transformers' `Trainer` and trl's trainers (core/hf.py: the forward's signature, counts,
    save_pretrained, gradient checkpointing). Adapters are added inactive and
    frozen: `set_active` chooses which ones contribute (their outputs sum) and `set_trainable`
    chooses which ones get gradients; neither call changes the other. `adapter_ids=` (or the
    `routed` block) gives every example of a batch its own adapter instead.
    """

    def __init__(self, model: nn.Module, *, freeze_base: bool = True, base_name: str | None = None) -> None:
        super().__init__()
        claim(model, self)      # one live wrapper per model; raises before anything changes
        self.model = model
        self.base_name = base_name   # asset name or directory of the base, for the saved record
        self.state = RoutingState()
        self.adapters: dict[str, Adapter] = {}
        self.hooks = nn.ModuleDict()       # adapter name -> InputHook of model-level adapters
        self._hooks_seen: tuple[int, tuple[InputHook, ...]] = (-1, ())
        self.loss_terms: dict[str, LossTerm] = {}
        self._last_forward: tuple[dict, object] | None = None   # for loss terms that read outputs
        self._router = Router(self.state)   # routed(): checks ids, stamps the routed tensors
        self.taps = ActivationTaps(model)   # intermediate tensors for loss terms and metrics
        self._roles: dict[str, str] | None = None
        self.forward_check = ForwardCheck()   # which layers' forwards run (core/probe.py), once
        self._unloaded = False
        self._head_hook = None
        AdaptedModel.__dict__["forward"].sign(self, model.forward)   # the wrapped model's parameters
        if freeze_base:
            for p in model.parameters():
                p.requires_grad_(False)
            self._head_hook = contiguous_head_input(model)
        self._layout_release = keep_layout(model)   # bitsandbytes 4-bit weights: no CPU repacking

    # ---- pass-through -------------------------------------------------------------------------
    @signed_forward
    def forward(self, *args, adapter_ids: Sequence[str | None] | None = None, **kwargs):
        """The wrapped model's forward with the active adapters; with `adapter_ids` (one adapter
        name per example, None for the base model) example i uses exactly adapter_ids[i]
        whatever is active (see `routed`)."""
        if adapter_ids is not None:
            check_batch(adapter_ids, args, kwargs)
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
        try:
            for hook in hooks:
                kwargs = hook.prepare(self.model, kwargs)
            if tap:
                self.taps.begin(kwargs.get("attention_mask"))
            try:
                out = self.model(**kwargs)
            finally:
                if tap:
                    self.taps.end()
        finally:   # what a hook set on the model for this forward, undone even when it failed
            for hook in hooks:
                hook.release(self.model)
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
            check_batch(adapter_ids, args, kwargs)
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
        if torch.compiler.is_compiling():   # from the state's contents, not its version (a guard)
            state = self.state
            names = state.active if state.enabled and state.routed is None else ()
            return tuple(self.hooks[n] for n in names if n in self.hooks)
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
        self._check_usable()
        with self._router.routed(self.adapters, adapter_ids, next(self.model.parameters()).device):
            yield

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
                trainable: bool = False, provenance: dict | None = None,
                slices: Mapping[str, Sequence[RowSlice]] | None = None) -> Adapter:
        """Attach adapter `name` of `config`'s method (inactive) and return it; every check runs
        before the model changes, so a refused install leaves it as it was.

        `sites`: the module paths it attaches to (None: resolved from config.targets, layers and
        exclude). `tensors`: (site path, tensor name) -> the values of its deltas (None: freshly
        initialised); every tensor the method expects must be there with its shape, and nothing
        else. `copies`: the state of its modules_to_save copies, module path -> state dict (None:
        copies of config.modules_to_save as they are now); needs `tensors`. `trainable` gives its
        parameters gradients; `provenance` records how a composed adapter was made. `slices`
        (site path -> RowSlices, with `sites`): the sites that act on slices of a fused
        projection's output rows, as `Adapter.sites` holds them."""
        self._check_usable()
        return attach.install(self, name, config, sites=sites, tensors=tensors, copies=copies,
                              trainable=trainable, provenance=provenance, slices=slices)

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
        self._router.forget()    # routed batches keep stacks of their adapters' tensors
        for path, layer in adapter.layers.items():
            remove_delta(self.model, layer, path, name)
        if adapter.hook is not None:
            del self.hooks[name]
        for term_name in [n for n, t in self.loss_terms.items() if t.adapter == name]:
            self.remove_loss_term(term_name)
        for path, wrapper in adapter.copies.items():
            del wrapper.copies[name]
            if not wrapper.copies:
                replace_module(self.model, path, wrapper.original_module)
        del self.adapters[name]
        self.state.active = tuple(n for n in self.state.active if n != name)
        self.state.weights.pop(name, None)
        self.state.changed()

    def train(self, mode: bool = True) -> AdaptedModel:
        """nn.Module.train; the first forward in a mode not yet seen checks which layers run
        (core/probe.py)."""
        super().train(mode)
        self.forward_check.sync(self)
        return self

    # ---- activation and training marks ----------------------------------------------------------
    @property
    def active(self) -> list[str]:
        """Names of the active adapters, in the order given to set_active."""
        return list(self.state.active)

    def set_active(self, names: str | Sequence[str], weights: Sequence[float] | None = None) -> None:
        """Make exactly these adapters contribute, in this order (additive deltas sum). `weights`
        scales each one's effect about its identity: w·ΔW for additive deltas, 1 + w·(l − 1) for
        rescaling vectors (None: all 1). Does not touch requires_grad."""
        names = name_list(names)
        for n in names:
            self.adapter(n)
        if len(set(names)) != len(names):
            raise AdapterError(f"set_active got a name twice: {list(names)}")
        scaled = check_weights(self.adapters, names, weights)
        for n, adapter in self.adapters.items():
            if n not in names and adapter.merged:
                raise AdapterError(f"adapter {n!r} is merged into the base weights and cannot be "
                                   f"deactivated; call unmerge({n!r}) first")
        self.state.active = names
        self.state.weights = scaled
        self.state.changed()

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
        names = name_list(names)
        for n in names:
            self.adapter(n)
        for adapter in self.adapters.values():
            adapter.set_trainable(adapter.name in names)

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
        """Unregister loss term `name`; the activation points it read are released."""
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
        try:
            return weighted_sum(self.active_loss_terms(),
                                LossContext(self, inputs, outputs, step, total_steps))
        finally:
            self.taps.clear()

    @contextmanager
    def keeping_last_forward(self) -> Iterator[None]:
        """Within the block, forwards leave the training forward that loss terms read as it was
        (for a term's own side forwards, such as BA-LoRA's reference logits)."""
        kept = self._last_forward
        try:
            yield
        finally:
            self.__dict__["_last_forward"] = kept

    # ---- tensors and counts -------------------------------------------------------------------
    def adapter_tensors(self, name: str) -> dict[tuple[str, str], torch.Tensor]:
        """(site path, tensor name) -> tensor: every saved tensor of the adapter (deltas'
        parameters and buffers, then the modules_to_save copies' state)."""
        return self.adapter(name).tensors()

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """The parameters adapter `name` adds (its deltas' and modules_to_save copies')."""
        yield from self.adapter(name).parameters()

    def trainable_parameters(self) -> int:
        """Parameters that currently receive gradients (adapters and any unfrozen base ones)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def base_parameters(self) -> int:
        """Parameters of the base model alone."""
        ids = {id(p) for n in self.adapters for p in self.adapter_parameters(n)}
        return sum(parameter_count(p) for p in self.model.parameters() if id(p) not in ids)

    # ---- merging ------------------------------------------------------------------------------
    def merge(self, names: str | Sequence[str] | None = None) -> None:
        """Fold active mergeable adapters into the base weights (default: the active unmerged ones).
        Memory: the first merge into a layer keeps a copy of its base parameters (weight and bias,
        on their device and in their dtype) until the last adapter merged there is unmerged, so
        `unmerge` restores them bit for bit, even in bf16 / fp16 and after the adapter changed
        while merged; merge_and_unload keeps no copy."""
        self._check_usable()
        merging.merge(self.model, self.state, self.adapters, None if names is None else name_list(names))

    def unmerge(self, names: str | Sequence[str] | None = None) -> None:
        """Take merged adapters back out of the base weights (default: all merged ones)."""
        self._check_usable()
        wanted = name_list(names) if names is not None else tuple(self.adapters)
        merging.unmerge(self.model, self.state, self.adapters, wanted, named=names is not None)

    def merge_and_unload(self, dtype: torch.dtype | str | None = None) -> nn.Module:
        """Merge the active adapters and return the plain base model with no peftlab modules;
        modules_to_save copies of the first active adapter replace the originals. `dtype`: its
        parameters cast to it, every bitsandbytes-quantised layer made an nn.Linear holding its
        dequantised weight with the adapters folded in fp32 (not requantised, as merge does)."""
        self._check_usable()
        if dtype is None:
            merging.merge(self.model, self.state, self.adapters, None, keep_copy=False)   # never unmerged
        else:
            merging.merge_dense(self.model, self.state, self.adapters,
                                dtype_named(dtype, "merge_and_unload dtype"))
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
                replace_module(self.model, path, module.base_layer)
            elif isinstance(module, ModuleCopies):
                replace_module(self.model, path, module.chosen())
        self.adapters.clear()
        self.hooks.clear()
        if self._head_hook is not None:
            self._head_hook.remove()
        self._layout_release()
        self._unloaded = True
        return self.model

    # ---- checkpoints --------------------------------------------------------------------------
    def save_adapter(self, directory: str | Path, name: str) -> Path:
        """Write peftlab.json and the tensors, a peft adapter too where peft has the method (io.py)."""
        return io.save_adapter(self, directory, name)

    def load_adapter(self, directory: str | Path, name: str, *, trainable: bool = False,
                     strict: bool = False) -> Adapter:
        """Load a saved adapter under `name` (inactive). Checks the fit before changing anything;
        one saved from another base model or holding NaN/inf warns (strict=True: refused)."""
        return io.load_adapter(self, directory, name, trainable=trainable, strict=strict)

    from_pretrained = staticmethod(pretrained.from_pretrained)   # base rebuilt from the record

    # ---- reporting ----------------------------------------------------------------------------
    def status(self) -> list[LayerStatus]:
        """One row per wrapped layer: which adapters it holds and which are merged."""
        return report.status_rows(self.model)

    def status_table(self) -> str:
        """`status()` as an aligned text table, headed by the adapters' summary."""
        return report.status_table(self)

    def card(self, name: str) -> str:
        """The adapter's PEFT-Ref typology card with its actual sites and parameter count."""
        return report.card(self, name)

    # ---- checks -------------------------------------------------------------------------------
    def adapter(self, name: str) -> Adapter:
        """The adapter called `name`; AdapterError names the close ones when there is none."""
        return lookup(self.adapters, name)

    def _check_usable(self) -> None:
        if self._unloaded:
            raise AdapterError("this AdaptedModel was unloaded; wrap the returned model again with "
                               "peftlab.adapt(model)")


def adapt(model: nn.Module, *, freeze_base: bool = True, base_name: str | None = None) -> AdaptedModel:
    """Make `model` adaptable, in place: its layers get wrapped as adapters are added.
    `freeze_base` turns off gradients of every base parameter (the point of PEFT); `base_name`:
    what saved adapters record as their base (asset name or directory; default the config's)."""
    if isinstance(model, AdaptedModel):
        raise AdapterError("this model is already an AdaptedModel")
    if any(isinstance(m, (AdaptedLayer, ModuleCopies)) for m in model.modules()):
        raise AdapterError("this model already holds peftlab layers: wrap it once and keep the "
                           "AdaptedModel")
    return AdaptedModel(model, freeze_base=freeze_base, base_name=base_name)
