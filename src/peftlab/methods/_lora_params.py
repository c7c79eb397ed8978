"""LoRA on parameter sites: nn.Parameters a module's forward reads directly (core/sites.py), with
peft 0.21's `target_parameters` semantics (peft's `lora.ParamWrapper`).

A 3-D parameter holds one matrix per expert, (experts, out, in) — or (experts, in, out) when the
module says `is_transposed` (transformers' experts implementations) —; each expert e gets its own
ΔW_e = s · B_e A_e with A (experts, r, in) and B (experts, out, r), s = α/r (α/√r with rsLoRA), r
being the rank per expert. A 2-D parameter (Mamba's A_log, (d_inner, state)) is one (out, in)
matrix: A (r, in), B (out, r). The delta acts at the "params" stage: the module runs on W + ΔW
(`AdaptedLayer._call_with_param_deltas`), and merging adds ΔW to W. As in peft, dropout, DoRA and
PiSSA do not apply (dropout acts on a layer's input, which a parameter site has no hold on).

peft's layout (`ParamWrapper`): lora_A is one Linear (in → r·experts), its weight (r·experts, in)
read as (experts, r, in); lora_B one Linear (r·experts → out), its weight (out, r·experts) read as
(out, r, experts). Several parameters of one module nest one wrapper each, the first parameter (in
the module's order) innermost: its keys carry one '.base_layer' per wrapper around it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..core.errors import CheckpointError, ConfigError
from ..core.geometry import unwrap
from ..core.layer import AdaptedLayer, Delta
from ..core.method import matches_path
from ..core.precision import adapter_dtype
from ..core.sites import Site, parameter_candidates

if TYPE_CHECKING:
    from .lora import LoraConfig

BASE_LAYER = "base_layer"     # peft's name of the module a wrapper wraps


def orientation(module: nn.Module, name: str) -> tuple[int, int, int | None, bool]:
    """(in, out, experts or None, transposed) of parameter `name` of `module`, as peft reads it;
    ConfigError for a parameter that is not 2-D or 3-D."""
    p = module.get_parameter(name)
    if p.dim() == 3:
        transposed = bool(getattr(module, "is_transposed", False))
        experts, a, b = p.shape
        return (a, b, experts, True) if transposed else (b, a, experts, False)
    if p.dim() == 2:
        return p.shape[1], p.shape[0], None, False
    raise ConfigError(f"LoRA needs a 2-D or 3-D parameter; {name!r} of {type(module).__name__} is "
                      f"{p.dim()}-D {list(p.shape)}. Exclude it (e.g. exclude=['ssm.D'])")


def _pattern(patterns: Mapping[str, Any], site: Site, name: str) -> Any | None:
    """A rank_pattern / alpha_pattern value for parameter `name` of `site`: a key naming its
    parameter path first, then the site (its role or module path)."""
    ppath = f"{site.path}.{name}"
    return next((v for k, v in patterns.items() if matches_path(k, ppath)), None) or next(
        (v for k, v in patterns.items() if k == site.role or matches_path(k, site.path)), None)


def rank_of(config: LoraConfig, site: Site, name: str) -> int:
    """The LoRA rank (per expert) of parameter `name` of `site`, checked against its shape."""
    r = _pattern(config.rank_pattern, site, name) or config.r
    d_in, d_out, _, _ = orientation(site.module, name)
    if r > max(d_in, d_out):
        raise ConfigError(f"LoRA rank {r} at {site.path}.{name} ({d_out}×{d_in} per expert) exceeds "
                          f"max(d_in, d_out)={max(d_in, d_out)}; lower r or set rank_pattern for it")
    return r


def scaling_of(config: LoraConfig, site: Site, name: str) -> float:
    r = rank_of(config, site, name)
    alpha = _pattern(config.alpha_pattern, site, name) or config.alpha
    return alpha / math.sqrt(r) if config.rslora else alpha / r


class ParamFactors(nn.Module):
    """One parameter's factors: lora_A (experts, r, in) / (r, in), lora_B (experts, out, r) / (out, r)."""

    def __init__(self, d_in: int, d_out: int, r: int, experts: int | None, *, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        lead = () if experts is None else (experts,)
        self.lora_A = nn.Parameter(torch.empty(*lead, r, d_in, dtype=dtype, device=device), requires_grad=False)
        self.lora_B = nn.Parameter(torch.empty(*lead, d_out, r, dtype=dtype, device=device), requires_grad=False)


class ParamLowRankDelta(Delta):
    """LoRA on the targeted parameters of one module: per parameter (and per expert) s · B A,
    added to the parameter for the module's forward. Tensors are named '<parameter>.lora_A'."""

    stage = "params"

    def __init__(self, module: nn.Module, names: tuple[str, ...], ranks: dict[str, int],
                 scalings: dict[str, float], dtype: torch.dtype) -> None:
        super().__init__()
        self.__dict__.update(names=names, scalings=scalings, transposed={})
        for name in names:
            d_in, d_out, experts, transposed = orientation(module, name)
            self.transposed[name] = transposed
            # a child per parameter, under the parameter's own name ('gate_up_proj.lora_A')
            self._modules[name] = ParamFactors(d_in, d_out, ranks[name], experts, dtype=dtype,
                                               device=module.get_parameter(name).device)

    def initialise(self, init: str) -> None:
        """As peft: A ~ U(±1/√in) (nn.Linear's default), B = 0; "gaussian": A ~ N(0, 1/r);
        "random": B ~ U(±1/√r) too, a non-zero delta."""
        with torch.no_grad():
            for name in self.names:
                A, B = self._modules[name].lora_A, self._modules[name].lora_B
                r, d_in = A.shape[-2], A.shape[-1]
                if init == "gaussian":
                    A.normal_(std=1.0 / r)
                else:
                    A.uniform_(-1 / math.sqrt(d_in), 1 / math.sqrt(d_in))
                if init == "random":
                    B.uniform_(-1 / math.sqrt(r), 1 / math.sqrt(r))
                else:
                    B.zero_()

    def delta_of(self, name: str) -> torch.Tensor:
        """ΔW of parameter `name` in its own layout (per expert s · B_e A_e, transposed where the
        module stores (experts, in, out)), in the factors' dtype, with their gradients."""
        f = self._modules[name]
        dw = torch.matmul(f.lora_B, f.lora_A) * self.scalings[name]
        return dw.transpose(-2, -1) if self.transposed[name] else dw

    def param_deltas(self, layer: AdaptedLayer) -> dict[str, torch.Tensor]:
        return {name: self.delta_of(name) for name in self.names}

    @torch.no_grad()
    def merge_into(self, layer: AdaptedLayer) -> None:
        for name in self.names:
            p = layer.base_layer.get_parameter(name)
            # the sum in the wider dtype, rounded once: what the unmerged forward computes
            p.copy_((p + self.delta_of(name)).to(p.dtype))


def build(site: Site, config: LoraConfig, initialise: bool) -> ParamLowRankDelta:
    """The delta at parameter site `site`; ConfigError for what a parameter site cannot take."""
    what = f"the parameter site {site.path} ({', '.join(site.params)})"
    if config.dropout:
        raise ConfigError(f"LoRA dropout={config.dropout} cannot act on {what}: dropout drops a layer's "
                          "input, and a parameter's delta has none (peft refuses it too). Set dropout=0 "
                          "or exclude it")
    if config.dora or config.init == "pissa":
        raise ConfigError(f"{'DoRA' if config.dora else 'PiSSA'} is not supported on {what} (nor by "
                          "peft's target_parameters); use plain LoRA there or exclude it")
    ranks = {n: rank_of(config, site, n) for n in site.params}
    scalings = {n: scaling_of(config, site, n) for n in site.params}
    weight = site.module.get_parameter(site.params[0])
    delta = ParamLowRankDelta(site.module, site.params, ranks, scalings,
                              adapter_dtype(config, weight.dtype))
    if initialise:
        delta.initialise(config.init)
    return delta


def tensor_shapes(site: Site, config: LoraConfig) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name in site.params:
        d_in, d_out, experts, _ = orientation(site.module, name)
        r, lead = rank_of(config, site, name), () if experts is None else (experts,)
        shapes |= {f"{name}.lora_A": (*lead, r, d_in), f"{name}.lora_B": (*lead, d_out, r)}
    return shapes


# ---- peft format ---------------------------------------------------------------------------------
def wrapped_path(path: str, wrapped: Mapping[str, int]) -> str:
    """`path` as it reads under peft's nested ParamWrappers: below a module whose parameters are
    wrapped (`wrapped`: module path -> number of wrappers), each wrapper adds a '.base_layer'."""
    owner = max((q for q in wrapped if path.startswith(q + ".")), key=len, default=None)
    if owner is None:
        return path
    return ".".join([owner, *[BASE_LAYER] * wrapped[owner], path[len(owner) + 1:]])


def to_peft(site: Site, delta: ParamLowRankDelta, prefix: str, wrapped: Mapping[str, int], rslora: bool
            ) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, float]]:
    """peft's tensors for a parameter site (full keys), and each parameter's rank and alpha
    (keyed by its parameter path) for the config's patterns."""
    tensors, ranks, alphas = {}, {}, {}
    n = len(site.params)
    path = wrapped_path(site.path, wrapped)       # a parameter module inside another one
    for i, name in enumerate(site.params):
        f = delta._modules[name]
        A, B = f.lora_A.detach(), f.lora_B.detach()
        if A.dim() == 2:
            A, B = A[None], B[None]
        experts, r = A.shape[0], A.shape[1]
        key = ".".join([path, *[BASE_LAYER] * (n - 1 - i)])
        tensors[f"{prefix}{key}.lora_A.weight"] = A.reshape(experts * r, A.shape[2])       # (r·E, in)
        tensors[f"{prefix}{key}.lora_B.weight"] = B.permute(1, 2, 0).reshape(B.shape[1], r * experts)
        ppath = f"{site.path}.{name}"
        ranks[ppath] = r
        alphas[ppath] = delta.scalings[name] * (math.sqrt(r) if rslora else r)
    return tensors, ranks, alphas


