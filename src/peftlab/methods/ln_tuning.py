"""LayerNorm tuning (Zhao et al., 2023, "Tuning LayerNorm in Attention"): train the norms' own
affine parameters.

Each targeted norm (LayerNorm, RMSNorm, ...) gets deltas Δγ (and Δβ where the norm has a bias),
zeros at start, added to its weight (and bias) for the forward: y = norm(x; γ + Δγ, β + Δβ).
The sum is taken in the wider dtype and rounded once to the norm's (AdaptedLayer), so fp32
deltas on a bf16 norm keep the norm's dtype.
Merging adds them into the base parameters (unmerging restores the copied ones: core/merging.py).

peft format (LN_TUNING): peft trains a whole copy of each targeted norm, saved as
`base_model.model.<path>.ln_tuning_layers.<param>` (every parameter of the norm: a bias too when
only weights were tuned); `to_peft` writes γ + Δγ (and β + Δβ, or β) and `from_peft` reads the
deltas back as the copy minus this model's base parameter. That difference is rounded, so a
peftlab save keeps our exact deltas beside peft's files (core/io.py decides by decoding).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import CheckpointError, ConfigError
from ..core.layer import AdaptedLayer, Delta, MixedDeltas
from ..core.method import Capability, Method, MethodConfig
from ..core.model import AdaptedModel, Adapter
from ..core.precision import adapter_dtype
from ..core.sites import Site, sites_at
from ..core.typology import Typology
from ..interop.peft_names import PREFIX, split_copies


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


# ---- peft format ---------------------------------------------------------------------------------
_PEFT_PART = "ln_tuning_layers"


def _to_peft(am: AdaptedModel, adapter: Adapter) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Each targeted norm as peft's tuned copy: its base parameters plus our deltas, computed as
    the forward computes them (base + Δ)."""
    tensors: dict[str, torch.Tensor] = {}
    for site in adapter.sites:
        layer = adapter.layers[site.path]
        deltas = layer.deltas[adapter.name].param_deltas(layer)
        for pname, t in layer.base_layer.state_dict().items():
            tuned = t + deltas[pname].detach() if pname in deltas else t.clone()
            tensors[f"{PREFIX}{site.path}.{_PEFT_PART}.{pname}"] = tuned
    fields = {"target_modules": [s.path for s in adapter.sites], "exclude_modules": None,
              "modules_to_save": list(adapter.copies) or None}
    return fields, tensors


def _from_peft(am: AdaptedModel, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], directory: Path
               ) -> tuple[LNTuningConfig, list[Site], dict[tuple[str, str], torch.Tensor]]:
    """The deltas of a peft LN_TUNING directory: each tuned norm copy minus this model's norm.
    Biases count as tuned when the file holds one that differs from the base (peft always tunes
    them; a norm without a bias has none). Tensors of modules_to_save copies come back keyed by
    the copied module's path."""
    copies, rest = split_copies(am, cfg, tensors)
    tuned: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in rest.items():
        path, _, pname = key[len(PREFIX):].rpartition(f".{_PEFT_PART}.")
        if not key.startswith(PREFIX) or not path or pname not in ("weight", "bias"):
            raise CheckpointError(f"tensor {key!r} is neither a tuned norm parameter "
                                  f"('{PREFIX}<module path>.{_PEFT_PART}.weight|bias') nor part of "
                                  "modules_to_save")
        tuned.setdefault(path, {})[pname] = t
    if not tuned:
        raise CheckpointError("the LN_TUNING adapter holds no tuned norm")
    sites = sites_at(am.model, list(tuned), am.site_roles())
    deltas: dict[tuple[str, str], torch.Tensor] = {}
    for site in sites:
        for pname, t in tuned[site.path].items():
            base = getattr(site.module, pname, None)
            if not isinstance(base, torch.Tensor) or base.shape != t.shape:
                raise CheckpointError(f"the tuned {pname} of {site.path!r} is {list(t.shape)}, but this "
                                      f"model's is {None if base is None else list(base.shape)}: a "
                                      "different base model?")
            deltas[(site.path, pname)] = t.to(base.dtype) - base.detach()
    # peft saves every bias of a tuned norm; tuned ones moved off the base
    with_bias = any(bool(d.any()) for (_, pname), d in deltas.items() if pname == "bias")
    if not with_bias:
        deltas = {k: d for k, d in deltas.items() if k[1] != "bias"}
    config = LNTuningConfig(targets=[s.path for s in sites], bias=with_bias,
                            modules_to_save=list(dict.fromkeys(p for p, _ in copies)) or None)
    return config, sites, {**deltas, **copies}


METHOD = Method(
    name="ln-tuning",
    title="LayerNorm tuning",
    config_cls=LNTuningConfig,
    typology=Typology(
        site_roles=("norm",),
        form="selection",
        integration="weight-delta",
        intra_connectivity="none (the norms' gain and bias vectors)",
        inter_connectivity="fixed (the norms' gain and bias apply as the model applies them)",
        adaptation="selection",
        parameter_sharing="none",
        input_type="the hidden state the norm normalises",
        insertion="in-place",
        insertions_per_layer="1 per norm (2 per layer: pre-attention and pre-FFN, plus the final norm)",
        workspace="the norms around attention and FFN sublayers",
        param_formula="d per norm (weight), + d where the norm has a bias",
    ),
    layer_kinds=("norm",),
    capabilities=frozenset({Capability.MERGE, Capability.MIXED_BATCH, Capability.TRAIN_IN_MIXED_BATCH,
                            Capability.QUANTISED_BASE}),
    composition="additive",
    build=_build,
    tensor_shapes=_tensor_shapes,
    describe=_describe,
    peft_type="LN_TUNING",
    to_peft=_to_peft,
    from_peft=_from_peft,
    train_lr=5e-3,
)
