"""Structural pruning in place: a projection (nn.Linear or GPT-2 Conv1D) keeps some of its output
or input features and stays the same module, only smaller; the LoRA deltas on it are sliced to
match (`LowRankDelta.slice_features`), and an attention module's head counts follow."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...core.errors import AdapterError, CapabilityError
from ...core.geometry import dims, is_linear_like, unwrap, weight_axes
from ...core.layer import AdaptedLayer, ModuleCopies
from ...core.quantised import quantisation
from ...core.sites import iter_modules
from ...methods.lora import LowRankDelta
from .blocks import Block


def check_sliceable(module: nn.Module, path: str) -> None:
    """Raise unless the projection at `path` (and every adapter on it) can be sliced."""
    if isinstance(module, ModuleCopies):
        raise CapabilityError(f"{path!r} is trained whole (modules_to_save); it cannot be pruned")
    plain = unwrap(module)
    if not is_linear_like(plain):
        raise CapabilityError(f"{path!r} is a {type(plain).__name__}; pruning slices nn.Linear and "
                              "GPT-2 Conv1D projections only")
    if quantisation(plain):
        raise CapabilityError(f"{path!r} is bitsandbytes-quantised ({quantisation(plain)}): its packed "
                              "weight cannot be sliced; prune an unquantised model")
    if isinstance(module, AdaptedLayer):
        _check_deltas(module, path)


def _check_deltas(layer: AdaptedLayer, path: str) -> None:
    for name, delta in layer.deltas.items():
        if not isinstance(delta, LowRankDelta):
            raise CapabilityError(f"adapter {name!r} at {path!r} is a {type(delta).__name__}; Light-PEFT "
                                  "pruning slices LoRA adapters only (delete the other adapter first)")
        if delta.dora:
            raise CapabilityError(f"adapter {name!r} at {path!r} uses DoRA, whose row norms change when "
                                  "input columns are removed; Light-PEFT pruning supports plain LoRA")
        if name in layer.merged:
            raise AdapterError(f"adapter {name!r} is merged at {path!r}; unmerge it before pruning")


def check_blocks_sliceable(root: nn.Module, blocks: Sequence[Block], *, heads: bool, neurons: bool) -> None:
    """Every projection that pruning these kinds would slice can be sliced (adapters included)."""
    modules = dict(iter_modules(root))
    for b in blocks:
        paths = ([b.q, b.k, b.v, b.qkv, b.o] if heads else []) + ([b.up, b.gate, b.down] if neurons else [])
        for path in paths:
            if path is not None:
                check_sliceable(modules[path], path)


def _take(t: torch.Tensor, dim: int, keep: torch.Tensor | None) -> torch.Tensor:
    return t if keep is None else t.index_select(dim, keep.to(t.device))


@torch.no_grad()
def slice_projection(module: nn.Module, out_keep: torch.Tensor | None, in_keep: torch.Tensor | None) -> None:
    """Keep these output / input features of a Linear or Conv1D (in place: same module object,
    smaller tensors) and of every LoRA delta on it."""
    plain = unwrap(module)
    out_axis, in_axis = weight_axes(plain)
    weight = _take(_take(plain.weight.detach(), out_axis, out_keep), in_axis, in_keep)
    plain.weight = nn.Parameter(weight, requires_grad=plain.weight.requires_grad)
    if plain.bias is not None and out_keep is not None:
        plain.bias = nn.Parameter(_take(plain.bias.detach(), 0, out_keep), requires_grad=plain.bias.requires_grad)
    d_in, d_out = dims(plain)
    if isinstance(plain, nn.Linear):       # the size attributes the module's own code reads
        plain.in_features, plain.out_features = d_in, d_out
    else:
        plain.nx, plain.nf = d_in, d_out
    if isinstance(module, AdaptedLayer):
        for delta in module.deltas.values():
            delta.slice_features(in_index=in_keep, out_index=out_keep)


def set_head_counts(attention: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
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
