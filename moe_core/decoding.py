"""KV-cached generation on the decode graph (MODEL.decode.onnx, moe_core/graph_contract.py).

One `DecodeState` holds a batch of continuing samples: for every block application, a key and a value buffer
[B, heads, max_seq_len, head_dim] allocated once per batch, each row holding its own tokens' entries at indices
0..length-1 (index = position: no holes, whatever the prompts' lengths); each sample's length (the position of its
next token) and its halt_step, decided at the prefill and carried. A call runs only the new tokens, the prefill the
prompts and then one token per sample, and writes their entries into the buffers in place: the session binds each
buffer as both the past input and the present output (GroupQueryAttention appends in place), so a decoding call
copies nothing of the cache. A step therefore consumes the state it is given: its buffers now belong to the state
it returns.

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
from typing import Any

import numpy as np

from moe_core.errors import MoeError
from moe_core.graph_contract import HALT_STEP, LOGITS, past_names, present_names

# run(feeds, outputs, into) -> the named outputs as host arrays, with each present output written into the buffer
# `into` names for it (serve/runtime.py OrtModel.run_feeds; export/decode.py eager_runner).
Run = Callable[[dict[str, Any], list[str], dict[str, Any]], list[np.ndarray]]


def refill_window(max_seq_len: int) -> int:
    return max(1, max_seq_len - max_seq_len // 4)


# The cache's element type, as ONNX Runtime names a graph input's type (session.get_inputs()[i].type): float32, or
# a graph made for CUDA in reduced precision keeps its cache in that precision (moe_core/graph_contract.py).
FLOAT32, FLOAT16, BFLOAT16 = "tensor(float)", "tensor(float16)", "tensor(bfloat16)"
HOST_DTYPES = {FLOAT32: np.float32, FLOAT16: np.float16}  # numpy has no bfloat16


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

    def _run(self, op: str, buffer, feeds: dict[str, Any]):
        from .ort_session import run_bound_values

        key = (op, buffer.data_type())
        if key not in self.sessions:
            self.sessions[key] = row_op_session(op, ONNX_TYPES[key[1]], self.providers)
        return run_bound_values(self.sessions[key], {"buffer": buffer, **feeds}, ["out"], self.device)[0]


ONNX_TYPES = {FLOAT32: 1, FLOAT16: 10, BFLOAT16: 16}  # onnx.TensorProto's element types


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
    cache: list[Any]  # past_key_values.{i}.key / .value buffers, in past_names order: [B, heads, max_seq_len, hd]
    lengths: np.ndarray  # int64 [B]: tokens of each sample in its cache (prompt + generated) = its next position
    halt_step: np.ndarray  # int64 [B]


class Decoder:
    """Runs a decode graph (`run`: see Run) over cache buffers from `buffers` (HostBuffers unless given)."""

    def __init__(self, run: Run, entries: int, heads: int, head_dim: int, max_seq_len: int, describe: str = "",
                 buffers: Any = None, cache_type: str = FLOAT32) -> None:
        self.run, self.entries, self.heads, self.head_dim = run, entries, heads, head_dim
        self.cache_type = cache_type
        self.max_seq_len = max_seq_len
        self.describe = describe  # for the console: which graph, how many cache entries
        self.buffers = buffers if buffers is not None else HostBuffers()
        self.past, self.present = past_names(entries), present_names(entries)
        self.calls = 0
        self.refills = 0

    def prefill(self, rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, DecodeState]:
        """Right-pad the rows (each at most max_seq_len tokens) and run them into new buffers: (the logits after each
        row's last token [B, V], the state)."""
        B, P = len(rows), max(map(len, rows))
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        ids = np.zeros((B, P), dtype=np.int64)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = r
        cache = [self.buffers.zeros((B, self.heads, self.max_seq_len, self.head_dim), self.cache_type)
                 for _ in self.past]
        logits, halt = self._call(ids, lengths, np.broadcast_to(np.arange(P), (B, P)).copy(),
                                  np.zeros(B, dtype=np.int64), cache)
        return logits[np.arange(B), lengths - 1], DecodeState(cache, lengths, halt)

    def keep(self, state: DecodeState, rows: Sequence[int]) -> DecodeState:
        """The state of these rows only (samples that finished leave the batch), in new buffers. When every row
        stays, in order, the state itself (serving calls this after every token)."""
        idx = np.asarray(rows, dtype=np.int64)
        if np.array_equal(idx, np.arange(len(state.lengths))):
            return state
        return DecodeState([self.buffers.take(c, idx) for c in state.cache], state.lengths[idx], state.halt_step[idx])

    def step(self, tokens: Sequence[int], state: DecodeState, history: Sequence[Sequence[int]]
             ) -> tuple[np.ndarray, DecodeState]:
        """Append one token per row: (the logits after it [B, V], the new state). `history`: each row's tokens so
        far, this one included, for a refill when a row reaches max_seq_len (module docstring)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        full = state.lengths >= self.max_seq_len
        if not full.any():
            return self._append(tokens, state)
        refilled = np.flatnonzero(full)
        self.refills += len(refilled)
        window = refill_window(self.max_seq_len)
        again_logits, again = self.prefill([list(history[i])[-window:] for i in refilled])
        cache = [self.buffers.put(mine, refilled, theirs)
                 for mine, theirs in zip(state.cache, again.cache, strict=True)]
        lengths, halt = state.lengths.copy(), state.halt_step.copy()
        lengths[refilled], halt[refilled] = again.lengths, again.halt_step
        state = DecodeState(cache, lengths, halt)
        if full.all():
            return again_logits, state
        logits, state = self._append(np.where(full, 0, tokens), state)  # 0: the refilled rows' placeholder
        logits[refilled] = again_logits
        state.lengths[refilled] -= 1  # the placeholder's entry is not a token
        return logits, state

    def _append(self, tokens: np.ndarray, state: DecodeState) -> tuple[np.ndarray, DecodeState]:
        """One cached call: each row's token at its next position."""
        lengths = state.lengths + 1
        logits, halt = self._call(tokens[:, None], lengths, state.lengths[:, None], state.halt_step, state.cache)
        return logits[:, 0], DecodeState(state.cache, lengths, halt)

    def _call(self, ids, lengths, positions, halt, cache) -> tuple[np.ndarray, np.ndarray]:
        """Run the graph: `lengths`, each row's tokens after the call, make the attention mask (each row's first
        `length` indices)."""
        self.calls += 1
        mask = (np.arange(int(lengths.max()))[None, :] < lengths[:, None]).astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "past_halt_step": halt,
                 **dict(zip(self.past, cache, strict=True))}
        logits, halt = self.run(feeds, [LOGITS, HALT_STEP], dict(zip(self.present, cache, strict=True)))
        return logits, halt
