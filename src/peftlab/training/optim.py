"""Optimisers for full-weight and adapter training: GaLore, Natural GaLore and LoRA+.

    from peftlab.training.optim import build_optimizer, optimizer_state_bytes
    opt = build_optimizer(list(model.named_parameters()), "natural-galore", lr=1e-3, rank=8)

**GaLore** (Zhao et al., 2024) trains full weights with low-rank optimiser state. For a 2-D weight
W (m×n) with gradient G, every `update_gap` (T) steps the projector is recomputed from the SVD of
the current G: P = the top-r left singular vectors when m <= n (R = Pᵀ G, r×n), else the top-r
right singular vectors Q (R = G Q, m×r), so the state lives on the smaller side. Adam runs on R
(its moments have R's shape), the normalised update N is projected back (P N or N Qᵀ) and the step
is W ← W − lr·scale·(P N), followed by decoupled weight decay W ← W − lr·wd·W. State per matrix:
two r×n moments and the m×r projector instead of AdamW's two m×n moments.

**Natural GaLore** (Das, 2024; spec §13) preconditions the projected gradient g = vec(R) with the
empirical Fisher of the last s projected gradients G = [g_k, …, g_{k−s+1}] (the current one
included): g̃ = (λI + G Gᵀ)⁻¹ g. The paper computes it with the Woodbury identity,
g̃ = λ⁻¹ g − λ⁻² G z with (I_s + λ⁻¹ GᵀG) z = Gᵀ g solved by Cholesky; because g is a column of
G this equals G (λ I_s + GᵀG)⁻¹ e (e picks the current gradient), which is computed instead: the
same s×s Cholesky solve without the cancellation that costs the Woodbury form ~σ²/λ in precision.
Then Adam on g̃ as above.

Projection (`projection`): "one-sided" (Pᵀ G or G Q, both papers' form; GaLore's default) or
"two-sided" (Pᵀ G Q with P, Q the top-r left and right singular vectors: an r×r core, the rank-r
Tucker decomposition the official Natural GaLore code uses; Natural GaLore's default). The
gradient history holds s projected gradients: s·r·n values one-sided — more than AdamW's two
m×n moments at r = 64, s = 20 on 384-wide matrices — but s·r² two-sided, so Natural GaLore's
state stays near GaLore's (`bench/optimizer_state.py`).

Damping (`damping_mode`): "relative" (the default) uses λ·mean‖g_i‖² over the history, so λ is a
multiple of the gradients' own energy and means the same whether the projected gradients are
1e-6 or 1e2 in squared norm (default λ = 1); "absolute" uses λ as given (the paper's and its
code's, default 1e-3: on a small model with |g|² ≫ λ, (λI + GGᵀ)⁻¹ g whitens the history and
training slows, tests/test_optim.py).

**LoRA+** (Hayou et al., 2024) is AdamW with the LoRA "up" factor B at a larger learning rate
(lr·ratio, ratio 16 by default) than A. The B factors are the parameters named `…lora_B` (LoRA,
DoRA, rsLoRA, PiSSA, BA-LoRA, KaSA and Context-PEFT's low-rank deltas) and AdaLink's up factor
`…deltas.<adapter>.U` (zero-initialised like B). Bottleneck adapters' `up` layers are not low-rank
factors of a weight delta and keep the base lr.

Paper-versus-code choices (spec §13.2):

* Projection: both papers project one-sided; the official Natural GaLore code two-sided (rank-r
  Tucker, r×r state). Both are offered; Natural GaLore defaults to the code's two-sided form,
  which is what keeps its history small (the paper's "no additional memory").
* The official code keeps the gradient history across projector refreshes, mixing vectors of the
  old and new subspace. `reset_history_on_switch=True` (the default) clears it at every refresh
  after the first; False reproduces the code.
* λ (`damping`) is configurable; the code hard-codes 1e-3 (absolute): damping_mode="absolute"
  with no λ reproduces it; the default is relative damping with λ = 1.
* Adam's ε is added to the bias-corrected √v̂ (m̂ / (√v̂ + ε), the papers' and torch's AdamW form);
  the GaLore code adds it before bias correction. Subspace groups default to ε = 1e-6 (paper
  code), plain groups to AdamW's 1e-8. The SVD runs in float32 whatever the parameter dtype, the
  natural-gradient solve in at least float32; every state tensor has the parameter's dtype and
  device.
* Weight decay: subspace groups apply it after the step (the spec and the GaLore code); plain
  groups before it, exactly as torch.optim.AdamW (the two orders differ by lr²·wd·update).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError, close_matches
from ..core.method import check_number, check_positive_int

OPTIMIZERS = ("adamw", "galore", "natural-galore", "loraplus")
PROJ_SIDES = ("auto", "left", "right")
PRECONDITIONERS = ("none", "natural")
PROJECTIONS = ("one-sided", "two-sided")
DAMPING_MODES = ("relative", "absolute")

_SUBSPACE_DEFAULTS: dict[str, Any] = {
    "update_gap": 200, "scale": 0.25, "proj_side": "auto", "preconditioner": "none",
    "history": 20, "damping": None, "reset_history_on_switch": True,
    "projection": None,             # None: two-sided for Natural GaLore, one-sided for GaLore
    "damping_mode": "relative",
}
# λ when none is given: the paper's 1e-3 as an absolute damping; 1 as a relative one (measured on
# tiny_llama memorisation, tests/test_optim.py: relative λ 1e-3 whitens as the absolute 1e-3 does)
DEFAULT_DAMPING = {"absolute": 1e-3, "relative": 1.0}
_SUBSPACE_EPS = 1e-6      # GaLore / Natural GaLore paper code
_ADAMW_EPS = 1e-8         # torch.optim.AdamW


# ---- validation ----------------------------------------------------------------------------------
def _positive(what: str, value: Any, hint: str = "") -> None:
    check_number(what, value, low=0, low_open=True, hint=hint)


def _check_adam_options(group: Mapping[str, Any]) -> None:
    check_number("learning rate", group["lr"], low=0)
    check_number("weight_decay", group["weight_decay"], low=0)
    check_number("eps", group["eps"], low=0)
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
        raise ConfigError(f"betas must be two numbers in [0, 1), e.g. (0.9, 0.999), got {betas!r}")


def _check_subspace_options(group: Mapping[str, Any]) -> None:
    if group["projection"] not in PROJECTIONS:
        raise ConfigError(f"projection {group['projection']!r} is unknown; choose one of {PROJECTIONS} "
                          "('two-sided': an r×r core, Natural GaLore's default)")
    if group["damping_mode"] not in DAMPING_MODES:
        raise ConfigError(f"damping_mode {group['damping_mode']!r} is unknown; choose one of {DAMPING_MODES} "
                          "('relative': λ times the history's mean squared norm)")
    check_positive_int("GaLore rank", group["rank"])
    check_positive_int("GaLore update_gap (steps between projector refreshes)", group["update_gap"])
    check_positive_int("Natural GaLore history (number of past gradients)", group["history"])
    _positive("GaLore scale", group["scale"], " (the paper uses 0.25 for pre-training, 4 for fine-tuning)")
    _positive("Natural GaLore damping λ", group["damping"], " (the paper code uses 1e-3, absolute)")
    if group["proj_side"] not in PROJ_SIDES:
        raise ConfigError(f"GaLore proj_side {group['proj_side']!r} is unknown; choose one of {PROJ_SIDES} "
                          "('auto' projects on the smaller side)")
    if group["preconditioner"] not in PRECONDITIONERS:
        raise ConfigError(f"preconditioner {group['preconditioner']!r} is unknown; choose one of "
                          f"{PRECONDITIONERS} ('none': GaLore, 'natural': Natural GaLore)")
    if not isinstance(group["reset_history_on_switch"], bool):
        raise ConfigError("reset_history_on_switch must be True or False, got "
                          f"{group['reset_history_on_switch']!r}")


def projected_side(shape: Sequence[int], rank: int, proj_side: str = "auto") -> str | None:
    """"left" (state r×n), "right" (state m×r), or None when the parameter gets plain AdamW
    (not 2-D, or its smaller side is <= rank, where a projection would save nothing)."""
    if len(shape) != 2 or min(shape) <= rank:
        return None
    if proj_side == "auto":
        return "left" if shape[0] <= shape[1] else "right"
    return proj_side


# ---- the optimiser -------------------------------------------------------------------------------
class SubspaceAdamW(torch.optim.Optimizer):
    """AdamW whose param groups with a `rank` run GaLore or Natural GaLore (see the module docstring).

    Group options (defaults in brackets): lr [1e-3], betas [(0.9, 0.999)], eps [1e-6 for groups
    with `rank`, 1e-8 otherwise], weight_decay [0]; for subspace groups also rank, update_gap [200],
    scale [0.25], proj_side ["auto" | "left" | "right"], preconditioner ["none" → GaLore, "natural"
    → Natural GaLore], history s [20], damping λ [1e-3] and reset_history_on_switch [True: clear
    the gradient history whenever the projector is recomputed; the official code keeps it].
    Groups without `rank` (and, inside a subspace group, parameters that are not 2-D or whose
    smaller side is <= rank) take plain AdamW steps, numerically those of torch.optim.AdamW.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float | None = None, weight_decay: float = 0.0) -> None:
        # eps None: resolved per group (subspace or plain) in add_param_group.
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Fill in the subspace defaults of groups with `rank`, resolve eps, validate."""
        subspace = param_group.get("rank") is not None
        if subspace:
            for key, value in _SUBSPACE_DEFAULTS.items():
                param_group.setdefault(key, value)
            if param_group["damping"] is None and param_group["damping_mode"] in DEFAULT_DAMPING:
                param_group["damping"] = DEFAULT_DAMPING[param_group["damping_mode"]]
            if param_group["projection"] is None:
                param_group["projection"] = ("two-sided" if param_group["preconditioner"] == "natural"
                                             else "one-sided")
        if param_group.get("eps", self.defaults["eps"]) is None:
            param_group["eps"] = _SUBSPACE_EPS if subspace else _ADAMW_EPS
        merged = {**self.defaults, **param_group}   # validated before the group is added
        _check_adam_options(merged)
        if subspace:
            _check_subspace_options(merged)
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            rank = group.get("rank")
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or p.is_complex():
                    raise ConfigError("SubspaceAdamW supports dense real tensors only; got a "
                                      f"{'sparse gradient' if p.grad.is_sparse else 'complex parameter'}")
                side = projected_side(p.shape, rank, group["proj_side"]) if rank is not None else None
                if side is None:
                    self._adamw_step(p, group)
                else:
                    self._subspace_step(p, group, side)
        return loss

    # ---- plain AdamW (the order of operations of torch.optim.AdamW, single-tensor path) ----------
    def _adamw_step(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        lr, wd = group["lr"], group["weight_decay"]
        if wd != 0:
            p.mul_(1 - lr * wd)
        update = self._adam_direction(state, p.grad, group)
        p.sub_(update, alpha=lr)

    def _adam_direction(self, state: dict[str, Any], grad: torch.Tensor, group: dict[str, Any]
                        ) -> torch.Tensor:
        """m̂ / (√v̂ + ε) after updating the moments in place with `grad` (a fresh tensor)."""
        beta1, beta2 = group["betas"]
        step = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
        denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(group["eps"])
        # Written over denom: one temporary per step instead of two.
        return torch.div(exp_avg, denom, out=denom).div_(bias_correction1)

    # ---- GaLore / Natural GaLore ------------------------------------------------------------------
    def _subspace_step(self, p: torch.Tensor, group: dict[str, Any], side: str) -> None:
        state = self.state[p]
        grad = p.grad                                   # (m, n)
        rank = group["rank"]
        natural = group["preconditioner"] == "natural"
        if group["projection"] == "two-sided":
            side = "both"
        if not state:
            self._init_subspace_state(state, p, rank, side, natural, group["history"])
        state["step"] += 1
        if (state["step"] - 1) % group["update_gap"] == 0:
            refreshed = "projector" in state
            # (m, r) or (n, r); two-sided: P (m, r) and Q (n, r)
            state["projector"], right = _top_singular_vectors(grad, rank, side)
            if right is not None:
                state["projector_right"] = right
            if natural and refreshed and group["reset_history_on_switch"]:
                state["history_len"] = 0
                state["history_pos"] = 0
        P, Q = state["projector"], state.get("projector_right")
        if natural:
            current = state["history_pos"]
            row = state["history"][current]                         # (k,), k = r·n, m·r or r·r
            _project(grad, P, side, Q, out=row.view(state["exp_avg"].shape))
            state["history_pos"] = (current + 1) % group["history"]
            state["history_len"] = min(state["history_len"] + 1, group["history"])
            projected = _natural_gradient(state["history"][: state["history_len"]], current,
                                          group["damping"], group["damping_mode"] == "relative"
                                          ).view(state["exp_avg"].shape)
        else:
            projected = _project(grad, P, side, Q)                  # (r, n), (m, r) or (r, r)
        direction = self._adam_direction(state, projected, group)   # N, projected shape
        lr = group["lr"]
        step_size = -lr * group["scale"]
        # Back-projection accumulated straight into p (GEMM with beta=1): no m×n temporary.
        if side == "left":
            p.addmm_(P, direction, alpha=step_size)                 # P N: (m, r)(r, n)
        elif side == "right":
            p.addmm_(direction, P.T, alpha=step_size)               # N Qᵀ: (m, r)(r, n)
        else:
            p.addmm_(P @ direction, Q.T, alpha=step_size)           # P N Qᵀ: (m, r)(r, n)
        if group["weight_decay"] != 0:
            p.mul_(1 - lr * group["weight_decay"])

    @staticmethod
    def _init_subspace_state(state: dict[str, Any], p: torch.Tensor, rank: int, side: str,
                             natural: bool, history: int) -> None:
        m, n = p.shape
        shape = {"left": (rank, n), "right": (m, rank), "both": (rank, rank)}[side]
        state["step"] = 0
        state["exp_avg"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
        if natural:
            state["history"] = torch.zeros(history, shape[0] * shape[1], dtype=p.dtype, device=p.device)
            state["history_len"] = 0     # rows of `history` that hold gradients
            state["history_pos"] = 0     # the row the next gradient overwrites (a ring buffer)


def _top_singular_vectors(grad: torch.Tensor, rank: int, side: str
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The projector: the top-`rank` left (m, r) or right (n, r) singular vectors of `grad`, or
    for side "both" the left ones and the right ones (n, r); computed in float32 and returned in
    the gradient's dtype."""
    U, _, Vh = torch.linalg.svd(grad.float(), full_matrices=False)
    left, right = U[:, :rank].to(grad.dtype).contiguous(), Vh[:rank].T.to(grad.dtype).contiguous()
    if side == "both":
        return left, right
    return (left if side == "left" else right), None


