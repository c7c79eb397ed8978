"""Deltas on slices of a fused projection's output rows (attn.q of Phi-3's qkv_proj, the query
third of GPT-2's c_attn; core/sites.py `RowSlice`).

A sliced LoRA keeps one low-rank block per slice, as separate projections would have: A stacks
the slices' A_i (k·r, d_in) and B their B_i over the slices' rows (n_rows, r). Everything that
reads a LoRA as factors — mixed batches, merging, composition, pruning's importance, the peft
codec — gets `factors()`: B scattered block-diagonally into (d_out, k·r), zeros on every row no
slice owns, so ΔW = s·B A is exact and rank k·r. The single-adapter forward computes only the
slices' rows and adds them with `index_add`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core.errors import CapabilityError, ConfigError
from ..core.layer import AdaptedLayer
from ..core.method import pattern_value
from ..core.sites import Site


def slice_rows(site: Site, device: torch.device) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(the rows the site's slices own, slice after slice, as a long tensor; each slice's size)."""
    return (torch.tensor(site.rows, dtype=torch.long, device=device),
            tuple(sl.size for sl in site.slices))


def scatter_blocks(blocks: Sequence[torch.Tensor], rows: torch.Tensor, d_out: int) -> torch.Tensor:
    """Blocks (n_i, r_i) placed block-diagonally on their rows of a (d_out, Σ r_i) zero matrix;
    differentiable in the blocks."""
    diagonal = torch.block_diag(*blocks)                                  # (n_rows, Σ r_i)
    return diagonal.new_zeros(d_out, diagonal.shape[1]).index_copy(0, rows, diagonal)


class SlicedLowRank:
    """LowRankDelta's behaviour on row slices (mixed into `SlicedLowRankDelta` in lora.py): the
    delta holds `rows` (a non-persistent buffer), `block_sizes` and `d_out`; `r` is the rank of
    each slice's block."""

    def hold_slices(self, site: Site, d_in: int, d_out: int, dtype: torch.dtype, device: torch.device) -> None:
        """Reshape the (uninitialised) factors for the site's slices: A (k·r, d_in), B (n_rows, r)."""
        rows, sizes = slice_rows(site, device)
        self.__dict__.update(block_sizes=sizes, d_out=d_out)
        self._buffers["rows"] = rows
        self._non_persistent_buffers_set.add("rows")
        for name, shape in (("lora_A", (len(sizes) * self.r, d_in)), ("lora_B", (len(rows), self.r))):
            self._parameters[name] = nn.Parameter(torch.empty(shape, dtype=dtype, device=device),
                                                  requires_grad=False)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) with s·B A = ΔW on the whole layer: B (d_out, k·r) block-diagonal on the slices'
        rows, zero elsewhere; A (k·r, d_in). With the weights' gradients."""
        B = self.lora_B
        return scatter_blocks(B.split(self.block_sizes), self.rows, self.d_out), self.lora_A

    def delta_weight(self) -> torch.Tensor:
        """ΔW as an fp32 (d_out, d_in) matrix."""
        B, A = self.factors()
        return (B.float() @ A.float()) * self.scaling

    def contribute(self, layer: AdaptedLayer, x: torch.Tensor, base_out: torch.Tensor,
                   out: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        dtype, (A, Bt) = self._factors(out.dtype, out.device)              # (k·r, d_in), (r, n_rows)
        h = self._down(x, A, dtype).reshape(-1, A.shape[0])                # (N, k·r)
        r = self.r
        update = torch.cat([h[:, i * r:(i + 1) * r] @ block
                            for i, block in enumerate(Bt.split(self.block_sizes, dim=1))], dim=1)
        flat = out.reshape(-1, out.shape[-1])
        acc = flat if flat.dtype == dtype else flat.to(dtype)
        acc = acc.index_add(1, self.rows, update, alpha=self.scaling)     # only the slices' rows
        return acc.view(out.shape) if acc.dtype == out.dtype else acc.to(out.dtype).view(out.shape)

    def _keep(self, **_: object) -> None:
        raise CapabilityError("structural pruning of a LoRA on slices of a fused projection "
                              "(attn.q of a qkv_proj) is not supported: its rank units are per slice. "
                              "Target the whole projection ('attn.qkv') to prune it")


def slice_pattern_value(patterns: dict[str, Any], site: Site, field_name: str) -> Any | None:
    """`pattern_value` for a site; on a sliced site (sub-roles of a fused projection) every
    slice's sub-role must get the same value: the slices share one rank and scaling."""
    if not site.slices or not patterns:
        return pattern_value(patterns, site)
    values = {sl.role: pattern_value(patterns, dataclasses.replace(site, role=sl.role, slices=()))
              for sl in site.slices}
    if len(set(values.values())) > 1:
        raise ConfigError(f"{field_name} gives the slices of the fused projection {site.path!r} "
                          f"different values ({values}); they share one rank and scaling there: give "
                          "them the same value, or adapt them with separate adapters")
    return next(iter(values.values()))


def refuse_on_slices(what: str, site: Site) -> None:
    """CapabilityError for a variant that cannot act on a slice of a fused projection."""
    raise CapabilityError(f"{what} is not supported on slices of the fused projection {site.path!r} "
                          f"({site.label}); target the whole projection ({site.role!r} or its path)")
