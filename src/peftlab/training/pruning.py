"""Light-PEFT early pruning (Gu et al., 2024): masks on heads and FFN neurons, importance of LoRA
modules and rank units, and structural pruning of the base model and of the adapter.

Phase E (estimation): train the LoRA adapter for a few steps together with learnable masks —
per layer a head mask M^A (n_heads) on the input of the attention output projection (the
concatenated head contexts, which is where scaling a head's attention probabilities ends up) and
a neuron mask M^F (d_ff) on the input of the FFN down projection — under an L1 penalty, while
two plug-in estimators record the importance of every LoRA module (‖ΔW x‖ / ‖W x + b‖) and of
every rank unit (first-order Taylor score). Then prune:

* heads: per layer, those whose mask is <= the layer's quantile at the ratio;
* neurons: those whose mask is <= the global quantile at the ratio;
* LoRA modules: the least important fraction, globally; rank units: likewise.

Pruning is structural and in place: the affected base projections stay plain `nn.Linear` (GPT-2:
`Conv1D`) modules, only smaller, and the LoRA tensors attached to them are sliced to match
(q/k/v: rows of B; attention output and FFN down: columns of A; FFN up/gate: rows of B; rank
units: rows of A and columns of B), each site keeping its scaling. The base-model part is a
`PrunePlan` (saved as `prune_plan.json` beside the adapter) that `PrunePlan.apply` replays on a
freshly loaded base, so the pruned adapter loads onto it with `load_adapter`.

    ep = EarlyPruning(am, "a", parse_prune_spec("heads=0.33,neurons=0.33,ranks=0.5"), estimate_steps=100)
    ep.start()
    train(am, "a", task, rows, None, TrainConfig(steps=100, lr_scale=ep.lr_scale))
    plan = ep.finish()                      # am is now pruned; train on for phase T
    am.save_adapter(out, "a"); save_plan(out, plan)

Grouped-query attention (Llama with fewer key/value heads than query heads) is pruned by whole
key/value groups: a group's score is the mean of its query heads' mask values, and the per-layer
quantile is taken over group scores, so every layer keeps the same number of query heads per
key/value head and the attention module's forward needs no change. Multi-head attention is the
case of groups of one head. Ties at a quantile threshold prune no more entries than distinct
values would (`lowest_at_quantile`), so at least one head group per layer stays, and the
global neuron rule always spares a layer's best neuron.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import (
    AdapterError,
    CapabilityError,
    CheckpointError,
    ConfigError,
    PeftlabError,
    close_matches,
)
from ..core.attach import remove_delta
from ..core.layer import AdaptedLayer, ModuleCopies
from ..core.terms import LossTerm
from ..core.sites import iter_modules, layer_index, model_family, model_layout, site_roles

if TYPE_CHECKING:
    from ..methods.lora import LowRankDelta
    from ..core.model import AdaptedModel

MASK_MODULE = "pruning_masks"          # attribute of the AdaptedModel holding the masks
MASK_GLOB = f"{MASK_MODULE}.*"         # their names in am.named_parameters(), for TrainConfig.lr_scale
L1_TERM = "light_peft_mask_l1"         # name of the L1 loss term
PLAN_FILE = "prune_plan.json"
PLAN_FORMAT = "peftlab-prune-plan"
PLAN_VERSION = 1
RATIO_KEYS = ("heads", "neurons", "ranks", "modules")


# ---- ratios -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PruneRatios:
    """Fractions to prune: attention heads (per layer), FFN neurons (global), LoRA rank units
    (global) and whole LoRA modules (global). Each in [0, 1); the defaults are the paper's,
    with module pruning off."""

    heads: float = 1 / 3
    neurons: float = 1 / 3
    ranks: float = 0.5
    modules: float = 0.0

    def __post_init__(self) -> None:
        for key in RATIO_KEYS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"pruning ratio {key}={value!r} must be a number in [0, 1) "
                                  "(the fraction to remove, e.g. 0.33)")


def parse_prune_spec(spec: str) -> PruneRatios:
    """'heads=0.33,neurons=0.33,ranks=0.5,modules=0' -> PruneRatios. A key left out prunes
    nothing of that kind; values are decimals or fractions ('1/3'); '' or 'none' prunes nothing."""
    if not isinstance(spec, str):
        raise ConfigError(f"a prune spec is a string like 'heads=0.33,neurons=0.33,ranks=0.5', got {spec!r}")
    values: dict[str, float] = dict.fromkeys(RATIO_KEYS, 0.0)
    seen: set[str] = set()
    text = spec.strip()
    if text.lower() in ("", "none"):
        return PruneRatios(**values)
    for item in text.split(","):
        key, sep, raw = (part.strip() for part in item.partition("="))
        if not sep or not key or not raw:
            raise ConfigError(f"prune spec item {item.strip()!r} is not 'key=ratio'; write e.g. "
                              "'heads=0.33,neurons=0.33,ranks=0.5,modules=0'")
        if key not in RATIO_KEYS:
            hint = close_matches(key, RATIO_KEYS)
            raise ConfigError(f"unknown prune spec key {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                              + f" Keys: {', '.join(RATIO_KEYS)}")
        if key in seen:
            raise ConfigError(f"prune spec names {key!r} twice: {spec!r}")
        seen.add(key)
        values[key] = _parse_ratio(key, raw)
    return PruneRatios(**values)


def _parse_ratio(key: str, raw: str) -> float:
    try:
        if "/" in raw:
            num, den = raw.split("/", 1)
            return float(num) / float(den)
        return float(raw)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"prune spec {key}={raw!r}: the ratio must be a number in [0, 1) such as "
                          "0.33 or 1/3") from None


# ---- the structure of a transformer -------------------------------------------------------------
_SUPPORTED_LAYOUTS = ("bert", "llama", "gpt2")


@dataclass(frozen=True)
class Block:
    """Module paths of one transformer layer's attention and FFN (None where absent), and the
    current sizes: query heads, key/value heads, head width, FFN width."""

    layer: int
    attention: str
    q: str | None
    k: str | None
    v: str | None
    qkv: str | None           # GPT-2's fused projection (q, k, v stacked on the output side)
    o: str
    up: str
    gate: str | None
    down: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.n_heads // self.n_kv_heads


def _plain(module: nn.Module) -> nn.Module:
    """The base projection behind a peftlab wrapper."""
    if isinstance(module, AdaptedLayer):
        return module.base_layer
    if isinstance(module, ModuleCopies):
        return module.original_module
    return module


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def _features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear or a GPT-2 Conv1D (whose weight is stored (in, out))."""
    w = _plain(module).weight
    return (w.shape[0], w.shape[1]) if _is_conv1d(_plain(module)) else (w.shape[1], w.shape[0])


