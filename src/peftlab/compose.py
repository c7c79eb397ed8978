"""Adapter arithmetic and merging: new adapters made from trained ones, without training.

Operators (Zhang et al., 2023, "Composing Parameter-Efficient Modules with Arithmetic
Operations") and merges (TIES: Yadav et al., 2023; DARE: Yu et al., 2024) are defined through
each method's identity element (`Method.composition`):

* "lowrank" (LoRA): the effect at a site is ΔW = s·B A (− s·B0 A0 for PiSSA).
  Delta space combines ΔW exactly. A weighted sum is stored as a LoRA of concatenated rank,
  B = [w1·s1·B1 | w2·s2·B2 | ...], A = [A1; A2; ...], scaling 1; or, given `rank`, re-factored by
  truncated SVD (the relative error, the discarded singular-value energy, is recorded).
  Parameter space (the paper's) combines the factors separately, A = Σ|w_i|·A_i and
  B = Σ w_i·(s_i/s)·B_i: exact for one input, but for several the product has cross terms
  B_i A_j, so the inputs must share an initialisation (checked through their A factors; a
  warning when they do not look aligned).
* "additive" (BitFit, LN tuning): every tensor adds to the base: t = Σ w_i·t_i.
* "scale" (IA3): every vector rescales: l = 1 + Σ w_i·(l_i − 1); negation is l ↦ 2 − l.
  Parameter and delta space coincide for these two forms.
* modules_to_save copies (e.g. a classifier head) combine as deltas from the base module:
  base + Σ w_i·(copy_i − base).

Merges act on the task vectors τ_i (ΔW, l − 1, t, copy − base), tensor by tensor:
* linear: Σ w_i·τ_i;
* magnitude: Σ w_i·trim(τ_i), trim keeping the ⌈density·n⌉ entries of largest |τ|;
* ties: trim, elect the sign of Σ w_i·τ̂_i per entry, then the w-weighted mean of the entries
  whose sign agrees with it (the disjoint mean);
* dare: Σ w_i·(m_i ⊙ τ_i)/density with m_i ~ Bernoulli(density) from a generator seeded with
  `seed`, drawn in a fixed order (so the same seed gives the same adapter);
* dare_ties: DARE's drop and rescale, then TIES's sign election and disjoint mean.
`lam` scales the merged task vector (TIES's λ; the weights of TIES's disjoint mean cancel out).

LoRA adapters merge in one of two ways, named by a suffix:
* "<rule>_svd" (the plain rule name means this one): the rule on the dense ΔW_i of every site,
  stored by truncated SVD at `rank` (default: the sum of the inputs' ranks there; the relative
  error is recorded and printed by `peftlab compose`), or exactly with rank="full" (ΔW = B·I or
  I·A at rank min(d_out, d_in)).
* "<rule>_factors" (peft's `add_weighted_adapter` for ties, dare_linear, dare_ties,
  magnitude_prune): the rule on the A factors and, separately, on the B factors, with weights
  √|w_i·s_i| (A's carrying the sign); needs one rank per site; stored at that rank with scaling 1.
  As in peft: a top-⌊density·n⌋ trim, the sign elected by the unweighted sum, the disjoint mean
  by count. Cheap and rank-preserving, but B_merged·A_merged has cross terms B_i·A_j.

    peftlab.add(am, ["a", "b"], name="ab")                 # the average, exact
    peftlab.negate(am, "toxic", name="detox")
    peftlab.analogy(am, "cls_a", "lm_b", "lm_a", name="cls_b")
    peftlab.merge_adapters(am, ["a", "b", "c"], how="ties", density=0.2, rank=16, name="abc")
    peftlab.merge_adapters(am, ["a", "b"], how="ties_svd", lam=1.5, rank="full", name="exact")

The result is an ordinary adapter (inactive, frozen): it saves, loads, merges, exports to the
peft format, and its card shows how it was made (`Adapter.provenance`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .core.errors import AdapterError, CapabilityError, ConfigError, PeftlabWarning
from .methods import METHODS

if TYPE_CHECKING:
    from .core.model import AdaptedModel, Adapter

MODES = ("delta", "parameter")
MERGES = ("linear", "magnitude", "ties", "dare", "dare_ties")
# LoRA only: the same rules on dense ΔW (re-factored), or on the factors as peft does
LOWRANK_MERGES = tuple(f"{m}_{way}" for way in ("svd", "factors") for m in MERGES if m != "linear")
FULL = "full"                             # rank="full": no truncation
IDENTITY = {"additive": 0.0, "scale": 1.0}
SIGNED_FACTORS = ("lora_B", "pissa_B0")   # LoRA tensors that carry the sign in parameter space
SHARED_INIT_COSINE = 0.3                  # below this mean cos(A_i, A_1) the inits look unrelated


class CompositionWarning(PeftlabWarning):
    """Composition that runs but probably does not mean what was intended."""


# ---- public operators -------------------------------------------------------------------------
def add(am: AdaptedModel, names: Sequence[str], weights: Sequence[float] | None = None, *, name: str,
        mode: str = "delta", rank: int | None = None) -> Adapter:
    """The weighted sum of adapters' effects (default weights 1/N: the average) as a new adapter."""
    return compose(am, names, weights, name=name, op="add", mode=mode, rank=rank)


