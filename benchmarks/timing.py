"""Timing and the machine: warm-up, interleaved repeats, median and IQR; CPU, threads and versions.

Every figure of the suite is a median of timed calls made after warm-up calls. Contenders that are compared
(eager vs ONNX Runtime, eager vs compiled) are timed in the same loop, alternating call by call, so a load
change on a shared machine hits them alike instead of whichever happened to run at the time. A short untimed
pause before each timed call lets the previous call's thread pool go idle: ONNX Runtime's and OpenMP's worker
threads spin for a while after their work, and on 2 cores they would slow whichever call came next.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import torch

from moe_core.runtime.ort_session import physical_cores


@dataclass
class Timing:
    seconds: list[float]  # every timed call, in order
    output: Any = field(default=None, repr=False)  # what the last call returned (for correctness checks)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def iqr(self) -> float:
        if len(self.seconds) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.seconds, n=4, method="inclusive")
        return q3 - q1

    def to_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "iqr_s": self.iqr, "repeats": len(self.seconds), "seconds": self.seconds}


PAUSE_S = 0.02
K = TypeVar("K")  # what names a timed function: a path's name, or a factor's value (benchmarks/scaling.py)


def measure(fns: Mapping[K, Callable[[], Any]], warmup: int, repeats: int) -> dict[K, Timing]:
    """Time each function: `warmup` untimed calls each, then `repeats` timed rounds calling them in turn."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[K, list[float]] = {name: [] for name in fns}
    outputs: dict[K, Any] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(PAUSE_S)
            t0 = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: Timing(times[name], outputs[name]) for name in fns}


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy since boot, all cores and processes (Linux /proc/stat)."""
    with open("/proc/stat", encoding="ascii") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@contextmanager
def cpu_use(into: dict[str, Any], key: str) -> Iterator[None]:
    """Record a block's wall time, the CPU time of this process and the cores other processes took meanwhile
    (machine busy time minus ours, per second). Above ~0.1 the machine was shared: that block's figures are
    slower than this machine can do, eager PyTorch's most (an OpenMP barrier waits for a preempted thread)."""
    w0, c0, m0 = time.perf_counter(), time.process_time(), machine_busy_s()
    yield
    wall, cpu, busy = time.perf_counter() - w0, time.process_time() - c0, machine_busy_s() - m0
    into[key] = {"wall_s": wall, "cpu_s": cpu, "others_cores": max(0.0, busy - cpu) / wall}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def set_threads(threads: int | None) -> int:
    """Use `threads` (default: the physical cores) for PyTorch; the suite gives ONNX Runtime the same number."""
    threads = threads or physical_cores()
    torch.set_num_threads(threads)
    return threads


def omp_wait_policy() -> str:
    """PyTorch's OpenMP wait policy as it applied: set before torch loaded (benchmarks/__init__.py) or not."""
    from . import OMP_POLICY_BEFORE_TORCH  # noqa: PLC0415 - set when the package is imported

    value = os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP's default)")
    return value if OMP_POLICY_BEFORE_TORCH else f"as torch loaded it (before the suite; now {value})"


def source_tree() -> dict[str, Any]:
    """The code measured: the git commit of the checkout the suite runs from and its tracked files modified since
    (None outside a git checkout)."""
    import subprocess  # noqa: PLC0415

    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True,
                                  timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "--short", "HEAD")
    if commit is None:
        return {"commit": None, "modified": None}
    status = git("status", "--porcelain", "--untracked-files=no") or ""
    return {"commit": commit.strip(), "modified": [line[3:] for line in status.splitlines() if line.strip()]}


def machine_info(threads: int) -> dict[str, Any]:
    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    return {
        "cpu": cpu_name(), "logical_cpus": os.cpu_count(), "physical_cores": physical_cores(),
        "torch_threads": torch.get_num_threads(), "ort_intra_op_threads": threads,
        "load_average": list(os.getloadavg()),
        "omp_wait_policy": omp_wait_policy(),
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(), "torch": torch.__version__,
        **{pkg: version(pkg) for pkg in ("onnxruntime", "onnx", "onnxscript", "numpy")},
    }
