"""Hugging Face `peft` adapter directories (shared/specs/peft-format.md), both directions.

On disk peft names a tensor `base_model.model.<module path>.<peft tensor name>`. We build and parse
those names from (path, tensor) pairs and a fixed table of peft's tensor names.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import AdapterError, CapabilityError, CheckpointError, PeftlabError
from ..core.io import commit_files, read_json, read_tensors, write_json, write_tensors
from ..core.method import METHODS
from ..methods.lora import LoraConfig
from ..core.sites import match_targets, sites_at

if TYPE_CHECKING:
    from ..core.model import AdaptedModel, Adapter

PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"   # the peft release whose format this writes and is tested against
CONFIG_FILE = "adapter_config.json"
TENSORS_FILE = "adapter_model.safetensors"

# peft tensor name per (our tensor name, site kind); embeddings keep bare parameters in peft.
_LORA_NAMES = {
    ("lora_A", "linear"): "lora_A.weight", ("lora_B", "linear"): "lora_B.weight",
    ("lora_A", "embedding"): "lora_embedding_A", ("lora_B", "embedding"): "lora_embedding_B",
    ("magnitude", "linear"): "lora_magnitude_vector",
}
_FROM_PEFT = {peft: ours for (ours, _), peft in _LORA_NAMES.items()}

# peft task type per transformers auto-class mapping (GPT2LMHeadModel is a causal LM too).
_TASK_MAPPINGS = (("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
                  ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
                  ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS"),
                  ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS"),
                  ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM"))
_INIT_TO_PEFT = {"zero": True, "gaussian": "gaussian", "random": False, "pissa": True}


def _task_type(model: torch.nn.Module, copies: list[str]) -> str | None:
    """peft's task type for this model class. peft's SEQ_CLS/TOKEN_CLS/QA models expect the head
    in the file, so without a trained head copy the adapter is written task-agnostic (null)."""
    from transformers.models.auto import modeling_auto
    cls = type(model).__name__
    task = next((task for mapping, task in _TASK_MAPPINGS
                 if cls in getattr(modeling_auto, mapping, {}).values()), None)
    if task in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS") and not copies:
        return None
    return task


def export_peft(am: AdaptedModel, name: str, directory: str | Path, *,
                base_model_name_or_path: str | None = None) -> Path:
    """Write adapter `name` as a peft directory that `peft.PeftModel.from_pretrained` loads.

    A PiSSA adapter is written as the rank-2r LoRA s·[B, −B0]·[A; A0], which equals its delta on
    the untouched base weight, so peft needs no residual model.
    """
    adapter = am.adapter(name)
    method = adapter.method
    if method.name == "lora":
        peft_type, (fields, tensors) = "LORA", _lora_to_peft(am, adapter)
    elif method.to_peft is not None:
        peft_type, (fields, tensors) = method.peft_type, method.to_peft(am, adapter)
    else:
        exportable = ", ".join(["LoRA"] + [m.title for m in METHODS.values() if m.to_peft])
        raise CapabilityError(f"{method.title} has no peft equivalent; peft export supports {exportable}")
    peft_config: dict[str, Any] = {
        "peft_type": peft_type,
        "task_type": _task_type(am.model, adapter.copies),
        "base_model_name_or_path": base_model_name_or_path
        or getattr(getattr(am.model, "config", None), "_name_or_path", None) or None,
        "inference_mode": True,
        "peft_version": PEFT_VERSION,
        **fields,
    }
    # peft's prompt-learning models wrap the model itself, so their copies sit under 'base_model.'
    copy_prefix = "base_model." if method.build_hook is not None else PREFIX
    for path, wrapper in adapter.copies.items():
        for pname, t in wrapper.copies[name].state_dict().items():
            tensors[f"{copy_prefix}{path}.{pname}"] = t
    directory = Path(directory)
    commit_files(directory, {TENSORS_FILE: write_tensors(tensors, {"format": "pt"}),
                             CONFIG_FILE: write_json(peft_config)})
    return directory


def _lora_to_peft(am: AdaptedModel, adapter: Adapter) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """LoRA's peft config fields and tensors (full peft keys)."""
    name, config = adapter.name, adapter.config
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for site in adapter.sites:
        layer = adapter.layers[site.path]
        delta = layer.deltas[name]
        kind = "embedding" if layer.kind == "embedding" else "linear"
        B, A = (t.detach() for t in delta.factors())
        r = A.shape[0]
        # Keep the site's scaling s at the exported rank: α' = s·r' (rsLoRA: s·√r').
        alpha = delta.scaling * (math.sqrt(r) if config.rslora else r)
        if r != config.r:
            rank_pattern[re.escape(site.path)] = r
        if not math.isclose(alpha, config.alpha, rel_tol=1e-12):
            alpha_pattern[re.escape(site.path)] = alpha
        ours = {"lora_A": A, "lora_B": B}
        if delta.magnitude is not None:
            ours["magnitude"] = delta.magnitude.detach()
        for tname, t in ours.items():
            tensors[f"{PREFIX}{site.path}.{_LORA_NAMES[(tname, kind)]}"] = t
    kinds = {layer.kind for layer in adapter.layers.values()}
    fields = {
        "r": config.r,
        "lora_alpha": config.alpha,
        "target_modules": [s.path for s in adapter.sites],
        "lora_dropout": config.dropout,
        "fan_in_fan_out": "conv1d" in kinds,
        "bias": "none",
        "use_rslora": config.rslora,
        "use_dora": config.dora,
        "modules_to_save": list(adapter.copies) or None,
        "init_lora_weights": _INIT_TO_PEFT[config.init],
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }
    return fields, tensors


