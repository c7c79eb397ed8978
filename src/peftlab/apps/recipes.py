"""The recipes behind `peftlab train`, `eval`, `compose` and `compare`, shared with the bench
scripts: per-model defaults and the numeric option types, the (model, tokenizer, task, dataset)
job a model name and a task name stand for, a method's config for a run, the run directory
(checked before any work; a fallback when writing it fails) and the run record (run.json) a run
leaves beside its adapter, from which later commands rebuild the base model and check the labels.

Transformers and the assets are imported inside the functions: `peftlab --help` needs neither.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import (
    CapabilityError,
    CheckpointError,
    DataError,
    PeftlabError,
)
from ..core.files import commit_files, write_text
from ..core.io import (
    CONFIG_FILE,
    RECORD_FILE,
    TENSORS_FILE,
    base_record,
    is_adapter_directory,
    read_bytes,
    read_record,
)
from ..core.pretrained import base_source, build_base
from ..core.quantised import Quantization

if TYPE_CHECKING:
    from torch import nn

    from ..assets import Dataset
    from ..core.method import Method, MethodConfig
    from ..core.model import AdaptedModel
    from ..training.pruning import PrunePlan

# Per-model defaults for the main job: small, fast, and known to learn within the step budget.
# Targets default to the method's own (LoRA: attn.q, attn.v). "path": any local model directory.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "smollm2": {"steps": 40, "batch_size": 8, "lr": 2e-3, "rank": 8},
    "minilm": {"steps": 200, "batch_size": 16, "lr": 2e-3, "rank": 8},
    "path": {"steps": 100, "batch_size": 8, "lr": 1e-3, "rank": 8},
}
# |z| above which an FFN activation counts as active in the reported density: GELU and SiLU are
# never exactly 0 (except far in their negative tail), so an exact count says little for them.
DEFAULT_DENSITY_THRESHOLD = 1e-2
RUN_RECORD = "run.json"
CHECKPOINT_NAMES = ("last", "best")   # train's adapter directories inside a run directory


def model_defaults(model: str) -> dict[str, Any]:
    """`peftlab train`'s per-model defaults (steps, batch_size, lr, rank) for a model name or
    directory."""
    return MODEL_DEFAULTS.get(model, MODEL_DEFAULTS["path"])


# ---- numeric options -----------------------------------------------------------------------------
def whole_number(low: int, high: int | None = None, bound: str = "") -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (`bound` words the range in the message).
    argparse refuses any other value with 'argument --NAME: ...' and exit status 2, before a
    command loads anything."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {bound or f'>= {low}'}, got {value}")
        return value
    return parse


POSITIVE = whole_number(1)   # counts and sizes: 0 or less cannot be meant (0 rows, 0 steps, ...)
SEED = whole_number(-2 ** 63, 2 ** 64 - 1, "in torch's seed range [-2**63, 2**64 - 1]")


# ---- models and jobs ------------------------------------------------------------------------------
def is_causal(model_name: str) -> bool:
    """Whether a model name or local model directory is a causal language model."""
    if model_name == "smollm2":
        return True
    if model_name == "minilm":
        return False
    config = Path(model_name) / "config.json"
    try:
        archs = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError) as e:
        raise PeftlabError(f"--model {model_name!r}: cannot read {config} ({e}); give 'smollm2', "
                           "'minilm' or a local transformers model directory") from None
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def load_model_skeleton(path: str) -> nn.Module:
    """The model class a local transformers directory declares, built on the meta device: the
    module tree without reading or allocating any weights."""
    import torch
    import transformers

    if not Path(path).is_dir():
        raise PeftlabError(f"--model {path!r} is not a directory; give a local transformers model "
                           "directory (with config.json)")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise PeftlabError(f"cannot read a transformers config in {path}: {e}") from None
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        return cls(config) if cls is not None else transformers.AutoModel.from_config(config)


def build_job(model_name: str, task_name: str, *, seed: int, max_length: int,
              labels: Sequence[str] | None = None, quantization: Quantization | None = None
              ) -> tuple[nn.Module, Any, Any, Dataset]:
    """(model, tokenizer, task, dataset) for a model name and a task name, as `train` and
    `eval` both need them. `labels`: the label set a saved adapter was trained for (its run
    record's); classification data is then labelled by the index in it, and data with a label
    outside it is refused before the model loads. `quantization`: the base loaded quantised by
    bitsandbytes (`peftlab train --quantize`)."""
    import torch
    import transformers

    from ..assets import load_model

    # Our own progress bar and messages say what happens; silence transformers' load reports.
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from ..training.tasks import (
        CausalLMTask,
        ClassificationTask,
        InstructionClassificationTask,
        RegressionTask,
    )

    data = _job_data(task_name, seed, labels)
    causal = is_causal(model_name)
    torch.manual_seed(seed)   # a new classification head is drawn here
    if data.kind in ("lm", "chat"):
        if not causal:
            raise PeftlabError(f"task {task_name!r} is language modelling; it needs a causal LM "
                               "(--model smollm2 or a causal model directory)")
        model, tok = load_model(model_name, kind="causal-lm", quantization=quantization)
        task = CausalLMTask(tok, max_length=max_length)
    elif data.kind == "regression":
        if causal:
            raise PeftlabError(f"task {task_name!r} is regression; use an encoder (--model minilm)")
        model, tok = load_model(model_name, kind="classification", num_labels=1,
                                quantization=quantization)
        task = RegressionTask(tok, max_length=max_length)
    elif causal:
        model, tok = load_model(model_name, kind="causal-lm", quantization=quantization)
        task = InstructionClassificationTask(tok, labels=list(data.labels), max_text_tokens=max_length)
    else:
        model, tok = load_model(model_name, kind="classification", num_labels=len(data.labels),
                                quantization=quantization)
        task = ClassificationTask(tok, max_length=max_length)
    return model, tok, task, data


def _job_data(task_name: str, seed: int, labels: Sequence[str] | None) -> Dataset:
    """The task's dataset, labelled by the index in `labels` when given (see `build_job`)."""
    from ..assets import load_dataset
    if labels is None:
        return load_dataset(task_name, seed=seed)
    try:
        return load_dataset(task_name, seed=seed, labels=labels)
    except PeftlabError:
        own = load_dataset(task_name, seed=seed)   # a damaged file raises its own error here
        if own.labels is None:   # no classes to compare (LM or regression data): the head decides
            return own
        raise DataError(f"task {task_name!r} has the labels {own.labels}, but the adapter was "
                        f"trained for the labels {list(labels)} (its run.json): a score would "
                        "compare different classes; score it on data with those labels") from None


def method_config(method: Method, targets: str | None, rank: int, *, train_head: bool) -> MethodConfig:
    """The method's config for `peftlab train`: its own default targets unless --targets is
    given, --rank where the method has a rank (alpha keeps the method's default alpha/r: 2 for
    LoRA, 1 for BA-LoRA's PiSSA start), and the classification head trained with the adapter
    when the model gets a new one."""
    default = method.config_cls()
    fields: dict[str, Any] = {"r": rank}
    if getattr(default, "alpha", None) and getattr(default, "r", None):
        fields["alpha"] = rank * default.alpha / default.r
    if targets:
        fields["targets"] = targets.split(",")
    if train_head:
        fields["modules_to_save"] = ["head"]
    known = method.config_cls.__dataclass_fields__
    config = method.config_cls(**{k: v for k, v in fields.items() if k in known})
    config.validate()
    return config


def same_model(a: str, b: str) -> bool:
    """Whether two run records' --model values name one model (paths compared resolved)."""
    def key(m: str) -> str:
        return str(Path(m).resolve()) if Path(m).is_dir() else m
    return key(a) == key(b)


class HeldOutReport:
    """Held-out metrics of an adapted model on fixed rows, printed as they are measured; with a
    `threshold`, also DEFT's exact FFN activation density (the fraction of |z| > threshold)."""

    def __init__(self, am: AdaptedModel, task: Any, rows: list[dict[str, Any]], *,
                 batch_size: int, threshold: float | None = None) -> None:
        self.am, self.task, self.rows = am, task, rows
        self.batch_size = batch_size
        self.threshold = threshold

    def measure(self, when: str, *, base: bool = False) -> dict[str, float]:
        """Score the model (`base`: with the adapters disabled) and print the metrics."""
        from ..training.tasks import format_metrics
        with self.am.disabled() if base else nullcontext():
            metrics = self.task.evaluate(self.am.eval(), self.rows, self.batch_size)
            if self.threshold is not None:
                metrics["ffn_density"] = self.density()
        print(f"{when}: {format_metrics(metrics)}")
        return metrics

    def density(self) -> float:
        """The FFN activation density on the rows."""
        from ..training.objectives import activation_density
        batches = ({k: v for k, v in self.task.collate(self.rows[i:i + self.batch_size]).items()
                    if k != "labels"} for i in range(0, len(self.rows), self.batch_size))
        return activation_density(self.am, batches, threshold=self.threshold)["density"]


# ---- run records --------------------------------------------------------------------------------
def write_run_record(directory: Path, run: dict[str, Any]) -> Path:
    """Write `run` as directory/run.json (atomically); return its path."""
    commit_files(directory, {RUN_RECORD: write_text(json.dumps(run, indent=2) + "\n")})
    return directory / RUN_RECORD


# ---- the run directory ----------------------------------------------------------------------------
def check_output_dir(directory: Path, need_bytes: int = 0, *, option: str = "--out") -> None:
    """Refuse (CheckpointError, before any work and without creating anything) an output
    directory that cannot be written: a path that is or lies under a file, a directory in which no
    file can be created (tried, since root ignores mode bits), or a file system with less free
    space than `need_bytes`."""
    existing = directory
    while not existing.is_dir() and existing.parent != existing:   # ("." when the cwd was removed)
        if existing.exists() or existing.is_symlink():   # a file, or a broken or looping link
            what = "it is a file" if existing.is_file() else "it is a link to nowhere or a loop" \
                if existing.is_symlink() else "it is a special file"
            raise CheckpointError(f"{option} {directory}: {existing} is not a directory ({what}); "
                                  "choose a directory for the run")
        existing = existing.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".peftlab-write-check-", dir=existing)
    except OSError as e:
        raise CheckpointError(f"{option} {directory}: cannot write in {existing} ({e.strerror}); "
                              "choose a writable directory") from None
    os.close(fd)
    os.unlink(probe)
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        raise CheckpointError(f"{option} {directory}: the adapter needs about {need_bytes:,} bytes "
                              f"and {existing} has {free:,} bytes free; free some space or choose "
                              "another directory")


