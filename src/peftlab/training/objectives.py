"""DEFT's objectives (Runwal, Pedapati & Chen, 2024): the smooth ℓ0 density loss on the FFN
activations and the exact density metric."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import ConfigError
from ..core.taps import token_weights
from ..core.terms import LossContext, LossTerm

if TYPE_CHECKING:
    from ..core.model import AdaptedModel


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
