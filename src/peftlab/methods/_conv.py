"""LoRA, (IA)³ and BitFit on torch convolutions (nn.Conv1d / Conv2d / Conv3d, layer kind "conv").

A convolution's activations are (batch, channels, *positions): channels are dim 1, not the last
dim the Linear forms act on, so every per-channel vector here is viewed (channels, 1, ..., 1),
and in a routed batch each example's (B, channels, 1, ..., 1).

LoRA follows peft's conv LoRA (peft/tuners/lora/layer.py `_ConvNd`): A is a conv with the
base's kernel, stride and padding and r output channels, B a 1×1 conv (out, r), and
B(A(x)) = conv(x, ΔW) with ΔW[o, i, k] = Σ_r B[o, r] A[r, i, k], so merging adds s·ΔW to the
weight. The tensors keep peft's shapes — lora_A (r, in, *kernel), lora_B (out, r, 1, ...),
DoRA's magnitude (1, out, 1, ...) — so the peft codec passes them through. Our A also takes the
base's dilation and padding mode, without which B(A(x)) would not be conv(x, ΔW); peft's A
omits them, so peft export refuses a dilated or non-zero-padded conv (`check_peft_conv`).
Grouped convolutions (groups > 1, e.g. Mamba's depthwise conv1d) are refused for LoRA: peft's A
mixes every input channel there, so its ΔW is no grouped weight and cannot merge (peft refuses
to merge them too). A routed batch runs every example's A as one grouped convolution (groups =
examples: example b's channels meet only its own adapter's A) and B as one batched matmul, with
no loop over the adapters. PiSSA is refused on convolutions (peft has no conv PiSSA either).

(IA)³ scales output channels (or, feed-forward, input channels: grouped convs included, as peft
merges them); peft has IA3 for Conv2d / Conv3d only, so an IA3 adapter on an nn.Conv1d is saved
in peftlab's layout and export refuses it. BitFit adds a bias over the output channels (creating
one at merge where the conv has none).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import CapabilityError, ConfigError
from ..core.geometry import ConvGeometry, conv_geometry, is_conv
from ..core.layer import AdaptedLayer, Delta, MixedDeltas
from ..core.precision import adapter_dtype, cast_at_use, cast_one, compute_dtype
from ..core.sites import Site

_CONV_FNS: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_like(base: nn.Module, x: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """`x` convolved with `weight` (no bias) as the conv `base` slides: its stride, padding and
    padding mode, dilation; in `groups` groups."""
    fn = _CONV_FNS[weight.dim() - 2]
    padding = base.padding
    if base.padding_mode != "zeros":   # as nn.Conv*d: pad first, then convolve unpadded
        x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
        padding = 0
    return fn(x, weight, None, base.stride, padding, base.dilation, groups)


def channels(v: torch.Tensor, spatial: int) -> torch.Tensor:
    """A per-channel vector (d,) as (d, 1, ..., 1): it broadcasts over a conv activation's
    positions, batched (N, d, *positions) or not."""
    return v.view(-1, *(1,) * spatial)


def example_channels(values: torch.Tensor, spatial: int) -> torch.Tensor:
    """Per-example channel vectors (B, d) as (B, d, 1, ..., 1)."""
    return values.view(*values.shape, *(1,) * spatial)


def check_peft_conv(module: nn.Module, path: str) -> None:
    """CapabilityError when peft's conv LoRA would compute something else than ours at this conv
    (none for any other layer): peft builds A with the base's kernel, stride and padding only."""
    if not is_conv(module):
        return
    g = conv_geometry(module)
    odd = [f"dilation={g.dilation}"] if any(d != 1 for d in g.dilation) else []
    odd += [f"padding_mode={g.padding_mode!r}"] if g.padding_mode != "zeros" else []
    if odd:
        raise CapabilityError(
            f"the convolution at {path!r} has {', '.join(odd)}: peft 0.21's conv LoRA builds A without "
            "them, so peft would compute another function there. This adapter has no peft form "
            "(save_adapter keeps it in peftlab's layout); exclude that conv to export to peft")