def adapter_bytes(am: AdaptedModel, name: str) -> int:
    """Bytes adapter `name` takes on disk, roughly: its tensors plus room for the JSON files."""
    return sum(t.numel() * t.element_size() for t in am.adapter_tensors(name).values()) + 2 ** 16


class RunOutput:
    """Where a run is written (the adapter in last/, its Light-PEFT plan, run.json): the requested
    directory, refused at once when it cannot be written (`check_output_dir`), or, once writing
    there fails all the same, a fresh fallback directory under the system's temporary directory
    (else the current one) that receives every file of the run, so a trained adapter is never
    lost to a bad location. `problem` says why the move happened."""

    def __init__(self, directory: Path) -> None:
        check_output_dir(directory)   # refused before any work when it cannot be written
        self.requested = self.directory = directory
        self.problem: str | None = None
        self._writers: list[Callable[[Path], None]] = []
        self._fallbacks = iter((Path(tempfile.gettempdir()), Path.cwd()))

    def check(self, need_bytes: int) -> None:
        """Refuse the directory when its file system has less than `need_bytes` free."""
        check_output_dir(self.directory, need_bytes)

    def write(self, *writers: Callable[[Path], None]) -> Path:
        """Call each writer on the run directory; when one fails (OSError or PeftlabError), call
        all of them so far on the next fallback directory instead. Returns the directory written."""
        self._writers.extend(writers)
        pending, failures = list(writers), []
        while True:
            try:
                for write in pending:
                    write(self.directory)
                return self.directory
            except (OSError, PeftlabError) as e:
                failures.append(f"{self.directory}: {e}")
                self.problem = self.problem or str(e)
                if pending is self._writers and self.directory != self.requested:
                    shutil.rmtree(self.directory, ignore_errors=True)   # our fallback, half written
            self.directory = self._next_fallback(failures)
            pending = self._writers

    def _next_fallback(self, failures: list[str]) -> Path:
        for parent in self._fallbacks:
            try:
                return Path(tempfile.mkdtemp(prefix=f"peftlab-{self.requested.name or 'run'}-", dir=parent))
            except OSError as e:
                failures.append(f"{parent}: {e}")
        raise CheckpointError("cannot save the whole run anywhere: " + "; ".join(failures))

    def report(self) -> str:
        """Where the run went, when it is not where it was asked to go."""
        return (f"cannot write the run to {self.requested} ({self.problem}); the trained adapter is "
                f"safe in {self.directory} (last/ and run.json): move it where you want it")


