"""Recomputing an adapter's input in backward from tensors autograd already keeps.

A weight-delta adapter's gradient needs the input of the layer it adapts (LoRA's ∂A = (∂h)ᵀ x),
which the frozen model never keeps: a frozen Linear's backward needs only its weight. Keeping it
is most of what a LoRA step adds to the frozen floor's memory (SmolLM2, all-linear, 8×128: about
290 MB). Yet most such inputs are one cheap operation away from tensors the floor keeps anyway:
an RMSNorm's output is weight · (h · rstd), whose h and rstd its backward keeps; the down
projection's input is act(gate) · up, both kept by the product's backward; o_proj's input is a
reshape of attention's saved output. `recovery(x)` reads x's autograd node and its producers'
saved tensors and returns a `Recovery` that rebuilds x in backward, or None where x cannot be
rebuilt that way (then the caller keeps x, as before).

Exactness: the recipe replays the same operations on the same saved tensors, so it rebuilds x bit
for bit, except LayerNorm (its fused kernel's rounding differs from (x − μ)·rstd·γ + β by an
ulp). Every kind of recipe (its operations and dtypes) is checked against the real x the first
time it is seen; a recipe that does not reproduce x (bit-exactly; LayerNorm's within a few ulps)
is never used, so a wrong rebuild can only cost memory, never a gradient.

Producers run after their consumers in backward, so a producer's saved tensors are still alive
when the adapter's backward reads them. Where saved-tensor hooks are active (activation
checkpointing, offloading) those tensors are not plain, and no recovery is offered.

Switch: `set_input_recompute(False)` (or PEFTLAB_INPUT_RECOMPUTE=0) keeps every input, as a
reference path.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

_enabled = os.environ.get("PEFTLAB_INPUT_RECOMPUTE", "1") not in ("0", "false", "False", "no")
MAX_DEPTH = 6
# recipe signature -> whether it reproduced x when first checked
_checked: dict[tuple, bool] = {}

_RESHAPES = ("ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0")
# nodes whose saved result is their output itself
_RESULT_SAVED = ("TanhBackward0", "SigmoidBackward0", "RsqrtBackward0", "ExpBackward0", "SqrtBackward0")
_BINARY = {"MulBackward0": torch.mul, "DivBackward0": torch.div}


def set_input_recompute(enabled: bool) -> bool:
    """Switch recomputing adapted layers' inputs in backward (on by default) on or off; returns
    the previous setting. Off, LoRA keeps each adapted layer's input, as peft does."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


Plan = tuple[Callable[[], torch.Tensor], tuple]     # (rebuild, signature)


def _saved(node, attr: str) -> torch.Tensor | None:
    value = getattr(node, attr, None)
    return value if isinstance(value, torch.Tensor) else None


def _child(node, i: int, shape: tuple[int, ...] | None, dtype: torch.dtype, depth: int) -> Plan | None:
    nxt, output_nr = node.next_functions[i]
    return None if nxt is None else _plan(nxt, output_nr, shape, dtype, depth + 1)


def _read(node, attr: str) -> Callable[[], torch.Tensor]:
    # read when rebuilding, not kept: the node's saved tensors are freed when it has run, as
    # without recompute, and a second backward through a retained graph finds them again
    return lambda: getattr(node, attr)


def _operand(node, attr: str, i: int, shape, dtype, depth) -> Plan | None:
    """One input of an elementwise node: its saved value, else a plan for its producer (assumed
    to have the output's shape and dtype; the first-use check catches a wrong guess)."""
    t = _saved(node, attr)
    if t is not None:
        return _read(node, attr), ("saved", t.dtype, t.dim())
    return _child(node, i, shape, dtype, depth)