# ---- LoRA ------------------------------------------------------------------------------------------
class MixedConvLowRank(MixedDeltas):
    """The conv LoRA deltas of a routed batch. A is stacked (S, r_max, in, *kernel), zero-padded to
    the largest rank, and every example's rows gathered into one grouped convolution (groups =
    examples); s·B is stacked (S, out, r_max) and applied by one batched matmul over the
    positions. DoRA's per-channel scale m/‖W + ΔW‖ is folded into B and its (scale − 1)·W x term
    added (the scale is 1 off DoRA slots), as MixedLowRank does for linear layers."""

    def __init__(self, layer: AdaptedLayer, slots: list[ConvLowRankDelta | None]) -> None:
        super().__init__(layer, slots)
        live = [d for d in slots if d is not None]
        device = live[0].lora_A.device
        self.spatial = live[0].spatial
        self.stored = functools.reduce(torch.promote_types, [d.lora_A.dtype for d in live])
        self.dora_slots = [i for i, d in enumerate(slots) if d is not None and d.dora]
        drop = [d.dropout.p if d is not None and d.dropout is not None else 0.0 for d in slots]
        self.keep = torch.tensor([1.0 - p for p in drop], device=device) if any(drop) else None

    def stack(self, layer: AdaptedLayer, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A (S, r_max, in, *kernel), s·B (S, out, r_max) with DoRA's scale folded in, and DoRA's
        per-channel scale (S, out) or None."""
        g = conv_geometry(layer.base_layer)
        r_max = max(d.r for d in self.slots if d is not None)
        device = next(d for d in self.slots if d is not None).lora_A.device
        As, Bs = [], []
        for d in self.slots:
            if d is None:
                As.append(torch.zeros(r_max, g.in_channels, *g.kernel, dtype=dtype, device=device))
                Bs.append(torch.zeros(g.out_channels, r_max, dtype=dtype, device=device))
                continue
            A, B = d.lora_A.to(dtype), d.lora_B.flatten(1).to(dtype) * d.scaling
            pad = r_max - d.r      # padded ranks add exactly 0
            As.append(torch.cat([A, A.new_zeros(pad, *A.shape[1:])]) if pad else A)
            Bs.append(torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1) if pad else B)
        A, B = torch.stack(As), torch.stack(Bs)
        row_scale = None
        if self.dora_slots:
            # m / ‖W + ΔW‖ per output channel, a constant for the gradient (DoRA §4.3), in fp32
            index = torch.tensor(self.dora_slots, device=device)
            weight = layer.base_layer.weight.float().flatten(1)                     # (out, in·k)
            dw = torch.bmm(B[index].float(), A[index].float().flatten(2))           # (n, out, in·k)
            norm = torch.linalg.norm(weight + dw, dim=2).detach()
            m = torch.stack([self.slots[i].magnitude.float().flatten() for i in self.dora_slots])
            row_scale = torch.ones(len(self.slots), g.out_channels, dtype=dtype, device=device).index_copy(
                0, index, (m / norm).to(dtype))
            B = B * row_scale[:, :, None]
        return A, B, row_scale

    def contribute(self, layer, x, base_out, out, index):
        n, base = index.shape[0], layer.base_layer
        dtype = compute_dtype(self.stored, out.dtype, out.device)
        A, B, row_scale = self.stacks(layer, dtype)
        if self.keep is not None and layer.training:    # dropout at each row's adapter's rate
            keep = self.keep[index].view(n, *(1,) * (x.dim() - 1))
            x = x * torch.bernoulli(keep.expand_as(x)) / keep
        x = x.to(dtype)
        rows = self.rows(A, index)                                          # (B, r_max, in, *k)
        h = conv_like(base, x.reshape(1, -1, *x.shape[2:]), rows.flatten(0, 1), groups=n)
        h = h.reshape(n, A.shape[1], -1)                                    # (B, r_max, P)
        acc = out.reshape(n, out.shape[1], -1).to(dtype)                    # (B, out, P)
        if row_scale is not None:      # DoRA: (scale − 1) · W x, W x without the bias
            if self.keep is not None and layer.training:
                plain = conv_like(base, x, base.weight.to(dtype))
            else:
                plain = base_out if base.bias is None else base_out - channels(base.bias, self.spatial)
            acc = acc + (self.rows(row_scale, index) - 1)[:, :, None] * plain.reshape(acc.shape).to(dtype)
        acc = torch.baddbmm(acc, self.rows(B, index), h)
        return acc.to(out.dtype).view(out.shape)


class ConvLowRankDelta(Delta):
    """peft's conv LoRA: s · B(A(x)), A a conv like the base's (r output channels), B a 1×1
    conv; optionally DoRA-normalised per output channel. Attribute names follow LowRankDelta
    (r, scaling, dora, lora_A, lora_B, magnitude, `factors`, `delta_weight`), so the LoRA codec
    and composition read both alike."""

    mixed = MixedConvLowRank
    pissa = False
    embedding = False

    def __init__(self, geometry: ConvGeometry, r: int, scaling: float, *, dropout: float = 0.0,
                 dora: bool = False, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        ones = (1,) * geometry.spatial
        self.__dict__.update(r=r, scaling=scaling, dora=dora, spatial=geometry.spatial, _cast=(),
                             _cast_dora=(), algebra="none" if dora else "add")
        empty = lambda *shape: torch.empty(*shape, dtype=dtype, device=device)
        params = self._parameters
        params["lora_A"] = nn.Parameter(empty(r, geometry.in_channels, *geometry.kernel), requires_grad=False)
        params["lora_B"] = nn.Parameter(empty(geometry.out_channels, r, *ones), requires_grad=False)
        params["magnitude"] = (nn.Parameter(empty(1, geometry.out_channels, *ones), requires_grad=False)
                               if dora else None)
        self._modules["dropout"] = nn.Dropout(dropout) if dropout > 0 else None

    @torch.no_grad()
    def initialise(self, layer: AdaptedLayer, init: str) -> None:
        """As peft: A ~ N(0, 1/r²) for "gaussian", else U(±1/√fan_in) (kaiming_uniform_ with
        a=√5, fan_in = in·kernel); B = 0, or U(±1/√r) for "random"; DoRA's m = ‖W + ΔW‖."""
        A, B = self.lora_A, self.lora_B
        if init == "gaussian":
            A.normal_(std=1.0 / self.r)
        else:
            bound = 1 / math.sqrt(A[0].numel())
            A.uniform_(-bound, bound)
        if init == "random":
            B.uniform_(-1 / math.sqrt(self.r), 1 / math.sqrt(self.r))
        else:
            B.zero_()
        if self.magnitude is not None:
            merged = layer.base_layer.weight.float() + self.delta_weight()
            self.magnitude.copy_(torch.linalg.norm(merged.flatten(1), dim=1).view(self.magnitude.shape))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) with s · B A = ΔW flattened to (out, in·kernel): (out, r) and (r, in·kernel)
        views of the stored tensors, with their gradients."""
        return self.lora_B.flatten(1), self.lora_A.flatten(1)

    def delta_weight(self) -> torch.Tensor:
        """s·ΔW as an fp32 tensor shaped like the base weight (out, in, *kernel)."""
        A = self.lora_A.float()
        return (self.lora_B.float().flatten(1) @ A.flatten(1)).view(-1, *A.shape[1:]) * self.scaling

    def _factors(self, activation: torch.dtype, device: torch.device
                 ) -> tuple[torch.dtype, list[torch.Tensor]]:
        """The compute dtype and [A (r, in, *kernel), B (out, r)] in it (cached between updates:
        `cast_at_use`)."""
        p = self._parameters
        dtype = compute_dtype(p["lora_A"].dtype, activation, device)
        return dtype, cast_at_use(self, [p["lora_A"], p["lora_B"]], dtype, self._prepare)

    @staticmethod
    def _prepare(raw: list[torch.Tensor], dtype: torch.dtype, cached: bool) -> list[torch.Tensor]:
        return [raw[0].to(dtype), raw[1].to(dtype).flatten(1)]

    def _row_scale(self, layer: AdaptedLayer, dtype: torch.dtype) -> torch.Tensor:
        """DoRA's m / ‖W + ΔW‖ per output channel (out,), the norm in fp32 and a constant for the
        gradient; cached until W, A, B or m change (see LowRankDelta._row_scale)."""
        def prepare(raw: list[torch.Tensor], dtype: torch.dtype, cached: bool) -> list[torch.Tensor]:
            merged = layer.base_layer.weight.float() + self.delta_weight().detach()
            return [(raw[0].float().flatten() / torch.linalg.norm(merged.flatten(1), dim=1)).to(dtype)]
        p = self._parameters
        raw = [p["magnitude"], layer.base_layer.weight, p["lora_A"], p["lora_B"]]
        return cast_at_use(self, raw, dtype, prepare, slot="_cast_dora")[0]

    def contribute(self, layer, x, base_out, out):
        # B, a 1×1 conv, runs as a matmul over the flattened positions: F.conv2d with 8 input
        # channels takes ~8× a matmul's time on CPU (16 × 64 × 32 × 32, r 8: 8.2 vs 1.0 ms)
        base = layer.base_layer
        dtype, (A, B) = self._factors(out.dtype, out.device)                 # B: (out, r)
        if self.dropout is not None:
            x = self.dropout(x)
        x = x.to(dtype)
        h = conv_like(base, x, A).flatten(-self.spatial)                    # (N, r, P) or (r, P)
        acc = out.to(dtype).flatten(-self.spatial)                          # (N, out, P) or (out, P)
        if not self.dora:      # peft's result + lora_B(lora_A(dropout(x))) * scaling, fused
            if h.dim() == 3:
                acc = torch.baddbmm(acc, B.expand(h.shape[0], -1, -1), h, alpha=self.scaling)
            else:
                acc = torch.addmm(acc, B, h, alpha=self.scaling)
            return acc.to(out.dtype).view(out.shape)
        # DoRA, as peft: a correction on the base output, W x recomputed on a dropped-out input
        scale = self._row_scale(layer, dtype)[:, None]                       # (out, 1)
        if self.dropout is not None and self.training:
            plain = conv_like(base, x, base.weight.to(dtype))
        else:
            plain = base_out if base.bias is None else base_out - channels(base.bias, self.spatial)
        plain = plain.to(dtype).flatten(-self.spatial)
        y = acc + (scale - 1) * plain + scale * (B @ h) * self.scaling
        return y.to(out.dtype).view(out.shape)

    @torch.no_grad()
    def merge_into(self, layer: AdaptedLayer) -> None:
        w = layer.base_layer.weight
        merged = w.float() + self.delta_weight()
        if self.magnitude is not None:    # DoRA: output channels rescaled to m / ‖W + ΔW‖
            norm = torch.linalg.norm(merged.flatten(1), dim=1)
            merged *= (self.magnitude.float().flatten() / norm).view(-1, *(1,) * (merged.dim() - 1))
        w.copy_(merged.to(w.dtype))


def build_conv_lora(site: Site, layer: AdaptedLayer, config, initialise: bool = True) -> ConvLowRankDelta:
    """LoRA's delta at a conv site (`config` a LoraConfig: its rank, scaling and dropout);
    ConfigError for a grouped conv and for PiSSA."""
    geometry = conv_geometry(layer.base_layer)
    if geometry.groups > 1:
        raise ConfigError(
            f"LoRA cannot attach to the grouped convolution at {site.path!r} (groups={geometry.groups}): "
            "peft's conv LoRA mixes every input channel in A, so its ΔW is no grouped weight and "
            "cannot be merged (peft refuses merging there too). Exclude it (exclude=[...]) or use "
            "IA3 / BitFit there")
    if config.init == "pissa":
        raise ConfigError(f"LoRA init='pissa' is not supported on the convolution at {site.path!r}; "
                          "exclude it or use init='zero'")
    weight = layer.base_layer.weight
    delta = ConvLowRankDelta(geometry, config.rank_at(layer, site), config.scaling_for(site),
                             dropout=config.dropout, dora=config.dora,
                             dtype=adapter_dtype(config, weight.dtype), device=weight.device)
    if initialise:
        delta.initialise(layer, config.init)
    return delta


def conv_lora_shapes(layer: AdaptedLayer, r: int, dora: bool) -> dict[str, tuple[int, ...]]:
    """The tensors of a conv LoRA delta of rank r, in peft's shapes."""
    g = conv_geometry(layer.base_layer)
    ones = (1,) * g.spatial
    shapes = {"lora_A": (r, g.in_channels, *g.kernel), "lora_B": (g.out_channels, r, *ones)}
    if dora:
        shapes["magnitude"] = (1, g.out_channels, *ones)
    return shapes


