"""peftlab checkpoints: `adapter_config.json` + `adapter_model.safetensors`, written atomically.

Tensor keys are "<module path>:<tensor name>" (module paths never hold ':'), built and parsed by
the two functions below. Loading reads JSON and safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
from safetensors.torch import save_file

from .errors import AdapterError, CapabilityError, CheckpointError, PeftlabError
from .method import get_method

if TYPE_CHECKING:
    from .model import AdaptedModel, Adapter

FORMAT = "peftlab-adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
TENSORS_FILE = "adapter_model.safetensors"


def tensor_key(path: str, name: str) -> str:
    return f"{path}:{name}"


def parse_tensor_key(key: str, source: Path) -> tuple[str, str]:
    path, sep, name = key.partition(":")
    if not sep or not path or not name:
        raise CheckpointError(f"{source}: tensor key {key!r} is not '<module path>:<tensor name>'")
    return path, name


# ---- files ------------------------------------------------------------------------------------
def commit_files(directory: Path, writers: Mapping[str, Callable[[Path], None]]) -> None:
    """Write every file to a temporary name beside its target, then rename them into place, so
    an exception or crash while writing leaves the previous files untouched."""
    directory.mkdir(parents=True, exist_ok=True)
    temps: dict[str, Path] = {}
    try:
        for filename, write in writers.items():
            temps[filename] = tmp = directory / f".{filename}.{os.getpid()}.tmp"
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        for filename, tmp in temps.items():
            os.replace(tmp, directory / filename)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


def write_json(data: Any) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return write


def write_tensors(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
                  ) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        save_file({k: t.detach().contiguous() for k, t in tensors.items()}, str(path), metadata)
    return write


def write_text(text: str) -> Callable[[Path], None]:
    """A writer of UTF-8 text (e.g. JSON whose layout the caller chooses). Any function of a
    path is a writer too: a figure's savefig, given its format (the temporary name hides the
    extension)."""
    def write(path: Path) -> None:
        path.write_text(text, encoding="utf-8")
    return write


def commit_directory(target: Path, build: Callable[[Path], None], *,
                     keep_theirs: Callable[[Path], bool] = Path.is_dir) -> None:
    """Build a whole folder with `build(folder)` and rename it into place at `target`.

    For folders whose file names the caller does not choose (a model that `save_pretrained`
    writes), where `commit_files` cannot name the files: the folder is built under a temporary
    name beside `target`, so an interruption never leaves a half-written folder at `target`, and
    a folder already there is replaced. When another process renames its own folder into place
    first, theirs is kept if `keep_theirs(target)` says it is whole."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".building", dir=target.parent))
    old: Path | None = None
    try:
        build(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        if target.exists():   # move it aside first, delete it after the swap
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / target.name)
        try:
            os.rename(tmp, target)
        except OSError:
            if not keep_theirs(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist: is {path.parent} an adapter directory?") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}); "
                              "the file is damaged: save the adapter again") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a clear CheckpointError when it is missing or damaged."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: the adapter directory is incomplete")
    try:   # one read and one parse beat per-tensor reads through safe_open (~2.5× here)
        return safetensors.torch.load(path.read_bytes())
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise CheckpointError(f"{path} is truncated or corrupted ({e}); save the adapter again "
                              "or restore the file") from None


# ---- identity of the base model ---------------------------------------------------------------
def base_identity(am: AdaptedModel, adapter: Adapter) -> dict[str, Any]:
    """What the adapter was made for: class, size, and a hash of the targeted weights' shapes."""
    shapes = "\n".join(f"{s.path}={list(s.module.weight.shape)}" for s in adapter.sites
                       if getattr(s.module, "weight", None) is not None)
    return {
        "class": type(am.model).__name__,
        "name_or_path": getattr(getattr(am.model, "config", None), "_name_or_path", "") or "",
        "num_parameters": am.base_parameters(),
        "site_shapes_sha256": hashlib.sha256(shapes.encode()).hexdigest(),
    }


# ---- save / load --------------------------------------------------------------------------------
def save_adapter(am: AdaptedModel, directory: str | Path, name: str) -> Path:
    """Save adapter `name` of `am` to `directory` (created if needed); returns the directory."""
    from .. import __version__
    adapter = am.adapter(name)
    directory = Path(directory)
    tensors = {tensor_key(p, n): t for (p, n), t in am.adapter_tensors(name).items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "peftlab_version": __version__,
        "method": adapter.method.name,
        "name": name,
        "config": adapter.config.to_dict(),
        "sites": [s.path for s in adapter.sites],
        "modules_to_save": list(adapter.copies),
        "base_model": base_identity(am, adapter),
        **({"provenance": adapter.provenance} if adapter.provenance else {}),
    }
    commit_files(directory, {TENSORS_FILE: write_tensors(tensors), CONFIG_FILE: write_json(meta)})
    return directory


def load_adapter(am: AdaptedModel, directory: str | Path, name: str, *,
                 trainable: bool = False) -> Adapter:
    """Load a peftlab adapter directory into `am` as `name` (inactive). Every check runs before
    the model changes, so a failed load leaves it as it was."""
    directory = Path(directory)
    meta = read_json(directory / CONFIG_FILE)
    if meta.get("format") != FORMAT:
        if "peft_type" in meta:
            raise CheckpointError(f"{directory} holds a Hugging Face peft adapter; load it with "
                                  "peftlab.import_peft(am, directory, name)")
        raise CheckpointError(f"{directory / CONFIG_FILE} is not a peftlab adapter config")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{directory} was written by a newer peftlab (format "
                              f"{meta['format_version']}); upgrade peftlab to load it")
    try:
        config = get_method(meta["method"]).config_cls.from_dict(meta["config"])
        sites, copy_paths = meta["sites"], meta.get("modules_to_save", [])
    except KeyError as e:
        raise CheckpointError(f"{directory / CONFIG_FILE} lacks the field {e}") from None
    except PeftlabError as e:
        raise CheckpointError(f"{directory}: {e}") from None
    tensors = read_tensors(directory / TENSORS_FILE)
    site_tensors: dict[tuple[str, str], torch.Tensor] = {}
    copies: dict[str, dict[str, torch.Tensor]] = {path: {} for path in copy_paths}
    for key, t in tensors.items():
        path, tname = parse_tensor_key(key, directory / TENSORS_FILE)
        if path in copies:
            copies[path][tname] = t
        else:
            site_tensors[(path, tname)] = t
    try:
        return am.install(name, config, sites=sites, tensors=site_tensors, copies=copies,
                          trainable=trainable, provenance=meta.get("provenance"))
    except (AdapterError, CapabilityError):
        raise        # the name or the model, not the checkpoint
    except CheckpointError as e:
        base = meta.get("base_model", {})
        raise CheckpointError(
            f"{directory}: {e}. Checkpoint base: {base.get('class')} with "
            f"{base.get('num_parameters', 0):,} parameters; this model: {type(am.model).__name__} "
            f"with {am.base_parameters():,}") from None
    except PeftlabError as e:     # its config or sites do not fit this model
        raise CheckpointError(f"{directory}: {e}") from None
