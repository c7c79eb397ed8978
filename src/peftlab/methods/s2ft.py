"""S2FT: structured sparse fine-tuning (Yang et al., NeurIPS 2024; shared/specs/seed-methods.md §9).

"Select sparsely, compute densely": a few attention heads and FFN channels are chosen from a
budget over the whole model, and only the weight slices coupled to them are trained.

Coupled structures (one *unit* = what a ratio counts):

* ``v_ratio`` — a unit is a **key/value head** k of a block: the ``head_dim`` output rows
  ``[k·d_h, (k+1)·d_h)`` of ``W_v``. Under GQA a kv head is read by the ``n_q / n_kv`` query
  heads ``{j : j // (n_q / n_kv) == k}``; the pool holds ``n_kv`` units per block.
* ``o_ratio`` — a unit is a **query head** j of a block: the ``d_h`` input columns
  ``[j·d_h, (j+1)·d_h)`` of ``W_o`` (head j's slot of the concatenated attention output, which
  carries the values of kv head ``j // (n_q / n_kv)``); the pool holds ``n_q`` units per block.
* ``u_ratio`` — a unit is an **FFN channel** c: row c of ``W_up`` *and* row c of ``W_gate``
  (gated FFNs; the channel's two input projections are selected together).
* ``d_ratio`` — a unit is an FFN channel c: column c of ``W_down``.

V and O (and up/gate and down) are drawn independently, each from its own pool, as the
reference code does; a head selected by both gets its V rows *and* its O columns. Without GQA
(BERT, n_kv = n_q) both pools hold the same heads. Fused-QKV models (GPT-2) support the FFN
ratios only.

Selection: each pool spans every block the config's targets reach. ``round(ratio · |pool|)``
units (at least one when the ratio is > 0) are drawn from the pool as a whole and then bucketed
by block, so per-block counts vary. ``selection`` is "random" (uniform, seeded by ``seed``, the
released default), "weight" (the units with the largest weight-slice norms; up+gate rows combine
as √(‖up_c‖² + ‖gate_c‖²)) or "gradient" (largest norms of the loss gradient on those slices:
compute them with `select_by_gradient(am, config, batches)`, which fills ``config.selected``).

The result of the selection is written into ``config.selected`` (site path -> the selected rows
of a V/up/gate weight or columns of an O/down weight) the first time the adapter is built, and
also kept in every delta's ``index`` buffer. A config whose ``selected`` is set is reused as it
is (a saved adapter loads with the same slices; reusing the config object for a second adapter
reuses its selection: set ``selected=None`` for a fresh draw).

Trainable parameterisation (§9.4), both zero-initialised, so a new adapter is a no-op:

* column type (V, up, gate): ``S ∈ R^{n_sel×d_in}``,   ``y = W x;  y[..., sel] += S x``;
* row type (O, down):        ``S ∈ R^{d_out×n_sel}``,  ``y = W x + S x[..., sel]``.

Partial backpropagation (§9.5): each type runs through its own `torch.autograd.Function` that
computes only ∇S (column: ``g[sel]ᵀ x``, row: ``gᵀ x[sel]``) and the S path's ∇x, and saves only
what those need: ``x`` for the column type, ``x[..., sel]`` (n_sel columns) for the row type.
The frozen base layer's ∇x flows through autograd as usual.

Fuse / unfuse are merge / unmerge (algebra "add": S2FT commutes with LoRA and other additive
deltas): only the selected rows or columns of the weight change. Serving (§9.6): each update is
the LoRA-shaped ``E_sel·S`` or ``S·E_selᵀ``; `s2ft_to_lora` adds an equivalent ordinary LoRA
adapter (rank n_sel, s = 1) that can be saved, exported to peft and merged like any LoRA.

Co-permutation (§9.3) is not implemented: indices are gathered and scattered in place, which
keeps merging into the unpermuted checkpoint trivial (the spec's "library note").
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.errors import AdapterError, CapabilityError, ConfigError
from ..core.geometry import attention_heads, dims, unwrap, weight_axes, weight_out_in
from ..core.layer import AdaptedLayer, Delta
from ..core.method import Capability, Method, MethodConfig, check_number
from ..core.precision import adapter_dtype, cast_one, compute_dtype
from ..core.quantised import quantisation
from ..core.sites import Site, resolve_sites
from ..core.typology import Typology
from .lora import LoraConfig

SELECTIONS = ("random", "weight", "gradient")
# site role -> (unit kind, delta type). Column type: selected output rows; row type: selected
# input columns.
ROLE_KIND = {"attn.v": ("v", "column"), "attn.o": ("o", "row"), "ffn.up": ("u", "column"),
             "ffn.gate": ("u", "column"), "ffn.down": ("d", "row")}
KINDS = ("v", "o", "u", "d")
_RATIO_FIELD = {"v": "v_ratio", "o": "o_ratio", "u": "u_ratio", "d": "d_ratio"}


@dataclass
class S2FTConfig(MethodConfig):
    """S2FT on the V / O projections and the FFN projections (see the module docstring).

    `v_ratio`, `o_ratio`: fractions of all kv heads (V rows) / query heads (O columns) of the
    targeted blocks; `u_ratio`, `d_ratio`: fractions of all FFN channels (up+gate rows / down
    columns). The default is the LLaMA-3 setting of the paper (`d_ratio = 0.03`, the rest 0).
    `targets` is derived from the ratios when not given (and, for `u_ratio` without `d_ratio`,
    `exclude` gains "ffn.down", so models with and without a gate projection both resolve);
    `layers` and `exclude` narrow the pool as for any method.
    `selected`: computed at add time (site path -> selected row/column indices); set it to
    impose a selection.
    """

    targets: str | list[str] = field(default_factory=list)
    v_ratio: float = 0.0
    o_ratio: float = 0.0
    u_ratio: float = 0.0
    d_ratio: float = 0.03
    selection: str = "random"
    seed: int = 0
    selected: dict[str, list[int]] | None = None

    def __post_init__(self) -> None:
        if not self.targets:
            targets: list[str] = []
            if self.v_ratio > 0:
                targets.append("attn.v")
            if self.o_ratio > 0:
                targets.append("attn.o")
            if self.u_ratio > 0:
                # the "ffn" group holds up, gate (where the model has one) and down
                targets.append("ffn")
                if not self.d_ratio > 0:
                    excl = [self.exclude] if isinstance(self.exclude, str) else list(self.exclude or [])
                    if "ffn.down" not in excl:
                        self.exclude = excl + ["ffn.down"]
            elif self.d_ratio > 0:
                targets.append("ffn.down")
            self.targets = targets

    def validate(self) -> None:
        for kind in KINDS:
            name = _RATIO_FIELD[kind]
            check_number(f"S2FTConfig.{name} (a fraction)", getattr(self, name), low=0, high=1)
        if self.selected is None and not any(getattr(self, _RATIO_FIELD[k]) > 0 for k in KINDS):
            raise ConfigError("S2FTConfig selects nothing: set at least one of v_ratio, o_ratio, "
                              "u_ratio, d_ratio > 0 (the paper's LLaMA-3 setting is d_ratio=0.03)")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"S2FT selection {self.selection!r} is unknown; choose one of {SELECTIONS}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"S2FTConfig.seed must be an integer, got {self.seed!r}")
        if self.selected is not None:
            if not isinstance(self.selected, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, (list, tuple))
                    and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)
                    for k, v in self.selected.items()):
                raise ConfigError("S2FTConfig.selected must map site paths to lists of non-negative "
                                  "row/column indices")
        super().validate()


# ---- the pool of units ------------------------------------------------------------------------------
def _block_key(path: str) -> str:
    """The transformer block a site belongs to: its path up to the first all-digit component
    (e.g. 'model.layers.3'); the parent module for paths without one."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1])


