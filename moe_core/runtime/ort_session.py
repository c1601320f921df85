"""ONNX Runtime sessions, one factory for every reader of an exported graph (serve, the parity check of `moe
export`, the benchmarks). Torch-free; onnxruntime is imported when a session is made.

CPU session options: graph optimisation ORT_ENABLE_ALL (constant folding and the generic fusions; the
transformer fusions do not match a custom MoE/MoH graph, but nothing is lost by trying), intra-op threads =
physical cores (a second hyper-thread on the same core only contends for the same FMA units), one inter-op
thread with ORT_SEQUENTIAL execution (the graph is one long chain of dependent ops: parallel branches are
tiny, and inter-op threads would compete with the intra-op pool), intra-op workers that sleep when idle
instead of spinning (session_options says why). `--threads` overrides the intra-op count, up to the CPUs the
process may use (intra_op_threads).
"""

from __future__ import annotations

import functools
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

CPU_EP = "CPUExecutionProvider"


CUDA_EP = "CUDAExecutionProvider"


def ort_session(model: str | os.PathLike | bytes, threads: int | None = None, providers: Sequence[Any] = (CPU_EP,)):
    """An onnxruntime.InferenceSession of `model` (a file path or the serialized graph) with session_options(threads)
    on `providers` (CPU by default)."""
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=session_options(threads), providers=list(providers))


# -- where ONNX Runtime placed the graph --------------------------------------------------------------------------
#
# A node the CUDA provider has no kernel for (at its op, opset and types) runs on the CPU, with a copy of its inputs
# to the host and of its outputs back, each with a stream sync, inside every forward; and a session with such a node
# cannot capture CUDA graphs. ONNX Runtime says so only in its log ("kernel not found", "N Memcpy nodes are added"),
# at levels a serving session does not print. So a session that should run on CUDA is created with its log read
# (session_with_placement): nodes per provider from ORT's own record, and the missing kernels and copies from its log.
# Shape arithmetic (Shape / Gather / Reshape / Concat over sizes) that the CUDA provider itself keeps on the host costs
# no copy of an activation: it is counted per provider, never as a fallback.
MISSING_KERNEL = re.compile(r"CUDA kernel not found in registries for Op type: (\S+)")
MEMCPY_ADDED = re.compile(r"(\d+) Memcpy nodes are added")


@dataclass
class Placement:
    nodes: dict[str, int]  # provider -> nodes assigned to it
    no_cuda_kernel: dict[str, int]  # op type -> nodes the CUDA provider has no kernel for
    memcpy: int  # copy nodes between host and device that ONNX Runtime inserted

    @property
    def clean(self) -> bool:
        """Everything that computes runs on the device: no missing kernel, no copy."""
        return not self.no_cuda_kernel and not self.memcpy

    def summary(self) -> str:
        nodes = ", ".join(f"{ep.removesuffix('ExecutionProvider')} {n}" for ep, n in self.nodes.items())
        missing = ", ".join(f"{op} x{n}" for op, n in self.no_cuda_kernel.items())
        return (f"nodes: {nodes} | Memcpy nodes: {self.memcpy}"
                + (f" | no CUDA kernel: {missing}" if missing else ""))


def session_with_placement(model: str | os.PathLike | bytes, threads: int | None, providers: Sequence[Any]):
    """(ort_session's session, its Placement): created with ONNX Runtime's placement record on and its log, at the
    level that names missing kernels, captured from the process's stderr (where the C++ logger writes) and read."""
    import onnxruntime as ort

    opts = session_options(threads)
    opts.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    opts.log_severity_level = 1  # info: "kernel not found" (info) and "Memcpy nodes are added" (warning)
    source = model if isinstance(model, bytes) else str(model)
    with captured_stderr() as log:
        session = ort.InferenceSession(source, sess_options=opts, providers=list(providers))
    nodes: dict[str, int] = {}
    for sub in session.get_provider_graph_assignment_info():
        nodes[sub.ep_name] = nodes.get(sub.ep_name, 0) + len(sub.get_nodes())
    text = log.read()
    missing: dict[str, int] = {}
    for op in MISSING_KERNEL.findall(text):
        missing[op] = missing.get(op, 0) + 1
    return session, Placement(nodes, missing, sum(int(n) for n in MEMCPY_ADDED.findall(text)))


class _Log:
    text = ""

    def read(self) -> str:
        return self.text


