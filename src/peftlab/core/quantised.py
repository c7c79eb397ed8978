"""bitsandbytes bases: how a base is loaded quantised, and its quantised layers.

The record (`Quantization`): `peftlab train --quantize nf4|fp4|int8`, kept in run.json's
"quantization" and, read from the loaded model, an adapter's peftlab.json
`base_model.quantization`, with the transformers `BitsAndBytesConfig` that loads a base the same
way again, so that `eval`, `generate`, `serve` and `from_pretrained` score an adapter on the base
it was trained on. bitsandbytes is an extra (`pip install "peftlab[quant]"`); asking for a
quantised base without it is a CapabilityError naming that command, before any model is read.

The layers: a `Linear4bit` (nf4 / fp4) or `Linear8bitLt` (int8) layer is an ordinary base
layer whose weight is stored packed. This module is the one place that knows how it is packed.

Layers are recognised by class name and module path, so `import peftlab` and models without
them never import bitsandbytes; it is imported where such a layer is met. What the machinery
needs of one:

* sizes from the module's `in_features` / `out_features` (the packed weight of a 4-bit layer is
  (out·in/2, 1)), and the logical parameter count;
* the dense (out, in) weight, dequantised, for the methods that read it (DoRA's norm, PiSSA's
  SVD, merging); a fresh tensor each time, so writing into it changes nothing;
* merging (core/merging.py): a new packed weight quantised from W + ΔW with the layer's quant
  type, block size, double quantisation and storage dtype, and the requantisation error;
* exact unmerge: the packed weight a merge replaced is kept as it is (a reference, no copy) and
  put back with its quantisation statistics.

bitsandbytes 0.50 converts a 4-bit weight in place to a CPU inference layout (block-transposed,
absmax rounded to bf16) on its first eval forward without gradients on an AVX512-BF16 CPU, and
training forwards through a converted layer then drop the input gradient (the layers below it
get none, without an error). `keep_layout` switches that conversion off on the adapted model and
converts layers already converted back (bitsandbytes' own inverse, as its state_dict does).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .errors import CapabilityError, CheckpointError, ConfigError

_4BIT, _8BIT = "Linear4bit", "Linear8bitLt"
INSTALL = 'pip install "peftlab[quant]"'


# ---- the record: how a base is loaded quantised ---------------------------------------------
QUANT_METHODS = ("nf4", "fp4", "int8")     # 4-bit NormalFloat, 4-bit float, LLM.int8()
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Quantization:
    """How the base's linear layers are quantised. `double_quant` (the 4-bit scales quantised
    too) and `compute_dtype` (the dtype the 4-bit layers dequantise to and multiply in) are the
    4-bit methods' options; int8 has neither."""

    method: str
    double_quant: bool = False
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.method not in QUANT_METHODS:
            raise ConfigError(f"quantization method must be one of {', '.join(QUANT_METHODS)}, "
                              f"got {self.method!r}")
        if not isinstance(self.double_quant, bool):
            raise ConfigError(f"double_quant must be true or false, got {self.double_quant!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got "
                              f"{self.compute_dtype!r}")
        if self.method == "int8" and (self.double_quant or self.compute_dtype != "float32"):
            raise ConfigError("double quantisation and the compute dtype are options of the 4-bit "
                              "methods (nf4, fp4); int8 takes neither")

    @property
    def bits(self) -> int:
        return 8 if self.method == "int8" else 4

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, value: Any, source: str) -> Quantization | None:
        """The quantisation a record holds (None: an unquantised base); CheckpointError naming
        `source` when the field is not one this module wrote."""
        if value is None:
            return None
        if not isinstance(value, dict) or set(value) - {"method", "double_quant", "compute_dtype"}:
            raise CheckpointError(f"{source}: field 'quantization' is {value!r:.120}, not a record of "
                                  "method, double_quant and compute_dtype; the file was edited")
        try:
            return cls(**value)
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{source}: field 'quantization': {e}") from None

    def describe(self) -> str:
        """'nf4 (double quantisation, computed in bfloat16)' / 'int8'."""
        if self.method == "int8":
            return "int8"
        double = "double quantisation, " if self.double_quant else ""
        return f"{self.method} ({double}computed in {self.compute_dtype})"

    def loading_config(self) -> Any:
        """transformers' BitsAndBytesConfig for `from_pretrained(..., quantization_config=...)`;
        CapabilityError naming the pip command when bitsandbytes is not installed."""
        require_bitsandbytes()
        from transformers import BitsAndBytesConfig
        if self.method == "int8":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.method,
                                  bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
                                  bnb_4bit_use_double_quant=self.double_quant)


