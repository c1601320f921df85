"""Parity CI: eager PyTorch logits == exported ONNX logits, on models whose halting and routing really vary.

Each export costs tens of seconds on a 2-core CPU, so every exported model is built once (module fixtures)
and carries several of the variations the parity must cover.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import VERSE_WORDS, VOCAB, make_tokenizer_json

from export.onnx_export import export_run
from export.parity import check_parity
from moe_core import ModelConfig, RecursiveMoE, load_model
from moe_core.checkpoint import save_run
from moe_core.cli import cli
from moe_core.runtime.graph_contract import (
    STEP_INPUTS,
    STEP_OUTPUTS,
    read_step_metadata,
    step_path_for,
    tokenizer_path_for,
)
from moe_core.runtime.ort_session import ort_session as ort_cpu_session
from moe_core.runtime.stepwise import StepwiseSession
from moe_core.tasks import language_parity_inputs


def make_run(tmp: Path, seed: int, halt_scale: float, **overrides) -> Path:
    """A run dir holding a random model whose halt head makes samples halt at different steps."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(vocab_size=VOCAB, max_seq_len=16, d_model=32, n_heads=4, n_layers=1,
                                n_experts=4, top_k=2, d_expert=32, H_cycles=2, L_cycles=1, halt_max_steps=3),
                         **overrides})
    model = RecursiveMoE(cfg)
    with torch.no_grad():
        # Random routers and predictors (a fresh model routes almost uniformly) and a halt head that crosses
        # 0.5 at different steps for different samples.
        for name, p in model.named_parameters():
            if any(k in name for k in ("router", "complexity_head", "threshold_head")):
                p.normal_(0.0, 0.5)
        model.halt_head.weight.normal_(0.0, halt_scale)
        model.halt_head.bias.zero_()
        for name, p in model.named_parameters():
            if name.endswith("attn_bias"):  # a learned bias that changes who attends to whom
                p.normal_(0.0, 2.0)
    run = tmp / f"run{seed}"
    save_run(run, model, make_tokenizer_json())
    return run


def exported(tmp_path_factory, seed: int, halt_scale: float = 1.0, stepwise: bool = False, **overrides):
    tmp = tmp_path_factory.mktemp(f"export{seed}")
    run = make_run(tmp, seed, halt_scale, **overrides)
    out = tmp / "model.onnx"
    result = export_run(run, out, stepwise=stepwise, log=lambda _: None)
    return run, out, result


@pytest.fixture(scope="module")
def recursive_top2(tmp_path_factory):
    """Recursive, causal, MoE top-2, MoH 1..4 heads."""
    return exported(tmp_path_factory, seed=1, top_k=2, min_heads=1, max_heads=4)


@pytest.fixture(scope="module")
def recursive_top1_bidir(tmp_path_factory):
    """Recursive, bidirectional (padding enters attention and the halting pool), MoE top-1, MoH 2..3 heads, a
    random learned attention bias (attn_bias, masked by the padding); with its step graph (--stepwise)."""
    return exported(tmp_path_factory, seed=2, stepwise=True, top_k=1, min_heads=2, max_heads=3, causal=False,
                    attn_bias=True)


@pytest.fixture(scope="module")
def baseline_top1(tmp_path_factory):
    """Recursion off: the plain MoE/MoH baseline, MoE top-1, MoH 1..2 heads."""
    return exported(tmp_path_factory, seed=3, top_k=1, min_heads=1, max_heads=2, recursive=False, n_layers=2)


@pytest.fixture(scope="module")
def recursive_sparse(tmp_path_factory):
    """Recursive, MoE 8 experts top-2 with sparse dispatch: tokens sorted by expert, each expert's rows sliced by
    the runtime counts."""
    return exported(tmp_path_factory, seed=4, n_experts=8, top_k=2, moe_dispatch="sparse", halt_max_steps=2,
                    H_cycles=1)