def _project(grad: torch.Tensor, P: torch.Tensor, side: str, Q: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """Pᵀ G (r, n) for the left side, G Q (m, r) for the right, Pᵀ G Q (r, r) for both."""
    if side == "left":
        return torch.matmul(P.T, grad, out=out)
    if side == "right":
        return torch.matmul(grad, P, out=out)
    return torch.matmul(P.T @ grad, Q, out=out)


def _natural_gradient(history: torch.Tensor, current: int, damping: float, relative: bool = False
                      ) -> torch.Tensor:
    """g̃ = (λ I + Hᵀ H)⁻¹ g for the c gradients in the rows of `history` H (c, k), g = H[current].

    The spec's Woodbury form, λ⁻¹ g − λ⁻² Hᵀ z with (I_c + λ⁻¹ H Hᵀ) z = H g, subtracts two
    vectors of size |g|/λ to leave one of size |g|/σ², losing a factor σ²/λ of precision (about
    1e-2 relative in float32 with λ = 1e-3). Since g is itself a row of H (H g = the Gram column,
    g = Hᵀ e_current), the same quantity is Hᵀ (λ I_c + H Hᵀ)⁻¹ e_current (push-through identity):
    one c×c Cholesky solve, no cancellation. Runs in float32 (float64 for float64 parameters) and
    retries in float64 if the Gram matrix is too ill-conditioned for float32 Cholesky. `relative`:
    λ is scaled by the mean of the Gram diagonal (the history's mean squared norm; λ itself if the
    history is all zeros).
    """
    for work in dict.fromkeys((torch.promote_types(history.dtype, torch.float32), torch.float64)):
        H = history if history.dtype == work else history.to(work)          # (c, k)
        gram = H @ H.T                                                      # (c, c)
        scale = float(gram.diagonal().mean()) if relative else 1.0
        lam = damping * (scale if scale > 0 else 1.0)
        gram.diagonal().add_(lam)                                           # λ I + H Hᵀ
        factor, info = torch.linalg.cholesky_ex(gram)
        if int(info) == 0:
            unit = torch.zeros(H.shape[0], 1, dtype=work, device=H.device)
            unit[current] = 1.0
            weights = torch.cholesky_solve(unit, factor)                    # (c, 1)
            return (H.T @ weights).squeeze(1).to(history.dtype)             # (k,)
    raise ConfigError(f"Natural GaLore: the gradient history's Gram matrix is not positive definite "
                      f"even in float64 (damping λ = {damping}); raise damping or clip gradients")


# ---- building optimisers by name -----------------------------------------------------------------
def is_lowrank_up_factor(name: str) -> bool:
    """True for a LoRA-style "up" factor (B) by parameter name: `…lora_B` (LoRA and every method
    built on its delta, KaSA, Context-PEFT) or AdaLink's `…deltas.<adapter>.U`."""
    parts = name.split(".")
    return parts[-1] == "lora_B" or (parts[-1] == "U" and len(parts) >= 3 and parts[-3] == "deltas")


def _lr_multiplier(name: str, lr_scale: Mapping[str, float]) -> float:
    for pattern, factor in lr_scale.items():   # first match wins
        if fnmatch.fnmatchcase(name, pattern):
            return float(factor)
    return 1.0


def _check_lr_scale(lr_scale: Mapping[str, float], names: Sequence[str]) -> None:
    for pattern, factor in lr_scale.items():
        _positive(f"lr_scale[{pattern!r}]", factor,
                  " (a learning-rate multiplier; to freeze parameters, set requires_grad=False)")
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            hint = close_matches(pattern, names, n=3) or names[:2]
            raise ConfigError(f"lr_scale pattern {pattern!r} matches no trainable parameter name (an "
                              f"fnmatch glob on the full name, e.g. '*lora_B'); names look like {hint}")


def _optimizer_name(name: str) -> str:
    key = name.lower().replace("_", "-") if isinstance(name, str) else name
    if key not in OPTIMIZERS:
        hint = close_matches(str(name), OPTIMIZERS)
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}"
                          + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    return key


