"""Peak-memory probes for benchmarks and the demo: CUDA allocator peaks, CPU peak RSS."""

from __future__ import annotations

import contextlib
import os

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """``with PeakMemory(device) as probe: ...`` then ``probe.peak_extra_bytes``.

    CUDA: ``max_memory_allocated`` above the allocation at entry. CPU (Linux): the process's
    resident-set high-water mark, reset at entry through ``/proc/self/clear_refs`` so that
    earlier peaks (imports, warm-up) do not count, minus the resident set at entry.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.peak_extra_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current VmRSS
            self._base = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _status_kib("VmHWM") * 1024
        self.peak_extra_bytes = max(peak - self._base, 0)
        return False


def cpu_probe_available() -> bool:
    """Whether the CPU probe works here (Linux with a writable clear_refs)."""
    with contextlib.suppress(OSError):
        return os.access("/proc/self/clear_refs", os.W_OK) and _status_kib("VmHWM") > 0
    return False
