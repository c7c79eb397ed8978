"""Adapter precision: the dtype an adapter's trained tensors are stored in, the dtype its
products run in, and the cast between the two, cached between updates.

Storage (`adapter_dtype`): on a bf16 / fp16 base, and on a bitsandbytes-quantised one, the
trained tensors are fp32 by default, as peft keeps them (`autocast_adapter_dtype=True`): AdamW's
small updates vanish in bf16, whose spacing near 1 is 2⁻⁷. A config's `dtype` field overrides
it; on other bases they follow the base's dtype.

Use (`compute_dtype`, `cast_at_use`): a delta reads its tensors in the activations' precision
(half-precision activations stay half, so an fp32 adapter adds no activation-sized casts), except
on x86 CPUs without native half GEMMs, where the products run in fp32. Its output keeps the
activations' dtype. The cast of a stored tensor is part of the graph while it trains (gradients
land in the fp32 tensor) and cached otherwise, keyed on the tensors' versions, so inference casts
once per weight update. Under torch.compile it is part of the compiled graph, never cached.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

HALF = (torch.bfloat16, torch.float16)


def dtype_named(name: str | torch.dtype | None, what: str = "dtype") -> torch.dtype | None:
    """The torch dtype a config names ('float32', 'bfloat16', ... or the dtype itself); None for
    None. ConfigError naming the field for anything that is not a floating torch dtype."""
    if name is None:
        return None
    dtype = name if isinstance(name, torch.dtype) else getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"{what} {name!r} is not a floating torch dtype name; use 'float32', "
                          "'bfloat16', 'float16' or 'float64' (or None: fp32 on a half-precision "
                          "base, else the base's dtype)")
    return dtype


def adapter_dtype(config: Any, base: torch.dtype) -> torch.dtype:
    """The dtype an adapter's trained tensors are stored in on a base of dtype `base`:
    `config.dtype` when set; else fp32 on a half-precision base, else the base's dtype. A
    bitsandbytes layer's packed storage (uint8 / int8, or a half dtype holding packed bytes)
    says nothing about the activations: such a base gets fp32 too, as in QLoRA."""
    named = dtype_named(getattr(config, "dtype", None))
    if named is not None:
        return named
    return torch.float32 if base in HALF or not base.is_floating_point else base


def _cpu_half_matmul_is_slow() -> bool:
    """True on x86 CPUs without AVX-512 BF16 / AMX: there torch runs bf16 and fp16 GEMMs through a
    slow fallback (measured ~10× slower than fp32 for LoRA's rank-r products)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return bool(flags) and not any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


UPCAST_ON_CPU = _cpu_half_matmul_is_slow()


def compute_dtype(stored: torch.dtype, activation: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a delta's matrix products run in: the activations' when they are half precision
    (fp32 adapter tensors are cast down, never the activations up), else the stored tensors'
    (bf16 factors on an fp32 base run in bf16, as asked); fp32 instead of half on a CPU without
    fast half GEMMs."""
    dtype = activation if activation in HALF else stored
    if UPCAST_ON_CPU and dtype in HALF and device.type == "cpu":
        return torch.float32
    return dtype


def _plain(raw: Sequence[torch.Tensor], dtype: torch.dtype, cached: bool) -> list[torch.Tensor]:
    return [t.to(dtype) for t in raw]


def cast_at_use(owner: nn.Module, raw: Sequence[torch.Tensor], dtype: torch.dtype,
                prepare: Callable[[Sequence[torch.Tensor], torch.dtype, bool], list[torch.Tensor]] = _plain,
                slot: str = "_cast") -> list[torch.Tensor]:
    """`raw` (an owner's stored tensors) as `prepare(raw, dtype, cached)` makes them for a forward
    in `dtype` (default: each cast to `dtype`). For trainable tensors the result is made on every
    call (with gradients the cast is part of the graph; and fused optimisers, torch's
    AdamW(fused=True) and so transformers Trainer's default, update parameters in place without
    bumping their version, so a cache could serve an earlier step's values); for frozen ones it is
    kept in `owner.__dict__[slot]`, keyed on the tensors' versions and storage, so a load or a
    device move rebuilds it and inference pays the cast once. `cached` tells `prepare` that its
    result is kept (worth making contiguous copies)."""
    if any(t.requires_grad for t in raw) or torch.compiler.is_compiling():
        # compiled (torch.compile): the cast is part of the graph, which reads the tensors
        # themselves, so an in-place update (`peftlab.hotswap`) reaches it without a recompile;
        # a data-pointer key would break the graph
        return prepare(raw, dtype, False)
    key = (dtype, tuple((t._version, t.data_ptr()) for t in raw))
    held = owner.__dict__.get(slot)
    if not held or held[0] != key:
        # ordinary tensors even under inference_mode, so a later forward with gradients to other
        # tensors may save them; plain __dict__ writes: Module.__setattr__ costs microseconds
        with torch.no_grad(), torch.inference_mode(False):
            held = (key, prepare(raw, dtype, True))
        owner.__dict__[slot] = held
    return held[1]


def cast_one(owner: nn.Module, t: torch.Tensor, dtype: torch.dtype, slot: str = "_cast") -> torch.Tensor:
    """`cast_at_use` for one tensor; `t` itself when it already has `dtype`."""
    return t if t.dtype == dtype else cast_at_use(owner, (t,), dtype, slot=slot)[0]
