"""BA-LoRA (Chang, Chang & Wu; arXiv 2408.04556): PiSSA-initialised LoRA plus three regularisers
on the model's output logits (shared/specs/seed-methods.md §12):

    L = L_task + λ1 Ω_consistency + λ2 Ω_diversity + λ3 Ω_SVD

The adapter is `LowRankDelta` with init="pissa" (lora.py). Because this library's PiSSA keeps
the base weight untouched, `AdaptedModel.disabled()` is exactly the pre-trained model, so the
reference ("teacher") logits z^P come from a no-grad forward of the same weights with adapters
disabled (in eval mode, as the reference code runs its frozen teacher): no second model copy and
no stored activations. The three terms are LossTerms ("balora.<adapter>.consistency",
".diversity", ".svd"), counted while the adapter is active and trainable.

Forms (`form`):

* "nlu" (early official code, C1), on classification logits Z (B×C): consistency = MSE of the
  row-wise L2-normalised logits; diversity = (1/C) Σ_{i≠j} Cov(Z)_ij² (covariance over the batch,
  centred, /(B−1); 0 for B < 2); SVD = −Σ_{i≤k} σ_i / Σ_i σ_i of Z.
* "nlg" (C1), per token: consistency = mean_t KL(p^P_t ‖ p^F_t); diversity = −mean_t H(p^F_t);
  SVD = −Σ_{i≤k} σ_i / Σ_i σ_i of the [N_tokens × V] logit matrix. C1 writes the KL with
  reduction="batchmean" over [B, T, V] (a sum over tokens divided by B) and the SVD term on
  logits reshaped to [B, T·V]; here both work on the matrix of the selected tokens (the mean over
  tokens, the library-wide label-mask-aware reduction).
* "nlg-refined" (current official code, C2): consistency = T²·mean_t KL(softmax(z^P/T) ‖
  softmax(z^F/T)), T = 2; diversity = −mean_t H(softmax(top-k logits_t)), k = 20; SVD =
  −Σ_{i≤k} σ_i / ‖Z‖_F, k = 10, with randomized SVD (q = k + 5, 2 power iterations, fixed seed)
  when V > 4096; λ1 decays along a cosine to 0.1·λ1, λ2 and λ3 are 0 for the first 20% of the
  steps and ramp up linearly over the next 5%. C2's optional teacher-confidence-adaptive λ1 is
  not implemented.
* "auto" (default): "nlu" for 2-D logits (sequence classification), "nlg" otherwise, chosen per
  batch. The C1 weights are the same for both.

Tokens: the NLG forms use the positions whose *next* label is not −100 when the forward got
`labels` (a causal LM's logit at t predicts token t+1; C2 masks with the unshifted labels, one
position early); without labels, the positions with attention_mask ≠ 0; otherwise all positions.
Encoder-decoder models use the labels unshifted.

SVD term: C1 computes the singular values under no_grad, so its SVD term has no gradient. Here it
is differentiable (as in C2): exact singular values come from the eigenvalues of the fp64 Gram
matrix of the selected logits (same values as an SVD; no N×V copy), with the gradient
Σ_i ∂Ω/∂σ_i u_i v_iᵀ; directions whose σ_i < 1e-7·σ_max are left out of the gradient.

Memory: the NLG terms run in one autograd Function over row chunks of the logits: nothing of size
tokens×vocabulary is kept beyond the reference logits, and the backward writes one gradient.
"""

from __future__ import annotations

import dataclasses
import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError, PeftlabError
from ..core.method import Capability, Method, check_number
from ..core.terms import LossContext, LossTerm, cosine_decay, delayed_ramp
from . import lora
from .lora import LoraConfig

FORMS = ("auto", "nlu", "nlg", "nlg-refined")
SVD_SOLVERS = ("auto", "exact", "randomized")
TERMS = ("consistency", "diversity", "svd")
# (λ1, λ2, λ3, svd_k, temperature, top_k) per form: C1 for nlu/nlg, C2 for the refined form.
DEFAULTS = {
    "c1": (1e-4, 3e-4, 1e-4, 3, 1.0, 0),
    "nlg-refined": (0.025, 0.005, 0.005, 10, 2.0, 20),
}
_CHUNK = 1 << 21            # elements per row chunk of the logits (8 MiB in fp32)
_RANDOMIZED_ABOVE = 4096    # vocabulary size above which "auto" uses the randomized SVD (C2)