def _head_dim(attention: nn.Module, path: str) -> int:
    for name in ("head_dim", "attention_head_size"):
        value = getattr(attention, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise CapabilityError(f"the attention module at {path!r} ({type(attention).__name__}) has no "
                          "head_dim / attention_head_size attribute; head pruning cannot size its heads")


def find_blocks(model: nn.Module) -> list[Block]:
    """The transformer layers of a BERT-, Llama- or GPT-2-family model (an AdaptedModel's inner
    model works too: wrapped layers keep their paths), with their current sizes."""
    model = getattr(model, "model", model) if _is_adapted(model) else model
    family = model_family(model)
    if model_layout(model) not in _SUPPORTED_LAYOUTS:
        raise CapabilityError(f"Light-PEFT pruning supports BERT-, Llama- and GPT-2-family models; "
                              f"{type(model).__name__} (architecture map {family!r}) is not one of them")
    by_layer: dict[int, dict[str, str]] = {}
    for path, role in site_roles(model).items():
        idx = layer_index(path)
        if idx is not None:
            by_layer.setdefault(idx, {})[role] = path
    modules = dict(iter_modules(model))
    blocks = []
    for idx in sorted(by_layer):
        roles = by_layer[idx]
        missing = [r for r in ("attn.out", "attn.o", "ffn.up", "ffn.down") if r not in roles]
        if "attn.qkv" not in roles:
            missing += [r for r in ("attn.q", "attn.k", "attn.v") if r not in roles]
        if missing:
            raise CapabilityError(f"layer {idx} of {type(model).__name__} lacks the modules for roles "
                                  f"{missing}; Light-PEFT pruning needs attention and FFN projections")
        attention = modules[roles["attn.out"]]
        head_dim = _head_dim(attention, roles["attn.out"])
        o_in, _ = _features(modules[roles["attn.o"]])
        n_heads = o_in // head_dim
        n_kv = _features(modules[roles["attn.k"]])[1] // head_dim if "attn.k" in roles else n_heads
        blocks.append(Block(
            layer=idx, attention=roles["attn.out"], q=roles.get("attn.q"), k=roles.get("attn.k"),
            v=roles.get("attn.v"), qkv=roles.get("attn.qkv"), o=roles["attn.o"], up=roles["ffn.up"],
            gate=roles.get("ffn.gate"), down=roles["ffn.down"], n_heads=n_heads, n_kv_heads=n_kv,
            head_dim=head_dim, d_ff=_features(modules[roles["ffn.down"]])[0]))
    if not blocks:
        raise CapabilityError(f"found no transformer layers in {type(model).__name__}")
    return blocks


def _is_adapted(model: nn.Module) -> bool:
    from ..core.model import AdaptedModel
    return isinstance(model, AdaptedModel)


# ---- masks ----------------------------------------------------------------------------------------
class PruningMasks(nn.Module):
    """The learnable masks: `heads[str(layer)]` (n_heads,) and `neurons[str(layer)]` (d_ff,),
    fp32, initialised to 1. Either dict may be empty (nothing of that kind is pruned)."""

    def __init__(self, blocks: Sequence[Block], *, heads: bool, neurons: bool,
                 device: torch.device | None = None) -> None:
        super().__init__()
        ones = lambda n: nn.Parameter(torch.ones(n, dtype=torch.float32, device=device))
        self.heads = nn.ParameterDict({str(b.layer): ones(b.n_heads) for b in blocks} if heads else {})
        self.neurons = nn.ParameterDict({str(b.layer): ones(b.d_ff) for b in blocks} if neurons else {})

    def l1(self) -> torch.Tensor:
        """Σ_ℓ ‖M^A_ℓ‖₁ + ‖M^F_ℓ‖₁ (a scalar)."""
        return sum((m.abs().sum() for m in self.parameters()), torch.zeros((), device=self._device()))

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def values(self) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Detached copies: (layer -> head mask, layer -> neuron mask)."""
        return ({int(k): v.detach().float().cpu().clone() for k, v in self.heads.items()},
                {int(k): v.detach().float().cpu().clone() for k, v in self.neurons.items()})


def _scale_input(mask: nn.Parameter, repeat: int):
    """A forward pre-hook multiplying the last dimension of the input by `mask`, each entry
    repeated `repeat` times (a head's mask covers its head_dim channels)."""
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]                                              # (..., len(mask) * repeat)
        scale = mask if repeat == 1 else mask.repeat_interleave(repeat)
        return (x * scale.to(x.dtype), *args[1:])
    return hook


def attach_masks(am: AdaptedModel, *, heads: bool = True, neurons: bool = True) -> tuple[PruningMasks, list]:
    """Register `am.pruning_masks` and the pre-hooks that apply them; returns the masks and the
    hook handles. The hooks sit on the module at each layer's attn.o / ffn.down path (the
    AdaptedLayer when an adapter wraps it, so that adapter sees the masked input too)."""
    if MASK_MODULE in am._modules:
        raise AdapterError("this AdaptedModel already has pruning masks; finish or detach the "
                           "running Light-PEFT estimation first")
    blocks = find_blocks(am.model)
    device = next(am.model.parameters()).device
    masks = PruningMasks(blocks, heads=heads, neurons=neurons, device=device)
    modules = dict(iter_modules(am.model))
    handles = []
    for b in blocks:
        if heads:
            handles.append(modules[b.o].register_forward_pre_hook(
                _scale_input(masks.heads[str(b.layer)], b.head_dim)))
        if neurons:
            handles.append(modules[b.down].register_forward_pre_hook(
                _scale_input(masks.neurons[str(b.layer)], 1)))
    am.add_module(MASK_MODULE, masks)
    return masks, handles


def detach_masks(am: AdaptedModel, handles: Iterable) -> None:
    """Remove the mask hooks and `am.pruning_masks`."""
    for h in handles:
        h.remove()
    if MASK_MODULE in am._modules:
        del am._modules[MASK_MODULE]


def mask_l1_term(masks: PruningMasks, weight: float = 1e-4) -> LossTerm:
    """λ₁ · Σ(‖M^A‖₁ + ‖M^F‖₁) as an always-on loss term."""
    return LossTerm(L1_TERM, weight, lambda ctx: masks.l1())


# ---- the plan: which heads and neurons go -------------------------------------------------------
@dataclass
class PrunePlan:
    """What is pruned from the base model, per layer: query-head indices and FFN neuron
    indices, numbered as in the unpruned model, plus the sizes it was made for (checked by
    `apply`). Layers absent from `heads` / `neurons` lose nothing of that kind."""

    heads: dict[int, list[int]] = field(default_factory=dict)
    neurons: dict[int, list[int]] = field(default_factory=dict)
    n_heads: dict[int, int] = field(default_factory=dict)        # layer -> query heads before
    d_ff: dict[int, int] = field(default_factory=dict)           # layer -> FFN width before

    def to_dict(self) -> dict[str, Any]:
        layer_map = lambda d: {str(k): v for k, v in sorted(d.items())}
        return {"format": PLAN_FORMAT, "format_version": PLAN_VERSION,
                "heads": layer_map(self.heads), "neurons": layer_map(self.neurons),
                "n_heads": layer_map(self.n_heads), "d_ff": layer_map(self.d_ff)}

    def to_json(self) -> str:
        import json
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrunePlan:
        if data.get("format") != PLAN_FORMAT:
            raise CheckpointError(f"not a peftlab prune plan (format {data.get('format')!r}, expected "
                                  f"{PLAN_FORMAT!r})")
        if data.get("format_version", 0) > PLAN_VERSION:
            raise CheckpointError(f"this prune plan has format version {data['format_version']}; "
                                  "upgrade peftlab to read it")
        try:
            ints = lambda d: {int(k): [int(i) for i in v] for k, v in d.items()}
            sizes = lambda d: {int(k): int(v) for k, v in d.items()}
            return cls(heads=ints(data.get("heads", {})), neurons=ints(data.get("neurons", {})),
                       n_heads=sizes(data.get("n_heads", {})), d_ff=sizes(data.get("d_ff", {})))
        except (TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"prune plan is malformed ({e}); save it again") from None

    @classmethod
    def from_json(cls, text: str) -> PrunePlan:
        import json
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"prune plan is not valid JSON (line {e.lineno}: {e.msg})") from None
        if not isinstance(data, dict):
            raise CheckpointError("prune plan JSON must be an object")
        return cls.from_dict(data)

    @property
    def is_empty(self) -> bool:
        return not any(self.heads.values()) and not any(self.neurons.values())

    def describe(self) -> str:
        """'heads 24/72 pruned, neurons 3072/9216 pruned'."""
        h = sum(len(v) for v in self.heads.values())
        n = sum(len(v) for v in self.neurons.values())
        return (f"heads {h}/{sum(self.n_heads.values())} pruned, "
                f"neurons {n}/{sum(self.d_ff.values())} pruned")

    def apply(self, model: nn.Module) -> None:
        """Slice `model` (a plain transformers model, or an AdaptedModel whose LoRA tensors on
        the affected projections are sliced along) in place. Checks everything first: a plan
        made for other sizes, a head set that splits a key/value group, or an adapter that
        cannot be sliced raises before anything changes."""
        root = model.model if _is_adapted(model) else model
        blocks = {b.layer: b for b in find_blocks(root)}
        modules = dict(iter_modules(root))
        work = [self._layer_slices(blocks, layer) for layer in sorted(set(self.heads) | set(self.neurons))]
        for slices in work:                                  # validate every touched module first
            for path, _, _ in slices["linears"]:
                _check_sliceable(modules[path], path)
        for slices in work:
            for path, out_keep, in_keep in slices["linears"]:
                _slice_projection(modules[path], out_keep, in_keep)
            if slices["attention"] is not None:
                path, kept_heads, kept_kv, head_dim = slices["attention"]
                _set_head_counts(modules[path], kept_heads, kept_kv, head_dim)

    def _layer_slices(self, blocks: Mapping[int, Block], layer: int) -> dict[str, Any]:
        """The (path, kept output indices, kept input indices) of every projection of `layer`
        to slice, and the attention module's new head counts."""
        if layer not in blocks:
            raise CheckpointError(f"the prune plan names layer {layer}, which this model does not have "
                                  f"(layers 0-{max(blocks)})")
        b = blocks[layer]
        linears: list[tuple[str, torch.Tensor | None, torch.Tensor | None]] = []
        attention = None
        pruned = sorted(set(self.heads.get(layer, [])))
        if pruned:
            expected = self.n_heads.get(layer)
            if expected is not None and expected != b.n_heads:
                raise CheckpointError(f"the prune plan was made for {expected} heads in layer {layer}, "
                                      f"but this model has {b.n_heads} there (already pruned, or another "
                                      "model?)")
            kept, kept_groups = _kept_heads(b, pruned)
            d = b.head_dim
            q_rows = _channels(kept, d)
            kv_rows = _channels(kept_groups, d)
            if b.qkv is not None:   # fused: q, k, v blocks of n_heads·d outputs each
                width = b.n_heads * d
                linears.append((b.qkv, torch.cat([q_rows + i * width for i in range(3)]), None))
            else:
                linears += [(b.q, q_rows, None), (b.k, kv_rows, None), (b.v, kv_rows, None)]
            linears.append((b.o, None, q_rows))
            attention = (b.attention, len(kept), len(kept_groups), d)
        neurons = sorted(set(self.neurons.get(layer, [])))
        if neurons:
            expected = self.d_ff.get(layer)
            if expected is not None and expected != b.d_ff:
                raise CheckpointError(f"the prune plan was made for an FFN width of {expected} in layer "
                                      f"{layer}, but this model has {b.d_ff} there (already pruned, or "
                                      "another model?)")
            if neurons[0] < 0 or neurons[-1] >= b.d_ff:
                raise CheckpointError(f"the prune plan names FFN neuron {neurons[-1]} of layer {layer}, "
                                      f"which has {b.d_ff}")
            if len(neurons) >= b.d_ff:
                raise ConfigError(f"the prune plan removes every FFN neuron of layer {layer}; keep at least one")
            keep = _complement(b.d_ff, neurons)
            linears += [(b.up, keep, None)] + ([(b.gate, keep, None)] if b.gate else []) + [(b.down, None, keep)]
        return {"linears": linears, "attention": attention}


