"""Peak memory, measured the same way wherever peftlab reports it: `peak_memory` for a whole
process (what `peftlab train` prints and writes to run.json), `PeakRSS` for the growth during one
block (what `peftlab compare` measures per cell).

On the CPU, torch's allocator keeps no peak counter and tracemalloc does not see tensor memory,
so both read the kernel's resident-set high-water mark (VmHWM in /proc/self/status, Linux).
On a GPU the peak is torch's own `max_memory_allocated` for the device (tensors only: the
caching allocator's reserve and the CUDA context come on top).
"""

from __future__ import annotations

import ctypes
import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import torch

MEMORY_MEASURE = ("peak resident set (RSS) growth during training: the kernel's high-water mark "
                  "VmHWM, reset through /proc/self/clear_refs with freed heap trimmed first, minus "
                  "VmRSS at the start (Linux)")
_RSS_PEAK = ("resident set (RSS) high-water mark of the process: the kernel's VmHWM (Linux), since "
             "the process started")
_GPU_PEAK = "torch.cuda.max_memory_allocated on {device}: tensors only, since the process started"


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM); OSError where there is none."""
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
            # 5: reset VmHWM to the current RSS (a kernel switch, not a file: no atomic writer)
            Path("/proc/self/clear_refs").write_text("5")
            self.start: int | None = status_kib("VmRSS")
        except OSError:
            self.start = None
        self.peak_bytes: int | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.start is not None:
            self.peak_bytes = 1024 * (status_kib("VmHWM") - self.start)


@dataclass(frozen=True)
class PeakMemory:
    bytes: int | None     # None: this platform offers no such measure
    measure: str          # what was measured, in words

    def describe(self) -> str:
        """'512.3 MiB (<measure>)', for a summary line."""
        amount = "unknown" if self.bytes is None else f"{self.bytes / 2 ** 20:.1f} MiB"
        return f"{amount} ({self.measure})"


def peak_memory(device: torch.device | str = "cpu") -> PeakMemory:
    """The process's peak memory so far on `device`: the RSS high-water mark for the CPU (unless
    a `PeakRSS` block reset it since), torch's max_memory_allocated for a CUDA device."""
    device = torch.device(device)
    if device.type == "cuda":
        return PeakMemory(torch.cuda.max_memory_allocated(device), _GPU_PEAK.format(device=device))
    try:
        return PeakMemory(1024 * status_kib("VmHWM"), _RSS_PEAK)
    except OSError:
        return PeakMemory(None, "unavailable: no /proc/self/status (the RSS peak is read on Linux)")