def _plan(node, output_nr: int, shape: tuple[int, ...] | None, dtype: torch.dtype, depth: int) -> Plan | None:
    """How to rebuild output `output_nr` of `node` (of `shape`, `dtype`) from saved tensors."""
    if depth > MAX_DEPTH:
        return None
    name = type(node).__name__
    if name in _RESHAPES:
        if shape is None:
            return None
        sub = _child(node, 0, tuple(node._saved_self_sym_sizes), dtype, depth)
        return None if sub is None else ((lambda: sub[0]().reshape(shape)), (name, sub[1]))
    if name == "TransposeBackward0":
        d0, d1 = node._saved_dim0, node._saved_dim1
        inner = None
        if shape is not None:
            inner = list(shape)
            inner[d0], inner[d1] = inner[d1], inner[d0]
            inner = tuple(inner)
        sub = _child(node, 0, inner, dtype, depth)
        return None if sub is None else ((lambda: sub[0]().transpose(d0, d1)), (name, sub[1]))
    if name == "SelectBackward0":       # hidden[:, 0] (a pooler's input)
        dim, index = node._saved_dim, node._saved_index
        sub = _child(node, 0, tuple(node._saved_self_sym_sizes), dtype, depth)
        return None if sub is None else ((lambda: sub[0]().select(dim, index)), (name, sub[1]))
    if name == "SliceBackward0":
        dim, start, end, step = node._saved_dim, node._saved_start, node._saved_end, node._saved_step
        sub = _child(node, 0, tuple(node._saved_self_sym_sizes), dtype, depth)
        index = (slice(None),) * dim + (slice(start, end, step),)
        return None if sub is None else ((lambda: sub[0]()[index]), (name, sub[1]))
    if name == "CloneBackward0":        # a contiguous copy: same values
        sub = _child(node, 0, shape, dtype, depth)
        return None if sub is None else (sub[0], (name, sub[1]))
    if name == "ToCopyBackward0":
        sub = _child(node, 0, shape, dtype, depth)     # the source's dtype is unknown: the check tells
        return None if sub is None else ((lambda: sub[0]().to(dtype)), (name, dtype, sub[1]))
    if name in _BINARY:
        a = _operand(node, "_saved_self", 0, shape, dtype, depth)
        b = _operand(node, "_saved_other", 1, shape, dtype, depth) if a is not None else None
        if b is None:
            return None
        op = _BINARY[name]
        return (lambda: op(a[0](), b[0]())), (name, a[1], b[1])
    if name == "NativeDropoutBackward0" and output_nr == 0:   # CUDA's dropout (CPU's is a mul)
        mask, scale = _saved(node, "_saved_result1"), node._saved_scale
        sub = _child(node, 0, shape, dtype, depth) if mask is not None else None
        return None if sub is None else ((lambda: sub[0]() * node._saved_result1 * scale), (name, sub[1]))
    if name in _RESULT_SAVED:
        t = _saved(node, "_saved_result")
        return None if t is None else (_read(node, "_saved_result"), (name, t.dtype))
    if name == "SiluBackward0":
        t, get = _saved(node, "_saved_self"), _read(node, "_saved_self")
        return None if t is None else ((lambda: F.silu(get())), (name, t.dtype))
    if name == "GeluBackward0":
        t, get, approximate = _saved(node, "_saved_self"), _read(node, "_saved_self"), node._saved_approximate
        return None if t is None else ((lambda: F.gelu(get(), approximate=approximate)), (name, t.dtype, approximate))
    if name == "BmmBackward0":
        a, b = _saved(node, "_saved_self"), _saved(node, "_saved_mat2")
        if a is None or b is None:
            return None
        return (lambda: torch.bmm(node._saved_self, node._saved_mat2)), (name, a.dtype)
    if name.startswith("ScaledDotProduct") and output_nr == 0:
        t = _saved(node, "_saved_output")
        return None if t is None else (_read(node, "_saved_output"), ("attention", t.dtype))
    if name == "NativeLayerNormBackward0" and output_nr == 0:
        return _layer_norm_plan(node)
    return None


def _layer_norm_plan(node) -> Plan | None:
    x = _saved(node, "_saved_input")
    weight, bias = _saved(node, "_saved_weight"), _saved(node, "_saved_bias")
    if x is None or _saved(node, "_saved_result1") is None or _saved(node, "_saved_result2") is None:
        return None
    affine = weight is not None, bias is not None

    def rebuild() -> torch.Tensor:
        x, mean, rstd = node._saved_input, node._saved_result1, node._saved_result2
        weight, bias = (node._saved_weight if affine[0] else None), (node._saved_bias if affine[1] else None)
        y = (x.float() - mean) * rstd
        if weight is not None:
            y = y * weight.float()
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)
    return rebuild, ("layer_norm", x.dtype, *affine)


class Recovery:
    """Rebuilds one tensor in backward. The adapted layers sharing an input (q/k/v, gate/up)
    share one Recovery: the first backward to ask rebuilds the tensor, the others reuse it, and
    the last lets it go."""

    __slots__ = ("rebuild", "users", "value")

    def __init__(self, rebuild: Callable[[], torch.Tensor]) -> None:
        self.rebuild, self.users, self.value = rebuild, 0, None

    def hold(self) -> Recovery:
        self.users += 1
        return self

    def take(self) -> torch.Tensor:
        """The rebuilt tensor, for one of the users; call once per `hold`."""
        value = self.value if self.value is not None else self.rebuild()
        self.users -= 1     # below 0 on a second backward through a retained graph: no caching
        self.value = value if self.users > 0 else None
        return value


def recovery(x: torch.Tensor) -> Recovery | None:
    """A `Recovery` of `x` from the saved tensors of the autograd graph that produced it, or None
    (recompute switched off, x not produced by a differentiable operation, an unknown producer,
    saved-tensor hooks active, or a recipe that failed its first check)."""
    node = x.grad_fn
    if not _enabled or node is None or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        return None
    shared = getattr(x, "_peftlab_recovery", None)      # another layer already reads this input
    if shared is not None:
        return shared.hold()
    plan = _plan(node, x.output_nr, tuple(x.shape), x.dtype, 0)
    if plan is None:
        return None
    rebuild, signature = plan
    signature = (signature, x.dtype, x.dim())
    ok = _checked.get(signature)
    if ok is None:
        ok = _checked[signature] = _reproduces(rebuild, x, signature)
    if not ok:
        return None
    found = Recovery(rebuild)
    try:    # lives as long as x; the adapters' backward keeps `found`
        x._peftlab_recovery = found
    except AttributeError:      # a tensor subclass without attributes: each reader rebuilds its own
        pass
    return found.hold()


def _reproduces(rebuild: Callable[[], torch.Tensor], x: torch.Tensor, signature: tuple) -> bool:
    # as in backward: no autocast (a bmm would otherwise be recast)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        try:
            y = rebuild()
        except RuntimeError:        # a guessed shape or dtype that does not fit
            return False
        if y.shape != x.shape or y.dtype != x.dtype:
            return False
        if "layer_norm" not in repr(signature):
            return torch.equal(y, x)
        # LayerNorm's fused kernel rounds differently from the formula: a few ulps apart
        eps = torch.finfo(x.dtype).eps
        return torch.allclose(y.float(), x.float(), rtol=8 * eps, atol=8 * eps * float(x.abs().max().clamp(min=1)))
