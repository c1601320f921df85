"""`moe serve --engine ray`: the same batch job on a Ray cluster, through Ray Data.

How a run goes. The driver (the `moe serve` process) opens the model once on its CPU to check it and the options
(exactly as the in-process engine does), then reads and checks every input record — all of this before any cluster
is started or joined, so a bad line is the usual one-line error and costs no cluster. Then it starts a local
cluster (no --ray-address) or joins one (--ray-address auto | HOST:PORT; a process already connected to Ray, such as
a Python program or a test, serves on its connection), and runs

    ray.data.from_items(one row per block of records)      # (indices, ids, texts | puzzles): plan_blocks
      .map_batches(Predictor, batch_size=1, compute=ActorPoolStrategy(size=workers), num_cpus=threads, num_gpus=0 | 1)

Each actor opens its ONNX Runtime session (serve.Server) once, in __init__, and serves a block with shards.serve_chunk,
the function the in-process engine runs on a chunk, so every record becomes the same output line. Blocks come back
in the order they were handed out (Ray Data's preserve_order); each line carries its record's index, and the driver
puts the lines in input order (plan_blocks may sort a window of records by length), checks that every record came
back exactly once, and writes them with the in-process engine's writer (shards.open_outputs). Ray itself never
imports torch, and this module imports ray only when a run starts, so `moe serve` works without it.

Results. A block is served as the in-process engine serves a chunk, but blocks are smaller (about 4 per worker, so
that the workers share the work), so a batch holds other records than in one process. Rows never mix, so discrete
results (halt steps, generated tokens, solutions, n_tokens) are the same and float results differ only by the fp32
rounding that depends on a batch's padded width (docs/serving.md, "Serving on a Ray cluster", for the bound); cached
generation past max_seq_len too, as each sample refills its own cache (moe_core/runtime/decoding.py).

Faults. Ray Data restarts an actor whose process dies (max_restarts = -1) and resubmits the block it was serving
(up to MAX_TASK_RETRIES times, so a record that crashes every worker fails the run instead of looping); the driver
keeps only the lines of the attempt that finished, so nothing is lost or duplicated. An error raised while serving
(a MoeError: a model a worker cannot open, a provider it does not have) is not retried: it fails the run at once,
as one line naming the worker. Outputs are written only when every record came back; otherwise nothing is left.

The model is read on every worker at its absolute path (resolved by the driver): a path every node can read (a
shared filesystem, or the same copy at the same path on each node).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moe_core.common.errors import MoeError
from moe_core.common.jsonl import Record
from moe_core.runtime.ort_session import usable_cpus
from moe_core.tasks import sudoku

from .jsonl import PuzzleRecord
from .server import Server
from .shards import CHUNK_BATCHES, Inputs, Job, Totals, chunks, open_outputs, reset_counters, serve_chunk

RAY_MISSING = "--engine ray: Ray is not installed; install it with pip install 'moe[ray]'"
BLOCKS_PER_WORKER = 4  # blocks per worker at least (when the input has the records): the workers share the work
MAX_TASK_RETRIES = 3  # a block whose worker died is served again this many times at most


def require_ray() -> None:
    """MoeError naming the extra to install when ray (with Ray Data's pyarrow) cannot be imported."""
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("pyarrow") is None:
        raise MoeError(RAY_MISSING)


# -----------------------------------------------------------------------------
# the plan (pure: unit-tested)


def plan_workers(provider: str, workers: int | None, threads: int, resources: dict[str, float]) -> tuple[int, int]:
    """(worker actors, GPUs per actor) for the cluster's total `resources` (ray.cluster_resources()).

    Each actor takes `threads` CPUs, and one GPU when the sessions are to run on CUDA: --provider cuda, or auto on a
    cluster that has GPUs (a worker whose onnxruntime has no CUDA then runs on its CPU, saying so). Default workers:
    one per GPU, else the cluster's CPUs / threads. A plan the cluster cannot hold is refused (Ray would wait for
    resources that never come)."""
    cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    use_gpu = provider == "cuda" or (provider == "auto" and gpus > 0)
    if use_gpu and gpus == 0:
        raise MoeError("--provider cuda: the Ray cluster has no GPUs; use --provider cpu, or add GPU nodes")
    n = workers or (gpus if use_gpu else max(1, cpus // threads))
    if use_gpu and n > gpus:
        raise MoeError(f"--workers {n}: each CUDA worker takes one GPU, and the Ray cluster has {gpus}")
    if n * threads > cpus:
        raise MoeError(f"--workers {n} x --threads-per-worker {threads}: needs {n * threads} CPUs, and the Ray "
                       f"cluster has {cpus}")
    return n, int(use_gpu)


def block_rows(n_records: int, workers: int, rows: int) -> int:
    """Records per block (one Server call on a worker): enough blocks for every worker to get BLOCKS_PER_WORKER, at
    least one forward pass of rows, at most the in-process engine's chunk."""
    return max(1, min(CHUNK_BATCHES * rows, max(rows, math.ceil(n_records / (BLOCKS_PER_WORKER * workers)))))


def uses_positions(job: Job) -> bool:
    """Whether a record's result depends on its position in the input: sampled generation seeds each sample from
    it. Every other result depends on the record alone."""
    return job.mode == "generate" and job.temperature > 0


def plan_blocks(records: Sequence[Any], job: Job, workers: int) -> list[list[int]]:
    """The blocks of record indices the workers serve, one Server call each, in the order they are handed out.

    Smaller blocks than the in-process chunks (block_rows), so the workers share the work: a result that
    depends on the record alone lets each window of the in-process chunk size go longest first, so that a block cut
    from it holds texts of similar length and pads as little as a chunk does (the driver puts the lines back in
    input order, holding one window at most); sampled generation keeps input order, each block a run of consecutive
    records served from its first index."""
    spans, start = [], 0
    for chunk in chunks(records, job):
        spans.append(list(range(start, start + len(chunk))))
        start += len(chunk)
    keep_order = uses_positions(job) or job.mode == "solve"  # puzzles are all 81 cells: nothing to sort
    order = [i for span in spans for i in (span if keep_order else sorted(span, key=lambda i: -len(records[i].text)))]
    size = block_rows(len(records), workers, job.rows)
    return [order[i:i + size] for i in range(0, len(order), size)]


def block_items(records: Sequence[Any], blocks: Sequence[Sequence[int]], mode: str) -> list[dict[str, Any]]:
    """One dataset row per block: its records' indices in the input, their ids as JSON text, and what the worker
    serves (texts, or puzzles and solutions as 81 characters, "" for none)."""
    rows = []
    for block in blocks:
        row: dict[str, Any] = {"index": np.asarray(block, dtype=np.int64), "id": [json.dumps(records[i].id)
                                                                               for i in block]}
        if mode == "solve":
            row["puzzle"] = [sudoku.format_grid(records[i].puzzle) for i in block]
            row["solution"] = ["" if records[i].solution is None else sudoku.format_grid(records[i].solution)
                               for i in block]
        else:
            row["text"] = [records[i].text for i in block]
        rows.append(row)
    return rows


def runs(index: np.ndarray) -> list[tuple[int, int]]:
    """[begin, end) spans of consecutive record indices in a block (one span when the block is a slice of the
    input): each is served with its first record's index, which seeds sampled generation."""
    cuts = [0, *(np.flatnonzero(np.diff(index) != 1) + 1).tolist(), len(index)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


# -----------------------------------------------------------------------------
# the worker


class Predictor:
    """One Ray Data actor: a Server opened once, serving blocks of records as the in-process engine serves chunks.

    A model the worker cannot open is reported by the first block it is given (an error in __init__ would reach the
    driver only as Ray's text of a dead actor): the run fails at once, in one line naming the worker."""

    def __init__(self, model: str, open_args: dict[str, Any], job: Job) -> None:
        import ray

        self.job = job
        self.worker = f"{ray.util.get_node_ip_address()} pid {os.getpid()}"
        self.error: MoeError | None = None
        try:
            self.server: Server | None = Server.open(model, **open_args)
        except MoeError as e:
            self.server, self.error = None, MoeError(f"{e} (on the Ray worker at {self.worker})")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A batch of block rows (one, as map_batches is asked) -> one row per record: its index, its output line,
        and on a block's first record the block's figures (Totals, as JSON) and this worker's name."""
        if self.error is not None:
            raise self.error
        assert self.server is not None  # Server.open failed only when self.error is set
        out: dict[str, list] = {"index": [], "line": [], "meta": []}
        for k in range(len(batch["index"])):
            index = np.asarray(batch["index"][k], dtype=np.int64)
            ids = [json.loads(i) for i in batch["id"][k]]
            records: list[PuzzleRecord] | list[Record]
            if self.job.mode == "solve":
                records = [PuzzleRecord(i, sudoku.parse_grid(p, "puzzle"),
                                        sudoku.parse_grid(s, "solution") if s else None)
                           for i, p, s in zip(ids, batch["puzzle"][k], batch["solution"][k], strict=True)]
            else:
                records = [Record(0, i, t) for i, t in zip(ids, batch["text"][k], strict=True)]
            reset_counters(self.server)
            for begin, end in runs(index) if uses_positions(self.job) else [(0, len(index))]:
                out["line"] += serve_chunk(self.server, self.job, records[begin:end], int(index[begin]))
            totals = Totals()
            totals.add(self.server)
            out["index"] += index.tolist()
            out["meta"] += [json.dumps({**totals.as_json(), "worker": self.worker})] + [""] * (len(index) - 1)
        return {"index": np.array(out["index"], dtype=np.int64), "line": np.array(out["line"], dtype=object),
                "meta": np.array(out["meta"], dtype=object)}


# -----------------------------------------------------------------------------
# the driver


@contextlib.contextmanager
def cluster(address: str | None) -> Iterator[str]:
    """A Ray connection for one run, and what it is (for the console): the one this process already has, a local
    cluster started here (address None; shut down afterwards), or the cluster at `address` (auto | HOST:PORT;
    disconnected afterwards)."""
    import ray

    if ray.is_initialized():
        yield "the Ray cluster this process is connected to"
        return
    if address is not None:
        check_reachable(address)
    quiet: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    # Ray's core worker installs its own SIGTERM handler (a stack dump, then exit 15); the command's own handlers
    # (moe_core/cli.py: one line, unfinished outputs removed, exit 143) are put back once it is connected.
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if address is None:
            ray.init(address="local", num_cpus=usable_cpus(), **quiet)
        else:
            ray.init(address=address, **quiet)
        if threading.current_thread() is threading.main_thread():
            for sig, handler in handlers.items():
                if handler is not None:
                    signal.signal(sig, handler)
    except (ConnectionError, RuntimeError, ValueError) as e:
        # A cluster with token authentication (Ray's default for `ray start`) refuses a driver without its token;
        # `auto` finds the token of a cluster on this node, an explicit address needs it given.
        hint = ("; a cluster with token authentication needs RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN, or "
                "~/.ray/auth_token)" if address not in (None, "auto") else "")
        raise MoeError(f"--ray-address {address}: cannot connect to a Ray cluster ({first_line(e)}){hint}") from None
    try:
        yield f"a local Ray cluster ({usable_cpus()} CPUs)" if address is None else f"the Ray cluster at {address}"
    finally:
        ray.shutdown()


@contextlib.contextmanager
def quiet_console() -> Iterator[None]:
    """Ray Data's console handler silenced for the run: its plan, progress notes and error tracebacks would repeat
    what the CLI reports itself (progress, and an error in one line). Its log file in the Ray session directory
    (ray-data.log) still gets everything."""
    import ray.data  # noqa: F401  (configures the ray.data logger)

    handlers = [h for h in logging.getLogger("ray.data").handlers if h.get_name() == "console"]
    levels = [h.level for h in handlers]
    for h in handlers:
        h.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for h, level in zip(handlers, levels, strict=True):
            h.setLevel(level)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """MoeError when nothing answers at a HOST:PORT address (ray.init would retry a dead address for minutes);
    "auto" and anything that is not HOST:PORT are left to Ray."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not (host and port.isdigit()):
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise MoeError(f"--ray-address {address}: no Ray cluster answers there ({reason}); expected the address "
                       "`ray start --head` printed (HOST:6379 by default), or auto on a node of the cluster") from None


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def job_error(e: BaseException) -> MoeError | None:
    """The MoeError a worker raised, found in the chain of wrappers Ray puts around it (a RayTaskError keeps the
    original in .cause; a MoeError is one line, and Ray Data appends its own lines to it); else, for an error of
    Ray's own (a cluster that went away, retries exhausted), a one-line MoeError; None for anything else (a bug:
    its traceback is wanted)."""
    import ray.exceptions

    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    ray_error = None
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, MoeError) and not isinstance(x, ray.exceptions.RayError):
            return MoeError(str(x).splitlines()[0])  # Ray Data appends its retry advice on later lines
        if isinstance(x, ray.exceptions.RayError) and ray_error is None:
            ray_error = x
        todo += [x.__cause__, x.__context__, getattr(x, "cause", None) if isinstance(getattr(x, "cause", None),
                                                                                     BaseException) else None]
    if ray_error is not None:
        return MoeError(f"the Ray job failed: {type(ray_error).__name__}: {first_line(ray_error)}; nothing was written")
    return None


def ordered_lines(batches: Iterable[dict[str, np.ndarray]], n_records: int, totals: Totals, workers: set[str],
                  progress: Callable[[int], Any]) -> Iterator[str]:
    """The output lines in input order, from result batches in any order: every index must come back exactly once
    (a repeat or a missing one is an error, and nothing is written). With preserve_order the buffer stays empty."""
    waiting: dict[int, str] = {}
    expected = 0
    for batch in batches:
        for meta in batch["meta"]:
            if meta:
                obj = json.loads(meta)
                totals.add_json(obj)
                workers.add(obj["worker"])
        for i, line in zip(batch["index"].tolist(), batch["line"], strict=True):
            if i < expected or i in waiting or not 0 <= i < n_records:
                raise MoeError(f"record {i + 1} came back twice from the Ray workers; nothing was written")
            waiting[i] = line
        done = expected
        while expected in waiting:
            yield waiting.pop(expected)
            expected += 1
        progress(expected - done)
    if expected != n_records:
        raise MoeError(f"the Ray workers returned {expected} of {n_records} records; nothing was written")


def serve_on_ray(server: Server, open_args: dict[str, Any], job: Job, records: Sequence[Any], inputs: Inputs,
                 out: Path, overwrite: bool, make_manifest: Callable[[], dict[str, Any]], *, address: str | None,
                 workers: int | None, threads: int, provider: str, announce: Callable[[str], Any],
                 progress: Callable[[int], Any]) -> tuple[Totals, str]:
    """Serve `records` (read and checked, in input order) on Ray and write their lines as the in-process engine does
    (module docstring). `server`: the driver's, which checked the model (the workers open their own with
    `open_args`). `announce` gets the engine's description once the cluster is there; returns the run's Totals and a
    note on the workers for the summary line."""
    require_ray()
    import ray
    import ray.data
    import ray.exceptions

    t0 = time.perf_counter()
    with quiet_console(), cluster(address) as where:
        n, gpus = plan_workers(provider, workers, threads, ray.cluster_resources())
        per = f"{threads} thread{'s' if threads > 1 else ''}" + (" + 1 GPU" if gpus else "")
        started = time.perf_counter() - t0
        announce(f"engine ray: {n} worker{'s' if n > 1 else ''} x {per}, on {where}")
        blocks = plan_blocks(records, job, n)
        with warnings.catch_warnings():
            # max_task_retries has no named parameter in map_batches: it goes through **ray_remote_args, which Ray
            # 2.60 marks as deprecated (as it does some DataContext fields it copies for every dataset).
            warnings.simplefilter("ignore", DeprecationWarning)
            ds: ray.data.Dataset = ray.data.from_items(block_items(records, blocks, job.mode),
                                                       override_num_blocks=len(blocks))
            ds = ds.map_batches(Predictor, batch_size=1, batch_format="numpy",
                                fn_constructor_kwargs={"model": str(server.info.path.resolve()), "open_args": open_args,
                                                       "job": job},
                                compute=ray.data.ActorPoolStrategy(size=n), num_cpus=threads, num_gpus=gpus,
                                max_task_retries=MAX_TASK_RETRIES)
            ctx = ds.context
            ctx.execution_options.preserve_order = True
            ctx.enable_progress_bars = False
            ctx.print_on_execution_start = False
            ctx.raise_original_map_exception = True  # a worker's MoeError reaches the driver as itself (job_error)
        totals = Totals()
        processes: set[str] = set()
        try:
            with open_outputs(inputs, out, overwrite, make_manifest) as sink:
                batches = ds.iter_batches(batch_size=None, batch_format="numpy")
                for line in ordered_lines(batches, len(records), totals, processes, progress):
                    sink.write(line)
        except Exception as e:
            if isinstance(e, MoeError) and not isinstance(e, ray.exceptions.RayError):
                raise  # the driver's own: a bad output, a record that came back twice
            error = job_error(e)  # a worker's MoeError comes wrapped (and its str is Ray's whole traceback)
            if error is None:
                raise
            raise error from None
    restarted = len(processes) - n
    note = (f"ray: {n} worker{'s' if n > 1 else ''}, {len(blocks)} block{'s' if len(blocks) > 1 else ''}"
            + f", cluster ready in {started:.1f}s"
            + (f", {restarted} worker process{'es' if restarted > 1 else ''} restarted" if restarted > 0 else ""))
    return totals, note
