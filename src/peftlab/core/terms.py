"""Auxiliary loss terms: named, weighted extra objectives the training loop adds to the task loss.

Methods register terms when their adapter is added (KaSA's singular-value and orthogonality
penalties, BA-LoRA's consistency / diversity / SVD regularisers) and users may add their own
(`AdaptedModel.add_loss_term`). A term belonging to an adapter counts only while that adapter is
active and trainable. Terms that read the model's outputs set `needs_outputs`: the AdaptedModel
then keeps the keyword inputs and outputs of its last training forward for them (and only then),
and drops them once the terms are computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .errors import AdapterError, ConfigError

if TYPE_CHECKING:
    from .model import AdaptedModel


@dataclass
class LossContext:
    """What a loss term may read: the model, the last training forward, the training progress."""

    model: AdaptedModel
    inputs: dict[str, Any] | None     # keyword arguments of the last forward (needs_outputs terms)
    outputs: Any | None               # what that forward returned (e.g. a ModelOutput with logits)
    step: int                         # 0-based optimisation step
    total_steps: int | None


@dataclass
class LossTerm:
    """weight · schedule(progress) · compute(context), added to the training loss.

    `schedule` maps training progress in [0, 1] to a factor (default 1); `adapter` names the
    adapter the term belongs to (None: always on); `activations` names the intermediate tensors
    the term reads from `context.model.taps` (they are recorded for training forwards only while
    such a term is active)."""

    name: str
    weight: float
    compute: Callable[[LossContext], torch.Tensor]
    adapter: str | None = None
    needs_outputs: bool = False
    schedule: Callable[[float], float] | None = None
    activations: tuple[str, ...] = ()    # activation points it reads (peftlab.core.taps.POINTS)

    def __post_init__(self) -> None:
        if not isinstance(self.weight, (int, float)) or isinstance(self.weight, bool) \
                or not math.isfinite(self.weight):
            raise ConfigError(f"loss term {self.name!r}: weight must be a finite number, got {self.weight!r}")

    def factor(self, step: int, total_steps: int | None) -> float:
        if self.schedule is None:
            return float(self.weight)
        progress = step / max(total_steps - 1, 1) if total_steps else 0.0
        return float(self.weight) * float(self.schedule(progress))


def weighted_sum(terms: Iterable[LossTerm], context: LossContext
                 ) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Σ factor · compute(context) over `terms` (those at factor 0 skipped) and each weighted
    term's value (for logging); AdapterError when a term reads outputs or activations that no
    training forward recorded."""
    total, parts = None, {}
    for term in terms:
        factor = term.factor(context.step, context.total_steps)
        if factor == 0.0:
            continue
        if term.needs_outputs and context.outputs is None:
            raise AdapterError(f"loss term {term.name!r} reads the model's outputs, but no training "
                               "forward ran through this AdaptedModel since the last auxiliary_loss()")
        if term.activations and not context.model.taps.get(term.activations[0]):
            raise AdapterError(f"loss term {term.name!r} reads activations {term.activations}, but "
                               "no training forward ran through this AdaptedModel since the last "
                               "auxiliary_loss()")
        value = factor * term.compute(context)
        parts[term.name] = float(value.detach())
        total = value if total is None else total + value
    return total, parts


def cosine_decay(to: float) -> Callable[[float], float]:
    """A schedule from 1 at the start to `to` at the end along a half cosine."""
    return lambda p: to + (1 - to) * 0.5 * (1 + math.cos(math.pi * min(max(p, 0.0), 1.0)))


def delayed_ramp(start: float, ramp: float) -> Callable[[float], float]:
    """0 until progress `start`, then a linear ramp to 1 over `ramp`, then 1."""
    return lambda p: 0.0 if p < start else min(1.0, (p - start) / ramp) if ramp > 0 else 1.0