def assert_parity(run, out, result, expect_varied_halting: bool) -> None:
    assert result.parity is not None and result.parity.ok, result.parity.summary()
    model = load_model(run)
    # The report comes from the exporter; recompute it here, from a fresh load, on other inputs.
    report = check_parity(model, str(out), seed=123)
    assert report.ok, report.summary()
    assert report.max_rel < 1e-4
    steps = {s for c in report.cases for s in c.halt_steps}
    if expect_varied_halting:
        assert len(steps) >= 2, f"halting never varied across samples: {steps}"
    else:
        assert steps == {1}
    # Routing varied: tokens of one batch use different numbers of heads in the first layer's MoH.
    name, ids, mask = language_parity_inputs(model.config.vocab_size, model.config.max_seq_len, 0)[3]
    attn = model.net.blocks[0].attn
    route, heads = attn.route, []
    attn.route = lambda x: heads.append(route(x)) or heads[-1]
    with torch.no_grad():
        model(torch.from_numpy(ids), torch.from_numpy(mask))
    counts = torch.unique(torch.cat([r.mask.sum(-1).flatten() for r in heads]))
    assert len(counts) >= 2, f"every token used the same number of heads on {name}: {counts}"


def test_parity_recursive_top2(recursive_top2):
    assert_parity(*recursive_top2, expect_varied_halting=True)


def test_parity_recursive_top1_bidirectional(recursive_top1_bidir):
    assert_parity(*recursive_top1_bidir, expect_varied_halting=True)


def test_parity_baseline_top1(baseline_top1):
    assert_parity(*baseline_top1, expect_varied_halting=False)


def test_parity_sparse_dispatch(recursive_sparse):
    """The sparse graph has the parity of the others, is sparse (per-expert MatMuls in every MoE call), and is the
    same function as dense dispatch with the same weights."""
    run, out, _ = recursive_sparse
    assert_parity(*recursive_sparse, expect_varied_halting=True)
    model = load_model(run)
    cfg = model.config
    assert model.net.blocks[0].ffn.dispatch == "sparse"
    moe_calls = cfg.n_layers * cfg.n_steps * cfg.H_cycles * (cfg.L_cycles + 1)
    matmuls = sum(node.op_type == "MatMul" for node in onnx.load(str(out)).graph.node)
    assert matmuls >= 3 * cfg.n_experts * moe_calls, matmuls
    dense = RecursiveMoE(dataclasses.replace(cfg, moe_dispatch="dense"))
    dense.load_state_dict(model.state_dict())
    report = check_parity(dense.eval(), str(out), seed=7)
    assert report.ok and report.max_rel < 1e-4, report.summary()


def test_int8_quantises_the_sparse_graphs_experts(recursive_sparse, tmp_path):
    """Sparse dispatch slices each expert's weight out of the stored one; int8 folds those slices into
    initializers so that dynamic quantisation reaches them: every expert MatMul of every MoE call is integer, as
    in the dense graph, with int8's usual cost."""
    import shutil

    from export.onnx_export import convert_precision

    run, out, _ = recursive_sparse
    model = load_model(run)
    cfg = model.config
    path = tmp_path / "m-int8.onnx"
    shutil.copyfile(out, path)
    convert_precision(str(path), "int8", {})
    graph = onnx.load(str(path)).graph
    moe_calls = cfg.n_layers * cfg.n_steps * cfg.H_cycles * (cfg.L_cycles + 1)
    integer = sum(node.op_type == "MatMulInteger" for node in graph.node)
    assert integer >= 3 * cfg.n_experts * moe_calls, integer
    # The folded copies of the unrolled calls are merged: one int8 weight per expert matrix.
    expert_weights = [i for i in graph.initializer
                      if i.data_type == onnx.TensorProto.INT8 and ".ffn.w_" in i.name and len(i.dims) == 2]
    assert len(expert_weights) == 3 * cfg.n_experts * cfg.n_layers, [i.name for i in expert_weights]
    report = check_parity(model, str(path), label="int8", tolerance=None)
    # The bounds of test_precision_variants_report_their_cost; top-1 over all cases (one of them has 5 tokens, of
    # which this random model's near-tied logits flip one).
    assert report.max_rel < 0.2 and np.mean([c.top1 for c in report.cases]) > 0.9, report.summary()


