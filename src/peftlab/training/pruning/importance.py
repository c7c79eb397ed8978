"""Light-PEFT's plug-in importance estimators, recorded during the estimation run without any
change to the training loop: the output ratio ‖ΔW x‖ / ‖W x + b‖ of every LoRA module (forward
hooks) and the first-order Taylor score of every rank unit (post-accumulate-grad hooks, once per
optimisation step), both averaged over the second half of the estimation steps (`StepWindow`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import PeftlabError
from ...core.layer import AdaptedLayer
from ...core.model import AdaptedModel
from ...methods.lora import LowRankDelta


class StepWindow:
    """Counts the training forwards of an AdaptedModel (a forward pre-hook: no change to the
    training loop) and keeps each one's attention mask. An optimisation step is `grad_accum`
    micro-batches (forwards); `recording` is true from optimisation step `total // 2` on: the
    importance estimators average over the second half of estimation, in whole steps."""

    def __init__(self, am: AdaptedModel, total_steps: int, grad_accum: int = 1) -> None:
        self.total = total_steps                 # optimisation steps
        self.grad_accum = grad_accum
        self.step = -1                           # index of the current training forward (micro-batch)
        self.token_mask: torch.Tensor | None = None   # (B, T) bool of the current forward
        self._handle = am.register_forward_pre_hook(self._on_forward, with_kwargs=True)

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training and torch.is_grad_enabled():
            self.step += 1
            mask = kwargs.get("attention_mask")
            self.token_mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    @property
    def recording(self) -> bool:
        """Whether the current forward is in the second half of estimation."""
        return self.step // self.grad_accum >= self.total // 2

    @property
    def last_micro_batch(self) -> bool:
        """Whether the current forward is the last micro-batch of its optimisation step: after its
        backward the gradients hold the whole step's."""
        return self.step % self.grad_accum == self.grad_accum - 1

    def remove(self) -> None:
        """Remove the forward pre-hook."""
        self._handle.remove()


def lora_branch(delta: LowRankDelta, x: torch.Tensor) -> torch.Tensor:
    """ΔW x without dropout, from the delta's factors (PiSSA's frozen start folded in):
    (..., d_in) -> (..., d_out); token ids (...) for an embedding delta."""
    B, A = delta.factors()
    down = F.embedding(x, A.t()) if delta.embedding else F.linear(x.to(A.dtype), A)
    return F.linear(down, B) * delta.scaling


def output_ratio(branch: torch.Tensor, base: torch.Tensor, token_mask: torch.Tensor | None) -> float:
    """Mean over real tokens of ‖ΔW x‖₂ / ‖W x + b‖₂ (NaN/Inf per token count as 0); all
    tokens count when there is no mask of the tokens' shape."""
    ratio = branch.float().norm(dim=-1) / base.float().norm(dim=-1)           # (B, T) or (N,)
    ratio = torch.nan_to_num(ratio, nan=0.0, posinf=0.0, neginf=0.0)
    if token_mask is not None and token_mask.shape == ratio.shape:
        weights = token_mask.to(ratio.dtype)
        return float((ratio * weights).sum() / weights.sum().clamp_min(1.0))
    return float(ratio.mean())


def taylor_rank_scores(param: torch.Tensor, grad: torch.Tensor, rank_dim: int) -> torch.Tensor:
    """|mean over the other dimension of param ⊙ grad| per rank unit: A (r, d_in) has rank_dim
    0, B (d_out, r) rank_dim 1. NaN/Inf count as 0."""
    other = 1 - rank_dim
    score = (param.detach().float() * grad.detach().float()).mean(dim=other).abs()     # (r,)
    return torch.nan_to_num(score, nan=0.0, posinf=0.0, neginf=0.0)


class _Recorder:
    """What both estimators share: the step window, hook handles and per-key record counts."""

    def __init__(self, window: StepWindow) -> None:
        self.window = window
        self.counts: dict = {}
        self._handles: list = []

    @property
    def recorded(self) -> bool:
        """Whether anything was recorded."""
        return any(self.counts.values())

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()


