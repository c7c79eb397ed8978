"""LayerNorm tuning (Zhao et al., 2023, "Tuning LayerNorm in Attention"): train the norms' own
affine parameters.

Each targeted norm (LayerNorm, RMSNorm, ...) gets deltas Δγ (and Δβ where the norm has a bias),
zeros at start, added to its weight (and bias) for the forward: y = norm(x; γ + Δγ, β + Δβ).
The sum is taken in the wider dtype and rounded once to the norm's (AdaptedLayer), so fp32
deltas on a bf16 norm keep the norm's dtype.
Merging adds them into the base parameters (unmerging restores the copied ones: core/merging.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.layer import AdaptedLayer, Delta, MixedDeltas
from ..core.method import Capability, Method, MethodConfig
from ..core.precision import adapter_dtype
from ..core.sites import Site
from ..core.typology import Typology


@dataclass
class LNTuningConfig(MethodConfig):
    """LayerNorm tuning on norm sites (default: every norm). `bias`: also train the norm biases
    where the norm has one (RMSNorm has none)."""

    targets: str | list[str] = field(default_factory=lambda: ["norm"])
    bias: bool = True

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.bias, bool):
            raise ConfigError(f"LNTuningConfig.bias must be True or False (train the norm biases "
                              f"where present), got {self.bias!r}")


def _has_bias(layer: AdaptedLayer) -> bool:
    return isinstance(getattr(layer.base_layer, "bias", None), torch.Tensor)


class MixedNormDeltas(MixedDeltas):
    """The norm deltas of a routed batch stacked (S, d), zeros where a slot has none; the layer
    applies every row's own weight and bias (`AdaptedLayer._call_per_example`)."""

    stage = "params"

    def stack(self, layer: AdaptedLayer) -> dict[str, torch.Tensor]:
        live = [d for d in self.slots if d is not None]
        dtype = functools.reduce(torch.promote_types, [d.weight.dtype for d in live])   # one stack
        zero = torch.zeros_like(live[0].weight, dtype=dtype)
        names = ["weight"] + (["bias"] if any(d.bias is not None for d in live) else [])
        return {name: torch.stack([zero if d is None or getattr(d, name) is None else getattr(d, name).to(dtype)
                                   for d in self.slots]) for name in names}

    def param_deltas(self, layer, index):
        return {name: self.rows(t, index) for name, t in self.stacks(layer).items()}


class NormDelta(Delta):
    """Additive deltas `weight` (and `bias`) on a norm's affine parameters."""

    stage = "params"
    algebra = "add"
    mixed = MixedNormDeltas

    def __init__(self, size: int, with_bias: bool, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        zeros = lambda: nn.Parameter(torch.zeros(size, dtype=dtype, device=device), requires_grad=False)
        self._parameters["weight"] = zeros()
        self._parameters["bias"] = zeros() if with_bias else None

    def param_deltas(self, layer):
        if self.bias is None:
            return {"weight": self.weight}
        return {"weight": self.weight, "bias": self.bias}

    @torch.no_grad()
    def merge_into(self, layer: AdaptedLayer) -> None:
        base = layer.base_layer
        for name, d in self.param_deltas(layer).items():
            p = getattr(base, name)
            p.copy_((p.float() + d.float()).to(p.dtype))     # one rounding into the base's dtype


def _shapes(layer: AdaptedLayer, config: LNTuningConfig) -> dict[str, tuple[int, ...]]:
    size = layer.base_layer.weight.shape[0]
    shapes = {"weight": (size,)}
    if config.bias and _has_bias(layer):
        shapes["bias"] = (size,)
    return shapes


def _build(site: Site, layer: AdaptedLayer, config: LNTuningConfig, initialise: bool = True) -> NormDelta:
    weight = layer.base_layer.weight
    shapes = _shapes(layer, config)
    return NormDelta(shapes["weight"][0], "bias" in shapes, dtype=adapter_dtype(config, weight.dtype),
                     device=weight.device)


def _tensor_shapes(layer: AdaptedLayer, site: Site, config: LNTuningConfig) -> dict[str, tuple[int, ...]]:
    return _shapes(layer, config)


def _describe(config: LNTuningConfig) -> str:
    return "norm weights and biases" if config.bias else "norm weights only"


METHOD = Method(
    name="ln-tuning",
    title="LayerNorm tuning",
    config_cls=LNTuningConfig,
    typology=Typology(
        site_roles=("norm",),
        form="selection",
        integration="weight-delta",
        intra_connectivity="none (the norms' gain and bias vectors)",
        adaptation="selection",
        parameter_sharing="none",
        input_type="the hidden state the norm normalises",
        insertion="in-place",
        insertions_per_layer="1 per norm (2 per layer: pre-attention and pre-FFN, plus the final norm)",
        workspace="the norms around attention and FFN sublayers",
        param_formula="d per norm (weight), + d where the norm has a bias",
    ),
    layer_kinds=("norm",),
    capabilities=frozenset({Capability.MERGE, Capability.MIXED_BATCH, Capability.TRAIN_IN_MIXED_BATCH}),
    composition="additive",
    build=_build,
    tensor_shapes=_tensor_shapes,
    describe=_describe,
    train_lr=5e-3,
)
