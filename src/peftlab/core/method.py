"""The contract between a method file and the shared machinery: the config every method extends,
the `Method` record a method file declares, its `Capability` set, and the registry the machinery
looks methods up in (filled by `peftlab.methods`, which imports every method file).

A method's name is stated once, in its `Method` record: `register` binds the record's config
class to it (sets `config_cls.method`), so `method_of(config)` finds the record from a config.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .errors import CapabilityError, ConfigError, close_matches
from .layer import AdaptedLayer, Delta, InputHook
from .precision import dtype_named
from .sites import Site
from .terms import LossTerm
from .typology import Typology


class Capability(enum.StrEnum):
    """What a method can do beyond attaching, training, saving and loading; the machinery refuses
    the operation (CapabilityError) for a method that does not declare it. A str enum: the
    values compare equal to their strings ("merge" == Capability.MERGE)."""

    MERGE = "merge"                                  # fold into the base weights (`merge`)
    MIXED_BATCH = "mixed-batch"                      # per-example adapters in one batch (`adapter_ids=`)
    # gradients through a routed batch; needs MIXED_BATCH. Declared only where routed training
    # is tested (tests/test_mixed_batch.py, tests/test_capabilities.py)
    TRAIN_IN_MIXED_BATCH = "train-in-mixed-batch"
    # attaches to and trains on bitsandbytes-quantised layers (Linear4bit, Linear8bitLt: see
    # core/quantised.py); `install` refuses a method without it where a site's layer is quantised
    QUANTISED_BASE = "quantised-base"
    # attaches to parameter sites (core/sites.py): nn.Parameters a module's forward reads directly
    # (MoE expert weights, Mamba's A_log); `install` refuses a method without it at such a site
    PARAMETER_SITE = "parameter-site"
    # acts on a slice of a fused projection's output rows (attn.q of Phi-3's qkv_proj, GPT-2's
    # c_attn); `install` refuses a method without it on a sliced site (core/sites.py, RowSlice)
    FUSED_SLICE = "fused-slice"


def _capability(value: Any) -> Capability | Any:
    """`value` as a Capability when it names one; otherwise unchanged (`register` refuses it)."""
    try:
        return Capability(value)
    except ValueError:
        return value


@dataclass
class MethodConfig:
    """Fields every method shares: where it attaches, which whole modules get trained copies, and
    the dtype its trained tensors are stored in (`dtype`, a torch dtype or its name, kept as the
    name: None is fp32 on a bf16 / fp16 base, as peft, else the base's dtype; see
    core/precision.py)."""

    # The name of the method this config class belongs to; set by `register` from the Method
    # record (never declared in the class body), inherited by unregistered subclasses.
    method: ClassVar[str] = ""
    targets: str | list[str] = field(default_factory=list)
    layers: int | list[int] | None = None
    exclude: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    dtype: str | None = None

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field and what would be valid."""
        if isinstance(self.dtype, torch.dtype):     # dtype=torch.bfloat16: kept as its name (JSON)
            self.dtype = str(self.dtype).removeprefix("torch.")
        dtype_named(self.dtype, f"{type(self).__name__}.dtype")
        if not self.targets:
            raise ConfigError(f"{type(self).__name__}.targets is empty; name roles such as "
                              "'attn.q', module names, globs, 're:...' or 'all-linear'")
        items = [self.targets] if isinstance(self.targets, str) else self.targets
        if not isinstance(items, (list, tuple)) or not all(isinstance(t, str) and t for t in items):
            raise ConfigError(f"{type(self).__name__}.targets must be a list of roles, module names, "
                              f"globs, 're:...' regexes or 'all-linear' (or one such string); got "
                              f"{self.targets!r}")
        check_target_regexes(f"{type(self).__name__}.targets", items)
        if isinstance(self.exclude, (str, list, tuple)):
            check_target_regexes(f"{type(self).__name__}.exclude",
                                 [self.exclude] if isinstance(self.exclude, str) else self.exclude)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MethodConfig:
        """The config these fields (as a checkpoint records them) describe. ConfigError naming the
        field for an unknown field or a value of the wrong type (checked against the dataclass
        annotations, before validate() could trip over it with a raw TypeError)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls.__name__} fields must be a mapping of field names to values, "
                              f"got {type(data).__name__} {data!r:.60}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__} has no field(s) {unknown}; known: {sorted(names)}")
        cls._check_types(data)
        return cls(**data)

    def check_types(self) -> None:
        """ConfigError naming the first field whose value does not fit its annotation (for
        configs built from other files' fields, such as a peft codec's)."""
        self._check_types(self.to_dict())

    @classmethod
    def _check_types(cls, values: Mapping[str, Any]) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in values and not value_fits(values[f.name], hints[f.name]):
                raise ConfigError(f"{cls.__name__}.{f.name} must be {describe_type(hints[f.name])}, "
                                  f"got {values[f.name]!r:.60}")


def value_fits(value: Any, hint: Any) -> bool:
    """Whether a JSON-like value fits a type annotation: str, int, float (an int fits), bool,
    None, lists / tuples / dicts of those, unions, Literal, Any. A class it cannot look into fits
    when the value is an instance; anything else passes (the config's validate() decides)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(value_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint in (int, float):     # bool is an int to Python, never to a config
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        homogeneous = origin is not tuple or len(args) == 1 or args[-1] is Ellipsis
        items = args[0] if args and homogeneous else Any      # tuple[int, str]: not looked into
        return isinstance(value, (list, tuple)) and all(value_fits(v, items) for v in value)
    if origin in (dict, Mapping) or hint is dict:
        keys, vals = args if len(args) == 2 else (Any, Any)
        return isinstance(value, dict) and all(value_fits(k, keys) and value_fits(v, vals)
                                               for k, v in value.items())
    return isinstance(value, hint) if isinstance(hint, type) else True


def describe_type(hint: Any) -> str:
    """An annotation as a message shows it: 'float', 'list[str] | None'."""
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def matches_path(pattern: str, path: str) -> bool:
    """peft's rule for target and pattern keys: the regex matches the module path at a dotted
    boundary ('q_proj' matches 'model.layers.0.self_attn.q_proj')."""
    return re.match(rf"(.*\.)?({pattern})$", path) is not None


def pattern_value(patterns: Mapping[str, Any], site: Site) -> Any | None:
    """The first pattern value whose key names this site: its role, or (as peft matches) a regex
    matching the module path at a dotted boundary. None when no key matches."""
    if not patterns:      # the usual case, asked several times per site when adapters are added
        return None
    return next((value for key, value in patterns.items()
                 if key == site.role or matches_path(key, site.path)), None)


def check_number(what: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, hint: str = "") -> None:
    """ConfigError unless `value` is a finite int or float within the bounds (`low_open` /
    `high_open`: the bound itself is excluded). A comparison alone (`not x > 0`) lets inf
    through and a bool count as a number; every numeric config field goes through here.
    `what` names the field in the message ("LoRA alpha", "TrainConfig.lr")."""
    lo = "" if low is None else (f"> {low:g}" if low_open else f">= {low:g}")
    hi = "" if high is None else (f"< {high:g}" if high_open else f"<= {high:g}")
    wanted = (f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
              if lo and hi else lo or hi or "a number")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ConfigError(f"{what} must be {wanted} (a finite number), got {value!r}{hint}")


def check_positive_int(what: str, value: Any) -> None:
    """ConfigError unless `value` is an int > 0 (a bool is not a count)."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")


def check_target_regexes(what: str, targets: Any) -> None:
    """ConfigError naming the field when a 're:...' target (or exclude) entry is not a valid
    regular expression; otherwise resolving the sites would fail with re.error."""
    for target in targets:
        if isinstance(target, str) and target.startswith("re:"):
            try:
                re.compile(target[3:])
            except re.error as e:
                raise ConfigError(f"{what} entry {target!r} is not a valid regular expression ({e}); "
                                  "fix the pattern after 're:' (e.g. 're:.*\\.q_proj')") from None


def check_pattern_keys(what: str, keys: Iterable[Any]) -> None:
    """ConfigError naming the field unless every key is a role or a valid module-path regex, as
    `matches_path` reads them (rank_pattern / alpha_pattern keys, feedforward entries)."""
    for key in keys:
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{what} holds {key!r}; use roles such as 'attn.q' or module-path "
                              "regexes such as 'q_proj' (non-empty strings)")
        try:
            matches_path(key, "")
        except re.error as e:
            raise ConfigError(f"{what} holds {key!r}, which is neither a role nor a valid regex ({e}); "
                              "use a role such as 'attn.q' or a module name such as 'q_proj'") from None


@dataclass(frozen=True)
class Method:
    """A registered PEFT method: everything the shared machinery needs to know about it.

    The record is the one place that states the method's name (`register` gives it to the
    config class) and its capabilities; whether the method is mergeable ("yes", "conditional",
    "no") is derived from them, and so is the `mergeable` entry of its typology card.
    """

    name: str
    title: str
    config_cls: type[MethodConfig]
    # The PEFT-Ref description; its `mergeable` / `merge_condition` are filled in from
    # `capabilities` and `merge_condition` when the record is made.
    typology: Typology
    layer_kinds: tuple[str, ...]            # base layer kinds it wraps; () = model-level method
    capabilities: frozenset[Capability]
    # build(site, layer, config, initialise=True): the delta for one site; `layer` wraps the
    # site's base layer; initialise=False leaves tensors unset for a checkpoint to fill.
    # Model-level methods (layer_kinds empty) get layer=None and return a plain module of tensors.
    # A build that declares a `model` keyword also gets the AdaptedModel (to find sibling sites).
    build: Callable[..., Delta | nn.Module]
    # Tensor names and shapes a delta at this site holds, for checking checkpoints before loading
    # (layer is None for model-level methods).
    tensor_shapes: Callable[[AdaptedLayer | None, Site, MethodConfig], dict[str, tuple[int, ...]]]
    describe: Callable[[MethodConfig], str] = lambda config: ""
    # build_hook(model, config, parts): an InputHook that rewrites the model's forward inputs
    # (prompt/prefix tuning; per-token routing masks), from the per-site parts (site path -> module).
    build_hook: Callable[[nn.Module, MethodConfig, dict[str, nn.Module]], InputHook] | None = None
    # A learning rate known to work for this method in `peftlab train` when none is given
    # (None: the model's default, tuned for LoRA). Prompt-like methods need far larger ones.
    train_lr: float | None = None
    # loss_terms(am, adapter name, config, parts) -> [LossTerm]: auxiliary losses the adapter
    # brings (core/terms.py), registered with it and removed with it.
    loss_terms: Callable[..., list[LossTerm]] | None = None
    # How adapters of this method combine in peftlab.compose: "lowrank" (ΔW = s·B A, combined as
    # ΔW), "additive" (every tensor adds to the base, identity 0), "scale" (every tensor rescales,
    # identity 1); None: not composable.
    composition: str | None = None
    # The method's peft codec (shared/specs/peft-format.md), for methods peft also has; the
    # dispatch in interop/peft_format.py writes and reads the directory and the common header.
    # to_peft(am, adapter) -> (peft config fields beyond the common header, {full peft key: tensor});
    # from_peft(am, peft config, {peft key: tensor}, directory) -> (config, sites,
    # {(site path, tensor name): tensor}), modules_to_save tensors keyed by the copied module's
    # path. Raise CheckpointError/ConfigError on a mismatch, CapabilityError for what peftlab
    # does not import. `import_peft` picks the method with this peft_type and a from_peft.
    peft_type: str | None = None
    to_peft: Callable[..., tuple[dict[str, Any], dict[str, Any]]] | None = None
    from_peft: Callable[..., tuple[MethodConfig, list[Site], dict[tuple[str, str], Any]]] | None = None
    # When merging works only in some configurations (MERGE declared): which, in words, for the
    # typology card and table ("not into an RMSNorm"); the deltas' check_merge enforces it.
    merge_condition: str | None = None
    # resolve(model, config, roles) -> [Site]: where a method finds its own sites instead of
    # matching config.targets as every layer method does (prompt tuning: the one embedding that
    # embeds input_ids, where the "embed" role names an encoder's and a decoder's); None: match.
    resolve: Callable[[nn.Module, MethodConfig, dict[str, str]], list[Site]] | None = None

    def __post_init__(self) -> None:
        # frozen record: the derived fields are written once, here
        capabilities = frozenset(_capability(c) for c in self.capabilities)
        object.__setattr__(self, "capabilities", capabilities)
        object.__setattr__(self, "typology", self.typology.with_merge(
            Capability.MERGE in capabilities, self.merge_condition,
            capabilities=[c.value for c in Capability if c in capabilities]))

    def supports(self, capability: Capability | str) -> bool:
        """Whether the method declares `capability` (a Capability or its string value)."""
        known = _capability(capability)
        if not isinstance(known, Capability):
            raise ConfigError(f"{capability!r} is not a capability; known: "
                              f"{', '.join(c.value for c in Capability)}")
        return known in self.capabilities

    @property
    def mergeable(self) -> str:
        """One of "yes", "conditional" (only as `merge_condition` says) or "no"."""
        if Capability.MERGE not in self.capabilities:
            return "no"
        return "conditional" if self.merge_condition else "yes"

    def refuse(self, capability: Capability, adapter: str, doing: str, fix: str) -> CapabilityError:
        """The error for `doing` something with adapter `adapter` that needs `capability`."""
        able = [m.title for m in METHODS.values() if capability in m.capabilities]
        return CapabilityError(
            f"adapter {adapter!r} is a {self.title} adapter, and {self.title} does not declare the "
            f"{capability.value!r} capability that {doing} needs (methods that do: "
            f"{', '.join(able) or 'none'}). {fix}")


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method record (a method file's `METHOD`) to the registry and bind its config class
    to it. ConfigError, with nothing registered, for an unknown capability, a capability that
    needs another one, a merge condition without MERGE, a peft codec without a peft_type, a name
    already taken, or a config class that belongs to another method."""
    where = f"method {method.name!r}"
    if not isinstance(method.name, str) or not method.name:
        raise ConfigError(f"a method record needs a non-empty name, got {method.name!r}")
    unknown = sorted(str(c) for c in method.capabilities if not isinstance(c, Capability))
    if unknown:
        raise ConfigError(f"{where} declares unknown capabilities {unknown}; known: "
                          f"{', '.join(c.value for c in Capability)}")
    if Capability.TRAIN_IN_MIXED_BATCH in method.capabilities and \
            Capability.MIXED_BATCH not in method.capabilities:
        raise ConfigError(f"{where} declares 'train-in-mixed-batch' without 'mixed-batch'; "
                          "declare both or neither")
    if method.merge_condition and Capability.MERGE not in method.capabilities:
        raise ConfigError(f"{where} has a merge_condition but does not declare 'merge'; declare "
                          "it or drop the condition")
    if (method.to_peft or method.from_peft) and not method.peft_type:
        raise ConfigError(f"{where} has a peft codec (to_peft/from_peft) but no peft_type")
    taken = METHODS.get(method.name)
    if taken is not None and taken is not method:
        raise ConfigError(f"a method named {method.name!r} is already registered ({taken.title}); "
                          "pick another name")
    cls = method.config_cls
    if not (isinstance(cls, type) and issubclass(cls, MethodConfig)):
        raise ConfigError(f"{where}: config_cls must be a MethodConfig subclass, got {cls!r}")
    # The class's own entry: a subclass (BALoraConfig of LoraConfig) inherits its parent's name
    # until it is registered itself.
    owner = cls.__dict__.get("method")
    if owner is not None and owner != method.name:
        raise ConfigError(f"{where}: config class {cls.__name__} belongs to method {owner!r}; a "
                          f"config class serves one method (subclass it for {method.name!r})")
    cls.method = method.name
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called `name`; ConfigError lists close names when there is none."""
    try:
        return METHODS[name]
    except KeyError:
        hint = close_matches(name, METHODS)
        raise ConfigError(f"no method {name!r}" + (f"; did you mean {', '.join(hint)}?" if hint else "")
                          + f" Registered: {', '.join(METHODS)}") from None


def method_of(config: MethodConfig) -> Method:
    """The method a config belongs to."""
    if not config.method:
        raise ConfigError(f"{type(config).__name__} belongs to no registered method; register a "
                          "Method record with config_cls=" + type(config).__name__)
    return get_method(config.method)