def _peft_pattern(patterns: dict[str, Any], path: str) -> Any | None:
    """peft's rule: the first key k with re.match('(.*\\.)?(k)$', path)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return None


def import_peft(am: AdaptedModel, directory: str | Path, name: str, *,
                trainable: bool = False) -> Adapter:
    """Load a peft adapter directory into `am` as adapter `name` (inactive)."""
    directory = Path(directory)
    cfg = read_json(directory / CONFIG_FILE)
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        method = next((m for m in METHODS.values() if m.peft_type == peft_type and m.from_peft), None)
        if method is None:
            known = ["LORA"] + [m.peft_type for m in METHODS.values() if m.from_peft]
            raise CapabilityError(f"{directory}: peft_type {peft_type!r} is not imported; peftlab "
                                  f"imports {', '.join(known)}")
        tensors = read_tensors(directory / TENSORS_FILE)
        try:
            config, sites, site_tensors = method.from_peft(am, cfg, tensors, directory)
            config.validate()
            # from_peft may return modules_to_save tensors too, keyed by the copied module's path
            held = {path for path, _ in site_tensors}
            copies: dict[str, dict[str, torch.Tensor]] = {
                p: {} for p in config.modules_to_save or [] if p in held}
            for (path, tname), t in list(site_tensors.items()):
                if path in copies:
                    copies[path][tname] = site_tensors.pop((path, tname))
            return am.install(name, config, sites=[s.path for s in sites], tensors=site_tensors,
                              copies=copies, trainable=trainable)
        except (AdapterError, CapabilityError):
            raise        # the name or the model, not the checkpoint
        except PeftlabError as e:
            raise CheckpointError(f"{directory}: {e}") from None
    if cfg.get("bias", "none") != "none":
        raise CapabilityError(f"{directory}: LoRA with bias={cfg['bias']!r} is not supported")
    tensors = read_tensors(directory / TENSORS_FILE)

    # peft adds 'classifier' and 'score' for SEQ_CLS whether or not they exist: skip misses.
    found = match_targets(am.model, cfg.get("modules_to_save") or [])
    copy_sites = sites_at(am.model, sorted(set().union(set(), *found.values())))
    copy_paths = sorted({s.path for s in copy_sites}, key=len, reverse=True)
    site_tensors: dict[tuple[str, str], torch.Tensor] = {}
    copies = {path: {} for path in copy_paths}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise CheckpointError(f"{directory / TENSORS_FILE}: tensor {key!r} lacks the "
                                  f"{PREFIX!r} prefix of peft's format")
        rest = key[len(PREFIX):]
        if rest.endswith(".base_layer.weight"):
            _check_unchanged_base(am, directory, rest[: -len(".base_layer.weight")], t)
            continue
        owner = next((p for p in copy_paths if rest.startswith(p + ".")), None)
        if owner is not None:
            copies[owner][rest[len(owner) + 1:]] = t
            continue
        for peft_name, ours in _FROM_PEFT.items():
            if rest.endswith("." + peft_name):
                site_tensors[(rest[: -len(peft_name) - 1], ours)] = t
                break
        else:
            raise CheckpointError(f"{directory / TENSORS_FILE}: tensor {key!r} is neither a LoRA "
                                  "tensor nor part of modules_to_save")
    paths = list(dict.fromkeys(p for p, _ in site_tensors))

    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    rank_pattern, alpha_pattern = {}, {}
    for path in paths:
        site_r = site_tensors[(path, "lora_A")].shape[0]
        site_alpha = _peft_pattern(cfg.get("alpha_pattern") or {}, path) or alpha
        if site_r != r:
            rank_pattern[re.escape(path)] = site_r
        if site_alpha != alpha:
            alpha_pattern[re.escape(path)] = float(site_alpha)
    config = LoraConfig(targets=paths, r=r, alpha=alpha, dropout=float(cfg.get("lora_dropout", 0.0)),
                        rslora=bool(cfg.get("use_rslora", False)), dora=bool(cfg.get("use_dora", False)),
                        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                        modules_to_save=[s.path for s in copy_sites] or None)
    config.validate()
    try:
        return am.install(name, config, sites=paths, tensors=site_tensors, copies=copies,
                          trainable=trainable)
    except (AdapterError, CapabilityError):
        raise        # the name or the model, not the checkpoint
    except PeftlabError as e:
        raise CheckpointError(f"{directory}: {e}") from None


def _check_unchanged_base(am: AdaptedModel, directory: Path, path: str, weight: torch.Tensor) -> None:
    """peft saves an adapted embedding's base weight too (in case the vocabulary was resized).
    We import it only as a check: it must equal this model's weight."""
    try:
        base = am.model.get_submodule(path)
    except AttributeError:
        raise CheckpointError(f"{directory}: the adapter carries a base weight for {path!r}, "
                              "which this model does not have") from None
    current = getattr(base, "weight", None)
    if current is None or current.shape != weight.shape or not torch.equal(current, weight.to(current.dtype)):
        raise CheckpointError(f"{directory}: the adapter carries a modified base weight for {path!r} "
                              "(a resized or retrained embedding); peftlab imports only LoRA deltas. "
                              "Load the matching base model, or save from peft with "
                              "save_embedding_layers=False")

