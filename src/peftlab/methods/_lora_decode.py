"""LoRA's inference fast path (methods/lora.py's LowRankDelta.contribute calls `contribute`).

At decode (one token) a LoRA site's cost is op dispatch, not arithmetic: the reference path
(`LowRankDelta._reference`) runs F.linear on a 3-D input and an addmm per site (with half
activations on a CPU either two bf16 oneDNN GEMMs of tens of µs each at one row, or casts of x
and of the output there and back). Here, without gradients and outside torch.compile:

* inputs of at most FAST_ROWS rows (decode) only; the factors are kept per weight version and
  dtype as the reference keeps them (A, Bᵀ contiguous, the scaling as addmm's alpha: in fp32 the
  same bits where the GEMMs give them), PiSSA's A0 stacked under A so x·[A; A0]ᵀ is one GEMM;
* the products run on 2-D views with torch.mm / addmm, in fp32 when few rows carry half-precision
  activations on a CPU (`decode_dtype`: oneDNN's bf16 GEMM has a fixed cost of tens of µs per
  call at small M, fp32 a few µs), else in the reference path's dtype;
* deltas called one after the other with the same input tensor (q/k/v read the normed hidden
  state, gate/up the FFN input) share one GEMM: the first one computes x·[A_q; A_k; A_v]ᵀ for
  all of them, each then takes its rank columns into its own B product.
  Which deltas share an input is learned from the calls (a run of calls with one input object),
  not from role names, so it holds for any architecture; a shared result is only handed out for
  that very tensor object (held weakly) at the same `_version`, in the learned order, and is
  dropped once the last member took its columns, so no activation is held past its step. Under
  torch.inference_mode tensors carry no version counter: there the key is the object alone, and an
  in-place write to a projection's input between its siblings' calls (no transformers model
  does that; a forward hook could) would go unseen: `PEFTLAB_LORA_DECODE=0` for such a model.

The reference path stays the definition: DoRA, embeddings, active dropout, trainable factors,
gradients, compiled graphs, more than FAST_ROWS rows and (unless SERVE_ALL) fp32 activations use
it; `PEFTLAB_LORA_DECODE=0` (or `ENABLED = False`) turns this path off, which the tests use to
compare both (tests/test_lora_decode.py).
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import TYPE_CHECKING

import torch

from ..core.precision import HALF, compute_dtype

if TYPE_CHECKING:
    from .lora import LowRankDelta

ENABLED = os.environ.get("PEFTLAB_LORA_DECODE", "1") != "0"

# Which inputs the path serves. By default only half-precision activations on a CPU (products in
# fp32 instead of oneDNN's small-M bf16 GEMMs: bench/lora_overhead.py 1x1 1.48x -> 1.35x). With
# fp32 activations the reference is already a lean F.linear + addmm and this path measured 3-5 %
# slower on the whole model (its slices and Python checks cost more than the GEMMs it shares
# save), so there it stays off; tests switch it on for every dtype (PEFTLAB_LORA_DECODE=all) to
# check its arithmetic in fp32 against the reference.
SERVE_ALL = os.environ.get("PEFTLAB_LORA_DECODE") == "all"

# The fast path serves inputs of at most this many rows (tokens): decode and short batches, where
# op dispatch is a visible share of a forward; longer inputs take the reference path, whose GEMMs
# dominate there anyway (and whose fp32 bits a concatenated GEMM does not always reproduce at
# larger M: measured up to ~1e-6 relative from 9 rows on).
FAST_ROWS = 8

# At most this many rows of half-precision activations on a CPU run the rank-r products in fp32:
# there fp32 costs a few µs per GEMM where oneDNN's bf16 GEMM costs tens. Measured on this
# project's AMX CPU (a loop over one q/k/v group of bench/lora_overhead.py's model, a loaded
# machine: noisy): about equal at 8 rows, bf16 ahead from 16; on the model, bf16 products through
# this path gave no gain over the reference, fp32 ones most of it.
SMALL_ROWS = 8


def decode_dtype(delta: LowRankDelta, activation: torch.dtype, device: torch.device, rows: int) -> torch.dtype:
    """The dtype of the fast path's products: the reference's (`compute_dtype`), except fp32 for
    a few rows of half activations on a CPU."""
    if rows <= SMALL_ROWS and activation in HALF and device.type == "cpu":
        return torch.float32
    return compute_dtype(delta.lora_A.dtype, activation, device)


def eligible(delta: LowRankDelta) -> bool:
    """Whether `contribute` may serve this delta now (the caller checked grad mode and compile)."""
    A = delta._parameters["lora_A"]
    dropout = delta._modules["dropout"]
    return not (delta.dora or delta.embedding or A.requires_grad or delta._parameters["lora_B"].requires_grad
                or (dropout is not None and dropout.training))


def _factors(delta: LowRankDelta, dtype: torch.dtype, device: torch.device) -> tuple:
    """(key, A, parts) in `dtype`, a new tuple whenever a factor changed: A (ρ, d_in) the delta's down factors, [A; A0] with PiSSA, and parts
    ((lo, hi, Bᵀ, alpha), ...) its up products on A's rows lo:hi: (Bᵀ, s) and PiSSA's (B0ᵀ, −s).
    The same tensors and alphas as the reference path (A as stored, Bᵀ contiguous, the scaling as
    addmm's alpha), so that in fp32 both give the same bits where the GEMMs do. Cached on the
    delta per dtype (decode and prefill may use two) until a factor changes (version, storage)."""
    p, b = delta._parameters, delta._buffers
    raw = (p["lora_A"], p["lora_B"]) + ((b["pissa_A0"], b["pissa_B0"]) if delta.pissa else ())
    key = (device, tuple((t._version, t.data_ptr()) for t in raw))
    cache = delta.__dict__.get("_decode")
    if cache is None:
        cache = delta.__dict__["_decode"] = {}
    held = cache.get(dtype)
    if held is None or held[0] != key:
        with torch.no_grad(), torch.inference_mode(False):
            cast = [t.to(device=device, dtype=dtype) for t in raw]
            A = torch.cat(cast[0::2]) if delta.pissa else cast[0].contiguous()
            r, s = delta.r, delta.scaling
            parts = ((0, r, cast[1].t().contiguous(), s),)
            if delta.pissa:
                parts += ((r, 2 * r, cast[3].t().contiguous(), -s),)
        held = cache[dtype] = (key, A, parts)
    return held


class _Group:
    """Deltas that read one input, in call order, with their A factors concatenated (Σρ, d_in):
    one GEMM makes every member's x·Aᵀ; `parts` are each member's up products, on its rows of A.
    The B products stay one per member: a block-diagonal Bᵀ would make them one GEMM but triples
    the bytes read (at decode the factors stream from memory, the model's weights having evicted
    them): measured slower in the model, faster only in a loop over one layer."""

    def __init__(self, members: tuple[LowRankDelta, ...]) -> None:
        self.members = members
        self.held: dict[torch.dtype, tuple] = {}      # dtype -> (key, A, parts per member, factors)

    def factors(self, dtype: torch.dtype, device: torch.device) -> tuple | None:
        """(A concatenated, each member's parts with offsets into it) in `dtype`; None when a
        member is no longer eligible."""
        if not all(eligible(d) for d in self.members):
            return None
        held_by = [_factors(d, dtype, device) for d in self.members]
        key = tuple(map(id, held_by))                  # a member's entry is new when it changed
        held = self.held.get(dtype)
        if held is None or held[0] != key:
            with torch.no_grad(), torch.inference_mode(False):
                A = torch.cat([f[1] for f in held_by])
            parts, start = [], 0
            for f in held_by:
                parts.append(tuple((start + lo, start + hi, Bt, alpha) for lo, hi, Bt, alpha in f[2]))
                start += f[1].shape[0]
            # held_by: keeps the objects whose ids make `key` alive
            held = self.held[dtype] = (key, A, tuple(parts), held_by)
        return held[1], held[2]


class _Tracker(threading.local):
    """Per thread: the shared result being handed out and the run of calls being learned."""

    def __init__(self) -> None:
        self.pending = None       # [weakref to x, its version, group factors, group, next index, x·Aᵀ]
        self.run_x = None         # weakref to the input of the current run of calls, its version
        self.run_version = -1
        self.run: list[LowRankDelta] = []


_TRACK = _Tracker()


def _finish(out: torch.Tensor, h: torch.Tensor, parts: tuple) -> torch.Tensor:
    """out + Σ alpha·h[:, lo:hi]·Bᵀ over the parts (h: (rows, ρ) in the compute dtype), summed in
    the compute dtype and rounded once to out's, as the reference path: an addmm per part, or
    with half activations and fp32 products one mm and one add writing out's dtype (no casts of
    the output there and back)."""
    flat = out.reshape(-1, out.shape[-1])           # a view: base outputs are contiguous
    if flat.dtype != h.dtype:
        if len(parts) == 1:
            lo, hi, Bt, alpha = parts[0]
            return torch.add(flat, torch.mm(h[:, lo:hi], Bt), alpha=alpha,
                             out=torch.empty_like(flat)).view(out.shape)
        acc = flat.to(h.dtype)
    else:
        acc = flat
    for lo, hi, Bt, alpha in parts:
        acc = torch.addmm(acc, h[:, lo:hi], Bt, alpha=alpha)
    return acc.view(out.shape) if acc.dtype == out.dtype else acc.to(out.dtype).view(out.shape)


def _version(x: torch.Tensor) -> int:
    """x's version counter; -1 for an inference tensor (torch.inference_mode), which has none:
    there the shared result is keyed on the tensor object alone (see the module docstring)."""
    return -1 if x.is_inference() else x._version


def _learn(delta: LowRankDelta, x: torch.Tensor) -> None:
    """Record `delta` in the run of calls on `x`; a finished run of two or more becomes a group
    led by its first member."""
    t = _TRACK
    if t.run_x is not None and t.run_x() is x and t.run_version == _version(x) and delta not in t.run:
        t.run.append(delta)
        return
    run = t.run
    if len(run) > 1 and "_lead" not in run[0].__dict__:
        run[0].__dict__["_lead"] = _Group(tuple(run))
    t.run_x, t.run_version, t.run = weakref.ref(x), _version(x), [delta]


def contribute(delta: LowRankDelta, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
    """`out` plus the delta's contribution, or None when the reference path must run."""
    if not eligible(delta) or x.dtype != out.dtype:
        return None
    t = _TRACK
    pending = t.pending
    if pending is not None:
        ref, version, f, group, i, _ = pending
        if group.members[i] is delta and ref() is x and version == _version(x):
            if i + 1 == len(group.members):
                t.pending = None                      # every member served: drop the result
            else:
                pending[4] = i + 1
            return _finish(out, pending[5], f[1][i])
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] > FAST_ROWS or not (SERVE_ALL or (out.dtype in HALF and out.device.type == "cpu")):
        return None
    dtype = decode_dtype(delta, out.dtype, out.device, x2.shape[0])
    group = delta.__dict__.get("_lead")
    if group is not None:
        if pending is not None:
            # the previous group's result was not fully taken: a member stopped being called
            # (adapter switched off there, deleted): forget that group, learn again
            pending[3].members[0].__dict__.pop("_lead", None)
            t.pending = None
        f = group.factors(dtype, out.device)
        if f is not None:
            xc = x2 if x2.dtype == dtype else x2.to(dtype)
            h = torch.mm(xc, f[0].t())                                # (rows, Σρ)
            t.pending = [weakref.ref(x), _version(x), f, group, 1, h]
            return _finish(out, h, f[1][0])
        del delta.__dict__["_lead"]
    _learn(delta, x)
    _, A, parts = _factors(delta, dtype, out.device)
    xc = x2 if x2.dtype == dtype else x2.to(dtype)
    return _finish(out, torch.mm(xc, A.t()), parts)
