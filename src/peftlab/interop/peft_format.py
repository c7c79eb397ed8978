"""Hugging Face `peft` adapter directories (shared/specs/peft-format.md), both directions.

This is the dispatch only: it writes and reads the directory (`adapter_config.json` and
`adapter_model.safetensors`, atomically, through core/io's writer and validated readers), the
header every peft config shares and the modules_to_save copies, and finds the method by
`peft_type` in the registry. It registers peft's layout with core/io.py as an `Interchange`, so
that every adapter directory peftlab saves is also a peft adapter where peft has the method, and
peft directories load (and name their base model) wherever peftlab takes an adapter directory. Reading checks the types of the peft config fields the codecs
read (PEFT_FIELDS) before a codec sees them, and warns of tensors holding NaN/inf (strict:
refuses). What a method's tensors and config fields look like in peft is its own codec,
`Method.to_peft` / `from_peft`, in its method file (LoRA's in methods/lora.py).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..core.errors import AdapterError, CapabilityError, CheckpointError, PeftlabError
from ..core.files import commit_files, write_json
from ..core.io import (
    Encoding,
    Interchange,
    ReadAdapter,
    base_name,
    check_fields,
    read_json,
    read_tensors,
    refuse_if_strict,
    register_interchange,
    suspect_tensors,
    warn_of,
    write_tensors,
)
from ..core.method import METHODS, Method
from ..core.model import AdaptedModel, Adapter
from ..core.sites import site_paths
from .peft_names import (
    AUTO_CLASSES,
    CONFIG_FILE,
    PEFT_REFUSED_SSM_MODULES,
    PEFT_SSM_MODEL_TYPES,
    PEFT_VERSION,
    PREFIX,
    PROMPT_LEARNING_PREFIX,
    TENSORS_FILE,
    task_type,
)

# The types (as peft's config classes declare them, numbers as JSON has them) of the fields the
# codecs read; a file whose field has another type is refused before a codec converts it.
PEFT_FIELDS: dict[str, Any] = {
    "peft_type": str, "task_type": str | None, "base_model_name_or_path": str | None,
    "inference_mode": bool, "modules_to_save": list[str] | None,
    "target_modules": list[str] | str | None, "target_parameters": list[str] | None,
    "layers_to_transform": list[int] | int | None,
    "r": int, "lora_alpha": float, "lora_dropout": float, "use_rslora": bool, "use_dora": bool,
    "fan_in_fan_out": bool, "bias": str, "init_lora_weights": bool | str,
    "rank_pattern": dict[str, int] | None, "alpha_pattern": dict[str, float] | None,
    "feedforward_modules": list[str] | str | None,
    "num_virtual_tokens": int, "token_dim": int | None, "num_transformer_submodules": int | None,
    "num_attention_heads": int | None, "num_layers": int | None,
    "encoder_hidden_size": int | None, "prefix_projection": bool,
}


def peft_files(am: AdaptedModel, adapter: Adapter, base_model_name_or_path: str | None = None
               ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json's fields, adapter_model.safetensors' tensors) of `adapter` in peft's
    layout; CapabilityError for a method without a peft equivalent."""
    method = adapter.method
    if method.to_peft is None:
        exportable = ", ".join(m.title for m in METHODS.values() if m.to_peft)
        raise CapabilityError(f"{method.title} has no peft equivalent; peft export supports {exportable}")
    _check_peft_accepts(am, adapter)
    fields, tensors = method.to_peft(am, adapter)
    peft_config: dict[str, Any] = {
        "peft_type": method.peft_type,
        "task_type": task_type(am.model, head_in_file=bool(adapter.copies)),
        "base_model_name_or_path": base_model_name_or_path or base_name(am) or None,
        "inference_mode": True,
        "peft_version": PEFT_VERSION,
        **fields,
    }
    # peft's prompt-learning models wrap the model itself, so their copies sit under 'base_model.'
    copy_prefix = PROMPT_LEARNING_PREFIX if method.build_hook is not None else PREFIX
    for path, wrapper in adapter.copies.items():
        for pname, t in wrapper.copies[adapter.name].state_dict().items():
            tensors[f"{copy_prefix}{path}.{pname}"] = t
    return peft_config, tensors


