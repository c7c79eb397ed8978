"""bitsandbytes bases: a `Linear4bit` (nf4 / fp4) or `Linear8bitLt` (int8) layer is an ordinary base
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
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import CapabilityError

_4BIT, _8BIT = "Linear4bit", "Linear8bitLt"
INSTALL = 'pip install "peftlab[quant]"'


def _bnb_class(module: nn.Module) -> str | None:
    """"Linear4bit" or "Linear8bitLt" when `module` is (a subclass of) that bitsandbytes class."""
    for cls in type(module).__mro__:
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
