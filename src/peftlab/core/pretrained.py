"""from_pretrained: an adapter directory -> its base model rebuilt from what the directory records,
wrapped, with the adapter loaded (as peft's AutoPeftModel does, offline).

The base is `model=` when given (a model, or a name or directory), else what the directory names:
peftlab.json's base_model (name or path, transformers class, head size), or a peft adapter's
base_model_name_or_path and task type. A name is looked up in NAMED_MODELS, which peftlab.assets
fills ("smollm2", "minilm" -> their folders); core cannot import assets, a layer above, so the
layer that knows the names registers them here (as methods fill the method registry). Anything
else must be a local transformers directory. The model is built with the recorded class (for a
peft directory, transformers' Auto class of its task type), from local files only; a weight the
folder lacks is an error unless the adapter carries that module (a trained head in
modules_to_save), never a silent random initialisation. A base the record says was loaded with
bitsandbytes (`base_model.quantization`, quantised.py) is loaded quantised the same way again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import CheckpointError, ConfigError
from .io import adapter_directory, base_record

if TYPE_CHECKING:
    from .model import AdaptedModel

# name -> the folder of that model (building it first if needed), registered by peftlab.assets
NAMED_MODELS: dict[str, Callable[[], Path]] = {}


def register_named_model(name: str, folder: Callable[[], Path]) -> None:
    """Let `name` stand for the model in `folder()` wherever a base model is named."""
    NAMED_MODELS[name] = folder


def _fix(option: str) -> str:
    return ("pass the base model with model= (a model, or its directory) or, on the command line, "
            "--model DIR" if option == "model=" else f"pass the base model with {option} DIR")


def base_source(directory: Path, given: str | None = None, *, option: str = "model=") -> str:
    """The name or directory of the base model for the adapter in `directory`: `given`, else
    what the directory records. CheckpointError naming what was looked for, and the fix (the
    `option` that gives the base), when that names nothing on this machine."""
    name = given or base_record(directory)["name_or_path"]
    if not name:
        raise CheckpointError(f"{directory} does not name its base model (it was saved from a model "
                              f"built in memory, with no name or directory): {_fix(option)}")
    if name not in NAMED_MODELS and not Path(name).expanduser().is_dir():
        what = "the given base model" if given else f"{directory} was saved from the base model"
        raise CheckpointError(f"{what} {name!r}, which is neither a model peftlab knows by name "
                              f"({', '.join(NAMED_MODELS) or 'none'}) nor a directory on this "
                              f"machine: {_fix(option)}")
    return name


def _covered(key: str, copies: Sequence[str]) -> bool:
    """Whether a parameter key lies in a module the adapter carries a trained copy of (its
    modules_to_save, by path or, as peft lists them, by name)."""
    parts = key.split(".")
    return any(key.startswith(c + ".") or c in parts[:-1] for c in copies)


def build_base(directory: Path, *, model: str | None = None, dtype: torch.dtype | None = None,
               option: str = "model=") -> tuple[nn.Module, str]:
    """(the base model of the adapter in `directory`, built from local files in eval mode; the
    name or directory it came from). `model`: a name or directory instead of the recorded one;
    `option`: how the caller's users give one (for the error that asks for it)."""
    import transformers

    record = base_record(directory)
    source = base_source(directory, model, option=option)
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": dtype or torch.float32,
                              "output_loading_info": True}
    if record["quantization"] is not None:   # before building the folder: a missing package says so first
        kwargs["quantization_config"] = record["quantization"].loading_config()
    folder = NAMED_MODELS[source]() if source in NAMED_MODELS else Path(source).expanduser()
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        # the recorded class; for a peft adapter its task's Auto class, else the folder's own
        names = (record["class"], record["auto_class"], *(getattr(config, "architectures", None) or ()))
        cls = next((c for c in (getattr(transformers, n or "", None) for n in names)
                    if isinstance(c, type) and hasattr(c, "from_pretrained")), None)
        if cls is None:
            raise CheckpointError(f"{directory} was saved from a {record['class'] or 'model of unrecorded class'}, "
                                  f"which transformers cannot build: {_fix(option)} (a model object)")
        if record["num_labels"] and getattr(config, "num_labels", None) != record["num_labels"]:
            # the head the adapter was trained with: a new one (its trained copy is in the adapter)
            kwargs.update(num_labels=record["num_labels"], ignore_mismatched_sizes=True)
        base, info = cls.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"cannot load the base model {source!r} of {directory} from {folder}: "
                              f"{e}") from None
    fresh = [*(info.get("missing_keys") or ()), *(k for k, *_ in info.get("mismatched_keys") or ())]
    missing = [k for k in fresh if not _covered(k, record["copies"])]
    if missing:
        raise CheckpointError(f"{folder} lacks weights of the {cls.__name__} the adapter in {directory} "
                              f"was trained on ({', '.join(sorted(missing)[:4])}"
                              f"{' ...' if len(missing) > 4 else ''}): they would be random. "
                              f"Is it the right base model? If not, {_fix(option)}")
    return base.eval(), source


def from_pretrained(directory: str | Path, *, trainable: bool = False, dtype: torch.dtype | None = None,
                    model: nn.Module | str | None = None) -> AdaptedModel:
    """The adapter in `directory` (peftlab's, whatever wrote it, or a peft adapter; a run
    directory stands for RUN/last) on its base model, active, in eval mode (train mode and
    trainable with `trainable=True`). The base is rebuilt from the record (an asset name such
    as "smollm2", a local model directory, a peft adapter's base_model_name_or_path) in `dtype`
    (default float32), or `model`: a name or directory instead, or the model itself."""
    from .model import AdaptedModel, adapt  # model.py offers this function as a method

    directory = adapter_directory(directory)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ConfigError(f"dtype must be a torch.dtype such as torch.bfloat16, got {dtype!r}")
    if isinstance(model, nn.Module):
        if isinstance(model, AdaptedModel):
            raise ConfigError("model= takes the base model, not an AdaptedModel: load the adapter "
                              "into it with am.load_adapter(directory, name)")
        if dtype is not None:
            raise ConfigError("dtype= is for a base model that from_pretrained builds; convert the "
                              "model you pass yourself (model.to(dtype))")
        frozen = {p: p.requires_grad for p in model.parameters()}
        am = adapt(model)
        try:
            return _load(am, directory, trainable)
        except BaseException:       # leave the caller's model as it was given
            am.unload()
            for p, flag in frozen.items():
                p.requires_grad_(flag)
            raise
    elif model is None or isinstance(model, (str, Path)):
        base, source = build_base(directory, model=None if model is None else str(model), dtype=dtype)
        am = adapt(base, base_name=source)
    else:
        raise ConfigError(f"model= takes a model, a model name or a directory, got {type(model).__name__}")
    return _load(am, directory, trainable)


def _load(am: AdaptedModel, directory: Path, trainable: bool) -> AdaptedModel:
    name = base_record(directory)["adapter"] or "default"     # peft's name for a peft adapter
    am.load_adapter(directory, name, trainable=trainable)
    am.set_active([name])
    return am.train(trainable)
