"""What every benchmark here shares: the machine line of its table, and best-of-N timing."""

from __future__ import annotations

import os
import platform
import time
from typing import Callable

import numpy as np


def machine() -> str:
    """CPU model, cores, OS, Python and NumPy (and MLX's device when MLX is imported)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    out = (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
           f"Python {platform.python_version()}, NumPy {np.__version__}")
    import sys

    if "mlx.core" in sys.modules:
        mx = sys.modules["mlx.core"]
        dev = mx.default_device()
        name = ""
        if dev.type == mx.DeviceType.gpu:
            try:
                name = " " + mx.device_info().get("device_name", "")
            except Exception:  # noqa: BLE001 - informational only
                pass
        out += f"; MLX {mx.__version__} on {dev}{name}"
    return out


def best_of(fn: Callable[[], object], repeat: int,
            clock: Callable[[], float] = time.perf_counter) -> float:
    """The best time of ``repeat`` calls of ``fn``, in seconds: wall time, or with
    ``clock=time.process_time`` this process's CPU time (which other processes on a shared
    machine inflate far less; equal to the wall time of single-threaded code on an idle one)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best
