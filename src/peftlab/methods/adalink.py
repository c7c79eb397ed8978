"""AdaLink (Wang et al., 2023; arXiv 2310.12100): a low-rank residual module on the input embeddings.

The transformer stays untouched; only the embedded sequence changes, token-wise:

    AdaLink_g(e) = e + φ(e D_g) U_g,    D_g ∈ R^{d×r}, U_g ∈ R^{r×d}

with one module per token group g (a modality or a task's token set); tokens in no group use the
"default" module. U starts at zero, so a new adapter is a no-op. With G groups D is stored as
(G, d, r) and U as (G, r, d); the forward runs all G modules as one (d × G·r) product, masks each
token's rank slices to its group's and applies (G·r × d): no Python loop over groups.

With φ = identity and a single group the module is linear in e and folds into the embedding
table: E ← E + E D U (unmerging restores the copied table, core/merging.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import CapabilityError, ConfigError
from ..core.layer import AdaptedLayer, Delta
from ..core.method import Capability, Method, MethodConfig
from ..core.precision import adapter_dtype, cast_at_use, compute_dtype
from ..core.sites import Site
from ..core.typology import Typology

ACTIVATIONS = {"identity": None, "relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}
INITS = ("zero", "random")
DEFAULT_GROUP = "default"


@dataclass
class AdaLinkConfig(MethodConfig):
    """AdaLink on the input embedding.

    `r`: rank of each module. `activation` φ: identity (default), relu, gelu or tanh.
    `groups`: group name -> token ids routed to that group's own module; tokens in no group use
    the "default" module ({} = one module for every token). Groups are laid out in sorted name
    order after the default one. `init`: "zero" (U = 0: a no-op at start) or "random" (U random
    too: a non-zero adapter, for tests).
    """

    targets: str | list[str] = field(default_factory=lambda: ["embed"])
    r: int = 4
    activation: str = "identity"
    groups: dict[str, list[int]] = field(default_factory=dict)
    init: str = "zero"

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"AdaLink rank r must be a positive integer, got {self.r!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"AdaLink activation {self.activation!r} is unknown; choose one of "
                              f"{tuple(ACTIVATIONS)}")
        if self.init not in INITS:
            raise ConfigError(f"AdaLink init {self.init!r} is unknown; choose one of {INITS}")
        if not isinstance(self.groups, dict):
            raise ConfigError(f"AdaLink groups must be a dict of group name -> token ids, got "
                              f"{type(self.groups).__name__}")
        owner: dict[int, str] = {}
        for name, ids in self.groups.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"AdaLink group names must be non-empty strings, got {name!r}")
            if name == DEFAULT_GROUP:
                raise ConfigError(f"AdaLink group name {DEFAULT_GROUP!r} is reserved for tokens in no "
                                  "group; pick another name")
            if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__") or not list(ids):
                raise ConfigError(f"AdaLink group {name!r} must list at least one token id, got {ids!r}")
            for t in ids:
                if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                    raise ConfigError(f"AdaLink group {name!r} holds {t!r}; token ids are integers >= 0")
                if t in owner and owner[t] != name:
                    raise ConfigError(f"token id {t} is in AdaLink groups {owner[t]!r} and {name!r}; "
                                      "a token belongs to one group")
                owner[t] = name

    def group_names(self) -> list[str]:
        """Module order: the default module, then the groups by name."""
        return [DEFAULT_GROUP, *sorted(self.groups)]


class AdaLinkDelta(Delta):
    """e + φ(e D_g) U_g per token, g the token's group (from a vocab -> group lookup table)."""

    stage = "output"
    algebra = "none"     # a matrix on the output side: commutes neither with additions nor scalings

    def __init__(self, vocab: int, d: int, r: int, activation: str, groups: list[list[int]], *,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        G = 1 + len(groups)
        self.__dict__.update(r=r, groups=G, activation=activation, act=ACTIVATIONS[activation])
        self.D = nn.Parameter(torch.empty(G, d, r, dtype=dtype, device=device), requires_grad=False)
        self.U = nn.Parameter(torch.empty(G, r, d, dtype=dtype, device=device), requires_grad=False)
        if G > 1:
            table = torch.zeros(vocab, dtype=torch.long, device=device)
            for g, ids in enumerate(groups, start=1):
                table[torch.as_tensor(ids, dtype=torch.long, device=device)] = g
            self.register_buffer("group_of_token", table, persistent=False)
            # The group of each of the G·r rank slots of the concatenated modules.
            self.register_buffer("group_of_slot", torch.arange(G, device=device).repeat_interleave(r),
                                 persistent=False)

    def initialise(self, init: str) -> None:
        d = self.D.shape[1]
        with torch.no_grad():
            self.D.uniform_(-1 / math.sqrt(d), 1 / math.sqrt(d))
            if init == "random":
                self.U.uniform_(-1 / math.sqrt(self.r), 1 / math.sqrt(self.r))
            else:
                self.U.zero_()

    def contribute(self, layer, x, base_out, out):
        dtype = compute_dtype(self.D.dtype, out.dtype, out.device)
        D, U = cast_at_use(self, (self.D, self.U), dtype)     # cached between updates
        e = out if out.dtype == dtype else out.to(dtype)
        if self.groups == 1:
            h = e @ D[0]
            if self.act is not None:
                h = self.act(h)
            z = h @ U[0]
        else:
            G, d, r = D.shape
            h = e @ D.permute(1, 0, 2).reshape(d, G * r)          # every module at once
            if self.act is not None:
                h = self.act(h)
            mask = self.group_of_token[x].unsqueeze(-1) == self.group_of_slot   # (..., G·r)
            z = (h * mask.to(h.dtype)) @ U.reshape(G * r, d)
        return out + (z if z.dtype == out.dtype else z.to(out.dtype))

    def check_merge(self, layer: AdaptedLayer) -> None:
        # the record's merge condition: linear in e (identity φ) and one module for every token
        if self.act is not None or self.groups > 1:
            why = (f"activation {self.activation!r} is not the identity" if self.activation != "identity"
                   else f"it has {self.groups} token-group modules")
            raise CapabilityError(f"this AdaLink adapter cannot be merged: {why}. Only a single-group "
                                  "AdaLink with activation='identity' folds into the embedding table")

    @torch.no_grad()
    def merge_into(self, layer: AdaptedLayer) -> None:
        w = layer.base_layer.weight                     # (vocab, d): rows are the embeddings
        D, U = self.D[0].float(), self.U[0].float()
        wf = w.float()
        w.copy_((wf + (wf @ D) @ U).to(w.dtype))

def _token_groups(config: AdaLinkConfig, vocab: int, site: Site) -> list[list[int]]:
    groups = [list(config.groups[name]) for name in config.group_names()[1:]]
    for name, ids in zip(config.group_names()[1:], groups, strict=True):
        bad = [t for t in ids if t >= vocab]
        if bad:
            raise ConfigError(f"AdaLink group {name!r} holds token id {bad[0]}, outside the vocabulary "
                              f"of {site.path!r} ({vocab} tokens)")
    return groups


def _build(site: Site, layer: AdaptedLayer, config: AdaLinkConfig, initialise: bool = True) -> AdaLinkDelta:
    weight = layer.base_layer.weight
    vocab, d = weight.shape
    delta = AdaLinkDelta(vocab, d, config.r, config.activation, _token_groups(config, vocab, site),
                         dtype=adapter_dtype(config, weight.dtype), device=weight.device)
    if initialise:
        delta.initialise(config.init)
    return delta


def _tensor_shapes(layer: AdaptedLayer, site: Site, config: AdaLinkConfig) -> dict[str, tuple[int, ...]]:
    G, d, r = 1 + len(config.groups), layer.out_features, config.r
    return {"D": (G, d, r), "U": (G, r, d)}


def _describe(config: AdaLinkConfig) -> str:
    parts = [f"r={config.r}"]
    if config.activation != "identity":
        parts.append(config.activation)
    if config.groups:
        parts.append(f"groups={','.join(config.group_names())}")
    if config.init != "zero":
        parts.append(f"init={config.init}")
    return ", ".join(parts)


METHOD = Method(
    name="adalink",
    title="AdaLink",
    config_cls=AdaLinkConfig,
    typology=Typology(
        site_roles=("embed",),
        form="lowrank",
        integration="serial",
        intra_connectivity="dense (low-rank D·U, optional nonlinearity between)",
        inter_connectivity="fixed (a residual added to every embedded token); dynamic with token "
                           "groups (a token's group picks its module)",
        adaptation="addition",
        parameter_sharing="none (one module per token group)",
        input_type="token embeddings",
        insertion="sequential (after the embedding, before the first block)",
        insertions_per_layer="1, at the input only",
        workspace="embedding",
        param_formula="2·r·d per token group (+ the default group)",
    ),
    layer_kinds=("embedding",),
    capabilities=frozenset({Capability.MERGE, Capability.QUANTISED_BASE}),
    merge_condition="only with activation='identity' and no token groups",
    build=_build,
    tensor_shapes=_tensor_shapes,
    describe=_describe,
)
