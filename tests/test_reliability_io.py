"""Reliability of everything peftlab writes and reads (issue 19): checkpoints and the atomic writer.

item | case | expected | observed before the fix
---- | ---- | -------- | -----------------------
1 | SIGKILL a saving process at every fault point of the writer (each file written / fsynced, the carry-over of other files, the new directory fsynced, the swap, the directory fsync, the clean-up; run.json's rename) and at random instants, ≥ 50 kills, saves alternating versions of different rank and alpha | the directory loads bit-exactly as one saved version every time; a user's README and run.json survive; no temp entry after the next save | no fault points; a random kill left a directory that is no saved version (the issue: 7 of 20 kills left new tensors with the old config, so nothing loads or the wrong alpha loads silently; 20 kills left 15 orphaned full-size temp files)
1 | two threads save the same adapter name into one directory while a third rewrites run.json there | every save succeeds, the directory loads as one version, run.json holds the last write, no temp entries | the temp name `.{file}.{pid}.tmp` is shared by the threads: saves fail with FileNotFoundError or write each other's files
1 | a stale temp entry of a live writer and one of a dead writer beside the directory | the next save removes the dead one only | not cleaned at all
1 | no RENAME_EXCHANGE (old kernel, other file system): saves, and kills between its two renames | the save switches whole, other files survive; killed in the gap: no directory, the load error names the whole previous version beside it, the next save puts it back | (no such path)
1 | save into the working directory | the process's working directory is still the saved directory | passes (files renamed in place): guards the swap
7 | load an adapter whose tensors hold NaN / inf | CheckpointWarning naming the tensor; `strict=True`: CheckpointError, model unchanged | loads silently
8 | adapter of a 2-layer Llama loaded into a 3-layer Llama with the same shapes | CheckpointWarning naming num_parameters with both values; `strict=True`: CheckpointError, model unchanged; the same model: no warning | loads silently (`strict` unknown: TypeError)
10 | the record (peftlab.json; adapter_config.json before format 2) with format_version "2"/null, method a list, alpha "8", dropout "x", config null/5/[], sites 5, rank_pattern "x", modules_to_save 5, base_model malformed | CheckpointError naming the file and the field | raw TypeError / AttributeError; a malformed base_model loads silently, and into a model of other shapes the message builder raises ValueError
10 | the directory is a symlink loop / a file; the config or the tensors file is a directory; the config cannot be read (permission) | CheckpointError saying which | "truncated or corrupted", "does not exist", or raw OSError
10 | a peft directory with lora_alpha "x", modules_to_save 5, r "4" | CheckpointError naming the file | raw ValueError / TypeError, or loads
13 | the files and the directory a save writes | mode 0o666 / 0o777 less the process umask | the tensors file 0o600, the config 0o644
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftlab
import peftlab.core.files as pio
from conftest import VOCAB, tiny_llama

# Versions the crash test alternates: B and C have the same shapes (a torn B/C pair loads silently
# with the wrong alpha), A another rank (a torn A/B pair does not load at all).
IO_VERSIONS = {"A": (2, 4.0, 1), "B": (4, 8.0, 2), "C": (4, 32.0, 3)}   # r, alpha, seed
IO_TEMP = re.compile(r"\.peftlab-")
IO_README = "# my notes about this adapter\n"


def io_lora(r: int, alpha: float, **extra) -> peftlab.LoraConfig:
    return peftlab.LoraConfig(r=r, alpha=alpha, targets=["attn.q", "ffn.down"], init="random", **extra)


def io_versions_model() -> peftlab.AdaptedModel:
    """A tiny Llama holding adapters A, B, C (IO_VERSIONS)."""
    am = peftlab.adapt(tiny_llama())
    for name, (r, alpha, seed) in IO_VERSIONS.items():
        torch.manual_seed(seed)
        am.add_adapter(name, io_lora(r, alpha))
    return am


def io_temp_entries(*folders: Path) -> list[str]:
    return sorted(p.name for f in folders if f.is_dir() for p in f.iterdir() if IO_TEMP.search(p.name))


def io_files(directory: Path) -> tuple[bytes, bytes, bytes]:
    """The bytes of a LoRA save's files: our record, and peft's files (which hold its tensors)."""
    return ((directory / "peftlab.json").read_bytes(), (directory / "adapter_config.json").read_bytes(),
            (directory / "adapter_model.safetensors").read_bytes())


# ---- item 1: the crash test's child ---------------------------------------------------------------
def io_child(target: str, refs: str) -> None:
    """The saving process of test_item_1_torn_checkpoints (run with `python -c`, see there).

    It imports torch once, saves the reference versions and version A, then serves commands from
    stdin, one per line, answering one line each:
      kill POINT SKIP DELAY FALLBACK
                             fork a saver that saves B, C, B, ... (and run.json after each) with the
                             fault point POINT armed after SKIP saves ('-': none; this process
                             SIGKILLs it after DELAY seconds instead), switching by two renames
                             if FALLBACK is 1; answer its wait status
      save                   save version A and run.json here; answer 'saved'
    Forking is what makes ≥ 50 kills cheap: a fresh interpreter costs seconds, a fork milliseconds.
    """
    import signal

    from peftlab.core.files import commit_files, write_text

    torch.set_num_threads(1)          # no OpenMP pool to inherit across fork
    am = io_versions_model()
    target_dir = Path(target)
    for name in IO_VERSIONS:
        am.save_adapter(Path(refs) / name, name)

    def save(version: str) -> None:
        am.save_adapter(target_dir, version)
        commit_files(target_dir, {"run.json": write_text(json.dumps({"version": version}) + "\n")})

    save("A")
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "save":
            save("A")
            print("saved", flush=True)
            continue
        point, skip, delay = args[0], int(args[1]), float(args[2])
        pid = os.fork()
        if pid == 0:
            pio.RENAME_EXCHANGE_USABLE = args[3] == "0"
            try:
                for i in range(2000):
                    if i == skip and point != "-":
                        os.environ["PEFTLAB_FAULT"] = point
                    save("BC"[i % 2])
            finally:
                os._exit(3)   # never back into the command loop: the fault point was not reached
        if point == "-":
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
        print(os.waitpid(pid, 0)[1], flush=True)


def io_check_version(am: peftlab.AdaptedModel, target: Path, expected: dict, ref_tensors: dict,
                     point: str) -> None:
    """`target` is one whole saved version, bit for bit, and loads as it; other files survive."""
    version = [v for v, files in expected.items() if io_files(target) == files]
    assert len(version) == 1, f"after a kill at {point!r} the directory is no saved version"
    loaded = am.load_adapter(target, "x")
    assert (loaded.config.r, loaded.config.alpha) == IO_VERSIONS[version[0]][:2]
    tensors = am.adapter_tensors("x")
    assert tensors.keys() == ref_tensors[version[0]].keys()
    assert all(torch.equal(tensors[k], ref_tensors[version[0]][k]) for k in tensors)
    am.delete_adapter("x")
    assert (target / "README.md").read_text() == IO_README
    assert json.loads((target / "run.json").read_text())["version"] in IO_VERSIONS


IO_POINTS = ["written", "written:adapter_config.json", "written:peftlab.json", "synced",
             "synced:adapter_config.json",
             "new-dir-synced", "carried", "swapped", "dir-synced", "cleaned", "written:run.json",
             "replaced:run.json"]


def test_item_1_torn_checkpoints(tmp_path):
    target, refs = tmp_path / "out" / "adapter", tmp_path / "refs"
    target.mkdir(parents=True)
    (target / "README.md").write_text(IO_README)
    src, tests = Path(peftlab.__file__).parents[1], Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(tests)])}
    env.pop("PEFTLAB_FAULT", None)
    code = "import runpy, sys; runpy.run_path(sys.argv[1])['io_child'](*sys.argv[2:])"
    child = subprocess.Popen([sys.executable, "-c", code, __file__, str(target), str(refs)], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    watchdog = threading.Timer(120, child.kill)    # a hung child fails the test, never hangs it
    watchdog.start()

    def ask(line: str) -> str:
        child.stdin.write(line + "\n")
        child.stdin.flush()
        return child.stdout.readline().strip()

    try:
        assert child.stdout.readline().strip() == "ready"
        expected = {v: io_files(refs / v) for v in IO_VERSIONS}
        assert len(set(expected.values())) == 3
        check = peftlab.adapt(tiny_llama())
        ref_tensors = {}
        for v in IO_VERSIONS:
            check.load_adapter(refs / v, v)
            ref_tensors[v] = check.adapter_tensors(v)
        rng = random.Random(0)
        plan = [(p, rng.randrange(3), 0.0, 0) for p in IO_POINTS for _ in range(3)]
        plan += [("-", 0, rng.uniform(0.0, 0.04), 0) for _ in range(25)]
        plan += [(p, rng.randrange(3), 0.0, 1) for p in ("aside", "swapped", "written") for _ in range(2)]
        rng.shuffle(plan)
        kills = orphaned = 0
        for point, skip, delay, fallback in plan:
            status = int(ask(f"kill {point} {skip} {delay} {fallback}"))
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9
            assert killed or point == "-", f"the saver never reached fault point {point!r}"
            kills += killed
            if point == "aside":
                # the fallback's one gap: no directory, the previous version whole beside it
                with pytest.raises(peftlab.CheckpointError, match=r"previous version at \S+\.old"):
                    check.load_adapter(target, "x")
                aside, = target.parent.glob(".adapter.peftlab-*.old")
                assert io_files(aside) in expected.values()
                assert (aside / "README.md").read_text() == IO_README
            else:
                io_check_version(check, target, expected, ref_tensors, point)
            orphaned += bool(io_temp_entries(target.parent, target))
            assert ask("save") == "saved"
            assert io_temp_entries(target.parent, target) == []
            assert (target / "README.md").read_text() == IO_README
        assert kills >= 50 and orphaned > 0    # the kills did leave temp entries to clean
    finally:
        watchdog.cancel()
        child.kill()
        child.wait()


def test_item_1_two_threads_save_one_directory(tmp_path):
    target = tmp_path / "ad"
    models = []
    for r in (2, 4):
        am = peftlab.adapt(tiny_llama())
        am.add_adapter("a", io_lora(r, 2.0 * r))
        models.append(am)
    barrier, errors = threading.Barrier(3), []

    def run(work) -> None:
        barrier.wait()
        try:
            for i in range(25):
                work(i)
        except Exception as e:  # noqa: BLE001 - every failure is reported by the assertion below
            errors.append(e)

    def record(i: int) -> None:
        pio.commit_files(target, {"run.json": pio.write_text(f"{i}\n")})

    threads = [threading.Thread(target=run, args=(lambda i, am=am: am.save_adapter(target, "a"),))
               for am in models] + [threading.Thread(target=run, args=(record,))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    fresh = peftlab.adapt(tiny_llama())
    source = models[0] if fresh.load_adapter(target, "a").config.r == 2 else models[1]
    saved, got = source.adapter_tensors("a"), fresh.adapter_tensors("a")
    assert all(torch.equal(saved[k], got[k]) for k in saved)
    assert (target / "run.json").read_text() == "24\n"
    assert io_temp_entries(tmp_path, target) == []


def io_dead_writer_names(*names: tuple[str, str]) -> list[str]:
    """Temp names as a process that has exited made them (a forked child names them and exits)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, json.dumps([pio.temp_name(*n) for n in names]).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as f:
        return json.load(f)