# -- the step graph (--stepwise): one supervision step, run step by step with halted samples dropped ------------

def test_step_graph_contract_and_parity(recursive_top1_bidir):
    import onnx

    run, out, result = recursive_top1_bidir
    step = step_path_for(out)
    assert result.step_path == step and step.is_file()
    report = result.step_reports[0]
    assert report.ok and report.label == "fp32, step graph run step-wise", report.summary()
    assert len({s for c in report.cases for s in c.halt_steps}) >= 2
    proto, main = onnx.load(str(step)), onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == list(STEP_INPUTS)
    assert [o.name for o in proto.graph.output] == list(STEP_OUTPUTS)
    meta, main_meta = ({p.key: p.value for p in m.metadata_props} for m in (proto, main))
    assert meta["graph"] == "step" and main_meta["step_graph"] == step.name and "graph" not in main_meta
    assert meta["weights_sha256"] == main_meta["weights_sha256"] and meta["config"] == main_meta["config"]
    model = load_model(run)
    z_H, z_L, n_steps = read_step_metadata(meta, step)
    assert np.array_equal(z_H, model.z_H_init.numpy()) and np.array_equal(z_L, model.z_L_init.numpy())
    assert n_steps == model.config.halt_max_steps == 3
    assert len(proto.graph.node) < len(main.graph.node) / 2  # one step of three


def test_stepwise_equals_unrolled_and_drops_halted_rows(recursive_top1_bidir):
    """On a padded batch whose samples halt at every step: the halt steps of the unrolled graph and of eager
    PyTorch, logits within the parity tolerance, and each step runs only the samples that have not halted."""
    run, out, _ = recursive_top1_bidir
    rng = np.random.default_rng(11)
    B, T = 48, 16
    mask = (np.arange(T)[None, :] < rng.integers(1, T + 1, size=(B, 1))).astype(np.int64)
    feeds = {"input_ids": rng.integers(0, VOCAB, size=(B, T), dtype=np.int64) * mask, "attention_mask": mask}
    stepwise = StepwiseSession(ort_cpu_session(str(step_path_for(out))))
    rows, run_step = [], stepwise.session.run
    stepwise.session.run = lambda names, f: rows.append(len(f["input_ids"])) or run_step(names, f)
    logits, halt = stepwise.run(["logits", "halt_step"], feeds)
    ref_logits, ref_halt = ort_cpu_session(str(out)).run(["logits", "halt_step"], feeds)
    with torch.no_grad():
        eager = load_model(run)(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(mask))
    assert np.array_equal(halt, ref_halt) and np.array_equal(halt, eager.halt_step.numpy())
    assert set(halt.tolist()) == {1, 2, 3}, np.bincount(halt)
    assert rows == [B, int((halt > 1).sum()), int((halt > 2).sum())]  # halted samples left the batch
    assert stepwise.counts.rows == halt.sum() < stepwise.counts.full == 3 * B
    valid = mask.astype(bool)
    assert np.abs(logits - ref_logits)[valid].max() / np.abs(ref_logits[valid]).max() < 1e-4


