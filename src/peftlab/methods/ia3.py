"""(IA)³ (Liu et al., 2022): learned vectors that rescale activations elementwise.

An output-scaled site computes y = l ⊙ (W x + b) with l ∈ R^{d_out}; a feed-forward
(input-scaled) site computes y = W (l ⊙ x) + b with l ∈ R^{d_in}, which scales the FFN's
intermediate activation when placed on the down projection. l starts at ones, so a new adapter
is a no-op. Both forms fold into the base weight: W ← diag(l) W, b ← l ⊙ b (output) or
W ← W diag(l) (input). Unmerging restores the copied base bits (core/merging.py), so a zero
entry of l merges and unmerges exactly too.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import CheckpointError, ConfigError
from ..core.geometry import dims
from ..core.layer import AdaptedLayer, Delta, MixedDeltas, layer_kind, per_example
from ..core.method import (
    Capability,
    Method,
    MethodConfig,
    check_pattern_keys,
    pattern_value,
)
from ..core.model import AdaptedModel, Adapter
from ..core.precision import adapter_dtype, cast_one
from ..core.sites import Site, sites_at
from ..core.typology import Typology
from ..interop.peft_names import PREFIX, split_copies
from ._conv import build_conv_ia3, ia3_peft_shape
from ._row_slices import refuse_on_slices, slice_rows

TENSOR = "ia3_l"


def check_feedforward(value: Any, owner: str) -> list[str]:
    """A config's `feedforward` (one string or a list) as a list of roles or module-path regexes;
    ConfigError naming `owner`'s field when an entry is not a non-empty string or a valid regex.
    (IA3Config and Context-PEFT's IA3 form share it.)"""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) and v for v in items):
        raise ConfigError(f"{owner}.feedforward must be a list of roles or module-name patterns "
                          f"(non-empty strings such as 'ffn.down' or 'mlp.c_proj'), got {value!r}")
    check_pattern_keys(f"{owner}.feedforward", items)
    return list(items)


@dataclass
class IA3Config(MethodConfig):
    """(IA)³ on Linear, GPT-2 Conv1D and torch convolution sites (nn.Conv1d/2d/3d, whose
    channels are dim 1: methods/_conv.py).

    `feedforward`: roles or module-path regexes (matched at a dotted boundary, as peft does)
    whose vector scales the layer's input instead of its output; by default the FFN down
    projection, whose input is the FFN activation the paper rescales.
    """

    targets: str | list[str] = field(default_factory=lambda: ["attn.k", "attn.v", "ffn.down"])
    feedforward: list[str] = field(default_factory=lambda: ["ffn.down"])

    def validate(self) -> None:
        super().validate()
        check_feedforward(self.feedforward, "IA3Config")

    def scales_input(self, site: Site) -> bool:
        """Whether the site's vector scales the layer input (a feed-forward site)."""
        patterns = dict.fromkeys([self.feedforward] if isinstance(self.feedforward, str) else self.feedforward, True)
        # a sliced site is named by its slices' sub-roles too (attn.k of a qkv_proj)
        return bool(pattern_value(patterns, site)) or any(
            pattern_value(patterns, dataclasses.replace(site, role=sl.role, slices=())) for sl in site.slices)


class MixedScales(MixedDeltas):
    """The IA3 vectors of a routed batch stacked (S, d), ones where a slot has none; every row
    is scaled by its own slot's vector."""

    def stack(self, layer: AdaptedLayer, dtype: torch.dtype) -> torch.Tensor:
        one = torch.ones_like(next(d for d in self.slots if d is not None).scale_vector(), dtype=dtype)
        return torch.stack([d.scale_vector().to(dtype) if d is not None else one for d in self.slots])

    def scales(self, layer: AdaptedLayer, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(B, 1.., d) in `like`'s dtype (the vectors are cast at use)."""
        return per_example(self.rows(self.stacks(layer, like.dtype), index), like)


class MixedInputScales(MixedScales):
    stage = "input"

    def transform_input(self, layer, x, index):
        return x * self.scales(layer, index, x)


class MixedOutputScales(MixedScales):
    def contribute(self, layer, x, base_out, out, index):
        return out * self.scales(layer, index, out)


class IA3Delta(Delta):
    """One learned vector `ia3_l`: it scales the output (stage "output") or the input (stage
    "input") of the wrapped layer. On slices of a fused projection (`site` with slices) it
    scales only the slices' output rows: `ia3_l` has one entry per such row, identity elsewhere."""


    def __init__(self, size: int, scale_input: bool, *, dtype: torch.dtype, device: torch.device,
                 site: Site | None = None, d_out: int | None = None) -> None:
        super().__init__()
        if site is not None and site.slices:
            rows, _ = slice_rows(site, device)
            self._buffers["rows"] = rows
            self._non_persistent_buffers_set.add("rows")
            self.__dict__.update(d_out=d_out)
            size = len(rows)
        self.__dict__.update(scale_input=scale_input,
                             stage="input" if scale_input else "output",
                             algebra="input" if scale_input else "scale",
                             mixed=MixedInputScales if scale_input else MixedOutputScales)
        self._parameters[TENSOR] = nn.Parameter(torch.ones(size, dtype=dtype, device=device),
                                                requires_grad=False)

    def scale_vector(self) -> torch.Tensor:
        """The scaling of every output (input) feature: `ia3_l`, or on slices of a fused
        projection ones with `ia3_l` on the slices' rows (differentiable in `ia3_l`)."""
        rows = self._buffers.get("rows")
        if rows is None:
            return self.ia3_l
        return self.ia3_l.new_ones(self.d_out).index_copy(0, rows, self.ia3_l)

    # the vector is cast at use to the activations' dtype (cached between updates)
    def contribute(self, layer, x, base_out, out):
        if "rows" in self._buffers:
            return out * self.scale_vector().to(out.dtype)
        return out * cast_one(self, self.ia3_l, out.dtype)

    def transform_input(self, layer, x):
        return x * cast_one(self, self.ia3_l, x.dtype)

    @torch.no_grad()
    def merge_into(self, layer: AdaptedLayer) -> None:
        # the products in fp32, rounded once into the base's dtype
        w = layer.weight_out_in()          # (out, in) view: Conv1D's transposed weight included
        l = self.scale_vector().float()
        w.copy_((w.float() * (l[None, :] if self.scale_input else l[:, None])).to(w.dtype))
        bias = layer.base_layer.bias
        if not self.scale_input and bias is not None:
            bias.copy_((bias.float() * l).to(bias.dtype))


def _size(layer: AdaptedLayer, scale_input: bool) -> int:
    return layer.in_features if scale_input else layer.out_features


def _build(site: Site, layer: AdaptedLayer, config: IA3Config, initialise: bool = True) -> Delta:
    # ones is both the initial value and harmless filler for a checkpoint to overwrite
    scale_input = config.scales_input(site)
    if layer.kind == "conv":
        return build_conv_ia3(layer, _size(layer, scale_input), scale_input, config)
    if scale_input and site.slices:     # the input feeds every slice: it has no per-slice scaling
        refuse_on_slices("IA3's input (feed-forward) scaling", site)
    weight = layer.base_layer.weight
    return IA3Delta(_size(layer, scale_input), scale_input, dtype=adapter_dtype(config, weight.dtype),
                    device=weight.device, site=site, d_out=layer.out_features)


def _tensor_shapes(layer: AdaptedLayer, site: Site, config: IA3Config) -> dict[str, tuple[int, ...]]:
    if site.slices:
        return {TENSOR: (len(site.rows),)}
    return {TENSOR: (_size(layer, config.scales_input(site)),)}


def _describe(config: IA3Config) -> str:
    ff = [config.feedforward] if isinstance(config.feedforward, str) else config.feedforward
    return "input scaling at " + ", ".join(ff) if ff else "output scaling only"


# ---- peft format ------------------------------------------------------------------------------
def _to_peft(am: AdaptedModel, adapter: Adapter) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """peft keeps ia3_l as (out, 1) for output scaling and (1, in) for feed-forward sites; target
    and feed-forward modules are written as full module paths."""
    tensors: dict[str, torch.Tensor] = {}
    feedforward: list[str] = []
    for site in adapter.sites:
        delta = adapter.layers[site.path].deltas[adapter.name]
        layer = adapter.layers[site.path]
        l = delta.ia3_l.detach() if layer.kind == "conv" else delta.scale_vector().detach()
        if layer.kind == "conv":    # (1, d, 1, ...): a conv's channels are dim 1
            l = l.reshape(ia3_peft_shape(site.module, site.path, l.numel()))
        if delta.scale_input:
            feedforward.append(site.path)
            tensors[f"{PREFIX}{site.path}.{TENSOR}"] = l.reshape(1, -1) if l.dim() == 1 else l
        else:
            tensors[f"{PREFIX}{site.path}.{TENSOR}"] = l.reshape(-1, 1) if l.dim() == 1 else l
    kinds = {layer.kind for layer in adapter.layers.values()}
    fields = {
        "target_modules": [s.path for s in adapter.sites],
        "feedforward_modules": feedforward,
        "fan_in_fan_out": "conv1d" in kinds,
        "init_ia3_weights": True,
        "modules_to_save": list(adapter.copies) or None,
    }
    return fields, tensors


def _peft_is_feedforward(feedforward: Any, path: str) -> bool:
    """peft's rule (IA3Model._check_target_module_feedforward)."""
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, path) is not None
    return any(path.endswith(key) for key in feedforward or [])


def _from_peft(am: AdaptedModel, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], directory: Path
               ) -> tuple[IA3Config, list[Site], dict[tuple[str, str], torch.Tensor]]:
    """IA3 sites from the `ia3_l` tensors; a site is input-scaled when peft's rule puts it in
    `feedforward_modules`. Tensors of `modules_to_save` copies come back keyed by the copied
    module's path (the importer splits them off)."""
    site_tensors, others = split_copies(am, cfg, tensors)
    held_copies = list(dict.fromkeys(path for path, _ in site_tensors))
    raw: dict[str, torch.Tensor] = {}
    for key, t in others.items():
        rest = key[len(PREFIX):] if key.startswith(PREFIX) else None
        if rest is not None and rest.endswith("." + TENSOR):
            raw[rest[: -len(TENSOR) - 1]] = t
        else:
            raise CheckpointError(f"tensor {key!r} is neither an IA3 vector "
                                  f"('{PREFIX}<module path>.{TENSOR}') nor part of modules_to_save")
    if not raw:
        raise CheckpointError("the IA3 adapter holds no ia3_l tensors")
    sites = sites_at(am.model, list(raw), am.site_roles())
    feedforward: list[str] = []
    for site in sites:
        t = raw[site.path]
        is_ff = _peft_is_feedforward(cfg.get("feedforward_modules"), site.path)
        d_in, d_out = dims(site.module) if hasattr(site.module, "weight") else (None, None)
        expected = (1, d_in) if is_ff else (d_out, 1)
        if layer_kind(site.module) == "conv":
            expected = ia3_peft_shape(site.module, site.path, d_in if is_ff else d_out)
        if tuple(t.shape) != expected:
            raise CheckpointError(
                f"ia3_l of {site.path!r} is {list(t.shape)} but this model needs {list(expected)} "
                f"({'feed-forward input' if is_ff else 'output'} scaling of a "
                f"{site.type_name} with in={d_in}, out={d_out}): a different base model?")
        if is_ff:
            feedforward.append(re.escape(site.path))
        site_tensors[(site.path, TENSOR)] = t.reshape(-1)
    config = IA3Config(targets=[s.path for s in sites], feedforward=feedforward,
                       modules_to_save=held_copies or None)
    return config, sites, site_tensors