def test_item_1_cleanup_spares_live_writers(tmp_path):
    target = tmp_path / "ad"
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("a", io_lora(2, 4.0))
    am.save_adapter(target, "a")
    live = tmp_path / pio.temp_name("ad", "new")      # this process: alive
    live.mkdir()
    dead_dir, dead_file = io_dead_writer_names(("ad", "new"), ("run.json", "tmp"))
    (tmp_path / dead_dir).mkdir()
    (tmp_path / dead_dir / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    (target / dead_file).write_text("x")
    am.save_adapter(target, "a")
    assert io_temp_entries(tmp_path, target) == [live.name]


def test_item_1_fallback_without_rename_exchange(tmp_path, monkeypatch):
    # Kernels before 3.15 and some file systems refuse RENAME_EXCHANGE: the swap falls back to two
    # renames. Not reachable on this machine's ext4, so the switch is turned off here.
    monkeypatch.setattr(pio, "RENAME_EXCHANGE_USABLE", False)
    target = tmp_path / "ad"
    am = io_versions_model()
    am.save_adapter(target, "A")
    (target / "README.md").write_text(IO_README)
    am.save_adapter(target, "B")
    fresh = peftlab.adapt(tiny_llama())
    assert fresh.load_adapter(target, "b").config.r == 4
    assert (target / "README.md").read_text() == IO_README
    assert io_temp_entries(tmp_path, target) == []


def test_item_1_save_into_the_working_directory(tmp_path, monkeypatch):
    target = tmp_path / "ad"
    target.mkdir()
    monkeypatch.chdir(target)
    am = io_versions_model()
    am.save_adapter(".", "A")
    am.save_adapter(".", "B")
    assert os.path.samefile(os.getcwd(), target)
    assert sorted(os.listdir(".")) == ["adapter_config.json", "adapter_model.safetensors", "peftlab.json"]


# ---- item 7 (loading): non-finite tensors ---------------------------------------------------------
def io_refused_strict_then_warns(am: peftlab.AdaptedModel, directory: Path, pattern: str) -> None:
    """strict=True refuses the checkpoint (model unchanged); without it, it loads with a warning."""
    with pytest.raises(peftlab.CheckpointError, match=pattern):
        am.load_adapter(directory, "a", strict=True)
    assert not am.adapters
    with pytest.warns(peftlab.CheckpointWarning, match=pattern):
        am.load_adapter(directory, "a")
    assert "a" in am.adapters


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_item_7_non_finite_tensors_on_load(tmp_path, bad):
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("a", io_lora(2, 4.0))
    am.adapter_tensors("a")[("model.layers.1.mlp.down_proj", "lora_B")][0, 1] = bad   # a view
    am.save_adapter(tmp_path / "ad", "a")
    io_refused_strict_then_warns(peftlab.adapt(tiny_llama()), tmp_path / "ad",
                                 r"model\.layers\.1\.mlp\.down_proj(:lora_B|\.lora_B\.weight) hold NaN or inf")
    peftlab.export_peft(am, "a", tmp_path / "peft")
    with pytest.warns(peftlab.CheckpointWarning, match="down_proj.lora_B"):
        peftlab.import_peft(peftlab.adapt(tiny_llama()), tmp_path / "peft", "a")


# ---- item 8: the base identity is compared -------------------------------------------------------
def io_llama(layers: int, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=48,
                                        num_hidden_layers=layers, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=64)).eval()