@contextmanager
def captured_stderr() -> Iterator[_Log]:
    """File descriptor 2 redirected into a temporary file for the block (ONNX Runtime's C++ logger writes there,
    below Python's sys.stderr); its text in the yielded object's read() afterwards."""
    log = _Log()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield log
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            log.text = f.read().decode("utf-8", "replace")


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def intra_op_threads(threads: int | None) -> int:
    """The intra-op thread count: `threads` cut to usable_cpus() (more threads than CPUs only contend, and a huge
    count makes ONNX Runtime spend minutes creating them), or physical_cores() when None."""
    return physical_cores() if threads is None else max(1, min(int(threads), usable_cpus()))


def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads of one core count once)."""
    logical = usable_cpus()
    try:
        cores, phys = set(), None
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    phys = value.strip()
                elif key == "core id":
                    cores.add((phys, value.strip()))
        n = len(cores) or logical
    except OSError:  # not Linux: assume no hyper-threading rather than guess
        n = logical
    return max(1, min(n, logical))


def session_options(threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = intra_op_threads(threads)
    opts.inter_op_num_threads = 1
    # Idle intra-op workers sleep instead of spinning (ORT's default spins): where other work also uses the
    # cores, spinning workers take the cores the working ones wait for, which costs a batch far more than the
    # wake-up a sleeping worker adds to a batch of one (figures: benchmarks/RESULTS.md). The same as
    # OMP_WAIT_POLICY=PASSIVE for PyTorch.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # warnings about unused initializers etc. are not the user's business
    return opts


@functools.cache
def run_options(graph: int = -1):
    """RunOptions whose log prints errors only (a session made by session_with_placement logs at info level, which
    is meant for its creation, not for every call), and `graph` as the CUDA graph this call captures or replays
    (gpu_graph_id: -1 neither, which a session with CUDA graphs enabled needs for every other call: without the
    entry it would capture graph 0; other providers ignore it)."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 3
    options.add_run_config_entry("gpu_graph_id", str(graph))
    return options


def run_bound_values(session, feeds: dict[str, Any], outputs: list[str], device: str = "cpu") -> list[Any]:
    """Run `session` through IO binding with the named outputs left on `device`, as OrtValues (numpy feeds are
    bound from host memory, OrtValue feeds where they are)."""
    io = _bound(session, feeds, {})
    for name in outputs:
        io.bind_output(name, device)
    session.run_with_iobinding(io, run_options())
    return list(io.get_outputs())


def _bound(session, feeds: dict[str, Any], into: dict[str, Any]):
    """An IO binding of `session` with the feeds as inputs and the `into` buffers as the outputs they are named for."""
    import onnxruntime as ort

    io = session.io_binding()
    for name, value in feeds.items():
        if isinstance(value, ort.OrtValue):
            io.bind_ortvalue_input(name, value)
        else:
            io.bind_cpu_input(name, value)
    for name, buffer in into.items():
        io.bind_ortvalue_output(name, buffer if isinstance(buffer, ort.OrtValue)
                                else ort.OrtValue.ortvalue_from_numpy(buffer))
    return io


def run_bound(session, feeds: dict[str, Any], outputs: list[str], into: dict[str, Any] | None = None,
              device: str = "cpu", graph: int = -1) -> list[Any]:
    """Run `session` through IO binding: the named outputs as host arrays, plus each output in `into` written into
    the buffer given for it (moe_core/runtime/decoding.py's cache buffers, bound as past input and present output at
    once).

    Feeds and `into` buffers are numpy arrays (host memory, bound without a copy) or OrtValues (already on
    `device`, the session's: "cpu" | "cuda"). The other outputs are allocated on `device` and returned as host
    arrays: on the CPU arrays over ONNX Runtime's own buffers (each keeps its buffer alive), not copies. `graph`: the
    CUDA graph this call captures or replays (run_options)."""
    io = _bound(session, feeds, into or {})
    for name in outputs:
        io.bind_output(name, device)  # "cuda" | "cpu": ORT's device names are the provider names
    session.run_with_iobinding(io, run_options(graph))
    # In binding order: the `into` outputs came first. numpy() of a CPU OrtValue is a view of its buffer, of a CUDA
    # one a copy to the host: only these outputs make the trip, never the cache.
    return [value.numpy() for value in io.get_outputs()[len(into or {}):]]
