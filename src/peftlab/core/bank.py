"""AdapterBank: saved adapters served from one AdaptedModel, loaded on first use, evicted LRU.

    bank = AdapterBank(am, "adapters/", max_adapters=8)   # adapters/<name>/ (or <name>/last)
    with bank.using(["sentiment", "shakespeare"]):       # loaded if needed, pinned, locked
        ...                                               # run the model with them
    bank.load("extra", "runs/x/last"); bank.unload("extra")

Adapters are attached to and removed from the one model in place (`load_adapter` /
`delete_adapter`), so memory holds the base model plus the loaded adapters only.

Every change keeps the bank and the model in step: a name is in `loaded()` exactly when the
model holds that adapter. A load that fails changes nothing (it evicts nothing either), and a
failed replace leaves the old adapter serving.
"""

from __future__ import annotations

import os
import stat
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from .attach import Adapter
from .errors import AdapterError, CheckpointError, close_matches
from .io import CONFIG_FILE, RECORD_FILE, adapter_directory, files_read
from .model import AdaptedModel
from .sites import site_paths

# Size limits checked before a file is read. A config is a few KB even with a long compose
# provenance. A parameter-efficient adapter is a small part of its base model, so by default
# its tensors may take at most half the base model's bytes (at least 64 MiB for tiny models).
MAX_CONFIG_BYTES = 2**20
MIN_ADAPTER_BYTES_LIMIT = 64 * 2**20