# ---- (IA)³ -----------------------------------------------------------------------------------------
class MixedConvScales(MixedDeltas):
    """The conv IA3 vectors of a routed batch stacked (S, d), ones where a slot has none; every
    example scales its channels by its own slot's vector."""

    def stack(self, layer: AdaptedLayer, dtype: torch.dtype) -> torch.Tensor:
        one = torch.ones_like(next(d for d in self.slots if d is not None).ia3_l, dtype=dtype)
        return torch.stack([d.ia3_l.to(dtype) if d is not None else one for d in self.slots])

    def scales(self, layer: AdaptedLayer, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(B, d, 1, ..., 1) in `like`'s dtype."""
        return example_channels(self.rows(self.stacks(layer, like.dtype), index), like.dim() - 2)


class MixedConvInputScales(MixedConvScales):
    stage = "input"

    def transform_input(self, layer, x, index):
        return x * self.scales(layer, index, x)


class MixedConvOutputScales(MixedConvScales):
    def contribute(self, layer, x, base_out, out, index):
        return out * self.scales(layer, index, out)


class ConvScaleDelta(Delta):
    """(IA)³ on a conv: `ia3_l` (d,) scales the output channels (stage "output") or the input
    channels (stage "input", a feed-forward site); tensor and attribute names as IA3Delta's."""

    def __init__(self, size: int, scale_input: bool, spatial: int, *, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.__dict__.update(scale_input=scale_input, spatial=spatial,
                             stage="input" if scale_input else "output",
                             algebra="input" if scale_input else "scale",
                             mixed=MixedConvInputScales if scale_input else MixedConvOutputScales)
        self._parameters["ia3_l"] = nn.Parameter(torch.ones(size, dtype=dtype, device=device),
                                                 requires_grad=False)

    def contribute(self, layer, x, base_out, out):
        return out * channels(cast_one(self, self.ia3_l, out.dtype), self.spatial)

    def transform_input(self, layer, x):
        return x * channels(cast_one(self, self.ia3_l, x.dtype), self.spatial)

    @torch.no_grad()
    def merge_into(self, layer: AdaptedLayer) -> None:
        base = layer.base_layer
        w, l = base.weight, self.ia3_l.float()
        ones = (1,) * self.spatial
        if self.scale_input:
            # weight (out, in / groups, *k): output channel o of group g reads input channels
            # g·in/groups + j, so the vector is laid out per group
            groups = base.groups
            per_group = l.view(groups, 1, -1, *ones)                          # (G, 1, in/G, 1..)
            scaled = w.float().view(groups, -1, *w.shape[1:]) * per_group
            w.copy_(scaled.view(w.shape).to(w.dtype))
            return
        w.copy_((w.float() * l.view(-1, 1, *ones)).to(w.dtype))
        if base.bias is not None:
            base.bias.copy_((base.bias.float() * l).to(base.bias.dtype))


def build_conv_ia3(layer: AdaptedLayer, size: int, scale_input: bool, config) -> ConvScaleDelta:
    weight = layer.base_layer.weight
    return ConvScaleDelta(size, scale_input, conv_geometry(layer.base_layer).spatial,
                          dtype=adapter_dtype(config, weight.dtype), device=weight.device)


def ia3_peft_shape(module: nn.Module, path: str, size: int) -> tuple[int, ...]:
    """peft's shape of a conv's ia3_l, (1, d, 1, ..., 1); CapabilityError for an nn.Conv1d,
    which peft 0.21's IA3 does not adapt."""
    g = conv_geometry(module)
    if g.spatial == 1:
        raise CapabilityError(f"peft 0.21's IA3 adapts nn.Conv2d / Conv3d but not the nn.Conv1d at "
                              f"{path!r}, so this adapter has no peft form (save_adapter keeps it in "
                              "peftlab's layout); exclude that conv to export to peft")
    return (1, size, *(1,) * g.spatial)


# ---- BitFit ----------------------------------------------------------------------------------------
class MixedConvBiases(MixedDeltas):
    """The conv BitFit biases of a routed batch stacked (S, out), zeros where a slot has none."""

    def stack(self, layer: AdaptedLayer, dtype: torch.dtype) -> torch.Tensor:
        zero = torch.zeros_like(next(d for d in self.slots if d is not None).bias, dtype=dtype)
        return torch.stack([d.bias.to(dtype) if d is not None else zero for d in self.slots])

    def contribute(self, layer, x, base_out, out, index):
        return out + example_channels(self.rows(self.stacks(layer, out.dtype), index), out.dim() - 2)


class ConvBiasDelta(Delta):
    """BitFit on a conv: `bias` (out,) added to every position of the output channels."""

    stage = "output"
    algebra = "add"
    mixed = MixedConvBiases

    def __init__(self, size: int, spatial: int, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.__dict__["spatial"] = spatial
        self._parameters["bias"] = nn.Parameter(torch.zeros(size, dtype=dtype, device=device),
                                                requires_grad=False)

    def contribute(self, layer, x, base_out, out):
        return out + channels(cast_one(self, self.bias, out.dtype), self.spatial)

    @torch.no_grad()
    def merge_into(self, layer: AdaptedLayer) -> None:
        base = layer.base_layer
        if base._parameters["bias"] is None:     # a conv without bias gains a frozen zero one
            base._parameters["bias"] = nn.Parameter(
                torch.zeros(self.bias.shape, dtype=base.weight.dtype, device=base.weight.device),
                requires_grad=False)
        base.bias.copy_((base.bias.float() + self.bias.float()).to(base.bias.dtype))   # one rounding


def build_conv_bias(layer: AdaptedLayer, config) -> ConvBiasDelta:
    base = layer.base_layer
    dtype = base.bias.dtype if base.bias is not None else base.weight.dtype
    return ConvBiasDelta(conv_geometry(base).out_channels, conv_geometry(base).spatial,
                         dtype=adapter_dtype(config, dtype), device=base.weight.device)