def targeted(model: nn.Module, modules: Mapping[str, nn.Module], target_parameters: list[str]
             ) -> dict[str, tuple[str, ...]]:
    """Module path -> the names of its parameters peft's `target_parameters` name (an entry names
    a parameter path or a suffix of one, as peft matches), in the module's order."""
    held: dict[str, list[str]] = {}
    for ppath, mpath, name, _ in parameter_candidates(dict(modules)):
        if any(ppath == t or ppath.endswith("." + t) for t in target_parameters):
            held.setdefault(mpath, []).append(name)
    missing = [t for t in target_parameters
               if not any(f"{m}.{n}" == t or f"{m}.{n}".endswith("." + t) for m, ns in held.items() for n in ns)]
    if missing:
        raise CheckpointError(f"target_parameters entry {missing[0]!r} names no parameter of this "
                              f"{type(model).__name__} (a different base model?)")
    return {m: tuple(ns) for m, ns in held.items()}


def unwrapped(key_path: str) -> tuple[str, int]:
    """A module path read from peft's keys without its '.base_layer' parts, and how many of them
    it ends with (the nesting depth of a parameter's wrapper)."""
    parts = key_path.split(".")
    depth = 0
    while parts and parts[-1] == BASE_LAYER:
        parts.pop()
        depth += 1
    return ".".join(p for p in parts if p != BASE_LAYER), depth