def _check_peft_accepts(am: AdaptedModel, adapter: Adapter) -> None:
    """CapabilityError when peft would refuse to load this adapter: LoRA-like adapters on the
    modules peft bars in Mamba-type models (peft_names.PEFT_REFUSED_SSM_MODULES)."""
    model_type = getattr(getattr(am.model, "config", None), "model_type", None)
    if adapter.method.peft_type != "LORA" or model_type not in PEFT_SSM_MODEL_TYPES:
        return
    barred = [s.path for s in adapter.sites if s.path.rsplit(".", 1)[-1] in PEFT_REFUSED_SSM_MODULES]
    if barred:
        raise CapabilityError(
            f"peft refuses LoRA on {', '.join(sorted(PEFT_REFUSED_SSM_MODULES))} of {model_type} models "
            f"(its CUDA kernel reads their weights directly), and this adapter adapts {barred[0]!r}"
            f"{f' and {len(barred) - 1} more' if len(barred) > 1 else ''}: it has no peft form (peftlab "
            "runs it through the layer's forward); exclude those layers for a peft-loadable adapter")


def _writers(peft_config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {TENSORS_FILE: write_tensors(tensors, {"format": "pt"}), CONFIG_FILE: write_json(peft_config)}


def export_peft(am: AdaptedModel, name: str, directory: str | Path, *,
                base_model_name_or_path: str | None = None) -> Path:
    """Write adapter `name` as a peft directory that `peft.PeftModel.from_pretrained` loads (only
    peft's two files; `am.save_adapter` writes them too, beside peftlab.json); CapabilityError for
    a method without a peft equivalent."""
    directory = Path(directory)
    commit_files(directory, _writers(*peft_files(am, am.adapter(name), base_model_name_or_path)))
    return directory


def import_peft(am: AdaptedModel, directory: str | Path, name: str, *,
                trainable: bool = False, strict: bool = False) -> Adapter:
    """Load a peft adapter directory into `am` as adapter `name` (inactive). CapabilityError for
    a peft_type peftlab does not import; CheckpointError (naming the directory) for a file that
    does not fit the model or a config field of the wrong type; either way the model is left as
    it was. Tensors holding NaN/inf load with a CheckpointWarning (strict=True: refused)."""
    directory = Path(directory)
    read = read_peft(am, directory, strict=strict)
    try:
        adapter = am.install(name, read.config, sites=read.sites, tensors=read.tensors,
                             copies=read.copies, trainable=trainable)
    except (AdapterError, CapabilityError):
        raise        # the name or the model, not the checkpoint
    except PeftlabError as e:
        raise CheckpointError(f"{directory}: {e}") from None
    warn_of(read.problems, stacklevel=2)
    return adapter


def read_peft(am: AdaptedModel, directory: str | Path, *, strict: bool = False) -> ReadAdapter:
    """What `import_peft` installs from a peft directory, checked as it checks it (core/io.py's
    `read_adapter` for peft directories); nothing changes."""
    directory = Path(directory)
    cfg = read_json(directory / CONFIG_FILE)
    check_fields(cfg, PEFT_FIELDS, directory / CONFIG_FILE)
    peft_type = cfg.get("peft_type")
    method = next((m for m in METHODS.values() if m.peft_type == peft_type and m.from_peft), None)
    if method is None:
        known = [m.peft_type for m in METHODS.values() if m.from_peft]
        raise CapabilityError(f"{directory}: peft_type {peft_type!r} is not imported; peftlab "
                              f"imports {', '.join(known)}")
    tensors = read_tensors(directory / TENSORS_FILE)
    problems = suspect_tensors(directory / TENSORS_FILE, tensors)
    refuse_if_strict(problems, strict)
    try:
        config, sites, site_tensors = method.from_peft(am, cfg, tensors, directory)
        config.check_types()
        config.validate()
        # the codec returns modules_to_save tensors too, keyed by the copied module's path
        copies: dict[str, dict[str, torch.Tensor]] = {p: {} for p in config.modules_to_save or []}
        for path, tname in [k for k in site_tensors if k[0] in copies]:
            copies[path][tname] = site_tensors.pop((path, tname))
    except (AdapterError, CapabilityError):
        raise        # the name or the model, not the checkpoint
    except PeftlabError as e:
        raise CheckpointError(f"{directory}: {e}") from None
    return ReadAdapter(method, config, site_paths(sites), {}, site_tensors, copies, problems)


# ---- the peft layout inside every adapter directory (core/io.py's Interchange) -------------------
def _encode(am: AdaptedModel, adapter: Adapter) -> Encoding:
    """peft's files of `adapter`, and what the method's codec decodes from them (None where it
    has no decoder or refuses them), so that saving knows whether they hold our exact tensors."""
    peft_config, tensors = peft_files(am, adapter)
    decoded = None
    if adapter.method.from_peft is not None:
        with contextlib.suppress(PeftlabError):
            decoded = adapter.method.from_peft(am, peft_config, tensors, Path(CONFIG_FILE))[2]
    return Encoding(_writers(peft_config, tensors), decoded)


def _read(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg = read_json(directory / CONFIG_FILE)
    check_fields(cfg, PEFT_FIELDS, directory / CONFIG_FILE)
    return cfg, read_tensors(directory / TENSORS_FILE)


def _decode(am: AdaptedModel, directory: Path, method: Method
            ) -> tuple[Path, dict[str, torch.Tensor], dict[tuple[str, str], torch.Tensor]]:
    """The adapter's tensors from a peftlab directory's peft files, through its method's codec."""
    if method.from_peft is None:
        raise CheckpointError(f"{directory}: {method.title} adapters cannot be read from peft's files "
                              f"(the record says they hold its tensors); {CONFIG_FILE} was edited?")
    cfg, tensors = _read(directory)
    return directory / TENSORS_FILE, tensors, method.from_peft(am, cfg, tensors, directory)[2]


def _base(directory: Path) -> dict[str, Any]:
    """What a peft adapter directory says of its base model (see core.io.base_record): its
    base_model_name_or_path, the Auto class of its task type, and the head size its trained head
    copy (modules_to_save) has in the file."""
    cfg = read_json(directory / CONFIG_FILE)
    check_fields(cfg, PEFT_FIELDS, directory / CONFIG_FILE)
    copies = cfg.get("modules_to_save") or []
    num_labels = None
    if cfg.get("task_type") in ("SEQ_CLS", "TOKEN_CLS") and copies:
        try:
            with safe_open(str(directory / TENSORS_FILE), framework="pt") as f:   # the header only
                shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        except Exception:       # a damaged file: loading it names the problem
            shapes = {}
        # the head's last Linear ('classifier', 'score', RoBERTa's 'classifier.out_proj') gives
        # one row per label
        rows = [shape[0] for key, shape in sorted(shapes.items()) for c in copies
                if key.endswith((f".{c}.weight", f".{c}.out_proj.weight")) and len(shape) == 2]
        num_labels = rows[0] if rows else None
    return {"name_or_path": cfg.get("base_model_name_or_path") or "", "class": None,
            "auto_class": AUTO_CLASSES.get(cfg.get("task_type")), "num_labels": num_labels,
            "copies": copies, "adapter": None}


register_interchange(Interchange(name="peft", config_file=CONFIG_FILE, tensors_file=TENSORS_FILE,
                                 encode=_encode, decode=_decode, load=import_peft, base=_base,
                                 read=read_peft))
