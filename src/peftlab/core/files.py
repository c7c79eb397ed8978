"""The one atomic writer: every file peftlab writes goes through `commit_files` or
`commit_directory`.

Writing: `commit_files(directory, {name: writer})` and `commit_directory(target, build)`.
- One file (run.json, a compare cell, a prune plan, a debias patch): written under a temporary
  name in its directory, fsynced, renamed over the target with one os.replace, then the
  directory is fsynced. A reader sees the old file or the new one.
- Several files (an adapter directory; peft reads those exact names, so no manifest or
  content-addressed names): a complete new directory is built beside the target, the target's
  other entries (a README, run.json, a prune plan) are hard-linked into it (copied where links
  fail) except the files the commit `replaces` (an earlier save's peft files, which this
  version does not have), and it is exchanged with the target in ONE step, Linux renameat2(RENAME_EXCHANGE); the
  old version, now under the temporary name, is deleted. A crash at any instant leaves the old
  directory or the new one, never a mix. Where the kernel or file system refuses
  RENAME_EXCHANGE (Linux before 3.15, some network and FUSE file systems, other systems) the
  switch is two renames, target -> aside and new -> target: still never a mix, but a crash
  between them leaves no directory at the target, the old version whole beside it
  (`.NAME.peftlab-….old`, named by the error of a load), which the next save puts back first.
  A process whose working directory is the swapped directory keeps the old one (deleted): this
  process is moved to the new one; others see what `cd .` gives them.
- Switches are serialised among peftlab writers by an exclusive flock on the parent directory,
  and a one-file commit into a directory takes the same lock to rename, so threads and processes
  saving into one directory all succeed (the last switch wins) and no committed file is lost to a
  concurrent swap. Entries another program adds to the directory during a switch are moved into
  the new version after it.
- Temporary names carry the writer (a hash of host name and pid namespace, the boot, the pid and
  the process start time) and a thread id and counter: unique per thread, and a later commit can
  tell leftovers of dead writers (a crash, SIGKILL, a reboot) from those of live ones. Every commit
  first deletes dead writers' leftovers in the directories it writes; those of live writers, and
  those of other machines or containers (no way to tell), are kept.
- Files get 0o666 less the process umask (safetensors alone leaves 0o600); a new directory
  0o777 less the umask, a swapped-in one the mode of the directory it replaces.
- `_fault_point(name, detail)` marks each step (listed in FAULT_POINTS); when the environment
  variable PEFTLAB_FAULT names a point ("swapped") or a point and file ("written:run.json"), the
  process SIGKILLs itself there: the crash test (tests/test_reliability_io.py) kills at each one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import CheckpointError

try:
    import fcntl
except ImportError:          # not a POSIX system: switches are not serialised (each stays atomic)
    fcntl = None  # type: ignore[assignment]


# ---- fault injection --------------------------------------------------------------------------
FAULT_ENV = "PEFTLAB_FAULT"
# Every step of a commit, in order. ':FILE' points fire per file ("written" alone: the first).
FAULT_POINTS = ("written:FILE", "synced:FILE", "replaced:FILE", "carried", "new-dir-synced",
                "aside", "swapped", "dir-synced", "cleaned")


def _fault_point(point: str, detail: str = "") -> None:
    """Kill this process (SIGKILL: no clean-up runs) when PEFTLAB_FAULT names this step."""
    spec = os.environ.get(FAULT_ENV)
    if spec and (spec == point or spec == f"{point}:{detail}"):
        os.kill(os.getpid(), signal.SIGKILL)


# ---- temporary names and their writers --------------------------------------------------------
def _read_proc(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _process_state(pid: int) -> tuple[str, str] | None:
    """(state letter, start time in clock ticks since boot) of a process; None when it is gone."""
    stat = _read_proc(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rpartition(")")[2].split()     # the command name may hold spaces and ')'
    return fields[0], fields[19]


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


_PROC = _process_state(os.getpid()) is not None     # Linux: liveness and start times from /proc
# Pids are only comparable within one machine and pid namespace (a container): others are kept.
_HOST = hashlib.sha256(f"{socket.gethostname()}:{_pid_namespace()}".encode()).hexdigest()[:8]
_BOOT = (_read_proc("/proc/sys/kernel/random/boot_id") or "0").strip().replace("-", "")[:8]
_TEMP = re.compile(r"\.peftlab-([0-9a-f]{8})-(\w+)-(\d+)-(\d+)-\d+-\d+\.(?:tmp|new|old)$")
_SEQUENCE = itertools.count()
_writer: tuple[int, str] = (-1, "")


def temp_name(stem: str, kind: str) -> str:
    """A hidden name for a temporary entry beside `stem`, unique to this thread, that tells a
    later commit which writer made it: '.STEM.peftlab-HOST-BOOT-PID-START-THREAD-N.KIND'.
    `kind`: 'tmp' (a file being written), 'new' (a directory being built), 'old' (swapped out)."""
    global _writer
    pid = os.getpid()
    if _writer[0] != pid:                           # first use, or a forked child
        state = _process_state(pid) if _PROC else None
        _writer = (pid, f"{_HOST}-{_BOOT}-{pid}-{state[1] if state else 0}")
    return f".{stem}.peftlab-{_writer[1]}-{threading.get_native_id()}-{next(_SEQUENCE)}.{kind}"


def _writer_gone(match: re.Match[str]) -> bool:
    """Whether the writer that named this temporary entry is dead (never guessed: unknown = alive)."""
    host, boot, pid, start = match.groups()
    if host != _HOST:
        return False                                # another machine or container: cannot tell
    if boot != _BOOT:
        return True                                 # written before the last reboot
    if not _PROC:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass
        return False
    state = _process_state(int(pid))
    return state is None or state[0] in "ZX" or state[1] != start   # gone, a zombie, or pid reused


def _remove_stale(directory: Path) -> None:
    """Delete what dead writers left in `directory`: temp files, half-built or swapped-out folders."""
    try:
        entries = [e for e in os.scandir(directory) if e.name.startswith(".") and ".peftlab-" in e.name]
    except OSError:
        return
    for entry in entries:
        match = _TEMP.search(entry.name)
        if match and _writer_gone(match):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


# ---- steps ------------------------------------------------------------------------------------
def _file_mode() -> int:
    """0o666 less the process umask, read from /proc (os.umask would change it for every thread)."""
    found = re.search(r"^Umask:\s*([0-7]+)", _read_proc("/proc/self/status") or "", re.MULTILINE)
    if found:
        return 0o666 & ~int(found.group(1), 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync(path: str | Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError as e:      # some file systems cannot fsync a directory: nothing more to do there
        if not directory or e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _write(path: Path, name: str, write: Callable[[Path], None], mode: int) -> None:
    write(path)
    os.chmod(path, mode)
    _fault_point("written", name)
    _fsync(path)
    _fault_point("synced", name)


@contextlib.contextmanager
def _switch_lock(directory: Path) -> Iterator[None]:
    """Exclusive among peftlab writers (threads too: each opens its own descriptor) while held.
    A directory this user cannot open, or a file system without flock, leaves the switches
    unserialised, each still atomic."""
    fd = None
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
    try:
        if fd is not None and fcntl is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)                            # releases the lock


# ---- the switch -------------------------------------------------------------------------------
RENAME_EXCHANGE_USABLE = sys.platform.startswith("linux")
_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _renameat2() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2   # glibc 2.28+, musl 1.2.3+
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_RENAMEAT2 = _renameat2() if RENAME_EXCHANGE_USABLE else None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step; False where the kernel or file system cannot."""
    if not RENAME_EXCHANGE_USABLE or _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _switch(new: Path, target: Path) -> Path | None:
    """Put directory `new` at `target`; return where the previous version now is (None: none)."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return None
    if _exchange(new, target):
        return new
    aside = target.parent / temp_name(target.name, "old")
    os.rename(target, aside)
    _fault_point("aside")
    try:
        os.rename(new, target)
    except OSError:
        os.rename(aside, target)
        raise
    return aside


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:                                 # no hard links here (FAT, some network shares)
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path, written: frozenset[str]) -> None:
    """Every entry of `old` the commit does not write, into `new` (hard links: no data copied)."""
    for entry in os.scandir(old):
        if entry.name in written or _TEMP.search(entry.name):
            continue
        dst = new / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dst)
        elif entry.is_dir():
            shutil.copytree(entry.path, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, dst)


def _bring_back(old: Path, target: Path, written: frozenset[str]) -> None:
    """Entries another program added to (or renamed into) the directory after the carry-over:
    into the new version, so they are not deleted with the old one."""
    for entry in os.scandir(old):
        if entry.name in written or _TEMP.search(entry.name):
            continue
        mine = target / entry.name
        if not os.path.lexists(mine) or (not entry.is_dir(follow_symlinks=False)
                                         and os.lstat(mine).st_ino != entry.inode()):
            os.replace(entry.path, mine)


def _cwd_within(target: Path) -> str | None:
    try:
        cwd = os.getcwd()
    except OSError:
        return None
    return cwd if cwd == str(target) or cwd.startswith(str(target) + os.sep) else None


def _restore_aside(target: Path) -> None:
    """Put back the previous version that a fallback switch, killed between its two renames,
    left beside the missing `target` (the next save then carries its other entries over)."""
    prefix = f".{target.name}.peftlab-"
    for entry in os.scandir(target.parent):
        match = _TEMP.search(entry.name)
        if (match and entry.name.startswith(prefix) and entry.name.endswith(".old")
                and _writer_gone(match)):
            with contextlib.suppress(OSError):      # another writer restored it first
                os.rename(entry.path, target)
            return


def _inode(path: Path) -> int | None:
    try:
        return os.lstat(path).st_ino
    except FileNotFoundError:
        return None


def _commit_folder(target: str | Path, fill: Callable[[Path], None], written: frozenset[str] | None,
                   keep_theirs: Callable[[Path], bool] | None = None) -> None:
    """Build a new version of directory `target` with `fill(folder)` beside it and switch it in.
    `written`: the names `fill` writes, every other entry of the target being carried over;
    None: the new version replaces the target whole. `keep_theirs(target)`: whether a version
    another writer switched in while this one was built is whole (then it stays)."""
    target = Path(os.path.realpath(target))         # a symlink's directory, not the link
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(target) and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a directory (a file, or a broken "
                              "link): save to a directory path, or move it away")
    if os.path.ismount(target):
        raise CheckpointError(f"{target} is a mount point, which cannot be swapped for its new "
                              "version: save into a directory inside it")
    if not os.path.lexists(target):
        _restore_aside(target)
    _remove_stale(parent)
    if target.is_dir():
        _remove_stale(target)
    new = parent / temp_name(target.name, "new")
    os.mkdir(new)                                   # 0o777 less the umask
    old: Path | None = None
    seen = _inode(target)
    try:
        fill(new)
        with _switch_lock(parent):
            if keep_theirs is not None and _inode(target) != seen and keep_theirs(target):
                return
            existing = target.is_dir()
            if existing and written is not None:
                _carry_over(target, new, written)
                _fault_point("carried")
            if existing:
                shutil.copymode(target, new)
            _fsync(new, directory=True)
            _fault_point("new-dir-synced")
            cwd = _cwd_within(target)
            old = _switch(new, target)
            _fault_point("swapped")
            _fsync(parent, directory=True)
            _fault_point("dir-synced")
            if old is not None and written is not None:
                _bring_back(old, target, written)
            if cwd is not None:
                with contextlib.suppress(OSError):
                    os.chdir(cwd)
    finally:
        for leftover in {new, old} - {None}:
            shutil.rmtree(leftover, ignore_errors=True)
    _fault_point("cleaned")


def _commit_file(directory: Path, filename: str, write: Callable[[Path], None]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    directory = directory.resolve()
    _remove_stale(directory)
    mode = _file_mode()
    tmp = directory / temp_name(filename, "tmp")
    try:
        try:                        # unlocked: a swap of `directory` may take the temp file away
            _write(tmp, filename, write, mode)
        except FileNotFoundError:
            pass
        with _switch_lock(directory.parent):        # the lock a swap of `directory` takes
            if not tmp.exists():    # the directory was swapped while we wrote: write into the new one
                _write(tmp, filename, write, mode)
            os.replace(tmp, directory / filename)
            _fault_point("replaced", filename)
            _fsync(directory, directory=True)
            _fault_point("dir-synced")
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


# ---- the writer's interface -------------------------------------------------------------------
def commit_files(directory: str | Path, writers: Mapping[str, Callable[[Path], None]], *,
                 replaces: Iterable[str] = ()) -> None:
    """Write these files into `directory` (created if needed) so that readers, and whatever
    survives a crash, see all of them old or all of them new (see the module docstring).

    `writers`: file name -> a function writing the file's content to the path it is given (a
    temporary name: the extension is hidden). One file is renamed into place; several switch
    the whole directory, the entries not written here carried over unchanged, except those
    named in `replaces`: files of the same kind that this version does not have (an adapter
    saved without peft's files where an earlier save left them), dropped in the same switch."""
    dropped = frozenset(replaces) - set(writers)
    if len(writers) == 1 and not dropped:
        (filename, write), = writers.items()
        _commit_file(Path(directory), filename, write)
    elif writers:
        def fill(folder: Path) -> None:
            mode = _file_mode()
            for filename, write in writers.items():
                _write(folder / filename, filename, write, mode)
        _commit_folder(directory, fill, frozenset(writers) | dropped)


def commit_directory(target: str | Path, build: Callable[[Path], None], *,
                     keep_theirs: Callable[[Path], bool] = Path.is_dir) -> None:
    """Build a whole folder with `build(folder)` and switch it in at `target`, replacing a folder
    already there whole: for folders whose file names the caller does not choose (a model that
    `save_pretrained` writes). Interrupted, it leaves the previous folder (or none) at `target`.
    When another writer switches its own folder in while this one builds, theirs is kept if
    `keep_theirs(target)` says it is whole."""
    def fill(folder: Path) -> None:
        build(folder)
        mode = _file_mode()
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                os.chmod(path, mode)
                _fsync(path)
    _commit_folder(target, fill, None, keep_theirs)


def write_json(data: Any) -> Callable[[Path], None]:
    """A writer of `data` as indented JSON with sorted keys."""
    def write(path: Path) -> None:
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return write


def write_text(text: str) -> Callable[[Path], None]:
    """A writer of UTF-8 text (e.g. JSON whose layout the caller chooses). Any function of a
    path is a writer too: a figure's savefig, given its format (the temporary name hides the
    extension)."""
    def write(path: Path) -> None:
        path.write_text(text, encoding="utf-8")
    return write
