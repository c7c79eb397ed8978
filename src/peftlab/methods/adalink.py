"""AdaLink (Wang et al., 2023; arXiv 2310.12100): a low-rank residual module on the input embeddings.

The transformer stays untouched; only the sequence entering its first block changes, token-wise:

    AdaLink_g(e) = e + φ(e D_g) U_g,    D_g ∈ R^{d×r}, U_g ∈ R^{r×d}

with one module per token group g (a modality or a task's token set); tokens in no group use the
"default" module. U starts at zero, so a new adapter is a no-op. With G groups D is stored as
(G, d, r) and U as (G, r, d); the forward runs all G modules as one (d × G·r) product, masks each
token's rank slices to its group's and applies (G·r × d): no Python loop over groups.

That sequence (`placement="embed.out"`, the default) is what block 0 receives: on BERT the output
of the `embeddings` module (token + position + type embeddings, LayerNorm), on GPT-2 wte + wpe
after its dropout, on Llama the token embeddings themselves (core/role_maps.py). The delta lives
on the token embedding, which holds its tensors and sees the token ids that pick each token's
group; where another module produces block 0's input, a forward hook on that module adds the
residual to its output. `placement="embed"` acts on the token embedding's output instead (before
position embeddings and the embedding norm; the placement of adapters saved before embed.out).

With φ = identity and a single group the module is linear in e and, where e is the token
embedding's output, folds into the embedding table: E ← E + E D U (unmerging restores the copied
table, core/merging.py). After position embeddings and a LayerNorm nothing linear holds e alone:
no merge there.
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
from ..core.geometry import unwrap
from ..core.sites import Site, shared_position_paths
from ..core.typology import Typology

ACTIVATIONS = {"identity": None, "relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}
INITS = ("zero", "random")
PLACEMENTS = ("embed.out", "embed")
DEFAULT_GROUP = "default"


@dataclass
class AdaLinkConfig(MethodConfig):
    """AdaLink on the input embedding.

    `r`: rank of each module. `activation` φ: identity (default), relu, gelu or tanh.
    `groups`: group name -> token ids routed to that group's own module; tokens in no group use
    the "default" module ({} = one module for every token). Groups are laid out in sorted name
    order after the default one. `init`: "zero" (U = 0: a no-op at start) or "random" (U random
    too: a non-zero adapter, for tests). `placement`: "embed.out" (the sequence entering the
    first transformer block, as the paper defines AdaLink) or "embed" (the token embedding's
    output). `targets` names the token embedding, which holds the adapter either way.
    """

    targets: str | list[str] = field(default_factory=lambda: ["embed"])
    r: int = 4
    activation: str = "identity"
    groups: dict[str, list[int]] = field(default_factory=dict)
    init: str = "zero"
    placement: str = "embed.out"

    @classmethod
    def from_dict(cls, data):
        # adapters saved before `placement` existed were trained on the token embedding's output
        return super().from_dict(data if "placement" in data or not hasattr(data, "keys")
                                 else {**data, "placement": "embed"})

    def validate(self) -> None:
        super().validate()
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"AdaLink placement {self.placement!r} is unknown; choose one of {PLACEMENTS} "
                              "('embed.out': the input of the first transformer block)")
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

    # ---- placement on block 0's input, produced by another module: a forward hook there ---------
    def attach_block_input(self, layer: AdaptedLayer, module: nn.Module, path: str) -> None:
        """Add the residual to the output of `module` (the base module producing block 0's input)
        in each forward where this delta ran on the token embedding `layer` (so inactive, disabled
        or merged adapters add nothing), with the token ids it saw there. Every call of the
        embedding first forgets the ids of an earlier one, which its own block input never used
        (the embedding called alone): they must not reach a later forward."""
        # Bound methods, not closures: deepcopy of the model rebinds them to the copied delta.
        self.__dict__.update(_handle=module.register_forward_hook(self._add_at_block_input),
                             _forget=layer.base_layer.register_forward_pre_hook(self._forget_ids),
                             block_input_path=path, _ids=None, _layer=layer)

    def _forget_ids(self, module: nn.Module, args: tuple) -> None:
        self.__dict__["_ids"] = None

    @property
    def hooked(self) -> bool:
        return self.__dict__.get("_handle") is not None

    def _add_at_block_input(self, module: nn.Module, args: tuple, output):
        ids = self.__dict__.get("_ids")
        if ids is None:          # the delta did not run in this forward
            return None
        self.__dict__["_ids"] = None        # keep no ids for a later forward
        if not isinstance(output, torch.Tensor) or output.shape[:-1] != ids.shape:
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ConfigError(f"AdaLink at the block-0 input: {self.block_input_path!r} returned {got}, "
                              f"not one vector per embedded token {tuple(ids.shape)}; use placement='embed'")
        out = self._residual(output, ids)
        w = self._layer.__dict__["_weighted"].get(self, 1.0)     # set_active(..., weights=)
        return out if w == 1.0 else torch.lerp(output, out, w)

    def release(self) -> None:
        for key in ("_handle", "_forget"):
            handle = self.__dict__.get(key)
            if handle is not None:
                handle.remove()
        self.__dict__.update(_handle=None, _forget=None, _ids=None, _layer=None)

    def contribute(self, layer, x, base_out, out):
        if self.hooked:          # acts further on, where block 0's input is made
            self.__dict__["_ids"] = x
            return out
        return self._residual(out, x)

    def _residual(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + φ(out D_g) U_g per token, g from the token ids x."""
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
        if self.hooked:
            raise CapabilityError(
                f"this AdaLink adapter acts on the input of the first block, the output of "
                f"{self.block_input_path!r} (after position embeddings / the embedding norm), which "
                "does not fold into the embedding table; keep it unmerged, or train it with "
                "placement='embed' (the token embedding's output), which merges")
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


def _block_input(site: Site, model) -> tuple[str, nn.Module] | None:
    """(path, base module) whose output block 0 receives, or None where that is the token
    embedding at `site` itself (Llama). ConfigError where the family map does not locate it."""
    if model is None:
        raise ConfigError("AdaLink with placement='embed.out' needs the model to find the input of "
                          "the first block; build it through AdaptedModel.add_adapter")
    paths = shared_position_paths(model.model, "embed.out")
    if not paths:
        family = getattr(getattr(model.model, "config", None), "model_type", None) or type(model.model).__name__
        raise ConfigError(f"AdaLink acts on the sequence entering the first transformer block (role "
                          f"embed.out), which peftlab does not locate in this model ({family}: its "
                          "role map lists no module producing it); pass placement='embed' to act on "
                          "the token embedding's output instead")
    path = paths[-1]      # the last feeds the block (ELECTRA: embeddings_project after embeddings)
    module = unwrap(model.model.get_submodule(path))
    return None if module is site.module or path == site.path else (path, module)


def _build(site: Site, layer: AdaptedLayer, config: AdaLinkConfig, initialise: bool = True,
           model=None) -> AdaLinkDelta:
    weight = layer.base_layer.weight
    vocab, d = weight.shape
    hook = _block_input(site, model) if config.placement == "embed.out" else None
    delta = AdaLinkDelta(vocab, d, config.r, config.activation, _token_groups(config, vocab, site),
                         dtype=adapter_dtype(config, weight.dtype), device=weight.device)
    if initialise:
        delta.initialise(config.init)
    if hook is not None:    # last: nothing below can fail, so no hook is left behind by this build
        delta.attach_block_input(layer, hook[1], hook[0])
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
    parts.append("at the block-0 input" if config.placement == "embed.out" else "at the token embedding")
    return ", ".join(parts)


METHOD = Method(
    name="adalink",
    title="AdaLink",
    config_cls=AdaLinkConfig,
    typology=Typology(
        site_roles=("embed", "embed.out"),
        form="lowrank",
        integration="serial",
        intra_connectivity="dense (low-rank D·U, optional nonlinearity between)",
        inter_connectivity="fixed (a residual added to every token entering block 0); dynamic with token "
                           "groups (a token's group picks its module)",
        adaptation="addition",
        parameter_sharing="none (one module per token group)",
        input_type="the sequence entering the first block (token + position embeddings, normalised)",
        insertion="sequential (on the input of the first block; the tensors live on the token embedding)",
        insertions_per_layer="1, at the input only",
        workspace="embedding",
        param_formula="2·r·d per token group (+ the default group)",
    ),
    layer_kinds=("embedding",),
    capabilities=frozenset({Capability.MERGE, Capability.QUANTISED_BASE}),
    merge_condition="only with activation='identity', no token groups and the token embedding "
                    "feeding block 0 directly (Llama) or placement='embed'",
    build=_build,
    tensor_shapes=_tensor_shapes,
    describe=_describe,
)
