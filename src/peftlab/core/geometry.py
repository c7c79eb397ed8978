"""Geometry: the sizes of layers and of attention, read in this one place for every caller.

Layers follow nn.Linear's (out, in) convention whatever their type stores (GPT-2's Conv1D and an
Embedding store it transposed; an embedding's "input" is its vocabulary; a torch convolution's
weight is (out, in / groups, *kernel)); a bitsandbytes-quantised layer answers for the dense
matrix its packed weight encodes. Attention sizes come from the config a model declares.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import CapabilityError
from .quantised import dequantised, features, quantisation


def unwrap(module: nn.Module) -> nn.Module:
    """The original module behind a peftlab wrapper (or the module itself)."""
    # a class attribute: read from the type, a miss skips nn.Module.__getattr__'s exception
    return module.original_module if getattr(type(module), "is_peftlab_wrapper", False) else module



# Layers follow nn.Linear's (out, in) convention; an embedding's "input" is its vocabulary.
_HEAD_COUNT_KEYS = ("num_attention_heads", "n_head", "num_heads")
_HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model")
_HEAD_DIM_KEYS = ("head_dim", "d_kv")          # d_kv: T5's head width, not d_model / heads


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D, matched by name: importing it would tie the core to transformers
    return type(module).__name__ == "Conv1D"


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear (bitsandbytes' quantised Linear4bit / Linear8bitLt subclass it) or the
    transposed GPT-2 Conv1D."""
    module = unwrap(module)
    return isinstance(module, nn.Linear) or _is_conv1d(module)


# torch's convolutions (layer kind "conv"); not their transposed forms, whose weight is (in, out, *k)
TORCH_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_conv(module: nn.Module) -> bool:
    """nn.Conv1d / Conv2d / Conv3d (or the layer a peftlab wrapper holds). Not linear-like:
    `all-linear` leaves convolutions out, as peft's does."""
    return isinstance(unwrap(module), TORCH_CONVS)


@dataclass(frozen=True)
class ConvGeometry:
    """What a delta on a torch convolution needs of it: channels (activations' dim 1), kernel,
    and how it slides (a conv's weight is (out, in / groups, *kernel))."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: str | tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str

    @property
    def spatial(self) -> int:
        """The number of spatial dimensions: 1, 2 or 3."""
        return len(self.kernel)


def conv_geometry(module: nn.Module) -> ConvGeometry:
    """The geometry of a torch convolution (or of the one a peftlab wrapper holds)."""
    conv = unwrap(module)
    if not isinstance(conv, TORCH_CONVS):
        raise CapabilityError(f"a {type(conv).__name__} is not an nn.Conv1d, Conv2d or Conv3d")
    return ConvGeometry(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
                        conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
                        tuple(conv.dilation), conv.groups, conv.padding_mode)


def weight_axes(module: nn.Module) -> tuple[int, int]:
    """(output axis, input axis) of the stored weight of a Linear or a torch convolution — (0, 1)
    — or of a GPT-2 Conv1D or an Embedding — (1, 0), as they store it transposed; a peftlab
    wrapper answers for the layer it holds."""
    module = unwrap(module)
    if isinstance(module, (nn.Linear, *TORCH_CONVS)):
        return 0, 1
    if isinstance(module, nn.Embedding) or _is_conv1d(module):
        return 1, 0
    raise CapabilityError(f"a {type(module).__name__} is not a Linear, GPT-2 Conv1D, Embedding or "
                          "torch convolution, so its weight has no (out, in) reading; target one of those")


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear, GPT-2 Conv1D, Embedding or norm (or of the layer a peftlab wrapper
    holds) as an (out, in) view; a norm's elementwise (d,) weight and a torch convolution's
    (out, in / groups, *kernel) weight are returned as they are. A bitsandbytes-quantised
    layer's weight is packed: it is dequantised into a new fp32 tensor (so writing into the
    result changes nothing: merging goes through core/merging.py)."""
    module = unwrap(module)
    if isinstance(module, nn.Linear):    # first: layers read this in their forward
        return dequantised(module) if quantisation(module) else module.weight
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise CapabilityError(f"a {type(module).__name__} has no weight tensor to read sizes from; "
                              "target a Linear, GPT-2 Conv1D, Embedding or norm layer")
    if weight.dim() == 1:
        return weight
    out_axis, _ = weight_axes(module)
    return weight if out_axis == 0 else weight.t()


def dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, GPT-2 Conv1D, Embedding (vocabulary, width),
    norm (width, width) or torch convolution (in, out channels), read from its current weight (a
    bitsandbytes-quantised layer's from the module: its packed weight has another shape); a
    peftlab wrapper answers for its layer."""
    module = unwrap(module)
    if quantisation(module):
        return features(module)
    if isinstance(module, TORCH_CONVS):     # weight (out, in / groups, *kernel)
        return module.weight.shape[1] * module.groups, module.weight.shape[0]
    weight = weight_out_in(module)
    return weight.shape[-1], weight.shape[0]


def stored_shape(module: nn.Module) -> tuple[int, ...]:
    """The shape of a layer's stored weight; for a bitsandbytes-quantised layer the (out, in)
    matrix its packed weight encodes, so a quantised base and its dense original agree."""
    module = unwrap(module)
    if quantisation(module):
        d_in, d_out = features(module)
        return d_out, d_in
    return tuple(module.weight.shape)


def text_config(source: nn.Module) -> Any | None:
    """The config `source` carries (a transformers model, or one of its attention modules, which
    keep a reference to it); a multimodal model's text config. None without one."""
    config = getattr(source, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def _declared(config: Any, keys: Sequence[str]) -> int | None:
    """The first positive integer the config holds under one of `keys`."""
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def attention_heads(source: nn.Module) -> tuple[int, int, int] | None:
    """(query heads, key/value heads, head width) as the config of `source` (a model, or one of
    its attention modules) declares them: key/value heads default to the query heads (no
    grouped-query attention), the head width to hidden size / heads. None when there is no
    config or it declares no head count. These are the sizes the model was built with; a
    structurally pruned model's current sizes are in its weights (`dims`)."""
    config = text_config(source)
    heads = _declared(config, _HEAD_COUNT_KEYS) if config is not None else None
    if heads is None:
        return None
    kv_heads = _declared(config, ("num_key_value_heads",)) or heads
    head_dim = _declared(config, _HEAD_DIM_KEYS)
    if head_dim is None:
        hidden = _declared(config, _HIDDEN_SIZE_KEYS)
        if hidden is None:
            raise CapabilityError(f"the config of {type(source).__name__} declares {heads} attention "
                                  f"heads but neither a head width ({' / '.join(_HEAD_DIM_KEYS)}) nor a "
                                  f"hidden size ({' / '.join(_HIDDEN_SIZE_KEYS)}); set one of them")
        head_dim = hidden // heads
    return heads, kv_heads, head_dim
