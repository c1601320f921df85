"""The contract between `moe export` and its readers (serve, the parity check, the benchmarks): the graphs' input
and output names, the metadata keys, the files written beside MODEL.onnx. Torch-free: numpy only.

The unrolled graph (MODEL.onnx) computes every supervision step and selects each sample's halting step with masks:

    inputs  input_ids, attention_mask  int64 [batch, seq]
    outputs logits                     float32 [batch, seq, vocab]    the halting step's logits
            halt_step                  int64 [batch]                  the step each sample halted at (1-based)

The step graph (MODEL.step.onnx, `moe export --stepwise`) is one supervision step (RecursiveMoE.step):

    inputs  input_ids, attention_mask  int64 [batch, seq]
            z_H, z_L                   float32 [batch, seq, d_model]   the carry
    outputs next_z_H, next_z_L         float32 [batch, seq, d_model]   the carry after the step
            logits                     float32 [batch, seq, vocab]     this step's logits
            halt_logit                 float32 [batch]                 the sample halts at this step when > 0

Metadata (string values) of both graphs: METADATA_KEYS (all required), then format_version (moe_core.common.formats),
task (moe_core.tasks.TASKS; files without it: the run config's train.task), precision ("fp32" or the
reduced-precision variant), weights_sha256 (ties a step graph to its unrolled graph), device (DEVICE), step_graph
(the unrolled graph's step graph, a file name beside it). A step graph also has graph = "step" and its initial
carry, INIT_KEYS: the model's fixed z_H_init / z_L_init vectors broadcast over [batch, seq], as JSON lists of
float32 values (exact).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..common.errors import MoeError
from ..common.formats import FORMAT_VERSION

LOGITS = "logits"
HALT_STEP = "halt_step"
INPUTS = ("input_ids", "attention_mask")
OUTPUTS = (LOGITS, HALT_STEP)
STEP_INPUTS = ("input_ids", "attention_mask", "z_H", "z_L")
STEP_OUTPUTS = ("next_z_H", "next_z_L", LOGITS, "halt_logit")
GRAPH_IO = {"unrolled": (INPUTS, OUTPUTS), "step": (STEP_INPUTS, STEP_OUTPUTS)}  # by metadata "graph"
# halt_max_steps: the supervision steps the graph runs (the model's n_steps: 1 with recursion off); the key keeps
# its name, which graphs already exported carry.
METADATA_KEYS = ("moe_version", "config", "vocab_size", "max_seq_len", "halt_max_steps", "causal",
                 "tokenizer_file", "tokenizer_sha256")
# sha256 of the graph's initializers as written (initializers_sha256): serve verifies it when it opens a graph, so
# that a corrupted or edited weight is refused instead of served (flipped bits in a weight give NaN logits, or
# plausible wrong ones). Graphs written before the key existed are served unverified.
INITIALIZERS_SHA256 = "initializers_sha256"


def initializers_sha256(proto: Any) -> str:
    """sha256 over an ONNX graph's initializers (name, type, dims, raw bytes), in name order."""
    from onnx import numpy_helper

    h = hashlib.sha256()
    for t in sorted(proto.graph.initializer, key=lambda t: t.name):
        h.update(f"{t.name}:{t.data_type}:{list(t.dims)}:".encode())
        h.update(t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes())
    return h.hexdigest()


# The supervision steps the run validated for serving (serve_max_steps): the K `moe eval --ladder --calibrate-halting`
# chose its halting threshold at, written by export when the weights are the calibrated ones. `moe serve` runs that
# many steps by default on the step graph (halting decides each sample's own); --max-steps overrides.
SERVE_MAX_STEPS = "serve_max_steps"


# The device a graph was made for, "cpu" or "cuda" (`moe export --device`; files without the key: "cpu").
DEVICE = "device"
INIT_KEYS = ("z_H_init", "z_L_init")
STEP_SUFFIX = ".step.onnx"
TOKENIZER_SUFFIX = ".tokenizer.json"

# The decode graph (MODEL.decode.onnx, causal language models): one graph for the prefill and every decoding call,
# with the onnxruntime-genai / optimum names. Each row's cache holds its own entries at indices 0..n-1, n its tokens
# so far (index = position: right padding leaves no holes), and a call writes its new entries at each row's length:
#
#   inputs  input_ids, position_ids    int64 [batch, new]              new tokens at their positions
#           attention_mask             int64 [batch, total]            row b: 1 for its first n_b indices (its tokens
#                                                                     after this call), then 0; total = max n_b
#           past_halt_step             int64 [batch]                   the prefill's halt_step (ignored at a prefill:
#                                                                     a sample whose new tokens start at position 0)
#           past_key_values.{i}.key / .value  float32 [batch, heads, past, head_dim], i = 0..cache_entries-1
#   outputs logits                     float32 [batch, new, vocab]     the kept step's logits
#           halt_step                  int64 [batch]                   decided at the prefill, carried after
#           present.{i}.key / .value   float32 [batch, heads, max(past, total), head_dim]: the past with row b's
#                                                                     new entries at indices n_b-new..n_b-1
#
# Two ways to drive it: past length 0 at the prefill and each present fed back as the next past (it grows with the
# longest row), or (what serve does, genai's past_present_share_buffer) a past buffer max_seq_len long bound as the
# present output too, which attention then writes in place: ONNX Runtime's com.microsoft GroupQueryAttention in a
# graph made for the CPU, ScatterElements then the standard Attention op in one made for CUDA (export/decode.py). The
# cache is float32, or in a CUDA graph the graph's precision (float16 / bfloat16: no Cast between buffer and
# attention); a reader takes the type from the graph's past input.
# Entry i belongs to the i-th block application of the recursion (supervision step, H-cycle, net call, layer, in
# call order). Metadata: the unrolled graph's, plus graph = "decode", cache_entries and cache_layout = CACHE_LAYOUT.
DECODE_SUFFIX = ".decode.onnx"
DECODE_INPUTS = ("input_ids", "attention_mask", "position_ids", "past_halt_step")
DECODE_OUTPUTS = (LOGITS, HALT_STEP)
CACHE_ENTRIES = "cache_entries"
CACHE_LAYOUT = "per-row"  # metadata cache_layout: the layout above (graphs without the key have another)


