"""Bottleneck adapters: Houlsby (2019), Pfeiffer (2021) and the parallel adapter (He et al., 2022;
AdaptFormer, Chen et al., 2022).

An adapter is a small MLP h ↦ s · W_up φ(W_down h + b_down) + b_up with W_down ∈ R^{m×d},
W_up ∈ R^{d×m} (m the bottleneck width), added to a sublayer's output before the residual add:

  serial   (houlsby, pfeiffer): y = o + s · up(φ(down(o))), o the sublayer output, i.e. the output
           of its output projection (attn.o, ffn.down) — for Llama, GPT-2 and BERT that is exactly
           the sublayer output before the residual add. Houlsby puts one after the attention and
           one after the FFN sublayer; Pfeiffer only after the FFN.
  parallel: y = o + s · up(φ(down(x))), x the sublayer INPUT (what the FFN's up projection reads).
           The delta sits on ffn.down (or attn.o) and reads x through a forward pre-hook on the
           sibling input projection of the same block (ffn.up, else ffn.gate; attn.q/qkv/k/v).

W_up and b_up start at zero (init="zero"), so a new adapter is a no-op. Nonlinear: never mergeable.

The config is `BottleneckConfig`; the method keeps the name "adapter" (checkpoints, peftlab train
--method adapter). `AdapterConfig`, its old name, still imports for one release with a
DeprecationWarning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..core.geometry import dims, is_linear_like, unwrap
from ..core.layer import AdaptedLayer, Delta
from ..core.method import Capability, Method, MethodConfig, check_number
from ..core.precision import adapter_dtype, cast_at_use, compute_dtype
from ..core.sites import Site, layer_index
from ..core.typology import Typology

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
INITS = ("zero", "random")
DEFAULT_TARGETS = {"houlsby": ["attn.o", "ffn.down"], "pfeiffer": ["ffn.down"], "parallel": ["ffn.down"]}
# Default output scale s: 1 for serial adapters (Houlsby, Pfeiffer), 0.1 for the parallel adapter
# (AdaptFormer's s = 0.1; He et al.'s "scaled PA" uses 4 — set `scale` to choose).
DEFAULT_SCALE = {"houlsby": 1.0, "pfeiffer": 1.0, "parallel": 0.1}
# Parallel placement: site role -> roles of the sibling modules that read the sublayer input.
PARALLEL_READERS = {"ffn.down": ("ffn.up", "ffn.gate"), "attn.o": ("attn.q", "attn.qkv", "attn.k", "attn.v")}


@dataclass
class BottleneckConfig(MethodConfig):
    """Bottleneck adapters on Linear / GPT-2 Conv1D output projections.

    `placement`: "pfeiffer" (default; after the FFN), "houlsby" (after attention and after the
    FFN) or "parallel" (reads the FFN input, adds to the FFN output). `targets` default to the
    placement's sites (None → houlsby: attn.o + ffn.down; pfeiffer, parallel: ffn.down).
    `bottleneck`: the width m. `activation`: relu, gelu, silu or tanh. `scale`: the output scale
    s (None → 1.0 serial, 0.1 parallel). `init`: "zero" (up projection zero: a no-op at start)
    or "random" (both projections random: a non-zero adapter, for tests).
    """

    targets: Any = None
    placement: str = "pfeiffer"
    bottleneck: int = 64
    activation: str = "relu"
    scale: float | None = None
    init: str = "zero"

    def __post_init__(self) -> None:
        self._resolve_defaults()

    def _resolve_defaults(self) -> None:
        if self.placement in PLACEMENTS:
            if self.targets is None:
                self.targets = list(DEFAULT_TARGETS[self.placement])
            if self.scale is None:
                self.scale = DEFAULT_SCALE[self.placement]

    def validate(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"adapter placement {self.placement!r} is unknown; choose one of {PLACEMENTS}")
        self._resolve_defaults()
        super().validate()
        m = self.bottleneck
        if not isinstance(m, int) or isinstance(m, bool) or m <= 0:
            raise ConfigError(f"adapter bottleneck width must be a positive integer, got {m!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"adapter activation {self.activation!r} is unknown; choose one of "
                              f"{tuple(ACTIVATIONS)}")
        check_number("adapter scale", self.scale)
        if self.init not in INITS:
            raise ConfigError(f"adapter init {self.init!r} is unknown; choose one of {INITS}")


class BottleneckDelta(Delta):
    """s · up(φ(down(h))) added to the running output; h is the running output itself (serial)
    or the sublayer input captured by a pre-hook on a sibling module (parallel)."""

    stage = "output"

    def __init__(self, d: int, m: int, activation: str, scale: float, *, parallel: bool,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.down = nn.Linear(d, m, dtype=dtype, device=device).requires_grad_(False)
        self.up = nn.Linear(m, d, dtype=dtype, device=device).requires_grad_(False)
        # A serial adapter reads the running output, so it commutes with nothing when merging;
        # a parallel one adds a term that does not depend on the layer's weight ("add").
        self.__dict__.update(activation=activation, act=ACTIVATIONS[activation], scale=float(scale),
                             parallel=parallel, algebra="add" if parallel else "none",
                             reader_path=None, _handle=None, _sublayer_input=None, _layer=None)

    def initialise(self, init: str) -> None:
        with torch.no_grad():
            self.down.reset_parameters()
            if init == "random":
                self.up.reset_parameters()
                self.up.bias.uniform_(-0.5, 0.5)
            else:
                self.up.weight.zero_()
                self.up.bias.zero_()

    def adapter(self, h: torch.Tensor) -> torch.Tensor:
        """up(φ(down(h))), without the scale, in the compute dtype (core/precision.py: the
        weights cast at use, cached between updates)."""
        down, up = self.down, self.up
        dtype = compute_dtype(down.weight.dtype, h.dtype, h.device)
        w1, b1, w2, b2 = cast_at_use(self, (down.weight, down.bias, up.weight, up.bias), dtype)
        if h.dtype != dtype:
            h = h.to(dtype)
        return F.linear(self.act(F.linear(h, w1, b1)), w2, b2)

    # ---- parallel: the sublayer input comes from a pre-hook on a sibling module -------------------
    def attach_reader(self, layer: AdaptedLayer, module: nn.Module, path: str) -> None:
        """Capture the input of `module` (a base module: a wrapper put around it later still calls
        it) whenever this delta is active on `layer`, the wrapper that holds it."""
        # A bound method, not a closure: deepcopy of the model rebinds it to the copied delta.
        self.__dict__.update(_handle=module.register_forward_pre_hook(self._capture), reader_path=path,
                             _layer=layer)

    def _capture(self, module: nn.Module, args: tuple) -> None:
        layer = self._layer
        if layer._seen_version != layer.state.version:
            layer._refresh()
        if self in layer._active:    # inactive or disabled: keep no activation alive
            self.__dict__["_sublayer_input"] = args[0] if args else None

    def release(self) -> None:
        handle = self.__dict__.get("_handle")
        if handle is not None:
            handle.remove()
        self.__dict__.update(_handle=None, _sublayer_input=None, _layer=None)

    def contribute(self, layer, x, base_out, out):
        if self.parallel:
            h = self._sublayer_input
            if h is None:
                raise RuntimeError(
                    f"parallel adapter: the sublayer input was not captured (the pre-hook on "
                    f"{self.reader_path!r} did not run before this layer); the adapter needs the "
                    "block's input projection to run first, as in a standard transformer block")
            self.__dict__["_sublayer_input"] = None   # do not keep activations alive
        else:
            h = out
        z = self.adapter(h)
        if z.dtype != out.dtype:
            z = z.to(out.dtype)
        return out + self.scale * z if self.scale != 1.0 else out + z


def _reader_for(site: Site, model: Any) -> tuple[str, nn.Module]:
    """The path and base module of the sibling that reads the sublayer input of `site`'s block."""
    readers = PARALLEL_READERS.get(site.role or "")
    if readers is None:
        raise ConfigError(f"a parallel adapter attaches to a sublayer's output projection "
                          f"(roles {tuple(PARALLEL_READERS)}), not to {site.path!r} (role {site.role}); "
                          "use targets=['ffn.down'] or a serial placement")
    if model is None:
        raise ConfigError("a parallel adapter needs the model to find the sublayer input; build it "
                          "through AdaptedModel.add_adapter")
    roles = model.site_roles()
    parts = site.path.split(".")
    for role in readers:
        paths = [p for p, r in roles.items() if r == role and layer_index(p) == site.layer]
        if paths:
            def shared(p: str) -> int:     # leading path components shared with the site
                n = 0
                for a, b in zip(p.split("."), parts, strict=False):
                    if a != b:
                        break
                    n += 1
                return n
            path = max(paths, key=shared)
            return path, unwrap(model.model.get_submodule(path))
    raise ConfigError(f"a parallel adapter at {site.path!r} reads its sublayer's input from the "
                      f"block's {' or '.join(readers)} module, and layer {site.layer} has none; "
                      "use a serial placement (pfeiffer/houlsby) for this model")


