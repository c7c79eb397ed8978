"""peftlab adapter directories: saved through the atomic writer (core/files.py), loaded without
unpickling.

Layout (format 2). Every adapter directory holds `peftlab.json`, our record: format version,
method, config, sites, modules_to_save, the base model's identity and name, provenance, and
which file holds the adapter's exact tensors. Where the method has a counterpart in another
library registered as an `Interchange` (peft's: interop/peft_format.py), the directory is ALSO
that library's adapter, for peft `adapter_config.json` + `adapter_model.safetensors`, so peft,
transformers' `load_adapter` and the servers that read peft adapters take it as it is. Where
that encoding gives our tensors back bit for bit (checked at save time by decoding it in
memory) it is the only copy; where it does not (PiSSA's and BA-LoRA's frozen start folded into
rank 2r, LN tuning's deltas written as whole norms, prefix tuning's MLP) our own tensors are
stored too, in `peftlab_model.safetensors`, and loading reads those. A method without a
counterpart gets peftlab.json + peftlab_model.safetensors and no adapter_config.json, so no
tool mistakes the directory for a peft adapter. All files of one save switch in together (one
`commit_files`), which also drops the files of an earlier save that this one does not write.

Loading reads format 2, format 1 (the release before: our record in adapter_config.json, our
keys in adapter_model.safetensors) and a directory of a registered library alone (a peft
adapter, imported through the method's codec).

Checks. Native tensor keys are "<module path>:<tensor name>" (module paths never hold ':'), built
and parsed by `tensor_key` / `parse_tensor_key`. Loading reads JSON and safetensors only:
nothing is unpickled. The record is checked field by field (`check_fields`) and the method
config against its dataclass annotations before anything uses them; a value of the wrong type,
an unreadable path or a damaged file is a CheckpointError naming the file and the field or the
OS problem. The base model's identity recorded at save (class, parameter count, hash of the
targeted weights' shapes) is compared on load, and tensors holding NaN/inf are found: either
warns (CheckpointWarning) or, with `strict=True`, refuses before the model changes.

Files are written through core/files.py, the one atomic writer (see there for what a
crash at any instant leaves).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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
from .geometry import stored_shape
from .method import describe_type, get_method, value_fits
from .quantised import Quantization, model_quantization
from .sites import RowSlice, Site, site_paths, sites_at

try:
    import fcntl
except ImportError:          # not a POSIX system: switches are not serialised (each stays atomic)
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from .model import AdaptedModel, Adapter

FORMAT = "peftlab-adapter"
FORMAT_VERSION = 2
RECORD_FILE = "peftlab.json"                     # our record (format 2)
NATIVE_TENSORS_FILE = "peftlab_model.safetensors"  # our keys, where no interchange file is exact
# Format 1 kept our record and our keys under peft's file names; loading still reads it.
CONFIG_FILE = "adapter_config.json"
TENSORS_FILE = "adapter_model.safetensors"
# The adapter directories `peftlab train --out RUN` writes inside a run directory, in the order
# a run directory stands for them (as `peftlab compose` reads RUN).
RUN_CHECKPOINTS = ("last", "best")


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


def read_bytes(path: Path) -> bytes:
    """The bytes of a file of an adapter directory; a CheckpointError saying what is wrong."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise _unreadable(path, e) from None


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; a CheckpointError saying what is wrong with the path or file."""
    try:
        data = json.loads(read_bytes(path))
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
    data = read_bytes(path)
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
_BASE_FIELDS = {"class": str, "name_or_path": str, "num_parameters": int, "site_shapes_sha256": str,
                "num_labels": int | None, "quantization": dict[str, Any] | None}
_COMPARED = ("class", "num_parameters", "site_shapes_sha256")   # a path may differ for one model


def base_name(am: AdaptedModel) -> str:
    """What the base model is called where it can be found again: the name the AdaptedModel was
    given (an asset name such as "smollm2", or the directory it was loaded from), else the model
    config's `_name_or_path` (transformers' from_pretrained sets it); a directory as an absolute
    path, so that the record means the same from any working directory. "" when unknown (a model
    built from a config in memory)."""
    name = am.base_name or getattr(getattr(am.model, "config", None), "_name_or_path", "") or ""
    return str(Path(name).resolve()) if name and Path(name).is_dir() else name


def base_identity(am: AdaptedModel, sites: Sequence[Site]) -> dict[str, Any]:
    """What an adapter on these sites is made for: class, size, a hash of the sites' weight
    shapes; its name and head size (num_labels), from which from_pretrained rebuilds it."""
    shapes = "\n".join(f"{s.path}={list(stored_shape(s.module))}" for s in sites
                       if not s.params and getattr(s.module, "weight", None) is not None)
    shapes += "".join(f"\n{s.path}.{n}={list(s.module.get_parameter(n).shape)}" for s in sites for n in s.params)
    quantization = model_quantization(am.model)
    return {
        "class": type(am.model).__name__,
        "name_or_path": base_name(am),
        "num_parameters": am.base_parameters(),
        "site_shapes_sha256": hashlib.sha256(shapes.encode()).hexdigest(),
        "num_labels": getattr(getattr(am.model, "config", None), "num_labels", None),
        # a bitsandbytes base: from_pretrained loads it quantised the same way again
        **({"quantization": quantization.to_record()} if quantization is not None else {}),
    }


def _identity_differences(source: Path, recorded: Mapping[str, Any], am: AdaptedModel,
                          site_paths: Sequence[str]) -> list[str]:
    """How this model differs from the one the checkpoint records (empty: it does not)."""
    try:
        here = base_identity(am, sites_at(am.model, site_paths, am.site_roles()))
    except PeftlabError:
        return []                  # a recorded site is missing: installing says which, as an error

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


# ---- other libraries' encodings ------------------------------------------------------------------
@dataclass(frozen=True)
class Encoding:
    """An adapter in another library's layout: its files, and the tensors decoding them gives
    back, (site or module path, tensor name) -> tensor (None: they do not decode)."""

    files: dict[str, Callable[[Path], None]]
    decoded: dict[tuple[str, str], torch.Tensor] | None


@dataclass(frozen=True)
class Interchange:
    """Another library's adapter layout that an adapter directory also holds where the method
    has a counterpart there, so that library reads the directory as its own. Registered by the
    layer that knows the library (peft's by interop/peft_format.py), looked up here: core cannot
    import a layer above it (as with the method registry)."""

    name: str                      # also the record's tensors "layout" when its tensors are exact
    config_file: str               # its config file, which marks its directories
    tensors_file: str
    # encode(am, adapter) -> Encoding; CapabilityError when this adapter has no such encoding
    encode: Callable[[AdaptedModel, Adapter], Encoding]
    # decode(am, directory, method) -> (tensors file, its tensors as stored, the adapter's
    # (site or module path, tensor name) -> tensor); CheckpointError / PeftlabError on a misfit
    decode: Callable[..., tuple[Path, dict[str, torch.Tensor], dict[tuple[str, str], torch.Tensor]]]
    # load(am, directory, name, *, trainable, strict) -> Adapter: a directory of that library alone
    load: Callable[..., Adapter]
    # base(directory) -> what such a directory says of its base model (see `base_record`)
    base: Callable[[Path], dict[str, Any]]
    # read(am, directory, *, strict) -> ReadAdapter: what `load` installs, checked, nothing installed
    read: Callable[..., ReadAdapter] | None = None


INTERCHANGES: dict[str, Interchange] = {}


def register_interchange(interchange: Interchange) -> Interchange:
    """Add (or replace) an interchange layout; saving writes it for every adapter it encodes."""
    INTERCHANGES[interchange.name] = interchange
    return interchange


def adapter_file_names() -> frozenset[str]:
    """Every file name an adapter save may write: a save replaces all of them (drops those it
    does not write), so no earlier save's file outlives it."""
    names = {RECORD_FILE, NATIVE_TENSORS_FILE, CONFIG_FILE, TENSORS_FILE}
    for interchange in INTERCHANGES.values():
        names |= {interchange.config_file, interchange.tensors_file}
    return frozenset(names)


def _same_tensors(a: Mapping[tuple[str, str], torch.Tensor], b: Mapping[tuple[str, str], torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


# ---- save ---------------------------------------------------------------------------------------
_RECORD = {"format_version": int, "method": str, "config": dict[str, Any], "sites": list[str],
           "modules_to_save": list[str], "name": str, "peftlab_version": str,
           "base_model": dict[str, Any], "provenance": dict[str, Any] | None,
           "tensors": dict[str, str], "interchange": dict[str, Any],
           # sites on slices of a fused projection: path -> [{"role": sub-role, "rows": [[start, stop], ...]}]
           "site_slices": dict[str, list[dict[str, Any]]]}


def save_adapter(am: AdaptedModel, directory: str | Path, name: str) -> Path:
    """Save adapter `name` of `am` to `directory` (created if needed) in the layout of the module
    docstring; returns the directory."""
    from .. import __version__
    adapter = am.adapter(name)
    exact = adapter.tensors()
    if any(hasattr(t, "full_tensor") for t in exact.values()):
        # FSDP's shards: reading their values would wait for the other processes, forever
        raise CapabilityError(f"adapter {name!r} is sharded over processes (FSDP): save it inside "
                              "peftlab.training.distributed.gathered_adapter(am, name), entered on "
                              "every process, or let peftlab.train save it (TrainConfig.out)")
    files: dict[str, Callable[[Path], None]] = {}
    tensors: dict[str, str] | None = None
    notes: dict[str, Any] = {}
    for interchange in INTERCHANGES.values():
        try:
            encoding = interchange.encode(am, adapter)
        except CapabilityError as e:     # no counterpart there: said in the record, not an error
            notes[interchange.name] = {"files": [], "why_not": str(e)}
            continue
        files.update(encoding.files)
        lossless = encoding.decoded is not None and _same_tensors(encoding.decoded, exact)
        notes[interchange.name] = {"files": sorted(encoding.files), "exact": lossless}
        if lossless and tensors is None:
            tensors = {"file": interchange.tensors_file, "layout": interchange.name}
    site_slices = {s.path: [sl.to_record() for sl in s.slices] for s in adapter.sites if s.slices}
    if tensors is None:
        files[NATIVE_TENSORS_FILE] = write_tensors({tensor_key(p, n): t for (p, n), t in exact.items()})
        tensors = {"file": NATIVE_TENSORS_FILE, "layout": "peftlab"}
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "peftlab_version": __version__,
        "method": adapter.method.name,
        "name": name,
        "config": adapter.config.to_dict(),
        "sites": site_paths(adapter.sites),
        **({"site_slices": site_slices} if site_slices else {}),
        "modules_to_save": list(adapter.copies),
        "base_model": base_identity(am, adapter.sites),
        "tensors": tensors,
        "interchange": notes,
        **({"provenance": adapter.provenance} if adapter.provenance else {}),
    }
    files[RECORD_FILE] = write_json(record)
    commit_files(directory, files, replaces=adapter_file_names())
    return Path(directory)


# ---- what a directory is --------------------------------------------------------------------------
def is_adapter_directory(path: Path) -> bool:
    """Whether `path` holds an adapter record: peftlab.json, or an adapter_config.json (format 1,
    or another library's adapter)."""
    return any(os.path.lexists(path / f) for f in (RECORD_FILE, CONFIG_FILE))


def adapter_directory(path: str | Path) -> Path:
    """The adapter directory `path` names: itself when it holds an adapter record, else the
    checkpoint `peftlab train` saved in the run directory (`path/last`, then `path/best`).
    Raises CheckpointError naming the path and what is wrong with it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give an adapter directory written by "
                              "am.save_adapter or peftlab train (RUN or RUN/last), or a peft adapter")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not an adapter directory; give the directory "
                              f"that holds {RECORD_FILE} (or a peft adapter's {CONFIG_FILE})")
    if is_adapter_directory(path):
        return path
    for name in RUN_CHECKPOINTS:
        if is_adapter_directory(path / name):
            return path / name
    raise CheckpointError(f"{path} is not an adapter directory: it holds no {RECORD_FILE} or "
                          f"{CONFIG_FILE} (nor {' or '.join(f'{n}/{RECORD_FILE}' for n in RUN_CHECKPOINTS)}); "
                          "give a directory written by am.save_adapter or peftlab train, or a peft adapter")


def read_record(directory: Path) -> tuple[Path, dict[str, Any]] | tuple[Interchange, None]:
    """(record file, checked record) of a peftlab adapter directory (format 2 or 1), or (the
    interchange, None) for a directory of another library alone (a peft adapter)."""
    if os.path.lexists(directory / RECORD_FILE) or not os.path.lexists(directory / CONFIG_FILE):
        record_file = directory / RECORD_FILE        # a missing one: its error names the directory
        meta = read_json(record_file)
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{record_file} is not a peftlab adapter record (its 'format' is "
                                  f"{meta.get('format')!r}, not {FORMAT!r}); {_EDITED}")
    else:
        record_file = directory / CONFIG_FILE
        meta = read_json(record_file)
        if meta.get("format") != FORMAT:
            owner = next((i for i in INTERCHANGES.values() if i.config_file == CONFIG_FILE), None)
            if "peft_type" in meta and owner is not None:
                return owner, None
            raise CheckpointError(f"{record_file} is neither a peftlab adapter record nor a peft "
                                  "adapter config (no 'peft_type')")
    check_fields(meta, _RECORD, record_file, required=("format_version", "method", "config", "sites"))
    check_fields(meta.get("base_model", {}), _BASE_FIELDS, record_file, prefix="base_model.")
    if meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{directory} was written by a newer peftlab (format "
                              f"{meta['format_version']}); upgrade peftlab to load it")
    if meta["format_version"] >= 2:
        check_fields(meta, {}, record_file, required=("tensors",))
        spec = meta["tensors"]
        layouts = {"peftlab": NATIVE_TENSORS_FILE, **{i.name: i.tensors_file for i in INTERCHANGES.values()}}
        if layouts.get(spec.get("layout")) != spec.get("file"):
            raise CheckpointError(f"{record_file}: field 'tensors' is {spec!r:.80}, not one of the "
                                  f"layouts this peftlab reads ({', '.join(layouts)}); {_EDITED}")
    return record_file, meta


def files_read(directory: Path) -> list[Path]:
    """The files `load_adapter` reads for this directory, its record first (reads the record,
    so check the record's size first: `is_adapter_directory` names the candidates)."""
    record_file, meta = read_record(directory)
    if meta is None:                   # another library's directory alone
        return [directory / record_file.config_file, directory / record_file.tensors_file]
    if meta["format_version"] < 2:
        return [record_file, directory / TENSORS_FILE]
    layout = meta["tensors"]["layout"]
    config = [directory / INTERCHANGES[layout].config_file] if layout in INTERCHANGES else []
    return [record_file, *config, directory / meta["tensors"]["file"]]


def base_record(directory: Path) -> dict[str, Any]:
    """What an adapter directory says of its base model, for rebuilding it: "name_or_path" ("" when
    unknown), "class" (transformers class name, or None), "auto_class" (the transformers Auto
    class for another library's task type, or None), "num_labels" (or None), "copies" (module
    paths or names of its modules_to_save), "adapter" (the name it was saved under) and
    "quantization" (the bitsandbytes `Quantization` the base was loaded with, or None)."""
    record_file, meta = read_record(Path(directory))
    if meta is None:
        return {"quantization": None, **record_file.base(Path(directory))}
    base = meta.get("base_model", {})
    return {"name_or_path": base.get("name_or_path", ""), "class": base.get("class"),
            "auto_class": None, "num_labels": base.get("num_labels"),
            "copies": meta.get("modules_to_save", []), "adapter": meta.get("name"),
            "quantization": Quantization.from_record(base.get("quantization"), str(record_file))}


# ---- load ---------------------------------------------------------------------------------------
def read_slices(recorded: Mapping[str, Any], record_file: Path) -> dict[str, tuple[RowSlice, ...]]:
    """The record's `site_slices` as RowSlices per site path; CheckpointError naming the field
    for anything but [{"role": str, "rows": [[start, stop], ...]}, ...] per path."""
    out: dict[str, tuple[RowSlice, ...]] = {}
    for path, items in recorded.items():
        parts = []
        for item in items:
            rows = item.get("rows")
            ok = (set(item) == {"role", "rows"} and isinstance(item["role"], str) and isinstance(rows, list)
                  and rows and all(value_fits(r, list[int]) and len(r) == 2 for r in rows))
            if not ok:
                raise CheckpointError(f"{record_file}, field 'site_slices' of {path!r}: {item!r:.80} is not "
                                      '{"role": sub-role, "rows": [[start, stop], ...]}; ' + _EDITED)
            parts.append(RowSlice(item["role"], tuple((start, stop) for start, stop in rows)))
        out[path] = tuple(parts)
    return out


@dataclass
class ReadAdapter:
    """An adapter directory read and checked as `load_adapter` reads it, before anything is
    installed: its method's config, site paths (and slices), the sites' tensors ((site path,
    tensor name) -> tensor), the modules_to_save copies' state (module path -> state dict), and
    the problems (another base model, NaN/inf) that load with a warning unless strict."""

    method: Any
    config: Any
    sites: list[str]
    slices: dict[str, tuple[RowSlice, ...]]
    tensors: dict[tuple[str, str], torch.Tensor]
    copies: dict[str, dict[str, torch.Tensor]]
    problems: list[str]
    provenance: dict[str, Any] | None = None


def read_adapter(am: AdaptedModel, directory: str | Path, *, strict: bool = False) -> ReadAdapter:
    """What `load_adapter` would install from `directory` (peftlab's format or another registered
    library's), checked as it checks it; nothing changes. CheckpointError for a misfit."""
    directory = Path(directory)
    record_file, meta = read_record(directory)
    if meta is None:
        if record_file.read is None:
            raise CapabilityError(f"{directory}: {record_file.name} directories can only be loaded")
        return record_file.read(am, directory, strict=strict)
    return _read_peftlab(am, directory, record_file, meta, strict)


def _read_peftlab(am: AdaptedModel, directory: Path, record_file: Path, meta: dict[str, Any],
                  strict: bool) -> ReadAdapter:
    """`read_adapter` of a peftlab directory whose record `read_record` gave."""
    try:
        method = get_method(meta["method"])
    except PeftlabError as e:
        raise CheckpointError(f"{record_file}, field 'method': {e}") from None
    try:
        config = method.config_cls.from_dict(meta["config"])
    except PeftlabError as e:
        raise CheckpointError(f"{record_file}, field 'config': {e}; {_EDITED}") from None
    sites, copy_paths = meta["sites"], meta.get("modules_to_save", [])
    slices = read_slices(meta.get("site_slices", {}), record_file)
    spec = meta.get("tensors", {"file": TENSORS_FILE, "layout": "peftlab"})   # format 1: ours
    if spec["layout"] == "peftlab":
        source = directory / spec["file"]
        raw = read_tensors(source)
        found = {parse_tensor_key(key, source): t for key, t in raw.items()}
    else:
        try:   # the recorded sites first, so a misfit reads as from our own tensors file
            sites_at(am.model, sites, am.site_roles(), slices)
            source, raw, found = INTERCHANGES[spec["layout"]].decode(am, directory, method)
        except CheckpointError:
            raise
        except PeftlabError as e:     # a site, or a tensor or field the codec finds, does not fit
            raise CheckpointError(f"{directory}: {e}") from None
    problems = (_identity_differences(directory, meta.get("base_model", {}), am, sites)
                + suspect_tensors(source, raw))
    refuse_if_strict(problems, strict)
    site_tensors: dict[tuple[str, str], torch.Tensor] = {}
    copies: dict[str, dict[str, torch.Tensor]] = {path: {} for path in copy_paths}
    for (path, tname), t in found.items():
        if path in copies:
            copies[path][tname] = t
        else:
            site_tensors[(path, tname)] = t
    return ReadAdapter(method, config, sites, slices, site_tensors, copies, problems,
                       meta.get("provenance"))


def load_adapter(am: AdaptedModel, directory: str | Path, name: str, *,
                 trainable: bool = False, strict: bool = False) -> Adapter:
    """Load an adapter directory into `am` as `name` (inactive): peftlab's (format 2 or 1) or
    another registered library's alone (a peft adapter: imported). Every check runs before the
    model changes, so a failed load leaves it as it was. A checkpoint saved from another base
    model (class, parameter count, shapes of the targeted weights), or holding NaN/inf, loads
    with a CheckpointWarning saying so; `strict=True` refuses it (CheckpointError) instead."""
    directory = Path(directory)
    record_file, meta = read_record(directory)
    if meta is None:
        return record_file.load(am, directory, name, trainable=trainable, strict=strict)
    read = _read_peftlab(am, directory, record_file, meta, strict)
    config, sites, slices, problems = read.config, read.sites, read.slices, read.problems
    site_tensors, copies = read.tensors, read.copies
    try:
        adapter = am.install(name, config, sites=sites, tensors=site_tensors, copies=copies,
                             trainable=trainable, provenance=read.provenance, slices=slices)
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