def write_prune_plan(directory: Path, plan: PrunePlan | None) -> None:
    """Save a run's Light-PEFT plan in `directory`; without one, remove an earlier run's plan
    there, which would otherwise prune the base this run's adapter is loaded on."""
    from ..training.pruning import PLAN_FILE, save_plan
    if plan is not None:
        save_plan(directory, plan)
    else:
        (directory / PLAN_FILE).unlink(missing_ok=True)


def run_record_path(adapter_dir: Path) -> Path | None:
    """The run.json that describes an adapter directory: in it, or in the run directory above."""
    for candidate in (adapter_dir / RUN_RECORD, adapter_dir.parent / RUN_RECORD):
        if candidate.is_file():
            return candidate
    return None


def read_run_record(path: Path) -> dict[str, Any]:
    """The run record in the file `path`."""
    try:
        run = json.loads(path.read_text())
    except ValueError as e:
        raise PeftlabError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(run, dict):
        raise PeftlabError(f"{path} is not a peftlab run record (a JSON object)")
    return run


def run_record(adapter_dir: Path) -> dict[str, Any]:
    """The run record that describes an adapter directory (see `run_record_path`)."""
    path = run_record_path(adapter_dir)
    if path is None:
        raise PeftlabError(f"no run.json beside {adapter_dir}: pass --model and --task")
    return read_run_record(path)


