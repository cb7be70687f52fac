"""This process's memory, for every benchmark: CUDA allocator statistics, else the resident set.

The CPU peak is `VmHWM` (peak RSS of this process image), reset through /proc/self/clear_refs
(Linux >= 4.0). `getrusage(...).ru_maxrss` is only a fallback: after fork + exec Linux carries the
parent's peak into the child's.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import resource

import torch


def rss_bytes() -> int:
    """Resident set of this process now."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def rss_mb() -> float:
    return rss_bytes() / 2**20


def peak_rss_bytes() -> int:
    """Peak resident set of this process image since start or the last reset."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_freed() -> None:
    """Hand freed heap memory back to the OS, so the RSS holds live memory only."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Set this process's peak RSS back to its current RSS; False where /proc cannot do it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def reset_peak(device: torch.device) -> bool:
    """Start a new peak from now; False where the CPU peak cannot be reset."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return True
    release_freed()  # give freed heap (e.g. the pre-quantisation copy) back
    return reset_peak_rss()


def peak_mb(device: torch.device) -> tuple[float, str]:
    """(peak since the last `reset_peak`, the counter it was read from)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda.max_memory_allocated"
    return peak_rss_bytes() / 2**20, "VmHWM" if os.path.exists("/proc/self/status") else "ru_maxrss"
