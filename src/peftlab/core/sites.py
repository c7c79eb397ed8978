"""Sites: the places of a model a PEFT module can attach to, found by PEFT-Ref role or by name.

The role maps (core/role_maps.py) say which module paths play which role. Users target sites by
role, exact name or dotted suffix, glob (``*.q_proj``), regex (``re:...``) or ``"all-linear"``.

The geometry section at the end reads sizes one way for every caller: a layer's (in, out)
features and (out, in) weight whatever its type stores, and the attention heads a config declares.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import CapabilityError, TargetNotFoundError, close_matches
from .quantised import dequantised, features, quantisation
from .role_maps import ROLE_GROUPS, ROLES, compiled_role_map, fused_fallback


@dataclass(frozen=True)
class Site:
    """One attachment place: the module at `path`, its PEFT-Ref `role` and transformer `layer`."""

    path: str
    role: str | None
    layer: int | None
    module: nn.Module

    @property
    def type_name(self) -> str:
        return type(self.module).__name__


def iter_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Yield (path, module) like named_modules, but a peftlab wrapper stands for the layer it
    wraps: its internals (base layer, deltas) are never sites themselves."""
    for name, child in model.named_children():
        path = f"{prefix}.{name}" if prefix else name
        yield path, child
        if not getattr(child, "is_peftlab_wrapper", False):
            yield from iter_modules(child, path)


def unwrap(module: nn.Module) -> nn.Module:
    """The original module behind a peftlab wrapper (or the module itself)."""
    # a class attribute: read from the type, a miss skips nn.Module.__getattr__'s exception
    return module.original_module if getattr(type(module), "is_peftlab_wrapper", False) else module


def layer_index(path: str) -> int | None:
    """The transformer block index in a module path: its first all-digit component."""
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    return None


