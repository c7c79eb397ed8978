"""Sites: the places of a model a PEFT module can attach to, found by PEFT-Ref role or by name.

The role maps (core/role_maps.py) say which module paths play which role. Users target sites by
role, exact name or dotted suffix, glob (``*.q_proj``), regex (``re:...``) or ``"all-linear"``.

A site is a module, a module's output rows (a sub-role of a fused projection: attn.q of a
qkv_proj) or a module's parameters (MoE expert weights). Sizes are read in core/geometry.py.
"""

from __future__ import annotations

import fnmatch
import os
import re
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import CapabilityError, TargetNotFoundError, TargetWarning, close_matches
from .geometry import attention_heads, dims, is_linear_like, unwrap
from .role_maps import (
    FUSED_PARTS,
    ROLE_GROUPS,
    ROLES,
    SHARED_POSITIONS,
    compiled_role_map,
    fused_fallback,
    fused_layout,
    parameter_role,
)


@dataclass(frozen=True)
class RowSlice:
    """The output rows of a fused projection one sub-role owns (attn.q of Phi-3's qkv_proj, the
    query third of GPT-2's c_attn): half-open (start, stop) ranges of output features, in the
    order the model's forward reads them."""

    role: str
    ranges: tuple[tuple[int, int], ...]

    @property
    def size(self) -> int:
        return sum(stop - start for start, stop in self.ranges)

    def indices(self) -> list[int]:
        return [i for start, stop in self.ranges for i in range(start, stop)]

    def to_record(self) -> dict[str, Any]:
        return {"role": self.role, "rows": [[start, stop] for start, stop in self.ranges]}


@dataclass(frozen=True)
class Site:
    """One attachment place: the module at `path`, its PEFT-Ref `role` and transformer `layer`.
    `slices` (empty: the whole module) are the sub-roles of a fused projection an adapter acts
    on, each on its own output rows; `role` stays the fused module's ("attn.qkv")."""

    path: str
    role: str | None
    layer: int | None
    module: nn.Module
    params: tuple[str, ...] = ()   # a parameter site's targeted parameters (`parameter_candidates`)
    slices: tuple[RowSlice, ...] = ()   # a fused projection's rows this site owns (none: all)

    @property
    def type_name(self) -> str:
        return type(self.module).__name__

    @property
    def rows(self) -> list[int] | None:
        """The output rows the slices own, slice after slice (None: the whole module)."""
        return [i for sl in self.slices for i in sl.indices()] if self.slices else None

    @property
    def label(self) -> str | None:
        """The role as people read it: the sub-roles of a sliced site ("attn.q+attn.v")."""
        return "+".join(sl.role for sl in self.slices) if self.slices else self.role


