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
are never mixed in. The report turns the records into results.json, results.md and plots.

The modules: `settings` (what a grid is: Settings, Cell, cell keys, the parsed options),
`measure` (memory, time, tokens, bytes and the environment), `grid` (one cell's run, the
resumable grid, the command) and `report` (summary over seeds, table, plots, files).
"""

from ...training.memory import PeakRSS
from .grid import NotRun, compare_command, run_cell, run_grid
from .measure import environment, warm_up
from .report import summarise, write_report
from .settings import Cell, Settings

__all__ = ["Cell", "NotRun", "PeakRSS", "Settings", "compare_command", "environment", "run_cell",
           "run_grid", "summarise", "warm_up", "write_report"]