def _build(site: Site, layer: AdaptedLayer, config: BottleneckConfig, initialise: bool = True, *,
           model: Any = None) -> BottleneckDelta:
    parallel = config.placement == "parallel"
    d = layer.out_features
    if parallel:
        reader_path, reader = _reader_for(site, model)
        d_in = dims(reader)[0] if is_linear_like(reader) else None
        if d_in != d:
            raise ConfigError(f"a parallel adapter at {site.path!r} reads the input of {reader_path!r} "
                              f"({d_in} features) and adds to an output of {d}; they must match")
    weight = layer.base_layer.weight
    delta = BottleneckDelta(d, config.bottleneck, config.activation, config.scale, parallel=parallel,
                            dtype=adapter_dtype(config, weight.dtype), device=weight.device)
    if initialise:
        delta.initialise(config.init)
    if parallel:   # last: nothing below can fail, so no hook is left behind by this build
        delta.attach_reader(layer, reader, reader_path)
    return delta


def _tensor_shapes(layer: AdaptedLayer, site: Site, config: BottleneckConfig) -> dict[str, tuple[int, ...]]:
    # The parallel adapter reads the sublayer input, which has the output's width (d_model).
    d, m = layer.out_features, config.bottleneck
    return {"down.weight": (m, d), "down.bias": (m,), "up.weight": (d, m), "up.bias": (d,)}


