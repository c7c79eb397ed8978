"""Running a `peftlab compare` grid: each cell trains on a freshly loaded model and is measured
(`run_cell`), finished cells are written as they finish and reused by a rerun of the same
settings (`run_grid`), and `compare_command` runs the whole command."""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...core.errors import PeftlabError
from ...core.files import commit_files, write_text
from ...core.model import AdaptedModel, adapt
from ...core.typology import summarise_sites
from ...methods import get_method
from ...training.loop import TrainConfig, train
from ...training.memory import PeakRSS
from ...training.tasks import ClassificationTask, RegressionTask
from ..recipes import build_job, method_config
from .measure import (
    TokenCounter,
    available_memory,
    directory_bytes,
    environment,
    forward_ms,
    full_fit_problem,
    warm_up,
)
from .report import markdown_table, require_matplotlib, summarise, write_report
from .settings import (
    BASELINES,
    Cell,
    Settings,
    cell_key,
    cell_spec,
    command_line,
    parse_ints,
    parse_methods,
    parse_sizes,
    plan,
    settings_from_args,
)

# The typology columns of the baselines, which no method record declares.
BASELINE_TYPOLOGY = {
    "probe": {"form": "head only", "site": "head", "integration": "none", "mergeable": False},
    "full": {"form": "all weights", "site": "all", "integration": "in place", "mergeable": False},
}
PERSISTED = ("ok", "failed")   # refusals are settled answers; crashes and skips are tried again


class NotRun(PeftlabError):
    """A baseline that does not apply to this job or fit this machine: the cell is skipped."""


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
            model = am.unload()
            # save_model, not a tensor writer: it drops the duplicates of tied weights.
            commit_files(Path(tmp), {"model.safetensors": lambda path: save_model(model, str(path))})
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
    sites = summarise_sites((s.label, s.layer) for s in adapter.sites)
    return {
        "train_examples": len(rows),
        "eval_examples": len(eval_rows),
        "trainable": trainable,
        "base_params": base,
        "trainable_pct": 100 * trainable / base,
        "head_params": head,
        "adapter_params": trainable if cell.method in BASELINES else am.count_parameters(cell.method),
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
                commit_files(cell_dir, {f"{record['key']}.json": write_text(json.dumps(record, indent=1) + "\n")})
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


def compare_command(args: argparse.Namespace) -> int:
    """`peftlab compare`: run (or resume) the grid, then write results.json, results.md and plots."""
    require_matplotlib()   # before the grid: the plots come last, after hours of training
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

