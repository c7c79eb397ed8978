"""Comparison harness: PEFT methods and two baselines trained side by side on one budget.

    peftlab compare --model minilm --task sentiment --methods lora,ia3,bitfit \\
        --seeds 0,1,2 --data-sizes 100,1000,all --steps 100 --out runs/compare

The grid is methods × seeds × training-set sizes. Each *cell* is one run of `peftlab.train` on a
freshly loaded model: the job `peftlab train` builds (`build_job`: the seed draws the data split
and the new classification head), the method's own default targets, the head trained with the
adapter, and the same steps and batch size for every method. A cell measures, as it runs:

* parameters: trainable (the numel of every parameter that requires gradients) and its share of
  the base model; the adapter's parameters and the size of its saved files on disk;
* peak memory: how far the process's resident set (RSS) grew above its size at the start of
  training (`PeakRSS`). Torch's CPU allocator keeps no peak counter and tracemalloc does not see
  tensor memory, so the kernel's high-water mark is read, reset before each cell;
* speed: mean training step time (evaluation excluded), examples/s and input tokens/s;
* inference latency: the median forward time of one batch of held-out rows, with the adapter
  unmerged and, for mergeable methods, merged into the base weights (with the largest output
  difference merging made);
* score: the task's metric on held-out test rows (accuracy; perplexity for causal LM), and
  convergence: the training loss of every step and the held-out score at `evals` points;
* typology: the form, site roles and integration the method declares (PEFT-Ref).

Baselines: `probe`, the frozen model with its new head trained alone (a linear probe), and
`full`, every weight trained, run only when params × (weights + gradients + 2 Adam states) fits
in the memory available. Training runs on the CPU (the tasks score on CPU tensors).

Each finished cell is written to DIR/cells/<key>.json atomically. The key hashes every setting
that changes what a cell measures (model, task, steps, batch size, lr, ...), so a rerun with the
same settings reuses finished cells and runs only the missing ones, and cells of other settings
are never mixed in. `peftlab.compare_report` turns the records into results.json, results.md and
plots.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import torch
from torch import nn

from .cli import MODEL_DEFAULTS, build_job, method_config
from ..core.errors import ConfigError, PeftlabError, close_matches
from ..methods import METHODS, get_method
from ..core.model import AdaptedModel, adapt
from ..training.tasks import ClassificationTask, RegressionTask
from ..training.loop import TrainConfig, train
from ..core.typology import summarise_sites

BASELINES = ("probe", "full")
PROBE_LR = 1e-2   # the best of 2e-3 / 1e-2 / 3e-2 for the MiniLM probe (bench/methods_vs_probe.py)
FULL_LR = 1e-4    # every weight moves: far below the adapters' rates
# The typology columns of the baselines, which no method record declares.
BASELINE_TYPOLOGY = {
    "probe": {"form": "head only", "site": "head", "integration": "none", "mergeable": False},
    "full": {"form": "all weights", "site": "all", "integration": "in place", "mergeable": False},
}
LATENCY_REPEATS = 10
FULL_FIT_MARGIN = 0.8   # share of the available memory full fine-tuning may plan for: activations need the rest
PERSISTED = ("ok", "failed")   # refusals are settled answers; crashes and skips are tried again
MEMORY_MEASURE = ("peak resident set (RSS) growth during training: the kernel's high-water mark "
                  "VmHWM, reset through /proc/self/clear_refs with freed heap trimmed first, minus "
                  "VmRSS at the start (Linux)")


class NotRun(PeftlabError):
    """A baseline that does not apply to this job or fit this machine: the cell is skipped."""


@dataclass(frozen=True)
class Settings:
    """What every cell of a grid shares; all of it keys the cell files."""

    model: str          # "minilm", "smollm2" or a resolved model directory
    task: str
    steps: int
    batch_size: int
    eval_size: int      # held-out test rows scored
    evals: int          # held-out evaluations during training (learning-curve points)
    max_length: int
    rank: int

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_size", "evals", "max_length", "rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")

    def lr(self, method: str) -> float:
        """The learning rate a method trains at: `peftlab train`'s choice (the method's own
        `train_lr`, else the model's default) and the baselines' fixed rates."""
        if method in BASELINES:
            return PROBE_LR if method == "probe" else FULL_LR
        return get_method(method).train_lr or model_defaults(self.model)["lr"]


@dataclass(frozen=True)
class Cell:
    """One training run of the grid."""

    method: str
    seed: int
    size: int | None    # training examples; None: the whole training split

    @property
    def label(self) -> str:
        return f"{self.method} seed {self.seed} n={self.size or 'all'}"


def model_defaults(model: str) -> dict[str, Any]:
    """`peftlab train`'s per-model defaults (steps, batch_size, lr, rank)."""
    return MODEL_DEFAULTS.get(model, MODEL_DEFAULTS["path"])


