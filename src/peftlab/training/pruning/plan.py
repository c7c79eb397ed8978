"""The base-model side of Light-PEFT pruning: `PrunePlan` (which query heads and FFN neurons go,
per layer), the mask-quantile rule that makes one (`plan_from_masks`), replaying it on a model
(`PrunePlan.apply`), and `prune_plan.json` beside the adapter (`save_plan` / `load_plan`)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...core.errors import CheckpointError, ConfigError
from ...core.files import commit_files, write_json
from ...core.model import AdaptedModel
from ...core.sites import iter_modules
from .blocks import Block, find_blocks
from .slicing import check_sliceable, set_head_counts, slice_projection
from .spec import PruneRatios

PLAN_FILE = "prune_plan.json"
PLAN_FORMAT = "peftlab-prune-plan"
PLAN_VERSION = 1


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
        """The JSON object `prune_plan.json` holds."""
        layer_map = lambda d: {str(k): v for k, v in sorted(d.items())}
        return {"format": PLAN_FORMAT, "format_version": PLAN_VERSION,
                "heads": layer_map(self.heads), "neurons": layer_map(self.neurons),
                "n_heads": layer_map(self.n_heads), "d_ff": layer_map(self.d_ff)}

    def to_json(self) -> str:
        """`to_dict` as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrunePlan:
        """The plan a `to_dict` object describes; CheckpointError when it is not one."""
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
        """The plan in `to_json` text; CheckpointError when it is not one."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"prune plan is not valid JSON (line {e.lineno}: {e.msg})") from None
        if not isinstance(data, dict):
            raise CheckpointError("prune plan JSON must be an object")
        return cls.from_dict(data)

    @property
    def is_empty(self) -> bool:
        """Whether the plan removes nothing."""
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
        root = model.model if isinstance(model, AdaptedModel) else model
        blocks = {b.layer: b for b in find_blocks(root)}
        modules = dict(iter_modules(root))
        work = [self._layer_slices(blocks, layer) for layer in sorted(set(self.heads) | set(self.neurons))]
        for slices in work:                                  # validate every touched module first
            for path, _, _ in slices["linears"]:
                check_sliceable(modules[path], path)
        for slices in work:
            for path, out_keep, in_keep in slices["linears"]:
                slice_projection(modules[path], out_keep, in_keep)
            if slices["attention"] is not None:
                path, kept_heads, kept_kv, head_dim = slices["attention"]
                set_head_counts(modules[path], kept_heads, kept_kv, head_dim)

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
            _check_made_for("{} heads", self.n_heads.get(layer), b.n_heads, layer)
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
            _check_made_for("an FFN width of {}", self.d_ff.get(layer), b.d_ff, layer)
            if neurons[0] < 0 or neurons[-1] >= b.d_ff:
                raise CheckpointError(f"the prune plan names FFN neuron {neurons[-1]} of layer {layer}, "
                                      f"which has {b.d_ff}")
            if len(neurons) >= b.d_ff:
                raise ConfigError(f"the prune plan removes every FFN neuron of layer {layer}; keep at least one")
            keep = _complement(b.d_ff, neurons)
            linears += [(b.up, keep, None)] + ([(b.gate, keep, None)] if b.gate else []) + [(b.down, None, keep)]
        return {"linears": linears, "attention": attention}


def _check_made_for(size: str, expected: int | None, actual: int, layer: int) -> None:
    """Raise when the plan was made for another size of this layer (`size` formats the expected
    one: "{} heads") than the model has now."""
    if expected is not None and expected != actual:
        raise CheckpointError(f"the prune plan was made for {size.format(expected)} in layer {layer}, "
                              f"but this model has {actual} there (already pruned, or another model?)")


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


def save_plan(directory: str | Path, plan: PrunePlan) -> Path:
    """Write `prune_plan.json` into `directory` atomically; returns its path."""
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