def find_adapter(text: str) -> tuple[Path, Path | None]:
    """(adapter directory, its run.json or None) for an adapter directory given on the command
    line, whatever wrote it (peftlab train, compose, am.save_adapter, peft); a run directory
    stands for the adapter train saved in it (RUN/last)."""
    directory = Path(text)
    if not directory.is_dir():
        raise PeftlabError(f"{text} {'is not a directory' if directory.exists() else 'does not exist'}; "
                           "give adapter directories written by peftlab train (RUN/last), compose, "
                           "am.save_adapter or peft")
    if not is_adapter_directory(directory):
        inner = next((directory / c for c in CHECKPOINT_NAMES if is_adapter_directory(directory / c)), None)
        if inner is None:
            raise PeftlabError(f"{text} is not an adapter directory (no {RECORD_FILE} or {CONFIG_FILE}); "
                               "give one written by peftlab train (RUN/last), compose, "
                               "am.save_adapter or peft")
        directory = inner
    return directory, run_record_path(directory)


def recorded_model(adapter_dir: Path, run: dict[str, Any] | None) -> str:
    """The base model an adapter records, as --model would name it: its run's --model, else
    the name or directory its record (or a peft config) holds ("" when none)."""
    return (run or {}).get("model") or base_record(adapter_dir)["name_or_path"]


def base_for_adapter(adapter_dir: Path, model: str | None = None) -> AdaptedModel:
    """The base model of a saved adapter without its run (no task, no tokenizer): `model` (a
    name or directory) or the one the adapter records, pruned by a Light-PEFT plan saved with
    it; CheckpointError naming what was looked for and --model when that names nothing here."""
    from .. import adapt
    base, source = build_base(adapter_dir, model=model, option="--model")
    plan = prune_plan(adapter_dir)
    if plan is not None:
        plan.apply(base)
    return adapt(base, base_name=source)