def negate(am: AdaptedModel, adapter: str, *, name: str, mode: str = "delta") -> Adapter:
    """The adapter with its effect reversed (LoRA: −ΔW; IA3: l ↦ 2 − l)."""
    return compose(am, [adapter], [-1.0], name=name, op="negate", mode=mode)


def scale(am: AdaptedModel, adapter: str, factor: float, *, name: str, mode: str = "delta") -> Adapter:
    """The adapter with its effect scaled by `factor` about the identity (LoRA: factor·ΔW; IA3:
    1 + factor·(l − 1)); a negative factor is the paper's scaled negation."""
    return compose(am, [adapter], [factor], name=name, op="scale", mode=mode)


def subtract(am: AdaptedModel, a: str, b: str, *, name: str, mode: str = "delta",
             rank: int | None = None) -> Adapter:
    """a − b."""
    return compose(am, [a, b], [1.0, -1.0], name=name, op="subtract", mode=mode, rank=rank)


def analogy(am: AdaptedModel, a: str, b: str, c: str, *, name: str, weights: tuple[float, float] = (1.0, 1.0),
            mode: str = "delta", rank: int | None = None) -> Adapter:
    """λ1·a + λ2·(b − c): e.g. a classifier of domain A plus (LM of domain B − LM of domain A)
    for a classifier of domain B."""
    l1, l2 = weights
    return compose(am, [a, b, c], [l1, l2, -l2], name=name, op="analogy", mode=mode, rank=rank)


def merge_adapters(am: AdaptedModel, names: Sequence[str], *, name: str, how: str = "ties",
                   weights: Sequence[float] | None = None, density: float = 0.5, seed: int = 0,
                   rank: int | str | None = None, lam: float = 1.0) -> Adapter:
    """Merge N adapters with `how` (MERGES; for LoRA also LOWRANK_MERGES: see the module
    docstring) into a new adapter; the merged task vector is scaled by `lam`."""
    return compose(am, names, weights, name=name, op=how, how=how, rank=rank,
                   density=None if how == "linear" else density, seed=seed if how.startswith("dare") else None,
                   lam=lam)


