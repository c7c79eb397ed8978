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
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .errors import ConfigError

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
    activations: tuple[str, ...] = ()    # activation points it reads (peftlab.activations.POINTS)

    def __post_init__(self) -> None:
        if not isinstance(self.weight, (int, float)) or isinstance(self.weight, bool) \
                or not math.isfinite(self.weight):
            raise ConfigError(f"loss term {self.name!r}: weight must be a finite number, got {self.weight!r}")

    def factor(self, step: int, total_steps: int | None) -> float:
        if self.schedule is None:
            return float(self.weight)
        progress = step / max(total_steps - 1, 1) if total_steps else 0.0
        return float(self.weight) * float(self.schedule(progress))


def cosine_decay(to: float) -> Callable[[float], float]:
    """A schedule from 1 at the start to `to` at the end along a half cosine."""
    return lambda p: to + (1 - to) * 0.5 * (1 + math.cos(math.pi * min(max(p, 0.0), 1.0)))


def delayed_ramp(start: float, ramp: float) -> Callable[[float], float]:
    """0 until progress `start`, then a linear ramp to 1 over `ramp`, then 1."""
    return lambda p: 0.0 if p < start else min(1.0, (p - start) / ramp) if ramp > 0 else 1.0


# ---- DEFT: activation density (Runwal, Pedapati & Chen, 2024) ----------------------------------
def _per_example_density(z: torch.Tensor, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(B,) mean of `values` (B, T, D) over the features and the real tokens of each example."""
    per_token = values.mean(dim=-1)                                   # (B, T)
    return (per_token * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def density_term(weight: float = 1.0, *, eps: float = 1e-7, point: str = "ffn.act",
                 layer_weights: list[float] | None = None, name: str = "density",
                 schedule: Callable[[float], float] | None = None) -> LossTerm:
    """DEFT's density loss: weight · mean over examples and layers of the smooth ℓ0 surrogate
    ρ̃_ε(Z) = mean_{t,j} z²/(z² + ε) of the FFN activations (non-padding tokens only; DEFT's
    code also counts padding). Works with any method. `layer_weights` multiply the per-layer
    terms (ADA-DEFT's learned layer weights plug in here); `schedule` scales the weight over
    training (e.g. `delayed_ramp(0.2, 0.1)`: on once the task is learned)."""
    if not eps > 0:
        raise ConfigError(f"density eps must be > 0, got {eps!r} (DEFT uses 1e-7)")

    def compute(ctx: LossContext) -> torch.Tensor:
        from .activations import token_weights
        acts = ctx.model.taps.get(point)
        if layer_weights is not None and len(layer_weights) != len(acts):
            raise ConfigError(f"density layer_weights has {len(layer_weights)} entries for "
                              f"{len(acts)} layers")
        total = None
        for i, z in enumerate(acts):                                  # z: (B, T, D)
            z = z.float()
            w = token_weights(ctx.model.taps.token_mask, z.shape[0], z.shape[1], z.device)
            sq = z * z
            rho = _per_example_density(z, w, sq / (sq + eps)).mean()
            if layer_weights is not None:
                rho = rho * layer_weights[i]
            total = rho if total is None else total + rho
        return total / len(acts)

    return LossTerm(name, weight, compute, schedule=schedule, activations=(point,))


def activation_density(model: AdaptedModel, batches, *, threshold: float = 0.0,
                       point: str = "ffn.act") -> dict[str, Any]:
    """DEFT's exact density metric ‖Z‖₀ / (T·D) of the activations at `point`, per example over
    its non-padding tokens, averaged over examples; an entry counts as non-zero when |z| >
    `threshold` (0 for ReLU; GELU/SiLU outputs are never exactly 0, so give a small τ).

    `batches` yields keyword-argument dicts for the model's forward (no gradients are taken).
    Returns {"density": overall mean, "per_layer": [...], "examples": n}."""
    from .activations import token_weights
    sums: list[float] = []
    examples = 0
    modes = [(m, m.training) for m in model.modules()]   # restored exactly afterwards
    model.eval()
    try:
        with torch.no_grad(), model.taps.recording(point):
            for batch in batches:
                model(**batch)
                acts = model.taps.get(point)
                if not sums:
                    sums = [0.0] * len(acts)
                for i, z in enumerate(acts):
                    w = token_weights(model.taps.token_mask, z.shape[0], z.shape[1], z.device)
                    nonzero = (z.abs() > threshold).float()
                    sums[i] += float(_per_example_density(z, w, nonzero).sum())
                examples += acts[0].shape[0] if acts else 0
    finally:
        for module, mode in modes:
            module.training = mode
    if not examples:
        raise ConfigError("activation_density got no batches")
    per_layer = [s / examples for s in sums]
    return {"density": sum(per_layer) / len(per_layer), "per_layer": per_layer, "examples": examples}
