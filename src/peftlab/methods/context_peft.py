"""Context-PEFT (Hadji-Kyriacou & Arandjelović, 2023): per-token groups of adaptors chosen by context.

(Longer than 600 lines on purpose: one method, one file. The group config and its checks, the
masks every delta reads, the three fused forms and the hook that computes the masks, for forward
and for generate, are one mechanism; no part is used without the others.)

An adapter holds G named *groups*; each token belongs to some of them (its context masks
m_c ∈ {0, 1}). A wrapped layer holds all groups fused in one delta:

- form "lora" (default):  y = W x + Σ_c m_c · s_c · B_c A_c x, with s_c = mult_c · α/r
  (α/√r with rsLoRA). Stored fused: lora_A (G·r, d_in) = [A_1; ...; A_G] and lora_B
  (d_out, G·r) = [B_1 ... B_G]; u = x A_catᵀ, rank slice c of u is multiplied by m_c · s_c,
  then y += u B_catᵀ. A starts Kaiming-uniform (a=√5; "kaiming_normal" and "gaussian" N(0, 1/r²),
  as LoRA's gaussian, are options), B = 0.
- form "ia3":  a gate g = Π_c (1 + mult_c · m_c ⊙ l_c) with l_c (rows of ia3_l (G, d)) starting
  at zero, so the gate is the identity at first. It scales the layer output, or its input on
  the `feedforward` sites (the FFN down projection by default), as (IA)³ does.
- form "bias" (BitFit):  y = W x + b + Σ_c mult_c · m_c · b_c with b_c (rows of bias (G, d_out))
  starting at zero.

No layer loops over groups in Python: the masks arrive as one (B, T, G) tensor. The group axis
of every tensor follows the group names in sorted order (the config keeps `groups` sorted, so a
checkpoint, whose JSON has sorted keys, loads with the same order).

Groups (ContextConfig.groups: name -> spec). A spec names one or more criteria; a token is in
the group when it meets all of them:
- {"token_type": k}: token_type_ids == k (missing token_type_ids count as all zeros, as in BERT);
- {"token_ids": [i, ...]}: the token's id is one of these (e.g. an image placeholder id);
- {"span": [start_id, end_id]}: tokens between a start and an end token, the delimiters
  included by default; add "inclusive": False to leave them out. A span not yet closed runs to
  the end of the sequence (so a span opened in the prompt stays open while generating);
- {"all": True} (alone): every token;
- {"mask": True}: a boolean (B, T) mask given to forward as `context_masks={"name": mask}`.

The masks are computed once per forward by the adapter's `InputHook` (from input_ids,
token_type_ids and context_masks, which it removes from the model's arguments) and stored in one
`ContextMasks` holder that every delta of the adapter reads; the LoRA rank-expanded weights are
built from it once per forward and shared by all layers. `finish` clears the holder, so calling
the inner model directly (not through AdaptedModel) while the adapter is active is an error.
In training, `dropout` (one probability, or one per group) zeroes m_c[t] per token at random
(adaptor dropout; no rescaling, a dropped token sees the base layer there).

generate (decoder-only models): masks are recomputed before every forward of the generation
loop from the full sequence so far (prompt plus generated tokens, kept by the hook and cut to
the cache's length), so spans and token-id groups follow the generated tokens. Groups on
token_type or user masks cannot be extended to new tokens and are refused, as is beam search
with span groups (beams reorder the sequences the hook keeps).

Merging folds a single all-token group only: the config must hold exactly one group, and it must
be {"all": True}. Then the LoRA form merges s·B A, the IA3 form the scale 1 + mult·l, the bias
form mult·b, exactly as LoRA / (IA)³ / BitFit merge them. Any other routing is per token and
data-dependent, so merge raises CapabilityError.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import AdapterError, CapabilityError, ConfigError, PeftlabError
from ..core.layer import AdaptedLayer, Delta, InputHook
from ..core.method import Capability, Method, MethodConfig, check_number
from ..core.precision import adapter_dtype, cast_at_use, compute_dtype
from ..core.sites import Site
from ..core.typology import Typology
from .bitfit import BiasDelta, bias_slot
from .ia3 import IA3Config, IA3Delta, check_feedforward
from .lora import LowRankDelta

FORMS = ("lora", "ia3", "bias")
INITS = ("kaiming_uniform", "kaiming_normal", "gaussian")
CRITERIA = ("token_type", "token_ids", "span", "all", "mask")
DEFAULT_TARGETS = {"lora": ["attn.q", "attn.v"], "bias": ["attn.q", "attn.v"],
                   "ia3": ["attn.k", "attn.v", "ffn.down"]}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


@dataclass
class ContextConfig(MethodConfig):
    """Context-PEFT: per-token adaptor groups (see the module docstring for `groups`).

    `form`: "lora" | "ia3" | "bias". `targets` defaults to attn.q, attn.v (lora, bias) or
    (IA)³'s attn.k, attn.v, ffn.down (ia3). `multiplier`: group -> factor on that group's
    contribution (default 1). `dropout`: per-token adaptor dropout probability in training, one
    number or group -> number. `r`, `alpha`, `rslora`, `init` are the LoRA form's;
    `feedforward` (roles or module-path regexes whose input the gate scales) the IA3 form's.
    The default `groups` is one all-token group, which makes the adapter plain LoRA / IA3 / bias.
    """

    targets: str | list[str] | None = None
    groups: dict[str, dict[str, Any]] = field(default_factory=lambda: {"all": {"all": True}})
    form: str = "lora"
    r: int = 8
    alpha: float = 16.0
    rslora: bool = False
    multiplier: dict[str, float] = field(default_factory=dict)
    dropout: float | dict[str, float] = 0.0
    init: str = "kaiming_uniform"
    feedforward: list[str] = field(default_factory=lambda: ["ffn.down"])

    def __post_init__(self) -> None:
        if self.targets is None:
            self.targets = list(DEFAULT_TARGETS.get(self.form, DEFAULT_TARGETS["lora"]))
        if isinstance(self.groups, dict):
            # Sorted by name: the tensors' group axis follows this order, and checkpoints write
            # JSON with sorted keys. Tuples would come back from JSON as lists.
            self.groups = {name: {k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()}
                           if isinstance(spec, dict) else spec
                           for name, spec in sorted(self.groups.items(), key=lambda kv: str(kv[0]))}

    # ---- validation --------------------------------------------------------------------------
    def validate(self) -> None:
        super().validate()
        if self.form not in FORMS:
            raise ConfigError(f"ContextConfig.form {self.form!r} is unknown; choose one of {FORMS}")
        if not isinstance(self.groups, dict) or not self.groups:
            raise ConfigError("ContextConfig.groups must be a non-empty dict: group name -> spec such "
                              "as {'image': {'token_ids': [32000]}, 'text': {'all': True}}")
        for name, spec in self.groups.items():
            self._validate_group(name, spec)
        if not _is_int(self.r) or self.r <= 0:
            raise ConfigError(f"Context-PEFT rank r must be a positive integer, got {self.r!r}")
        check_number("Context-PEFT alpha", self.alpha, low=0, low_open=True)
        if self.init not in INITS:
            raise ConfigError(f"Context-PEFT init {self.init!r} is unknown; choose one of {INITS}")
        if not isinstance(self.multiplier, dict):
            raise ConfigError(f"ContextConfig.multiplier must be a dict group -> number, got "
                              f"{self.multiplier!r}")
        for name, value in self.multiplier.items():
            self._known_group(name, "multiplier")
            check_number(f"ContextConfig.multiplier[{name!r}]", value)
        drops = self.dropout if isinstance(self.dropout, dict) else {"": self.dropout}
        for name, p in drops.items():
            if name:
                self._known_group(name, "dropout")
            check_number(f"Context-PEFT dropout{f'[{name!r}]' if name else ''}", p, low=0, high=1,
                         high_open=True)
        check_feedforward(self.feedforward, "ContextConfig")

    def _known_group(self, name: str, what: str) -> None:
        if name not in self.groups:
            raise ConfigError(f"ContextConfig.{what} names group {name!r}, which is not in groups "
                              f"({list(self.groups)})")

    @staticmethod
    def _validate_group(name: Any, spec: Any) -> None:
        where = f"ContextConfig.groups[{name!r}]"
        if not isinstance(name, str) or not name:
            raise ConfigError(f"group names must be non-empty strings, got {name!r}")
        if not isinstance(spec, dict) or not (set(spec) & set(CRITERIA)):
            raise ConfigError(f"{where} must be a dict with one or more of {CRITERIA} (e.g. "
                              f"{{'token_ids': [32000]}}), got {spec!r}")
        unknown = sorted(set(spec) - set(CRITERIA) - {"inclusive"})
        if unknown:
            raise ConfigError(f"{where} has unknown key(s) {unknown}; known: {CRITERIA} (+ 'inclusive' "
                              "with 'span')")
        if "token_type" in spec and not _is_int(spec["token_type"]):
            raise ConfigError(f"{where}['token_type'] must be a non-negative int, got {spec['token_type']!r}")
        if "token_ids" in spec:
            ids = spec["token_ids"]
            if not isinstance(ids, list) or not ids or not all(_is_int(i) for i in ids):
                raise ConfigError(f"{where}['token_ids'] must be a non-empty list of token ids, got {ids!r}")
        if "span" in spec:
            span = spec["span"]
            if (not isinstance(span, list) or len(span) != 2 or not all(_is_int(i) for i in span)
                    or span[0] == span[1]):
                raise ConfigError(f"{where}['span'] must be [start_id, end_id], two different token "
                                  f"ids, got {span!r}")
        if "inclusive" in spec and ("span" not in spec or not isinstance(spec["inclusive"], bool)):
            raise ConfigError(f"{where}['inclusive'] must be True or False and goes with 'span'")
        for flag in ("all", "mask"):
            if flag in spec and spec[flag] is not True:
                raise ConfigError(f"{where}[{flag!r}] must be True, got {spec[flag]!r}")
        if "all" in spec and len(spec) > 1:
            raise ConfigError(f"{where}: 'all' covers every token and cannot be combined with {sorted(set(spec) - {'all'})}")

    # ---- derived values ------------------------------------------------------------------------
    def group_names(self) -> list[str]:
        return list(self.groups)

    def multipliers(self) -> list[float]:
        return [float(self.multiplier.get(n, 1.0)) for n in self.groups]

    def dropouts(self) -> list[float]:
        if isinstance(self.dropout, dict):
            return [float(self.dropout.get(n, 0.0)) for n in self.groups]
        return [float(self.dropout)] * len(self.groups)

    def group_scalings(self) -> list[float]:
        """s_c of the LoRA form: mult_c · α/r (α/√r with rsLoRA)."""
        base = self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r
        return [m * base for m in self.multipliers()]

    def merge_refusal(self) -> str | None:
        """Why this config cannot be merged, or None when it can (a single all-token group)."""
        if len(self.groups) == 1 and next(iter(self.groups.values())) == {"all": True}:
            return None
        return (f"Context-PEFT routes each token to its groups ({', '.join(self.groups)}) from the "
                "input, so no single weight holds the adapter; only a config with exactly one group, "
                "{'all': True}, can be merged. Keep the adapter unmerged")

    def scales_input(self, site: Site) -> bool:
        return self.form == "ia3" and IA3Config.scales_input(self, site)


# ---- the shared masks ------------------------------------------------------------------------------
class ContextMasks:
    """The (…, G) float masks of the current forward, shared by every delta of one adapter,
    and the per-form weights built from them once per forward (cached by dtype)."""

    __slots__ = ("_cache", "group_scale", "masks", "r", "rank_scale")

    def __init__(self, config: ContextConfig) -> None:
        self.masks: torch.Tensor | None = None
        self._cache: dict[tuple, torch.Tensor] = {}
        self.group_scale = torch.tensor(config.multipliers())                       # (G,)
        self.rank_scale = torch.tensor(config.group_scalings()).repeat_interleave(config.r)  # (G·r,)
        self.r = config.r

    def set(self, masks: torch.Tensor) -> None:
        self.masks, self._cache = masks, {}

    def clear(self) -> None:
        self.masks, self._cache = None, {}

    def _get(self, kind: str, lead: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        key = (kind, dtype, lead)
        w = self._cache.get(key)
        if w is None:
            m = self.masks
            if m is None:
                raise AdapterError("a Context-PEFT layer ran without context masks: call the model "
                                   "through the AdaptedModel (its forward or generate), which computes "
                                   "them from the inputs")
            if m.shape[:-1] != lead:
                if m.shape[:-1].numel() != lead.numel():
                    raise PeftlabError(
                        f"Context-PEFT masks cover {tuple(m.shape[:-1])} tokens but a layer got input "
                        f"of shape {tuple(lead)}: either the layer is not per-token (a sequence-level "
                        "layer such as BERT's pooler: exclude it from the targets) or another active "
                        "adapter (prompt/prefix tuning) changed the sequence after the masks were made")
                m = m.reshape(*lead, m.shape[-1])
            if kind == "rank":
                w = m.repeat_interleave(self.r, dim=-1) * self.rank_scale.to(m.device)
            else:
                w = m * self.group_scale.to(m.device)
            w = w.to(dtype)
            self._cache[key] = w
        return w

    def group_weights(self, lead: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """(…, G): mult_c · m_c."""
        return self._get("group", lead, dtype)

    def rank_weights(self, lead: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """(…, G·r): m_c · s_c repeated over group c's rank slice."""
        return self._get("rank", lead, dtype)