@dataclass
class BALoraConfig(LoraConfig):
    """BA-LoRA: LoRA (PiSSA init by default) plus consistency / diversity / SVD regularisers.

    `form`: "auto" | "nlu" | "nlg" | "nlg-refined" (see the module docstring). `lambda_*`,
    `svd_k`, `temperature` (NLG consistency) and `top_k` (NLG diversity; 0 = the full
    distribution) default (None) to the form's values: C1's 1e-4 / 3e-4 / 1e-4, k = 3, T = 1,
    full entropy for "nlu", "nlg" and "auto"; C2's 0.025 / 0.005 / 0.005, k = 10, T = 2, top-20
    for "nlg-refined". `schedules` (None: on for "nlg-refined" only) switches the λ1 cosine decay
    and the λ2/λ3 delayed ramp. `svd_solver`: "exact", "randomized", or "auto" (randomized for
    "nlg-refined" when the vocabulary exceeds 4096, as C2); the randomized solver applies only to
    the ‖Z‖_F-normalised (refined) term, since C1's Σσ needs the whole spectrum. `alpha`
    defaults to r (C1's α = r).
    """

    targets: str | list[str] = "all-linear"    # q, k, v, o, gate, up, down on Llama; never the head
    alpha: float | None = None
    init: str = "pissa"
    form: str = "auto"
    lambda_consistency: float | None = None
    lambda_diversity: float | None = None
    lambda_svd: float | None = None
    svd_k: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    schedules: bool | None = None
    svd_solver: str = "auto"

    def __post_init__(self) -> None:
        if self.alpha is None and isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0:
            self.alpha = float(self.r)

    def validate(self) -> None:
        if self.alpha is None:
            raise ConfigError("BA-LoRA alpha is None and r is not a positive integer")
        super().validate()
        if self.form not in FORMS:
            raise ConfigError(f"BA-LoRA form {self.form!r} is unknown; choose one of {FORMS}")
        if self.svd_solver not in SVD_SOLVERS:
            raise ConfigError(f"BA-LoRA svd_solver {self.svd_solver!r} is unknown; choose one of {SVD_SOLVERS}")
        for name in ("lambda_consistency", "lambda_diversity", "lambda_svd"):
            if getattr(self, name) is not None:
                check_number(f"BA-LoRA {name}", getattr(self, name), low=0,
                             hint=" (or None for the form's default)")
        if self.svd_k is not None and (not isinstance(self.svd_k, int) or isinstance(self.svd_k, bool)
                                       or self.svd_k <= 0):
            raise ConfigError(f"BA-LoRA svd_k must be a positive integer, got {self.svd_k!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or isinstance(self.top_k, bool)
                                       or self.top_k < 0):
            raise ConfigError(f"BA-LoRA top_k must be an integer >= 0 (0: full entropy), got {self.top_k!r}")
        if self.temperature is not None:
            check_number("BA-LoRA temperature", self.temperature, low=0, low_open=True)
        if self.schedules not in (None, True, False):
            raise ConfigError(f"BA-LoRA schedules must be true, false or null, got {self.schedules!r}")

    # ---- resolved settings --------------------------------------------------------------------
    def resolved(self) -> dict[str, Any]:
        """The effective weights and hyper-parameters (defaults of the form filled in)."""
        refined = self.form == "nlg-refined"
        l1, l2, l3, k, t, top = DEFAULTS["nlg-refined" if refined else "c1"]
        pick = lambda value, default: default if value is None else value
        return {"lambda_consistency": float(pick(self.lambda_consistency, l1)),
                "lambda_diversity": float(pick(self.lambda_diversity, l2)),
                "lambda_svd": float(pick(self.lambda_svd, l3)),
                "svd_k": pick(self.svd_k, k), "temperature": float(pick(self.temperature, t)),
                "top_k": pick(self.top_k, top),
                "schedules": refined if self.schedules is None else self.schedules}


# ---- the regularisers on plain tensors (also the reference for the tests) -------------------------
def nlu_terms(z: torch.Tensor, ref: torch.Tensor | None, k: int) -> dict[str, torch.Tensor]:
    """C1's NLU regularisers on classification logits z (B×C) and reference logits ref."""
    z = _up(z)
    out: dict[str, torch.Tensor] = {}
    if ref is not None:
        out["consistency"] = F.mse_loss(F.normalize(z, dim=-1), F.normalize(_up(ref), dim=-1))
    b, c = z.shape
    if b < 2:
        out["diversity"] = z.sum() * 0.0
    else:
        centred = z - z.mean(dim=0)
        cov = centred.T @ centred / (b - 1)
        off = cov - torch.diag(torch.diag(cov))
        out["diversity"] = (off ** 2).sum() / c
    s = torch.linalg.svdvals(z)
    out["svd"] = -s[:k].sum() / (s.sum() + 1e-10)
    return out


