"""Prompt tuning (Lester et al., 2021): n trained "virtual token" embeddings prepended to the input.

The adapter holds one tensor, `prompt` (n, d), at the model's input embedding (the "embed" site).
On every forward its hook embeds `input_ids` with the model's own input embedding (which may
itself carry other adapters), prepends the prompt (broadcast over the batch, cast to the
embedding's dtype) and passes `inputs_embeds` instead; the other arguments follow:

- `attention_mask`: n ones on the left;
- `labels` of a token-level task (a 2-D tensor as long as the input): n × -100 on the left, so the
  loss is peft's;
- `token_type_ids` (BERT): n zeros on the left, as peft does for sequence classification (peft
  drops them for causal LMs; we keep the caller's segments);
- `position_ids`: peft drops them and lets the model number the n + L positions 0..n+L-1. Given
  explicit ids (e.g. left padding), we keep them: the virtual tokens get 0..n-1 and the real
  tokens their given positions + n. For unpadded input with positions 0..L-1 (or none) both
  agree, and a left-padded row gets the positions of the same row without padding.

Outputs: for a causal LM the logits cover n + L positions; `finish` drops the first n so they
align with `input_ids` (peft returns them untrimmed: its `logits[:, n:]` equal ours). When the
caller already trimmed them (`logits_to_keep`), they are left as they are. Sequence-level outputs
(classification) have nothing to trim.

`generate` (decoder-only models) calls `model.generate(inputs_embeds=..., attention_mask=...)`
and puts the original `input_ids` in front of the new tokens, so the result reads like plain
`generate`'s. Prompt tuning cannot be merged into the weights.

peft format: PROMPT_TUNING with the single tensor `prompt_embeddings` (n, d).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import CapabilityError, CheckpointError, ConfigError
from ..core.geometry import unwrap
from ..core.layer import InputHook, layer_kind
from ..core.method import Capability, Method, MethodConfig
from ..core.model import AdaptedModel, Adapter
from ..core.precision import adapter_dtype, cast_one
from ..core.sites import Site, resolve_sites
from ..core.typology import Typology
from ._prompting import (
    batch_and_length,
    check_generates,
    check_peft_header,
    copy_paths_of,
    head_tensors,
    model_shape,
    peft_task,
    prepend,
    prompt_tensor,
    split_copies,
)

INITS = ("random", "vocab", "text")
PEFT_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "RANDOM"}


@dataclass
class PromptTuningConfig(MethodConfig):
    """Prompt tuning: `num_virtual_tokens` trained input embeddings in front of every sequence.

    `init`: "random" (N(0, 1), as peft's nn.Embedding), "vocab" (embeddings of vocabulary tokens
    drawn with `seed`) or "text" (embeddings of `init_token_ids`, the token ids of an init text,
    repeated or truncated to n tokens, as peft's TEXT init).
    """

    targets: str | list[str] = field(default_factory=lambda: ["embed"])
    num_virtual_tokens: int = 20
    init: str = "random"
    init_token_ids: list[int] | None = None
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        n = self.num_virtual_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ConfigError(f"num_virtual_tokens must be a positive integer, got {n!r}")
        if self.init not in INITS:
            raise ConfigError(f"prompt tuning init {self.init!r} is unknown; choose one of {INITS}")
        if self.init == "text":
            ids = self.init_token_ids
            if not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
                raise ConfigError("init='text' needs init_token_ids: the token ids of the init text "
                                  "(e.g. tokenizer.encode('Classify the sentiment'))")


class PromptPart(nn.Module):
    """The tensors of a prompt adapter: `prompt` (num_virtual_tokens, embedding_dim), in the
    adapter's dtype (fp32 on a half-precision embedding, as peft keeps it) and cast to the
    embeddings' dtype when used."""

    def __init__(self, n: int, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.empty(n, dim, dtype=dtype, device=device),
                                   requires_grad=False)


def _embedding_of(site: Site) -> nn.Embedding:
    if layer_kind(site.module) != "embedding":
        raise ConfigError(f"prompt tuning attaches to the input embedding (role 'embed'); "
                          f"{site.path!r} is a {site.type_name}")
    return site.module


def _build(site: Site, layer: Any, config: PromptTuningConfig, initialise: bool = True) -> PromptPart:
    emb = _embedding_of(site)
    weight = emb.weight
    n = config.num_virtual_tokens
    part = PromptPart(n, weight.shape[1], adapter_dtype(config, weight.dtype), weight.device)
    if initialise:
        with torch.no_grad():
            if config.init == "random":
                part.prompt.normal_()
            else:
                if config.init == "vocab":
                    g = torch.Generator().manual_seed(config.seed)
                    ids = torch.randint(0, weight.shape[0], (n,), generator=g)
                else:
                    text = list(config.init_token_ids)
                    bad = [i for i in text if i >= weight.shape[0]]
                    if bad:
                        raise ConfigError(f"init_token_ids {bad[:3]} are outside the vocabulary "
                                          f"({weight.shape[0]} tokens)")
                    ids = torch.tensor((text * math.ceil(n / len(text)))[:n])
                part.prompt.copy_(weight[ids.to(weight.device)])
    return part


def _tensor_shapes(layer: Any, site: Site, config: PromptTuningConfig) -> dict[str, tuple[int, ...]]:
    return {"prompt": (config.num_virtual_tokens, _embedding_of(site).weight.shape[1])}


class PromptHook(InputHook):
    """Prepends the prompt to the input embeddings (see the module docstring)."""

    def __init__(self, parts: dict[str, nn.Module], n: int) -> None:
        super().__init__(parts)
        self.__dict__.update(n=n, _total=None)

    @property
    def prompt(self) -> torch.Tensor:
        return self.parts["0"].prompt

    def _embeds(self, model: nn.Module, kwargs: dict[str, Any]) -> tuple[dict[str, Any], int, int]:
        kwargs = dict(kwargs)
        batch, length = batch_and_length(kwargs)
        ids = kwargs.pop("input_ids", None)
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            # the site's embedding (the encoder's in an encoder-decoder), with its own adapters
            embeds = model.get_submodule(self.part_paths[0])(ids)
        prompt = cast_one(self, self.prompt, embeds.dtype).unsqueeze(0).expand(batch, -1, -1)   # cached
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            kwargs["attention_mask"] = prepend(mask, self.n, 1)
        return kwargs, batch, length

    def prepare(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        n = self.n
        kwargs, _, length = self._embeds(model, kwargs)
        labels = kwargs.get("labels")
        if labels is not None and labels.dim() == 2 and labels.shape[1] == length:
            kwargs["labels"] = prepend(labels, n, -100)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = prepend(kwargs["token_type_ids"], n, 0)
        positions = kwargs.get("position_ids")
        if positions is not None:
            virtual = torch.arange(n, device=positions.device, dtype=positions.dtype)
            kwargs["position_ids"] = torch.cat(
                [virtual.expand(*positions.shape[:-1], n), positions + n], dim=-1)
        self.__dict__["_total"] = n + length
        return kwargs

    def finish(self, output: Any, kwargs: dict[str, Any]) -> Any:
        # a task model's logits, or a backbone's states (am.base_model, trl's fused LM head)
        for field_name in ("logits", "last_hidden_state"):
            t = getattr(output, field_name, None)
            if (isinstance(t, torch.Tensor) and t.dim() == 3
                    and t.shape[1] == self._total and self._total is not None):
                setattr(output, field_name, t[:, self.n:])
        return output

    def generate(self, model: nn.Module, kwargs: dict[str, Any]) -> Any:
        check_generates(model)
        ids = kwargs.get("input_ids")
        if ids is None:
            raise ValueError("generate with a prompt adapter needs input_ids")
        kwargs = dict(kwargs)
        if kwargs.get("attention_mask") is None:
            kwargs["attention_mask"] = torch.ones_like(ids)
        if kwargs.get("position_ids") is not None:
            raise CapabilityError("generate with a prompt adapter numbers positions from the "
                                  "attention mask; drop position_ids")
        kwargs, _, _ = self._embeds(model, kwargs)
        out = model.generate(**kwargs)
        if isinstance(out, torch.Tensor):
            return torch.cat([ids.to(out.device), out], dim=1)
        out.sequences = torch.cat([ids.to(out.sequences.device), out.sequences], dim=1)
        return out


def _embeds_input_ids(model: nn.Module) -> nn.Module | None:
    """The embedding that embeds `input_ids`: the encoder's of an encoder-decoder (BART's
    `encoder.embed_tokens`, whose weight is tied to `get_input_embeddings()`'s `shared`), else
    the model's input embedding."""
    encoder = model.get_encoder() if callable(getattr(model, "get_encoder", None)) else None
    owner = encoder if callable(getattr(encoder, "get_input_embeddings", None)) else model
    emb = owner.get_input_embeddings() if callable(getattr(owner, "get_input_embeddings", None)) else None
    return unwrap(emb) if isinstance(emb, nn.Module) else None


def _check_takes_embeds(model: nn.Module) -> None:
    """CapabilityError when the model's forward takes no inputs_embeds: the hook hands the
    prompted sequence over as inputs_embeds, which such a model (ViT and CNNs read pixels, Whisper
    audio features; CLIP pools at the end token it finds in input_ids) cannot get."""
    if "inputs_embeds" not in inspect.signature(model.forward).parameters:
        raise CapabilityError(f"prompt tuning passes the prompted input embeddings as inputs_embeds; "
                              f"{type(model).__name__}.forward takes no inputs_embeds, so prompt "
                              f"tuning does not apply to it")


def _resolve(model: nn.Module, config: PromptTuningConfig, roles: dict[str, str]) -> list[Site]:
    """The sites config.targets name; where they name several embeddings (an encoder's and a
    decoder's), the one that embeds input_ids, which is where the prompt goes."""
    _check_takes_embeds(model)
    sites = resolve_sites(model, config.targets, layers=config.layers, exclude=config.exclude,
                          roles=roles)
    feeding = [s for s in sites if s.module is _embeds_input_ids(model)]
    return feeding if len(sites) > 1 and len(feeding) == 1 else sites


def _build_hook(model: nn.Module, config: PromptTuningConfig, parts: dict[str, nn.Module]) -> PromptHook:
    if len(parts) != 1:
        raise ConfigError(f"prompt tuning attaches to exactly one site, the input embedding; "
                          f"targets {config.targets!r} name {len(parts)}: {list(parts)}")
    path = next(iter(parts))
    emb = model.get_input_embeddings()
    site_module = unwrap(model.get_submodule(path))
    if emb is None or (unwrap(emb) is not site_module and _embeds_input_ids(model) is not site_module):
        raise ConfigError(f"prompt tuning must attach to the model's input embedding "
                          f"(get_input_embeddings()), not {path!r}")
    _check_takes_embeds(model)
    return PromptHook(parts, config.num_virtual_tokens)


def _describe(config: PromptTuningConfig) -> str:
    return f"{config.num_virtual_tokens} virtual tokens, init={config.init}"


# ---- peft format ---------------------------------------------------------------------------------
def _to_peft(am: AdaptedModel, adapter: Adapter) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config: PromptTuningConfig = adapter.config
    prompt = next(iter(adapter.parts().values())).prompt.detach()
    layers, heads = model_shape(am.model)
    fields = {
        "task_type": peft_task(am.model),
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": prompt.shape[1],
        "num_transformer_submodules": 1,
        "num_attention_heads": heads,
        "num_layers": layers,
        "prompt_tuning_init": PEFT_INIT[config.init],
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
        "modules_to_save": list(adapter.copies) or None,
    }
    return fields, {"prompt_embeddings": prompt.clone(), **head_tensors(am, adapter, fields)}


def _from_peft(am: AdaptedModel, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], directory: Path
               ) -> tuple[PromptTuningConfig, list[Site], dict[tuple[str, str], torch.Tensor]]:
    check_peft_header(cfg)
    sites = _resolve(am.model, PromptTuningConfig(), am.site_roles())
    if len(sites) != 1:
        raise CheckpointError(f"this model has {len(sites)} input embeddings; expected one")
    n = int(cfg["num_virtual_tokens"])
    d = _embedding_of(sites[0]).weight.shape[1]
    t = prompt_tensor(tensors, (n, d), "PROMPT_TUNING")
    copies = copy_paths_of(am, cfg, tensors)
    config = PromptTuningConfig(targets=[sites[0].path], num_virtual_tokens=n,
                                modules_to_save=copies or None)
    out = {(sites[0].path, "prompt"): t}
    out.update(split_copies(tensors, copies))
    return config, sites, out


METHOD = Method(
    name="prompt",
    title="Prompt tuning",
    config_cls=PromptTuningConfig,
    typology=Typology(
        site_roles=("embed",),
        form="prompt",
        integration="prompt",
        intra_connectivity="none",
        inter_connectivity="dynamic (the model's attention weighs the virtual tokens per query)",
        adaptation="addition",
        parameter_sharing="none",
        input_type="none (free embeddings)",
        insertion="in-sequence",
        insertions_per_layer="n virtual tokens before the first layer",
        workspace="embedding",
        param_formula="n·d (virtual tokens × embedding width)",
    ),
    layer_kinds=(),                 # model-level: an InputHook, no wrapped layer
    capabilities=frozenset({Capability.QUANTISED_BASE}),
    build=_build,
    tensor_shapes=_tensor_shapes,
    describe=_describe,
    build_hook=_build_hook,
    peft_type="PROMPT_TUNING",
    to_peft=_to_peft,
    from_peft=_from_peft,
    train_lr=3e-2,
    resolve=_resolve,
)
