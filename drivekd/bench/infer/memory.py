"""Peak memory of the worker process: CUDA allocator statistics, else the resident set (`VmHWM`).

Apart because resetting the CPU peak after the load is Linux-specific (/proc, malloc_trim).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource

import torch


def rss_mb() -> float:
    """Resident set of this process now."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _hwm_mb() -> float | None:
    """Peak resident set of this process image (`VmHWM`), None where /proc is not there."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak(device: torch.device) -> bool:
    """Start a new peak from now; False where the CPU peak cannot be reset."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return True
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap (e.g. the pre-quantisation copy) back
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_mb(device: torch.device) -> tuple[float, str]:
    """(peak since the last `reset_peak`, the counter it was read from)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda.max_memory_allocated"
    hwm = _hwm_mb()
    if hwm is not None:
        return hwm, "VmHWM"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ru_maxrss"