def require_bitsandbytes() -> None:
    """CapabilityError with the install command when bitsandbytes is missing."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise CapabilityError(f"a quantised base model needs bitsandbytes, which is not installed: {INSTALL}")


def model_quantization(model: nn.Module) -> Quantization | None:
    """The bitsandbytes quantisation `model` was loaded with (transformers keeps its
    BitsAndBytesConfig in `config.quantization_config`), or None: unquantised, or quantised
    another way (which peftlab does not reload)."""
    found = getattr(getattr(model, "config", None), "quantization_config", None)
    if found is None:
        return None
    fields = found if isinstance(found, dict) else found.to_dict()
    if str(fields.get("quant_method", "")).lower().split(".")[-1] not in ("bitsandbytes", "bits_and_bytes"):
        return None
    if fields.get("load_in_8bit"):
        return Quantization("int8")
    if not fields.get("load_in_4bit"):
        return None
    dtype = fields.get("bnb_4bit_compute_dtype") or "float32"
    return Quantization(fields.get("bnb_4bit_quant_type", "fp4"), bool(fields.get("bnb_4bit_use_double_quant")),
                        str(dtype).removeprefix("torch."))


# ---- the layers --------------------------------------------------------------------------------

def _bnb_class(module: nn.Module) -> str | None:
    """"Linear4bit" or "Linear8bitLt" when `module` is (a subclass of) that bitsandbytes class."""
    return _bnb_class_of(type(module))


@functools.cache     # a property of the class: asked several times per site when adapters are added
def _bnb_class_of(module_type: type) -> str | None:
    for cls in module_type.__mro__:
        if cls.__name__ in (_4BIT, _8BIT) and cls.__module__.startswith("bitsandbytes"):
            return cls.__name__
    return None


def quantisation(module: nn.Module) -> str | None:
    """"nf4" / "fp4" for a bitsandbytes Linear4bit, "int8" for a Linear8bitLt, None for any other
    module (a peftlab wrapper is not looked through: pass the base layer)."""
    kind = _bnb_class(module)
    if kind == _8BIT:
        return "int8"
    if kind == _4BIT:
        state = _state4(module)
        return getattr(state, "quant_type", None) or getattr(module.weight, "quant_type", "fp4")
    return None


def bitsandbytes() -> Any:
    """The bitsandbytes package; CapabilityError naming the install command without it."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise CapabilityError(f"this model holds bitsandbytes-quantised layers, but bitsandbytes cannot be "
                              f"imported ({e}); install it with {INSTALL}") from None
    return bitsandbytes


def check_supported(module: nn.Module, path: str) -> None:
    """CapabilityError unless the quantised layer at `path` holds an already quantised weight:
    a Linear8bitLt that keeps fp16 weights (has_fp16_weights=True) or a Linear4bit not yet moved
    to its device stores a dense weight that bitsandbytes quantises later, under the adapter."""
    kind = _bnb_class(module)
    if kind == _8BIT and (module.state.has_fp16_weights or module.weight.dtype != torch.int8):
        raise CapabilityError(f"the Linear8bitLt at {path!r} keeps fp16 weights (has_fp16_weights=True), "
                              "which bitsandbytes requantises as they train; load the model with "
                              "BitsAndBytesConfig(load_in_8bit=True) (int8 weights) to adapt it")
    if kind == _4BIT and (_state4(module) is None or not getattr(module.weight, "bnb_quantized", True)):
        raise CapabilityError(f"the Linear4bit at {path!r} is not quantised yet (bitsandbytes quantises it "
                              "when the layer moves to its device); call model.to(device) first")


def _state4(module: nn.Module) -> Any:
    """A Linear4bit's QuantState (on the weight; the module keeps a reference too)."""
    return getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)


def _scale8(module: nn.Module) -> torch.Tensor:
    """A Linear8bitLt's per-row scales: on the weight until its first forward moves them (and the
    int8 matrix) to the layer's matmul state."""
    scb = getattr(module.weight, "SCB", None)
    return scb if scb is not None else module.state.SCB