class ModuleImportance(_Recorder):
    """Output-ratio importance of each LoRA module of an adapter: a forward hook on each wrapped
    base projection recomputes the LoRA branch from its input, per recorded training forward."""

    def __init__(self, am: AdaptedModel, adapter: str, window: StepWindow) -> None:
        super().__init__(window)
        self.sums: dict[str, float] = {}
        for path, layer in am.adapter(adapter).layers.items():
            self.sums[path], self.counts[path] = 0.0, 0
            self._handles.append(layer.base_layer.register_forward_hook(
                self._recorder(path, layer, layer.deltas[adapter])))

    def _recorder(self, path: str, layer: AdaptedLayer, delta: LowRankDelta) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            w = self.window
            if not (w.recording and layer.training and torch.is_grad_enabled()):
                return
            with torch.no_grad():
                value = output_ratio(lora_branch(delta, args[0]), output, w.token_mask)
            self.sums[path] += value if math.isfinite(value) else 0.0
            self.counts[path] += 1
        return hook

    def scores(self) -> dict[str, float]:
        """Site path -> the average over the recorded forwards."""
        return {p: self.sums[p] / self.counts[p] if self.counts[p] else 0.0 for p in self.sums}


class RankImportance(_Recorder):
    """First-order Taylor importance of each rank unit, from post-accumulate-grad hooks on every
    lora_A / lora_B of the adapter: I[i] = |mean_j A_ij ∂L/∂A_ij| + |mean_k B_ki ∂L/∂B_ki|.

    Scored once per optimisation step, after the backward of its last micro-batch, when the
    gradient is the whole step's: scoring the accumulated gradient after every micro-batch would
    count the early micro-batches of a step several times, and scoring each micro-batch's own
    gradient would change the score with the split (|g₁ + g₂| ≠ |g₁| + |g₂|). So grad_accum 1
    with batch 2B and grad_accum 2 with batch B give the same scores. The step's micro-batch
    count is the `grad_accum` EarlyPruning was given; a new gradient tensor in the middle of a
    step (the loop zeroed the gradients with set_to_none sooner) shows it was wrong, and
    `check()` says so."""

    def __init__(self, am: AdaptedModel, adapter: str, window: StepWindow) -> None:
        super().__init__(window)
        self.sums: dict[tuple[str, str], torch.Tensor] = {}
        self._seen: dict[tuple[str, str], torch.Tensor | None] = {}
        self.mismatch: int | None = None         # the forward where a step's gradients were reset
        self.paths = list(am.adapter(adapter).layers)
        for path, layer in am.adapter(adapter).layers.items():
            delta = layer.deltas[adapter]
            for name, rank_dim in (("lora_A", 0), ("lora_B", 1)):
                key = (path, name)
                self.sums[key] = torch.zeros(delta.r)
                self.counts[key] = 0
                self._handles.append(getattr(delta, name).register_post_accumulate_grad_hook(
                    self._recorder(key, rank_dim)))

    def _recorder(self, key: tuple[str, str], rank_dim: int) -> Callable:
        def hook(param: torch.Tensor) -> None:
            w = self.window
            if param.grad is None:
                return
            # the gradient tensor seen at the previous micro-batch of this step: a fresh one
            # mid-step means the loop zeroed (set_to_none) sooner than grad_accum says
            first = w.step % w.grad_accum == 0
            if not first and self._seen.get(key) is not None and self._seen[key] is not param.grad:
                self.mismatch = w.step
            self._seen[key] = None if w.last_micro_batch else param.grad
            if not (w.recording and w.last_micro_batch):
                return
            self.sums[key] += taylor_rank_scores(param, param.grad, rank_dim).cpu()
            self.counts[key] += 1
        return hook

    def check(self) -> None:
        """PeftlabError when the gradients were zeroed inside a step of `grad_accum` micro-batches:
        the scores would be those of partial steps."""
        if self.mismatch is not None:
            raise PeftlabError(
                f"rank importance: the gradients were reset at training forward {self.mismatch}, inside "
                f"an optimisation step of grad_accum={self.window.grad_accum} micro-batches; pass "
                "EarlyPruning the grad_accum the training loop uses (TrainConfig.grad_accum)")

    def scores(self) -> dict[str, torch.Tensor]:
        """Site path -> (r,) average A-part plus average B-part over the recorded backwards."""
        out = {}
        for p in self.paths:
            parts = [self.sums[(p, n)] / self.counts[(p, n)] for n in ("lora_A", "lora_B")
                     if self.counts[(p, n)]]
            out[p] = sum(parts) if parts else torch.zeros_like(self.sums[(p, "lora_A")])
        return out