class UnknownAdapterError(AdapterError):
    """No adapter of this name is loaded, registered or on disk; `close` holds look-alikes."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        known = sorted(set(known))
        self.name = name
        self.close = close_matches(name, known) if name else []
        hint = f"; did you mean {', '.join(map(repr, self.close))}?" if self.close else ""
        shown = ", ".join(known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20 else "")
        super().__init__(f"no adapter {name!r}{hint} Known adapters: {shown or 'none'}")


class BankFullError(AdapterError):
    """Every loaded adapter is pinned by the running batch, so none can make room."""


def scan_adapters(directory: Path) -> dict[str, Path]:
    """The adapters in a folder of adapters, name -> adapter directory: DIR/NAME, or the
    checkpoint of a run directory DIR/NAME/last; folders that hold none are skipped."""
    found: dict[str, Path] = {}
    for child in sorted(directory.iterdir()):
        if child.is_dir() and valid_name(child.name):
            try:
                found[child.name] = adapter_directory(child)
            except CheckpointError:
                continue   # an unrelated folder: not an adapter
    return found


def default_adapter_bytes_limit(am: AdaptedModel) -> int:
    """Half the base model's parameters and buffers in bytes, at least MIN_ADAPTER_BYTES_LIMIT:
    the default largest tensors file an AdapterBank loads."""
    tensors = [*am.model.parameters(), *am.model.buffers()]
    return max(MIN_ADAPTER_BYTES_LIMIT, sum(t.numel() * t.element_size() for t in tensors) // 2)


def _installed(adapter: Adapter) -> dict[str, Any]:
    """The arguments of `AdaptedModel.install` that put `adapter` in again as it is now, from
    its tensors in memory (references: install copies them into fresh modules)."""
    return {"config": adapter.config, "sites": site_paths(adapter.sites),
            "tensors": {(path, tname): t for path, part in adapter.parts().items()
                        for tname, t in part.state_dict().items()},
            "copies": {path: wrapper.copies[adapter.name].state_dict()
                       for path, wrapper in adapter.copies.items()},
            "provenance": adapter.provenance,
            "slices": {s.path: s.slices for s in adapter.sites if s.slices} or None}


def valid_name(name: object) -> bool:
    """Whether `name` can name an adapter (AdaptedModel's rule). Such a name holds no '/' or
    '.', so DIR/<name> never leaves DIR, and no control characters (it is logged and listed)."""
    return (isinstance(name, str) and bool(name) and not any(c in name for c in ".:/\\ ")
            and name.isprintable()
            and not hasattr(nn.ModuleDict(), name))


class AdapterBank:
    """Named adapters of one AdaptedModel: found in `directory` (`DIR/<name>/`, or a run
    directory `DIR/<name>/last`) or registered by path, loaded when first used, and evicted
    least-recently-used first once `max_adapters` are loaded.

    Thread-safe with two locks. Changes (loading, evicting, replacing) hold the re-entrant
    model lock, and `using` holds it for its whole block, because attaching or deleting an
    adapter rewires layers that a running forward reads: changes wait for the batch in flight.
    Look-ups (`loaded`, `available`, `path_of`) take only a short lock over the name tables, so
    a server's request handlers never wait for a batch.
    """

    def __init__(self, am: AdaptedModel, directory: str | Path | None = None, *,
                 max_adapters: int = 8, paths: Mapping[str, str | Path] | None = None,
                 max_adapter_bytes: int | None = None) -> None:
        for setting, value in (("max_adapters", max_adapters), ("max_adapter_bytes", max_adapter_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise AdapterError(f"{setting} must be an integer >= 1, got {value!r}")
        self.am = am
        self.directory = None if directory is None else Path(directory).expanduser()
        if self.directory is not None and not self.directory.is_dir():
            raise CheckpointError(f"adapter directory {self.directory} does not exist or is not a "
                                  "directory; give the folder that holds one sub-folder per adapter")
        self.max_adapters = max_adapters
        # The largest tensors file loaded, checked before reading it.
        self.max_adapter_bytes = max_adapter_bytes or default_adapter_bytes_limit(am)
        self._lock = threading.RLock()        # the model: held while changing it or running it
        self._tables = threading.Lock()       # the name tables below: held briefly
        self._registered: dict[str, Path] = {}
        self._loaded: OrderedDict[str, Path] = OrderedDict()   # least recently used first
        self._pins: Counter[str] = Counter()
        self.loads = self.evictions = 0       # adapters loaded; evicted to make room (not unloads)
        for name, path in (paths or {}).items():
            self._check_name(name)
            self._registered[name] = adapter_directory(path)

    # ---- what there is ----------------------------------------------------------------------------
    def loaded(self) -> list[str]:
        """Names of the loaded adapters, least recently used first."""
        with self._tables:
            return list(self._loaded)

    def available(self) -> dict[str, Path]:
        """Every adapter that can be served, name -> adapter directory: those on disk under
        `directory` (read afresh, so adapters copied there while serving appear), then the
        registered ones (which win over a same-named folder)."""
        found = scan_adapters(self.directory) if self.directory is not None else {}
        with self._tables:
            found.update(self._registered)
            for name, path in self._loaded.items():   # loaded ones whose folder went away
                found.setdefault(name, path)
        return found

    def path_of(self, name: str) -> Path:
        """The adapter directory that `name` loads from; UnknownAdapterError (with close names)
        when there is none."""
        with self._tables:
            known = self._registered.get(name) or self._loaded.get(name)
        if known is not None:
            return known
        if valid_name(name) and self.directory is not None:
            try:
                return adapter_directory(self.directory / name)
            except CheckpointError:
                pass
        raise UnknownAdapterError(name, self.available())

    # ---- changing what is loaded ------------------------------------------------------------------
    def load(self, name: str, path: str | Path | None = None, *, replace: bool = False,
             check_path: Callable[[Path], None] | None = None) -> Path:
        """Load adapter `name` now, from `path` (which registers it under that name) or from
        where the bank finds it; returns its directory. A loaded `name` is an error unless
        `replace`, which swaps in the adapter at `path`; when that fails, the old one serves on
        and the error says why the new one failed. Files above the size limits are refused
        before they are read (`max_adapter_bytes`). `check_path` (a server's confinement) is
        called on the adapter directory and on every file the load reads, before the file is
        read; what it raises refuses the load before anything changes."""
        self._check_name(name)
        with self._lock:
            source = adapter_directory(path) if path is not None else self.path_of(name)
            if check_path is not None:
                self._check_files(source, check_path)
            if self._held(name):
                if not replace:
                    raise AdapterError(f"adapter {name!r} is already loaded (from "
                                       f"{self._loaded[name]}); unload it first or replace it")
                self._swap(name, source)
            else:
                self._ensure(name, source)
            if path is not None:
                with self._tables:
                    self._registered[name] = source
            return source

    def unload(self, name: str) -> bool:
        """Free adapter `name` (and forget a path it was registered with; one on disk stays
        available). Returns whether it was loaded."""
        with self._lock:
            if name not in self._loaded and name not in self._registered:
                self.path_of(name)   # UnknownAdapterError unless it is on disk
                return False
            if self._pins[name]:
                raise AdapterError(f"adapter {name!r} is in use by the running batch; unload it "
                                   "after the batch")
            with self._tables:
                self._registered.pop(name, None)
            if name not in self._loaded:
                return False
            self._evict(name)
            return True

    @contextmanager
    def using(self, names: Iterable[str | None]) -> Iterator[None]:
        """Within the block these adapters (None = the base model, skipped) are loaded and
        pinned, and nothing else can change the model. Raises BankFullError when they number
        more than `max_adapters`."""
        wanted = list(dict.fromkeys(n for n in names if n is not None))
        if len(wanted) > self.max_adapters:
            raise BankFullError(f"a batch needs {len(wanted)} adapters but the bank holds at most "
                                f"{self.max_adapters}; split the batch or raise max_adapters")
        with self._lock:
            pinned: list[str] = []
            try:
                for name in wanted:
                    self._ensure(name, None)
                    self._pins[name] += 1      # pinned before the next load can evict it
                    pinned.append(name)
                yield
            finally:
                for name in pinned:
                    self._pins[name] -= 1
                self._pins += Counter()        # drops the zero counts

    # ---- internals (called with the model lock held) ----------------------------------------------
    def _ensure(self, name: str, source: Path | None) -> None:
        """Mark `name` most recently used, loading it (from `source` or where it is found) when
        the model does not hold it, and then evicting the least recently used unpinned adapter
        when the bank is over capacity. The load comes first, so that a load that fails (a
        broken or foreign adapter) evicts nothing: for a moment the model holds one adapter
        more than `max_adapters`."""
        if self._held(name):
            with self._tables:
                self._loaded.move_to_end(name)
            return
        source = source if source is not None else self.path_of(name)
        victims = self._victims(name, len(self._loaded) + 1 - self.max_adapters)
        self._check_files(source)
        self.am.load_adapter(source, name)
        with self._tables:
            self._loaded[name] = source
        self.loads += 1
        for victim in victims:
            self._evict(victim)
            self.evictions += 1

    def _held(self, name: str) -> bool:
        """Whether `name` is loaded. An entry whose adapter was deleted from the model behind
        the bank's back is dropped first: the model is the truth, so the adapter loads again
        when asked for rather than its name failing until a restart."""
        if name in self._loaded and name not in self.am.adapters:
            self._forget(name)
        return name in self._loaded

    def _victims(self, name: str, count: int) -> list[str]:
        """The `count` least recently used unpinned adapters, to evict for `name`; BankFullError
        (before anything changes) when too many are pinned."""
        free = [n for n in self._loaded if not self._pins[n]]
        if count > len(free):
            raise BankFullError(f"all {self.max_adapters} loaded adapters are in use by the "
                                f"running batch, so {name!r} cannot be loaded; raise max_adapters")
        return free[:max(count, 0)]

    def _swap(self, name: str, source: Path) -> None:
        """Replace loaded adapter `name` by the one at `source`. The new one loads under a
        spare name first, while the old one stays in place: any failure there (missing,
        broken, made for another model) leaves the old one serving and raises the new one's
        error. Only then is the old one taken out and the new one put in under `name` from
        the tensors already in memory, so no step of the swap reads the disk again."""
        if self._pins[name]:
            raise AdapterError(f"adapter {name!r} is in use by the running batch; replace it after "
                               "the batch")
        self._check_files(source)
        spare = self._spare_name(name)
        self.am.load_adapter(source, spare)
        try:
            old = _installed(self.am.adapter(name))
            new = _installed(self.am.adapter(spare))
            self.am.delete_adapter(name)
            try:
                self.am.install(name, **new)
            except BaseException:
                try:   # what was validated and served a moment ago
                    self.am.install(name, **old)
                except BaseException:
                    self._forget(name)   # out of memory, say: gone from both, never a zombie
                    raise
                raise
        finally:
            self.am.delete_adapter(spare)
        with self._tables:
            self._loaded[name] = source
            self._loaded.move_to_end(name)
        self.loads += 1

    def _spare_name(self, name: str) -> str:
        spare, n = f"{name}_replacing", 1
        while spare in self.am.adapters:
            spare, n = f"{name}_replacing{n}", n + 1
        return spare

    def _check_files(self, directory: Path, check_path: Callable[[Path], None] | None = None) -> None:
        """CheckpointError unless the files a load of `directory` reads are regular files within
        the size limits: its record first (peftlab.json, or a peft adapter's adapter_config.json),
        then the files the record names. Checked with stat before a byte of a file is read, so
        that a huge file (or a device, or a pipe) is refused at once instead of being read whole
        first. `check_path`, when given, judges the directory and each file before that."""
        if check_path is not None:
            check_path(directory)
        for name in (RECORD_FILE, CONFIG_FILE):
            if os.path.lexists(directory / name):
                if check_path is not None:
                    check_path(directory / name)
                self._check_file(directory / name)
        for path in files_read(directory):
            if check_path is not None:
                check_path(path)
            self._check_file(path)

    def _check_file(self, path: Path) -> None:
        json_file = path.suffix == ".json"
        limit, setting = ((MAX_CONFIG_BYTES, "MAX_CONFIG_BYTES") if json_file
                          else (self.max_adapter_bytes, "max_adapter_bytes"))
        try:
            info = path.stat()
        except FileNotFoundError:
            raise CheckpointError(f"{path} does not exist: the adapter directory is "
                                  "incomplete") from None
        except OSError as e:
            raise CheckpointError(f"{path} cannot be read ({e.strerror})") from None
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{path} is not a regular file; an adapter directory holds its "
                                  f"record ({RECORD_FILE} or {CONFIG_FILE}) and tensors as plain files")
        if not os.access(path, os.R_OK):
            raise CheckpointError(f"{path} cannot be read (permission denied)")
        if info.st_size > limit:
            raise CheckpointError(
                f"{path} is {info.st_size:,} bytes, above this bank's limit of {limit:,} "
                f"({setting}); no adapter for this model should be that large: check the "
                "path, or raise the limit")

    def _evict(self, name: str) -> None:
        if name in self.am.adapters:   # unless deleted behind the bank's back
            self.am.delete_adapter(name)
        self._forget(name)

    def _forget(self, name: str) -> None:
        with self._tables:
            del self._loaded[name]

    @staticmethod
    def _check_name(name: object) -> None:
        if not valid_name(name):
            raise AdapterError(f"adapter name {name!r} is not usable: give a non-empty string "
                               "without '.', ':', '/', '\\', spaces or control characters that "
                               "is no torch module attribute (e.g. 'sentiment_v2')")