@dataclass
class _Group:
    """One block's part of one pool: `n_units` units of `width` rows/columns each, and the
    sites (with their delta type) whose slices a selected unit trains."""

    block: str
    n_units: int
    width: int
    sites: list[Site]


def _pools(am: Any, config: S2FTConfig) -> dict[str, list[_Group]]:
    """Unit kind -> the per-block groups of its global pool, in model order."""
    sites = resolve_sites(am.model, config.targets, layers=config.layers, exclude=config.exclude,
                          roles=am.site_roles())
    by_block: dict[tuple[str, str], list[Site]] = {}
    for site in sites:
        if site.role not in ROLE_KIND:
            hint = (" (fused q/k/v projections have no separate V rows to select: use the FFN "
                    "ratios on this model)" if site.role == "attn.qkv" else "")
            raise ConfigError(f"S2FT attaches to attn.v, attn.o, ffn.up, ffn.gate and ffn.down; "
                              f"{site.path!r} has role {site.role!r}{hint}. Narrow the targets")
        by_block.setdefault((ROLE_KIND[site.role][0], _block_key(site.path)), []).append(site)
    heads = attention_heads(am.model)          # (query heads, kv heads, head width)
    pools: dict[str, list[_Group]] = {k: [] for k in KINDS}
    for (kind, block), group in by_block.items():
        roles = [s.role for s in group]
        if len(set(roles)) != len(roles):
            raise ConfigError(f"S2FT found several {roles[0]} sites in block {block!r} "
                              f"({[s.path for s in group]}); restrict targets or exclude to one each")
        sizes = set()
        for s in group:
            d_in, d_out = dims(s.module)
            sizes.add(d_out if ROLE_KIND[s.role][1] == "column" else d_in)
        if len(sizes) != 1:
            raise ConfigError(f"the FFN projections of block {block!r} disagree on the channel count "
                              f"({sorted(sizes)})")
        size = sizes.pop()
        if kind in ("v", "o"):
            if heads is None:
                raise ConfigError(f"S2FT's head units need the model's head counts (config."
                                  f"num_attention_heads); {type(am.model).__name__} has none: use the "
                                  "FFN ratios")
            n = heads[1] if kind == "v" else heads[0]
            if size % n:
                raise ConfigError(f"{group[0].path!r} has {size} {'rows' if kind == 'v' else 'columns'}, "
                                  f"not a multiple of its {n} {'kv' if kind == 'v' else 'query'} heads")
            pools[kind].append(_Group(block, n, size // n, group))
        else:
            pools[kind].append(_Group(block, size, 1, group))
    for kind in KINDS:
        if getattr(config, _RATIO_FIELD[kind]) > 0 and not pools[kind]:
            raise ConfigError(f"S2FTConfig.{_RATIO_FIELD[kind]} > 0 but the targets {config.targets!r} "
                              f"hold no {[r for r, (k, _) in ROLE_KIND.items() if k == kind]} site")
    return pools


def _unit_scores(group: _Group, tensor_of: Callable[[Site], torch.Tensor]) -> torch.Tensor:
    """Per-unit norm of the slices of `tensor_of(site)` (an (out, in) matrix) a unit covers."""
    total = torch.zeros(group.n_units, dtype=torch.float64)
    for site in group.sites:
        t = tensor_of(site).detach().double()
        if ROLE_KIND[site.role][1] == "row":
            t = t.t()
        total += t.reshape(group.n_units, -1).pow(2).sum(1)      # rows of unit u are contiguous
    return total.sqrt()


def _choose(config: S2FTConfig, pools: dict[str, list[_Group]],
            scores: Mapping[str, list[torch.Tensor]] | None) -> dict[str, list[int]]:
    """Draw each pool's budget globally, bucket by block, expand units into row/column indices."""
    selected: dict[str, list[int]] = {}
    for k, kind in enumerate(KINDS):
        groups = pools[kind]
        for g in groups:
            for s in g.sites:
                selected[s.path] = []
        ratio = getattr(config, _RATIO_FIELD[kind])
        total = sum(g.n_units for g in groups)
        if not ratio > 0 or not total:
            continue
        n = min(total, max(1, round(ratio * total)))
        if scores is None:
            gen = torch.Generator().manual_seed(config.seed * 7919 + k)
            chosen = torch.randperm(total, generator=gen)[:n]
        else:
            flat = torch.cat(scores[kind])
            chosen = torch.sort(flat, descending=True, stable=True).indices[:n]
        chosen = chosen.sort().values
        start = 0
        for g in groups:
            mine = chosen[(chosen >= start) & (chosen < start + g.n_units)] - start
            start += g.n_units
            rows = (mine[:, None] * g.width + torch.arange(g.width)[None, :]).reshape(-1).tolist()
            for s in g.sites:
                selected[s.path] = rows
    return selected


def select(am: Any, config: S2FTConfig,
           scores: Mapping[str, list[torch.Tensor]] | None = None) -> dict[str, list[int]]:
    """The selection `config` makes on `am` (site path -> indices), without adding anything.
    "random" draws with `config.seed`; "weight" ranks by base-weight slice norms; `scores`
    (unit kind -> per-block score vectors in pool order) overrides both."""
    pools = _pools(am, config)
    if scores is None and config.selection == "weight":
        scores = {kind: [_unit_scores(g, lambda s: weight_out_in(s.module)) for g in groups]
                  for kind, groups in pools.items()}
    elif scores is None and config.selection == "gradient":
        raise ConfigError("S2FT gradient selection needs a batch: call "
                          "peftlab.methods.s2ft.select_by_gradient(am, config, batches) first "
                          "(it fills config.selected), then add_adapter")
    return _choose(config, pools, scores)


def select_by_gradient(am: Any, config: S2FTConfig, batches: Iterable[Mapping[str, Any]],
                       loss_fn: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor] | None = None
                       ) -> S2FTConfig:
    """Gradient-based selection: accumulate the loss gradient on every targeted base weight over
    `batches` (keyword dicts for the model; the loss is `loss_fn(am, batch)`, by default
    `am(**batch).loss`), score each unit by the norm of its slices' summed gradient, and keep
    the top ones of each pool. Fills `config.selected` (and sets selection="gradient") and
    returns `config`; add it with `am.add_adapter(name, config)`. The model runs as it is
    (active adapters included); base weights get gradients only during this call."""
    pools = _pools(am, config)
    packed = [s.path for groups in pools.values() for g in groups for s in g.sites if quantisation(s.module)]
    if packed:
        raise CapabilityError(f"S2FT gradient selection needs the loss gradient of the base weights, and "
                              f"{packed[0]!r} is bitsandbytes-quantised (packed weights have none); use "
                              "selection='random' or 'weight' on a quantised base")
    weights = {id(w): w for groups in pools.values() for g in groups for s in g.sites
               for w in [unwrap(s.module).weight]}
    before = {i: (w.requires_grad, w.grad) for i, w in weights.items()}
    try:
        for w in weights.values():
            w.grad = None
            w.requires_grad_(True)
        seen = 0
        for batch in batches:
            loss = loss_fn(am, batch) if loss_fn is not None else am(**batch).loss
            loss.backward()
            seen += 1
        if not seen:
            raise ConfigError("select_by_gradient got no batches")

        def grad_of(site: Site) -> torch.Tensor:
            module = unwrap(site.module)
            g = module.weight.grad
            if g is None:
                return torch.zeros_like(weight_out_in(module))
            return g if weight_axes(module)[0] == 0 else g.t()    # as the weight: (out, in)

        scores = {kind: [_unit_scores(g, grad_of) for g in groups] for kind, groups in pools.items()}
    finally:
        for i, w in weights.items():
            w.requires_grad_(before[i][0])
            w.grad = before[i][1]
    config.selection = "gradient"
    config.selected = _choose(config, pools, scores)
    return config


# ---- partial backpropagation -----------------------------------------------------------------------
class _ColumnSlice(torch.autograd.Function):
    """y = out;  y[..., index] += x Sᵀ.  Saves x (for ∇S) and S (for ∇x)."""

    @staticmethod
    def forward(ctx, out, x, S, index):
        xf = x.reshape(-1, x.shape[-1])
        y = out.reshape(-1, out.shape[-1]).index_add(1, index, xf @ S.t())
        need_x, need_S = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        ctx.save_for_backward(xf if need_S else None, S if need_x else None, index)
        ctx.x_shape = x.shape
        return y.view(out.shape)

    @staticmethod
    def backward(ctx, g):
        xf, S, index = ctx.saved_tensors
        gs = g.reshape(-1, g.shape[-1]).index_select(1, index)        # g_out[sel]: (N, n_sel)
        gx = (gs @ S).view(ctx.x_shape) if ctx.needs_input_grad[1] else None
        gS = gs.t() @ xf if ctx.needs_input_grad[2] else None
        return (g if ctx.needs_input_grad[0] else None), gx, gS, None


class _RowSlice(torch.autograd.Function):
    """y = out + x[..., index] Sᵀ.  Saves x[..., index] (for ∇S) and S (for ∇x)."""

    @staticmethod
    def forward(ctx, out, x, S, index):
        xs = x.reshape(-1, x.shape[-1]).index_select(1, index)         # (N, n_sel)
        y = torch.addmm(out.reshape(-1, out.shape[-1]), xs, S.t())
        need_x, need_S = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        ctx.save_for_backward(xs if need_S else None, S if need_x else None, index)
        ctx.x_shape = x.shape
        return y.view(out.shape)

    @staticmethod
    def backward(ctx, g):
        xs, S, index = ctx.saved_tensors
        gf = g.reshape(-1, g.shape[-1])
        gx = None
        if ctx.needs_input_grad[1]:
            gx = gf.new_zeros(gf.shape[0], ctx.x_shape[-1])
            gx.index_copy_(1, index, gf @ S)
            gx = gx.view(ctx.x_shape)
        gS = gf.t() @ xs if ctx.needs_input_grad[2] else None
        return (g if ctx.needs_input_grad[0] else None), gx, gS, None


class SliceDelta(Delta):
    """S2FT's trainable slice of one weight: `S` and the selected `index` (rows for the column
    type, columns for the row type)."""

    stage = "output"
    algebra = "add"

    def __init__(self, kind: str, d_in: int, d_out: int, n_sel: int, *, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        if kind not in ("column", "row"):
            raise ValueError(f"kind must be 'column' or 'row', got {kind!r}")
        self.__dict__.update(kind=kind, n_sel=n_sel)
        shape = (n_sel, d_in) if kind == "column" else (d_out, n_sel)
        self._parameters["S"] = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device),
                                             requires_grad=False)
        self._buffers["index"] = torch.zeros(n_sel, dtype=torch.long, device=device)

    def delta_weight(self, d_out: int, d_in: int) -> torch.Tensor:
        """ΔW as a dense fp32 (d_out, d_in) matrix (for checks; serving never builds it)."""
        dw = torch.zeros(d_out, d_in, dtype=torch.float32, device=self.S.device)
        if self.kind == "column":
            dw[self.index] = self.S.float()
        else:
            dw[:, self.index] = self.S.float()
        return dw

    def contribute(self, layer, x, base_out, out):
        if not self.n_sel:
            return out
        dtype = compute_dtype(self.S.dtype, out.dtype, out.device)
        S = cast_one(self, self.S, dtype)            # cast at use, cached between updates
        if x.dtype != dtype:
            x = x.to(dtype)
        fn = _ColumnSlice if self.kind == "column" else _RowSlice
        y = fn.apply(out if out.dtype == dtype else out.to(dtype), x, S, self.index)
        return y if y.dtype == out.dtype else y.to(out.dtype)

    @torch.no_grad()
    def merge_into(self, layer: AdaptedLayer) -> None:
        if not self.n_sel:
            return
        w = layer.weight_out_in()
        idx = self.index
        if self.kind == "column":
            w[idx] = (w[idx].float() + self.S.float()).to(w.dtype)
        else:
            w[:, idx] = (w[:, idx].float() + self.S.float()).to(w.dtype)

    def extra_repr(self) -> str:
        return f"{self.kind}, n_sel={self.n_sel}"