METHOD = Method(
    name="ia3",
    title="(IA)³",
    config_cls=IA3Config,
    typology=Typology(
        site_roles=("attn.k", "attn.v", "ffn.down"),
        form="vector",
        integration="scale",
        intra_connectivity="none (free scaling vectors)",
        inter_connectivity="fixed (an elementwise rescaling of the activations, the same for every input)",
        adaptation="rescaling",
        parameter_sharing="none",
        input_type="outputs of the K and V projections; the FFN activation (input of ffn.down)",
        insertion="in-place",
        insertions_per_layer="1 per targeted projection (3 per layer by default: k, v, ffn.down)",
        workspace="attention (K, V) and the FFN intermediate activation",
        param_formula="d_out per output-scaled site, d_in per feed-forward (input-scaled) site",
    ),
    layer_kinds=("linear", "conv1d", "conv"),
    capabilities=frozenset({Capability.MERGE, Capability.MIXED_BATCH, Capability.TRAIN_IN_MIXED_BATCH,
                            Capability.QUANTISED_BASE, Capability.FUSED_SLICE}),
    composition="scale",
    build=_build,
    tensor_shapes=_tensor_shapes,
    describe=_describe,
    peft_type="IA3",
    to_peft=_to_peft,
    from_peft=_from_peft,
    train_lr=1e-2,
)
