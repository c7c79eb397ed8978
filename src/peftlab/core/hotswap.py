"""`hotswap`: replace a loaded adapter's tensors in place with those of an adapter directory, so
that a model compiled with torch.compile keeps its graph (as peft's `hotswap_adapter` does).

The directory is read and checked as `load_adapter` reads it (core/io.py `read_adapter`: peftlab's
format or a peft directory), and every refusal comes before any tensor changes: another method, a
merged adapter, other sites, another structure (a config field that changes what the layers
compute, e.g. DoRA, dropout, IA3's feed-forward sites), tensors of other shapes.

A LoRA adapter (a delta with `lora_A` / `lora_B` and a `scaling`) may come with a smaller rank:
it is zero-padded into the existing rank (extra rows of A and columns of B are zero, so B·A is
unchanged), and a different α / r (or rsLoRA) is folded into B as s_new / s_old, since the
compiled graph holds the scaling as a constant. A larger rank cannot fit in place: refused.
Values are cast to the existing tensors' dtype and device, and copied with `copy_`: their
identities, shapes and strides stay, and so do the graphs compiled over them. The eager caches
(casts, routed stacks) are keyed on the tensors' versions, which `copy_` moves; they are also
dropped explicitly.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import AdapterError, CapabilityError, CheckpointError, ConfigError
from .io import ReadAdapter, read_adapter
from .sites import site_paths

if TYPE_CHECKING:
    from .attach import Adapter
    from .method import MethodConfig
    from .model import AdaptedModel

# Config fields whose difference hotswap accounts for: the sites are compared instead of how they
# were named; values are cast to the stored dtype; the initialisation is overwritten; LoRA's
# rank and scaling are padded and folded into B. Any other field must be equal.
SWAPPABLE_FIELDS = frozenset({"targets", "layers", "exclude", "dtype", "init", "r", "alpha",
                              "rank_pattern", "alpha_pattern", "rslora"})
_LORA_FIELDS = frozenset({"r", "alpha", "rank_pattern", "alpha_pattern", "rslora"})
# The rank dimension of LoRA's tensors (PiSSA's frozen start included); B-like ones carry the scaling.
_RANK_DIM = {"lora_A": 0, "pissa_A0": 0, "lora_B": 1, "pissa_B0": 1}
_SCALED = ("lora_B", "pissa_B0")


def hotswap(am: AdaptedModel, name: str, directory: str | Path, *, strict: bool = False) -> None:
    """Replace adapter `name`'s tensors in place by those saved in `directory` (peftlab's format or
    a peft adapter), keeping its name, activation, trainability and every compiled graph (see the
    module docstring). Refused with a PeftlabError, the model unchanged, when the directory's
    adapter does not fit in place. `strict`: as for load_adapter (another base model or NaN/inf
    refused instead of warned)."""
    adapter = am.adapter(name)
    if adapter.merged:
        raise AdapterError(f"adapter {name!r} is merged into the base weights; unmerge({name!r}) "
                           "before hot-swapping it (a swap under a merge would corrupt the unmerge)")
    read = read_adapter(am, directory, strict=strict)
    if read.method.name != adapter.method.name:
        raise CapabilityError(f"{directory} holds a {read.method.title} adapter and {name!r} is a "
                              f"{adapter.method.title} adapter; hotswap replaces tensors of the same "
                              "method: load it under a new name with load_adapter instead")
    _check_sites(adapter, read, directory)
    _check_config(adapter, read.config, directory)
    new = dict(read.tensors)
    new.update({(path, tname): t for path, state in read.copies.items() for tname, t in state.items()})
    old = adapter.tensors()
    if new.keys() != old.keys():
        missing, unexpected = sorted(old.keys() - new.keys()), sorted(new.keys() - old.keys())
        raise CheckpointError(f"{directory} does not hold the tensors of adapter {name!r}: missing "
                              f"{[':'.join(k) for k in missing[:3]]}, unexpected "
                              f"{[':'.join(k) for k in unexpected[:3]]}; load it under a new name instead")
    values = {key: _fitted(adapter, read.config, key, old[key], new[key], directory) for key in old}
    with torch.no_grad():           # every check passed: now the model changes
        for key, value in values.items():
            old[key].copy_(value)
    # the eager caches follow the tensors' versions (copy_ moved them); dropped all the same
    am._router.forget()
    for layer in adapter.layers.values():
        layer.__dict__["_mixed_memo"] = (None, None)        # a routed batch's stacks
    for part in adapter.parts().values():
        for slot in [k for k in part.__dict__ if k.startswith("_cast")]:   # core/precision.py
            part.__dict__[slot] = ()


def _check_sites(adapter: Adapter, read: ReadAdapter, directory: str | Path) -> None:
    here = set(site_paths(adapter.sites))
    there = set(read.sites)
    if here != there:
        extra, lacking = sorted(there - here), sorted(here - there)
        raise CapabilityError(
            f"{directory} adapts other sites than adapter {adapter.name!r} (only there: {extra[:3]}"
            f"{' …' if len(extra) > 3 else ''}; only here: {lacking[:3]}{' …' if len(lacking) > 3 else ''}); "
            "hotswap replaces tensors in place at the same sites: load it under a new name instead")
    ours = {s.path: tuple(s.slices) for s in adapter.sites if s.slices}
    if read.slices and read.slices != ours:
        raise CapabilityError(f"{directory} adapts other slices of fused projections than adapter "
                              f"{adapter.name!r}; load it under a new name instead")


def _check_config(adapter: Adapter, config: MethodConfig, directory: str | Path) -> None:
    here, there = adapter.config.to_dict(), config.to_dict()
    lora = hasattr(adapter.config, "scaling_for")
    for field, value in here.items():
        if field in SWAPPABLE_FIELDS and (lora or field not in _LORA_FIELDS):
            continue
        if field == "modules_to_save":      # compared through the copies' tensors
            continue
        if there.get(field) != value:
            raise ConfigError(f"{directory}: {field}={there.get(field)!r} but adapter {adapter.name!r} "
                              f"has {field}={value!r}, which changes what its layers compute; hotswap "
                              "swaps tensors only: load it under a new name instead")


def _fitted(adapter: Adapter, config: MethodConfig, key: tuple[str, str], old: torch.Tensor,
            new: torch.Tensor, directory: str | Path) -> torch.Tensor:
    """The value to copy into `old` for tensor `key`: `new` cast to its dtype and device; for
    LoRA's factors, a smaller rank zero-padded and B scaled by s_new / s_old."""
    path, tname = key
    delta = adapter.parts().get(path)
    lora = (delta is not None and tname in _RANK_DIM and hasattr(delta, "scaling")
            and hasattr(config, "scaling_for"))
    where = f"{path}:{tname}"
    if not lora:
        if tuple(new.shape) != tuple(old.shape):
            raise CheckpointError(f"{directory}: {where} is {list(new.shape)} but adapter "
                                  f"{adapter.name!r} holds {list(old.shape)} there; load it under a new name")
        return new.to(device=old.device, dtype=old.dtype)
    dim = _RANK_DIM[tname]
    others_fit = new.dim() == old.dim() and all(
        n == o for i, (n, o) in enumerate(zip(new.shape, old.shape)) if i != dim)
    if not others_fit:
        raise CheckpointError(f"{directory}: {where} is {list(new.shape)} but adapter {adapter.name!r} "
                              f"holds {list(old.shape)} there (only the rank may differ); a different "
                              "base model?")
    if new.shape[dim] > old.shape[dim]:
        raise CapabilityError(
            f"{directory} has rank {new.shape[dim]} at {path!r}, more than adapter {adapter.name!r}'s "
            f"{old.shape[dim]}: a parameter cannot grow in place (a compiled graph holds its shape). "
            f"Add the adapter with a rank ≥ {new.shape[dim]} there (r or rank_pattern) before "
            "compiling, or load this one under a new name")
    work = torch.promote_types(old.dtype, torch.float32)     # the rescaling rounded once
    value = new.to(device=old.device, dtype=work)
    if tname in _SCALED:
        site = next(s for s in adapter.sites if s.path == path)
        value = value * (config.scaling_for(site) / delta.scaling)
    padded = torch.zeros(old.shape, dtype=work, device=old.device)
    padded.narrow(dim, 0, new.shape[dim]).copy_(value)
    return padded.to(old.dtype)
