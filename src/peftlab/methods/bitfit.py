"""BitFit (Ben Zaken et al., 2022): train only the bias terms.

Each targeted layer gets a bias delta b ∈ R^{d_out} (zeros at start) added to its output:
y = f(x) + b. For a layer with a bias this is training that bias; a layer without one (Llama's
bias-free projections and RMSNorms) gains one. Merging adds b into the base bias, creating a
frozen zero bias first where the layer has none (unmerging restores the copied base, "no bias"
included: core/merging.py). A norm whose forward has no bias term at all (RMSNorm) cannot hold a merged
bias: merging there raises CapabilityError, and the delta stays an output addition.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.errors import CapabilityError
from ..core.layer import AdaptedLayer, Delta, MixedDeltas, per_example
from ..core.method import Capability, Method, MethodConfig
from ..core.precision import adapter_dtype, cast_one
from ..core.sites import Site
from ..core.typology import Typology
from ._conv import build_conv_bias


@dataclass
class BitFitConfig(MethodConfig):
    """BitFit on Linear, GPT-2 Conv1D, norm and torch convolution sites (default: every linear
    layer but the head, and every norm; convolutions when targeted: methods/_conv.py)."""

    targets: str | list[str] = field(default_factory=lambda: ["all-linear", "norm"])


def bias_slot(layer: AdaptedLayer) -> bool:
    """Whether the base layer's forward reads a `bias` parameter (possibly None): Linear,
    Conv1D and LayerNorm do; RMSNorm implementations have no bias at all."""
    return "bias" in layer.base_layer._parameters


class MixedBiases(MixedDeltas):
    """The BitFit biases of a routed batch stacked (S, d_out), zeros where a slot has none; every
    row adds its own slot's bias."""

    def stack(self, layer: AdaptedLayer, dtype: torch.dtype) -> torch.Tensor:
        zero = torch.zeros_like(next(d for d in self.slots if d is not None).bias, dtype=dtype)
        return torch.stack([d.bias.to(dtype) if d is not None else zero for d in self.slots])

    def contribute(self, layer, x, base_out, out, index):
        return out + per_example(self.rows(self.stacks(layer, out.dtype), index), out)


class BiasDelta(Delta):
    """A bias `bias` (d_out,) added to the wrapped layer's output."""

    stage = "output"
    algebra = "add"
    mixed = MixedBiases

    def __init__(self, size: int, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self._parameters["bias"] = nn.Parameter(torch.zeros(size, dtype=dtype, device=device),
                                                requires_grad=False)

    def contribute(self, layer, x, base_out, out):
        return out + cast_one(self, self.bias, out.dtype)    # cast at use, cached between updates

    def check_merge(self, layer: AdaptedLayer) -> None:
        if not bias_slot(layer):
            name = next((n for n, d in layer.deltas.items() if d is self), "?")
            raise CapabilityError(
                f"BitFit adapter {name!r} cannot be merged into {type(layer.base_layer).__name__}: "
                "that norm has no bias term in its forward, so a merged bias would be ignored. "
                "Keep the adapter unmerged, or exclude the norms (exclude='norm') to merge")

    @torch.no_grad()
    def merge_into(self, layer: AdaptedLayer) -> None:
        base = layer.base_layer
        if base._parameters["bias"] is None:
            weight = layer.weight_out_in()   # a quantised base: its dense weight, not the packed bytes
            base._parameters["bias"] = nn.Parameter(
                torch.zeros(self.bias.shape, dtype=weight.dtype, device=weight.device),
                requires_grad=False)
        base.bias.copy_((base.bias.float() + self.bias.float()).to(base.bias.dtype))   # one rounding


def _build(site: Site, layer: AdaptedLayer, config: BitFitConfig, initialise: bool = True) -> Delta:
    if layer.kind == "conv":
        return build_conv_bias(layer, config)
    weight = layer.base_layer.weight
    bias = getattr(layer.base_layer, "bias", None)
    dtype = bias.dtype if isinstance(bias, torch.Tensor) else weight.dtype
    return BiasDelta(layer.out_features, dtype=adapter_dtype(config, dtype), device=weight.device)


def _tensor_shapes(layer: AdaptedLayer, site: Site, config: BitFitConfig) -> dict[str, tuple[int, ...]]:
    return {"bias": (layer.out_features,)}


def _describe(config: BitFitConfig) -> str:
    targets = [config.targets] if isinstance(config.targets, str) else config.targets
    return "biases of " + ", ".join(targets)


METHOD = Method(
    name="bitfit",
    title="BitFit",
    config_cls=BitFitConfig,
    typology=Typology(
        site_roles=("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o",
                    "ffn.up", "ffn.gate", "ffn.down", "norm"),
        form="bias",
        integration="weight-delta",
        intra_connectivity="none (bias vectors)",
        inter_connectivity="fixed (the biases are added as the model adds them, whatever the input)",
        adaptation="selection",
        parameter_sharing="none",
        input_type="none (a constant added to the layer output)",
        insertion="in-place",
        insertions_per_layer="1 per linear layer and norm (every bias vector)",
        workspace="every sublayer: attention and FFN projections and the norms",
        param_formula="d_out per site",
    ),
    layer_kinds=("linear", "conv1d", "norm", "conv"),
    capabilities=frozenset({Capability.MERGE, Capability.MIXED_BATCH, Capability.TRAIN_IN_MIXED_BATCH,
                            Capability.QUANTISED_BASE}),
    merge_condition="not into a norm without a bias term (RMSNorm)",
    composition="additive",
    build=_build,
    tensor_shapes=_tensor_shapes,
    describe=_describe,
    train_lr=5e-3,
)