def cell_spec(settings: Settings, cell: Cell) -> dict[str, Any]:
    """Everything that decides what a cell measures."""
    return {**asdict(settings), **asdict(cell), "lr": settings.lr(cell.method)}


def cell_key(settings: Settings, cell: Cell) -> str:
    """The cell's file name stem: readable, plus a digest of its whole spec."""
    digest = hashlib.sha256(json.dumps(cell_spec(settings, cell), sort_keys=True).encode()).hexdigest()
    return f"{cell.method}-seed{cell.seed}-n{cell.size or 'all'}-{digest[:12]}"


# ---- parsing the grid ------------------------------------------------------------------------------
def _items(text: str, option: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ConfigError(f"{option} is empty; give a comma-separated list")
    return list(dict.fromkeys(items))   # order kept, repeats dropped


def parse_methods(methods: str, baselines: str) -> list[str]:
    """The grid's methods: the probe first, then --methods, then full fine-tuning (lower bound,
    methods, upper bound). An unknown name is an error listing the close ones."""
    names = _items(methods, "--methods")
    extra = [] if baselines.strip().lower() in ("", "none") else _items(baselines, "--baselines")
    known = [*METHODS, *BASELINES]
    for name, option in [*((n, "--methods") for n in names), *((b, "--baselines") for b in extra)]:
        allowed = BASELINES if option == "--baselines" else known
        if name not in allowed:
            hint = close_matches(name, allowed)
            raise ConfigError(f"{option}: no method {name!r}" + (f"; did you mean {', '.join(hint)}?" if hint else "")
                              + f" Known: {', '.join(allowed)}")
    chosen = list(dict.fromkeys([*names, *extra]))
    return ([m for m in chosen if m == "probe"] + [m for m in chosen if m not in BASELINES]
            + [m for m in chosen if m == "full"])


def parse_ints(text: str, option: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]."""
    try:
        return [int(x) for x in _items(text, option)]
    except ValueError:
        raise ConfigError(f"{option} {text!r}: give comma-separated integers, e.g. 0,1,2") from None


def parse_sizes(text: str) -> list[int | None]:
    """'100,1000,all' -> [100, 1000, None]."""
    sizes: list[int | None] = []
    for item in _items(text, "--data-sizes"):
        n = None if item.lower() == "all" else parse_ints(item, "--data-sizes")[0]
        if n is not None and n < 1:
            raise ConfigError(f"--data-sizes {text!r}: sizes must be positive integers or 'all'")
        sizes.append(n)
    return sizes


def plan(methods: list[str], seeds: list[int], sizes: list[int | None]) -> list[Cell]:
    """The grid in run order: methods innermost, so a drift in machine load spreads over all."""
    return [Cell(m, s, n) for s in seeds for n in sizes for m in methods]


def training_rows(rows: list[dict], size: int | None, seed: int) -> list[dict]:
    """`size` training rows drawn with `seed`: the first `size` of one seeded permutation, so the
    smaller sets of a sweep are subsets of the larger ones."""
    if size is None:
        return rows
    if size > len(rows):
        raise PeftlabError(f"data size {size:,} exceeds the {len(rows):,} training rows")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[:size]]


# ---- measuring ----------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _malloc_trim() -> None:
    """Hand freed heap back to the system (glibc), so memory an earlier run left free is not
    reused unseen by the next one."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Peak growth of the resident set while the block runs (`MEMORY_MEASURE`); `peak_bytes` is
    None where the kernel's high-water mark cannot be reset (not Linux)."""

    def __enter__(self) -> Self:
        gc.collect()
        _malloc_trim()
        try:
            Path("/proc/self/clear_refs").write_text("5")   # 5: reset VmHWM to the current RSS
            self.start: int | None = _status_kib("VmRSS")
        except OSError:
            self.start = None
        self.peak_bytes: int | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.start is not None:
            self.peak_bytes = 1024 * (_status_kib("VmHWM") - self.start)


def available_memory() -> int | None:
    """Bytes the system can still give (MemAvailable), None where /proc/meminfo is missing."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return 1024 * int(line.split()[1])
    except OSError:
        pass
    return None


def full_fit_problem(n_params: int, bytes_per_param: int, available: int | None) -> str | None:
    """Why full fine-tuning would not fit in memory, or None. It needs the weights, their
    gradients and Adam's two moments: 4 copies of every parameter (activations come on top,
    hence FULL_FIT_MARGIN). `available` counts the loaded weights plus what is still free."""
    if available is None:
        return None
    need = 4 * n_params * bytes_per_param
    if need <= FULL_FIT_MARGIN * available:
        return None
    return (f"full fine-tuning needs ~{need / 2**30:.1f} GiB ({n_params:,} parameters × {bytes_per_param} "
            f"bytes × 4: weights, gradients, 2 Adam states; activations extra) but "
            f"{available / 2**30:.1f} GiB is available")


class TokenCounter:
    """The task, counting the non-padding input tokens of the batches `train` collates (its
    evaluation collates through the task itself, unseen)."""

    def __init__(self, task: Any) -> None:
        self.task = task
        self.tokens = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.task.collate(rows)
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        return batch


@torch.no_grad()
def forward_ms(model: nn.Module, inputs: dict[str, torch.Tensor], repeats: int = LATENCY_REPEATS) -> float:
    """Median wall time of one forward pass, in ms, after two warm-up passes (the first calls
    allocate and choose kernels)."""
    for _ in range(2):
        model(**inputs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(**inputs)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def directory_bytes(directory: Path) -> int:
    """Bytes of every file under `directory`."""
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


# ---- one cell -------------------------------------------------------------------------------------------
def attach(model: nn.Module, method: str, rank: int, *, new_head: bool) -> tuple[AdaptedModel, set[int]]:
    """Wrap `model` and add the adapter `train` will train, named after the method; return the
    model and the ids of parameters left out of the trainable count.

    `train` trains an adapter, so the baselines ride on a *carrier*: a rank-1 LoRA on one query
    projection whose B stays frozen at 0, an exact no-op. The probe trains the carrier's copy of
    the head alone; full fine-tuning unfreezes the whole base, and the carrier's A, left
    trainable only to satisfy `train`, gets exactly zero gradient (B = 0), so AdamW never moves it.
    """
    if method not in BASELINES:
        am = adapt(model)
        am.add_adapter(method, method_config(get_method(method), None, rank, train_head=new_head))
        am.set_active([method])
        am.set_trainable(method)
        return am, set()
    if method == "probe" and not new_head:
        raise NotRun("the linear probe trains a new classification head; this model and task have "
                     "none (causal LM)")
    am = adapt(model, freeze_base=method == "probe")
    carrier = method_config(get_method("lora"), "attn.q", 1, train_head=method == "probe")
    carrier.layers = [0]
    am.add_adapter(method, carrier)
    am.set_active([method])
    am.set_trainable(method)
    parts = list(am.adapters[method].parts().values())
    for part in parts:
        part.lora_B.requires_grad_(False)
        part.lora_A.requires_grad_(method == "full")
    return am, {id(p) for part in parts for p in part.parameters()}


def warm_up(model: nn.Module, task: Any, rows: list[dict]) -> None:
    """One forward and backward pass, gradients dropped: a process's first passes set up thread
    pools, kernels and allocator pools, a one-time cost that would otherwise land on whichever
    cell runs first."""
    model.train()
    task.loss(model, task.collate(rows)).backward()
    model.zero_grad(set_to_none=True)


def _merged_latency(am: AdaptedModel, method: str, inputs: dict[str, torch.Tensor],
                    unmerged: torch.Tensor) -> dict[str, Any]:
    """Latency with the adapter merged into the base weights, or why there is none."""
    if method in BASELINES:
        return {"latency_merged_ms": None, "merge_note": "baseline: no adapter to merge"}
    m = get_method(method)
    if not m.supports("merge"):
        return {"latency_merged_ms": None,
                "merge_note": f"not mergeable ({m.typology.integration} integration)"}
    try:
        am.merge(method)
    except PeftlabError as e:
        return {"latency_merged_ms": None, "merge_note": f"merge refused: {e}"}
    try:
        with torch.no_grad():
            diff = float((am(**inputs).logits.float() - unmerged).abs().max())
        return {"latency_merged_ms": forward_ms(am, inputs), "merge_max_abs_diff": diff}
    finally:
        am.unmerge(method)


def _file_bytes(am: AdaptedModel, method: str) -> int:
    """Bytes on disk of what the run produces: the saved adapter, or for full fine-tuning the
    whole model (safetensors), saved to a temporary directory and measured."""
    from safetensors.torch import save_model
    with tempfile.TemporaryDirectory(prefix="peftlab-compare-") as tmp:
        if method == "full":
            save_model(am.unload(), str(Path(tmp) / "model.safetensors"))
        else:
            am.save_adapter(tmp, method)
        return directory_bytes(Path(tmp))


def measure_cell(settings: Settings, cell: Cell, *, progress: bool = False) -> dict[str, Any]:
    """Train one cell and measure it (see the module docstring). Raises PeftlabError when the
    method refuses the model, NotRun when a baseline does not apply or fit."""
    model, _, task, data = build_job(settings.model, settings.task, seed=cell.seed,
                                     max_length=settings.max_length)
    rows = training_rows(data.train, cell.size, cell.seed)
    eval_rows = data.test[: settings.eval_size]
    if cell.method == "full":
        weights = list(model.parameters())
        n = sum(p.numel() for p in weights)
        free = available_memory()
        problem = full_fit_problem(n, weights[0].element_size(),
                                   None if free is None else free + n * weights[0].element_size())
        if problem:
            raise NotRun(problem)
    torch.manual_seed(cell.seed)   # the adapter's initialisation, whatever loading the model drew
    am, carrier = attach(model, cell.method, settings.rank,
                         new_head=isinstance(task, (ClassificationTask, RegressionTask)))
    adapter = am.adapters[cell.method]
    trainable = sum(p.numel() for p in am.parameters() if p.requires_grad and id(p) not in carrier)
    base = am.base_parameters()
    warm_up(am, task, rows[: settings.batch_size])
    counter = TokenCounter(task)
    with PeakRSS() as peak:
        result = train(am, cell.method, counter, rows, eval_rows, TrainConfig(
            steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr(cell.method),
            seed=cell.seed, eval_every=math.ceil(settings.steps / settings.evals), progress=progress))
    if result.interrupted:
        raise KeyboardInterrupt
    train_seconds = result.steps_done * settings.batch_size / result.examples_per_second
    final = result.evals[-1][1]

    am.eval()
    inputs = {k: v for k, v in task.collate(eval_rows[: settings.batch_size]).items() if k != "labels"}
    with torch.no_grad():
        unmerged = am(**inputs).logits.float()
    with am.disabled():
        latency_base = forward_ms(am, inputs)
    latency = {"latency_base_ms": latency_base, "latency_ms": forward_ms(am, inputs),
               **_merged_latency(am, cell.method, inputs, unmerged)}
    head = sum(p.numel() for w in adapter.copies.values() for p in w.copies[cell.method].parameters())
    sites = summarise_sites((s.role, s.layer) for s in adapter.sites)
    return {
        "train_examples": len(rows),
        "eval_examples": len(eval_rows),
        "trainable": trainable,
        "base_params": base,
        "trainable_pct": 100 * trainable / base,
        "head_params": head,
        "adapter_params": trainable if cell.method in BASELINES else am.num_parameters(cell.method),
        "sites": "all weights" if cell.method == "full" else sites,
        "peak_bytes": peak.peak_bytes,
        "step_ms": 1e3 * train_seconds / result.steps_done,
        "examples_per_s": result.examples_per_second,
        "tokens_per_s": counter.tokens / train_seconds,
        **latency,
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "score": final[task.metric],
        "metrics": final,
        "losses": [round(x, 6) for x in result.losses],
        "evals": [[step, m[task.metric]] for step, m in result.evals],
        "file_bytes": _file_bytes(am, cell.method),   # last: full fine-tuning unloads the model
    }


def typology_fields(method: str) -> dict[str, Any]:
    """Form, site roles, integration and mergeability as the method declares them."""
    if method in BASELINES:
        return dict(BASELINE_TYPOLOGY[method])
    t = get_method(method).typology
    return {"form": t.form, "site": ", ".join(t.site_roles), "integration": t.integration,
            "mergeable": t.mergeable}


def run_cell(settings: Settings, cell: Cell, *, progress: bool = False) -> dict[str, Any]:
    """The cell's record: its spec and typology, then the measurements (status "ok"), or the
    reason it did not run: "failed" (the method refused, e.g. prefix tuning on an encoder),
    "skipped" (a baseline that does not apply or fit) or "error" (anything else)."""
    record: dict[str, Any] = {"key": cell_key(settings, cell), "spec": cell_spec(settings, cell),
                              "method": cell.method, "seed": cell.seed, "size": cell.size,
                              "typology": typology_fields(cell.method)}
    started = time.perf_counter()
    try:
        record.update(measure_cell(settings, cell, progress=progress), status="ok")
    except NotRun as e:
        record.update(status="skipped", reason=str(e))
    except PeftlabError as e:
        record.update(status="failed", reason=str(e))
    except Exception as e:   # noqa: BLE001  (one broken cell must not end the grid)
        record.update(status="error", reason=f"{type(e).__name__}: {e}")
    record.update(seconds=round(time.perf_counter() - started, 2),
                  finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
                  torch_threads=torch.get_num_threads())
    return record


# ---- the grid ---------------------------------------------------------------------------------------------
def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and rename it over `path`: a reader (or a rerun after a
    crash) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_cell(cell_dir: Path, settings: Settings, cell: Cell) -> dict[str, Any] | None:
    """The finished record of this cell under these settings, or None."""
    path = cell_dir / f"{cell_key(settings, cell)}.json"
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        print(f"peftlab compare: {path} is not valid JSON; running the cell again", file=sys.stderr)
        return None
    if record.get("spec") != cell_spec(settings, cell) or record.get("status") not in PERSISTED:
        return None
    return record


Runner = Callable[..., dict[str, Any]]


def run_grid(settings: Settings, cells: list[Cell], out: Path, *, runner: Runner = run_cell,
             progress: bool = True) -> list[dict[str, Any]]:
    """Every cell's record, in grid order: finished cells of these settings are read from
    out/cells, the others run (`runner(settings, cell, progress=...)`) and written as they
    finish. A KeyboardInterrupt stops the grid; what finished stays written."""
    from tqdm.auto import tqdm
    cell_dir = out / "cells"
    cell_dir.mkdir(parents=True, exist_ok=True)
    records: dict[int, dict[str, Any]] = {}
    for i, cell in enumerate(cells):
        record = load_cell(cell_dir, settings, cell)
        if record is not None:
            records[i] = record
    if records:
        print(f"reusing {len(records)} finished cells of these settings from {cell_dir}: "
              + ", ".join(cells[i].label for i in sorted(records)))
    others = len(list(cell_dir.glob("*.json"))) - len(records)
    if others:
        print(f"({others} other cell files in {cell_dir} belong to other settings or grids: not used)")
    bar = tqdm(total=len(cells), initial=len(records), unit="cell", dynamic_ncols=True,
               disable=not progress, file=sys.stderr)
    try:
        for i, cell in enumerate(cells):
            if i in records:
                continue
            bar.set_description(f"cell {i + 1}/{len(cells)} {cell.label}")
            record = runner(settings, cell, progress=progress)
            if record["status"] in PERSISTED:
                write_atomic(cell_dir / f"{record['key']}.json", json.dumps(record, indent=1) + "\n")
            records[i] = record
            bar.update(1)
            tqdm.write(f"cell {i + 1}/{len(cells)} {cell.label}: {describe(record)}")
    finally:
        bar.close()
    return [records[i] for i in range(len(cells))]


def describe(record: dict[str, Any]) -> str:
    """One line about a finished cell."""
    if record["status"] != "ok":
        return f"{record['status']}: {record['reason']}"
    return (f"{record['metric']} {record['score']:.4f}, {record['trainable']:,} trainable, "
            f"step {record['step_ms']:.0f} ms ({record['seconds']:.0f} s)")


# ---- environment and command ----------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git() -> dict[str, Any] | None:
    """The commit of the checkout peftlab runs from, and whether tracked files differ from it."""
    root = Path(__file__).resolve().parents[3]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    """Versions, hardware and commit the numbers were measured with."""
    import transformers

    from .. import __version__
    return {
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peftlab": __version__,
        "platform": platform.platform(), "cpu": _cpu_model(), "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device": "cpu", "git": _git(), "memory_measure": MEMORY_MEASURE,
    }


def _resolved(name: str, builtin: tuple[str, ...]) -> str:
    """A local path as its absolute form, so the cells of one file key alike from any directory;
    a built-in model or data set name as it is."""
    if name.strip().lower() in builtin or not Path(name).expanduser().exists():
        return name
    return str(Path(name).expanduser().resolve())


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from `peftlab compare`'s options, unset ones from `peftlab train`'s per-model
    defaults."""
    from ..assets import DATASETS, MODELS
    defaults = model_defaults(args.model)

    def pick(value: int | None, key: str) -> int:
        return defaults[key] if value is None else value
    return Settings(model=_resolved(args.model, MODELS), task=_resolved(args.task, DATASETS),
                    steps=pick(args.steps, "steps"), batch_size=pick(args.batch_size, "batch_size"),
                    eval_size=args.eval_size, evals=args.evals, max_length=args.max_length,
                    rank=pick(args.rank, "rank"))