def test_stepwise_is_refused_without_recursion(baseline_top1, tmp_path):
    out = tmp_path / "m.onnx"
    r = run_export([str(baseline_top1[0]), "--out", str(out), "--stepwise"])
    assert r.exit_code == 2 and "--stepwise: the model of" in r.output and "no recursion" in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_failed_step_parity_writes_nothing(recursive_top1_bidir, tmp_path, monkeypatch):
    """The step graph fails its parity check: neither graph nor the tokenizer is left."""
    import shutil

    import export.onnx_export as ox
    from export.parity import check_parity

    run, out, _ = recursive_top1_bidir
    monkeypatch.setattr(ox, "to_onnx", lambda model, path, opset, **_: shutil.copyfile(out, path))
    monkeypatch.setattr(ox, "step_to_onnx", lambda model, path, opset: shutil.copyfile(step_path_for(out), path))

    def broken_step_parity(model, path, stepwise=False, **kw):
        if stepwise:
            with torch.no_grad():
                model.halt_head.bias += 0.5
        return check_parity(model, path, stepwise=stepwise, **kw)

    monkeypatch.setattr(ox, "check_parity", broken_step_parity)
    r = run_export([str(run), "--out", str(tmp_path / "m.onnx"), "--stepwise"])
    assert r.exit_code == 2 and "m.step.onnx: parity check failed" in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_parity_trained_tiny_model(tmp_path):
    """A model after real training steps (not just random weights), at sequence length 128, exports with parity,
    its routing and halting decisions compared one by one."""
    from train.config import build_config
    from train.trainer import train

    corpus = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    corpus.write_text("\n".join(" ".join(rng.choice(VERSE_WORDS, 12)) for _ in range(1500)), encoding="utf-8")
    cfg = build_config("tiny", None, [f"train.data={json.dumps(str(corpus))}", "train.compile=false",
                                      "train.max_steps=20", "model.vocab_size=300", "model.max_seq_len=128",
                                      "model.H_cycles=1", "model.L_cycles=1"])
    train(cfg, tmp_path / "run")
    result = export_run(tmp_path / "run", tmp_path / "m.onnx", log=lambda _: None)
    assert result.parity.ok, result.parity.summary()
    for case in result.parity.cases:
        d = case.decisions
        assert d is not None and d.compared >= case.shape[0] and d.wrong == 0, result.parity.summary()


def test_fused_operators_at_opset_23_decomposed_below(recursive_top2, recursive_top1_bidir, tmp_path):
    """Opset 23, the default: each block application's attention is one Attention node (causal; padding and the
    learned attn_bias as its mask), its rotary embedding one RotaryEmbedding per q and k, every RMSNorm one
    RMSNormalization, and no constant plumbing is left (passes.runtime_folded). Opset 20 decomposes all three
    and passes the same parity check."""
    fused = ("Attention", "RotaryEmbedding", "RMSNormalization")
    for run, out, result in (recursive_top2, recursive_top1_bidir):
        cfg = load_model(run).config
        calls = cfg.n_steps * cfg.H_cycles * (cfg.L_cycles + 1)  # block-stack calls of the unrolled forward
        ops = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
        assert result.opset == 23
        assert ops["Attention"] == calls * cfg.n_layers and ops["RotaryEmbedding"] == 2 * calls * cfg.n_layers, ops
        # per call the net's input norm and two per block, and each step's norm of z_H for the heads
        assert ops["RMSNormalization"] == calls * (2 * cfg.n_layers + 1) + cfg.n_steps, ops
        assert ops["Constant"] == ops["CastLike"] == ops["Identity"] == 0, ops
    run = make_run(tmp_path, seed=5, halt_scale=1.0, H_cycles=1, halt_max_steps=2)
    result = export_run(run, tmp_path / "m20.onnx", opset=20, log=lambda _: None)
    ops = Counter(n.op_type for n in onnx.load(str(result.path)).graph.node)
    assert result.opset == 20 and result.parity.ok, result.parity.summary()
    assert not set(fused) & set(ops), ops