# ---- the engine ---------------------------------------------------------------------------------
def compose(am: AdaptedModel, names: Sequence[str], weights: Sequence[float] | None, *, name: str,
            op: str, how: str = "linear", mode: str = "delta", rank: int | str | None = None,
            density: float | None = None, seed: int | None = None, lam: float = 1.0) -> Adapter:
    """Combine adapters `names` with `weights` by merge rule `how` in `mode` space into a new
    adapter `name`, the merged task vector scaled by `lam`; `op` is the operator's name recorded
    in the provenance."""
    inputs = [am.adapter(n) for n in names]
    weights = _check_request(inputs, weights, how, mode, rank, density, lam)
    first = inputs[0]
    form = first.method.composition
    if form == "lowrank" and how in MERGES and how != "linear":
        how += "_svd"       # the plain name on LoRA: named for what it does
    rule = how.rsplit("_", 1)[0] if how in LOWRANK_MERGES else how
    merge = _merge_rule(rule, density, seed, lam)

    # sites on slices of a fused projection keep them, unless the result is re-factored as
    # dense factors over the whole layer (`LowRankDelta.factors` scatters a slice's B: exact)
    slices = {s.path: s.slices for s in first.sites if s.slices}
    if form == "lowrank" and how.endswith("_factors"):
        tensors, config, info = _factor_wise(inputs, weights, rule, density, seed, lam)
    elif form == "lowrank":
        tensors, config, info = _compose_lowrank(inputs, weights, mode, how, merge, rank)
        if info["form"] in ("concatenated", "svd", "dense"):
            slices = {}
    else:
        tensors = _compose_elementwise(inputs, weights, IDENTITY[form], merge)
        config, info = copy.deepcopy(first.config), {"form": "elementwise"}
    provenance = {
        "op": op, "mode": mode, "merge": how,
        "inputs": [{"name": a.name, "weight": w, **({"provenance": a.provenance} if a.provenance else {})}
                   for a, w in zip(inputs, weights, strict=True)],
        "density": density, "seed": seed, **({"lam": lam} if lam != 1.0 else {}), **info,
    }
    return am.install(name, config, sites=[s.path for s in first.sites], tensors=tensors,
                      copies=_compose_copies(inputs, weights, merge), provenance=provenance,
                      slices=slices or None)