def command_line(settings: Settings, grid: dict[str, Any], out: Path) -> str:
    """The `peftlab compare` command that reproduces (or resumes) this grid."""
    methods = [m for m in grid["methods"] if m not in BASELINES]
    baselines = [m for m in grid["methods"] if m in BASELINES]
    sizes = ",".join(str(n or "all") for n in grid["data_sizes"])
    return (f"peftlab compare --model {settings.model} --task {settings.task} --methods {','.join(methods)} "
            f"--baselines {','.join(baselines) or 'none'} --steps {settings.steps} "
            f"--batch-size {settings.batch_size} --data-sizes {sizes} "
            f"--seeds {','.join(map(str, grid['seeds']))} --eval-size {settings.eval_size} "
            f"--evals {settings.evals} --rank {settings.rank} --max-length {settings.max_length} --out {out}")


def compare_command(args: argparse.Namespace) -> int:
    """`peftlab compare`: run (or resume) the grid, then write results.json, results.md and plots."""
    from .compare_report import markdown_table, summarise, write_report
    settings = settings_from_args(args)
    grid = {"methods": parse_methods(args.methods, args.baselines), "seeds": parse_ints(args.seeds, "--seeds"),
            "data_sizes": parse_sizes(args.data_sizes)}
    cells = plan(grid["methods"], grid["seeds"], grid["data_sizes"])
    out = Path(args.out or f"runs/compare-{Path(settings.model).name}-{Path(settings.task).stem}")
    print(f"{len(cells)} cells ({len(grid['methods'])} methods × {len(grid['seeds'])} seeds × "
          f"{len(grid['data_sizes'])} data sizes), {settings.steps} steps of batch {settings.batch_size} "
          f"each -> {out}")
    started = time.perf_counter()
    try:
        records = run_grid(settings, cells, out, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"interrupted: the finished cells are saved in {out / 'cells'}; run the same command "
              "again to resume", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - started
    paths = write_report(out, settings, grid, records, environment(), seconds=seconds,
                         command=command_line(settings, grid, out))
    print()
    print(markdown_table(summarise(records)))
    print(f"\nwrote {', '.join(str(p) for p in paths)}  ({seconds:.0f} s)")
    return 0

