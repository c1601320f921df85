"""KV-cached generation on the decode graph (MODEL.decode.onnx, moe_core/graph_contract.py).

One `DecodeState` holds a batch of continuing samples: the keys and values of every block application for every
cached index, the attention mask over them (right-padded prompts leave holes, masked), each sample's length (the
logical position of its next token) and its halt_step, decided at the prefill and carried. A call runs only the new
tokens: the prefill the prompts, then one token per sample.

Sliding past max_seq_len: the rotary tables, and what the model was trained on, end at max_seq_len positions. When a
sample's next token would be at position max_seq_len, that sample alone is prefilled again from its last
refill_window tokens (3/4 of max_seq_len), which leaves a quarter of the window for cached calls before its next
refill; the other samples of the batch go on from their caches. So a sample's tokens never depend on its
batch-mates (only fp32 rounding does, through the batch's padded width). Up to max_seq_len tokens the results are
those of uncached generation; past it, uncached generation re-reads the last max_seq_len tokens for every token and
the two see different contexts.

Cache indices are not positions (positions are explicit): a refilled sample's cache is shorter than its
batch-mates', and the rest of its row is masked holes. When holes make the cache wider than max_seq_len, every row's
valid entries are moved to the front (compact), in order: the same keys and values at the same positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moe_core.graph_contract import HALT_STEP, LOGITS, past_names, present_names


def refill_window(max_seq_len: int) -> int:
    return max(1, max_seq_len - max_seq_len // 4)


@dataclass
class DecodeState:
    cache: list[np.ndarray]  # past_key_values.{i}.key / .value, in past_names order: [B, heads, L, head_dim]
    mask: np.ndarray  # int64 [B, L]
    lengths: np.ndarray  # int64 [B]: tokens of each sample so far (prompt + generated) = its next position
    halt_step: np.ndarray  # int64 [B]

    def keep(self, rows: Sequence[int]) -> DecodeState:
        """The state of these rows only (samples that finished leave the batch). When every row stays, in order, the
        state itself: indexing would copy the whole cache for nothing (serving calls this after every token)."""
        idx = np.asarray(rows, dtype=np.int64)
        if np.array_equal(idx, np.arange(len(self.lengths))):
            return self
        return DecodeState([c[idx] for c in self.cache], self.mask[idx], self.lengths[idx], self.halt_step[idx])

    def widened(self, width: int) -> DecodeState:
        """The same state with its cache `width` entries wide: masked holes appended."""
        extra = width - self.mask.shape[1]
        if extra <= 0:
            return self
        pad = ((0, 0), (0, 0), (0, extra), (0, 0))
        return DecodeState([np.pad(c, pad) for c in self.cache], np.pad(self.mask, ((0, 0), (0, extra))),
                           self.lengths, self.halt_step)

    def compact(self) -> DecodeState:
        """Every row's valid cache entries moved to the front, in order; the state as wide as its longest row."""
        valid = self.mask.astype(bool)
        width = int(valid.sum(1).max())
        # a stable sort of "is a hole" puts each row's valid entries first, in their order
        order = np.argsort(~valid, axis=1, kind="stable")[:, :width]
        mask = np.take_along_axis(self.mask, order, axis=1)
        index = order[:, None, :, None]
        return DecodeState([np.take_along_axis(c, index, axis=2) for c in self.cache], mask, self.lengths,
                           self.halt_step)