def from_peft(module: nn.Module, path: str, names: tuple[str, ...], depth: int, tname: str,
              t: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(our tensor name, tensor in our layout) for peft's `tname` ('lora_A' / 'lora_B') of the
    wrapper `depth` levels inside the outermost one at module `path`."""
    if depth >= len(names):
        raise CheckpointError(f"peft tensor of {path!r} nested {depth} wrappers deep, but only "
                              f"{len(names)} of its parameters are targeted ({', '.join(names)})")
    name = names[len(names) - 1 - depth]
    d_in, d_out, experts, _ = orientation(module, name)
    e = experts or 1
    if tname == "lora_A":
        if t.dim() != 2 or t.shape[1] != d_in or t.shape[0] % e:
            raise CheckpointError(f"peft lora_A of {path}.{name} is {list(t.shape)}; this model needs "
                                  f"(r·{e}, {d_in})")
        ours = t.reshape(e, t.shape[0] // e, d_in)
    else:
        if t.dim() != 2 or t.shape[0] != d_out or t.shape[1] % e:
            raise CheckpointError(f"peft lora_B of {path}.{name} is {list(t.shape)}; this model needs "
                                  f"({d_out}, r·{e})")
        ours = t.reshape(d_out, t.shape[1] // e, e).permute(2, 0, 1)
    return f"{name}.{tname}", ours[0] if experts is None else ours.contiguous()


def import_peft(model: nn.Module, modules: Mapping[str, nn.Module], target_parameters: list[str],
                lora: dict[tuple[str, str], torch.Tensor], r: int, alpha: float,
                peft_alphas: Mapping[str, float]
                ) -> tuple[dict[tuple[str, str], torch.Tensor], list[str], dict[str, int], dict[str, float]]:
    """peft's LoRA tensors keyed (key path, 'lora_A' / 'lora_B') read with `target_parameters`:
    (tensors keyed by our site paths and names, the parameter paths of the parameter sites, and
    their rank / alpha patterns where they differ from r / alpha). Module sites inside a wrapped
    module lose the '.base_layer' parts peft's nesting put in their paths."""
    held = targeted(model, modules, target_parameters)
    out: dict[tuple[str, str], torch.Tensor] = {}
    for (key_path, tname), t in lora.items():
        path, depth = unwrapped(key_path)
        if path in held:
            ours, tensor = from_peft(unwrap(modules[path]), path, held[path], depth, tname, t)
            out[(path, ours)] = tensor
        else:
            out[(path, tname)] = t
    params = [f"{m}.{n}" for m, names in held.items() for n in names]
    rank_pattern, alpha_pattern = {}, {}
    for ppath in params:
        m, _, name = ppath.rpartition(".")
        site_r = out[(m, f"{name}.lora_A")].shape[-2]
        site_alpha = next((v for k, v in peft_alphas.items() if matches_path(k, ppath)), None) or alpha
        if site_r != r:
            rank_pattern[re.escape(ppath)] = site_r
        if site_alpha != alpha:
            alpha_pattern[re.escape(ppath)] = float(site_alpha)
    return out, params, rank_pattern, alpha_pattern