def _check_request(inputs: list[Adapter], weights: Sequence[float] | None, how: str, mode: str,
                   rank: int | str | None, density: float | None, lam: float) -> list[float]:
    """The weights as floats, or a clear error for anything that cannot be composed."""
    if not inputs:
        raise AdapterError("composition needs at least one adapter")
    if mode not in MODES:
        raise ConfigError(f"composition mode {mode!r} is unknown; choose 'delta' (exact) or 'parameter' "
                          "(the paper's: factors combined separately)")
    if how not in MERGES + LOWRANK_MERGES:
        raise ConfigError(f"merge {how!r} is unknown; choose one of {MERGES} (LoRA adapters also "
                          f"{LOWRANK_MERGES})")
    if mode == "parameter" and how != "linear":
        raise ConfigError(f"{how} merges task vectors in delta space; use mode='delta'")
    if rank is not None and rank != FULL and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
        raise ConfigError(f"rank must be a positive integer or 'full' (no truncation), got {rank!r}")
    if not (isinstance(lam, (int, float)) and not isinstance(lam, bool) and math.isfinite(lam)):
        raise ConfigError(f"lam (the scale of the merged task vector) must be a finite number, got {lam!r}")
    if how.endswith("_factors") and rank is not None:
        raise ConfigError(f"{how} merges the factors at the inputs' rank; drop rank (or use "
                          f"{how.replace('_factors', '_svd')} to re-factor)")
    if density is not None and not 0.0 < density <= 1.0:
        raise ConfigError(f"density (the fraction of entries kept) must be in (0, 1], got {density!r}")
    n = len(inputs)
    weights = [1.0 / n] * n if weights is None else [float(w) for w in weights]
    if len(weights) != n:
        raise ConfigError(f"{n} adapters but {len(weights)} weights; give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError(f"weights must be finite numbers, got {weights}")
    if how in ("ties", "dare_ties") and any(w <= 0 for w in weights):
        raise ConfigError(f"{how} takes positive weights (it elects signs by weighted mass); got {weights}. "
                          "Negate an adapter first to subtract it")

    first = inputs[0]
    method = first.method
    if method.composition is None:
        composable = sorted(m.name for m in METHODS.values() if m.composition)
        raise CapabilityError(f"{method.title} adapters cannot be composed (the method declares no "
                              f"composition rule); composable methods: {composable}")
    if method.composition != "lowrank" and rank is not None:
        raise ConfigError(f"rank applies to low-rank (LoRA) adapters; {method.title} adapters are "
                          "elementwise and compose exactly without it: drop rank")
    if method.composition != "lowrank" and how in LOWRANK_MERGES:
        raise ConfigError(f"{how} is a way to merge LoRA factors; {method.title} adapters are "
                          f"elementwise: use {how.rsplit('_', 1)[0]!r}")
    if method.composition == "lowrank" and mode == "parameter" and rank is not None:
        raise ConfigError("rank re-factoring is a delta-space operation; drop --rank or use mode='delta'")
    for a in inputs:
        if a.method is not method:
            raise AdapterError(f"adapters {first.name!r} ({method.title}) and {a.name!r} ({a.method.title}) "
                               "are different methods; composition combines adapters of one method")
        if getattr(a.config, "dora", False):
            raise CapabilityError(f"adapter {a.name!r} is DoRA: its magnitude renormalisation is not "
                                  "linear in ΔW, so it has no sum or negation. Merge it into the base or "
                                  "compose plain LoRA adapters")
        params = [s for s in a.sites if s.params]
        if params:
            raise CapabilityError(f"adapter {a.name!r} adapts parameters ({params[0].path}."
                                  f"{params[0].params[0]}, a parameter site): composition combines layer "
                                  "deltas only. Merge it into the base, or compose adapters on layers")
        _check_same_places(first, a)
    return weights


def _check_same_places(first: Adapter, other: Adapter) -> None:
    mine, theirs = [s.path for s in first.sites], [s.path for s in other.sites]
    if set(mine) != set(theirs):
        extra = sorted(set(theirs) - set(mine)) or sorted(set(mine) - set(theirs))
        raise AdapterError(f"adapters {first.name!r} and {other.name!r} sit on different sites (e.g. "
                           f"{extra[0]!r}); composition needs the same sites in every input")
    if {s.path: s.slices for s in first.sites} != {s.path: s.slices for s in other.sites}:
        raise AdapterError(f"adapters {first.name!r} and {other.name!r} act on different slices of a "
                           "fused projection (attn.q vs attn.v of one qkv_proj); composition needs the "
                           "same slices in every input")
    if set(first.copies) != set(other.copies):
        raise AdapterError(f"adapters {first.name!r} and {other.name!r} train different whole modules "
                           f"({sorted(first.copies)} vs {sorted(other.copies)})")
    for path in mine:
        a, b = first.layers[path].deltas[first.name], other.layers[path].deltas[other.name]
        if getattr(a, "stage", None) != getattr(b, "stage", None):
            raise AdapterError(f"at {path!r} adapter {first.name!r} acts at the layer's {a.stage} and "
                               f"{other.name!r} at its {b.stage}; they cannot be combined")


# ---- low-rank (LoRA) ------------------------------------------------------------------------------
def _factors(delta: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(s·B, A) in fp32 with ΔW = (s·B) A; PiSSA's frozen start enters as a second block."""
    B, A = delta.factors()
    return B.detach().float() * delta.scaling, A.detach().float()


def _compose_lowrank(inputs: list[Adapter], weights: list[float], mode: str, how: str,
                     merge: Callable, rank: int | None):
    first = inputs[0]
    paths = [s.path for s in first.sites]
    deltas = {p: [a.layers[p].deltas[a.name] for a in inputs] for p in paths}
    if len(inputs) == 1 and how == "linear" and rank is None:
        return _scaled_single(first, weights[0], deltas, mode)
    if mode == "parameter":
        return _parameter_space(first, weights, deltas)
    tensors: dict[tuple[str, str], torch.Tensor] = {}
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    for path, ds in deltas.items():
        dtype = ds[0].lora_A.dtype
        pairs = [_factors(d) for d in ds]
        if how == "linear" and rank in (None, FULL):     # exact: concatenated rank
            B = torch.cat([w * b for w, (b, _) in zip(weights, pairs, strict=True)], dim=1)
            A = torch.cat([a for _, a in pairs])
        elif rank == FULL:
            dense = merge([b @ a for b, a in pairs], weights, f"{path}.delta_weight")
            B, A = _exact_factors(dense)
        else:
            dense = merge([b @ a for b, a in pairs], weights, f"{path}.delta_weight")
            k = rank or sum(a.shape[0] for _, a in pairs)
            B, A, errors[path] = _truncated_svd(dense, min(k, *dense.shape))
        ranks[path] = A.shape[0]
        # back to the stored shapes: a conv's A (r, in, *kernel), B (out, r, 1, ...); Linear's as is
        A = A.reshape(A.shape[0], *ds[0].lora_A.shape[1:])
        B = B.reshape(B.shape[0], B.shape[1], *ds[0].lora_B.shape[2:])
        tensors[(path, "lora_A")], tensors[(path, "lora_B")] = A.to(dtype), B.to(dtype)
    r = max(set(ranks.values()), key=list(ranks.values()).count)    # the commonest rank
    odd = {re.escape(p): k for p, k in ranks.items() if k != r}
    config = dataclasses.replace(first.config, r=r, alpha=float(r), rslora=False, dora=False, init="zero",
                                 rank_pattern=odd, alpha_pattern={p: float(k) for p, k in odd.items()})
    if errors:
        values = list(errors.values())
        info = {"form": "svd", "rank": r, "svd_relative_error": {
            "max": max(values), "mean": sum(values) / len(values), "per_site": errors}}
    else:
        info = {"form": "dense" if rank == FULL and how != "linear" else "concatenated", "rank": r}
    return tensors, config, info


def _scaled_single(adapter: Adapter, w: float, deltas: dict, mode: str):
    """One input scaled by w: B (and PiSSA's B0) times w, everything else as it was; exact in
    both spaces."""
    tensors = {}
    for path, (delta,) in deltas.items():
        for tname, t in delta.state_dict().items():
            tensors[(path, tname)] = t * w if tname in SIGNED_FACTORS else t.clone()
    return tensors, copy.deepcopy(adapter.config), {"form": "factor B scaled", "rank": None}


def _parameter_space(first: Adapter, weights: list[float], deltas: dict):
    """The paper's rule: A = Σ|w_i|·A_i, B = Σ w_i·(s_i/s_1)·B_i (sign and scaling carried by B)."""
    cosines = []
    tensors = {}
    for path, ds in deltas.items():
        if len({d.lora_A.shape for d in ds}) > 1 or len({d.pissa for d in ds}) > 1:
            raise CapabilityError(f"parameter-space composition needs equal ranks and inits at every "
                                  f"site; at {path!r} they differ. Use mode='delta' (exact)")
        s1 = ds[0].scaling
        for tname in ds[0].state_dict():
            coeff = [w * d.scaling / s1 if tname in SIGNED_FACTORS else abs(w) for w, d in zip(weights, ds, strict=True)]
            ts = [d.state_dict()[tname] for d in ds]
            tensors[(path, tname)] = sum(c * t.float() for c, t in zip(coeff, ts, strict=True)).to(ts[0].dtype)
        a1 = ds[0].lora_A.detach().float().flatten()
        cosines += [float(torch.nn.functional.cosine_similarity(a1, d.lora_A.detach().float().flatten(), dim=0))
                    for d in ds[1:]]
    mean_cos = sum(cosines) / len(cosines)
    if mean_cos < SHARED_INIT_COSINE:
        warnings.warn(f"the adapters' A factors are unrelated (mean cosine {mean_cos:.2f} to "
                      f"{first.name!r}'s): they were not trained from a shared initialisation, so "
                      "combining A and B separately adds cross terms B_i·A_j. Use mode='delta' for "
                      "the exact combination", CompositionWarning, stacklevel=5)
    return tensors, copy.deepcopy(first.config), {"form": "factors combined", "rank": None,
                                                  "shared_init_cosine": mean_cos}


def _exact_factors(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B, A with B A = `dense` exactly, at rank min(d_out, d_in): one factor is the identity."""
    d_out, d_in = dense.shape
    if d_in <= d_out:
        return dense.clone(), torch.eye(d_in, dtype=dense.dtype, device=dense.device)
    return torch.eye(d_out, dtype=dense.dtype, device=dense.device), dense.clone()


def _factor_wise(inputs: list[Adapter], weights: list[float], rule: str, density: float,
                 seed: int | None, lam: float):
    """peft's factor-wise merge: `rule` on the A factors and on the B factors separately, with
    weights √|w_i·s_i| (A's signed), at the inputs' common rank, scaling 1 (α = r)."""
    first = inputs[0]
    generator = torch.Generator().manual_seed(seed or 0)
    tensors: dict[tuple[str, str], torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for site in first.sites:
        ds = [a.layers[site.path].deltas[a.name] for a in inputs]
        factors = [d.factors() for d in ds]                                    # (B, A) each
        if len({A.shape for _, A in factors}) > 1:
            raise CapabilityError(f"{rule}_factors merges factors entry by entry, so the inputs need one "
                                  f"rank per site; at {site.path!r} they have "
                                  f"{[A.shape[0] for _, A in factors]}. Use {rule}_svd")
        scaled = [w * d.scaling for w, d in zip(weights, ds, strict=True)]
        w_A = [math.copysign(math.sqrt(abs(v)), v) for v in scaled]
        w_B = [math.sqrt(abs(v)) for v in scaled]
        A = _peft_rule(rule, [a.detach().float() for _, a in factors], w_A, density, generator)
        B = _peft_rule(rule, [b.detach().float() for b, _ in factors], w_B, density, generator) * lam
        dtype = ds[0].lora_A.dtype
        ranks[site.path] = A.shape[0]
        tensors[(site.path, "lora_A")] = A.reshape(A.shape[0], *ds[0].lora_A.shape[1:]).to(dtype)
        tensors[(site.path, "lora_B")] = B.reshape(B.shape[0], A.shape[0], *ds[0].lora_B.shape[2:]).to(dtype)
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    odd = {re.escape(p): k for p, k in ranks.items() if k != r}
    config = dataclasses.replace(first.config, r=r, alpha=float(r), rslora=False, dora=False, init="zero",
                                 rank_pattern=odd, alpha_pattern={p: float(k) for p, k in odd.items()})
    return tensors, config, {"form": "factor-wise", "rank": r}


def _peft_rule(rule: str, tensors: list[torch.Tensor], weights: list[float], density: float,
               generator: torch.Generator) -> torch.Tensor:
    """peft's merge utilities' definitions: magnitude keeps the top ⌊density·n⌋ entries, DARE
    drops with Bernoulli(density) and rescales, TIES elects the sign of the unweighted sum
    (ties to +) and averages the weighted entries of that sign by count."""
    def keep_top(t: torch.Tensor) -> torch.Tensor:
        if density >= 1:
            return t
        k = int(density * t.numel())
        mask = torch.zeros(t.numel(), dtype=t.dtype)
        mask[t.abs().reshape(-1).topk(k).indices] = 1
        return t * mask.view_as(t)

    if rule in ("magnitude", "ties"):
        stacked = torch.stack([keep_top(t) for t in tensors])
    else:   # dare, dare_ties
        stacked = torch.stack([t * (torch.rand(t.shape, generator=generator) < density) / density
                               for t in tensors])
    w = torch.tensor(weights, dtype=stacked.dtype).view(-1, *[1] * tensors[0].dim())
    if rule in ("magnitude", "dare"):
        return (stacked * w).sum(0)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = stacked.sign() == elected
    return (stacked * w * agree).sum(0) / agree.sum(0).clamp(min=1)


def _truncated_svd(dense: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """B (d_out, k), A (k, d_in) with B A the best rank-k approximation of `dense`, and the
    relative Frobenius error, √(Σ_{i>k} σ_i²) / √(Σ σ_i²)."""
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    root = S[:k].sqrt()
    total = float(S.square().sum())
    error = math.sqrt(float(S[k:].square().sum()) / total) if total > 0 else 0.0
    return U[:, :k] * root, root[:, None] * Vh[:k], error


# ---- vectors and whole-module copies ----------------------------------------------------------------
def _compose_elementwise(inputs: list[Adapter], weights: list[float], identity: float, merge: Callable):
    tensors = {}
    for site in inputs[0].sites:
        parts = [a.layers[site.path].deltas[a.name].state_dict() for a in inputs]
        for tname, t in parts[0].items():
            taus = [p[tname].float() - identity for p in parts]
            tensors[(site.path, tname)] = (identity + merge(taus, weights, f"{site.path}.{tname}")).to(t.dtype)
    return tensors


def _compose_copies(inputs: list[Adapter], weights: list[float], merge: Callable
                    ) -> dict[str, dict[str, torch.Tensor]]:
    """modules_to_save path -> the merged copy's state."""
    states: dict[str, dict[str, torch.Tensor]] = {}
    for path, wrapper in inputs[0].copies.items():
        base = wrapper.original_module.state_dict()
        copies = [a.copies[path].copies[a.name].state_dict() for a in inputs]
        state = states[path] = {}
        for tname, b in base.items():
            if not b.is_floating_point():     # integer buffers (position ids) are not learned
                state[tname] = copies[0][tname].clone()
                continue
            taus = [c[tname].float() - b.float() for c in copies]
            state[tname] = (b.float() + merge(taus, weights, f"{path}.{tname}")).to(b.dtype)
    return states


# ---- merge rules on task vectors ----------------------------------------------------------------
def _merge_rule(how: str, density: float | None, seed: int | None, lam: float = 1.0) -> Callable:
    """f(task vectors, weights, key) -> merged task vector, times `lam`. DARE draws its masks from
    one generator in call order, and callers walk sites, tensors and inputs in a fixed order."""
    generator = torch.Generator().manual_seed(seed or 0)

    def rule(taus: list[torch.Tensor], weights: list[float], key: str) -> torch.Tensor:
        merged = unscaled(taus, weights)
        return merged if lam == 1.0 else merged * lam

    def unscaled(taus: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        if how == "linear":
            return weighted_sum(taus, weights)
        if how == "magnitude":
            return weighted_sum([trim(t, density) for t in taus], weights)
        if how == "ties":
            return disjoint_mean([trim(t, density) for t in taus], weights)
        dropped = [dare(t, density, generator) for t in taus]
        return weighted_sum(dropped, weights) if how == "dare" else disjoint_mean(dropped, weights)

    return rule


def weighted_sum(taus: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    out = torch.zeros_like(taus[0])
    for w, t in zip(weights, taus, strict=True):
        out.add_(t, alpha=w)
    return out


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """τ with all but its ⌈density·n⌉ largest-magnitude entries set to 0."""
    k = math.ceil(density * tau.numel() - 1e-9)     # 0.3 * 10 is 3.0000000000000004 in floats
    if k >= tau.numel():
        return tau.clone()
    keep = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
    keep[tau.abs().flatten().topk(k).indices] = True
    return tau * keep.view_as(tau)


def dare(tau: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density` and rescale the kept ones by 1/density,
    so the expected task vector is unchanged."""
    keep = torch.rand(tau.shape, generator=generator) < density
    return tau * keep.to(tau.device) / density


def disjoint_mean(taus: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES: per entry, the sign of Σ w_i·τ_i, then the w-weighted mean of the non-zero entries
    with that sign (0 where none agrees)."""
    stacked = torch.stack(list(taus))                                   # (N, ...)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * taus[0].dim())
    elected = torch.sign((w * stacked).sum(0))
    agree = (torch.sign(stacked) == elected) & (stacked != 0)
    mass = (w * agree).sum(0)
    return torch.where(mass > 0, (w * stacked * agree).sum(0) / mass.clamp_min(1e-30), 0.0)
