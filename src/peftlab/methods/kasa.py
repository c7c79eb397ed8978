"""KaSA: knowledge-aware singular-value adaptation (Wang et al., 2024; arXiv 2412.06071).

Two steps (shared/specs/seed-methods.md §10):

1. At attach, the base weight W (d_out × d_in, k = min(d_out, d_in)) is replaced IN PLACE by its
   rank-(k − r) truncation W_world = W − U_r diag(σ_r) V_rᵀ: the r smallest singular triplets
   ("noisy / long-tail knowledge") are dropped. The SVD runs in fp32. The dropped triplets are
   kept as frozen fp32 buffers of the delta (`residual_U`, `residual_S`, `residual_V`), so that
   deleting the adapter or unloading the model restores W (W_world + U_r diag(σ_r) V_rᵀ; exact
   to fp32 rounding for fp32 bases, to the dtype's rounding for half-precision ones).

   Consequence, by design: **a fresh KaSA adapter is not a no-op.** The model's function
   changes at attach although ΔW = 0, and it stays changed while the adapter is present:
   disabling the adapters, deactivating it or unmerging it gives the W_world model, not the
   original one. Only `delete_adapter` and `unload` give the original weights back
   (`merge_and_unload` keeps the merged W_world + ΔW, the function the adapter computes).
   Other adapters on the same layer see W_world while the KaSA adapter is attached.

2. The update ΔW = s · B diag(δ) A, s = α/r, A ∈ R^{r×d_in} (Kaiming-uniform, a=√5),
   B ∈ R^{d_out×r} (zeros), δ ∈ R^r (N(0, 1)); forward y = W_world x + s · B(δ ⊙ (A · drop(x))).
   Mergeable (W += s · B diag(δ) A), additive.

Objective (the paper's form, registered as auxiliary loss terms of the adapter):
  "kasa.<name>.singular"   = β · Σ_layers Σ_i δ_i²
  "kasa.<name>.orthogonal" = γ · Σ_layers (‖BᵀB − I_r‖_F + ‖AAᵀ − I_r‖_F)      (norms not squared)
`normalise_by_layers` divides both by the number of KaSA layers, as the authors' code does.

Where the authors' code differs from the paper, `code_compat=True` follows the code:
  * it keeps d_in − r components instead of k − r, so a layer with d_in > d_out (e.g. down_proj)
    drops max(0, r − (d_in − d_out)) components: none when d_in − d_out ≥ r;
  * its orthogonality penalty uses the large Grams AᵀA (d_in × d_in) and BBᵀ (d_out × d_out)
    against full identities, which can never reach 0. It is evaluated here through the
    identity ‖AᵀA − I_d‖_F² = ‖AAᵀ‖_F² − 2‖A‖_F² + d (same value and gradient, r × r cost).

Checkpoints hold A, B, δ and the dropped triplets. Loading truncates the fresh base again and
checks that the triplets it drops match the saved ones (a CheckpointError otherwise, with the
base left untouched); the freshly computed triplets are kept, so removal stays exact.

Two KaSA adapters on one layer are refused (the second would truncate the already truncated
weight), as is attaching where another adapter is merged into the layer.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import CheckpointError, ConfigError
from ..core.layer import AdaptedLayer, Delta
from ..core.merging import kept_weight
from ..core.method import (
    Capability,
    Method,
    MethodConfig,
    check_number,
    check_positive_int,
)
from ..core.precision import adapter_dtype, cast_at_use, compute_dtype
from ..core.sites import Site
from ..core.terms import LossContext, LossTerm
from ..core.typology import Typology


@dataclass
class KasaConfig(MethodConfig):
    """KaSA on Linear and GPT-2 Conv1D sites.

    Attaching truncates each targeted base weight to rank k − r (k = min(d_out, d_in)): a fresh
    adapter changes the model's outputs, and only delete_adapter / unload restore the original
    weights. `beta` weighs the singular-value penalty Σ δ², `gamma` the orthogonality penalty;
    `normalise_by_layers` divides both by the number of KaSA layers (the authors' code);
    `code_compat` truncates d_in − r components and uses the large-Gram orthogonality penalty,
    as the authors' code does (see the module docstring).
    """

    targets: str | list[str] = field(default_factory=lambda: ["attn.q", "attn.v"])
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    beta: float = 1e-4
    gamma: float = 1e-3
    normalise_by_layers: bool = False
    code_compat: bool = False

    def validate(self) -> None:
        super().validate()
        check_positive_int("KaSA rank r", self.r)
        check_number("KaSA alpha", self.alpha, low=0, low_open=True, hint=" (the usual choice is 2·r)")
        check_number("KaSA dropout", self.dropout, low=0, high=1, high_open=True)
        for name in ("beta", "gamma"):
            check_number(f"KaSA {name}", getattr(self, name), low=0)
        for name in ("normalise_by_layers", "code_compat"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"KaSA {name} must be true or false, got {getattr(self, name)!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def dropped_components(d_in: int, d_out: int, r: int, code_compat: bool = False) -> int:
    """How many of the smallest singular triplets the truncation drops: r (paper: keep k − r),
    or with `code_compat` the k − (d_in − r) the authors' code drops (keep d_in − r), at least 0."""
    k = min(d_in, d_out)
    return r if not code_compat else max(0, k - (d_in - r))


class KasaDelta(Delta):
    """s · B diag(δ) A on top of the truncated base, with the dropped triplets kept for restore."""

    algebra = "add"

    def __init__(self, d_in: int, d_out: int, r: int, n_drop: int, scaling: float, *,
                 dropout: float = 0.0, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        # `_layer` is a plain reference (not a submodule): the wrapper whose base weight we truncated.
        self.__dict__.update(r=r, scaling=scaling, n_drop=n_drop, _layer=None, _released=True,
                             _fresh=None)
        empty = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt, device=device)
        params = self._parameters
        params["lora_A"] = nn.Parameter(empty(r, d_in), requires_grad=False)       # (r, d_in)
        params["lora_B"] = nn.Parameter(empty(d_out, r), requires_grad=False)      # (d_out, r)
        params["lora_diag"] = nn.Parameter(empty(r), requires_grad=False)          # δ (r,)
        # the dropped triplets, frozen, fp32: W = W_world + U diag(S) V
        self._buffers["residual_U"] = empty(d_out, n_drop, dt=torch.float32)
        self._buffers["residual_S"] = empty(n_drop, dt=torch.float32)
        self._buffers["residual_V"] = empty(n_drop, d_in, dt=torch.float32)
        self._modules["dropout"] = nn.Dropout(dropout) if dropout > 0 else None

    # ---- the base-weight surgery ------------------------------------------------------------------
    def residual(self) -> torch.Tensor:
        """U_r diag(σ_r) V_rᵀ: what the truncation took out of the base weight, fp32 (d_out, d_in)."""
        return (self.residual_U * self.residual_S) @ self.residual_V

    @torch.no_grad()
    def truncate(self, layer: AdaptedLayer) -> None:
        """SVD the base weight in fp32, keep the dropped triplets, and write W − U_r Σ_r V_rᵀ
        into the base weight in place."""
        w = layer.weight_out_in()
        if self.n_drop:
            U, S, Vh = torch.linalg.svd(w.float(), full_matrices=False)   # S descending
            self.residual_U.copy_(U[:, -self.n_drop:])
            self.residual_S.copy_(S[-self.n_drop:])
            self.residual_V.copy_(Vh[-self.n_drop:])
            w.copy_((w.float() - self.residual()).to(w.dtype))
        self.__dict__.update(_layer=layer, _released=False)

    @torch.no_grad()
    def restore(self) -> None:
        """Add the dropped triplets back into the base weight (once)."""
        if self._released:
            return
        layer = self._layer
        self.__dict__.update(_released=True, _layer=None)
        if not self.n_drop:
            return
        # and into the copy an exact unmerge of adapters merged here will restore
        for w in (layer.weight_out_in(), kept_weight(layer)):
            if w is not None:
                w.copy_((w.float() + self.residual()).to(w.dtype))

    def loaded(self, layer: AdaptedLayer, path: str) -> None:
        _verify_loaded(self, path)

    def release(self) -> None:
        """Leaving the model. Unmerged (delete_adapter, unload, a failed attach): give the base its
        dropped triplets back. Merged (merge_and_unload): the weight stays W_world + ΔW."""
        layer = self._layer
        if layer is not None and any(layer.deltas[n] is self for n in layer.merged):
            self.__dict__.update(_released=True, _layer=None)
            return
        if layer is not None and not self._released:
            odd = [n for n in layer.merged if layer.deltas[n].algebra != "add"]
            if odd:
                warnings.warn(f"removing a KaSA adapter while the non-additive adapter(s) {odd} are "
                              "merged into the same layer: the original weight is not restored "
                              "exactly; unmerge them first", stacklevel=3)
        self.restore()

    # ---- the update ---------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B diag(δ) A as an fp32 (d_out, d_in) matrix."""
        return (self.lora_B.float() * self.lora_diag.float()) @ self.lora_A.float() * self.scaling

    def contribute(self, layer, x, base_out, out):
        if self.dropout is not None:
            x = self.dropout(x)
        dtype = compute_dtype(self.lora_A.dtype, out.dtype, out.device)
        A, diag, B = cast_at_use(self, (self.lora_A, self.lora_diag, self.lora_B), dtype)   # cached
        if x.dtype != dtype:
            x = x.to(dtype)
        h = F.linear(F.linear(x, A) * diag, B)
        return out + (h * self.scaling).to(out.dtype)

    @torch.no_grad()
    def merge_into(self, layer: AdaptedLayer) -> None:
        w = layer.weight_out_in()
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))

    @torch.no_grad()
    def initialise(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        self.lora_diag.normal_()

    def extra_repr(self) -> str:
        return (f"r={self.r}, scaling={self.scaling:g}, dropped={self.n_drop}, "
                f"A={tuple(self.lora_A.shape)}, B={tuple(self.lora_B.shape)}")


def _check_untied(model, weight: torch.Tensor, path: str) -> None:
    names = [n for n, p in model.model.named_parameters(remove_duplicate=False) if p is weight]
    if len(names) > 1:
        raise ConfigError(f"KaSA truncates the base weight of {path!r} in place, but it is tied to "
                          f"{names[1:]}; exclude {path!r} or untie the weights first")


def _build(site: Site, layer: AdaptedLayer, config: KasaConfig, initialise: bool = True, *,
           model=None) -> KasaDelta:
    others = [n for n, d in layer.deltas.items() if isinstance(d, KasaDelta)]
    if others:
        raise ConfigError(f"{site.path!r} already holds the KaSA adapter {others[0]!r}; a second one "
                          "would truncate the already truncated weight. Delete it first or exclude "
                          "this site")
    if layer.merged:
        raise ConfigError(f"adapter(s) {layer.merged} are merged into {site.path!r}; unmerge them "
                          "before attaching KaSA, which rewrites the base weight")
    d_in, d_out = layer.in_features, layer.out_features
    k = min(d_in, d_out)
    if config.r >= k:
        raise ConfigError(f"KaSA rank r={config.r} must be below min(d_out, d_in)={k} at {site.path!r} "
                          f"({d_out}×{d_in}): the truncation keeps k − r components")
    if model is not None:
        _check_untied(model, layer.base_layer.weight, site.path)
    weight = layer.base_layer.weight
    delta = KasaDelta(d_in, d_out, config.r, dropped_components(d_in, d_out, config.r, config.code_compat),
                      config.scaling, dropout=config.dropout, dtype=adapter_dtype(config, weight.dtype),
                      device=weight.device)
    if initialise:
        delta.initialise()
    delta.truncate(layer)   # last: nothing after it can fail, so no half-built delta holds a truncation
    if not initialise:      # loading: the checkpoint's triplets overwrite these; checked in _loss_terms
        delta.__dict__["_fresh"] = tuple(delta._buffers[n].clone() for n in _RESIDUALS)
    return delta


_RESIDUALS = ("residual_U", "residual_S", "residual_V")


def _verify_loaded(delta: KasaDelta, path: str) -> None:
    """After a checkpoint's tensors were copied in: the triplets it dropped must be those the
    fresh base drops (compared as U diag(σ) Vᵀ, blind to the SVD's sign choices). The fresh ones
    are kept either way, so that removing the adapter restores this base exactly."""
    fresh = delta._fresh
    delta.__dict__["_fresh"] = None
    if fresh is None:
        return
    saved = delta.residual()
    with torch.no_grad():
        for name, t in zip(_RESIDUALS, fresh, strict=True):
            delta._buffers[name].copy_(t)
    if not delta.n_drop:
        return
    ref = delta.residual()
    scale = float(delta._layer.weight_out_in().float().norm()) + float(ref.norm())
    err = float((saved - ref).norm())
    if not err <= 1e-4 * scale:
        raise CheckpointError(
            f"the singular components KaSA drops from {path!r} differ from the checkpoint's "
            f"(relative difference {err / max(float(ref.norm()), 1e-30):.2e}): the adapter was "
            "trained on a different base model (or one whose singular values at the cut are "
            "nearly equal, so the truncation is ill-defined)")


def _loss_terms(am, name: str, config: KasaConfig, parts: dict[str, KasaDelta]) -> list[LossTerm]:
    deltas = list(parts.values())
    norm = 1.0 / len(deltas) if config.normalise_by_layers and deltas else 1.0

    def total(values: list[torch.Tensor]) -> torch.Tensor:
        device = values[0].device
        return sum(v.to(device) for v in values) * norm

    def singular(ctx: LossContext) -> torch.Tensor:
        return total([d.lora_diag.float().pow(2).sum() for d in deltas])

    def orthogonal(ctx: LossContext) -> torch.Tensor:
        return total([orthogonality(d.lora_A, d.lora_B, code_compat=config.code_compat) for d in deltas])

    return [LossTerm(f"kasa.{name}.singular", float(config.beta), singular, adapter=name),
            LossTerm(f"kasa.{name}.orthogonal", float(config.gamma), orthogonal, adapter=name)]


def orthogonality(A: torch.Tensor, B: torch.Tensor, *, code_compat: bool = False) -> torch.Tensor:
    """‖BᵀB − I_r‖_F + ‖AAᵀ − I_r‖_F (the paper), or with `code_compat` the code's
    ‖AᵀA − I_{d_in}‖_F + ‖BBᵀ − I_{d_out}‖_F, computed from the r × r Grams."""
    A, B = A.float(), B.float()
    gram_a, gram_b = A @ A.t(), B.t() @ B          # (r, r)
    if not code_compat:
        eye = torch.eye(A.shape[0], device=A.device)
        return torch.linalg.matrix_norm(gram_b - eye) + torch.linalg.matrix_norm(gram_a - eye)

    def big(gram: torch.Tensor, sq_norm: torch.Tensor, d: int) -> torch.Tensor:
        # ‖MᵀM − I_d‖_F² = ‖MMᵀ‖_F² − 2‖M‖_F² + d; ≥ d − r > 0, so the sqrt is smooth
        return (gram.pow(2).sum() - 2 * sq_norm + d).clamp_min(0).sqrt()

    return big(gram_a, A.pow(2).sum(), A.shape[1]) + big(gram_b, B.pow(2).sum(), B.shape[0])


def _tensor_shapes(layer: AdaptedLayer, site: Site, config: KasaConfig) -> dict[str, tuple[int, ...]]:
    r, d_in, d_out = config.r, layer.in_features, layer.out_features
    n = dropped_components(d_in, d_out, r, config.code_compat)
    return {"lora_A": (r, d_in), "lora_B": (d_out, r), "lora_diag": (r,),
            "residual_U": (d_out, n), "residual_S": (n,), "residual_V": (n, d_in)}


def _describe(config: KasaConfig) -> str:
    parts = [f"r={config.r}", f"alpha={config.alpha:g}", f"beta={config.beta:g}", f"gamma={config.gamma:g}"]
    if config.dropout:
        parts.append(f"dropout={config.dropout:g}")
    if config.normalise_by_layers:
        parts.append("penalties / layers")
    if config.code_compat:
        parts.append("code-compatible")
    return ", ".join(parts)


METHOD = Method(
    name="kasa",
    title="KaSA",
    config_cls=KasaConfig,
    typology=Typology(
        site_roles=("attn.q", "attn.v"),
        form="singular",
        integration="weight-delta",
        intra_connectivity="dense (B·diag(δ)·A)",
        inter_connectivity="fixed (scaled addition of B·diag(δ)·A x to the projection's output)",
        adaptation="reparameterisation (base truncated to rank k−r by SVD)",
        parameter_sharing="none",
        input_type="input of the adapted projection",
        insertion="parallel",
        insertions_per_layer="1 per targeted projection",
        workspace="the targeted projections (attention Q, V by default)",
        param_formula="r·(d_in + d_out + 1) per site (+ as many frozen for the dropped triplets)",
    ),
    layer_kinds=("linear", "conv1d"),
    capabilities=frozenset({Capability.MERGE}),
    build=_build,
    tensor_shapes=_tensor_shapes,
    describe=_describe,
    loss_terms=_loss_terms,
)
