"""peftlab checkpoints: `adapter_config.json` + `adapter_model.safetensors`, saved through the
atomic writer (core/files.py) and loaded without unpickling.

Checkpoints. Tensor keys are "<module path>:<tensor name>" (module paths never hold ':'), built and
parsed by `tensor_key` / `parse_tensor_key`. Loading reads JSON and safetensors only: nothing is
unpickled. The record is checked field by field (`check_fields`) and the method config against
its dataclass annotations before anything uses them; a value of the wrong type, an unreadable
path or a damaged file is a CheckpointError naming the file and the field or the OS problem. The
base model's identity recorded at save (class, parameter count, hash of the targeted weights'
shapes) is compared on load, and tensors holding NaN/inf are found: either warns
(CheckpointWarning) or, with `strict=True`, refuses before the model changes.

Files are written through core/files.py, the one atomic writer (see there for what a
crash at any instant leaves).
"""

from __future__ import annotations

import errno
import hashlib
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
from safetensors.torch import save_file

from .errors import (
    AdapterError,
    CapabilityError,
    CheckpointError,
    CheckpointWarning,
    PeftlabError,
)
from .files import commit_files, write_json
from .method import describe_type, get_method, value_fits
from .sites import Site, sites_at

try:
    import fcntl
except ImportError:          # not a POSIX system: switches are not serialised (each stays atomic)
    fcntl = None  # type: ignore[assignment]

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


# ---- the tensors file ------------------------------------------------------------------------
def write_tensors(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
                  ) -> Callable[[Path], None]:
    """A writer of a safetensors file (`metadata`: its string header fields)."""
    def write(path: Path) -> None:
        save_file({k: t.detach().contiguous() for k, t in tensors.items()}, str(path), metadata)
    return write



# ---- reading ----------------------------------------------------------------------------------
def _unreadable(path: Path, e: OSError) -> CheckpointError:
    """What an OS error reading a checkpoint file means, in words, with the fix."""
    if isinstance(e, FileNotFoundError):
        if not path.parent.exists():
            left = sorted(path.parent.parent.glob(f".{path.parent.name}.peftlab-*.old"))
            hint = (f"; an interrupted save left the previous version at {left[-1]}: rename it "
                    f"to {path.parent}" if left else "")
            return CheckpointError(f"{path.parent} does not exist{hint}")
        return CheckpointError(f"{path} does not exist: is {path.parent} an adapter directory "
                               "(written by save_adapter or peftlab train) and complete?")
    if isinstance(e, NotADirectoryError):
        return CheckpointError(f"{path.parent} is a file, not a directory: give the adapter's "
                               "directory")
    if isinstance(e, IsADirectoryError):
        return CheckpointError(f"{path} is a directory, not a file: the adapter directory is "
                               "damaged; save the adapter again")
    if isinstance(e, PermissionError):
        return CheckpointError(f"{path}: permission denied: this user cannot read it (check "
                               "its permissions and its directory's)")
    if e.errno == errno.ELOOP:
        return CheckpointError(f"{path}: a symbolic link loop (a link that points back to "
                               "itself) is in the path: fix the link")
    return CheckpointError(f"{path} cannot be read: {e.strerror or e}")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise _unreadable(path, e) from None


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; a CheckpointError saying what is wrong with the path or file."""
    try:
        data = json.loads(_read_bytes(path))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}); "
                              "the file is damaged: save the adapter again") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text: the file is damaged; save the adapter "
                              "again") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a clear CheckpointError when it is missing or damaged."""
    data = _read_bytes(path)
    try:   # one read and one parse beat per-tensor reads through safe_open (~2.5× here)
        return safetensors.torch.load(data)
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise CheckpointError(f"{path} is truncated or corrupted ({e}); save the adapter again "
                              "or restore the file") from None


_EDITED = "the file is damaged or was edited: save it again"


def check_fields(record: Mapping[str, Any], schema: Mapping[str, Any], source: Path, *,
                 required: Sequence[str] = (), prefix: str = "") -> None:
    """CheckpointError naming `source` and the field when a required field is missing or a
    field's value does not fit its type in `schema` (field -> annotation, see value_fits)."""
    for name in required:
        if name not in record:
            raise CheckpointError(f"{source} lacks the field {prefix + name!r}: the file is "
                                  "damaged or not a complete record; save it again")
    for name, kind in schema.items():
        if name in record and not value_fits(record[name], kind):
            raise CheckpointError(f"{source}: field {prefix + name!r} must be {describe_type(kind)}, "
                                  f"found {record[name]!r:.60}; {_EDITED}")


def non_finite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of the floating-point tensors that hold a NaN or an infinity."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def suspect_tensors(source: Path, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The non-finite-values problem of a loaded tensor file, in words (empty: none)."""
    bad = non_finite_tensors(tensors)
    if not bad:
        return []
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return [f"{source}: tensor(s) {', '.join(bad[:3])}{more} hold NaN or inf values: the adapter "
            "would turn outputs into NaN. Restore a good checkpoint or train again"]


def refuse_if_strict(problems: Sequence[str], strict: bool) -> None:
    """With strict, a CheckpointError listing the problems (call it before the model changes)."""
    if strict and problems:
        raise CheckpointError("; ".join(problems) + " (strict=True refuses it; without strict it "
                              "loads with a warning)")


def warn_of(problems: Sequence[str], stacklevel: int) -> None:
    """A CheckpointWarning per problem, once the load succeeded (`stacklevel`: the caller's)."""
    for problem in problems:
        warnings.warn(problem + " (strict=True refuses such a checkpoint)", CheckpointWarning,
                      stacklevel=stacklevel + 1)