def stacked(parts: Sequence[tuple[np.ndarray, np.ndarray, DecodeState]]) -> tuple[np.ndarray, DecodeState]:
    """One batch from parts (rows of the batch, their logits, their state), rows in batch order, the cache as wide
    as the widest part."""
    width = max(st.mask.shape[1] for _, _, st in parts)
    parts = [(rows, logits, st.widened(width)) for rows, logits, st in parts]
    order = np.argsort(np.concatenate([rows for rows, _, _ in parts]))  # batch row -> its place in the parts

    def join(arrays: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(arrays)[order]

    # A decode graph returns every block application's entry; the eager model's prefill only those of the steps
    # its rows keep (RecursiveMoE.cached_forward). A part with fewer entries gets zeros for the others: its rows
    # halt before those steps, so none of their outputs reads them.
    entries = max(len(st.cache) for _, _, st in parts)

    def entry(st: DecodeState, k: int) -> np.ndarray:
        return st.cache[k] if k < len(st.cache) else np.zeros_like(st.cache[-1])

    cache = [join([entry(st, k) for _, _, st in parts]) for k in range(entries)]
    state = DecodeState(cache, join([st.mask for *_, st in parts]), join([st.lengths for *_, st in parts]),
                        join([st.halt_step for *_, st in parts]))
    return join([logits for _, logits, _ in parts]), state


class Decoder:
    """Runs a decode graph: `run(feeds, outputs)` is the session's (serve/runtime.py OrtModel.run_feeds)."""

    def __init__(self, run, entries: int, heads: int, head_dim: int, max_seq_len: int, describe: str = "") -> None:
        self.run, self.entries, self.heads, self.head_dim = run, entries, heads, head_dim
        self.max_seq_len = max_seq_len
        self.describe = describe  # for the console: which graph, how many cache entries
        self.past, self.present = past_names(entries), present_names(entries)
        self.calls = 0
        self.refills = 0

    def prefill(self, rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, DecodeState]:
        """Right-pad the rows (each at most max_seq_len tokens) and run them: (the logits after each row's last token
        [B, V], the state)."""
        B, P = len(rows), max(map(len, rows))
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        ids = np.zeros((B, P), dtype=np.int64)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = r
        mask = (np.arange(P)[None, :] < lengths[:, None]).astype(np.int64)
        empty = np.zeros((B, self.heads, 0, self.head_dim), dtype=np.float32)
        logits, halt, cache = self._call(ids, mask, np.broadcast_to(np.arange(P), (B, P)).copy(),
                                         np.zeros(B, dtype=np.int64), [empty] * len(self.past))
        return logits[np.arange(B), lengths - 1], DecodeState(cache, mask, lengths, halt)

    def step(self, tokens: Sequence[int], state: DecodeState, history: Sequence[Sequence[int]]
             ) -> tuple[np.ndarray, DecodeState]:
        """Append one token per row: (the logits after it [B, V], the new state). `history`: each row's tokens so
        far, this one included, for a refill when a row reaches max_seq_len (module docstring)."""
        full = state.lengths >= self.max_seq_len
        if not full.any():
            return self._append(tokens, state)
        refilled, going = np.flatnonzero(full), np.flatnonzero(~full)
        self.refills += len(refilled)
        window = refill_window(self.max_seq_len)
        parts = [(refilled, *self.prefill([list(history[i])[-window:] for i in refilled]))]
        if len(going):
            parts.append((going, *self._append([tokens[i] for i in going], state.keep(going))))
        logits, state = stacked(parts)
        return logits, state.compact() if state.mask.shape[1] > self.max_seq_len else state

    def _append(self, tokens: Sequence[int], state: DecodeState) -> tuple[np.ndarray, DecodeState]:
        """One cached call: each row's token at its next position."""
        B = len(tokens)
        mask = np.concatenate([state.mask, np.ones((B, 1), dtype=np.int64)], axis=1)
        logits, halt, cache = self._call(np.asarray(tokens, dtype=np.int64)[:, None], mask, state.lengths[:, None],
                                         state.halt_step, state.cache)
        return logits[:, 0], DecodeState(cache, mask, state.lengths + 1, halt)

    def _call(self, ids, mask, positions, halt, cache) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        self.calls += 1
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "past_halt_step": halt,
                 **dict(zip(self.past, cache, strict=False))}  # an eager prefill may cache fewer steps
        out = self.run(feeds, [LOGITS, HALT_STEP, *self.present])
        return out[0], out[1], out[2:]
