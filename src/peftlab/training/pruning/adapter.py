"""The adapter side of Light-PEFT pruning: which LoRA modules and rank units go, by importance
(`select_modules`, `select_ranks`), and removing them from a LoRA adapter so that it still saves
and re-loads (`prune_adapter`)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

import torch

from ...core.attach import remove_delta
from ...core.errors import AdapterError, CapabilityError, ConfigError, close_matches
from ...core.model import AdaptedModel, Adapter
from ...methods.lora import LoraConfig, LowRankDelta


def prune_adapter(am: AdaptedModel, adapter: str, *, keep_ranks: Mapping[str, Sequence[int]] | None = None,
                  drop: Iterable[str] = ()) -> None:
    """Remove rank units (rows of A, columns of B) and whole modules of LoRA adapter `adapter`.

    `keep_ranks` maps a site path to the rank units it keeps (a site left out keeps all; an
    empty list drops the module); `drop` names sites to remove. Each kept site keeps its
    scaling: the config gets per-site `rank_pattern` / `alpha_pattern` entries (alpha' = s·r',
    or s·√r' with rsLoRA) and dropped sites join `exclude`, so the adapter saves and re-loads.
    """
    ad = am.adapter(adapter)
    if not isinstance(ad.config, LoraConfig) or ad.method.name != "lora":
        raise CapabilityError(f"adapter {adapter!r} is {ad.method.title}; rank and module pruning "
                              "supports LoRA adapters")
    params = [s for s in ad.sites if s.params]
    if params:      # LoRA on parameters (MoE experts): no per-site rank units to prune
        raise CapabilityError(f"adapter {adapter!r} adapts parameters ({params[0].path}: "
                              f"{', '.join(params[0].params)}); pruning supports LoRA on layers only")
    if ad.merged:
        raise AdapterError(f"adapter {adapter!r} is merged; unmerge({adapter!r}) before pruning it")
    keep_ranks = dict(keep_ranks or {})
    drop = set(drop) | {p for p, k in keep_ranks.items() if len(k) == 0}
    unknown = sorted((set(keep_ranks) | drop) - set(ad.layers))
    if unknown:
        hint = close_matches(unknown[0], ad.layers)
        raise ConfigError(f"adapter {adapter!r} has no site {unknown[0]!r}"
                          + (f"; did you mean {hint[0]!r}?" if hint else ""))
    if drop >= set(ad.layers):
        raise ConfigError(f"pruning would drop every module of adapter {adapter!r}; keep at least one")
    deltas: dict[str, LowRankDelta] = {p: layer.deltas[adapter] for p, layer in ad.layers.items()}
    for path, keep in keep_ranks.items():
        r = deltas[path].r
        if path not in drop and (min(keep) < 0 or max(keep) >= r or len(set(keep)) != len(keep)):
            raise ConfigError(f"keep_ranks[{path!r}] = {list(keep)} must be distinct rank units in 0..{r - 1}")
    sites = {s.path: s for s in ad.sites}
    scaling = {p: d.scaling for p, d in deltas.items()}                      # before any change
    changed = bool(drop) or any(len(k) != deltas[p].r for p, k in keep_ranks.items())
    for path in drop:
        _drop_site(am, ad, path)
    for path, keep in keep_ranks.items():
        if path not in drop:
            deltas[path].keep_ranks(torch.tensor(sorted(keep), dtype=torch.long))
    if not changed:
        return
    config = ad.config
    kept = [s for s in ad.sites if s.path not in drop]
    ad.sites[:] = kept
    ranks = {s.path: deltas[s.path].r for s in kept}
    root = math.sqrt if config.rslora else float
    config.rank_pattern = {re.escape(p): r for p, r in ranks.items()}
    config.alpha_pattern = {re.escape(p): scaling[p] * root(r) for p, r in ranks.items()}
    if drop:
        existing = [] if config.exclude is None else (
            [config.exclude] if isinstance(config.exclude, str) else list(config.exclude))
        config.exclude = existing + sorted(drop)
    for s in kept:   # the scaling a reload computes from the config, equal to the one kept
        deltas[s.path].scaling = config.scaling_for(sites[s.path])
    am.state.changed()


def _drop_site(am: AdaptedModel, ad: Adapter, path: str) -> None:
    """Remove adapter `ad`'s delta at `path`; a layer left with no deltas becomes its base layer."""
    remove_delta(am.model, ad.layers.pop(path), path, ad.name)


def select_modules(scores: Mapping[str, float], ratio: float) -> set[str]:
    """The floor(ratio · n) least important modules (ties: model order)."""
    paths = list(scores)
    k = math.floor(ratio * len(paths) + 1e-9)
    order = sorted(range(len(paths)), key=lambda i: scores[paths[i]])
    return {paths[i] for i in order[:k]}


def select_ranks(scores: Mapping[str, torch.Tensor], ratio: float) -> dict[str, list[int]]:
    """Kept rank units per site after removing the floor(ratio · N) least important of all N
    units, globally (ties: model order, then unit order)."""
    paths = list(scores)
    flat = torch.cat([scores[p].float().reshape(-1) for p in paths]) if paths else torch.zeros(0)
    k = math.floor(ratio * flat.numel() + 1e-9)
    gone = torch.zeros(flat.numel(), dtype=torch.bool)
    gone[torch.sort(flat, stable=True).indices[:k]] = True
    kept, start = {}, 0
    for p in paths:
        n = scores[p].numel()
        kept[p] = (~gone[start:start + n]).nonzero().squeeze(1).tolist()
        start += n
    return kept
