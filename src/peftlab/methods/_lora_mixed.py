"""LoRA's batched form for routed batches (`AdaptedModel.routed`): every example on its own
adapter's factors, two batched matmuls for the whole batch (methods/lora.py's LowRankDelta.mixed)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from ..core.errors import CapabilityError
from ..core.layer import AdaptedLayer, MixedDeltas, per_example
from ..core.precision import HALF, compute_dtype

if TYPE_CHECKING:
    from .lora import LowRankDelta


class MixedLowRank(MixedDeltas):
    """The LoRA deltas of a routed batch: row b on slot i gets (x_b A_iᵀ)(s_i B_i)ᵀ, two batched
    matmuls over per-row gathered factors. Ranks differ between adapters, so the stacks are padded
    with zeros to the largest rank (a padded rank, like a slot without LoRA here, adds exactly 0):
    one gather + bmm pair whatever the mix, where grouping by rank needs a pair per rank plus a
    scatter (`bench/mixed_batch.py --rank-layout`: padding is faster unless one rank dwarfs the
    rest). PiSSA's frozen start is folded in as extra ranks (A0, −s·B0); DoRA's row scale
    m/‖W + ΔW‖ is folded into B and its (scale − 1)·W x term added (the scale is 1 off DoRA rows).
    """

    def __init__(self, layer: AdaptedLayer, slots: list[LowRankDelta | None]) -> None:
        super().__init__(layer, slots)
        live = [d for d in slots if d is not None]
        self.embedding, self.padding_idx = live[0].embedding, live[0].padding_idx
        device = live[0].lora_A.device
        self.stored = functools.reduce(torch.promote_types, [d.lora_A.dtype for d in live])
        self.scales = torch.tensor([d.scaling if d is not None else 0.0 for d in slots], device=device)
        self.dora_slots = [i for i, d in enumerate(slots) if d is not None and d.dora]
        self.dora = torch.tensor(self.dora_slots, dtype=torch.long, device=device)
        drop = [d.dropout.p if d is not None and d.dropout is not None else 0.0 for d in slots]
        self.keep = torch.tensor([1.0 - p for p in drop], device=device) if any(drop) else None
        # the stacked ranks share one dropout mask, but PiSSA's frozen start (A0, −s·B0) must see
        # the undropped input (LowRankDelta.contribute): refused in training, below
        self.pissa_dropped = any(d is not None and d.pissa and d.dropout is not None for d in slots)

    def stack(self, layer: AdaptedLayer, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A (S, r_max, d_in) — for an embedding the (S·vocab, r_max) lookup table instead —,
        s·Bᵀ (S, r_max, d_out) with DoRA's row scale folded in, and DoRA's row scale (S, d_out)."""
        d_in, d_out = layer.in_features, layer.out_features
        As, Bs = [], []
        for d in self.slots:
            if d is None:
                As.append(torch.zeros(0, d_in, dtype=dtype, device=self.scales.device))
                Bs.append(torch.zeros(0, d_out, dtype=dtype, device=self.scales.device))
            else:
                B, A = d.factors()
                As.append(A.to(dtype))
                Bs.append(B.t().to(dtype))
        A = pad_sequence(As, batch_first=True)                                   # (S, r_max, d_in)
        Bt = pad_sequence(Bs, batch_first=True) * self.scales.to(dtype)[:, None, None]   # (S, r_max, d_out)
        row_scale = None
        if self.dora_slots:
            # m / ‖W + ΔW‖ per output row, as LowRankDelta._row_scale: a constant for the
            # gradient (DoRA §4.3), the norm in fp32
            weight = layer.weight_out_in().float()
            dw = torch.bmm(Bt[self.dora].transpose(1, 2).float(), A[self.dora].float())   # (n_dora, d_out, d_in)
            norm = torch.linalg.norm(weight + dw, dim=2).detach()
            m = torch.stack([self.slots[i].magnitude.float() for i in self.dora_slots])
            row_scale = torch.ones(len(self.slots), d_out, dtype=dtype, device=A.device).index_copy(
                0, self.dora, (m / norm).to(dtype))                              # (S, d_out)
            Bt = Bt * row_scale[:, None, :]
        if self.embedding:
            A = A.transpose(1, 2).reshape(-1, A.shape[1])                        # (S·vocab, r_max)
        return A, Bt, row_scale

    def contribute(self, layer, x, base_out, out, index):
        n = index.shape[0]
        dtype = compute_dtype(self.stored, out.dtype, out.device)    # as LowRankDelta
        # A CPU's half-precision bmm pays a fixed cost per example, so with one or two tokens per
        # row (decoding) fp32 factors are faster despite twice the bytes: 111 vs 158 µs a LoRA
        # site at 16 × 1 tokens, 16 adapters, r 16; from 4 tokens on bf16 wins (151 vs 166 µs).
        # Those stacks are built on first use, beside the half ones.
        if dtype in HALF and out.device.type == "cpu" and not self.embedding and x.numel() <= 2 * n * x.shape[-1]:
            dtype = torch.float32
        A, Bt, row_scale = self.stacks(layer, dtype)
        if self.embedding:   # token ids (B, ...): row b reads its slot's block of the table
            offset = index.view(n, *([1] * (x.dim() - 1))) * layer.in_features
            h = F.embedding(x + offset, A)                                      # (B, ..., r_max)
            if self.padding_idx is not None and h.requires_grad:   # as F.embedding's padding_idx:
                h = torch.where((x == self.padding_idx)[..., None], h.detach(), h)   # no gradient there
            h = h.reshape(n, -1, A.shape[1])
        else:
            if self.keep is not None and layer.training:    # dropout at each row's adapter's rate
                if self.pissa_dropped:
                    raise CapabilityError(
                        "a routed (mixed-adapter) batch in training mode cannot run PiSSA with dropout: "
                        "its frozen start must see the undropped input. Train one adapter at a time "
                        "(set_active), or use dropout=0 or eval mode for the routed batch")
                keep = per_example(self.keep[index][:, None], x)
                x = x * torch.bernoulli(keep.expand_as(x)) / keep
            x3 = x.reshape(n, -1, x.shape[-1]).to(dtype)                         # (B, T, d_in)
            h = torch.bmm(x3, self.rows(A, index).transpose(1, 2))              # (B, T, r_max)
        dora = None
        if row_scale is not None:    # DoRA: (scale − 1) · W x, W x without the bias
            if self.keep is not None and layer.training:
                plain = F.linear(x, layer.weight_out_in())
            else:
                bias = layer.base_layer.bias
                plain = base_out - bias if bias is not None else base_out
            dora = per_example(self.rows(row_scale, index) - 1, plain) * plain
        acc = out.reshape(n, -1, out.shape[-1]).to(dtype)                      # (B, T, d_out)
        if dora is None:
            # In place (a copy of the output less): what produced `out` (the base Linear / Conv1D /
            # Embedding, or an earlier scaling or bias) does not keep it for its backward.
            acc.baddbmm_(h, self.rows(Bt, index))
        else:        # the DoRA term keeps the base output for its backward
            acc = torch.baddbmm(acc, h, self.rows(Bt, index)) + dora.reshape(acc.shape)
        return acc.to(out.dtype).view(out.shape)