def _kept_heads(b: Block, pruned: Sequence[int]) -> tuple[list[int], list[int]]:
    """(kept query heads, kept key/value heads) of block `b` when `pruned` query heads go;
    `pruned` must be whole key/value groups."""
    if pruned[0] < 0 or pruned[-1] >= b.n_heads:
        raise CheckpointError(f"the prune plan names head {pruned[-1]} of layer {b.layer}, which has {b.n_heads}")
    gone = set(pruned)
    groups = [list(range(g * b.group, (g + 1) * b.group)) for g in range(b.n_kv_heads)]
    for heads in groups:
        if 0 < len(gone.intersection(heads)) < len(heads):
            raise ConfigError(f"layer {b.layer} shares each key/value head among {b.group} query heads; "
                              f"prune whole groups (heads {heads} together), not part of one")
    kept_groups = [g for g, heads in enumerate(groups) if heads[0] not in gone]
    if not kept_groups:
        raise ConfigError(f"the prune plan removes every attention head of layer {b.layer}; keep at least one")
    kept = [h for g in kept_groups for h in groups[g]]
    return kept, kept_groups


def _channels(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    """Feature indices of these heads in a (n_heads · head_dim) dimension."""
    idx = torch.tensor(heads, dtype=torch.long)
    return (idx[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def _complement(n: int, removed: Sequence[int]) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[list(removed)] = False
    return keep.nonzero().squeeze(1)


def plan_from_masks(blocks: Sequence[Block], head_masks: Mapping[int, torch.Tensor],
                    neuron_masks: Mapping[int, torch.Tensor], ratios: PruneRatios) -> PrunePlan:
    """The Light-PEFT rule: heads whose (group's mean) mask is <= the layer's quantile at
    `ratios.heads`, neurons whose mask is <= the global quantile at `ratios.neurons`
    (`lowest_at_quantile`); at least one neuron stays in every layer."""
    plan = PrunePlan(n_heads={b.layer: b.n_heads for b in blocks}, d_ff={b.layer: b.d_ff for b in blocks})
    if ratios.heads > 0:
        for b in blocks:
            scores = head_masks[b.layer].float().view(b.n_kv_heads, b.group).mean(dim=1)   # (n_kv,)
            gone = lowest_at_quantile(scores, ratios.heads)
            plan.heads[b.layer] = [h for g in gone for h in range(g * b.group, (g + 1) * b.group)]
    if ratios.neurons > 0:
        flat = torch.cat([neuron_masks[b.layer].float() for b in blocks])              # (Σ d_ff,)
        gone = torch.zeros(flat.numel(), dtype=torch.bool)
        gone[lowest_at_quantile(flat, ratios.neurons)] = True
        start = 0
        for b in blocks:
            layer_gone = gone[start:start + b.d_ff]
            if bool(layer_gone.all()):    # the global rule may empty a layer: spare its best neuron
                layer_gone[int(neuron_masks[b.layer].float().argmax())] = False
            plan.neurons[b.layer] = layer_gone.nonzero().squeeze(1).tolist()
            start += b.d_ff
    return plan


def lowest_at_quantile(scores: torch.Tensor, ratio: float) -> list[int]:
    """Indices (ascending) of the entries <= the `ratio` quantile of `scores` (linear
    interpolation, as torch.quantile). With distinct values that is floor((n-1)·ratio) + 1
    entries; ties at the threshold never add more than that (the lowest, then the first, go),
    so equal masks — e.g. untrained ones — are not all pruned, and one entry always stays."""
    if ratio <= 0:
        return []
    n = scores.numel()
    threshold = torch.quantile(scores, ratio)
    limit = math.floor((n - 1) * ratio + 1e-9) + 1
    order = torch.sort(scores, stable=True).indices[:limit].tolist()
    return sorted(i for i in order if scores[i] <= threshold)


# ---- slicing projections and the LoRA tensors attached to them -----------------------------------
def _check_sliceable(module: nn.Module, path: str) -> None:
    if isinstance(module, ModuleCopies):
        raise CapabilityError(f"{path!r} is trained whole (modules_to_save); it cannot be pruned")
    plain = _plain(module)
    if not (isinstance(plain, nn.Linear) or _is_conv1d(plain)):
        raise CapabilityError(f"{path!r} is a {type(plain).__name__}; pruning slices nn.Linear and "
                              "GPT-2 Conv1D projections only")
    if isinstance(module, AdaptedLayer):
        _check_deltas(module, path)


def _check_deltas(layer: AdaptedLayer, path: str) -> None:
    from ..methods.lora import LowRankDelta
    for name, delta in layer.deltas.items():
        if not isinstance(delta, LowRankDelta):
            raise CapabilityError(f"adapter {name!r} at {path!r} is a {type(delta).__name__}; Light-PEFT "
                                  "pruning slices LoRA adapters only (delete the other adapter first)")
        if delta.dora:
            raise CapabilityError(f"adapter {name!r} at {path!r} uses DoRA, whose row norms change when "
                                  "input columns are removed; Light-PEFT pruning supports plain LoRA")
        if name in layer.merged:
            raise AdapterError(f"adapter {name!r} is merged at {path!r}; unmerge it before pruning")


def _check_blocks_sliceable(root: nn.Module, blocks: Sequence[Block], *, heads: bool, neurons: bool) -> None:
    """Every projection that pruning these kinds would slice can be sliced (adapters included)."""
    modules = dict(iter_modules(root))
    for b in blocks:
        paths = ([b.q, b.k, b.v, b.qkv, b.o] if heads else []) + ([b.up, b.gate, b.down] if neurons else [])
        for path in paths:
            if path is not None:
                _check_sliceable(modules[path], path)


def _take(t: torch.Tensor | None, dim: int, keep: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or keep is None:
        return t
    return t.detach().index_select(dim, keep.to(t.device)).clone()


def _replace_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = module._parameters[name]
    module._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)


@torch.no_grad()
def _slice_projection(module: nn.Module, out_keep: torch.Tensor | None, in_keep: torch.Tensor | None) -> None:
    """Keep these output / input features of a Linear or Conv1D (in place: same module object,
    smaller tensors) and of every LoRA delta on it."""
    plain = _plain(module)
    conv = _is_conv1d(plain)
    out_dim, in_dim = (1, 0) if conv else (0, 1)
    _replace_param(plain, "weight", _take(_take(plain.weight, out_dim, out_keep), in_dim, in_keep))
    if plain.bias is not None and out_keep is not None:
        _replace_param(plain, "bias", _take(plain.bias, 0, out_keep))
    d_in, d_out = _features(plain)
    if conv:
        plain.nx, plain.nf = d_in, d_out
    else:
        plain.in_features, plain.out_features = d_in, d_out
    if isinstance(module, AdaptedLayer):
        for delta in module.deltas.values():
            _slice_delta(delta, out_keep=out_keep, in_keep=in_keep)


def _slice_delta(delta: LowRankDelta, *, out_keep: torch.Tensor | None = None,
                 in_keep: torch.Tensor | None = None, rank_keep: torch.Tensor | None = None) -> None:
    """Slice A (r, d_in) and B (d_out, r) — and PiSSA's frozen start — to the kept output
    features, input features and rank units. An embedding delta's "input" is the vocabulary."""
    for a_name, b_name, store in (("lora_A", "lora_B", delta._parameters),
                                  ("pissa_A0", "pissa_B0", delta._buffers)):
        A, B = store.get(a_name), store.get(b_name)
        if A is None:
            continue
        A = _take(_take(A, 0, rank_keep), 1, in_keep)           # (r', d_in')
        B = _take(_take(B, 1, rank_keep), 0, out_keep)          # (d_out', r')
        if store is delta._parameters:
            _replace_param(delta, a_name, A)
            _replace_param(delta, b_name, B)
        else:
            store[a_name], store[b_name] = A, B
    if delta._parameters.get("magnitude") is not None and out_keep is not None:
        _replace_param(delta, "magnitude", _take(delta.magnitude, 0, out_keep))
    # plain __dict__ writes, as LowRankDelta keeps these; the cast cache is keyed on old tensors
    delta.__dict__.update(r=delta.lora_A.shape[0], _cast=())


def _set_head_counts(attention: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
    """Update the head-count attributes the attention forward reads (BERT: num_attention_heads,
    all_head_size; GPT-2: num_heads, split_size). Llama's forward infers counts from the
    projections' shapes and keeps num_key_value_groups, which whole-group pruning preserves."""
    for name in ("num_attention_heads", "num_heads"):
        if isinstance(getattr(attention, name, None), int):
            setattr(attention, name, heads)
    if isinstance(getattr(attention, "num_key_value_heads", None), int):
        attention.num_key_value_heads = kv_heads
    for name in ("all_head_size", "split_size"):
        if isinstance(getattr(attention, name, None), int):
            setattr(attention, name, heads * head_dim)


# ---- rank units and whole modules of one LoRA adapter ----------------------------------------------
def prune_adapter(am: AdaptedModel, adapter: str, *, keep_ranks: Mapping[str, Sequence[int]] | None = None,
                  drop: Iterable[str] = ()) -> None:
    """Remove rank units (rows of A, columns of B) and whole modules of LoRA adapter `adapter`.

    `keep_ranks` maps a site path to the rank units it keeps (a site left out keeps all; an
    empty list drops the module); `drop` names sites to remove. Each kept site keeps its
    scaling: the config gets per-site `rank_pattern` / `alpha_pattern` entries (alpha' = s·r',
    or s·√r' with rsLoRA) and dropped sites join `exclude`, so the adapter saves and re-loads.
    """
    from ..methods.lora import LoraConfig
    ad = am.adapter(adapter)
    if not isinstance(ad.config, LoraConfig) or ad.method.name != "lora":
        raise CapabilityError(f"adapter {adapter!r} is {ad.method.title}; rank and module pruning "
                              "supports LoRA adapters")
    if ad.merged:
        raise AdapterError(f"adapter {adapter!r} is merged; unmerge({adapter!r}) before pruning it")
    keep_ranks = dict(keep_ranks or {})
    drop = set(drop) | {p for p, k in keep_ranks.items() if len(k) == 0}
    unknown = sorted((set(keep_ranks) | drop) - set(ad.layers))
    if unknown:
        hint = close_matches(unknown[0], ad.layers)
        raise ConfigError(f"adapter {adapter!r} has no site {unknown[0]!r}"
                          + (f"; did you mean {hint[0]!r}?" if hint else ""))
    if drop >= set(ad.layers):
        raise ConfigError(f"pruning would drop every module of adapter {adapter!r}; keep at least one")
    for path, keep in keep_ranks.items():
        r = ad.layers[path].deltas[adapter].r
        if path not in drop and (min(keep) < 0 or max(keep) >= r or len(set(keep)) != len(keep)):
            raise ConfigError(f"keep_ranks[{path!r}] = {list(keep)} must be distinct rank units in 0..{r - 1}")
    sites = {s.path: s for s in ad.sites}
    scaling = {p: ad.layers[p].deltas[adapter].scaling for p in ad.layers}   # before any change
    changed = bool(drop) or any(len(k) != ad.layers[p].deltas[adapter].r for p, k in keep_ranks.items())
    for path in drop:
        _drop_site(am, ad, path)
    for path, keep in keep_ranks.items():
        if path not in drop:
            delta: LowRankDelta = ad.layers[path].deltas[adapter]
            _slice_delta(delta, rank_keep=torch.tensor(sorted(keep), dtype=torch.long))
    if not changed:
        return
    config = ad.config
    kept = [s for s in ad.sites if s.path not in drop]
    ad.sites[:] = kept
    ranks = {p: ad.layers[p].deltas[adapter].r for p in (s.path for s in kept)}
    root = math.sqrt if config.rslora else float
    config.rank_pattern = {re.escape(p): r for p, r in ranks.items()}
    config.alpha_pattern = {re.escape(p): scaling[p] * root(r) for p, r in ranks.items()}
    if drop:
        existing = [] if config.exclude is None else (
            [config.exclude] if isinstance(config.exclude, str) else list(config.exclude))
        config.exclude = existing + sorted(drop)
    for s in kept:   # the scaling a reload computes from the config, equal to the one kept
        ad.layers[s.path].deltas[adapter].__dict__["scaling"] = config.scaling_for(sites[s.path])
    am.state.changed()


def _drop_site(am: AdaptedModel, ad, path: str) -> None:
    """Remove adapter `ad`'s delta at `path`; a layer left with no deltas becomes its base layer."""
    remove_delta(am.model, ad.layers.pop(path), path, ad.name)


def select_modules(scores: Mapping[str, float], ratio: float) -> set[str]:
    """The floor(ratio · n) least important modules (ties: model order)."""
    paths = list(scores)
    k = math.floor(ratio * len(paths) + 1e-9)
    order = sorted(range(len(paths)), key=lambda i: scores[paths[i]])
    return {paths[i] for i in order[:k]}


def select_ranks(scores: Mapping[str, torch.Tensor], ratio: float) -> dict[str, list[int]]:
    """Kept rank units per site after removing the floor(ratio · N) least important of all N
    units, globally (ties: model order, then unit order)."""
    paths = list(scores)
    flat = torch.cat([scores[p].float().reshape(-1) for p in paths]) if paths else torch.zeros(0)
    k = math.floor(ratio * flat.numel() + 1e-9)
    gone = torch.zeros(flat.numel(), dtype=torch.bool)
    gone[torch.sort(flat, stable=True).indices[:k]] = True
    kept, start = {}, 0
    for p in paths:
        n = scores[p].numel()
        kept[p] = (~gone[start:start + n]).nonzero().squeeze(1).tolist()
        start += n
    return kept


# ---- importance estimators ----------------------------------------------------------------------
class StepWindow:
    """Counts the training forwards of an AdaptedModel (a forward pre-hook: no change to the
    training loop) and keeps each one's attention mask. `recording` is true from micro-step
    `total // 2` on: the importance estimators average over the second half of estimation."""

    def __init__(self, am: AdaptedModel, total_steps: int) -> None:
        self.total = total_steps
        self.step = -1                           # index of the current training forward
        self.token_mask: torch.Tensor | None = None   # (B, T) bool of the current forward
        self._handle = am.register_forward_pre_hook(self._on_forward, with_kwargs=True)

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training and torch.is_grad_enabled():
            self.step += 1
            mask = kwargs.get("attention_mask")
            self.token_mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    @property
    def recording(self) -> bool:
        return self.step >= self.total // 2

    def remove(self) -> None:
        self._handle.remove()


def lora_branch(delta: LowRankDelta, x: torch.Tensor) -> torch.Tensor:
    """ΔW x = s · (B A x − B0 A0 x), no dropout: (..., d_in) -> (..., d_out)."""
    A, B = delta.lora_A, delta.lora_B
    down = F.embedding(x, A.t()) if delta.embedding else F.linear(x.to(A.dtype), A)
    out = F.linear(down, B)
    if delta.pissa:
        d0 = F.embedding(x, delta.pissa_A0.t()) if delta.embedding else F.linear(x.to(A.dtype), delta.pissa_A0)
        out = out - F.linear(d0, delta.pissa_B0)
    return out * delta.scaling


def output_ratio(branch: torch.Tensor, base: torch.Tensor, token_mask: torch.Tensor | None) -> float:
    """Mean over real tokens of ‖ΔW x‖₂ / ‖W x + b‖₂ (NaN/Inf per token count as 0); all
    tokens count when there is no mask of the tokens' shape."""
    ratio = branch.float().norm(dim=-1) / base.float().norm(dim=-1)           # (B, T) or (N,)
    ratio = torch.nan_to_num(ratio, nan=0.0, posinf=0.0, neginf=0.0)
    if token_mask is not None and token_mask.shape == ratio.shape:
        weights = token_mask.to(ratio.dtype)
        return float((ratio * weights).sum() / weights.sum().clamp_min(1.0))
    return float(ratio.mean())


def taylor_rank_scores(param: torch.Tensor, grad: torch.Tensor, rank_dim: int) -> torch.Tensor:
    """|mean over the other dimension of param ⊙ grad| per rank unit: A (r, d_in) has rank_dim
    0, B (d_out, r) rank_dim 1. NaN/Inf count as 0."""
    other = 1 - rank_dim
    score = (param.detach().float() * grad.detach().float()).mean(dim=other).abs()     # (r,)
    return torch.nan_to_num(score, nan=0.0, posinf=0.0, neginf=0.0)


class ModuleImportance:
    """Output-ratio importance of each LoRA module of an adapter: a forward hook on each wrapped
    base projection recomputes the LoRA branch from its input, per recorded training forward."""

    def __init__(self, am: AdaptedModel, adapter: str, window: StepWindow) -> None:
        self.window = window
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self._handles = []
        for path, layer in am.adapter(adapter).layers.items():
            self.sums[path], self.counts[path] = 0.0, 0
            self._handles.append(layer.base_layer.register_forward_hook(
                self._recorder(path, layer, layer.deltas[adapter])))

    def _recorder(self, path: str, layer: AdaptedLayer, delta: LowRankDelta):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            w = self.window
            if not (w.recording and layer.training and torch.is_grad_enabled()):
                return
            with torch.no_grad():
                value = output_ratio(lora_branch(delta, args[0]), output, w.token_mask)
            self.sums[path] += value if math.isfinite(value) else 0.0
            self.counts[path] += 1
        return hook

    def scores(self) -> dict[str, float]:
        """Site path -> the average over the recorded forwards."""
        return {p: self.sums[p] / self.counts[p] if self.counts[p] else 0.0 for p in self.sums}

    @property
    def recorded(self) -> bool:
        return any(self.counts.values())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class RankImportance:
    """First-order Taylor importance of each rank unit, from post-accumulate-grad hooks on every
    lora_A / lora_B of the adapter: I[i] = |mean_j A_ij ∂L/∂A_ij| + |mean_k B_ki ∂L/∂B_ki|."""

    def __init__(self, am: AdaptedModel, adapter: str, window: StepWindow) -> None:
        self.window = window
        self.sums: dict[tuple[str, str], torch.Tensor] = {}
        self.counts: dict[tuple[str, str], int] = {}
        self.paths = list(am.adapter(adapter).layers)
        self._handles = []
        for path, layer in am.adapter(adapter).layers.items():
            delta = layer.deltas[adapter]
            for name, rank_dim in (("lora_A", 0), ("lora_B", 1)):
                key = (path, name)
                self.sums[key] = torch.zeros(delta.r)
                self.counts[key] = 0
                self._handles.append(getattr(delta, name).register_post_accumulate_grad_hook(
                    self._recorder(key, rank_dim)))

    def _recorder(self, key: tuple[str, str], rank_dim: int):
        def hook(param: torch.Tensor) -> None:
            if not self.window.recording or param.grad is None:
                return
            self.sums[key] += taylor_rank_scores(param, param.grad, rank_dim).cpu()
            self.counts[key] += 1
        return hook

    def scores(self) -> dict[str, torch.Tensor]:
        """Site path -> (r,) average A-part plus average B-part over the recorded backwards."""
        out = {}
        for p in self.paths:
            parts = [self.sums[(p, n)] / self.counts[(p, n)] for n in ("lora_A", "lora_B")
                     if self.counts[(p, n)]]
            out[p] = sum(parts) if parts else torch.zeros_like(self.sums[(p, "lora_A")])
        return out

    @property
    def recorded(self) -> bool:
        return any(self.counts.values())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


# ---- the driver ----------------------------------------------------------------------------------
class EarlyPruning:
    """Light-PEFT's estimate → prune sequence around an ordinary training run.

    `start()` attaches the masks (only for the kinds with a ratio > 0), their L1 term and the
    importance recorders; train the adapter for `estimate_steps` optimisation steps (with
    `grad_accum` micro-batches each) passing `TrainConfig(lr_scale=ep.lr_scale)`; `finish()`
    prunes the base model and the adapter in place, removes everything `start` added, and
    returns the base model's `PrunePlan` (save it with `save_plan` beside the adapter).
    """

    def __init__(self, am: AdaptedModel, adapter: str, ratios: PruneRatios | None = None, *,
                 l1: float = 1e-4, mask_lr_scale: float = 1.0, estimate_steps: int,
                 grad_accum: int = 1) -> None:
        from ..methods.lora import LoraConfig
        ad = am.adapter(adapter)
        if not isinstance(ad.config, LoraConfig) or ad.method.name != "lora" or ad.config.dora:
            raise CapabilityError(f"Light-PEFT early pruning needs a LoRA adapter without DoRA; "
                                  f"{adapter!r} is {ad.method.title}"
                                  + (" with DoRA" if getattr(ad.config, "dora", False) else ""))
        for name, value in (("estimate_steps", estimate_steps), ("grad_accum", grad_accum)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"EarlyPruning {name} must be a positive integer, got {value!r}")
        for name, value in (("l1", l1), ("mask_lr_scale", mask_lr_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (name == "mask_lr_scale" and value == 0):
                raise ConfigError(f"EarlyPruning {name} must be a finite number "
                                  f"{'> 0' if name == 'mask_lr_scale' else '>= 0'}, got {value!r}")
        self.am, self.adapter = am, adapter
        self.ratios = ratios if ratios is not None else PruneRatios()
        self.l1, self.mask_lr_scale = float(l1), float(mask_lr_scale)
        self.estimate_steps, self.grad_accum = estimate_steps, grad_accum
        self.masks: PruningMasks | None = None
        self.window: StepWindow | None = None
        self.module_importance: ModuleImportance | None = None
        self.rank_importance: RankImportance | None = None
        self._handles: list = []
        self.dropped: set[str] = set()                 # LoRA sites removed by finish()
        self.kept_ranks: dict[str, list[int]] = {}     # rank units each site kept

    @property
    def uses_masks(self) -> bool:
        return self.ratios.heads > 0 or self.ratios.neurons > 0

    @property
    def lr_scale(self) -> dict[str, float]:
        """{MASK_GLOB: mask_lr_scale} for TrainConfig.lr_scale (empty when no masks are used)."""
        return {MASK_GLOB: self.mask_lr_scale} if self.uses_masks else {}

    def start(self) -> None:
        """Attach masks, the L1 term and the importance recorders."""
        if self.window is not None:
            raise AdapterError("EarlyPruning.start() was already called; call finish() first")
        am = self.am
        if self.ratios.ranks > 0 and not am.adapter(self.adapter).trainable:
            raise AdapterError(f"rank importance reads the gradients of adapter {self.adapter!r}, which is "
                               f"frozen; call am.set_trainable({self.adapter!r}) before start()")
        # an unsupported model or adapter fails here, before the estimation run
        _check_blocks_sliceable(am.model, find_blocks(am.model), heads=self.ratios.heads > 0,
                                neurons=self.ratios.neurons > 0)
        if self.uses_masks:
            self.masks, self._handles = attach_masks(am, heads=self.ratios.heads > 0,
                                                     neurons=self.ratios.neurons > 0)
            if self.l1 > 0:
                am.add_loss_term(mask_l1_term(self.masks, self.l1))
        self.window = StepWindow(am, self.estimate_steps * self.grad_accum)
        if self.ratios.modules > 0:
            self.module_importance = ModuleImportance(am, self.adapter, self.window)
        if self.ratios.ranks > 0:
            self.rank_importance = RankImportance(am, self.adapter, self.window)

    def detach(self) -> None:
        """Remove everything `start` attached, pruning nothing."""
        am = self.am
        detach_masks(am, self._handles)
        self._handles = []
        if L1_TERM in am.loss_terms:
            am.remove_loss_term(L1_TERM)
        for part in (self.window, self.module_importance, self.rank_importance):
            if part is not None:
                part.remove()
        self.window = self.module_importance = self.rank_importance = None
        self.masks = None

    def plan(self) -> PrunePlan:
        """The base-model plan the current mask values give (nothing changes)."""
        blocks = find_blocks(self.am.model)
        heads, neurons = self.masks.values() if self.masks is not None else ({}, {})
        return plan_from_masks(blocks, heads, neurons, self.ratios)

    def finish(self) -> PrunePlan:
        """Prune the base model (heads, neurons) and the adapter (modules, then rank units among
        the kept modules), detach the masks and recorders, and return the base-model plan."""
        if self.window is None:
            raise AdapterError("EarlyPruning.finish() before start(): call start() and train first")
        for ratio, recorder, what in ((self.ratios.modules, self.module_importance, "module"),
                                      (self.ratios.ranks, self.rank_importance, "rank")):
            if ratio > 0 and not recorder.recorded:
                raise PeftlabError(
                    f"no {what} importance was recorded: estimation records the second half of "
                    f"{self.estimate_steps} steps × {self.grad_accum} micro-batches, but only "
                    f"{self.window.step + 1} training forwards ran; train for estimate_steps first")
        plan = self.plan()
        drop = select_modules(self.module_importance.scores(), self.ratios.modules) \
            if self.module_importance is not None else set()
        rank_scores = self.rank_importance.scores() if self.rank_importance is not None else {}
        keep = select_ranks({p: s for p, s in rank_scores.items() if p not in drop}, self.ratios.ranks)
        self.detach()
        plan.apply(self.am)
        prune_adapter(self.am, self.adapter, keep_ranks=keep, drop=drop)
        self.dropped = drop | {p for p, k in keep.items() if not k}
        self.kept_ranks = {p: k for p, k in keep.items() if k}
        return plan


# ---- saving the plan -----------------------------------------------------------------------------
def save_plan(directory: str | Path, plan: PrunePlan) -> Path:
    """Write `prune_plan.json` into `directory` atomically; returns its path."""
    from ..core.io import commit_files, write_json
    directory = Path(directory)
    commit_files(directory, {PLAN_FILE: write_json(plan.to_dict())})
    return directory / PLAN_FILE


def load_plan(directory: str | Path, *, missing_ok: bool = False) -> PrunePlan | None:
    """The plan saved in `directory` (None if there is none and `missing_ok`)."""
    path = Path(directory) / PLAN_FILE
    if not path.is_file():
        if missing_ok:
            return None
        raise CheckpointError(f"{path} does not exist: the adapter in {directory} was not pruned "
                              "(or its prune plan was not saved beside it)")
    try:
        return PrunePlan.from_json(path.read_text())
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


__all__ = [
    "MASK_GLOB",
    "MASK_MODULE",
    "PLAN_FILE",
    "Block",
    "EarlyPruning",
    "ModuleImportance",
    "PrunePlan",
    "PruneRatios",
    "PruningMasks",
    "RankImportance",
    "StepWindow",
    "attach_masks",
    "detach_masks",
    "find_blocks",
    "load_plan",
    "lora_branch",
    "lowest_at_quantile",
    "mask_l1_term",
    "output_ratio",
    "parse_prune_spec",
    "plan_from_masks",
    "prune_adapter",
    "save_plan",
    "select_modules",
    "select_ranks",
    "taylor_rank_scores",
]