class _Opts:
    __slots__ = ("frobenius", "randomized", "svd_k", "temperature", "top_k", "which")

    def __init__(self, which, temperature, top_k, svd_k, frobenius, randomized):
        self.which, self.temperature, self.top_k = which, temperature, top_k
        self.svd_k, self.frobenius, self.randomized = svd_k, frobenius, randomized


def _up(t: torch.Tensor) -> torch.Tensor:
    """t in fp32, or in its own dtype when wider (fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _gram_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _spectrum_grad(s: torch.Tensor, k: int, frobenius: bool, total_sq: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ω = −Σ_{i≤k} σ_i / norm (norm: Σσ, or ‖Z‖_F) and ∂Ω/∂σ for σ sorted descending.
    `total_sq` (‖Z‖_F²) is given when `s` holds only the top singular values (randomized)."""
    top = s[:k].sum()
    in_top = torch.zeros_like(s)
    in_top[:k] = 1
    if frobenius:
        fro = (s.square().sum() if total_sq is None else total_sq).sqrt()
        if fro <= 1e-8:
            return s.new_zeros(()), torch.zeros_like(s)
        value = -top / fro
        grad = -in_top / fro + top * s / fro ** 3      # ∂Ω/∂σ_j (σ_j's share of ‖Z‖_F²)
    else:
        norm = s.sum() + 1e-10
        value = -top / norm
        grad = -in_top / norm + top / norm ** 2
    return value, grad


