"""The benchmark suite's smallest path (`python -m benchmarks --smoke`) runs every section and reports every
ratio, and the FLOP count agrees with itself. No speed assertions: the targets live in the suite's report."""

from __future__ import annotations

import dataclasses
import json
import math

from benchmarks.cli import MODES, run
from benchmarks.flops import Routing, executed_flops_per_token, model_flops_per_token
from benchmarks.generation import PATHS
from benchmarks.report import RATIO_KEYS, table


def test_smoke_run_writes_every_ratio(tmp_path):
    run(MODES["smoke"], tmp_path, threads=1)
    results, plot = MODES["smoke"].files
    r = json.loads((tmp_path / results).read_text())
    assert (tmp_path / plot).stat().st_size > 0

    assert list(r["ratios"]) == list(RATIO_KEYS)
    for key, t in r["ratios"].items():
        assert t["value"] is not None and math.isfinite(t["value"]) and t["value"] > 0, key
    for key in ("cpu", "physical_cores", "torch", "onnxruntime", "onnx", "torch_threads", "ort_intra_op_threads"):
        assert r["machine"][key], key
    for factor, f in r["scaling"]["factors"].items():
        assert math.isfinite(f["time_exponent"]) and math.isfinite(f["flops_exponent"]), factor
    for row in r["serving"]["rows"]:  # the runtimes compute the same log-probs (int8: roughly)
        assert row["ort_fp32"]["max_abs_logprob_diff"] < 1e-3
    g = r["generation"]
    assert g["opset"]["decode"] == g["opset"]["unrolled"] == r["serving"]["opset"]  # export's default, one opset
    for c in g["cells"]:  # the four generation paths choose the same greedy tokens and halting
        assert c["same_tokens_all"] and c["same_halt_steps"], c["same_tokens"]
        assert all(c[p]["generated_tokens"] == c["batch"] * c["new_tokens"] for p in ("ort_cached", "eager_cached"))
        assert c["kv_cache"]["bytes"] == c["kv_cache"]["formula_bytes"] > 0
        assert c["kv_cache"]["length"] == r["generation"]["max_seq_len"]  # buffers allocated once, max_seq_len long
        assert all(c[p]["tokens_per_s"] > 0 and c[p]["ttft_s"] > 0 for p in PATHS)
    text = table(r)
    assert all(t["what"] in text for t in r["ratios"].values())


def test_flop_counts(tiny_config):
    """With every head, every expert, every step and full context, the model count is the executed count;
    fewer heads, top-k experts and earlier halting count less."""
    cfg = dataclasses.replace(tiny_config, causal=False, top_k=tiny_config.n_experts)
    T = cfg.max_seq_len
    every_head = Routing(heads_per_token=cfg.n_heads, halt_step_mean=1.0)
    assert model_flops_per_token(cfg, T, every_head) == executed_flops_per_token(cfg, T)
    sparse = dataclasses.replace(tiny_config, top_k=1)
    routing = Routing(heads_per_token=1.5, halt_step_mean=1.0)
    assert model_flops_per_token(sparse, T, routing, steps=1) < model_flops_per_token(sparse, T, routing) \
        < executed_flops_per_token(sparse, T)


def test_dispatch_crossover_rows_time_both_dispatches() -> None:
    """The crossover benchmark times one layer at one call size and says what "auto" picks there."""
    from benchmarks.dispatch_crossover import crossover_row, table
    from moe_core.config import ModelConfig

    cfg = ModelConfig(vocab_size=10, max_seq_len=81, d_model=32, d_expert=64, n_heads=4, min_heads=1, max_heads=4,
                      n_experts=4, top_k=2)
    small, large = crossover_row(cfg, 64, 1, 2), crossover_row(cfg, 2592, 1, 2)
    assert (small["tokens"], small["skipped_macs"], small["auto"]) == (64, 64 * 2 * 32 * 64, "dense")
    assert (large["tokens"], large["auto"]) == (2592, "sparse")
    assert all(r["inference"] > 0 and r["training"] > 0 for r in (small, large))
    assert table([small, large]).count("\n") == 3
