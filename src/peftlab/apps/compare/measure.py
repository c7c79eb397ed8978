"""How `peftlab compare` measures a cell: the memory full fine-tuning needs, input tokens, forward
latency, bytes on disk, and the environment the numbers come from (peak memory: `PeakRSS` in
training/memory.py)."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ... import __version__
from ...training.memory import MEMORY_MEASURE

LATENCY_REPEATS = 10
FULL_FIT_MARGIN = 0.8   # share of the available memory full fine-tuning may plan for: activations need the rest


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
        """The task's batch, its input tokens counted."""
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


def warm_up(model: nn.Module, task: Any, rows: list[dict]) -> None:
    """One forward and backward pass, gradients dropped: a process's first passes set up thread
    pools, kernels and allocator pools, a one-time cost that would otherwise land on whichever
    cell runs first."""
    model.train()
    task.loss(model, task.collate(rows)).backward()
    model.zero_grad(set_to_none=True)


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
    root = Path(__file__).resolve().parents[4]   # src/peftlab/apps/compare/measure.py

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

    return {
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peftlab": __version__,
        "platform": platform.platform(), "cpu": _cpu_model(), "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device": "cpu", "git": _git(), "memory_measure": MEMORY_MEASURE,
    }