def features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a quantised layer, from the module (not the packed weight)."""
    return module.in_features, module.out_features


def parameter_count(p: torch.Tensor) -> int:
    """Parameters a tensor stands for: a packed 4-bit weight stores several codes per element,
    so it counts as the matrix it encodes; any other tensor counts its elements."""
    state = getattr(p, "quant_state", None)
    return state.shape.numel() if type(p).__name__ == "Params4bit" and state is not None else p.numel()


@torch.no_grad()
def dequantised(module: nn.Module, weight: Packed | None = None) -> torch.Tensor:
    """The (out, in) weight a quantised layer computes with (or `weight`, a packed weight for
    it), dequantised into a new fp32 tensor by bitsandbytes' own functions: for 4 bits exactly
    what its fp32 forward multiplies by; for int8 that to the last bit (its forward rounds the
    row scale / 127 first)."""
    F = bitsandbytes().functional
    if weight is None:
        if _bnb_class(module) == _4BIT:
            _unconvert(module)
        weight = packed(module)
    if _bnb_class(module) == _8BIT:
        return F.int8_vectorwise_dequant(weight.weight.data, weight.stats).float()
    return F.dequantize_4bit(weight.weight.data, weight.stats).float()


@dataclasses.dataclass(frozen=True)
class Packed:
    """A quantised layer's weight as stored: the Parameter and its quantisation statistics (a
    4-bit QuantState, or int8 row scales), enough to put it back bit for bit (`put_back`)."""

    weight: nn.Parameter
    stats: Any


def packed(module: nn.Module) -> Packed:
    """The layer's current packed weight (a reference: merging replaces the Parameter rather
    than writing into it, so keeping it costs no memory)."""
    return Packed(module.weight, _scale8(module) if _bnb_class(module) == _8BIT else _state4(module))


@torch.no_grad()
def requantised(module: nn.Module, dense: torch.Tensor) -> Packed:
    """`dense` (out, in) quantised as the layer's weight is: the same quant type, block size,
    double quantisation and storage for 4 bits (from the dtype the weight was quantised from, so
    the layer keeps dequantising to it); int8 row-wise from fp16, as bitsandbytes quantises."""
    bnb = bitsandbytes()
    if _bnb_class(module) == _8BIT:
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(dense.to(torch.float16).contiguous())
        return Packed(bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb), scb)
    _unconvert(module)
    old, state = module.weight, _state4(module)
    double = bool(getattr(old, "compress_statistics", state.nested))
    data, new_state = bnb.functional.quantize_4bit(
        dense.to(state.dtype).contiguous(), blocksize=state.blocksize, compress_statistics=double,
        quant_type=state.quant_type, quant_storage=getattr(old, "quant_storage", torch.uint8))
    weight = bnb.nn.Params4bit(data, requires_grad=False, quant_state=new_state, blocksize=state.blocksize,
                               compress_statistics=double, quant_type=state.quant_type,
                               quant_storage=data.dtype, module=module, bnb_quantized=True)
    return Packed(weight, new_state)


def put_back(module: nn.Module, weight: Packed) -> None:
    """Make `weight` the layer's weight, with its statistics where the layer's forward reads them
    (a 4-bit layer: the module's quant_state too; an int8 layer: the weight's CB / SCB, which its
    next forward moves into the matmul state, cleared here so no stale matrix is used)."""
    param = weight.weight
    module._parameters["weight"] = param
    if _bnb_class(module) == _8BIT:
        param.CB, param.SCB = param.data, weight.stats
        module.state.CB = module.state.SCB = None
    else:
        param.quant_state = weight.stats
        module.quant_state = weight.stats


@dataclasses.dataclass(frozen=True)
class RequantError:
    """How far a merged, requantised weight is from the exact W + ΔW (W: the dequantised base):
    the largest absolute difference, and ‖Q(W + ΔW) − (W + ΔW)‖_F / ‖W + ΔW‖_F."""

    quantisation: str
    max_abs: float
    relative: float

    def __str__(self) -> str:
        return f"{self.quantisation}: max |error| {self.max_abs:.2e}, relative {self.relative:.2e}"


def keep_layout(model: nn.Module) -> Callable[[], None]:
    """Keep the model's 4-bit weights in bitsandbytes' canonical layout (see the module docstring):
    switch off its CPU inference conversion and convert back layers it already converted.
    Returns what switches the conversion on again (`AdaptedModel.unload`)."""
    held = [m for m in model.modules()
            if _bnb_class(m) == _4BIT and getattr(m, "support_avx512bf16_for_cpu", False)]
    for m in held:
        m.support_avx512bf16_for_cpu = False
        _unconvert(m)

    def release() -> None:
        for m in held:
            m.support_avx512bf16_for_cpu = True
    return release


def _unconvert(module: nn.Module) -> None:
    """A 4-bit weight in bitsandbytes' CPU inference layout back in its canonical one, in place
    (bitsandbytes' inverse, which its own state_dict and .cuda() apply)."""
    state = _state4(module)
    if getattr(state, "packing_format_for_cpu", False):
        inverse = bitsandbytes().functional._convert_weight_packed_for_cpu_inverse
        module.weight.data, state = inverse(module.weight.data, state)
        module.weight.quant_state = module.quant_state = state


def dense_linear(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear with the quantised layer's sizes, `weight` (out, in) and `bias`, in the
    weight's dtype (frozen, as the base was)."""
    linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None,
                       device=weight.device, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(weight.dtype), requires_grad=False)
    return linear