def test_item_8_base_identity_is_compared(tmp_path):
    am = peftlab.adapt(io_llama(2))
    am.add_adapter("a", io_lora(2, 4.0))
    am.save_adapter(tmp_path / "ad", "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # the model it was made for: silent
        peftlab.adapt(io_llama(2)).load_adapter(tmp_path / "ad", "a", strict=True)
    bigger = peftlab.adapt(io_llama(3))
    io_refused_strict_then_warns(bigger, tmp_path / "ad", rf"another base model \(num_parameters: "
                                 rf"checkpoint {am.base_parameters():,}, this model {bigger.base_parameters():,}\)")


# ---- item 10: malformed records and OS errors ---------------------------------------------------
IO_MALFORMED = {
    "format_version-str": ("format_version", "2"),
    "format_version-null": ("format_version", None),
    "method-list": ("method", ["lora"]),
    "alpha-str": ("config.alpha", "8"),
    "dropout-str": ("config.dropout", "x"),
    "config-null": ("config", None),
    "config-int": ("config", 5),
    "config-list": ("config", []),
    "sites-int": ("sites", 5),
    "sites-ints": ("sites", [1, 2]),
    "rank_pattern-str": ("config.rank_pattern", "x"),
    "modules_to_save-int": ("modules_to_save", 5),
    "config.modules_to_save-int": ("config.modules_to_save", 5),
    "base_model-int": ("base_model", 5),
    "base_model-fields": ("base_model", {"class": 3, "num_parameters": "many"}),
}


@pytest.mark.parametrize("case", IO_MALFORMED)
def test_item_10_malformed_config_fields(tmp_path, case):
    field, value = IO_MALFORMED[case]
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("a", io_lora(2, 4.0))
    am.save_adapter(tmp_path / "ad", "a")
    meta = json.loads((tmp_path / "ad" / "peftlab.json").read_text())
    *parents, key = field.split(".")
    record = meta
    for p in parents:
        record = record[p]
    record[key] = value
    (tmp_path / "ad" / "peftlab.json").write_text(json.dumps(meta))
    # a model whose shapes the adapter does not fit too: the error names the field, not a crash
    # of the message that describes the recorded base
    for model in (tiny_llama(), io_llama(2, hidden=48)):
        fresh = peftlab.adapt(model)
        with pytest.raises(peftlab.CheckpointError) as info:
            fresh.load_adapter(tmp_path / "ad", "a")
        assert "peftlab.json" in str(info.value) and key in str(info.value)
        assert not fresh.adapters


def test_item_10_os_errors_say_what_they_are(tmp_path):
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("a", io_lora(2, 4.0))
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "file.txt").write_text("x")
    savers = {"peftlab": lambda d: am.save_adapter(d, "a"),
              "peft": lambda d: peftlab.export_peft(am, "a", d)}
    loaders = {"peftlab": lambda d: peftlab.adapt(tiny_llama()).load_adapter(d, "a"),
               "peft": lambda d: peftlab.import_peft(peftlab.adapt(tiny_llama()), d, "a")}
    for kind, save in savers.items():
        cases = {tmp_path / "loop": "symbolic link loop", tmp_path / "file.txt": "is a file, not a directory"}
        for damaged in ("adapter_config.json", "adapter_model.safetensors"):
            folder = save(tmp_path / kind / damaged)
            (folder / damaged).unlink()
            (folder / damaged).mkdir()
            cases[folder] = f"{damaged} is a directory"
        for path, problem in cases.items():
            with pytest.raises(peftlab.CheckpointError, match=problem) as info:
                loaders[kind](path)
            assert "truncated or corrupted" not in str(info.value) and info.value.__cause__ is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permission bits")
