"""The decode graph (MODEL.decode.onnx): RecursiveMoE.cached_forward traced, one graph for the prefill and every
decoding call, with a past/present key and value for every block application of the recursion (the contract:
moe_core/runtime/graph_contract.py). Causal language models only: their position t depends on positions <= t alone.

Its parity check runs it as a server does — a prefill of right-padded prompts of different lengths, then new
tokens one at a time against the returned cache — and compares each call's logits with the eager model's full
forward at the same positions (export/parity.py's tolerance), and halt_step exactly.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moe_core.config import ModelConfig
from moe_core.model import RecursiveMoE
from moe_core.model.attention import CacheCursor, KVCache
from moe_core.runtime.decoding import Decoder
from moe_core.runtime.graph_contract import DECODE_INPUTS, DECODE_OUTPUTS, HALT_STEP, LOGITS, past_names, present_names
from moe_core.runtime.ort_session import run_bound
from moe_core.tasks import task_spec

from .parity import TOLERANCE, CaseResult, ParityReport
from .trace import DynamicAxes, trace

DECODE_STEPS = 3  # decoding calls after each prefill in the parity check


def cache_entries(cfg: ModelConfig) -> int:
    """Block applications of one forward: the keys and values a decode graph carries."""
    if not cfg.recursive:
        return cfg.n_layers
    return cfg.halt_max_steps * cfg.H_cycles * (cfg.L_cycles + 1) * cfg.n_layers


def can_decode(cfg: ModelConfig, task: str) -> bool:
    """A model the decode graph serves: a causal language model without the learned attention bias, whose head_dim
    ONNX Runtime's GroupQueryAttention takes (a multiple of 8)."""
    return task_spec(task).generates and cfg.causal and not cfg.attn_bias and cfg.head_dim % GQA_HEAD_MULTIPLE == 0


GQA_HEAD_MULTIPLE = 8  # GroupQueryAttention's CPU kernel refuses other head sizes


class RowCacheCursor(CacheCursor):
    """The decode graph's cache (moe_core/runtime/graph_contract.py): each row's entries at indices 0..n-1 (n: the row's
    tokens after this call), so index = position and right padding leaves no holes (a prefill's padding only writes
    entries past the row's length, which its later tokens overwrite). Attention is ONNX Runtime's
    GroupQueryAttention (com.microsoft), which writes each row's new entries at its own length: into the past's
    buffer itself when the present output is bound to it (a max_seq_len buffer, appended in place: a decoding call
    copies nothing of the cache), else into a new present."""

    past: KVCache  # never None here: the decode graph's inputs

    def __init__(self, past: KVCache, positions: Tensor, attention_mask: Tensor) -> None:
        super().__init__(past, positions)
        # GroupQueryAttention's lengths: each row's index of its last token, and the longest row's tokens.
        self.seqlens_k = (attention_mask.sum(1) - 1).to(torch.int32)
        self.width = attention_mask.shape[1]
        self.total = attention_mask.new_ones(self.width).sum().to(torch.int32)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor) -> Tensor:
        i = len(self.present.keys)
        B, H, T, hd = q.shape
        past_k, past_v = self.past.keys[i], self.past.values[i]

        def flat(t: Tensor) -> Tensor:  # [B, H, T, hd] -> [B, T, H * hd], the operator's layout
            return t.transpose(1, 2).reshape(B, T, H * hd)

        # The present is as long as the past buffer, or as the longest row when that is longer (a past that grows
        # by each call's entries: past length 0 at the prefill, as genai without a shared buffer).
        length = torch.sym_max(past_k.shape[2], self.width)
        o, present_k, present_v = torch.onnx.ops.symbolic_multi_out(
            "com.microsoft::GroupQueryAttention",
            [flat(q), flat(k), flat(v), past_k, past_v, self.seqlens_k, self.total],
            {"num_heads": H, "kv_num_heads": H}, dtypes=[q.dtype, q.dtype, q.dtype],
            shapes=[(B, T, H * hd), (B, H, length, hd), (B, H, length, hd)], version=1)
        self.present.keys.append(present_k)
        self.present.values.append(present_v)
        return o.view(B, T, H, hd).transpose(1, 2)


