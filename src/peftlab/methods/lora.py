"""LoRA (Hu et al., 2021) with rsLoRA scaling, DoRA and PiSSA initialisation.

ΔW = s · B A with A ∈ R^{r×d_in}, B ∈ R^{d_out×r}; s = α/r (α/√r with rsLoRA).
DoRA (Liu et al., 2024) rescales each output row of W + ΔW to a learned magnitude m.
PiSSA (Meng et al., 2024) starts A, B at the top-r singular triplets of W. Instead of rewriting
the base weight to its residual, the delta carries the frozen initial factors (A0, B0) and adds
s · (B A − B0 A0): the base stays untouched, so disable, unmerge and peft export are exact, and
training sees the same gradients as PiSSA's residual form.

peft format (LORA): `to_peft` / `from_peft` at the end of this file; BA-LoRA exports through them.
Parameter sites (MoE experts, Mamba's A_log; peft's target_parameters): methods/_lora_params.py.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import CapabilityError, CheckpointError, ConfigError
from ..core.geometry import dims
from ..core.layer import AdaptedLayer, Delta
from ..core.method import (
    Capability,
    Method,
    MethodConfig,
    check_number,
    check_pattern_keys,
    check_positive_int,
    matches_path,
)
from ..core.model import AdaptedModel, Adapter
from ..core.precision import adapter_dtype, cast_at_use, compute_dtype
from ..core.sites import Site, iter_modules, match_targets, sites_at
from ..core.typology import Typology
from ..interop.peft_names import CONFIG_FILE, PREFIX, TENSORS_FILE
from . import _lora_decode as _decode
from . import _lora_params as lora_params
from ._conv import build_conv_lora, check_peft_conv, conv_lora_shapes
from ._lora_mixed import MixedLowRank
from ._lora_recompute import rebuilt_down
from ._row_slices import SlicedLowRank, refuse_on_slices, slice_pattern_value

INITS = ("zero", "gaussian", "random", "pissa")


@dataclass
class LoraConfig(MethodConfig):
    """LoRA, rsLoRA and DoRA on Linear, GPT-2 Conv1D, Embedding and torch convolution sites
    (nn.Conv1d/2d/3d as peft's conv LoRA: methods/_conv.py).

    `init`: "zero" (B = 0, the default: a new adapter is a no-op), "gaussian" (A ~ N(0, 1/r),
    B = 0), "random" (A and B both random: a non-zero delta, for tests and composition) or
    "pissa" (principal singular vectors of W). `rank_pattern` / `alpha_pattern` map a role or a
    module-path regex to a per-site rank / alpha.
    """

    targets: str | list[str] = field(default_factory=lambda: ["attn.q", "attn.v"])
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    init: str = "zero"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        check_positive_int("LoRA rank r", self.r)
        check_number("LoRA alpha", self.alpha, low=0, low_open=True, hint=" (the usual choice is r or 2·r)")
        check_number("LoRA dropout", self.dropout, low=0, high=1, high_open=True)
        if self.init not in INITS:
            raise ConfigError(f"LoRA init {self.init!r} is unknown; choose one of {INITS}")
        for name in ("rank_pattern", "alpha_pattern"):
            patterns = getattr(self, name)
            if not isinstance(patterns, dict):
                raise ConfigError(f"LoraConfig.{name} must be a dict from roles or module-path regexes "
                                  f"to values, got {patterns!r}")
            check_pattern_keys(f"LoraConfig.{name}", patterns)
        for key, value in self.rank_pattern.items():
            check_positive_int(f"LoraConfig.rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            check_number(f"LoraConfig.alpha_pattern[{key!r}]", value, low=0, low_open=True)

    def rank_for(self, site: Site) -> int:
        return slice_pattern_value(self.rank_pattern, site, "LoraConfig.rank_pattern") or self.r

    def rank_at(self, layer: AdaptedLayer, site: Site, sizes: tuple[int, int] | None = None) -> int:
        """The site's rank, checked against the layer before anything is allocated. ΔW's rank is
        at most min(d_in, d_out); a larger r adds parameters, not expressiveness. peft allows it,
        so does peftlab up to max(d_in, d_out): beyond, each factor outgrows the weight, which is
        never useful (r=10**12 would try to allocate terabytes). PiSSA: r ≤ min(d_in, d_out)."""
        r = self.rank_for(site)
        d_in, d_out = sizes or (layer.in_features, layer.out_features)   # (d_in, d_out) if known
        field_name = "rank_pattern" if slice_pattern_value(self.rank_pattern, site, "LoraConfig.rank_pattern") else "r"
        if r > max(d_in, d_out):
            raise ConfigError(
                f"LoRA rank {field_name}={r} at {site.path!r} ({d_out}×{d_in}) exceeds max(d_in, d_out)="
                f"{max(d_in, d_out)}; ΔW's rank is at most min(d_in, d_out)={min(d_in, d_out)}, so "
                "lower r (or give this site its own rank with rank_pattern)")
        if self.init == "pissa" and r > min(d_in, d_out):
            raise ConfigError(
                f"LoRA rank {field_name}={r} with init='pissa' at {site.path!r} ({d_out}×{d_in}): PiSSA "
                f"starts from the top-r singular triplets and the weight has only min(d_in, d_out)="
                f"{min(d_in, d_out)}; lower r or exclude this site")
        return r

    def scaling_for(self, site: Site) -> float:
        r = self.rank_for(site)
        alpha = slice_pattern_value(self.alpha_pattern, site, "LoraConfig.alpha_pattern") or self.alpha
        return alpha / math.sqrt(r) if self.rslora else alpha / r


class LowRankDelta(Delta):
    """s · B A (minus the frozen PiSSA start s · B0 A0), optionally DoRA-normalised.

    The factors are stored in the adapter's dtype (fp32 on a half-precision base) and the rank-r
    products run in `compute_dtype` (the activations' precision; fp32 on a CPU without native
    half GEMMs); casts of A and B are cached between weight updates, so inference pays them once.
    Inference on a few rows of half activations on a CPU (decode) takes the fast path of
    methods/_lora_decode.py: the same sums with fewer, cheaper ops (its products in fp32 there,
    so closer to the exact result than bf16 ones); `_reference` is the definition.
    """

    mixed = MixedLowRank

    def __init__(self, d_in: int, d_out: int, r: int, scaling: float, *, dropout: float = 0.0,
                 embedding: bool = False, padding_idx: int | None = None, dora: bool = False,
                 pissa: bool = False, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        # Plain attributes and registrations go straight into the module's dicts: adding an
        # adapter builds hundreds of deltas, and nn.Module.__setattr__ costs microseconds each.
        self.__dict__.update(r=r, scaling=scaling, embedding=embedding, padding_idx=padding_idx,
                             dora=dora, pissa=pissa, _cast=(), algebra="none" if dora else "add")
        empty = lambda *shape: torch.empty(*shape, dtype=dtype, device=device)
        params = self._parameters
        params["lora_A"] = nn.Parameter(empty(r, d_in), requires_grad=False)       # (r, d_in)
        params["lora_B"] = nn.Parameter(empty(d_out, r), requires_grad=False)      # (d_out, r)
        params["magnitude"] = nn.Parameter(empty(d_out), requires_grad=False) if dora else None
        self._buffers["pissa_A0"] = empty(r, d_in) if pissa else None              # frozen start
        self._buffers["pissa_B0"] = empty(d_out, r) if pissa else None
        self._modules["dropout"] = nn.Dropout(dropout) if dropout > 0 else None

    def initialise(self, layer: AdaptedLayer, init: str) -> None:
        A, B = self.lora_A, self.lora_B
        with torch.no_grad():
            if init == "pissa":
                self._init_pissa(layer.weight_out_in())
            elif self.embedding and init != "random":
                A.zero_()    # as peft: for embeddings A = 0 and B ~ N(0, 1)
                B.normal_()
            else:
                if init == "gaussian":
                    A.normal_(std=1.0 / self.r)
                else:   # nn.Linear's default (kaiming_uniform_ with a=√5): U(±1/√fan_in)
                    A.uniform_(-1 / math.sqrt(A.shape[1]), 1 / math.sqrt(A.shape[1]))
                if init == "random":
                    B.uniform_(-1 / math.sqrt(self.r), 1 / math.sqrt(self.r))
                else:
                    B.zero_()
            if self.magnitude is not None:
                w = layer.weight_out_in().float()
                if init == "random" or self.pissa:   # B ≠ 0; otherwise ΔW = 0: no d_out×d_in product
                    w = w + self.delta_weight()
                self.magnitude.copy_(torch.linalg.norm(w, dim=1))

    def _init_pissa(self, weight: torch.Tensor) -> None:
        U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
        root = (S[: self.r] / self.scaling).sqrt()       # s · B A = U_r S_r Vh_r
        self.lora_A.copy_(root[:, None] * Vh[: self.r])
        self.lora_B.copy_(U[:, : self.r] * root[None, :])
        self.pissa_A0.copy_(self.lora_A)
        self.pissa_B0.copy_(self.lora_B)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) with s · B A = ΔW (before DoRA's normalisation), in the weights' dtype and with
        their gradients: (d_out, r) and (r, d_in), or with PiSSA's frozen start folded in as
        extra ranks, s·(B A − B0 A0) = s·[B, −B0] [A; A0]: (d_out, 2r) and (2r, d_in)."""
        if self.pissa:
            return (torch.cat([self.lora_B, -self.pissa_B0], dim=1),
                    torch.cat([self.lora_A, self.pissa_A0]))
        return self.lora_B, self.lora_A

    @torch.no_grad()
    def keep_ranks(self, index: torch.Tensor) -> None:
        """Keep only the rank units `index` (rows of A, columns of B, and of PiSSA's frozen
        start), in place; `r` follows and the scaling stays. Changed factors become new
        Parameters with the same requires_grad (an optimiser built before must be rebuilt)."""
        self._keep(rank=index)

    @torch.no_grad()
    def slice_features(self, in_index: torch.Tensor | None = None,
                       out_index: torch.Tensor | None = None) -> None:
        """Keep only these input features (columns of A and A0; an embedding's vocabulary entries)
        and output features (rows of B and B0, entries of DoRA's magnitude), in place: the delta's
        side of structurally pruning the layer it is on. None keeps every feature of that side."""
        self._keep(in_index=in_index, out_index=out_index)

    def _keep(self, *, rank: torch.Tensor | None = None, in_index: torch.Tensor | None = None,
              out_index: torch.Tensor | None = None) -> None:
        def take(t: torch.Tensor, dim: int, index: torch.Tensor | None) -> torch.Tensor:
            return t if index is None else t.index_select(dim, index.to(t.device))

        params, buffers = self._parameters, self._buffers
        new = {"lora_A": take(take(params["lora_A"], 0, rank), 1, in_index),      # (r', d_in')
               "lora_B": take(take(params["lora_B"], 1, rank), 0, out_index)}     # (d_out', r')
        if params["magnitude"] is not None:
            new["magnitude"] = take(params["magnitude"], 0, out_index)
        for name, value in new.items():
            old = params[name]
            if value is not old:
                params[name] = nn.Parameter(value, requires_grad=old.requires_grad)
        if self.pissa:
            buffers["pissa_A0"] = take(take(buffers["pissa_A0"], 0, rank), 1, in_index)
            buffers["pissa_B0"] = take(take(buffers["pissa_B0"], 1, rank), 0, out_index)
        # plain __dict__ writes, as __init__; the cast caches are keyed on the old tensors
        self.__dict__.update(r=params["lora_A"].shape[0], _cast=(), _cast_dora=(), _decode=None)

    def delta_weight(self) -> torch.Tensor:
        """ΔW as an fp32 (d_out, d_in) matrix."""
        dw = self.lora_B.float() @ self.lora_A.float()
        if self.pissa:
            dw -= self.pissa_B0.float() @ self.pissa_A0.float()
        return dw * self.scaling

    def _factors(self, activation: torch.dtype, device: torch.device) -> tuple[torch.dtype, list[torch.Tensor]]:
        """The compute dtype and [A, Bᵀ(, A0, B0ᵀ)] in it, Bᵀ contiguous (addmm on a contiguous
        (r, d_out) matrix is ~2× faster on CPU than on a transposed view). Without gradients to
        the factors the results are cached (`cast_at_use`), so an update or a device move
        invalidates them."""
        p, b = self._parameters, self._buffers
        raw = [p["lora_A"], p["lora_B"]] + ([b["pissa_A0"], b["pissa_B0"]] if self.pissa else [])
        dtype = compute_dtype(raw[0].dtype, activation, device)
        return dtype, cast_at_use(self, raw, dtype, self._prepare)

    @staticmethod
    def _prepare(raw: list[torch.Tensor], dtype: torch.dtype, cached: bool) -> list[torch.Tensor]:
        # training (not cached): no contiguous copy of Bᵀ, which would cost a copy forward and backward
        return [t.to(dtype) if i % 2 == 0 else t.to(dtype).t().contiguous() if cached else t.to(dtype).t()
                for i, t in enumerate(raw)]

    def _down(self, x: torch.Tensor, A: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x (..., d_in) or token ids (...) -> (..., r), in `dtype`. While A trains, x is not kept
        for its gradient but rebuilt in backward where it can be (methods/_lora_recompute.py)."""
        if self.embedding:
            return F.embedding(x, A.t(), self.padding_idx)
        h = rebuilt_down(x, A) if x.grad_fn is not None else None
        return h if h is not None else F.linear(x if x.dtype == dtype else x.to(dtype), A)

    def contribute(self, layer, x, base_out, out):
        # inference: the fused fast path (methods/_lora_decode.py), where it applies
        if _decode.ENABLED and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            fast = _decode.contribute(self, x, out)
            if fast is not None:
                return fast
        return self._reference(layer, x, base_out, out)

    def _reference(self, layer, x, base_out, out):
        """The definition (and the path of training and torch.compile)."""
        if self.dora:
            return self._contribute_dora(layer, x, base_out, out)
        undropped = x
        if self.dropout is not None:
            x = self.dropout(x)
        dtype, f = self._factors(out.dtype, out.device)
        # out + s·(B A x − B0 A0 x) as addmm on the flattened output: no temporary for s·B h.
        flat = out.reshape(-1, out.shape[-1])            # a view: base outputs are contiguous
        acc = flat if flat.dtype == dtype else flat.to(dtype)
        acc = torch.addmm(acc, self._down(x, f[0], dtype).reshape(-1, self.r), f[1], alpha=self.scaling)
        if self.pissa:
            # PiSSA's model is W_res x + s·B A·drop(x), W_res = W − s·B0 A0: the frozen start belongs
            # to the residual weight, which sees the undropped input (in eval the two are one tensor)
            acc = torch.addmm(acc, self._down(undropped, f[2], dtype).reshape(-1, self.r), f[3],
                              alpha=-self.scaling)
        return acc.view(out.shape) if acc.dtype == out.dtype else acc.to(out.dtype).view(out.shape)

    def _contribute_dora(self, layer, x, base_out, out):
        # DoRA: y = m / ||W + ΔW||_row ⊙ (W + ΔW) x, written as a correction on top of the base
        # output, as peft does.
        dtype, f = self._factors(out.dtype, out.device)
        if x.dtype != dtype:
            x = x.to(dtype)
        mag_scale = self._row_scale(layer, dtype)                    # (d_out,)
        undropped = x
        if self.dropout is not None and self.training:
            x = self.dropout(x)
            base_no_bias = F.linear(x, layer.weight_out_in().to(dtype))
        else:
            bias = layer.base_layer.bias
            base_no_bias = (base_out - bias if bias is not None else base_out).to(dtype)
        lora_out = self._down(x, f[0], dtype) @ f[1]
        if self.pissa:
            lora_out = lora_out - self._down(x, f[2], dtype) @ f[3]
        y = out.to(dtype) + (mag_scale - 1) * base_no_bias + mag_scale * lora_out * self.scaling
        if self.pissa and x is not undropped:
            # PiSSA's base is W_res = W − s·B0 A0 on the undropped input: y above holds
            # −s·B0 A0·drop(x) where W_res x needs −s·B0 A0·x (the (scale − 1)·W_res·drop(x) part is right)
            y = y + self.scaling * (self._down(x, f[2], dtype) - self._down(undropped, f[2], dtype)) @ f[3]
        return y if y.dtype == out.dtype else y.to(out.dtype)

    def _row_scale(self, layer: AdaptedLayer, dtype: torch.dtype) -> torch.Tensor:
        """DoRA's m / ‖W + ΔW‖ per output row in `dtype`. The norm is a constant for the gradient
        (DoRA §4.3) and taken in fp32 (in bf16, W + ΔW loses most of what ΔW adds); without
        gradients to the adapter it is cached until W, A, B or m change. The cache is keyed on the
        stored weight, so a quantised base is dequantised when the scale is made, not on every
        inference forward, and no dense copy of it is kept."""
        def prepare(raw: list[torch.Tensor], dtype: torch.dtype, cached: bool) -> list[torch.Tensor]:
            norm = torch.linalg.norm(layer.weight_out_in().float() + self.delta_weight().detach(), dim=1)
            return [(raw[0].float() / norm).to(dtype)]
        p, b = self._parameters, self._buffers
        raw = [p["magnitude"], layer.base_layer.weight, p["lora_A"], p["lora_B"]]
        if self.pissa:
            raw += [b["pissa_A0"], b["pissa_B0"]]
        return cast_at_use(self, raw, dtype, prepare, slot="_cast_dora")[0]

    @torch.no_grad()
    def merge_into(self, layer: AdaptedLayer) -> None:
        w = layer.weight_out_in()
        merged = w.float() + self.delta_weight()
        if self.magnitude is not None:    # DoRA: rows rescaled to m / ‖W + ΔW‖
            merged *= (self.magnitude.float() / torch.linalg.norm(merged, dim=1))[:, None]
        w.copy_(merged.to(w.dtype))


class SlicedLowRankDelta(SlicedLowRank, LowRankDelta):
    """LoRA on slices of a fused projection's output rows (methods/_row_slices.py): A (k·r, d_in)
    and B (n_rows, r), one rank-r block per slice."""

    def __init__(self, site: Site, d_in: int, d_out: int, r: int, scaling: float, *, dropout: float,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(d_in, d_out, r, scaling, dropout=dropout, dtype=dtype, device=device)
        self.hold_slices(site, d_in, d_out, dtype, device)


def _build(site: Site, layer: AdaptedLayer, config: LoraConfig, initialise: bool = True) -> Delta:
    if site.params:     # a parameter site: methods/_lora_params.py
        return lora_params.build(site, config, initialise)
    if layer.kind == "conv":
        return build_conv_lora(site, layer, config, initialise)
    if site.slices:
        if config.dora or config.init == "pissa":
            refuse_on_slices("DoRA" if config.dora else "PiSSA initialisation", site)
        weight = layer.base_layer.weight
        delta = SlicedLowRankDelta(site, layer.in_features, layer.out_features, config.rank_at(layer, site),
                                   config.scaling_for(site), dropout=config.dropout,
                                   dtype=adapter_dtype(config, weight.dtype), device=weight.device)
        if initialise:
            delta.initialise(layer, config.init)
        return delta
    embedding = layer.kind == "embedding"
    if config.dora and embedding:
        raise ConfigError(f"DoRA is not supported on the Embedding site {site.path!r}; "
                          "exclude it (exclude=[...]) or set dora=False")
    weight = layer.base_layer.weight
    d_in, d_out = dims(layer.base_layer)      # once: each read walks the layer's geometry
    delta = LowRankDelta(
        d_in, d_out, config.rank_at(layer, site, (d_in, d_out)), config.scaling_for(site),
        dropout=0.0 if embedding else config.dropout, embedding=embedding,
        padding_idx=layer.base_layer.padding_idx if embedding else None,
        dora=config.dora, pissa=config.init == "pissa", dtype=adapter_dtype(config, weight.dtype),
        device=weight.device)
    if initialise:
        delta.initialise(layer, config.init)
    return delta


def _tensor_shapes(layer: AdaptedLayer, site: Site, config: LoraConfig) -> dict[str, tuple[int, ...]]:
    if site.params:
        return lora_params.tensor_shapes(site, config)
    r, d_in, d_out = config.rank_at(layer, site), layer.in_features, layer.out_features
    if layer.kind == "conv":
        return conv_lora_shapes(layer, r, config.dora)
    if site.slices:        # one rank-r block per slice, B over the slices' rows
        return {"lora_A": (len(site.slices) * r, d_in), "lora_B": (len(site.rows), r)}
    shapes = {"lora_A": (r, d_in), "lora_B": (d_out, r)}
    if config.dora:
        shapes["magnitude"] = (d_out,)
    if config.init == "pissa":
        shapes |= {"pissa_A0": (r, d_in), "pissa_B0": (d_out, r)}
    return shapes


def _describe(config: LoraConfig) -> str:
    parts = [f"r={config.r}", f"alpha={config.alpha:g}"]
    parts += [name for name, on in (("rsLoRA", config.rslora), ("DoRA", config.dora)) if on]
    if config.init != "zero":
        parts.append(f"init={config.init}")
    if config.rank_pattern or config.alpha_pattern:
        parts.append("per-site rank/alpha")
    return ", ".join(parts)


# ---- peft format ---------------------------------------------------------------------------------
# peft tensor name per (our tensor name, site kind); embeddings keep bare parameters in peft.
PEFT_TENSOR_NAMES = {
    ("lora_A", "linear"): "lora_A.weight", ("lora_B", "linear"): "lora_B.weight",
    ("lora_A", "embedding"): "lora_embedding_A", ("lora_B", "embedding"): "lora_embedding_B",
    ("magnitude", "linear"): "lora_magnitude_vector",
}
_FROM_PEFT_NAMES = {peft: ours for (ours, _), peft in PEFT_TENSOR_NAMES.items()}
# peft's init_lora_weights per our init (PiSSA is written as its plain factors: see to_peft)
PEFT_INIT = {"zero": True, "gaussian": "gaussian", "random": False, "pissa": True}
_BASE_WEIGHT = ".base_layer.weight"


def to_peft(am: AdaptedModel, adapter: Adapter) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """LoRA's peft config fields and tensors (full peft keys). A PiSSA adapter is written as the
    rank-2r LoRA s·[B, −B0]·[A; A0] (`LowRankDelta.factors`), which equals its delta on the
    untouched base weight, so peft needs no residual model; every site keeps its scaling s at the
    exported rank through rank_pattern / alpha_pattern."""
    name, config = adapter.name, adapter.config
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    wrapped = {s.path: len(s.params) for s in adapter.sites if s.params}   # peft nests a wrapper each
    for site in adapter.sites:
        layer = adapter.layers[site.path]
        delta = layer.deltas[name]
        if site.params:     # peft's target_parameters (methods/_lora_params.py)
            found, ranks, alphas = lora_params.to_peft(site, delta, PREFIX, wrapped, config.rslora)
            tensors.update(found)
            rank_pattern |= {re.escape(p): r for p, r in ranks.items() if r != config.r}
            alpha_pattern |= {re.escape(p): a for p, a in alphas.items()
                              if not math.isclose(a, config.alpha, rel_tol=1e-12)}
            continue
        kind = "embedding" if layer.kind == "embedding" else "linear"
        B, A = (t.detach() for t in delta.factors())
        if layer.kind == "conv":     # peft's conv shapes: A (r, in, *kernel), B (out, r, 1, ...)
            check_peft_conv(layer.base_layer, site.path)
            B, A = delta.lora_B.detach(), delta.lora_A.detach()
        r = A.shape[0]
        # Keep the site's scaling s at the exported rank: α' = s·r' (rsLoRA: s·√r').
        alpha = delta.scaling * (math.sqrt(r) if config.rslora else r)
        if r != config.r:
            rank_pattern[re.escape(site.path)] = r
        if not math.isclose(alpha, config.alpha, rel_tol=1e-12):
            alpha_pattern[re.escape(site.path)] = alpha
        ours = {"lora_A": A, "lora_B": B}
        if delta.magnitude is not None:
            ours["magnitude"] = delta.magnitude.detach()
        for tname, t in ours.items():
            tensors[f"{PREFIX}{lora_params.wrapped_path(site.path, wrapped)}.{PEFT_TENSOR_NAMES[(tname, kind)]}"] = t
    kinds = {layer.kind for layer in adapter.layers.values()}
    fields = {
        "r": config.r,
        "lora_alpha": config.alpha,
        "target_modules": [s.path for s in adapter.sites if not s.params],
        **({"target_parameters": [f"{s.path}.{n}" for s in adapter.sites for n in s.params]}
           if wrapped else {}),
        "lora_dropout": config.dropout,
        "fan_in_fan_out": "conv1d" in kinds,
        "bias": "none",
        "use_rslora": config.rslora,
        "use_dora": config.dora,
        "modules_to_save": list(adapter.copies) or None,
        "init_lora_weights": PEFT_INIT[config.init],
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }
    return fields, tensors


def from_peft(am: AdaptedModel, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], directory: Path
              ) -> tuple[LoraConfig, list[Site], dict[tuple[str, str], torch.Tensor]]:
    """A LoRA config, its sites and tensors from a peft LORA directory; tensors of
    `modules_to_save` copies come back keyed by the copied module's path."""
    if cfg.get("bias", "none") != "none":
        raise CapabilityError(f"{directory}: LoRA with bias={cfg['bias']!r} is not supported")
    if "r" not in cfg:
        raise CheckpointError(f"{CONFIG_FILE} has no 'r' (the LoRA rank)")
    # peft adds 'classifier' and 'score' for SEQ_CLS whether or not they exist: skip misses.
    found = match_targets(am.model, cfg.get("modules_to_save") or [])
    copy_sites = sites_at(am.model, sorted(set().union(set(), *found.values())))
    copy_paths = sorted({s.path for s in copy_sites}, key=len, reverse=True)   # innermost first
    lora: dict[tuple[str, str], torch.Tensor] = {}
    copies: dict[tuple[str, str], torch.Tensor] = {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise CheckpointError(f"tensor {key!r} of {TENSORS_FILE} lacks the {PREFIX!r} prefix of "
                                  "peft's format")
        rest = key[len(PREFIX):]
        if rest.endswith(_BASE_WEIGHT):
            _check_unchanged_base(am, rest[: -len(_BASE_WEIGHT)], t)
            continue
        owner = next((p for p in copy_paths if rest.startswith(p + ".")), None)
        if owner is not None:
            copies[(owner, rest[len(owner) + 1:])] = t
            continue
        peft_name = next((n for n in _FROM_PEFT_NAMES if rest.endswith("." + n)), None)
        if peft_name is None:
            raise CheckpointError(f"tensor {key!r} of {TENSORS_FILE} is neither a LoRA tensor nor "
                                  "part of modules_to_save")
        lora[(rest[: -len(peft_name) - 1], _FROM_PEFT_NAMES[peft_name])] = t
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    peft_alphas = cfg.get("alpha_pattern") or {}
    rank_pattern, alpha_pattern, params = {}, {}, []
    if cfg.get("target_parameters"):     # peft's ParamWrapper keys: methods/_lora_params.py
        lora, params, rank_pattern, alpha_pattern = lora_params.import_peft(
            am.model, dict(iter_modules(am.model)), cfg["target_parameters"], lora, r, alpha, peft_alphas)
    held = {p.rpartition(".")[0] for p in params}
    paths = [p for p in dict.fromkeys(p for p, _ in lora) if p not in held]
    for path in paths:
        site_r = lora[(path, "lora_A")].shape[0]
        site_alpha = next((v for k, v in peft_alphas.items() if matches_path(k, path)), None) or alpha
        if site_r != r:
            rank_pattern[re.escape(path)] = site_r
        if site_alpha != alpha:
            alpha_pattern[re.escape(path)] = float(site_alpha)
    config = LoraConfig(targets=paths + params, r=r, alpha=alpha, dropout=float(cfg.get("lora_dropout", 0.0)),
                        rslora=bool(cfg.get("use_rslora", False)), dora=bool(cfg.get("use_dora", False)),
                        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                        modules_to_save=[s.path for s in copy_sites] or None)
    sites = sites_at(am.model, paths + params, am.site_roles())
    for site in sites:      # peft's A ignores a conv's dilation and padding mode: not ours there
        check_peft_conv(site.module, site.path)
    return config, sites, {**lora, **copies}


def _check_unchanged_base(am: AdaptedModel, path: str, weight: torch.Tensor) -> None:
    """peft saves an adapted embedding's base weight too (in case the vocabulary was resized).
    We import it only as a check: it must equal this model's weight."""
    try:
        base = am.model.get_submodule(path)
    except AttributeError:
        raise CheckpointError(f"the adapter carries a base weight for {path!r}, which this model "
                              "does not have") from None
    current = getattr(base, "weight", None)
    if current is None or current.shape != weight.shape or not torch.equal(current, weight.to(current.dtype)):
        raise CheckpointError(f"the adapter carries a modified base weight for {path!r} (a resized or "
                              "retrained embedding); peftlab imports only LoRA deltas. Load the "
                              "matching base model, or save from peft with save_embedding_layers=False")


METHOD = Method(
    name="lora",
    title="LoRA",
    config_cls=LoraConfig,
    typology=Typology(
        site_roles=("attn.q", "attn.v"),
        form="lowrank",
        integration="weight-delta",
        intra_connectivity="dense (low-rank B·A)",
        inter_connectivity="fixed (scaled addition s·B A x to the projection's output)",
        adaptation="reparameterisation",
        parameter_sharing="none",
        input_type="input of the adapted projection",
        insertion="parallel",
        insertions_per_layer="1 per targeted projection",
        workspace="the targeted projections (attention Q, V by default)",
        param_formula="r·(d_in + d_out) per site (+ d_out with DoRA)",
    ),
    layer_kinds=("linear", "conv1d", "embedding", "conv"),
    capabilities=frozenset({Capability.MERGE, Capability.MIXED_BATCH, Capability.TRAIN_IN_MIXED_BATCH,
                            Capability.QUANTISED_BASE, Capability.PARAMETER_SITE, Capability.FUSED_SLICE}),
    composition="lowrank",
    build=_build,
    tensor_shapes=_tensor_shapes,
    describe=_describe,
    peft_type="LORA",
    to_peft=to_peft,
    from_peft=from_peft,
)
