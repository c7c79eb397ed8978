"""Building an adapter's deltas and putting them in the model (and taking them out again).

`Adapter` is the record of one installed adapter. `install` is what `AdaptedModel.install` runs:
it resolves the sites, builds every delta (fresh, or filled from a checkpoint's tensors after
checking each one's shape), and only then changes the model, so a refused install leaves it as
it was. The first delta at a site wraps its base layer in an `AdaptedLayer`; `modules_to_save`
copies live in a `ModuleCopies` wrapper; model-level methods (prompt, prefix) wrap no layer and
get one `InputHook` instead.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import inspect
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import (
    AdapterError,
    CapabilityError,
    CheckpointError,
    ConfigError,
    close_matches,
)
from .geometry import unwrap
from .layer import AdaptedLayer, Delta, InputHook, ModuleCopies, layer_kind
from .method import METHODS, Capability, Method, MethodConfig, method_of
from .quantised import check_supported, quantisation
from .role_maps import FUSED_PARTS, family_defaults
from .sites import RowSlice, Site, iter_modules, resolve_sites, sites_at

if TYPE_CHECKING:
    from .model import AdaptedModel

_KIND_NAMES = {"linear": "Linear", "conv1d": "Conv1D", "embedding": "Embedding", "norm": "a norm",
               "conv": "nn.Conv1d/2d/3d"}

TensorMap = Mapping[tuple[str, str], torch.Tensor]    # (site or module path, tensor name) -> tensor


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

    def tensors(self) -> dict[tuple[str, str], torch.Tensor]:
        """(site path, tensor name) -> tensor: every saved tensor (the deltas' parameters and
        buffers, then the modules_to_save copies' state)."""
        out = {(path, tname): t for path, part in self.parts().items()
               for tname, t in part.state_dict().items()}
        out.update({(path, pname): t for path, wrapper in self.copies.items()
                    for pname, t in wrapper.copies[self.name].state_dict().items()})
        return out

    def parameters(self) -> Iterator[nn.Parameter]:
        """The parameters it adds: its deltas' (or hook parts') and its modules_to_save copies'."""
        for part in self.parts().values():
            yield from part.parameters()
        for wrapper in self.copies.values():
            yield from wrapper.copies[self.name].parameters()

    def set_trainable(self, on: bool) -> None:
        """Give its parameters gradients (or take them away) and record that."""
        for p in self.parameters():
            p.requires_grad_(on)
        self.trainable = on


def lookup(adapters: Mapping[str, Adapter], name: str) -> Adapter:
    """The adapter called `name`; AdapterError names the close ones when there is none."""
    try:
        return adapters[name]
    except KeyError:
        hint = close_matches(name, adapters)
        raise AdapterError(f"no adapter {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                           + f" Adapters: {list(adapters) or 'none'}") from None


def name_list(names: str | Iterable[str] | None) -> tuple[str, ...]:
    """One adapter name or several as a tuple (None: none); AdapterError for anything that is
    not a name, before it could reach a lookup as a TypeError."""
    if names is None:
        return ()
    items = (names,) if isinstance(names, str) else names
    if isinstance(items, (bytes, bytearray)) or not isinstance(items, Iterable):
        raise AdapterError(f"adapter names must be strings: one name or a list of names, got {names!r}")
    items = tuple(items)
    if not all(isinstance(n, str) for n in items):
        raise AdapterError(f"adapter names must be strings: one name or a list of names, got {names!r}")
    return items


# model -> weakref to the AdaptedModel wrapping it: one live wrapper per model (`claim`). Weak
# both ways, so neither the model nor the wrapper is kept alive by it, and nothing is written
# onto the user's model (which must stay picklable).
_WRAPPERS: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


def claim(model: nn.Module, am: AdaptedModel) -> None:
    """Record that `am` wraps `model`, or raise AdapterError (nothing changed) while another
    AdaptedModel that was not unloaded wraps it: adapters added through one wrapper would be
    invisible to the other, whose forward then silently ignores them."""
    ref = _WRAPPERS.get(model)
    holder = ref() if ref is not None else None
    if holder is not None and not holder._unloaded and holder.model is model:
        raise AdapterError("this model is already wrapped by an AdaptedModel (adapt() was called on it "
                           "before): keep and reuse that AdaptedModel (a second one would not see its "
                           "adapters), or call its unload() first")
    _WRAPPERS[model] = weakref.ref(am)


def check_new_name(adapters: Mapping[str, Adapter], name: str) -> None:
    """AdapterError unless `name` can name a new adapter."""
    if not isinstance(name, str) or not name or any(c in name for c in ".:/\\ "):
        raise AdapterError(f"adapter name {name!r} must be a non-empty string without '.', ':', "
                           "'/', '\\' or spaces")
    # adapters are keys of ModuleDicts inside the layers; an instance is asked so that
    # attributes set in __init__ (`training`, `_modules`) count too
    if hasattr(nn.ModuleDict(), name):
        raise AdapterError(f"adapter name {name!r} is an attribute of torch modules; pick another "
                           f"name (e.g. {name + '_adapter'!r})")
    if name in adapters:
        raise AdapterError(f"an adapter named {name!r} already exists; pick another name or "
                           f"delete_adapter({name!r}) first")


def _collector_paused(fn):
    """`fn` with Python's cyclic garbage collector paused while it runs (resumed after, if it was
    on). Adding an adapter creates thousands of small objects (a module, its dicts, two
    Parameters per site) that form no garbage cycles; with a model's hundreds of thousands of
    objects tracked, the collections those allocations trigger cost more than the
    construction itself (a full collection tens of ms on a 135M model)."""
    @functools.wraps(fn)
    def paused(*args, **kwargs):
        if not gc.isenabled():
            return fn(*args, **kwargs)
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.enable()
    return paused


@_collector_paused
def install(am: AdaptedModel, name: str, config: MethodConfig, *, sites: Sequence[str] | None,
            tensors: TensorMap | None, copies: Mapping[str, Mapping[str, torch.Tensor]] | None,
            trainable: bool, provenance: dict | None,
            slices: Mapping[str, Sequence[RowSlice]] | None = None) -> Adapter:
    """`AdaptedModel.install` (see there) once the model is known to be usable."""
    check_new_name(am.adapters, name)
    # The adapter owns its config: a caller reusing (and changing) the object for the next
    # adapter must not rewrite this one's, which its tensors and checkpoint follow.
    config = copy.deepcopy(config)
    if sites is None:
        use_family_defaults(am.model, config, am.site_roles())
    config.validate()
    method = method_of(config)
    roles = am.site_roles()
    if sites is None and slices is not None:
        raise ConfigError("install got row slices without sites; give the sites they belong to")
    if sites is None and method.resolve is not None:
        found = method.resolve(am.model, config, roles)
    elif sites is None:
        found = resolve_sites(am.model, config.targets, layers=config.layers,
                              exclude=config.exclude, roles=roles)
    else:
        found = sites_at(am.model, sites, roles, slices)
    if method.layer_kinds:   # a layer whose forward never runs would hold a dead adapter (probe.py)
        found = am.forward_check.keep_live(am, found, None if sites is not None else config.targets,
                                           roles, method.title)
    if copies is None:
        copy_sites = (resolve_sites(am.model, config.modules_to_save, roles=roles)
                      if config.modules_to_save else [])
    else:
        copy_sites = sites_at(am.model, list(copies), roles)
    if copies is not None and tensors is None:
        raise ConfigError("install got modules_to_save copies without the adapter's tensors; "
                          "give both (a checkpoint) or neither (a fresh adapter)")
    copy_tensors = None if copies is None else {
        (path, pname): t for path, state in copies.items() for pname, t in state.items()}
    adapter = _attach(am, name, config, method, found, copy_sites, tensors, copy_tensors, trainable)
    adapter.provenance = provenance
    return adapter


def use_family_defaults(model: nn.Module, config: MethodConfig, roles: Mapping[str, str]) -> None:
    """Put the family's own defaults into `config` while every field they replace still holds the
    method's default, so the adapter records what it was given: role_maps.FAMILY_DEFAULTS (a
    Mamba's LoRA adapts its SSM projections, having no attention), and, for a method that acts on
    whole layers only (no FUSED_SLICE), the whole fused projection where its default sub-roles are
    slices of one (KaSA's attn.q, attn.v on GPT-2: attn.qkv, as peft's default targets c_attn).
    A sub-role the user names is never widened: that is refused (core/sites.py)."""
    defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(config)}
    overrides = family_defaults(model, config.method)
    if overrides and all(getattr(config, key) == defaults[key] for key in overrides):
        for key, value in overrides.items():
            setattr(config, key, list(value))
    if Capability.FUSED_SLICE in method_of(config).capabilities or "targets" not in defaults:
        return
    # a config may fill its default targets on construction (Context-PEFT: per form)
    if config.targets != dataclasses.replace(config, targets=defaults["targets"]).targets:
        return
    targets = [config.targets] if isinstance(config.targets, str) else list(config.targets)
    present = set(roles.values())
    whole = list(dict.fromkeys(FUSED_PARTS[t] if t in FUSED_PARTS and t not in present and FUSED_PARTS[t] in present
                               else t for t in targets))
    if whole != targets:
        config.targets = whole


def _attach(am: AdaptedModel, name: str, config: MethodConfig, method: Method, sites: list[Site],
            copy_sites: list[Site], tensors: TensorMap | None, copy_tensors: TensorMap | None,
            trainable: bool) -> Adapter:
    """Build every delta (freshly initialised, or filled from `tensors` keyed by
    (site path, tensor name)), then install them. Nothing changes until all are built.
    Model-level methods (prompt, prefix) get per-site parts gathered by one InputHook and
    wrap no layer."""
    current = dict(iter_modules(am.model))
    model_level = not method.layer_kinds     # prompt, prefix: no layer is wrapped
    for site in sites:
        if isinstance(current[site.path], ModuleCopies):
            raise ConfigError(f"{site.path!r} is trained whole (modules_to_save) by another "
                              f"adapter; {method.title} cannot also attach there")
        kind = layer_kind(site.module, site.params)
        if site.slices:
            check_fused_slice(method, site)
        if quantisation(site.module):
            check_quantised(method, site)
        if site.params:
            check_parameter_site(method, site)
        elif not model_level and kind not in method.layer_kinds:
            kinds = ", ".join(_KIND_NAMES[k] for k in method.layer_kinds)
            raise ConfigError(
                f"{method.title} cannot attach to {site.type_name} at {site.path!r} "
                f"(role {site.role}); it attaches to {kinds}. Narrow the targets or exclude it")
    for site in copy_sites:
        if quantisation(site.module):
            raise CapabilityError(f"modules_to_save names {site.path!r}, a bitsandbytes-quantised "
                                  f"{site.type_name} ({quantisation(site.module)}): its packed weight "
                                  "cannot be trained as a copy; adapt it with a method instead")
    layers = {} if model_level else {
        s.path: current[s.path] if isinstance(current[s.path], AdaptedLayer)
        else AdaptedLayer(s.module, am.state, s.params) for s in sites}
    if tensors is not None:
        check_tensors(am.model, name, config, method, sites, layers, copy_sites, tensors,
                      copy_tensors or {})
    parts: dict[str, nn.Module] = {}
    try:
        # A build that declares a `model` keyword (e.g. the parallel adapter, which hooks a sibling
        # module) gets the AdaptedModel.
        build_kwargs = {"model": am} if "model" in inspect.signature(method.build).parameters else {}
        for site in sites:
            part = method.build(site, layers.get(site.path), config, initialise=tensors is None,
                                **build_kwargs)
            # modules are built in training mode: a delta added to a model in eval mode must not
            # run its dropout at inference, so it takes the mode of the layer it joins
            part.train(site.module.training)
            parts[site.path] = part
            if tensors is not None:
                with torch.no_grad():
                    for tname, t in part.state_dict().items():
                        t.copy_(tensors[(site.path, tname)])
                if isinstance(part, Delta):
                    part.loaded(layers[site.path], site.path)
        hook = method.build_hook(am.model, config, parts) if method.build_hook else None
        if hook is not None:
            hook.train(am.model.training)
        terms = method.loss_terms(am, name, config, parts) if method.loss_terms else []
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
        am.hooks[name] = hook
    for term in terms:
        am.loss_terms[term.name] = term
    if not model_level:
        for path, delta in parts.items():
            if current[path] is not layers[path]:
                replace_module(am.model, path, layers[path], current)
            layers[path].deltas[name] = delta
    wrappers: dict[str, ModuleCopies] = {}
    for path, clone in copies.items():
        wrapper = current[path]
        if not isinstance(wrapper, ModuleCopies):
            wrapper = ModuleCopies(wrapper, am.state)
            replace_module(am.model, path, wrapper, current)
        wrapper.copies[name] = clone
        wrappers[path] = wrapper
    adapter = Adapter(name, config, method, sites, layers, wrappers, hook=hook)
    am.adapters[name] = adapter
    if trainable:   # deltas and copies are created frozen
        adapter.set_trainable(True)
    am.state.changed()
    return adapter


def require_capability(method: Method, capability: Capability, where: str, because: str, fix: str) -> None:
    """CapabilityError, before anything changes, unless `method` declares `capability`: the
    message says what `where` is, why the method cannot act there (`because`), the `fix`, and
    which methods declare the capability."""
    if capability not in method.capabilities:
        able = [m.title for m in METHODS.values() if capability in m.capabilities]
        raise CapabilityError(f"{where}, and {method.title} does not declare the {capability.value!r} "
                              f"capability ({because}). {fix}, or use a method that declares it: "
                              f"{', '.join(able) or 'none'}")


def check_parameter_site(method: Method, site: Site) -> None:
    """Refuse a method without PARAMETER_SITE at `site`: parameters a module's forward reads
    directly (it attaches to layers)."""
    params = ", ".join(f"{site.path}.{n}" for n in site.params)
    require_capability(method, Capability.PARAMETER_SITE,
                       f"{params} (role {site.role}) {'is an nn.Parameter' if len(site.params) == 1 else 'are nn.Parameters'} "
                       f"of {site.type_name}, read directly by its forward", "it attaches to layers", "Exclude them")


def check_fused_slice(method: Method, site: Site) -> None:
    """Refuse a method without FUSED_SLICE on the slice of a fused projection `site` names (it
    acts on whole layers)."""
    require_capability(method, Capability.FUSED_SLICE,
                       f"{site.label} of this model {'is' if len(site.slices) == 1 else 'are'} part of the fused "
                       f"projection {site.path!r} ({site.type_name})", "it acts on whole layers",
                       f"Target the whole projection ({site.role!r} or {site.path.rsplit('.', 1)[-1]!r})")


def check_quantised(method: Method, site: Site) -> None:
    """Refuse a method without QUANTISED_BASE on the quantised layer at `site` (it rewrites the
    base weight, which is stored packed), and a layer that holds no quantised weight yet."""
    require_capability(method, Capability.QUANTISED_BASE,
                       f"{site.path!r} is a bitsandbytes-quantised {site.type_name} ({quantisation(site.module)})",
                       "it rewrites the base weight, which is stored packed",
                       "Exclude the quantised layers, load the model unquantised")
    check_supported(site.module, site.path)


def check_tensors(model: nn.Module, name: str, config: MethodConfig, method: Method, sites: list[Site],
                  layers: Mapping[str, AdaptedLayer], copy_sites: list[Site], tensors: TensorMap,
                  copy_tensors: TensorMap) -> None:
    """Every tensor adapter `name` needs on `model` present with the right shape, and nothing
    else; CheckpointError names the first tensor that is missing, misshapen or extra."""
    expected: set[tuple[str, str]] = set()
    for site in sites:
        for tname, shape in method.tensor_shapes(layers.get(site.path), site, config).items():
            key = (site.path, tname)
            expected.add(key)
            _check_shape(model, name, key, tensors, shape)
    for site in copy_sites:
        for pname, t in site.module.state_dict().items():
            key = (site.path, pname)
            expected.add(key)
            _check_shape(model, name, key, copy_tensors, tuple(t.shape))
    extra = sorted(set(tensors) - expected) + sorted(set(copy_tensors) - expected)
    if extra:
        path, tname = extra[0]
        raise CheckpointError(f"adapter {name!r} holds tensor {tname!r} for {path!r}, which this "
                              f"{method.title} config does not produce ({len(extra)} such tensors); "
                              "the checkpoint and its config disagree")


def _check_shape(model: nn.Module, name: str, key: tuple[str, str], tensors: TensorMap,
                 shape: Sequence[int]) -> None:
    path, tname = key
    if key not in tensors:
        raise CheckpointError(f"adapter {name!r} has no tensor {tname!r} for site {path!r}; "
                              "the checkpoint is incomplete or was made for other targets")
    got = tuple(tensors[key].shape)
    if got != tuple(shape):
        raise CheckpointError(
            f"tensor {tname!r} of site {path!r} is {list(got)} in the checkpoint but this model "
            f"needs {list(shape)}: the adapter was made for a different base model "
            f"(this one is {type(model).__name__})")


def replace_module(model: nn.Module, path: str, module: nn.Module,
                   modules: Mapping[str, nn.Module] | None = None) -> None:
    """Put `module` at `path` of `model`, in place of the module there; `modules` (path -> module)
    saves walking the tree."""
    parent, _, leaf = path.rpartition(".")
    if not parent:
        owner = model
    elif modules is not None and parent in modules:
        owner = modules[parent]
    else:
        owner = model.get_submodule(parent)
    # `leaf` is an existing child: replace it in place, skipping Module.__setattr__'s checks; a
    # module wrapped for its parameters (core/sites.py iter_modules) holds its children in its base
    unwrap(owner)._modules[leaf] = module


def remove_delta(model: nn.Module, layer: AdaptedLayer, path: str, name: str) -> None:
    """Take adapter `name`'s delta out of `layer` (at `path` of `model`); a layer left with no
    deltas becomes its plain base layer again."""
    layer.remove_delta(name)
    if not layer.deltas:
        replace_module(model, path, layer.base_layer)
