"""KV-cached generation on the decode graph (MODEL.decode.onnx, moe_core/runtime/graph_contract.py).

One `DecodeState` holds a batch of continuing samples: for every block application, a key and a value buffer
[B, heads, max_seq_len, head_dim] allocated once per batch, each row holding its own tokens' entries at indices
0..length-1 (index = position: no holes, whatever the prompts' lengths); each sample's length (the position of its
next token) and its halt_step, decided at the prefill and carried. A call runs only the new tokens, the prefill the
prompts and then one token per sample, and writes their entries into the buffers in place: the session binds each
buffer as both the past input and the present output (the graph writes it in place: GroupQueryAttention in a graph
made for the CPU, ScatterElements in one made for CUDA), so a decoding call copies nothing of the cache. A step
therefore consumes the state it is given: its buffers now belong to the state it returns.

Sliding past max_seq_len: the rotary tables, and what the model was trained on, end at max_seq_len positions. When a
sample's next token would be at position max_seq_len, that sample alone is prefilled again from its last
refill_window tokens (3/4 of max_seq_len), which leaves a quarter of the window for cached calls before its next
refill; the other samples of the batch go on from their caches in the same call, where the refilled rows take a
placeholder token (at the index their next token overwrites, its outputs unread). So a sample's tokens never depend
on its batch-mates (only fp32 rounding does, through the batch's padded width). Up to max_seq_len tokens the results
are those of uncached generation; past it, uncached generation re-reads the last max_seq_len tokens for every token
and the two see different contexts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from ..common.errors import MoeError
from .graph_contract import HALT_STEP, LOGITS, past_names, present_names

# run(feeds, outputs, into) -> the named outputs as host arrays, with each present output written into the buffer
# `into` names for it (serve/runtime.py OrtModel.run_feeds; export/decode.py eager_runner).
Run = Callable[[dict[str, Any], list[str], dict[str, Any]], list[np.ndarray]]
# Static shapes (Decoder(static=True)) also pass the bucket's CUDA graph id: run(feeds, outputs, into, graph_id).
StaticRun = Callable[[dict[str, Any], list[str], dict[str, Any], int], list[np.ndarray]]


def refill_window(max_seq_len: int) -> int:
    return max(1, max_seq_len - max_seq_len // 4)


# The cache's element type, as ONNX Runtime names a graph input's type (session.get_inputs()[i].type): float32, or
# a graph made for CUDA in reduced precision keeps its cache in that precision (moe_core/runtime/graph_contract.py).
FLOAT32, FLOAT16, BFLOAT16 = "tensor(float)", "tensor(float16)", "tensor(bfloat16)"
INT64 = "tensor(int64)"  # the decode graph's other inputs and its halt_step and token outputs
HOST_DTYPES = {FLOAT32: np.float32, FLOAT16: np.float16, INT64: np.int64}  # numpy has no bfloat16


class HostBuffers:
    """Cache buffers in host memory (numpy): what a CPU session binds without a copy, and the eager model writes
    into. put returns the buffer that holds the result (DeviceBuffers' is a new one)."""

    def zeros(self, shape: tuple[int, ...], cache_type: str = FLOAT32) -> np.ndarray:
        if cache_type not in HOST_DTYPES:
            raise MoeError(f"a KV cache of {cache_type} cannot live in host memory (numpy has no such type): run "
                           "the graph on the device it was made for")
        return np.zeros(shape, dtype=HOST_DTYPES[cache_type])

    def take(self, buffer: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return buffer[rows]

    def put(self, buffer: np.ndarray, rows: np.ndarray, source: np.ndarray) -> np.ndarray:
        buffer[rows] = source
        return buffer

    # Static shapes (Decoder(static=True)): buffers written in place, never replaced.
    def take_into(self, buffer: np.ndarray, rows: np.ndarray, into: np.ndarray) -> None:
        into[...] = buffer[rows]

    def put_into(self, buffer: np.ndarray, rows: np.ndarray, source: np.ndarray) -> None:
        buffer[rows] = source

    def write(self, buffer: np.ndarray, value: np.ndarray) -> None:
        buffer[...] = value

    def read(self, buffer: np.ndarray) -> np.ndarray:
        return buffer

    def rows(self, buffer: np.ndarray) -> int:
        return buffer.shape[0]


class DeviceBuffers:
    """Cache buffers as OrtValues on an ONNX Runtime device ("cuda"; the tests use "cpu"), with HostBuffers' methods:
    the cache stays in device memory from one decoding call to the next, bound as each call's past and present. Row
    changes (samples leave the batch, one is refilled) run on the device too, as one-node graphs (Gather, ScatterND)
    in a session on `providers`, so the cache never passes through the host, in any type (numpy has no bfloat16)."""

    def __init__(self, device: str, providers: Sequence[Any]) -> None:
        self.device, self.providers = device, list(providers)
        self.sessions: dict[tuple[str, str], Any] = {}  # (op, cache type) -> its session

    def zeros(self, shape: tuple[int, ...], cache_type: str = FLOAT32):
        import onnxruntime as ort

        value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), ONNX_TYPES[cache_type], self.device, 0)
        # Zero bits are 0.0 in every float type; numpy names the bfloat16 bits uint16.
        value.update_inplace(np.zeros(shape, dtype=HOST_DTYPES.get(cache_type, np.uint16)))
        return value

    def take(self, buffer, rows: np.ndarray):
        return self._run("take", buffer, {"rows": np.asarray(rows, dtype=np.int64)})

    def put(self, buffer, rows: np.ndarray, source):
        return self._run("put", buffer, {"rows": np.asarray(rows, dtype=np.int64)[:, None], "source": source})

    def take_into(self, buffer, rows: np.ndarray, into) -> None:
        self._run("take", buffer, {"rows": np.asarray(rows, dtype=np.int64)}, into)

    def put_into(self, buffer, rows: np.ndarray, source) -> None:
        """ScatterND with its output bound to its input's buffer: ONNX Runtime's kernel copies the input to the output
        only when they differ, so the rows are written in place."""
        self._run("put", buffer, {"rows": np.asarray(rows, dtype=np.int64)[:, None], "source": source}, buffer)

    def write(self, buffer, value: np.ndarray) -> None:
        buffer.update_inplace(np.ascontiguousarray(value))

    def read(self, buffer) -> np.ndarray:
        return buffer.numpy()

    def rows(self, buffer) -> int:
        return buffer.shape()[0]

    def _run(self, op: str, buffer, feeds: dict[str, Any], into: Any = None):
        from .ort_session import run_bound, run_bound_values

        key = (op, buffer.data_type())
        if key not in self.sessions:
            self.sessions[key] = row_op_session(op, ONNX_TYPES[key[1]], self.providers)
        feeds = {"buffer": buffer, **feeds}
        if into is not None:
            run_bound(self.sessions[key], feeds, [], {"out": into}, self.device)
            return into
        return run_bound_values(self.sessions[key], feeds, ["out"], self.device)[0]


