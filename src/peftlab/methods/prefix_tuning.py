"""Prefix tuning (Li & Liang, 2021): n trained key/value vectors prepended in every attention layer.

Each attention site ("attn.kv") holds `key` and `value`, both (n, kv_heads·head_dim) — with
grouped-query attention kv_heads is `config.num_key_value_heads`, as peft provisions it. On every
forward the hook builds the model's cache object (a transformers `DynamicCache`, as peft 0.21
does with transformers ≥ 4.56) already holding the n prefix positions of every layer, passes it
as the model's cache argument, puts n ones in front of `attention_mask`, and adds n to explicit
`position_ids` (peft's rule; without them the model numbers the real tokens from n, after the
cached prefix, which is the same). Outputs need no trimming: the prefix is not in the sequence.

Reparameterisation (`projection_hidden=h`, peft's `prefix_projection`): instead of the per-layer
tensors, the first site's part holds `projection`: an embedding (n, kv_dim) → Linear(kv_dim, h)
→ tanh → Linear(h, L·2·kv_dim), whose output is the per-layer prefixes in peft's flat layout.
It stabilises training only. `save_adapter` of such an adapter keeps the MLP (training can
resume from it); `export_peft` writes the projected prefixes (what peft itself saves: peft never
saves the MLP); `PrefixHook.fold_projection()` replaces the MLP by its output in place, after
which the adapter is the plain per-layer form (config.projection_hidden becomes None) and saves
only what inference needs.

peft's flat layout (`prompt_embeddings`, (n, L·2·kv_dim)): viewed as (n, L·2, kv_heads,
head_dim), entry 2l is layer l's key and 2l+1 its value.

Gradient checkpointing: transformers' checkpointed layers replace any cache by None unless the
layer says it only reads it (`_can_checkpoint_with_cache`), since a replayed layer would store its
keys a second time. In a checkpointed training forward the hook therefore passes a cache that
returns prefix + the layer's keys and values without storing anything, and sets that switch on
the model's layers for that forward only (`release`). Where transformers lacks the switch, the
combination is refused.

Supported: decoder-only models whose attention reads a transformers Cache (Llama family, GPT-2).
Encoder models (BERT) are refused with a CapabilityError: transformers 5 BERT encoders run no
cache through self-attention unless configured as decoders, and peft 0.21.2 itself fails there
("Model does not support past key values").
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import CapabilityError, ConfigError
from ..core.geometry import attention_heads, text_config
from ..core.hf import cache_keeping_layers
from ..core.layer import InputHook
from ..core.method import Capability, Method, MethodConfig
from ..core.model import AdaptedModel, Adapter
from ..core.precision import adapter_dtype, cast_at_use
from ..core.sites import Site, layer_index, resolve_sites
from ..core.typology import Typology
from . import _prompting as prompting  # what prompt and prefix tuning share

ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "deberta", "deberta-v2",
                 "albert", "camembert", "modernbert")


@dataclass
class PrefixTuningConfig(MethodConfig):
    """Prefix tuning: `num_virtual_tokens` trained keys and values in every attention layer.

    `projection_hidden`: None (train the prefixes directly, the default) or the hidden width h
    of peft's reparameterisation MLP (`prefix_projection`). Prefixes start at N(0, 1) like peft's
    nn.Embedding (with the MLP, its layers start as torch's defaults).
    """

    targets: str | list[str] = field(default_factory=lambda: ["attn.kv"])
    num_virtual_tokens: int = 20
    projection_hidden: int | None = None

    def validate(self) -> None:
        super().validate()
        n, h = self.num_virtual_tokens, self.projection_hidden
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ConfigError(f"num_virtual_tokens must be a positive integer, got {n!r}")
        if h is not None and (not isinstance(h, int) or isinstance(h, bool) or h <= 0):
            raise ConfigError(f"projection_hidden must be None or a positive integer, got {h!r}")


def kv_layout(model: nn.Module) -> tuple[int, int, int]:
    """(num_layers, kv_heads, head_dim) as peft computes them (GQA: num_key_value_heads)."""
    cfg = text_config(model)
    if getattr(cfg, "is_encoder_decoder", False):
        raise CapabilityError("prefix tuning supports decoder-only models; encoder-decoder "
                              f"{type(model).__name__} is not supported")
    if getattr(cfg, "model_type", None) in ENCODER_TYPES and not getattr(cfg, "is_decoder", False):
        raise CapabilityError(
            f"prefix tuning is not supported on the encoder {type(model).__name__}: transformers 5 "
            "encoders take no prefix cache (peft 0.21 fails there too). Use prompt tuning, LoRA or "
            "IA3 for encoders")
    layers, _ = prompting.model_shape(model)
    _, kv_heads, head_dim = attention_heads(model)    # model_shape has checked the head count
    return layers, kv_heads, head_dim


class Projection(nn.Module):
    """peft's prefix encoder MLP: embedding (n, kv_dim) → Linear → tanh → Linear(h, L·2·kv_dim)."""

    def __init__(self, n: int, kv_dim: int, hidden: int, out: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(n, kv_dim, dtype=dtype, device=device), requires_grad=False)
        self.proj_in = nn.Linear(kv_dim, hidden, dtype=dtype, device=device)
        self.proj_out = nn.Linear(hidden, out, dtype=dtype, device=device)

    def forward(self) -> torch.Tensor:
        return self.proj_out(torch.tanh(self.proj_in(self.embedding)))


class PrefixPart(nn.Module):
    """One attention layer's prefix: `key` and `value`, (n, kv_heads·head_dim) in the adapter's
    dtype (fp32 on a half-precision model, as peft) — or, with the projection MLP, nothing but
    (at the first site) `projection`."""

    def __init__(self, n: int, kv_dim: int, dtype: torch.dtype, device: torch.device, *,
                 direct: bool) -> None:
        super().__init__()
        if direct:
            self.key = nn.Parameter(torch.empty(n, kv_dim, dtype=dtype, device=device), requires_grad=False)
            self.value = nn.Parameter(torch.empty(n, kv_dim, dtype=dtype, device=device), requires_grad=False)


def _device(site: Site) -> torch.device:
    p = next(site.module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _build(site: Site, layer: Any, config: PrefixTuningConfig, initialise: bool = True, *,
           model: Any) -> PrefixPart:
    layers, kv_heads, head_dim = kv_layout(model.model)
    kv_dim = kv_heads * head_dim
    n, device = config.num_virtual_tokens, _device(site)
    dtype = adapter_dtype(config, _model_dtype(model.model))
    direct = config.projection_hidden is None
    part = PrefixPart(n, kv_dim, dtype, device, direct=direct)
    if not direct and site.layer == 0:
        part.projection = Projection(n, kv_dim, config.projection_hidden, layers * 2 * kv_dim, dtype, device)
        part.projection.requires_grad_(False)
    if initialise:
        with torch.no_grad():
            for p in ([part.key, part.value] if direct else
                      [part.projection.embedding] if site.layer == 0 else []):
                p.normal_()
    return part


def _tensor_shapes(layer: Any, site: Site, config: PrefixTuningConfig) -> dict[str, tuple[int, ...]]:
    n = config.num_virtual_tokens
    kv_dim = _site_kv_dim(site)
    if config.projection_hidden is None:
        return {"key": (n, kv_dim), "value": (n, kv_dim)}
    if site.layer != 0:
        return {}
    h, out = config.projection_hidden, _site_num_layers(site) * 2 * kv_dim
    return {"projection.embedding": (n, kv_dim), "projection.proj_in.weight": (h, kv_dim),
            "projection.proj_in.bias": (h,), "projection.proj_out.weight": (out, h),
            "projection.proj_out.bias": (out,)}


def _site_config(site: Site) -> Any:
    cfg = getattr(site.module, "config", None)
    if cfg is None:
        raise ConfigError(f"prefix tuning needs attention modules that carry the model config; "
                          f"{site.path!r} ({site.type_name}) does not")
    return cfg


class _ConfigHolder(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config


def _site_kv_dim(site: Site) -> int:
    _, kv_heads, head_dim = kv_layout(_ConfigHolder(_site_config(site)))
    return kv_heads * head_dim


def _site_num_layers(site: Site) -> int:
    return kv_layout(_ConfigHolder(_site_config(site)))[0]


class PrefixHook(InputHook):
    """Builds the prefix cache for every forward (see the module docstring)."""

    uses_cache = True

    def __init__(self, parts: dict[str, nn.Module], config: PrefixTuningConfig, layers: int,
                 kv_heads: int, head_dim: int, cache_arg: str, layer_of: list[int]) -> None:
        super().__init__(parts)
        self.__dict__.update(config=config, n=config.num_virtual_tokens, num_layers=layers,
                             kv_heads=kv_heads, head_dim=head_dim, cache_arg=cache_arg,
                             layer_of=layer_of)

    # ---- the prefixes ---------------------------------------------------------------------------
    def prefixes(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per model layer, (key, value) of shape (n, kv_heads·head_dim), with gradients."""
        parts = list(self.parts.values())
        if self.config.projection_hidden is None:
            by_layer = {layer: (p.key, p.value) for layer, p in zip(self.layer_of, parts, strict=True)}
            return [by_layer[i] for i in range(self.num_layers)]
        flat = parts[0].projection()                               # (n, L·2·kv_dim)
        chunks = flat.view(self.n, self.num_layers * 2, -1).unbind(1)
        return [(chunks[2 * i], chunks[2 * i + 1]) for i in range(self.num_layers)]

    def flat(self) -> torch.Tensor:
        """peft's `prompt_embeddings`: (n, L·2·kv_dim), layer l's key then value."""
        return torch.cat([t for kv in self.prefixes() for t in kv], dim=1)

    @torch.no_grad()
    def fold_projection(self) -> None:
        """Replace the reparameterisation MLP by the prefixes it produces (peft saves only
        these). Afterwards the adapter is the plain per-layer form and saves that."""
        if self.config.projection_hidden is None:
            return
        kv = self.prefixes()
        parts = list(self.parts.values())
        grad = parts[0].projection.embedding.requires_grad
        for layer, part in zip(self.layer_of, parts, strict=True):
            key, value = kv[layer]
            part.key = nn.Parameter(key.detach().clone(), requires_grad=grad)
            part.value = nn.Parameter(value.detach().clone(), requires_grad=grad)
        del parts[0].projection
        self.config.projection_hidden = None

    def layer_prefix(self, layer: int, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s (key, value), (batch, kv_heads, n, head_dim) in `dtype`, made from the
        parameters now (with the projection MLP: the whole MLP, for one layer's share)."""
        key, value = self.prefixes()[layer]
        return self._batched(key.to(dtype), batch), self._batched(value.to(dtype), batch)

    def _batched(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """(n, kv_heads·head_dim) -> the cache's (batch, kv_heads, n, head_dim), a view."""
        return t.view(self.n, self.kv_heads, self.head_dim).transpose(0, 1).unsqueeze(0).expand(batch, -1, -1, -1)

    def cache(self, model: nn.Module, batch: int, dtype: torch.dtype | None = None):
        """A DynamicCache holding the n prefix positions of every layer, for `batch` rows."""
        from transformers import DynamicCache
        dtype = dtype or _model_dtype(model)
        # the prefixes in the model's dtype: computed (projection MLP) and cast at use, cached
        # between updates while nothing trains them
        raw = [p for part in self.parts.values() for p in part.parameters()]
        flat = cast_at_use(self, raw, dtype, lambda raw, dtype, cached: [
            t.to(dtype) for kv in self.prefixes() for t in kv])
        return DynamicCache([(self._batched(key, batch), self._batched(value, batch))
                             for key, value in zip(flat[::2], flat[1::2], strict=True)])

    # ---- InputHook ------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        # the condition under which transformers' layers run checkpointed (GradientCheckpointingLayer)
        checkpointed = (model.training and torch.is_grad_enabled()
                        and getattr(model, "is_activation_checkpointing", False))
        layers = cache_keeping_layers(model) if checkpointed else []
        if checkpointed and not layers:
            # older transformers: checkpointed layers replace any cache by None, prefix included
            raise CapabilityError("a prefix adapter cannot train with gradient checkpointing on this "
                                  "transformers version: its checkpointed layers drop the attention "
                                  "cache that carries the prefix; turn gradient checkpointing off")
        kwargs = dict(kwargs)
        batch, _ = prompting.batch_and_length(kwargs)
        for arg in ("cache", "past_key_values"):
            given = kwargs.pop(arg, None)
            if given is not None and (not hasattr(given, "get_seq_length") or given.get_seq_length()):
                raise CapabilityError("a prefix adapter builds the attention cache itself; continuing "
                                      "from a given cache is not supported (use generate)")
        embeds = kwargs.get("inputs_embeds")
        dtype = embeds.dtype if embeds is not None else _model_dtype(model)
        if checkpointed:
            # A cache the layers only read: checkpointing replays each layer in the backward pass,
            # and a cache that stored the layer's keys would hand the replay twice as many. So the
            # layers may keep it (transformers' documented switch for read-only caches), for this
            # forward only (release()).
            kwargs[self.cache_arg] = _replay_cache_class()(self, batch, dtype)
            self.__dict__["_switched"] = [(m, m.__dict__.get("_can_checkpoint_with_cache")) for m in layers]
            for m in layers:
                m._can_checkpoint_with_cache = True
        else:
            kwargs[self.cache_arg] = self.cache(model, batch, dtype)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = prompting.prepend(kwargs["attention_mask"], self.n, 1)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + self.n
        return kwargs

    def release(self, model: nn.Module) -> None:
        for m, before in self.__dict__.pop("_switched", ()):
            if before is None:
                del m._can_checkpoint_with_cache   # the class's value (False) again
            else:
                m._can_checkpoint_with_cache = before

    def generate(self, model: nn.Module, kwargs: dict[str, Any]) -> Any:
        prompting.check_generates(model)
        kwargs = dict(kwargs)
        ids = kwargs.get("input_ids")
        if ids is None:
            raise ValueError("generate with a prefix adapter needs input_ids")
        if max(kwargs.get("num_beams", 1) or 1, kwargs.get("num_return_sequences", 1) or 1) > 1:
            raise CapabilityError("generate with a prefix adapter supports one sequence per row "
                                  "(num_beams=1, num_return_sequences=1)")
        if kwargs.get("position_ids") is not None:
            raise CapabilityError("generate with a prefix adapter numbers positions from the "
                                  "attention mask; drop position_ids")
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        # The mask covers prefix + input while input_ids do not: generate then feeds all of
        # input_ids after the cached prefix, numbering positions from the mask (n, n+1, ...).
        kwargs["attention_mask"] = prompting.prepend(mask, self.n, 1)
        kwargs[self.cache_arg] = self.cache(model, ids.shape[0])
        return model.generate(**kwargs)


@functools.cache
def _replay_cache_class() -> type:
    """The cache prefix tuning passes through gradient-checkpointed layers (built on first use:
    transformers is imported then). `update` returns the prefix then the layer's keys and values
    without storing them, so a replayed layer sees what the first pass saw; the prefix is made
    from the parameters inside the call, so the replay rebuilds its graph within the checkpoint
    (reentrant checkpointing backpropagates from there; a prefix made once outside would be
    backpropagated through once per layer). The stored tensors are zero-stride placeholders:
    they only give the mask its n cached positions."""
    from transformers import DynamicCache

    class PrefixReplayCache(DynamicCache):
        def __init__(self, hook: PrefixHook, batch: int, dtype: torch.dtype) -> None:
            shape = (batch, hook.kv_heads, hook.n, hook.head_dim)
            device = next(hook.parameters()).device
            blank = torch.zeros((), dtype=dtype, device=device).expand(shape)
            super().__init__([(blank, blank)] * hook.num_layers)
            self.hook, self.batch, self.dtype = hook, batch, dtype

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
                   *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            key, value = self.hook.layer_prefix(layer_idx, self.batch, self.dtype)
            return torch.cat([key, key_states], dim=-2), torch.cat([value, value_states], dim=-2)

    return PrefixReplayCache


def _model_dtype(model: nn.Module) -> torch.dtype:
    emb = model.get_input_embeddings()
    return emb.weight.dtype if emb is not None else next(model.parameters()).dtype


def _cache_arg(model: nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _build_hook(model: nn.Module, config: PrefixTuningConfig, parts: dict[str, nn.Module]) -> PrefixHook:
    layers, kv_heads, head_dim = kv_layout(model)
    layer_of = []
    for path in parts:
        module = model.get_submodule(path)
        idx = getattr(module, "layer_idx", None)
        layer_of.append(int(idx) if idx is not None else _layer_index(path))
    if sorted(layer_of) != list(range(layers)):
        raise ConfigError(f"prefix tuning needs exactly one attention site per layer (layers "
                          f"0..{layers - 1}); targets {config.targets!r} give layers {sorted(layer_of)}. "
                          "peft's format has every layer; do not narrow with layers=/exclude=")
    if config.projection_hidden is not None and layer_of[0] != 0:
        raise ConfigError("the projection MLP lives at the layer-0 attention site, which must come first")
    return PrefixHook(parts, config, layers, kv_heads, head_dim, _cache_arg(model), layer_of)


def _layer_index(path: str) -> int:
    idx = layer_index(path)
    if idx is None:
        raise ConfigError(f"{path!r} is not inside a numbered transformer layer; prefix tuning "
                          "targets each layer's attention module ('attn.kv')")
    return idx


def _describe(config: PrefixTuningConfig) -> str:
    extra = f", projection h={config.projection_hidden}" if config.projection_hidden else ""
    return f"{config.num_virtual_tokens} virtual tokens{extra}"


# ---- peft format ---------------------------------------------------------------------------------
def _to_peft(am: AdaptedModel, adapter: Adapter) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config: PrefixTuningConfig = adapter.config
    hook: PrefixHook = adapter.hook
    with torch.no_grad():
        flat = hook.flat().detach().clone()
    kv_dim = hook.kv_heads * hook.head_dim
    fields = {
        "task_type": prompting.peft_task(am.model),
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": kv_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": hook.kv_heads,
        "num_layers": hook.num_layers,
        "encoder_hidden_size": config.projection_hidden or kv_dim,
        "prefix_projection": False,     # the file holds the projected prefixes, as peft saves them
        "init_weights": None,
        "modules_to_save": list(adapter.copies) or None,
    }
    return fields, {"prompt_embeddings": flat, **prompting.head_tensors(am, adapter, fields)}


def _from_peft(am: AdaptedModel, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], directory: Path
               ) -> tuple[PrefixTuningConfig, list[Site], dict[tuple[str, str], torch.Tensor]]:
    prompting.check_peft_header(cfg)
    layers, kv_heads, head_dim = kv_layout(am.model)
    kv_dim = kv_heads * head_dim
    if (int(cfg.get("token_dim") or kv_dim), int(cfg.get("num_attention_heads") or kv_heads),
            int(cfg.get("num_layers") or layers)) != (kv_dim, kv_heads, layers):
        raise CapabilityError(
            f"the prefix layout (token_dim {cfg.get('token_dim')}, {cfg.get('num_attention_heads')} "
            f"heads, {cfg.get('num_layers')} layers) differs from this model's key/value layout "
            f"({kv_dim}, {kv_heads} kv heads, {layers} layers)")
    n = int(cfg["num_virtual_tokens"])
    flat = prompting.prompt_tensor(tensors, (n, layers * 2 * kv_dim), "PREFIX_TUNING")
    sites = resolve_sites(am.model, ["attn.kv"], roles=am.site_roles())
    copies = prompting.copy_paths_of(am, cfg, tensors)
    config = PrefixTuningConfig(targets=[s.path for s in sites], num_virtual_tokens=n,
                                modules_to_save=copies or None)
    chunks = flat.view(n, layers * 2, kv_dim)
    out = {}
    for site in sites:
        idx = getattr(site.module, "layer_idx", None)
        idx = int(idx) if idx is not None else _layer_index(site.path)
        out[(site.path, "key")] = chunks[:, 2 * idx].clone()
        out[(site.path, "value")] = chunks[:, 2 * idx + 1].clone()
    out.update(prompting.split_copies(tensors, copies))
    return config, sites, out


METHOD = Method(
    name="prefix",
    title="Prefix tuning",
    config_cls=PrefixTuningConfig,
    typology=Typology(
        site_roles=("attn.kv",),
        form="prompt",
        integration="prefix",
        intra_connectivity="none (dense with the projection MLP while training)",
        inter_connectivity="dynamic (the model's attention weighs the prefix keys/values per query)",
        adaptation="addition",
        parameter_sharing="none (the projection MLP is shared by all layers while training)",
        input_type="none (free key/value vectors)",
        insertion="in-sequence",
        insertions_per_layer="n key/value positions per attention layer",
        workspace="attention keys and values",
        param_formula="2·n·kv_heads·head_dim per layer",
    ),
    layer_kinds=(),                 # model-level: an InputHook, no wrapped layer
    capabilities=frozenset({Capability.QUANTISED_BASE}),
    build=_build,
    tensor_shapes=_tensor_shapes,
    describe=_describe,
    build_hook=_build_hook,
    peft_type="PREFIX_TUNING",
    to_peft=_to_peft,
    from_peft=_from_peft,
    train_lr=1e-2,
)