def build_optimizer(named_params: Sequence[tuple[str, nn.Parameter]], name: str = "adamw", lr: float = 2e-4,
                    weight_decay: float = 0.0, *, lr_scale: Mapping[str, float] | None = None,
                    rank: int = 8, update_gap: int = 200, scale: float = 0.25, proj_side: str = "auto",
                    history: int = 20, damping: float | None = None, loraplus_ratio: float = 16.0,
                    reset_history_on_switch: bool = True, projection: str | None = None,
                    damping_mode: str = "relative") -> torch.optim.Optimizer:
    """The optimiser `name` (one of OPTIMIZERS) over the trainable parameters of `named_params`.

    * "adamw": torch.optim.AdamW.
    * "galore" / "natural-galore": SubspaceAdamW with a subspace group for every 2-D parameter
      whose smaller side is > rank and a plain AdamW group for the rest.
    * "loraplus": torch.optim.AdamW with LoRA up factors (`is_lowrank_up_factor`) at
      lr·loraplus_ratio and everything else at lr.
    `lr_scale` maps fnmatch globs on parameter names to lr multipliers (first match wins) for
    every kind; parameters are split into groups accordingly. Each group carries `param_names`,
    `param_kind` ("default", "lora_B", "subspace" or "plain") and its `lr_scale` multiplier.
    Parameters with requires_grad=False are left out.
    """
    kind = _optimizer_name(name)
    named = [(n, p) for n, p in named_params if p.requires_grad]
    if not named:
        raise ConfigError("build_optimizer got no trainable parameters: pass model.named_parameters() "
                          "after marking what to train (am.set_trainable(name) or requires_grad_(True))")
    _positive("learning rate lr", lr)
    check_number("weight_decay", weight_decay, low=0)
    lr_scale = dict(lr_scale or {})
    _check_lr_scale(lr_scale, [n for n, _ in named])
    subspace_options = {"rank": rank, "update_gap": update_gap, "scale": scale, "proj_side": proj_side,
                        "preconditioner": "natural" if kind == "natural-galore" else "none",
                        "history": history,
                        "damping": DEFAULT_DAMPING.get(damping_mode, 1.0) if damping is None else damping,
                        "reset_history_on_switch": reset_history_on_switch,
                        "projection": projection or ("two-sided" if kind == "natural-galore" else "one-sided"),
                        "damping_mode": damping_mode}
    if kind in ("galore", "natural-galore"):
        _check_subspace_options(subspace_options)
    if kind == "loraplus":
        _positive("loraplus_ratio", loraplus_ratio, " (the LoRA+ paper uses 16)")
        if not any(is_lowrank_up_factor(n) for n, _ in named):
            raise ConfigError("LoRA+ needs a LoRA adapter: no trainable parameter is a LoRA up factor "
                              "(names ending in 'lora_B', or AdaLink's '.U'); add and set_trainable a LoRA "
                              "adapter, or use optimizer 'adamw'")

    def param_kind(pname: str, p: nn.Parameter) -> str:
        if kind == "loraplus":
            return "lora_B" if is_lowrank_up_factor(pname) else "default"
        if kind in ("galore", "natural-galore"):
            return "subspace" if projected_side(p.shape, rank, proj_side) else "plain"
        return "default"

    groups: dict[tuple[str, float], dict[str, Any]] = {}   # insertion order = first appearance
    for pname, p in named:
        pk, mult = param_kind(pname, p), _lr_multiplier(pname, lr_scale)
        group = groups.get((pk, mult))
        if group is None:
            group_lr = lr * mult * (loraplus_ratio if pk == "lora_B" else 1.0)
            group = groups[pk, mult] = {"params": [], "lr": group_lr, "weight_decay": weight_decay,
                                        "param_kind": pk, "lr_scale": mult}
            if pk == "subspace":
                group.update(subspace_options)
        group["params"].append((pname, p))
    if kind in ("galore", "natural-galore"):
        return SubspaceAdamW(list(groups.values()), lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(list(groups.values()), lr=lr, weight_decay=weight_decay)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors in `optimizer.state` (moments, projectors, histories, step
    counters), each storage counted once."""
    seen: set[tuple[torch.device, int]] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                key = (value.device, storage.data_ptr())
                if key not in seen:
                    seen.add(key)
                    total += storage.nbytes()
    return total