def prune_plan(adapter_dir: Path) -> PrunePlan | None:
    """The Light-PEFT plan saved with an adapter (in its directory or the run directory), or None."""
    from ..training.pruning import load_plan
    return load_plan(adapter_dir, missing_ok=True) or load_plan(adapter_dir.parent, missing_ok=True)


def base_for_run(run: dict[str, Any], adapter_dir: Path, *, model: str | None = None,
                 task: str | None = None, seed: int = 0, max_length: int = 96
                 ) -> tuple[AdaptedModel, Any, Any, Dataset]:
    """The fresh base model a run record describes, wrapped for adapters: the run's model and
    task (unless `model` / `task` are given), its seed (which draws a new classification head)
    and max_length and its quantised base (`recorded_quantization`), pruned by the Light-PEFT
    plan saved with the adapter in `adapter_dir`. Data
    with other labels than the run's (where it records them) is refused.
    Returns (am, tokenizer, task, data)."""
    from .. import adapt
    model_name, task_name = model or run["model"], task or run["task"]
    base, tok, task_obj, data = build_job(model_name, task_name, seed=run.get("seed", seed),
                                          max_length=run.get("max_length", max_length),
                                          labels=run.get("labels"),
                                          quantization=recorded_quantization(adapter_dir, run))
    # A Light-PEFT run saved its plan in the run directory: prune the fresh base the same way.
    plan = prune_plan(adapter_dir)
    if plan is not None:
        plan.apply(base)
    return adapt(base, base_name=model_name), tok, task_obj, data


def load_run_adapter(adapter_dir: Path, *, model: str | None = None, task: str | None = None,
                     seed: int = 0, max_length: int = 96
                     ) -> tuple[AdaptedModel, Any, Any, Dataset, dict[str, Any]]:
    """A saved adapter on the base its run record describes (or on `model` and `task`, when both
    are given: then no run record is needed, but the label set of one found is still checked),
    active as "adapter", in eval mode. Without a run record (an adapter saved by
    am.save_adapter, or a peft adapter) the base is the one the adapter records unless `model`
    is given, and `task` is needed. Returns (am, tokenizer, task, data, run record)."""
    path = run_record_path(adapter_dir)
    if model and task:
        labels = read_run_record(path).get("labels") if path is not None else None
        run = {"labels": labels} if labels is not None else {}
    elif path is not None:
        run = read_run_record(path)
    elif task is None:
        raise PeftlabError(f"no run.json in or beside {adapter_dir} says which task it was trained "
                           "for: pass --task")
    else:
        run, model = {}, base_source(adapter_dir, option="--model")
    am, tok, task_obj, data = base_for_run(run, adapter_dir, model=model, task=task, seed=seed,
                                           max_length=max_length)
    am.load_adapter(adapter_dir, "adapter")
    am.set_active(["adapter"])
    return am.eval(), tok, task_obj, data, run


def load_causal_adapter(adapter_dir: Path, model: str | None = None) -> tuple[AdaptedModel, Any]:
    """(a saved adapter on its causal LM, active as "adapter", in eval mode; the tokenizer) with
    no task: the base is `model` or the one the adapter records (for `peftlab generate` on an
    adapter without a run record)."""
    from .. import adapt
    from ..assets import load_model
    name = base_source(adapter_dir, model, option="--model")
    base, tok = load_model(name, kind="causal-lm", quantization=recorded_quantization(adapter_dir, None))
    plan = prune_plan(adapter_dir)
    if plan is not None:
        plan.apply(base)
    am = adapt(base, base_name=name)
    am.load_adapter(adapter_dir, "adapter")
    am.set_active(["adapter"])
    return am.eval(), tok


def recorded_quantization(adapter_dir: Path, run: dict[str, Any] | None) -> Quantization | None:
    """The bitsandbytes quantisation of an adapter's base: its run.json's, else its peftlab.json's."""
    if run is not None and "quantization" in run:
        source = run_record_path(adapter_dir) or adapter_dir
        return Quantization.from_record(run["quantization"], str(source))
    return base_record(adapter_dir)["quantization"]


