"""What a `peftlab compare` grid is: the settings every cell shares, the cells (method × seed ×
training-set size), the key that names a cell's file, and the command line that reproduces a grid."""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ...assets import DATASETS, MODELS
from ...core.errors import ConfigError, close_matches
from ...methods import METHODS, get_method
from ..recipes import model_defaults

BASELINES = ("probe", "full")
PROBE_LR = 1e-2   # the best of 2e-3 / 1e-2 / 3e-2 for the MiniLM probe (bench/methods_vs_probe.py)
FULL_LR = 1e-4    # every weight moves: far below the adapters' rates


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
        """'lora seed 0 n=all', for progress lines."""
        return f"{self.method} seed {self.seed} n={self.size or 'all'}"



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


def _resolved(name: str, builtin: tuple[str, ...]) -> str:
    """A local path as its absolute form, so the cells of one file key alike from any directory;
    a built-in model or data set name as it is."""
    if name.strip().lower() in builtin or not Path(name).expanduser().exists():
        return name
    return str(Path(name).expanduser().resolve())


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from `peftlab compare`'s options, unset ones from `peftlab train`'s per-model
    defaults."""
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

