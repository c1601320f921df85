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

import os
from collections.abc import Sequence
from typing import Any

CPU_EP = "CPUExecutionProvider"


def ort_session(model: str | os.PathLike | bytes, threads: int | None = None, providers: Sequence[Any] = (CPU_EP,)):
    """An onnxruntime.InferenceSession of `model` (a file path or the serialized graph) with session_options(threads)
    on `providers` (CPU by default)."""
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=session_options(threads), providers=list(providers))


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


def run_bound(session, feeds: dict[str, Any], outputs: list[str], into: dict[str, Any] | None = None,
              device: str = "cpu") -> list[Any]:
    """Run `session` through IO binding: the named outputs as host arrays, plus each output in `into` written into
    the buffer given for it (moe_core/decoding.py's cache buffers, bound as past input and present output at once).

    Feeds and `into` buffers are numpy arrays (host memory, bound without a copy) or OrtValues (already on
    `device`, the session's: "cpu" | "cuda"). The other outputs are allocated on `device` and returned as host
    arrays: on the CPU arrays over ONNX Runtime's own buffers (each keeps its buffer alive), not copies."""
    import onnxruntime as ort

    io = session.io_binding()
    for name, value in feeds.items():
        if isinstance(value, ort.OrtValue):
            io.bind_ortvalue_input(name, value)
        else:
            io.bind_cpu_input(name, value)
    for name, buffer in (into or {}).items():
        io.bind_ortvalue_output(name, buffer if isinstance(buffer, ort.OrtValue)
                                else ort.OrtValue.ortvalue_from_numpy(buffer))
    for name in outputs:
        io.bind_output(name, device)  # "cuda" | "cpu": ORT's device names are the provider names
    session.run_with_iobinding(io)
    # In binding order: the `into` outputs came first. numpy() of a CPU OrtValue is a view of its buffer, of a CUDA
    # one a copy to the host: only these outputs make the trip, never the cache.
    return [value.numpy() for value in io.get_outputs()[len(into or {}):]]