# ---- identity of the base model ---------------------------------------------------------------
_BASE_FIELDS = {"class": str, "name_or_path": str, "num_parameters": int, "site_shapes_sha256": str}
_COMPARED = ("class", "num_parameters", "site_shapes_sha256")   # a path may differ for one model


def base_identity(am: AdaptedModel, sites: Sequence[Site]) -> dict[str, Any]:
    """What an adapter on these sites is made for: class, size, a hash of the sites' weight shapes."""
    shapes = "\n".join(f"{s.path}={list(s.module.weight.shape)}" for s in sites
                       if getattr(s.module, "weight", None) is not None)
    return {
        "class": type(am.model).__name__,
        "name_or_path": getattr(getattr(am.model, "config", None), "_name_or_path", "") or "",
        "num_parameters": am.base_parameters(),
        "site_shapes_sha256": hashlib.sha256(shapes.encode()).hexdigest(),
    }


def _identity_differences(source: Path, recorded: Mapping[str, Any], am: AdaptedModel,
                          site_paths: Sequence[str]) -> list[str]:
    """How this model differs from the one the checkpoint records (empty: it does not)."""
    try:
        by_path = {s.path: s for s in sites_at(am.model, site_paths, am.site_roles())}
    except PeftlabError:
        return []                  # a recorded site is missing: installing says which, as an error
    here = base_identity(am, [by_path[p] for p in site_paths])

    def show(key: str, value: Any) -> str:
        if key == "num_parameters":
            return f"{value:,}"
        return f"{value[:12]}…" if key.endswith("sha256") else value
    diffs = [f"{key}: checkpoint {show(key, recorded[key])}, this model {show(key, here[key])}"
             for key in _COMPARED if key in recorded and recorded[key] != here[key]]
    return [f"{source} was saved from another base model ({'; '.join(diffs)})"] if diffs else []


def _describe_base(base: Mapping[str, Any]) -> str:
    count = base.get("num_parameters")
    counted = f" with {count:,} parameters" if count else ""
    return f"{base.get('class', 'an unrecorded model')}{counted}"


# ---- save / load --------------------------------------------------------------------------------
_RECORD = {"format_version": int, "method": str, "config": dict[str, Any], "sites": list[str],
           "modules_to_save": list[str], "name": str, "peftlab_version": str,
           "base_model": dict[str, Any], "provenance": dict[str, Any] | None}


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
        "base_model": base_identity(am, adapter.sites),
        **({"provenance": adapter.provenance} if adapter.provenance else {}),
    }
    commit_files(directory, {TENSORS_FILE: write_tensors(tensors), CONFIG_FILE: write_json(meta)})
    return directory


def load_adapter(am: AdaptedModel, directory: str | Path, name: str, *,
                 trainable: bool = False, strict: bool = False) -> Adapter:
    """Load a peftlab adapter directory into `am` as `name` (inactive). Every check runs before
    the model changes, so a failed load leaves it as it was. A checkpoint saved from another base
    model (class, parameter count, shapes of the targeted weights), or holding NaN/inf, loads
    with a CheckpointWarning saying so; `strict=True` refuses it (CheckpointError) instead."""
    directory = Path(directory)
    config_file = directory / CONFIG_FILE
    meta = read_json(config_file)
    if meta.get("format") != FORMAT:
        if "peft_type" in meta:
            raise CheckpointError(f"{directory} holds a Hugging Face peft adapter; load it with "
                                  "peftlab.import_peft(am, directory, name)")
        raise CheckpointError(f"{config_file} is not a peftlab adapter config")
    check_fields(meta, _RECORD, config_file, required=("format_version", "method", "config", "sites"))
    check_fields(meta.get("base_model", {}), _BASE_FIELDS, config_file, prefix="base_model.")
    if meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{directory} was written by a newer peftlab (format "
                              f"{meta['format_version']}); upgrade peftlab to load it")
    try:
        method = get_method(meta["method"])
    except PeftlabError as e:
        raise CheckpointError(f"{config_file}, field 'method': {e}") from None
    try:
        config = method.config_cls.from_dict(meta["config"])
    except PeftlabError as e:
        raise CheckpointError(f"{config_file}, field 'config': {e}; {_EDITED}") from None
    sites, copy_paths = meta["sites"], meta.get("modules_to_save", [])
    tensors = read_tensors(directory / TENSORS_FILE)
    problems = (_identity_differences(directory, meta.get("base_model", {}), am, sites)
                + suspect_tensors(directory / TENSORS_FILE, tensors))
    refuse_if_strict(problems, strict)
    site_tensors: dict[tuple[str, str], torch.Tensor] = {}
    copies: dict[str, dict[str, torch.Tensor]] = {path: {} for path in copy_paths}
    for key, t in tensors.items():
        path, tname = parse_tensor_key(key, directory / TENSORS_FILE)
        if path in copies:
            copies[path][tname] = t
        else:
            site_tensors[(path, tname)] = t
    try:
        adapter = am.install(name, config, sites=sites, tensors=site_tensors, copies=copies,
                             trainable=trainable, provenance=meta.get("provenance"))
    except (AdapterError, CapabilityError):
        raise        # the name or the model, not the checkpoint
    except CheckpointError as e:
        raise CheckpointError(
            f"{directory}: {e}. Checkpoint base: {_describe_base(meta.get('base_model', {}))}; "
            f"this model: {type(am.model).__name__} with {am.base_parameters():,}") from None
    except PeftlabError as e:     # its config or sites do not fit this model
        raise CheckpointError(f"{directory}: {e}") from None
    warn_of(problems, stacklevel=3)     # the caller of AdaptedModel.load_adapter
    return adapter