def site_roles(model: nn.Module) -> dict[str, str]:
    """Map every module path that plays a PEFT-Ref role to that role."""
    compiled = compiled_role_map(model)
    roles: dict[str, str] = {}
    for path, module in iter_modules(model):
        for role, patterns in compiled.items():
            if any(p.search(path) for p in patterns):
                roles[path] = role
                break
        else:
            if "Norm" in type(unwrap(module)).__name__:
                roles[path] = "norm"
    return roles


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear (bitsandbytes' quantised Linear4bit / Linear8bitLt subclass it) or the
    transposed GPT-2 Conv1D."""
    module = unwrap(module)
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _matches(target: str, path: str) -> bool:
    if target.startswith("re:"):
        return re.fullmatch(target[3:], path) is not None
    if any(ch in target for ch in "*?["):
        return fnmatch.fnmatchcase(path, target)
    return path == target or path.endswith("." + target)


def output_embeddings(model: nn.Module) -> nn.Module | None:
    """The layer `model.get_output_embeddings()` names (Whisper's `proj_out`, a tied LM head),
    unwrapped; None when it has none."""
    getter = getattr(model, "get_output_embeddings", None)
    try:
        head = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        return None
    return unwrap(head) if isinstance(head, nn.Module) else None


def _expand_roles(target: str, by_role: dict[str, list[str]]) -> list[str] | None:
    """Paths for a role or role-group target; None when `target` is not a role name."""
    if target in ROLE_GROUPS:
        return [p for role in ROLE_GROUPS[target] for p in by_role.get(role, [])]
    if target not in ROLES:
        return None
    paths = by_role.get(target, [])
    if not paths and target in fused_fallback:
        paths = by_role.get(fused_fallback[target], [])
    return paths


def match_targets(model: nn.Module, targets: str | Sequence[str],
                  modules: dict[str, nn.Module] | None = None,
                  roles: dict[str, str] | None = None) -> dict[str, set[str]]:
    """For each target, the set of module paths it names (empty when it matches nothing)."""
    modules = modules if modules is not None else dict(iter_modules(model))
    roles = roles if roles is not None else site_roles(model)
    by_role: dict[str, list[str]] = {}
    for path, role in roles.items():
        by_role.setdefault(role, []).append(path)
    found: dict[str, set[str]] = {}
    for target in [targets] if isinstance(targets, str) else targets:
        if target == "all-linear":
            # as peft: no head, nor the output embedding (often tied to the input one)
            output = output_embeddings(model)
            paths = [p for p, m in modules.items() if is_linear_like(m) and roles.get(p) != "head"
                     and (output is None or unwrap(m) is not output)]
        else:
            paths = _expand_roles(target, by_role)
            if paths is None:
                paths = [p for p in modules if _matches(target, p)]
        found[target] = set(paths)
    return found


def resolve_sites(model: nn.Module, targets: str | Sequence[str], *,
                  layers: int | Sequence[int] | None = None,
                  exclude: str | Sequence[str] | None = None,
                  roles: dict[str, str] | None = None) -> list[Site]:
    """The sites `targets` name, in model order, restricted to `layers` and minus `exclude`.
    `roles` (path -> role) may be passed when already known.

    Raises TargetNotFoundError naming close candidates when a target matches nothing, and when
    `layers` or `exclude` leave nothing.
    """
    modules = dict(iter_modules(model))
    roles = roles if roles is not None else site_roles(model)
    chosen: set[str] = set()
    for target, paths in match_targets(model, targets, modules, roles).items():
        if not paths:
            raise TargetNotFoundError(_not_found_message(target, model, modules, roles))
        chosen |= paths
    if exclude:
        for target, paths in match_targets(model, exclude, modules, roles).items():
            if not paths:
                raise TargetNotFoundError(_not_found_message(target, model, modules, roles, what="exclude"))
            chosen -= paths
    if layers is not None:
        wanted = {layers} if isinstance(layers, int) else set(layers)
        chosen = {p for p in chosen if layer_index(p) in wanted}
    if not chosen:
        raise TargetNotFoundError(
            f"targets {list(targets) if not isinstance(targets, str) else targets!r} with "
            f"layers={layers!r} exclude={exclude!r} leave no site; widen the targets or the layers")
    return [Site(p, roles.get(p), layer_index(p), unwrap(m)) for p, m in modules.items() if p in chosen]


def _not_found_message(target: str, model: nn.Module, modules: dict[str, nn.Module], roles: dict[str, str],
                       what: str = "target") -> str:
    leaves = {p.rsplit(".", 1)[-1] for p in modules}
    present_roles = sorted(set(roles.values()))
    pool = [*present_roles, *ROLE_GROUPS, *leaves, *modules]
    hint = close_matches(target, pool)
    msg = f"{what} {target!r} matches no module of this {type(model).__name__}"
    if hint:
        msg += f"; close candidates: {', '.join(hint)}"
    msg += (f". Roles here: {', '.join(present_roles) or 'none'}; a target may also be an exact "
            "name or dotted suffix, a glob ('*.q_proj'), a regex ('re:...') or 'all-linear' "
            "(`peftlab inspect --model ...` lists them)")
    return msg


def compress_paths(paths: list[str]) -> list[str]:
    """Module paths shortened for people: one 'model.layers.{0-29}.self_attn.q_proj' for each run
    of paths that differ only in the layer index, then the paths without one."""
    groups: dict[str, list[int]] = {}
    singles = []
    for p in paths:
        idx = layer_index(p)
        if idx is None:
            singles.append(p)
            continue
        parts = p.split(".")
        at = next(i for i, part in enumerate(parts) if part.isdigit())
        groups.setdefault(".".join(parts[:at] + ["{}"] + parts[at + 1:]), []).append(idx)
    out = []
    for template, idx in groups.items():
        idx = sorted(idx)
        span = str(idx[0]) if len(idx) == 1 else (
            f"{idx[0]}-{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) else ",".join(map(str, idx)))
        out.append(template.replace("{}", "{" + span + "}"))
    return out + singles


def describe_sites(model: nn.Module) -> dict[str, list[str]]:
    """Role -> module paths, in ROLES order, for `peftlab inspect` and error messages."""
    by_role: dict[str, list[str]] = {}
    for path, role in site_roles(model).items():
        by_role.setdefault(role, []).append(path)
    return {role: by_role[role] for role in ROLES if role in by_role}


def sites_at(model: nn.Module, paths: Sequence[str], roles: dict[str, str] | None = None) -> list[Site]:
    """Sites at these exact module paths (as a checkpoint records them), in model order."""
    if not paths:
        return []
    modules = dict(iter_modules(model))
    roles = roles if roles is not None else site_roles(model)
    missing = [p for p in paths if p not in modules]
    if missing:
        hint = close_matches(missing[0], modules)
        raise TargetNotFoundError(
            f"module {missing[0]!r} does not exist in this {type(model).__name__}"
            + (f"; close candidates: {', '.join(hint)}" if hint else "")
            + f" ({len(missing)} of {len(paths)} recorded sites are missing: a different base model?)")
    wanted = set(paths)
    return [Site(p, roles.get(p), layer_index(p), unwrap(m)) for p, m in modules.items() if p in wanted]


# ---- geometry: the sizes of layers and of attention, read in this one place ----------------------
# Layers follow nn.Linear's (out, in) convention; an embedding's "input" is its vocabulary.
_HEAD_COUNT_KEYS = ("num_attention_heads", "n_head", "num_heads")
_HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model")
_HEAD_DIM_KEYS = ("head_dim", "d_kv")          # d_kv: T5's head width, not d_model / heads


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D, matched by name: importing it would tie the core to transformers
    return type(module).__name__ == "Conv1D"


def weight_axes(module: nn.Module) -> tuple[int, int]:
    """(output axis, input axis) of the stored weight of a Linear — (0, 1) — or of a GPT-2
    Conv1D or an Embedding — (1, 0), as they store it transposed; a peftlab wrapper answers for
    the layer it holds."""
    module = unwrap(module)
    if isinstance(module, nn.Linear):
        return 0, 1
    if isinstance(module, nn.Embedding) or _is_conv1d(module):
        return 1, 0
    raise CapabilityError(f"a {type(module).__name__} is not a Linear, GPT-2 Conv1D or Embedding "
                          "layer, so its weight has no (out, in) reading; target one of those")


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear, GPT-2 Conv1D, Embedding or norm (or of the layer a peftlab wrapper
    holds) as an (out, in) view; a norm's elementwise (d,) weight is returned as it is. A
    bitsandbytes-quantised layer's weight is packed: it is dequantised into a new fp32 tensor
    (so writing into the result changes nothing: merging goes through core/merging.py)."""
    module = unwrap(module)
    if isinstance(module, nn.Linear):    # first: layers read this in their forward
        return dequantised(module) if quantisation(module) else module.weight
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise CapabilityError(f"a {type(module).__name__} has no weight tensor to read sizes from; "
                              "target a Linear, GPT-2 Conv1D, Embedding or norm layer")
    if weight.dim() == 1:
        return weight
    out_axis, _ = weight_axes(module)
    return weight if out_axis == 0 else weight.t()


def dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, GPT-2 Conv1D, Embedding (vocabulary, width) or
    norm (width, width), read from its current weight (a bitsandbytes-quantised layer's from the
    module: its packed weight has another shape); a peftlab wrapper answers for its layer."""
    module = unwrap(module)
    if quantisation(module):
        return features(module)
    weight = weight_out_in(module)
    return weight.shape[-1], weight.shape[0]


def stored_shape(module: nn.Module) -> tuple[int, ...]:
    """The shape of a layer's stored weight; for a bitsandbytes-quantised layer the (out, in)
    matrix its packed weight encodes, so a quantised base and its dense original agree."""
    module = unwrap(module)
    if quantisation(module):
        d_in, d_out = features(module)
        return d_out, d_in
    return tuple(module.weight.shape)


def text_config(source: nn.Module) -> Any | None:
    """The config `source` carries (a transformers model, or one of its attention modules, which
    keep a reference to it); a multimodal model's text config. None without one."""
    config = getattr(source, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def _declared(config: Any, keys: Sequence[str]) -> int | None:
    """The first positive integer the config holds under one of `keys`."""
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def attention_heads(source: nn.Module) -> tuple[int, int, int] | None:
    """(query heads, key/value heads, head width) as the config of `source` (a model, or one of
    its attention modules) declares them: key/value heads default to the query heads (no
    grouped-query attention), the head width to hidden size / heads. None when there is no
    config or it declares no head count. These are the sizes the model was built with; a
    structurally pruned model's current sizes are in its weights (`dims`)."""
    config = text_config(source)
    heads = _declared(config, _HEAD_COUNT_KEYS) if config is not None else None
    if heads is None:
        return None
    kv_heads = _declared(config, ("num_key_value_heads",)) or heads
    head_dim = _declared(config, _HEAD_DIM_KEYS)
    if head_dim is None:
        hidden = _declared(config, _HIDDEN_SIZE_KEYS)
        if hidden is None:
            raise CapabilityError(f"the config of {type(source).__name__} declares {heads} attention "
                                  f"heads but neither a head width ({' / '.join(_HEAD_DIM_KEYS)}) nor a "
                                  f"hidden size ({' / '.join(_HIDDEN_SIZE_KEYS)}); set one of them")
        head_dim = hidden // heads
    return heads, kv_heads, head_dim
