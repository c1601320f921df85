"""Graphs exported with `--device cuda` run entirely on ONNX Runtime's CUDA provider: its real partitioner, loaded
from the onnxruntime-gpu wheel over stub CUDA libraries (benchmarks/cuda_placement.py), finds a CUDA kernel for
every compute node, inserts no Memcpy node and accepts a CUDA-graph session, for every kind of graph (unrolled,
step, decode) in every CUDA precision, of a run trained with sparse MoE dispatch (which a CPU graph keeps), and for
the unrolled graph as serve opens it (with its scoring and generation outputs).

`make test` sets the wheel and stubs up (MOE_CUDA_PLACEMENT_HOME); plain pytest without it skips this file.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import onnx
import pytest
import torch
from helpers import vary_routing

from benchmarks.cuda_placement import failures, place, setup
from export.choices import CUDA_PRECISIONS
from export.onnx_export import export_run
from moe_core import ModelConfig, MoeError, RecursiveMoE
from moe_core.checkpoint import save_run
from moe_core.runtime.graph_contract import decode_path_for, step_path_for
from serve.graph import add_serving_outputs
from train.data import train_tokenizer

HOME = os.environ.get("MOE_CUDA_PLACEMENT_HOME")
pytestmark = pytest.mark.skipif(not HOME, reason="MOE_CUDA_PLACEMENT_HOME unset (`make test` sets it up)")


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory) -> Path:
    """A tiny causal language model whose config asks for sparse MoE dispatch, with varied routing and halting."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, max_seq_len=16, d_model=32, n_heads=4, n_layers=1, n_experts=4, d_expert=32,
                      H_cycles=1, L_cycles=1, halt_max_steps=2, moe_dispatch="sparse")
    run_dir = tmp_path_factory.mktemp("placement") / "run"
    rng = random.Random(1)
    words = "the king queen walked through a garden and found letter under stone".split()
    save_run(run_dir, vary_routing(RecursiveMoE(cfg), lm_scale=10.0),
             train_tokenizer([" ".join(rng.choice(words) for _ in range(2000))], cfg.vocab_size).to_str())
    return run_dir


@pytest.fixture(scope="module")
def graphs(sparse_run: Path) -> dict[str, Path]:
    """precision/kind -> the graph `moe export --device cuda --stepwise` wrote (their parity on the CPU is
    test_decode's and test_gpu_check's)."""
    out = {}
    for precision in CUDA_PRECISIONS:
        path = sparse_run.parent / f"{precision}.onnx"
        export_run(sparse_run, path, check=False, precision=precision, stepwise=True, decode=True,
                   device="cuda", log=lambda _: None)
        served = path.with_name(f"{precision}.served.onnx")
        proto = onnx.load(path)
        add_serving_outputs(proto)
        onnx.save(proto, served)
        out |= {f"{precision}/unrolled": path, f"{precision}/step": step_path_for(path),
                f"{precision}/decode": decode_path_for(path), f"{precision}/served": served}
    return out


def test_every_cuda_graph_runs_entirely_on_cuda(graphs: dict[str, Path]) -> None:
    home = setup(HOME)
    rows = place(list(graphs.values()), home)
    bad = {name: failures(row) for name, row in zip(graphs, rows, strict=True) if failures(row)}
    assert not bad, bad
    for name, row in zip(graphs, rows, strict=True):
        assert row["nodes"].get("CUDAExecutionProvider", 0) > row["nodes"].get("CPUExecutionProvider", 0), name
    for path in graphs.values():
        meta = {p.key: p.value for p in onnx.load(path).metadata_props}
        assert meta["device"] == "cuda", path


def test_the_check_sees_a_fallback(tmp_path: Path) -> None:
    """SplitToSequence (what a CPU graph's sparse dispatch splits with) has no CUDA kernel: ONNX Runtime copies
    around it and refuses CUDA graph capture, and the check says so (a four-node graph shows it is not blind)."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]),
                               helper.make_node("SplitToSequence", ["r"], ["s"], axis=0),
                               helper.make_node("SequenceAt", ["s", "one"], ["a"]),
                               helper.make_node("Relu", ["a"], ["y"])],
                              "fallback", [x], [y],
                              [helper.make_tensor("one", TensorProto.INT64, [], [1])])
    path = tmp_path / "fallback.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)
    (row,) = place([path], setup(HOME))
    assert row["no_cuda_kernel"] == {"SplitToSequence": 1}
    assert row["memcpy"] > 0
    assert row["cuda_graph"].startswith("refused")


def test_int8_for_cuda_is_refused_in_one_line(sparse_run: Path, tmp_path: Path) -> None:
    with pytest.raises(MoeError, match="--precision int8: not with --device cuda.*fp16 or bf16"):
        export_run(sparse_run, tmp_path / "m.onnx", precision="int8", device="cuda", log=lambda _: None)
    assert not list(tmp_path.iterdir())