def past_names(entries: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(entries) for kv in ("key", "value")]


def present_names(entries: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(entries) for kv in ("key", "value")]


def decode_path_for(onnx_path: str | os.PathLike) -> Path:
    """The decode graph written beside MODEL.onnx: MODEL.decode.onnx."""
    p = Path(onnx_path)
    return p.with_name(p.stem + DECODE_SUFFIX)


def decode_graph_metadata(metadata: dict[str, str], cache_entries: int) -> dict[str, str]:
    """The decode graph's metadata: its unrolled graph's, plus graph = "decode", the number of cache entries and
    the cache's layout."""
    return {**metadata, "graph": "decode", CACHE_ENTRIES: str(cache_entries), "cache_layout": CACHE_LAYOUT}


def step_path_for(onnx_path: str | os.PathLike) -> Path:
    """The step graph written beside MODEL.onnx: MODEL.step.onnx."""
    p = Path(onnx_path)
    return p.with_name(p.stem + STEP_SUFFIX)


def tokenizer_path_for(onnx_path: str | os.PathLike) -> Path:
    """The tokenizer written beside MODEL.onnx: MODEL.tokenizer.json."""
    p = Path(onnx_path)
    return p.with_name(p.stem + TOKENIZER_SUFFIX)


def task_of(full_config: dict) -> str:
    """The run's task (train.task of its config.json): "lm" (runs from before tasks existed too) or "sudoku"."""
    train = full_config.get("train")
    return train.get("task", "lm") if isinstance(train, dict) else "lm"


def graph_metadata(full_config: dict[str, Any], vocab_size: int, max_seq_len: int, halt_max_steps: int,
                   causal: bool, task: str, tokenizer_file: str, tokenizer_sha256: str,
                   weights_sha256: str, device: str = "cpu") -> dict[str, str]:
    """The metadata of an exported unrolled graph (the step graph's: step_graph_metadata of it)."""
    return {
        "moe_version": __version__,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(full_config, sort_keys=True),
        "vocab_size": str(vocab_size),
        "max_seq_len": str(max_seq_len),
        "halt_max_steps": str(halt_max_steps),
        "causal": str(causal).lower(),
        "task": task,
        "tokenizer_file": tokenizer_file,
        "tokenizer_sha256": tokenizer_sha256,
        "weights_sha256": weights_sha256,
        DEVICE: device,
    }


def step_graph_metadata(metadata: dict[str, str], z_H_init: np.ndarray, z_L_init: np.ndarray) -> dict[str, str]:
    """The step graph's metadata: its unrolled graph's, plus graph = "step" and the initial carry."""
    return {**metadata, "graph": "step", **init_metadata(z_H_init, z_L_init)}


def init_metadata(z_H_init: np.ndarray, z_L_init: np.ndarray) -> dict[str, str]:
    """The initial-carry vectors as metadata values: float32 -> Python float (exact) -> JSON (shortest repr)."""
    return {k: json.dumps(np.asarray(v, dtype=np.float32).tolist()) for k, v in zip(INIT_KEYS, (z_H_init, z_L_init),
                                                                                     strict=True)}


def read_step_metadata(meta: dict[str, str], where: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, int]:
    """(z_H_init [D], z_L_init [D], halt_max_steps) from a step graph's metadata; MoeError naming `where`."""
    inits = []
    for key in INIT_KEYS:
        try:
            v = np.asarray(json.loads(meta[key]), dtype=np.float32)
        except KeyError:
            raise MoeError(f"{where}: missing metadata {key} (expected a step graph written by `moe export "
                           "--stepwise`)") from None
        except (ValueError, TypeError):
            v = None
        if v is None or v.ndim != 1 or not v.size or not np.isfinite(v).all():
            raise MoeError(f"{where}: malformed metadata {key}: expected a JSON list of finite numbers")
        inits.append(v)
    if inits[0].shape != inits[1].shape:
        raise MoeError(f"{where}: metadata z_H_init and z_L_init differ in length ({inits[0].size} vs {inits[1].size})")
    steps = meta.get("halt_max_steps", "")
    if not (steps.isascii() and steps.isdigit() and 0 < int(steps) < 10**6):
        raise MoeError(f"{where}: malformed metadata halt_max_steps: expected a positive integer, got {steps[:40]!r}")
    return inits[0], inits[1], int(steps)