ONNX_TYPES = {FLOAT32: 1, INT64: 7, FLOAT16: 10, BFLOAT16: 16}  # onnx.TensorProto's element types


def row_op_session(op: str, elem_type: int, providers: Sequence[Any]):
    """A session of one node over a [B, ...] buffer: "take" gathers rows [n] of it, "put" writes source [n, ...] into
    rows [n, 1] of a copy (ScatterND)."""
    from onnx import TensorProto, helper

    from .ort_session import ort_session

    buffer = helper.make_tensor_value_info("buffer", elem_type, None)
    out = helper.make_tensor_value_info("out", elem_type, None)
    rows = helper.make_tensor_value_info("rows", TensorProto.INT64, None)
    if op == "take":
        node, inputs = helper.make_node("Gather", ["buffer", "rows"], ["out"], axis=0), [buffer, rows]
    else:
        source = helper.make_tensor_value_info("source", elem_type, None)
        node, inputs = helper.make_node("ScatterND", ["buffer", "rows", "source"], ["out"]), [buffer, rows, source]
    graph = helper.make_graph([node], f"cache_{op}", inputs, [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    return ort_session(model.SerializeToString(), 1, providers)


@dataclass
class DecodeState:
    cache: list[Any]  # past_key_values.{i}.key / .value buffers, in past_names order: [rows, heads, max_seq_len, hd]
    lengths: np.ndarray  # int64 [B]: tokens of each sample in its cache (prompt + generated) = its next position
    halt_step: np.ndarray  # int64 [B]
    slots: np.ndarray | None = None  # static shapes: each sample's row in its bucket's buffers (others are fillers)


# Static shapes (Decoder(static=True), what CUDA graph capture needs): a batch of B samples runs in the buffers of
# the smallest bucket of at least B rows, allocated once per Decoder and reused by every later batch, so that a
# decoding call always binds the same inputs and outputs at the same addresses with the same shapes; its attention
# mask is max_seq_len wide. Rows without a sample (fillers) run a placeholder token at position 0 and are never read.
# A sample that finishes leaves its row to a filler; when the samples left fit a smaller bucket, their rows are
# gathered into that bucket's buffers on the device. Each bucket's decoding call is one CUDA graph (gpu_graph_id).
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket_for(n: int) -> int:
    return next((b for b in BUCKETS if b >= n), n)


@dataclass
class Bucket:
    size: int
    graph_id: int  # its decoding call's CUDA graph (gpu_graph_id >= 1: 0 is ONNX Runtime's own)
    cache: list[Any]
    feeds: dict[str, Any]  # input_ids, position_ids [size, 1], attention_mask [size, max_seq_len], past_halt_step
    outputs: dict[str, Any]  # every output but the presents: logits [size, 1, V], the last logits, token ids, halt_step


class Decoder:
    """Runs a decode graph (`run`: see Run) over cache buffers from `buffers` (HostBuffers unless given).

    The logits after each row's last token come from the graph's `last_output` when it has one (serve adds it: only
    [B, V] leaves the device), else from its full logits, indexed here; with `token_output` (serve's greedy choice
    on the device) a greedy caller gets token ids, and nothing larger leaves the device per token. `static`: fixed
    shapes (see BUCKETS) for CUDA graph capture; `vocab_size` sizes its logits buffers."""

    def __init__(self, run: Run, entries: int, heads: int, head_dim: int, max_seq_len: int, describe: str = "",
                 buffers: Any = None, cache_type: str = FLOAT32, last_output: str | None = None,
                 token_output: str | None = None, static: bool = False, vocab_size: int | None = None) -> None:
        self.run, self.entries, self.heads, self.head_dim = run, entries, heads, head_dim
        self.cache_type = cache_type
        self.max_seq_len = max_seq_len
        self.describe = describe  # for the console: which graph, how many cache entries
        self.buffers = buffers if buffers is not None else HostBuffers()
        self.past, self.present = past_names(entries), present_names(entries)
        self.last_output, self.token_output = last_output, token_output
        if static and (last_output is None or vocab_size is None):
            raise ValueError("static shapes need the graph's last_output and the vocab_size")
        self.static, self.vocab_size = static, vocab_size
        self.buckets: dict[int, Bucket] = {}
        self.calls = 0
        self.refills = 0

    @property
    def gives_tokens(self) -> bool:
        return self.token_output is not None

    def prefill(self, rows: Sequence[Sequence[int]], tokens: bool = False) -> tuple[np.ndarray, DecodeState]:
        """Right-pad the rows (each at most max_seq_len tokens) and run them into new buffers (static: into their
        bucket's): (the logits after each row's last token [B, V], or with `tokens` the greedy token ids [B]; the
        state)."""
        B = len(rows)
        n = bucket_for(B) if self.static else B
        padded = [*rows, *([[0]] * (n - B))]  # fillers: one placeholder token
        P = max(map(len, padded))
        lengths = np.array([len(r) for r in padded], dtype=np.int64)
        ids = np.zeros((n, P), dtype=np.int64)
        for b, r in enumerate(padded):
            ids[b, : len(r)] = r
        if self.static:
            cache = self._bucket(n).cache
        else:
            cache = [self.buffers.zeros((B, self.heads, self.max_seq_len, self.head_dim), self.cache_type)
                     for _ in self.past]
        last, halt = self._call(ids, lengths, np.broadcast_to(np.arange(P), (n, P)).copy(),
                                np.zeros(n, dtype=np.int64), cache, tokens)
        slots = np.arange(B) if self.static else None
        return last[:B], DecodeState(cache, lengths[:B], halt[:B], slots)

    def keep(self, state: DecodeState, rows: Sequence[int]) -> DecodeState:
        """The state of these rows only (samples that finished leave the batch), in new buffers (static: the same
        buffers while the rows fit their bucket, else a smaller bucket's). When every row stays, in order, the state
        itself (serving calls this after every token)."""
        idx = np.asarray(rows, dtype=np.int64)
        if np.array_equal(idx, np.arange(len(state.lengths))):
            return state
        if not self.static:
            return DecodeState([self.buffers.take(c, idx) for c in state.cache], state.lengths[idx],
                               state.halt_step[idx])
        assert state.slots is not None  # static shapes: prefill and keep give every state its slots
        slots, n = state.slots[idx], bucket_for(len(idx))
        if n == self.buffers.rows(state.cache[0]):
            return DecodeState(state.cache, state.lengths[idx], state.halt_step[idx], slots)
        target = self._bucket(n).cache
        gather = np.concatenate([slots, np.full(n - len(slots), slots[0])])  # fillers copy a sample's row
        for source, into in zip(state.cache, target, strict=True):
            self.buffers.take_into(source, gather, into)
        return DecodeState(target, state.lengths[idx], state.halt_step[idx], np.arange(len(idx)))

    def step(self, tokens: Sequence[int], state: DecodeState, history: Sequence[Sequence[int]],
             greedy: bool = False) -> tuple[np.ndarray, DecodeState]:
        """Append one token per row: (the logits after it [B, V], or with `greedy` the token ids [B]; the new
        state). `history`: each row's tokens so far, this one included, for a refill when a row reaches max_seq_len
        (module docstring)."""
        ids = np.asarray(tokens, dtype=np.int64)
        full = state.lengths >= self.max_seq_len
        if not full.any():
            return self._append(ids, state, greedy)
        refilled = np.flatnonzero(full)
        self.refills += len(refilled)
        window = refill_window(self.max_seq_len)
        again_last, again = self._refill([list(history[i])[-window:] for i in refilled.tolist()], greedy)
        if self.static:  # into the bucket's own buffers, at the samples' rows: their addresses must not change
            assert state.slots is not None  # static shapes: prefill and keep give every state its slots
            for mine, theirs in zip(state.cache, again.cache, strict=True):
                self.buffers.put_into(mine, state.slots[refilled], theirs)
            cache = state.cache
        else:
            cache = [self.buffers.put(mine, refilled, theirs)
                     for mine, theirs in zip(state.cache, again.cache, strict=True)]
        lengths, halt = state.lengths.copy(), state.halt_step.copy()
        lengths[refilled], halt[refilled] = again.lengths, again.halt_step
        state = DecodeState(cache, lengths, halt, state.slots)
        if full.all():
            return again_last, state
        last, state = self._append(np.where(full, 0, ids), state, greedy)  # 0: the refilled rows' placeholder
        last[refilled] = again_last
        state.lengths[refilled] -= 1  # the placeholder's entry is not a token
        return last, state

    def _refill(self, rows: list[list[int]], greedy: bool) -> tuple[np.ndarray, DecodeState]:
        """A prefill of these rows alone into buffers of their own (shapes as they come: never captured)."""
        static, self.static = self.static, False
        try:
            return self.prefill(rows, greedy)
        finally:
            self.static = static

    def _append(self, tokens: np.ndarray, state: DecodeState, greedy: bool) -> tuple[np.ndarray, DecodeState]:
        """One cached call: each row's token at its next position."""
        lengths = state.lengths + 1
        if self.static:
            last, halt = self._static_call(tokens, state, greedy)
        else:
            last, halt = self._call(tokens[:, None], lengths, state.lengths[:, None], state.halt_step, state.cache,
                                    greedy)
        return last, DecodeState(state.cache, lengths, halt, state.slots)

    def _call(self, ids, lengths, positions, halt, cache, tokens: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Run the graph: `lengths`, each row's tokens after the call, make the attention mask (each row's first
        `length` indices). Returns the logits after each row's last new token [B, V] (or its greedy token ids) and
        halt_step."""
        self.calls += 1
        mask = (np.arange(int(lengths.max()))[None, :] < lengths[:, None]).astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "past_halt_step": halt,
                 **dict(zip(self.past, cache, strict=True))}
        wanted = self.token_output if tokens and self.token_output is not None else self.last_output or LOGITS
        last, halt = self.run(feeds, [wanted, HALT_STEP], dict(zip(self.present, cache, strict=True)))
        if wanted == LOGITS:  # the full logits [B, T, V]: each row's last new token is at lengths - 1 - its position
            last = last[np.arange(len(ids)), lengths - 1 - positions[:, 0]]
        return last, halt

    def _static_call(self, tokens: np.ndarray, state: DecodeState, greedy: bool) -> tuple[np.ndarray, np.ndarray]:
        """A decoding call in the state's bucket: its feeds written in place, its outputs into its own buffers, and
        the bucket's CUDA graph id, so that the call replays once captured."""
        self.calls += 1
        b = self._bucket(self.buffers.rows(state.cache[0]))
        n, at = b.size, state.slots
        ids, positions = np.zeros((n, 1), dtype=np.int64), np.zeros((n, 1), dtype=np.int64)
        halt = np.full(n, 1, dtype=np.int64)
        ids[at, 0], positions[at, 0], halt[at] = tokens, state.lengths, state.halt_step
        mask = (np.arange(self.max_seq_len)[None, :] < (positions + 1)).astype(np.int64)
        for name, value in (("input_ids", ids), ("position_ids", positions), ("attention_mask", mask),
                            ("past_halt_step", halt)):
            self.buffers.write(b.feeds[name], value)
        # Every output is bound to the bucket's own buffer (a captured graph allocates nothing, and one graph serves
        # greedy and sampling callers); only the one wanted is read back.
        wanted = self.token_output if greedy and self.token_output is not None else self.last_output
        assert wanted is not None  # static shapes need a last_output (__init__)
        run = cast(StaticRun, self.run)  # static shapes run on a runner that takes the graph id (OrtModel.run_feeds)
        run({**b.feeds, **dict(zip(self.past, b.cache, strict=True))}, [],
            {**dict(zip(self.present, b.cache, strict=True)), **b.outputs}, b.graph_id)
        return self.buffers.read(b.outputs[wanted])[at], self.buffers.read(b.outputs[HALT_STEP])[at]

    def _bucket(self, n: int) -> Bucket:
        """The buffers of the bucket of n rows, allocated on first use."""
        if n not in self.buckets:
            # Buckets are static shapes only, which need a last_output and the vocab_size (__init__).
            assert self.last_output is not None and self.vocab_size is not None
            zeros = self.buffers.zeros
            shape = (n, self.heads, self.max_seq_len, self.head_dim)
            feeds = {"input_ids": zeros((n, 1), INT64), "position_ids": zeros((n, 1), INT64),
                     "attention_mask": zeros((n, self.max_seq_len), INT64), "past_halt_step": zeros((n,), INT64)}
            outputs = {LOGITS: zeros((n, 1, self.vocab_size), FLOAT32),
                       self.last_output: zeros((n, self.vocab_size), FLOAT32), HALT_STEP: zeros((n,), INT64)}
            if self.token_output is not None:
                outputs[self.token_output] = zeros((n,), INT64)
            self.buckets[n] = Bucket(n, 1 + len(self.buckets), [zeros(shape, self.cache_type) for _ in self.past],
                                     feeds, outputs)
        return self.buckets[n]