def _describe(config: BottleneckConfig) -> str:
    parts = [config.placement, f"bottleneck={config.bottleneck}", config.activation]
    if config.scale is not None and config.scale != 1.0:
        parts.append(f"scale={config.scale:g}")
    if config.init != "zero":
        parts.append(f"init={config.init}")
    return ", ".join(parts)


METHOD = Method(
    name="adapter",
    title="Bottleneck adapter",
    config_cls=BottleneckConfig,
    typology=Typology(
        site_roles=("ffn.down",),
        form="bottleneck",
        integration="serial",
        intra_connectivity="dense (bottleneck MLP with nonlinearity)",
        inter_connectivity="fixed (its output is added to the sublayer's or the residual stream)",
        adaptation="addition",
        parameter_sharing="none",
        input_type="sublayer output hidden state (serial); sublayer input hidden state (parallel)",
        insertion="sequential (parallel to the FFN with placement='parallel')",
        insertions_per_layer="1 (pfeiffer, parallel) or 2 (houlsby: after attention and after the FFN)",
        workspace="FFN output (pfeiffer, parallel); MHA output + FFN output (houlsby)",
        param_formula="2·m·d + m + d per site (m = bottleneck width)",
    ),
    layer_kinds=("linear", "conv1d"),
    capabilities=frozenset({Capability.QUANTISED_BASE}),
    build=_build,
    tensor_shapes=_tensor_shapes,
    describe=_describe,
)


def deprecated_name(name: str, stacklevel: int = 2) -> type[BottleneckConfig]:
    """`AdapterConfig`, the old name of BottleneckConfig, with a DeprecationWarning (kept for one
    release); AttributeError for any other name. `stacklevel` as for the caller's own warning."""
    if name != "AdapterConfig":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn("peftlab's AdapterConfig is now BottleneckConfig (the method is still called "
                  "'adapter'); the old name goes in the next release", DeprecationWarning,
                  stacklevel=stacklevel + 1)
    return BottleneckConfig


def __getattr__(name: str) -> Any:
    # module attributes not found otherwise: the deprecated alias
    return deprecated_name(name)