# ---- deltas ------------------------------------------------------------------------------------
class ContextDelta(Delta):
    """Base of the three fused forms: the shared `holder` (set by the adapter's hook) and the
    merge rule (one all-token group, folded by the single-group method's own delta)."""

    def __init__(self, refusal: str | None) -> None:
        super().__init__()
        # plain __dict__ writes: the holder is shared, not a submodule; nothing else to register
        self.__dict__.update(holder=None, merge_refusal=refusal)

    def single(self) -> Delta:
        """The one-group method's delta (LowRankDelta / IA3Delta / BiasDelta) equal to group 0
        of this one, for merging."""
        raise NotImplementedError

    def check_merge(self, layer: AdaptedLayer) -> None:
        if self.merge_refusal is not None:
            raise CapabilityError(self.merge_refusal)

    def merge_into(self, layer: AdaptedLayer) -> None:
        self.single().merge_into(layer)


class ContextLoraDelta(ContextDelta):
    """y += (x A_catᵀ ⊙ w) B_catᵀ, w (…, G·r) = m_c · s_c over group c's rank slice."""

    algebra = "add"

    def __init__(self, d_in: int, d_out: int, groups: int, r: int, scalings: list[float],
                 refusal: str | None, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(refusal)
        self.__dict__.update(r=r, groups=groups, scalings=list(scalings))
        empty = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)
        self._parameters["lora_A"] = nn.Parameter(empty(groups * r, d_in), requires_grad=False)
        self._parameters["lora_B"] = nn.Parameter(empty(d_out, groups * r), requires_grad=False)

    @torch.no_grad()
    def initialise(self, init: str) -> None:
        A = self.lora_A
        for c in range(self.groups):           # each group's A as LoRA would start it
            block = A[c * self.r:(c + 1) * self.r]
            if init == "gaussian":
                block.normal_(std=1.0 / self.r)
            elif init == "kaiming_normal":
                nn.init.kaiming_normal_(block)
            else:   # kaiming_uniform_(a=√5): U(±1/√d_in)
                nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        self.lora_B.zero_()

    def factors(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_c (r, d_in), B_c (d_out, r)) of group c (views)."""
        sl = slice(c * self.r, (c + 1) * self.r)
        return self.lora_A[sl], self.lora_B[:, sl]

    def contribute(self, layer, x, base_out, out):
        dtype = compute_dtype(self._parameters["lora_A"].dtype, out.dtype, out.device)
        A, B = cast_at_use(self, (self._parameters["lora_A"], self._parameters["lora_B"]), dtype)
        w = self.holder.rank_weights(x.shape[:-1], dtype)
        if x.dtype != dtype:
            x = x.to(dtype)
        y = F.linear(F.linear(x, A) * w, B)
        return out + (y if y.dtype == out.dtype else y.to(out.dtype))

    def single(self) -> LowRankDelta:
        A, B = self.factors(0)
        helper = LowRankDelta(A.shape[1], B.shape[0], self.r, self.scalings[0], dtype=A.dtype,
                              device=A.device)
        with torch.no_grad():
            helper.lora_A.copy_(A)
            helper.lora_B.copy_(B)
        return helper


class ContextIA3Delta(ContextDelta):
    """A gate Π_c (1 + mult_c · m_c ⊙ l_c) on the output, or on the input at feed-forward sites."""

    def __init__(self, groups: int, size: int, scale_input: bool, multiplier: float,
                 refusal: str | None, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(refusal)
        self.__dict__.update(scale_input=scale_input, multiplier=multiplier,
                             stage="input" if scale_input else "output",
                             algebra="input" if scale_input else "scale")
        self._parameters["ia3_l"] = nn.Parameter(torch.zeros(groups, size, dtype=dtype, device=device),
                                                 requires_grad=False)

    def gate(self, lead: torch.Size) -> torch.Tensor:
        l = self._parameters["ia3_l"]                                   # (G, d)
        m = self.holder.group_weights(lead, l.dtype)                    # (…, G)
        return (1 + m.unsqueeze(-1) * l).prod(dim=-2)                   # (…, d)

    def contribute(self, layer, x, base_out, out):
        g = self.gate(out.shape[:-1])
        return out * (g if g.dtype == out.dtype else g.to(out.dtype))

    def transform_input(self, layer, x):
        g = self.gate(x.shape[:-1])
        return x * (g if g.dtype == x.dtype else g.to(x.dtype))

    def single(self) -> IA3Delta:
        l = self.ia3_l
        helper = IA3Delta(l.shape[1], self.scale_input, dtype=l.dtype, device=l.device)
        with torch.no_grad():
            helper.ia3_l.copy_(1 + self.multiplier * l[0])
        return helper


class ContextBiasDelta(ContextDelta):
    """y += Σ_c mult_c · m_c · b_c."""

    algebra = "add"

    def __init__(self, groups: int, size: int, multiplier: float, refusal: str | None, *,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(refusal)
        self.__dict__["multiplier"] = multiplier
        self._parameters["bias"] = nn.Parameter(torch.zeros(groups, size, dtype=dtype, device=device),
                                                requires_grad=False)

    def contribute(self, layer, x, base_out, out):
        b = self._parameters["bias"]
        y = self.holder.group_weights(out.shape[:-1], b.dtype) @ b
        return out + (y if y.dtype == out.dtype else y.to(out.dtype))

    def check_merge(self, layer: AdaptedLayer) -> None:
        super().check_merge(layer)
        if not bias_slot(layer):
            raise CapabilityError(f"a Context-PEFT bias cannot be merged into "
                                  f"{type(layer.base_layer).__name__}: its forward has no bias term. "
                                  "Keep the adapter unmerged, or exclude the norms to merge")

    def single(self) -> BiasDelta:
        b = self.bias
        helper = BiasDelta(b.shape[1], dtype=b.dtype, device=b.device)
        with torch.no_grad():
            helper.bias.copy_(self.multiplier * b[0])
        return helper


# ---- the hook: masks from the inputs ----------------------------------------------------------------
def _span_mask(ids: torch.Tensor, start: int, end: int, inclusive: bool) -> torch.Tensor:
    """Tokens inside start ... end spans (delimiters included when `inclusive`); an open span
    runs to the end."""
    s, e = (ids == start).long(), (ids == end).long()
    s_upto, e_upto = s.cumsum(-1), e.cumsum(-1)
    if inclusive:     # starts up to t (this one included) minus ends strictly before t
        depth = s_upto - (e_upto - e)
    else:             # starts strictly before t minus ends up to t
        depth = (s_upto - s) - e_upto
    return depth > 0


class ContextHook(InputHook):
    """Computes the adapter's (B, T, G) masks before each forward and clears them after. Holds no
    tensors of its own (the deltas live in the layers); `holder` is shared with the deltas."""

    def __init__(self, model: nn.Module, config: ContextConfig, parts: dict[str, nn.Module]) -> None:
        super().__init__({})
        holder = ContextMasks(config)
        for delta in parts.values():
            delta.__dict__["holder"] = holder
        forward = getattr(model, "forward", None)
        try:
            takes_tt = "token_type_ids" in inspect.signature(forward).parameters
        except (TypeError, ValueError):
            takes_tt = True
        self.__dict__.update(holder=holder, config=config, takes_token_types=takes_tt,
                             drop=torch.tensor(config.dropouts()),
                             mask_groups=[n for n, s in config.groups.items() if "mask" in s])

    # ---- masks ---------------------------------------------------------------------------------
    def masks_for(self, kwargs: dict[str, Any], user: Any = None, *, training: bool = False) -> torch.Tensor:
        """(B, T, G) float32 masks for these forward arguments (`user`: the context_masks)."""
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            raise PeftlabError("a Context-PEFT adapter needs input_ids (or inputs_embeds) to find "
                               "each token's groups")
        batch, length = ref.shape[0], ref.shape[1]
        device = ref.device
        user = self._check_user(user, (batch, length))
        cols = []
        for name, spec in self.config.groups.items():
            m = None
            for crit, value in spec.items():
                if crit == "inclusive":
                    continue
                c = self._criterion(name, crit, value, spec, kwargs, ids, user, (batch, length), device)
                m = c if m is None else m & c
            cols.append(m)
        masks = torch.stack(cols, dim=-1).to(torch.float32)
        if training and bool((self.drop > 0).any()):
            keep = torch.rand(masks.shape, device=device) >= self.drop.to(device)
            masks = masks * keep
        return masks

    def _criterion(self, name, crit, value, spec, kwargs, ids, user, shape, device) -> torch.Tensor:
        if crit == "all":
            return torch.ones(shape, dtype=torch.bool, device=device)
        if crit == "mask":
            return user[name]
        if crit == "token_type":
            tt = kwargs.get("token_type_ids")
            if tt is None:          # as BERT: no token_type_ids means every token is type 0
                return torch.full(shape, value == 0, dtype=torch.bool, device=device)
            if tuple(tt.shape) != shape:
                raise PeftlabError(f"token_type_ids are {tuple(tt.shape)} but the input is {shape}")
            return tt.to(device) == value
        if ids is None:
            raise PeftlabError(f"Context-PEFT group {name!r} ({crit}) reads token ids: pass input_ids, "
                               "not inputs_embeds")
        if crit == "token_ids":
            return torch.isin(ids, torch.tensor(value, device=ids.device))
        start, end = value
        return _span_mask(ids, start, end, spec.get("inclusive", True))

    def _check_user(self, user: Any, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        if not self.mask_groups:
            if user is not None:
                raise PeftlabError("context_masks was given but no group of this Context-PEFT adapter "
                                   "is a {'mask': True} group")
            return {}
        if not isinstance(user, dict):
            raise PeftlabError(f"Context-PEFT group(s) {self.mask_groups} read user masks: pass "
                               "context_masks={name: bool tensor (batch, length)} to forward")
        missing = [n for n in self.mask_groups if n not in user]
        extra = [n for n in user if n not in self.mask_groups]
        if missing or extra:
            raise PeftlabError(f"context_masks must hold exactly the mask groups {self.mask_groups}; "
                               f"missing {missing}, unexpected {extra}")
        out = {}
        for name in self.mask_groups:
            m = torch.as_tensor(user[name])
            if tuple(m.shape) != shape:
                raise PeftlabError(f"context_masks[{name!r}] is {tuple(m.shape)} but the input is {shape}")
            out[name] = m.bool()
        return out

    # ---- InputHook ------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        user = kwargs.pop("context_masks", None)
        masks = self.masks_for(kwargs, user, training=model.training)
        if not self.takes_token_types:      # read for the masks; the model has no use for them
            kwargs.pop("token_type_ids", None)
        self.holder.set(masks)
        return kwargs

    def finish(self, output: Any, kwargs: dict[str, Any]) -> Any:
        self.holder.clear()
        return output

    def generate(self, model: nn.Module, kwargs: dict[str, Any]) -> Any:
        groups = self.config.groups
        fixed = [n for n, s in groups.items() if "mask" in s or "token_type" in s]
        if fixed:
            raise CapabilityError(f"Context-PEFT generate cannot extend the groups {fixed} (user masks "
                                  "or token types) to generated tokens; use token_ids, span or all groups")
        if kwargs.get("context_masks") is not None:
            raise CapabilityError("generate takes no context_masks (no mask groups can be extended)")
        if kwargs.get("input_ids") is None:
            raise PeftlabError("generate with a Context-PEFT adapter needs input_ids")
        gen_config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        beams = kwargs.get("num_beams", getattr(gen_config, "num_beams", 1)) or 1
        if beams > 1 and any("span" in s for s in groups.values()):
            raise CapabilityError("Context-PEFT span groups need the history of each sequence, which "
                                  "beam search reorders; use greedy or sampling")
        seen: dict[str, torch.Tensor | None] = {"ids": None}

        def before_forward(module, args, kw):
            step = kw.get("input_ids", args[0] if args else None)
            if step is None:
                raise CapabilityError("Context-PEFT generate needs token ids at every step")
            cache = kw.get("cache", kw.get("past_key_values"))
            past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
            prev = seen["ids"]
            if past and prev is not None and prev.shape[0] == step.shape[0] and prev.shape[1] >= past:
                full = torch.cat([prev[:, :past], step], dim=1)
            else:
                full = step
            seen["ids"] = full
            masks = self.masks_for({"input_ids": full})
            self.holder.set(masks[:, full.shape[1] - step.shape[1]:])

        handle = model.register_forward_pre_hook(before_forward, with_kwargs=True)
        try:
            return model.generate(**kwargs)
        finally:
            handle.remove()
            self.holder.clear()


def _build_hook(model: nn.Module, config: ContextConfig, parts: dict[str, nn.Module]) -> ContextHook:
    return ContextHook(model, config, parts)


# ---- building -----------------------------------------------------------------------------------
def _size(layer: AdaptedLayer, config: ContextConfig, site: Site) -> int:
    return layer.in_features if config.scales_input(site) else layer.out_features


def _build(site: Site, layer: AdaptedLayer, config: ContextConfig, initialise: bool = True) -> ContextDelta:
    if config.form != "bias" and layer.kind not in ("linear", "conv1d"):
        raise ConfigError(f"Context-PEFT form {config.form!r} attaches to Linear and Conv1D layers, not "
                          f"the {site.type_name} at {site.path!r}; narrow the targets or use form='bias'")
    weight = layer.base_layer.weight
    groups, refusal = len(config.groups), config.merge_refusal()
    mult = config.multipliers()[0]
    bias = getattr(layer.base_layer, "bias", None)
    base = bias.dtype if config.form == "bias" and isinstance(bias, torch.Tensor) else weight.dtype
    dtype, device = adapter_dtype(config, base), weight.device
    if config.form == "lora":
        delta = ContextLoraDelta(layer.in_features, layer.out_features, groups, config.r,
                                 config.group_scalings(), refusal, dtype=dtype, device=device)
        if initialise:
            delta.initialise(config.init)
        return delta
    if config.form == "ia3":
        return ContextIA3Delta(groups, _size(layer, config, site), config.scales_input(site), mult, refusal,
                               dtype=dtype, device=device)
    return ContextBiasDelta(groups, layer.out_features, mult, refusal, dtype=dtype, device=device)


def _tensor_shapes(layer: AdaptedLayer, site: Site, config: ContextConfig) -> dict[str, tuple[int, ...]]:
    g = len(config.groups)
    if config.form == "lora":
        return {"lora_A": (g * config.r, layer.in_features), "lora_B": (layer.out_features, g * config.r)}
    if config.form == "ia3":
        return {"ia3_l": (g, _size(layer, config, site))}
    return {"bias": (g, layer.out_features)}


def _describe(config: ContextConfig) -> str:
    def how(spec: dict[str, Any]) -> str:
        return "+".join(k for k in spec if k != "inclusive")
    parts = [f"form={config.form}",
             "groups " + ", ".join(f"{n}({how(s)})" for n, s in config.groups.items())]
    if config.form == "lora":
        parts += [f"r={config.r}", f"alpha={config.alpha:g}"] + (["rsLoRA"] if config.rslora else [])
    if config.multiplier:
        parts.append("per-group multipliers")
    if any(config.dropouts()):
        parts.append("adaptor dropout")
    return ", ".join(parts)


METHOD = Method(
    name="context",
    title="Context-PEFT",
    config_cls=ContextConfig,
    typology=Typology(
        site_roles=("attn.q", "attn.v"),
        form="lowrank",
        integration="weight-delta",
        intra_connectivity="dynamic (each token routed to its context groups' adaptors)",
        inter_connectivity="dynamic (each token's context group decides which adaptors act on it)",
        adaptation="reparameterisation per token group (form lora); rescaling (form ia3); "
                   "bias addition (form bias)",
        parameter_sharing="the base model is shared by every context; none between groups",
        input_type="input of the adapted projection, plus per-token context masks from the input "
                   "ids, token types or user masks",
        insertion="parallel (lora, bias); in-place (ia3)",
        insertions_per_layer="1 fused delta per targeted projection, holding all G groups",
        workspace="the targeted projections (attention Q, V by default; (IA)³'s K, V, FFN for ia3)",
        param_formula="G·r·(d_in + d_out) per site (lora); G·d (ia3); G·d_out (bias)",
    ),
    layer_kinds=("linear", "conv1d", "norm"),
    capabilities=frozenset({Capability.MERGE, Capability.QUANTISED_BASE}),
    merge_condition="only a single all-token group ({'all': True}); bias form: not into an RMSNorm",
    build=_build,
    tensor_shapes=_tensor_shapes,
    describe=_describe,
    build_hook=_build_hook,
)