def iter_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Yield (path, module) like named_modules, but a peftlab wrapper stands for the layer it
    wraps: its internals (base layer, deltas) are never sites themselves."""
    for name, child in model.named_children():
        path = f"{prefix}.{name}" if prefix else name
        yield path, child
        if not getattr(child, "is_peftlab_wrapper", False):
            yield from iter_modules(child, path)
        elif child.__dict__.get("kind") == "params":
            # a module wrapped for its parameters (a Mamba mixer) keeps its layers as sites
            yield from iter_modules(child._modules["base_layer"], path)


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


def shared_position_paths(model: nn.Module, role: str, modules: Mapping[str, nn.Module] | None = None
                          ) -> list[str]:
    """The module paths the family map lists for `role`, whichever role claimed them first
    (Llama's embed_tokens is "embed" and also "embed.out"), in model order."""
    patterns = compiled_role_map(model).get(role, [])
    modules = modules if modules is not None else dict(iter_modules(model))
    return [p for p in modules if any(pat.search(p) for pat in patterns)]


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
    if not paths and target in FUSED_PARTS:    # the fused projection holding it (sliced by resolve_sites)
        paths = by_role.get(FUSED_PARTS[target], [])
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
            elif not paths and target in SHARED_POSITIONS:
                paths = shared_position_paths(model, target, modules)
        found[target] = set(paths)
    return found


def resolve_sites(model: nn.Module, targets: str | Sequence[str], *,
                  layers: int | Sequence[int] | None = None,
                  exclude: str | Sequence[str] | None = None,
                  roles: dict[str, str] | None = None) -> list[Site]:
    """The sites `targets` name, in model order, restricted to `layers` and minus `exclude`.
    `roles` (path -> role) may be passed when already known. A sub-role a fused projection
    answers (attn.q of a qkv_proj) gives a site sliced to that sub-role's rows; several sub-roles
    of one module give one site with all their slices, and a target naming the whole module
    (attn.qkv, its path, all-linear) makes it whole. A target may also name parameters (a
    parameter role such as ``ffn.experts``, or parameter paths): they become parameter sites, one
    per module holding them; a target naming a module that is no layer but holds parameters with a
    parameter role (``experts``) names those parameters.

    Raises TargetNotFoundError naming close candidates when a target matches nothing, and when
    `layers` or `exclude` leave nothing; CapabilityError for a sub-role of a fused projection
    whose layout peftlab does not know. `all-linear` on a model with expert parameters warns
    (TargetWarning) naming those it leaves out.
    """
    modules = dict(iter_modules(model))
    roles = roles if roles is not None else site_roles(model)
    param_roles = parameter_roles(model, modules)
    by_role = _paths_by_role(roles)
    whole: set[str] = set()
    parts: dict[str, set[str]] = {}          # fused module path -> the sub-roles it acts for
    chosen_params: set[str] = set()
    excluded: set[str] = set()      # parameters `exclude` names: left out on purpose, no warning
    for target, (paths, params) in _match_all(model, targets, modules, roles, param_roles).items():
        if not paths and not params:
            raise TargetNotFoundError(_not_found_message(target, model, modules, roles))
        chosen_params |= params
        for role, found in _split_fused(target, paths, by_role):
            if role is None:
                whole |= found
            else:
                for path in found:
                    parts.setdefault(path, set()).add(role)
    layouts = {path: _layout_of(model, path, modules[path], roles[path], sorted(subs))
               for path, subs in parts.items() if path not in whole}
    if exclude:
        for target, (paths, params) in _match_all(model, exclude, modules, roles, param_roles).items():
            if not paths and not params:
                raise TargetNotFoundError(_not_found_message(target, model, modules, roles, what="exclude"))
            chosen_params -= params
            excluded |= params
            for role, found in _split_fused(target, paths, by_role):
                for path in found:
                    if role is None:
                        whole.discard(path)
                        parts.pop(path, None)
                        continue
                    if path in whole:         # the whole module less one sub-role: its other slices
                        whole.discard(path)
                        layouts[path] = _layout_of(model, path, modules[path], roles[path], [role])
                        parts[path] = {sub for sub, _ in layouts[path]}
                    parts.get(path, set()).discard(role)
    chosen = whole | {p for p, subs in parts.items() if subs}
    if layers is not None:
        wanted = {layers} if isinstance(layers, int) else set(layers)
        chosen = {p for p in chosen if layer_index(p) in wanted}
        chosen_params = {p for p in chosen_params if layer_index(p) in wanted}
    if not chosen and not chosen_params:
        raise TargetNotFoundError(
            f"targets {list(targets) if not isinstance(targets, str) else targets!r} with "
            f"layers={layers!r} exclude={exclude!r} leave no site; widen the targets or the layers")
    if "all-linear" in ([targets] if isinstance(targets, str) else targets):
        left_out = [p for p, role in param_roles.items() if role == "ffn.experts" and p not in chosen_params
                    and p not in excluded and (layers is None or layer_index(p) in wanted)]
        if left_out:
            shown = left_out if len(left_out) <= 8 else compress_paths(left_out)
            warnings.warn(TargetWarning(
                f"'all-linear' adapts Linear layers only and leaves out {len(left_out)} expert weight "
                f"parameters (nn.Parameters of MoE experts modules, not Linear layers): {', '.join(shown)}. "
                "targets=[..., 'ffn.experts'] includes them (LoRA per expert)"), stacklevel=_user_level())
    slices = {p: tuple(RowSlice(sub, ranges) for sub, ranges in layouts[p] if sub in parts[p])
              for p in chosen if p not in whole}
    return _sites(modules, roles, param_roles, chosen, chosen_params, slices)


def _user_level() -> int:
    """The stacklevel, for a warning given by the caller of this function, of the first frame
    outside peftlab: the warning points at the user's line, whichever API led here."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _match_all(model: nn.Module, targets: str | Sequence[str], modules: dict[str, nn.Module],
               roles: dict[str, str], param_roles: dict[str, str]) -> dict[str, tuple[set[str], set[str]]]:
    """For each target, (module paths, parameter paths) it names. A module it names that is no
    layer but holds parameters with a parameter role stands for those parameters."""
    found = match_targets(model, targets, modules, roles)
    held: dict[str, list[str]] = {}
    for ppath in param_roles:
        held.setdefault(ppath.rpartition(".")[0], []).append(ppath)
    out: dict[str, tuple[set[str], set[str]]] = {}
    for target, paths in found.items():
        params = set(match_parameters(target, param_roles, modules))
        for path in [p for p in paths if p in held and _layer_kind(modules[p]) is None]:
            paths.discard(path)
            params.update(held[path])
        out[target] = (paths, params)
    return out


def _layer_kind(module: nn.Module) -> str | None:
    # layer.py reads this module's geometry, so it is imported at use
    from .layer import layer_kind
    return layer_kind(unwrap(module))


def parameter_candidates(modules: dict[str, nn.Module]) -> Iterator[tuple[str, str, str, nn.Parameter]]:
    """(parameter path, module path, parameter name, parameter) of every nn.Parameter that can be
    a parameter site: those a module that is no layer (Linear, Embedding, norm ...) holds itself.
    A layer's weight is its module's site.

    A parameter site (`Site.params` non-empty) is the nn.Parameters of those names of the module
    at `Site.path`, which its forward reads directly (MoE expert weights, Mamba's A_log): one site
    per module and adapter, whatever the number of its parameters targeted; checkpoints record it
    by its parameter paths (`site_paths`)."""
    for path, module in modules.items():
        base = unwrap(module)
        if not base._parameters or _layer_kind(base) is not None:
            continue
        for name, p in base._parameters.items():
            if p is not None:
                yield f"{path}.{name}", path, name, p


def parameter_roles(model: nn.Module, modules: dict[str, nn.Module] | None = None) -> dict[str, str]:
    """Parameter path -> parameter role (``ffn.experts``, ``ssm.A``, ``ssm.D``; role_maps.py)."""
    modules = modules if modules is not None else dict(iter_modules(model))
    roles = {}
    for ppath, mpath, _, p in parameter_candidates(modules):
        role = parameter_role(ppath, p, unwrap(modules[mpath]))
        if role is not None:
            roles[ppath] = role
    return roles


def match_parameters(target: str, param_roles: dict[str, str], modules: dict[str, nn.Module]) -> list[str]:
    """The parameter paths a target names: a parameter role's, or, for a name, glob or regex,
    the candidate parameters' paths it matches (`all-linear` and module roles name none)."""
    if target == "all-linear" or target in ROLE_GROUPS:
        return []
    if target in ROLES:
        return [p for p, role in param_roles.items() if role == target]
    return [ppath for ppath, _, _, _ in parameter_candidates(modules) if _matches(target, ppath)]


def _sites(modules: dict[str, nn.Module], roles: dict[str, str], param_roles: dict[str, str],
           chosen: set[str], chosen_params: set[str],
           slices: Mapping[str, Sequence[RowSlice]] | None = None) -> list[Site]:
    """Module sites at `chosen` (sliced where `slices` gives rows) and one parameter site per
    module holding `chosen_params`, in model order (a module's parameters in its own order)."""
    slices = slices or {}
    by_module: dict[str, list[str]] = {}
    for ppath in chosen_params:
        by_module.setdefault(ppath.rpartition(".")[0], []).append(ppath.rpartition(".")[2])
    sites = []
    for path, module in modules.items():
        if path in chosen:
            sites.append(Site(path, roles.get(path), layer_index(path), unwrap(module),
                              slices=tuple(slices.get(path, ()))))
        elif path in by_module:
            base = unwrap(module)
            names = tuple(n for n in base._parameters if n in by_module[path])
            role = param_roles.get(f"{path}.{names[0]}")
            sites.append(Site(path, role, layer_index(path), base, names))
    return sites


def site_paths(sites: Sequence[Site]) -> list[str]:
    """The paths that record `sites` in a checkpoint (`sites_at` reads them back): a module
    site's module path, a parameter site's parameter paths."""
    return [p for s in sites for p in ([f"{s.path}.{n}" for n in s.params] or [s.path])]


def _paths_by_role(roles: dict[str, str]) -> dict[str, list[str]]:
    by_role: dict[str, list[str]] = {}
    for path, role in roles.items():
        by_role.setdefault(role, []).append(path)
    return by_role


def _split_fused(target: str, paths: set[str], by_role: dict[str, list[str]]
                 ) -> list[tuple[str | None, set[str]]]:
    """A target's paths as (sub-role, fused module paths) for the sub-roles fused projections
    answer, and (None, paths) for whole modules."""
    names = ROLE_GROUPS.get(target, (target,))
    out: list[tuple[str | None, set[str]]] = []
    rest = set(paths)
    for role in names:
        fused = FUSED_PARTS.get(role)
        if fused is not None and not by_role.get(role) and by_role.get(fused):
            found = set(by_role[fused]) & paths
            if role in ROLE_GROUPS.get(target, ()) and fused in names:
                continue            # the group names the whole fused module too: it stays whole
            out.append((role, found))
            rest -= found
    return [*out, (None, rest)] if rest else out


def _layout_of(model: nn.Module, path: str, module: nn.Module, fused_role: str,
               wanted: Sequence[str]) -> tuple[tuple[str, tuple[tuple[int, int], ...]], ...]:
    """The (sub-role, rows) layout of the fused projection at `path`; CapabilityError, naming
    the module and the whole role to target instead, when peftlab does not know it."""
    layout = fused_layout(model, fused_role, dims(module)[1], attention_heads(model))
    if layout is None:
        raise CapabilityError(
            f"{', '.join(wanted)} of this {type(model).__name__} is part of the fused projection "
            f"{path!r} ({fused_role}, {dims(module)[1]} outputs), and peftlab does not know which of "
            f"its output rows {'it owns' if len(wanted) == 1 else 'they own'} for this family; "
            f"target the whole projection ({fused_role!r} or its path) instead")
    return layout


def _not_found_message(target: str, model: nn.Module, modules: dict[str, nn.Module], roles: dict[str, str],
                       what: str = "target") -> str:
    leaves = {p.rsplit(".", 1)[-1] for p in modules}
    present_roles = sorted(set(roles.values()) | set(parameter_roles(model, modules).values()))
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
    """Role -> module paths (parameter roles: parameter paths), in ROLES order, for `peftlab
    inspect` and error messages."""
    by_role: dict[str, list[str]] = {}
    for path, role in site_roles(model).items():
        by_role.setdefault(role, []).append(path)
    for ppath, role in parameter_roles(model).items():     # parameter sites, by parameter path
        by_role.setdefault(role, []).append(ppath)
    return {role: by_role[role] for role in ROLES if role in by_role}


def describe_sliced_roles(model: nn.Module) -> dict[str, list[str]]:
    """Sub-role -> "path[rows]" of the fused projections that answer it (attn.q of a qkv_proj:
    'model.layers.0.self_attn.qkv_proj[0:32]'), for `peftlab inspect`; sub-roles whose fused
    projection has no known layout are left out."""
    roles = site_roles(model)
    by_role = _paths_by_role(roles)
    modules = dict(iter_modules(model))
    out: dict[str, list[str]] = {}
    heads = attention_heads(model)
    for path in [p for fused in sorted(set(FUSED_PARTS.values())) for p in by_role.get(fused, [])]:
        layout = fused_layout(model, roles[path], dims(modules[path])[1], heads)
        for sub, ranges in layout or ():
            if not by_role.get(sub):
                spans = [f"{start}:{stop}" for start, stop in ranges]
                shown = ",".join(spans) if len(spans) <= 3 else (
                    f"{','.join(spans[:2])},… {len(spans)} ranges, {sum(b - a for a, b in ranges)} rows")
                out.setdefault(sub, []).append(f"{path}[{shown}]")
    return out


def sites_at(model: nn.Module, paths: Sequence[str], roles: dict[str, str] | None = None,
             slices: Mapping[str, Sequence[RowSlice]] | None = None) -> list[Site]:
    """Sites at these exact paths (as a checkpoint records them: `site_paths`), in model order;
    a parameter path names a parameter site (those of one module form one site); `slices`
    (path -> RowSlices) makes those module sites sliced (checked against the module's outputs)."""
    if not paths:
        return []
    modules = dict(iter_modules(model))
    roles = roles if roles is not None else site_roles(model)
    missing = [p for p in paths if p not in modules]
    params: set[str] = set()
    if missing:
        candidates = {ppath for ppath, _, _, _ in parameter_candidates(modules)}
        params = {p for p in missing if p in candidates}
        missing = [p for p in missing if p not in params]
    if missing:
        hint = close_matches(missing[0], modules)
        raise TargetNotFoundError(
            f"module {missing[0]!r} does not exist in this {type(model).__name__}"
            + (f"; close candidates: {', '.join(hint)}" if hint else "")
            + f" ({len(missing)} of {len(paths)} recorded sites are missing: a different base model?)")
    slices = slices or {}
    for path, parts in slices.items():
        if path not in paths:
            raise TargetNotFoundError(f"row slices are given for {path!r}, which is not one of the sites")
        check_slices(path, modules[path], parts)
    param_roles = parameter_roles(model, modules) if params else {}
    return _sites(modules, roles, param_roles, set(paths) - params, params, slices)


def check_slices(path: str, module: nn.Module, slices: Sequence[RowSlice]) -> None:
    """TargetNotFoundError unless the slices' rows are disjoint, non-empty and inside the
    module's outputs (a checkpoint's slices on this model)."""
    d_out = dims(module)[1]
    seen: set[int] = set()
    for sl in slices:
        rows = sl.indices()
        bad = not rows or any(start >= stop or start < 0 or stop > d_out for start, stop in sl.ranges)
        if bad or seen & set(rows):
            raise TargetNotFoundError(
                f"the {sl.role} rows {[list(r) for r in sl.ranges]} recorded for {path!r} do not fit its "
                f"{d_out} outputs (or overlap another slice): a different base model?")
        seen |= set(rows)