def _indices_for(site: Site, layer: AdaptedLayer, config: S2FTConfig) -> list[int]:
    if config.selected is None:
        raise ConfigError("S2FTConfig.selected is unset: the selection is made when the adapter is "
                          "added (add_adapter)")
    if site.role not in ROLE_KIND:
        raise ConfigError(f"S2FT cannot attach to {site.path!r} (role {site.role!r}); it attaches to "
                          f"{', '.join(ROLE_KIND)}")
    idx = list(config.selected.get(site.path, []))
    kind = ROLE_KIND[site.role][1]
    limit = layer.out_features if kind == "column" else layer.in_features
    if any(i >= limit for i in idx) or len(set(idx)) != len(idx):
        raise ConfigError(f"S2FTConfig.selected[{site.path!r}] must hold distinct indices below {limit} "
                          f"(the {'rows' if kind == 'column' else 'columns'} of that weight): was the "
                          "config made for another model?")
    return idx


def _build(site: Site, layer: AdaptedLayer, config: S2FTConfig, initialise: bool = True, *,
           model: Any = None) -> SliceDelta:
    if config.selected is None:
        if model is None:
            raise ConfigError("S2FT needs the whole model to make its global selection")
        config.selected = select(model, config)
    idx = _indices_for(site, layer, config)
    weight = layer.base_layer.weight
    delta = SliceDelta(ROLE_KIND[site.role][1], layer.in_features, layer.out_features, len(idx),
                       dtype=adapter_dtype(config, weight.dtype), device=weight.device)
    delta.index.copy_(torch.tensor(idx, dtype=torch.long))
    return delta   # S starts at zero either way: a fresh adapter is a no-op