def test_parity_check_detects_a_wrong_graph(recursive_top2):
    """The check is not vacuous: eager weights that differ from the graph's in halting or routing fail it."""
    run, out, _ = recursive_top2
    model = load_model(run)
    with torch.no_grad():
        model.halt_head.bias += 0.5
    report = check_parity(model, str(out))
    assert not report.ok and any(not c.halt_equal for c in report.cases)

    model = load_model(run)
    with torch.no_grad():
        model.net.blocks[0].attn.threshold_head.bias += 1.0  # other heads selected, same weights otherwise
    report = check_parity(model, str(out))
    assert not report.ok and report.max_rel > 1e-3


def test_graph_contract_and_metadata(recursive_top2):
    import onnx

    run, out, result = recursive_top2
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in proto.graph.output] == ["logits", "halt_step"]
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert all(isinstance(d, str) for d in dims), f"input axes must be dynamic, got {dims}"
    meta = {p.key: p.value for p in proto.metadata_props}
    cfg = json.loads(meta["config"])
    assert cfg["model"]["halt_max_steps"] == 3 and meta["vocab_size"] == str(VOCAB)
    assert meta["max_seq_len"] == "16" and meta["moe_version"]
    tok = tokenizer_path_for(out)
    assert tok.is_file() and meta["tokenizer_file"] == tok.name
    import hashlib

    assert meta["tokenizer_sha256"] == hashlib.sha256(tok.read_bytes()).hexdigest()
    # Weights are stored once, not once per unrolled call.
    n_model = sum(p.numel() for p in load_model(run).state_dict().values())
    assert result.params < 3 * n_model, (result.params, n_model)