def serve_quantization(adapters: Path) -> Quantization | None:
    """The quantisation the adapters under `adapters` record for their base; PeftlabError when
    they record different ones."""
    from ..core.bank import scan_adapters
    found: dict[Quantization | None, list[str]] = {}
    for name, directory in (scan_adapters(adapters) if adapters.is_dir() else {}).items():
        path = run_record_path(directory)
        try:
            quantization = recorded_quantization(directory, read_run_record(path) if path else None)
        except PeftlabError:   # a damaged adapter: the bank says so when it is asked for
            continue
        found.setdefault(quantization, []).append(name)
    if len(found) > 1:
        listed = "; ".join(f"{q.describe() if q else 'unquantised'} ({', '.join(n[:3])})" for q, n in found.items())
        raise PeftlabError(f"--adapters {adapters}: the adapters were trained on bases quantised "
                           f"differently ({listed}); serve each kind from its own folder")
    return next(iter(found), None)


def serve_model(adapters: Path) -> str:
    """The base model that every adapter under `adapters` (DIR/NAME or DIR/NAME/last) records,
    for `peftlab serve` without --model; PeftlabError when they name none or several, or one
    that is not on this machine."""
    from ..core.bank import scan_adapters
    if not adapters.is_dir():
        raise PeftlabError(f"--adapters {adapters} is not a directory; give the folder of adapters")
    found = scan_adapters(adapters)
    names: dict[str, list[str]] = {}
    for name, directory in found.items():
        run = run_record_path(directory)
        names.setdefault(recorded_model(directory, run and read_run_record(run)), []).append(name)
    if len(names) != 1 or "" in names:
        listed = "; ".join(f"{m or 'none'} ({', '.join(n[:3])})" for m, n in names.items())
        raise PeftlabError(f"--adapters {adapters}: the adapters name {listed or 'no adapters'} as their "
                           "base model: pass --model (smollm2, minilm or a local model directory)")
    model = next(iter(names))
    return base_source(next(iter(found.values())), model, option="--model")


# ---- export / import -------------------------------------------------------------------------------
def export_peft_files(adapter_dir: Path, out: Path, model: str | None = None) -> list[str]:
    """Write the peft adapter of a saved adapter into `out` (peft's two files only) and return
    their names. Copied from the directory where its save wrote them (a format 2 directory, or a
    peft adapter); otherwise (format 1) the adapter is loaded on its base (`model`, or the one
    it records) and exported. CapabilityError, before anything is loaded, for a method peft does
    not have."""
    from ..interop.peft_format import export_peft
    meta = read_record(adapter_dir)[1]
    note = (meta or {}).get("interchange", {}).get("peft")
    if meta is None or (note and note.get("files")):
        names = [CONFIG_FILE, TENSORS_FILE] if meta is None else note["files"]
        if sorted(names) != sorted([CONFIG_FILE, TENSORS_FILE]):   # never other paths a record names
            raise CheckpointError(f"{adapter_dir / RECORD_FILE}: field 'interchange' lists {names!r:.80} "
                                  f"as peft's files, not {CONFIG_FILE} and {TENSORS_FILE}; the file was "
                                  "edited: save the adapter again")
        data = {n: read_bytes(adapter_dir / n) for n in names}
        commit_files(out, {n: (lambda path, b=b: path.write_bytes(b)) for n, b in data.items()})
        return names
    if note is not None:                  # format 2 without peft files: the record says why
        raise CapabilityError(f"{adapter_dir}: {note.get('why_not', 'no peft files were written')}")
    am = base_for_adapter(adapter_dir, model)
    am.load_adapter(adapter_dir, "adapter")
    export_peft(am, "adapter", out)
    return [CONFIG_FILE, TENSORS_FILE]


def import_peft_dir(peft_dir: Path, out: Path, model: str | None = None, name: str = "default"
                    ) -> AdaptedModel:
    """A peft adapter directory saved as a peftlab one in `out` (peftlab.json beside peft's
    files), on its base: `model` or the peft config's base_model_name_or_path."""
    if read_record(peft_dir)[1] is not None:
        raise PeftlabError(f"{peft_dir} is already a peftlab adapter directory (it holds "
                           f"{RECORD_FILE} or a peftlab record): load it as it is")
    am = base_for_adapter(peft_dir, model)
    am.load_adapter(peft_dir, name)
    am.save_adapter(out, name)
    return am