def _tensor_shapes(layer: AdaptedLayer, site: Site, config: S2FTConfig) -> dict[str, tuple[int, ...]]:
    n = len(_indices_for(site, layer, config))
    kind = ROLE_KIND[site.role][1]
    return {"S": (n, layer.in_features) if kind == "column" else (layer.out_features, n),
            "index": (n,)}


def _describe(config: S2FTConfig) -> str:
    parts = [f"{_RATIO_FIELD[k]}={getattr(config, _RATIO_FIELD[k]):g}" for k in KINDS
             if getattr(config, _RATIO_FIELD[k]) > 0]
    parts.append(f"{config.selection} selection" + (f" (seed {config.seed})" if config.selection == "random" else ""))
    if config.selected is not None:
        parts.append(f"{sum(len(v) for v in config.selected.values())} rows/columns")
    return ", ".join(parts)


# ---- serving as LoRA ------------------------------------------------------------------------------
def s2ft_to_lora(am: Any, name: str, new_name: str) -> Any:
    """Add `new_name`: an ordinary LoRA adapter (inactive, frozen) equal to S2FT adapter `name`.

    Per site with n_sel > 0 selected slices: rank n_sel, alpha = n_sel (scaling 1); column type
    B = E_sel (one-hot d_out×n_sel), A = S; row type B = S, A = E_selᵀ. Sites where nothing was
    selected get no LoRA. Returns the new Adapter; save it, export it to peft or merge it as any
    LoRA adapter."""
    adapter = am.adapter(name)
    if adapter.method.name != "s2ft":
        raise AdapterError(f"adapter {name!r} is {adapter.method.title}, not S2FT")
    parts = {p: d for p, d in adapter.parts().items() if d.n_sel > 0}
    if not parts:
        raise AdapterError(f"S2FT adapter {name!r} selected nothing; there is no LoRA to export")
    ranks = {p: d.n_sel for p, d in parts.items()}
    r = max(ranks.values())
    config = LoraConfig(targets=list(parts), r=r, alpha=float(r), init="zero",
                        rank_pattern={re.escape(p): n for p, n in ranks.items()},
                        alpha_pattern={re.escape(p): float(n) for p, n in ranks.items()})
    lora = am.add_adapter(new_name, config)
    with torch.no_grad():
        for path, d in parts.items():
            ld = lora.layers[path].deltas[new_name]
            assert ld.r == d.n_sel and math.isclose(ld.scaling, 1.0)
            eye = torch.arange(d.n_sel, device=d.index.device)
            if d.kind == "column":
                ld.lora_A.copy_(d.S)
                ld.lora_B.zero_()
                ld.lora_B[d.index, eye] = 1
            else:
                ld.lora_B.copy_(d.S)
                ld.lora_A.zero_()
                ld.lora_A[eye, d.index] = 1
    return lora


METHOD = Method(
    name="s2ft",
    title="S2FT",
    config_cls=S2FTConfig,
    typology=Typology(
        site_roles=("ffn.down",),
        form="sparse",
        integration="weight-delta",
        intra_connectivity="none (selected rows/columns of W)",
        inter_connectivity="fixed (the selected weights are updated in place; the forward is the model's)",
        adaptation="selection",
        parameter_sharing="none",
        input_type="input of the adapted projection",
        insertion="in-place",
        insertions_per_layer="1 per coupled projection (V, O, up, gate, down)",
        workspace="selected heads (V rows, O columns) and FFN channels (up/gate rows, down columns)",
        param_formula="n_sel·d_in (V/up/gate rows) or d_out·n_sel (O/down columns) per site",
    ),
    layer_kinds=("linear", "conv1d"),
    capabilities=frozenset({Capability.MERGE, Capability.QUANTISED_BASE}),
    build=_build,
    tensor_shapes=_tensor_shapes,
    describe=_describe,
)

__all__ = ["METHOD", "S2FTConfig", "SliceDelta", "s2ft_to_lora", "select", "select_by_gradient"]
