"""Activation taps: named intermediate tensors of one forward pass, for loss terms and metrics.

Training-side methods read tensors the model computes but does not return: DEFT's density loss
reads the FFN activation that feeds the down projection, attention-level objectives read the
attention probabilities. A *point* names such a tensor in every transformer layer:

* ``"ffn.act"``: the input of each layer's ``ffn.down`` projection, (B, T, d_ff): φ(x W₁) for a
  plain FFN, φ(x W_g) ⊙ (x W_u) for a gated one (Llama). The hook sits on the base projection
  itself, so it reads what W₂ multiplies (after any input-side adapter) whether or not an adapter
  wraps that layer, and keeps working when adapters come and go.
* ``"attn.probs"``: each layer's attention probabilities, (B, H, T, S), as returned by the
  attention module. Only eager attention materialises them.

Taps cost nothing while no one asks for them: hooks exist only for required points (reference
counted), and they store only while a forward is being recorded (`AdaptedModel` records training
forwards when an active loss term needs a point, and any forward inside `recording()`). Stored
tensors are released by `clear()`, which `AdaptedModel.auxiliary_loss` calls once the terms are
computed. `token_mask` is the recorded forward's attention mask (True = real token), so metrics
and losses can skip padding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .errors import ConfigError, TargetNotFoundError

POINTS = ("ffn.act", "attn.probs")


def _tap_modules(model: nn.Module, point: str) -> list[nn.Module]:
    """The plain modules whose input ("ffn.act") or output ("attn.probs") is the point's tensor,
    in layer order."""
    from .sites import resolve_sites
    role = {"ffn.act": "ffn.down", "attn.probs": "attn.out"}[point]
    try:
        sites = resolve_sites(model, [role])
    except TargetNotFoundError as e:
        raise ConfigError(f"activation point {point!r} needs the model's {role} modules: {e}") from None
    # An AdaptedLayer keeps the original module as base_layer: tap that, it outlives the wrapper.
    return [getattr(s.module, "base_layer", s.module) for s in sites]


class ActivationTaps:
    """Collects the tensors at the required points for the forward being recorded."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._counts: dict[str, int] = {}
        self._handles: dict[str, list] = {}
        self._store: dict[str, list[torch.Tensor]] = {}
        self.token_mask: torch.Tensor | None = None   # (B, T) bool of the recorded forward
        self._recording = False
        self._forced = 0

    # ---- which points exist ---------------------------------------------------------------------
    @property
    def points(self) -> tuple[str, ...]:
        return tuple(self._counts)

    def require(self, point: str) -> None:
        """Install the hooks of `point` (once; calls are counted and undone by `release`)."""
        if point not in POINTS:
            import difflib
            close = difflib.get_close_matches(point, POINTS, n=2)
            raise ConfigError(f"unknown activation point {point!r}"
                              + (f"; did you mean {close[0]!r}?" if close else "")
                              + f" Known points: {', '.join(POINTS)}")
        if point not in self._counts:
            modules = _tap_modules(self._model, point)
            if point == "ffn.act":
                hooks = [m.register_forward_pre_hook(self._input_hook(point)) for m in modules]
            else:
                hooks = [m.register_forward_hook(self._output_hook(point)) for m in modules]
            self._handles[point] = hooks
        self._counts[point] = self._counts.get(point, 0) + 1

    def release(self, point: str) -> None:
        """Undo one `require`; the hooks go when the last user releases the point."""
        if point not in self._counts:
            raise ConfigError(f"activation point {point!r} is not required; required: {self.points or 'none'}")
        self._counts[point] -= 1
        if self._counts[point] == 0:
            for handle in self._handles.pop(point):
                handle.remove()
            del self._counts[point]
            self._store.pop(point, None)

    # ---- recording ------------------------------------------------------------------------------
    @property
    def forced(self) -> bool:
        return self._forced > 0

    @contextmanager
    def recording(self, *points: str) -> Iterator[ActivationTaps]:
        """Record every forward inside the block (e.g. to measure density in evaluation),
        requiring `points` for its duration."""
        for p in points:
            self.require(p)
        self._forced += 1
        try:
            yield self
        finally:
            self._forced -= 1
            self.clear()
            for p in points:
                self.release(p)

    def begin(self, attention_mask: torch.Tensor | None) -> None:
        """Start recording a forward: drop what the previous one left."""
        self.clear()
        self._recording = True
        self.token_mask = attention_mask.bool() if isinstance(attention_mask, torch.Tensor) else None

    def end(self) -> None:
        self._recording = False

    def get(self, point: str) -> list[torch.Tensor]:
        """The recorded forward's tensors at `point`, one per layer."""
        if point not in self._counts:
            raise ConfigError(f"activation point {point!r} is not required; call require({point!r}) "
                              "or register a loss term that names it")
        return self._store.get(point, [])

    def clear(self) -> None:
        self._store.clear()
        self.token_mask = None

    def _input_hook(self, point: str):
        def hook(module, args):
            if self._recording:
                self._store.setdefault(point, []).append(args[0])
        return hook

    def _output_hook(self, point: str):
        def hook(module, args, output):
            if not self._recording:
                return
            probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if probs is None:
                raise ConfigError("attention probabilities are not materialised by this attention "
                                  "implementation; load the model with attn_implementation='eager' "
                                  "(or call model.set_attn_implementation('eager'))")
            self._store.setdefault(point, []).append(probs)
        return hook


def token_weights(mask: torch.Tensor | None, batch: int, tokens: int, device) -> torch.Tensor:
    """(B, T) float weights of the real tokens: the mask's last `tokens` columns (a prompt adapter
    may have prepended positions the activations do not have), or all ones without a mask."""
    if mask is None:
        return torch.ones(batch, tokens, device=device)
    if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < tokens:
        raise ConfigError(f"attention mask of shape {tuple(mask.shape)} does not fit activations of "
                          f"{batch} examples × {tokens} tokens")
    return mask[:, -tokens:].to(device=device, dtype=torch.float32)