def test_onnx_runs_in_a_process_without_torch(recursive_top2, tmp_path):
    """Any batch size and length up to the maximum, in a process that imports only onnxruntime and numpy."""
    run, out, _ = recursive_top2
    rng = np.random.default_rng(7)
    shapes = [(1, 1), (2, 16), (11, 5), (32, 16)]
    for i, (b, t) in enumerate(shapes):
        np.save(tmp_path / f"ids{i}.npy", rng.integers(0, VOCAB, size=(b, t), dtype=np.int64))
    script = textwrap.dedent(f"""
        import sys, numpy as np, onnxruntime as ort
        sess = ort.InferenceSession({str(out)!r}, providers=["CPUExecutionProvider"])
        for i in range({len(shapes)}):
            ids = np.load({str(tmp_path)!r} + f"/ids{{i}}.npy")
            logits, halt = sess.run(None, {{"input_ids": ids, "attention_mask": np.ones_like(ids)}})
            np.save({str(tmp_path)!r} + f"/logits{{i}}.npy", logits)
            np.save({str(tmp_path)!r} + f"/halt{{i}}.npy", halt)
        assert "torch" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    model = load_model(run)
    for i in range(len(shapes)):
        ids = torch.from_numpy(np.load(tmp_path / f"ids{i}.npy"))
        with torch.no_grad():
            ref = model(ids)
        logits = np.load(tmp_path / f"logits{i}.npy")
        assert logits.shape == (*shapes[i], VOCAB)
        scale = ref.logits.abs().max().item()
        assert np.abs(logits - ref.logits.numpy()).max() / scale < 1e-4
        assert np.array_equal(np.load(tmp_path / f"halt{i}.npy"), ref.halt_step.numpy())


# -- bad input: one line, exit 2, no output file --------------------------------------------------------------

def run_export(args: list[str]):
    from click.testing import CliRunner

    return CliRunner().invoke(cli, ["export", *args])


def corrupt_copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, message", [
    ("truncate_weights", "model.safetensors: not a valid safetensors file"),
    ("config_mismatch", "weights do not match config.json"),
    ("tokenizer_too_big", "tokenizer has"),
    ("tokenizer_garbage", "not a tokenizers JSON file"),
    ("no_config", "config.json: file not found"),
    ("bad_config_value", "model.top_k"),
])
def test_export_bad_checkpoint(recursive_top2, tmp_path, monkeypatch, damage, message):
    run = corrupt_copy(recursive_top2[0], tmp_path / "run")
    if damage == "truncate_weights":
        data = (run / "model.safetensors").read_bytes()
        (run / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "config_mismatch":
        cfg = json.loads((run / "config.json").read_text())
        cfg["model"]["d_expert"] = 48
        (run / "config.json").write_text(json.dumps(cfg))
    elif damage == "tokenizer_too_big":
        (run / "tokenizer.json").write_text(make_tokenizer_json(vocab=400))
    elif damage == "tokenizer_garbage":
        (run / "tokenizer.json").write_text("{not json")
    elif damage == "no_config":
        (run / "config.json").unlink()
    elif damage == "bad_config_value":
        cfg = json.loads((run / "config.json").read_text())
        cfg["model"]["top_k"] = 9
        (run / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "m.onnx"
    r = run_export([str(run), "--out", str(out)])
    assert r.exit_code == 2, r.output
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.output
    assert not out.exists() and not tokenizer_path_for(out).exists()
    assert list(tmp_path.glob(".m.onnx*")) == []


def test_export_refuses_existing_output(recursive_top2, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"precious")
    r = run_export([str(recursive_top2[0]), "--out", str(out)])
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert out.read_bytes() == b"precious"


def test_ort_session_helper_reports_shapes(recursive_top2):
    _, out, _ = recursive_top2
    sess = ort_cpu_session(str(out))
    ids = np.zeros((3, 4), dtype=np.int64)
    logits, halt = sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    assert logits.shape == (3, 4, VOCAB) and halt.dtype == np.int64 and halt.shape == (3,)


@pytest.fixture
def reuse_graph(recursive_top2, monkeypatch):
    """export_run without the (slow) trace: the graph is the one recursive_top2 already exported, so tests of
    what happens after tracing (parity failure, precision variants) cost seconds, not a re-export each."""
    import shutil

    import export.onnx_export as ox

    def copy_graph(model, path, opset, **_):
        shutil.copyfile(recursive_top2[1], path)

    monkeypatch.setattr(ox, "to_onnx", copy_graph)
    return recursive_top2


def test_failed_parity_writes_nothing(reuse_graph, tmp_path, monkeypatch):
    """An export whose parity fails exits 2 and leaves neither the model nor its tokenizer."""
    import export.onnx_export as ox
    from export.parity import TOLERANCE, check_parity

    def broken_parity(model, path, **kw):
        with torch.no_grad():
            model.halt_head.bias += 0.5  # the eager side now halts differently from the graph
        return check_parity(model, path, **kw)

    monkeypatch.setattr(ox, "check_parity", broken_parity)
    out = tmp_path / "m.onnx"
    r = run_export([str(reuse_graph[0]), "--out", str(out)])
    assert r.exit_code == 2 and "parity check failed" in r.output, r.output
    assert TOLERANCE == 1e-4
    assert not out.exists() and not tokenizer_path_for(out).exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_precision_variants_report_their_cost(reuse_graph, tmp_path, precision):
    import onnx

    run = reuse_graph[0]
    text = tmp_path / "eval.txt"
    rng = np.random.default_rng(1)
    text.write_text(" ".join(rng.choice(VERSE_WORDS, 600)), encoding="utf-8")
    lines: list[str] = []
    out = tmp_path / f"m-{precision}.onnx"
    result = export_run(run, out, precision=precision, eval_text=text, log=lines.append)
    fp32, variant = result.reports
    assert fp32.ok and fp32.label == "fp32" and variant.label == precision and variant.tolerance is None
    # Reduced precision moves logits by more than fp32 noise, but it is the same model: the predicted token
    # agrees almost everywhere.
    assert fp32.max_rel < variant.max_rel < 0.2
    assert min(c.top1 for c in variant.cases) > 0.9
    cost = [l for l in lines if l.startswith("accuracy on")]
    assert len(cost) == 1 and f"ONNX {precision} loss" in cost[0]
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["precision"] == precision and meta["tokenizer_file"] == tokenizer_path_for(out).name