class ScatterCacheCursor(CacheCursor):
    """The same cache layout (index = position) for graphs made for CUDA: each new key and value is written at its
    position with ScatterElements, and attention is the standard Attention operator (opset 23) over the whole buffer,
    a key visible to a query when its index is at most the query's position. Both have CUDA kernels in fp32, fp16
    and bf16 (GroupQueryAttention's are fp16/bf16 only, and it reads total_sequence_length from host memory), every
    shape is fixed by the buffer (what CUDA graph capture needs), and a present bound to its past's buffer is written
    in place (ScatterElements copies its input only when the output is another buffer). The cost: a decoding call
    attends over max_seq_len keys, masked, instead of the row's own length."""

    past: KVCache  # never None here: the decode graph's inputs

    def __init__(self, past: KVCache, positions: Tensor, attention_mask: Tensor) -> None:
        super().__init__(past, positions)
        self.width = attention_mask.shape[1]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor) -> Tensor:
        i = len(self.present.keys)
        B, H, T, hd = q.shape
        past_k, past_v = self.past.keys[i], self.past.values[i]
        # As long as the past buffer, or as the longest row when that is longer (a past growing from length 0).
        grow = torch.sym_max(past_k.shape[2], self.width) - past_k.shape[2]
        at = self.positions[:, None, :, None].expand(B, H, T, hd)
        present_k = torch.cat([past_k, past_k.new_zeros(B, H, grow, hd)], dim=2).scatter(2, at, k.to(past_k.dtype))
        present_v = torch.cat([past_v, past_v.new_zeros(B, H, grow, hd)], dim=2).scatter(2, at, v.to(past_v.dtype))
        keys = torch.arange(present_k.shape[2], device=q.device)
        visible = keys[None, None, None, :] <= self.positions[:, None, :, None]  # [B, 1, T, L]: causal, by index
        self.present.keys.append(present_k)
        self.present.values.append(present_v)
        return F.scaled_dot_product_attention(q, present_k.to(q.dtype), present_v.to(q.dtype), attn_mask=visible)


CURSORS = {"cpu": RowCacheCursor, "cuda": ScatterCacheCursor}  # the decode graph's attention, by target device


class DecodeGraph(nn.Module):
    """(input_ids, attention_mask, position_ids, past_halt_step, *past) -> (logits, halt_step, *present)."""

    def __init__(self, model: RecursiveMoE, device: str = "cpu") -> None:
        super().__init__()
        self.model = model
        self.cursor = CURSORS[device]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, past_halt_step: Tensor,
                *past: Tensor) -> tuple[Tensor, ...]:
        cursor = self.cursor(KVCache(list(past[0::2]), list(past[1::2])), position_ids, attention_mask)
        out = self.model.cached_forward(input_ids, attention_mask, position_ids, cursor, past_halt_step)
        return (out.logits, out.halt_step, *flat(out.present))


def flat(cache: KVCache) -> list[Tensor]:
    """key 0, value 0, key 1, ...: the order of past_names / present_names."""
    return [t for kv in zip(cache.keys, cache.values, strict=True) for t in kv]


def decode_to_onnx(model: RecursiveMoE, path: str | os.PathLike, opset: int, device: str = "cpu") -> None:
    """Trace the eval-mode `model`'s cached_forward (DecodeGraph, its attention for `device`) and write it to
    `path`."""
    cfg = model.config
    n = cache_entries(cfg)
    B, T, P = 2, 2, 3  # sizes >= 2: torch.export specialises dimensions of size 0 and 1
    L = cfg.max_seq_len
    batch = torch.export.Dim("batch", min=1, max=65536)
    new = torch.export.Dim("new", min=1, max=max(L, 2))
    total = torch.export.Dim("total", min=1, max=max(L, 2))
    past_len = torch.export.Dim("past", min=0, max=max(L, 2))
    args = (torch.randint(0, cfg.vocab_size, (B, T)), torch.ones(B, P + T, dtype=torch.long),
            (torch.arange(T) + P).expand(B, T).contiguous(), torch.full((B,), cfg.halt_max_steps),
            *(torch.randn(B, cfg.n_heads, L, cfg.head_dim) for _ in range(2 * n)))
    dynamic: dict[str, DynamicAxes] = {"input_ids": {0: batch, 1: new}, "attention_mask": {0: batch, 1: total},
                                       "position_ids": {0: batch, 1: new}, "past_halt_step": {0: batch},
                                       "past": tuple({0: batch, 2: past_len} for _ in range(2 * n))}
    trace(DecodeGraph(model, device), args, (*DECODE_INPUTS, *past_names(n)), (*DECODE_OUTPUTS, *present_names(n)),
          dynamic, path, opset)


def decode_cases(cfg: ModelConfig, seed: int = 0) -> list[tuple[str, list[list[int]], list[list[int]]]]:
    """(name, prompts, continuations): batch 1 from a one-token prompt, and a batch of prompts of different
    lengths (one of length 1, one as long as the continuation leaves room for)."""
    rng = np.random.default_rng(seed)
    longest = max(1, cfg.max_seq_len - DECODE_STEPS)

    def tokens(n: int) -> list[int]:
        return rng.integers(0, cfg.vocab_size, size=n).tolist()

    lengths = [1, longest, *rng.integers(1, longest + 1, size=4).tolist()]
    return [("decode_batch1", [tokens(1)], [tokens(DECODE_STEPS)]),
            ("decode_batch6", [tokens(n) for n in lengths], [tokens(DECODE_STEPS) for _ in lengths])]