def test_item_10_permission_denied_says_so(tmp_path):
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("a", io_lora(2, 4.0))
    good = am.save_adapter(tmp_path / "good", "a")
    (good / "adapter_config.json").chmod(0)
    with pytest.raises(peftlab.CheckpointError, match="permission denied"):
        peftlab.adapt(tiny_llama()).load_adapter(good, "a")


@pytest.mark.parametrize("field,value", [("lora_alpha", "x"), ("modules_to_save", 5), ("r", "4"),
                                         ("target_modules", 5)])
def test_item_10_malformed_peft_config_fields(tmp_path, field, value):
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("a", io_lora(2, 4.0))
    peftlab.export_peft(am, "a", tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    fresh = peftlab.adapt(tiny_llama())
    with pytest.raises(peftlab.CheckpointError, match="adapter_config.json"):
        peftlab.import_peft(fresh, tmp_path / "peft", "a")
    assert not fresh.adapters


# ---- item 13: modes follow the umask ------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_item_13_files_follow_the_umask(tmp_path, umask):
    am = peftlab.adapt(tiny_llama())
    am.add_adapter("a", io_lora(2, 4.0))
    old = os.umask(umask)
    try:
        am.save_adapter(tmp_path / "ad", "a")
        am.save_adapter(tmp_path / "ad", "a")      # the swapped-in directory too
        peftlab.export_peft(am, "a", tmp_path / "peft")
    finally:
        os.umask(old)
    for folder in (tmp_path / "ad", tmp_path / "peft"):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
        modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
        names = ["adapter_config.json", "adapter_model.safetensors"] + ["peftlab.json"] * (folder.name == "ad")
        assert modes == {name: 0o666 & ~umask for name in names}