class _NLGRegularisers(torch.autograd.Function):
    """[Ω_consistency, Ω_diversity, Ω_SVD] over the rows `rows` of the logits `flat` (M×V), by row
    (and column) chunks; the backward writes one M×V gradient. Unrequested entries are 0."""

    @staticmethod
    def forward(ctx, flat, ref, rows, opts):
        n, v = rows.numel(), flat.shape[1]
        values = torch.zeros(3, dtype=_up(flat[:0]).dtype, device=flat.device)
        ctx.opts, ctx.n = opts, n
        ctx.svd = None
        step = max(1, _CHUNK // max(v, 1))
        chunks = [rows[i:i + step] for i in range(0, n, step)]
        ctx.step = step
        if n == 0:
            ctx.save_for_backward(flat, ref, rows, None)
            return values
        t = opts.temperature
        topk_idx = []
        kl = entropy = 0.0
        for r in chunks:
            z = _up(flat[r])
            if opts.which[0]:
                lq = F.log_softmax(z / t, dim=-1)
                lp = F.log_softmax(_up(ref[r]) / t, dim=-1)
                kl += float((lp.exp() * (lp - lq)).sum())
                del lq, lp
            if opts.which[1]:
                zz = z
                if opts.top_k and opts.top_k < v:
                    zz, idx = z.topk(opts.top_k, dim=-1)
                    topk_idx.append(idx)
                lp = F.log_softmax(zz, dim=-1)
                entropy += float(-(lp.exp() * lp).sum())
        values[0] = t * t * kl / n
        values[1] = -entropy / n
        idx = torch.cat(topk_idx) if topk_idx else None
        if opts.which[2]:
            values[2] = _NLGRegularisers._svd_forward(ctx, flat, rows, opts, chunks)
        ctx.save_for_backward(flat, ref, rows, idx)
        return values

    @staticmethod
    def _svd_forward(ctx, flat, rows, opts, chunks):
        n, v = rows.numel(), flat.shape[1]
        if n < 2 or v < 2:
            return 0.0
        gd = _gram_dtype(flat.device)
        k = min(opts.svd_k, n, v)
        col_step = max(1, _CHUNK // n)
        cols = [(c, min(c + col_step, v)) for c in range(0, v, col_step)]
        if opts.randomized and opts.frobenius and k < min(n, v):   # Σσ needs every σ: exact
            q = min(k + 5, n, v)
            g = torch.Generator(device=flat.device).manual_seed(0)
            omega = torch.randn(v, q, generator=g, device=flat.device, dtype=_up(flat[:0]).dtype)
            times = lambda m: sum(_up(flat[rows, a:b]) @ m[a:b] for a, b in cols)      # Z m
            times_t = lambda m: torch.cat([_up(flat[rows, a:b]).T @ m for a, b in cols])   # Zᵀ m
            y = times(omega)
            for _ in range(2):
                y = torch.linalg.qr(y).Q
                y = torch.linalg.qr(times_t(y)).Q
                y = times(y)
            qm = torch.linalg.qr(y).Q                                  # N×q
            b = times_t(qm).T.contiguous()                             # q×V = Qᵀ Z
            lam, w = torch.linalg.eigh(b.to(gd) @ b.to(gd).T)
            lam, w = lam.flip(0).clamp_min(0), w.flip(1)
            s = lam.sqrt()[:k]
            total_sq = sum(flat[r].to(gd).square().sum() for r in chunks)
            fro = total_sq.sqrt()
            value, _ = _spectrum_grad(s, k, True, total_sq)
            if fro <= 1e-8:
                return 0.0
            # Ω = −Σ_{i≤k} σ_i / ‖Z‖_F: gradient −(1/‖Z‖_F) Σ_{i≤k} u_i v_iᵀ with u = Q W, v = Bᵀw/σ,
            # plus (Σ_{i≤k} σ_i / ‖Z‖_F³) Z from the norm.
            keep = s > 1e-7 * s[0].clamp_min(1e-30)
            scale = torch.where(keep, -1.0 / (fro * s.clamp_min(1e-30)), torch.zeros_like(s))
            left = (qm.to(gd) @ w[:, :k]) * scale                      # N×k
            right = w[:, :k].T @ b.to(gd)                               # k×V
            zcoef = s.sum() / fro ** 3
            ctx.svd = ("randomized", left, right, zcoef)
            return float(value)
        if n <= v:     # G = Z Zᵀ (N×N), eigenvectors = left singular vectors
            gram = sum(flat[rows, a:b].to(gd) @ flat[rows, a:b].to(gd).T for a, b in cols)
        else:          # G = Zᵀ Z (V×V), eigenvectors = right singular vectors
            gram = sum(flat[r].to(gd).T @ flat[r].to(gd) for r in chunks)
        lam, w = torch.linalg.eigh(gram)
        lam, w = lam.flip(0).clamp_min(0), w.flip(1)
        s = lam.sqrt()
        value, gs = _spectrum_grad(s, k, opts.frobenius)
        keep = s > 1e-7 * s[0].clamp_min(1e-30)
        scale = torch.where(keep, gs / s.clamp_min(1e-30), torch.zeros_like(s))
        m = (w * scale) @ w.T                  # ∂Ω/∂Z = M Z (n <= v) or Z M (n > v)
        ctx.svd = ("left" if n <= v else "right", m)
        return float(value)

    @staticmethod
    def backward(ctx, grad):
        flat, ref, rows, idx = ctx.saved_tensors
        opts, n = ctx.opts, ctx.n
        dflat = torch.zeros_like(flat)
        if n == 0:
            return dflat, None, None, None
        g = grad.double().tolist()
        t, step, v = opts.temperature, ctx.step, flat.shape[1]
        svd = ctx.svd if g[2] != 0 else None
        gd = _gram_dtype(flat.device)
        for i in range(0, n, step):
            r = rows[i:i + step]
            z = _up(flat[r])
            acc = torch.zeros_like(z)
            if opts.which[0] and g[0] != 0:      # T²/N · KL  ->  T/N · (softmax(z/T) − softmax(zP/T))
                acc += (g[0] * t / n) * (F.softmax(z / t, dim=-1) - F.softmax(_up(ref[r]) / t, dim=-1))
            if opts.which[1] and g[1] != 0:      # −H/N  ->  p (log p + H) / N
                zz = z if idx is None else z.gather(1, idx[i:i + step])
                lp = F.log_softmax(zz, dim=-1)
                p = lp.exp()
                d = (g[1] / n) * p * (lp + (-(p * lp).sum(-1, keepdim=True)))
                if idx is None:
                    acc += d
                else:
                    acc.scatter_add_(1, idx[i:i + step], d)
            if svd is not None and svd[0] == "right":
                acc += g[2] * (z.to(gd) @ svd[1]).to(z.dtype)
            elif svd is not None and svd[0] == "randomized":
                _, left, right, zcoef = svd
                acc += g[2] * (left[i:i + step] @ right + zcoef * z.to(gd)).to(z.dtype)
            dflat.index_add_(0, r, acc.to(dflat.dtype))
        if svd is not None and svd[0] == "left":
            col_step = max(1, _CHUNK // n)
            for a in range(0, v, col_step):
                b = min(a + col_step, v)
                part = g[2] * (svd[1] @ flat[rows, a:b].to(gd))
                dflat[:, a:b].index_add_(0, rows, part.to(dflat.dtype))
        return dflat, None, None, None


def nlg_terms(flat: torch.Tensor, ref: torch.Tensor | None, rows: torch.Tensor, *, which=(True, True, True),
              temperature: float = 1.0, top_k: int = 0, svd_k: int = 3, frobenius: bool = False,
              randomized: bool = False) -> torch.Tensor:
    """[consistency, diversity, svd] of the NLG forms on rows `rows` of the M×V logits `flat`."""
    opts = _Opts(tuple(which), float(temperature), int(top_k), int(svd_k), frobenius, randomized)
    return _NLGRegularisers.apply(flat, ref if which[0] else None, rows, opts)


# ---- plumbing: from the last training forward to the three terms ----------------------------------
def _logits_of(outputs: Any) -> torch.Tensor:
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, dict):
        logits = outputs.get("logits")
    if not isinstance(logits, torch.Tensor):
        raise PeftlabError("BA-LoRA's regularisers read the forward's `.logits`; call the model with "
                           "return_dict=True (the default) so the output carries logits")
    return logits


def token_rows(model: torch.nn.Module, inputs: dict, logits: torch.Tensor) -> torch.Tensor:
    """Flat (batch·position) indices of the logit rows the NLG terms use: positions whose next
    label is not −100 when `labels` are given (unshifted for encoder-decoders), else positions
    with attention_mask ≠ 0, else all."""
    b, length = logits.shape[0], logits.shape[1]
    keep = None
    labels = inputs.get("labels")
    if isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape[0] == b:
        if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            labels = F.pad(labels[:, 1:], (0, 1), value=-100)
        if labels.shape[1] >= length:
            keep = labels[:, labels.shape[1] - length:] != -100
    else:
        mask = inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == b and mask.shape[1] >= length:
            keep = mask[:, mask.shape[1] - length:] != 0
    if keep is None:
        return torch.arange(b * length, device=logits.device)
    return keep.reshape(-1).nonzero().squeeze(1).to(logits.device)


@contextmanager
def _eval_mode(module: torch.nn.Module):
    training = [m for m in module.modules() if m.training]
    module.eval()
    try:
        yield
    finally:
        for m in training:
            m.training = True


def reference_logits(am, inputs: dict) -> torch.Tensor:
    """The pre-trained model's logits for the same inputs: adapters disabled, eval mode, no grad,
    no labels (no second loss), no KV cache."""
    ref_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    params = inspect.signature(am.model.forward).parameters
    if "use_cache" in params and "use_cache" not in ref_inputs:
        ref_inputs["use_cache"] = False
    with torch.no_grad(), am.keeping_last_forward(), am.disabled(), _eval_mode(am.model):
        return _logits_of(am(**ref_inputs))


class _Regularisers:
    """Computes an adapter's three terms once per training forward and hands each term its value."""

    def __init__(self, adapter: str, config: BALoraConfig) -> None:
        self.adapter, self.config, self.settings = adapter, config, config.resolved()
        self.names = [f"balora.{adapter}.{t}" for t in TERMS]
        self._pending: list | None = None      # [outputs, {index: value}]

    def form_for(self, logits: torch.Tensor) -> str:
        if self.config.form == "auto":
            return "nlu" if logits.dim() == 2 else "nlg"
        if self.config.form == "nlu" and logits.dim() != 2:
            raise PeftlabError(f"BA-LoRA form 'nlu' needs classification logits (batch × classes), got "
                               f"shape {tuple(logits.shape)}; use form 'nlg' or 'auto'")
        return self.config.form

    def wanted(self, ctx: LossContext) -> set[int]:
        active = {t.name: t for t in ctx.model.active_loss_terms()}
        return {i for i, n in enumerate(self.names)
                if n in active and active[n].factor(ctx.step, ctx.total_steps) != 0.0}

    def term(self, index: int, ctx: LossContext) -> torch.Tensor:
        pending = self._pending
        if pending is None or pending[0] is not ctx.outputs or index not in pending[1]:
            wanted = self.wanted(ctx) | {index}
            pending = [ctx.outputs, self.compute(ctx.model, ctx.inputs, ctx.outputs, wanted)]
            self._pending = pending
        value = pending[1].pop(index)
        if not pending[1]:
            self._pending = None
        return value

    def compute(self, am, inputs: dict, outputs: Any, wanted: set[int]) -> dict[int, torch.Tensor]:
        if inputs is None or outputs is None:
            raise PeftlabError("BA-LoRA's regularisers need the last training forward's inputs and outputs")
        s = self.settings
        logits = _logits_of(outputs)
        form = self.form_for(logits)
        ref = reference_logits(am, inputs) if 0 in wanted else None
        if form == "nlu":
            terms = nlu_terms(logits, ref, s["svd_k"])
            return {i: terms[TERMS[i]] for i in wanted}
        v = logits.shape[-1]
        flat = logits.reshape(-1, v)
        rows = torch.arange(flat.shape[0], device=flat.device) if logits.dim() == 2 \
            else token_rows(am.model, inputs, logits)
        refined = form == "nlg-refined"
        solver = self.config.svd_solver
        randomized = solver == "randomized" or (solver == "auto" and refined and v > _RANDOMIZED_ABOVE)
        values = nlg_terms(flat, None if ref is None else ref.reshape(-1, v), rows,
                           which=tuple(i in wanted for i in range(3)), temperature=s["temperature"],
                           top_k=s["top_k"], svd_k=s["svd_k"], frobenius=refined, randomized=randomized)
        return {i: values[i] for i in wanted}


def _loss_terms(am, name: str, config: BALoraConfig, parts) -> list[LossTerm]:
    reg = _Regularisers(name, config)
    s = reg.settings
    weights = (s["lambda_consistency"], s["lambda_diversity"], s["lambda_svd"])
    if s["schedules"]:
        schedules = (cosine_decay(0.1), delayed_ramp(0.2, 0.05), delayed_ramp(0.2, 0.05))
    else:
        schedules = (None, None, None)
    return [LossTerm(reg.names[i], weights[i], (lambda ctx, i=i: reg.term(i, ctx)), adapter=name,
                     needs_outputs=True, schedule=schedules[i]) for i in range(3)]


def _describe(config: BALoraConfig) -> str:
    s = config.resolved()
    text = lora._describe(config)
    text += (f", form={config.form}, λ=({s['lambda_consistency']:g}, {s['lambda_diversity']:g}, "
             f"{s['lambda_svd']:g}), svd_k={s['svd_k']}")
    if config.form == "nlg-refined" or config.temperature is not None or config.top_k:
        text += f", T={s['temperature']:g}, top_k={s['top_k']}"
    if s["schedules"]:
        text += ", scheduled"
    return text


METHOD = Method(
    name="balora",
    title="BA-LoRA",
    config_cls=BALoraConfig,
    typology=dataclasses.replace(
        lora.METHOD.typology,
        site_roles=("attn.q", "attn.k", "attn.v", "attn.o", "ffn.gate", "ffn.up", "ffn.down"),
        workspace="every linear projection but the head (q, k, v, o, gate, up, down); "
                  "regularisers on the output logits against the adapters-disabled base",
        param_formula="r·(d_in + d_out) per site (+ frozen PiSSA start r·(d_in + d_out))",
    ),
    layer_kinds=lora.METHOD.layer_kinds,
    # LoRA's minus routed training: the regularisers read the whole batch's logits, and the rows
    # of a routed batch belong to other adapters; minus slices of fused projections: its PiSSA
    # start is the SVD of the whole weight
    capabilities=lora.METHOD.capabilities - {Capability.TRAIN_IN_MIXED_BATCH, Capability.FUSED_SLICE},
    build=lora._build,
    tensor_shapes=lora._tensor_shapes,
    describe=_describe,
    loss_terms=_loss_terms,
    # exported as the LoRA it is (its PiSSA start folded in); peft has no BA-LoRA, so a LORA
    # directory imports back as LoRA
    peft_type="LORA",
    to_peft=lora.to_peft,
    train_lr=5e-4,   # PiSSA's principal start: 2e-3 collapsed to chance on MiniLM, 5e-4 gave 0.786
)