def check_decode_parity(model: RecursiveMoE, session, seed: int = 0, label: str = "fp32",
                        tolerance: float | None = TOLERANCE, buffers: Any = None) -> ParityReport:
    """The decode graph in `session`, prefill then DECODE_STEPS calls, against the eager full forward (run where the
    model's parameters are). `buffers`: where the cache lives (moe_core/runtime/decoding.py; host memory by default)."""
    model.eval()
    device = next(model.parameters()).device
    cases = []
    for name, prompts, continuations in decode_cases(model.config, seed):
        cfg = model.config
        got, halt = run_decode(session, prompts, continuations, cache_entries(cfg), cfg.n_heads, cfg.head_dim,
                               cfg.max_seq_len, buffers)
        got = got.astype(np.float32)
        seqs = [p + c for p, c in zip(prompts, continuations, strict=True)]
        T = max(map(len, seqs))
        ids = np.array([s + [0] * (T - len(s)) for s in seqs], dtype=np.int64)
        mask = np.array([[1] * len(s) + [0] * (T - len(s)) for s in seqs], dtype=np.int64)
        with torch.no_grad():
            full = model(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
        ref = np.stack([full.logits[b, len(p) - 1: len(p) + DECODE_STEPS].float().cpu().numpy()
                        for b, p in enumerate(prompts)])  # [B, calls, V]: the logits predicting each next token
        diff = np.abs(got - ref)
        max_abs = float(diff.max())
        ref_halt = full.halt_step.cpu().numpy()
        cases.append(CaseResult(name, (len(prompts), T), max_abs, max_abs / max(float(np.abs(ref).max()), 1e-12),
                                bool(np.array_equal(halt, ref_halt)), sorted(set(ref_halt.tolist())),
                                float((got.argmax(-1) == ref.argmax(-1)).mean())))
    return ParityReport(cases, f"{label}, decode graph: prefill + {DECODE_STEPS} cached calls", tolerance)


def run_decode(session, prompts: list[list[int]], continuations: list[list[int]], entries: int, heads: int,
               head_dim: int, max_seq_len: int, buffers: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Prefill the right-padded prompts, then feed the continuations' tokens one call at a time, through the loop
    serve generates with (moe_core/runtime/decoding.py, buffers bound as past and present): the logits predicting each
    next token [B, 1 + calls, V] (after the prompt, then after each fed token) and halt_step."""

    def run(feeds: dict[str, np.ndarray], outputs: list[str], into: dict[str, np.ndarray]) -> list[np.ndarray]:
        return run_bound(session, feeds, outputs, into)

    cache_type = next(i.type for i in session.get_inputs() if i.name == past_names(1)[0])
    decoder = Decoder(run, entries, heads, head_dim, max_seq_len, buffers=buffers, cache_type=cache_type)
    last, state = decoder.prefill(prompts)
    logits, halt = [last], state.halt_step
    history = [list(p) for p in prompts]
    for j in range(len(continuations[0])):
        for h, c in zip(history, continuations, strict=True):
            h.append(c[j])
        last, state = decoder.step([c[j] for c in continuations], state, history)
        logits.append(last)
        if not np.array_equal(state.halt_step, halt):
            raise AssertionError("the decode graph changed halt_step after the prefill")
    return np.stack(logits, axis=1), halt


def eager_runner(model: RecursiveMoE):
    """The eager model behind the decode graph's interface (moe_core/runtime/decoding.py Run): the same feeds, the
    present written into the same buffers, cached_forward underneath — so eager and ONNX Runtime generate through one
    loop. cached_forward extends its past with the new keys and values (masking the rows' unused indices); their entries
    are then written into each row's buffer at its own length, as the decode graph writes them."""
    model.eval()

    def run(feeds: dict[str, np.ndarray], outputs: list[str], into: dict[str, np.ndarray]) -> list[np.ndarray]:
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        B, T = ids.shape
        prefill = feeds["position_ids"][:, 0] == 0  # Decoder never mixes prefill and decoding rows in one call
        before = np.where(prefill, 0, mask.sum(1) - T)  # each row's cached tokens
        width = int(before.max())
        pairs = len(into) // 2
        buffers = [(into[f"present.{i}.key"], into[f"present.{i}.value"]) for i in range(pairs)]
        past, key_mask = None, mask
        if width:  # a decoding call (a prefill has no past: every row's tokens start at position 0)
            past = KVCache([torch.from_numpy(k[:, :, :width]) for k, _ in buffers],
                           [torch.from_numpy(v[:, :, :width]) for _, v in buffers])
            cached = (np.arange(width)[None, :] < before[:, None]).astype(np.int64)  # each row's own entries
            key_mask = np.concatenate([cached, np.ones((B, T), dtype=np.int64)], axis=1)
        with torch.no_grad():
            out = model.cached_forward(torch.from_numpy(ids), torch.from_numpy(key_mask),
                                       torch.from_numpy(feeds["position_ids"]), past,
                                       None if past is None else torch.from_numpy(feeds["past_halt_step"]))
        rows = np.arange(B)[:, None]
        at = before[:, None] + np.arange(T)[None, :]  # [B, T]: each new token's index in its row's buffer
        # A prefill that stops once every sample halted returns fewer entries: their rows never read the others.
        for (k, v), new_k, new_v in zip(buffers, out.present.keys, out.present.values, strict=False):
            k[rows, :, at] = new_k[:, :, width:].numpy().transpose(0, 2, 1, 3)
            v[rows, :, at] = new_v[:, :, width:].numpy().transpose(0, 2, 1, 3)
        values = {LOGITS: out.logits.float().numpy(), HALT_STEP: out.halt_step.numpy()}
        return [values[n] for n in outputs]

    return run
