"""`moe serve --engine ray`: the same records as the in-process engine, for every mode and both runtimes, on two
local Ray workers; a worker killed mid-run loses and repeats nothing; bad input fails before any cluster; a model a
worker cannot open fails the run at once; sharded input gives a directory of shards and its manifest.

Budget: one local Ray cluster for the whole module (2 CPUs, plus one GPU resource that no device backs, for the
CUDA request path), and hand-built graphs with the export contract instead of a real export (tens of seconds each;
test_serve.py serves real exports). The graphs mix positions through a masked mean over the padded width,
the one reduction whose length depends on the batch, and halt samples at step 1 or 2, so batch composition and
both runtimes matter. Every run goes through the CLI, in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import run_moe
from onnx import TensorProto, helper, numpy_helper

import serve.ray_engine as ray_engine
from moe_core.common.errors import MoeError
from moe_core.common.jsonl import Record
from moe_core.runtime.graph_contract import graph_metadata, step_graph_metadata, step_path_for, tokenizer_path_for
from moe_core.tasks import sudoku
from serve import shards
from serve.ray_engine import Predictor, block_rows, plan_blocks, plan_workers, runs
from serve.shards import Job

ray = pytest.importorskip("ray")

T = 16  # the language model's max_seq_len
D = 8  # its width
CHARS = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,:;!?"
EPS = 2.0**-24  # fp32 unit roundoff


# -----------------------------------------------------------------------------
# hand-built models with the export contract


def char_tokenizer() -> str:
    """A character-level tokenizers JSON: <|endoftext|> = 0, then one token per character of CHARS."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok.to_str()


def mixing_graphs(vocab: int, max_len: int, task: str, tokenizer_text: str, seed: int):
    """(unrolled graph, step graph) of a 2-step model. Step s's logits are tanh(s*x + ctx) @ W_out, where x = E[ids]
    and ctx = the mean of x over the positions <= t that the mask keeps (a MatMul over the padded width); a sample
    halts at step 1 when its first token is even, else at step 2. The step graph computes the same steps from the
    carry (z_H += x; zeros at first), its halt logit +1 / -1 by the same rule."""
    rng = np.random.default_rng(seed)
    E = rng.normal(0, 1, (vocab, D)).astype(np.float32)
    W = rng.normal(0, 2, (D, vocab)).astype(np.float32)
    tril = np.tril(np.ones((max_len, max_len), dtype=np.float32))
    consts = {"E": E, "W_out": W, "tril": tril, "zero2": np.zeros(2, np.int64), "one": np.ones(1, np.int64),
              "zero": np.zeros(1, np.int64), "two": np.array([2], np.int64), "two_f": np.array(2.0, np.float32),
              "one_f": np.array(1.0, np.float32), "axes1": np.array([1], np.int64), "axes2": np.array([2], np.int64),
              "seq_axis": np.array([1], np.int64)}
    n = helper.make_node
    common = [
        n("Gather", ["E", "input_ids"], ["x"], axis=0),
        n("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        n("Shape", ["input_ids"], ["shape"]),
        n("Slice", ["shape", "one", "two"], ["seq"]),
        n("Concat", ["seq", "seq"], ["seq2"], axis=0),
        n("Slice", ["tril", "zero2", "seq2"], ["causal"]),
        n("Unsqueeze", ["m", "axes1"], ["m3"]),
        n("Mul", ["causal", "m3"], ["w"]),  # [B, T, T]: s <= t and kept
        n("ReduceSum", ["w", "axes2"], ["count"], keepdims=1),
        n("Max", ["count", "one_f"], ["count1"]),
        n("MatMul", ["w", "x"], ["wx"]),
        n("Div", ["wx", "count1"], ["ctx"]),
        n("Slice", ["input_ids", "zero", "one", "seq_axis"], ["first2"]),
        n("Squeeze", ["first2", "axes1"], ["first"]),
        n("Mod", ["first", "two"], ["odd"]),
    ]
    meta = graph_metadata({"model": {"d_model": D, "n_heads": 1, "n_experts": 1, "d_expert": D},
                           "train": {"task": task}}, vocab, max_len, 2, True, task, "m.tokenizer.json",
                          hashlib.sha256(tokenizer_text.encode()).hexdigest(), f"mixing-{seed}")
    ids = [helper.make_tensor_value_info(k, TensorProto.INT64, ["batch", "seq"])
           for k in ("input_ids", "attention_mask")]
    carry = [helper.make_tensor_value_info(k, TensorProto.FLOAT, ["batch", "seq", D]) for k in ("z_H", "z_L")]
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])

    def model(nodes, inputs, outputs, metadata):
        init = [numpy_helper.from_array(v, k) for k, v in consts.items()]
        proto = helper.make_model(helper.make_graph(common + nodes, "mixing", inputs, outputs, initializer=init),
                                  opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
        for k, v in metadata.items():
            proto.metadata_props.add(key=k, value=v)
        onnx.checker.check_model(proto, full_check=True)
        return proto

    unrolled = model([
        n("Add", ["x", "ctx"], ["a1"]), n("Tanh", ["a1"], ["h1"]), n("MatMul", ["h1", "W_out"], ["logits1"]),
        n("Mul", ["x", "two_f"], ["x2"]), n("Add", ["x2", "ctx"], ["a2"]), n("Tanh", ["a2"], ["h2"]),
        n("MatMul", ["h2", "W_out"], ["logits2"]),
        n("Add", ["odd", "one"], ["halt_step"]),
        n("Equal", ["halt_step", "one"], ["stop1"]),
        n("Unsqueeze", ["stop1", "axes1"], ["stop1_2"]), n("Unsqueeze", ["stop1_2", "axes2"], ["stop1_3"]),
        n("Where", ["stop1_3", "logits1", "logits2"], ["logits"]),
    ], ids, [logits, helper.make_tensor_value_info("halt_step", TensorProto.INT64, ["batch"])],
        {**meta, "step_graph": "m.step.onnx"})
    step = model([
        n("Add", ["z_H", "x"], ["next_z_H"]), n("Add", ["z_L", "ctx"], ["next_z_L"]),
        n("Add", ["next_z_H", "ctx"], ["a"]), n("Tanh", ["a"], ["h"]), n("MatMul", ["h", "W_out"], ["logits"]),
        n("Cast", ["odd"], ["odd_f"], to=TensorProto.FLOAT), n("Mul", ["odd_f", "two_f"], ["odd2"]),
        n("Sub", ["one_f", "odd2"], ["halt_logit"]),
    ], ids + carry, [helper.make_tensor_value_info(k, TensorProto.FLOAT, ["batch", "seq", D])
                     for k in ("next_z_H", "next_z_L")]
        + [logits, helper.make_tensor_value_info("halt_logit", TensorProto.FLOAT, ["batch"])],
        step_graph_metadata(meta, np.zeros(D, np.float32), np.zeros(D, np.float32)))
    return unrolled, step, E, W


def save_model(directory: Path, vocab: int, max_len: int, task: str, tokenizer_text: str, seed: int):
    directory.mkdir()
    path = directory / "m.onnx"
    unrolled, step, E, W = mixing_graphs(vocab, max_len, task, tokenizer_text, seed)
    onnx.save(unrolled, str(path))
    onnx.save(step, str(step_path_for(path)))
    tokenizer_path_for(path).write_text(tokenizer_text, encoding="utf-8")
    return path, E, W


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """(m.onnx, E, W_out) of a language model (vocab 64, max_seq_len 16) with its step graph."""
    return save_model(tmp_path_factory.mktemp("ray") / "lm", 64, T, "lm", char_tokenizer(), seed=1)


@pytest.fixture(scope="module")
def solver(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("ray") / "sudoku", sudoku.VOCAB, sudoku.CELLS, "sudoku",
                      sudoku.digit_tokenizer().to_str(), seed=2)[0]


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module, of its own (address "local": never one another process started); the
    CLI serves on this connection (it is already initialized)."""
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    yield
    ray.shutdown()


def texts(n: int, seed: int) -> list[str]:
    """Texts of 0 to ~40 characters (tokens): empty, one token, longer than max_seq_len (sliding windows)."""
    rng = np.random.default_rng(seed)
    out = ["", "a"]
    while len(out) < n:
        out.append("".join(rng.choice(list(CHARS), size=int(rng.choice([1, 3, 7, 12, 16, 23, 40])))))
    rng.shuffle(out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def serve(*args, ray_engine_on: bool = True):
    extra = ["--engine", "ray", "--workers", "2"] if ray_engine_on else []
    return run_moe(["serve", *map(str, args), "--provider", "cpu", *extra], in_process=True)


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def process_gone(pid: int) -> bool:
    """The process is gone, or dead and not yet reaped (a zombie, state Z)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


class KillOnce(Predictor):
    """A worker that SIGKILLs its own process (as the OOM killer would) after serving its second block, before the
    block's lines are returned, once per run (the first worker to get there, by an exclusive marker file)."""

    marker = ""

    def __call__(self, batch):
        out = super().__call__(batch)
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 2:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return out
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)
        return out


# -----------------------------------------------------------------------------
# the equality bound


def logprob_bound(E: np.ndarray, W: np.ndarray) -> float:
    """How far one token's log-prob may move when its row is batched with other rows, derived from the graph
    (mixing_graphs) in fp32, unit roundoff eps = 2^-24, gamma_k = k eps / (1 - k eps).

    A row's valid positions see the same nonzero terms in every batch: the padded ones are exact zeros, the weights
    w_ts and the count are exact (0/1 and small integers). What a batch changes is the grouping of sums: the masked
    sum over the padded width (at most T terms) and the blocking of the MatMuls. Two groupings of one n-term sum
    differ by at most 2 gamma_n times the sum of |terms| (Higham, Accuracy and Stability of Numerical Algorithms,
    section 3.1). So, with x_max = max|E|:
      ctx = sum_s w_ts x_s / count   moves by  d_ctx <= (2 gamma_T + 2 eps) x_max            (the sum, the division)
      a = s x + ctx, |a| <= 3 x_max  moves by  d_a   <= d_ctx + 6 eps x_max
      h = tanh(a), 1-Lipschitz       moves by  d_h   <= d_a + 4 eps                          (|h| <= 1: its rounding)
      z_v = sum_d h_d W_dv           moves by  d_z   <= (d_h + 2 gamma_D) max_v sum_d |W_dv|
      log p = z_y - logsumexp(z)     moves by  <= 2 d_z + 2 gamma_V (max|z| + ln V)          (logsumexp: 1-Lipschitz
                                                                                              in max-norm, plus its
                                                                                              own rounding)
    """
    gamma = lambda k: k * EPS / (1 - k * EPS)  # noqa: E731
    x_max = float(np.abs(E).max())
    vocab = W.shape[1]
    col = float(np.abs(W).sum(axis=0).max())  # also bounds |z|, since |h| <= 1
    d_ctx = (2 * gamma(T) + 2 * EPS) * x_max
    d_h = d_ctx + 6 * EPS * x_max + 4 * EPS
    d_z = (d_h + 2 * gamma(D)) * col
    return 2 * d_z + 2 * gamma(vocab) * (col + np.log(vocab))


def assert_same_records(ray_rows: list[dict], local_rows: list[dict], bound: float = 0.0) -> float:
    """Ids, order and every discrete field exactly; float fields within `bound` (nll: the mean of log-probs, each
    within bound; ppl = exp(nll) within ppl * bound, to first order). Returns the largest nll difference seen."""
    assert len(ray_rows) == len(local_rows)
    worst = 0.0
    for a, b in zip(ray_rows, local_rows, strict=True):
        assert a.keys() == b.keys() and a["id"] == b["id"]
        for k in a:
            if k in ("nll", "ppl") and a[k] is not None:
                tol = bound * (1 if k == "nll" else 1.01 * b[k])
                assert abs(a[k] - b[k]) <= tol, (k, a, b)
                worst = max(worst, abs(a[k] - b[k])) if k == "nll" else worst
            elif k == "token_logprobs":
                assert np.all(np.abs(np.subtract(a[k], b[k])) <= bound + 1e-6)  # written rounded to 6 decimals
            else:
                assert a[k] == b[k], (k, a, b)
    return worst


# -----------------------------------------------------------------------------
# pure pieces


def test_plan_workers():
    assert plan_workers("cpu", None, 1, {"CPU": 8.0, "GPU": 2.0}) == (8, 0)
    assert plan_workers("cpu", None, 3, {"CPU": 8.0}) == (2, 0)
    assert plan_workers("auto", None, 1, {"CPU": 8.0, "GPU": 2.0}) == (2, 1)  # one GPU per worker
    assert plan_workers("auto", None, 2, {"CPU": 8.0}) == (4, 0)
    assert plan_workers("cuda", 1, 4, {"CPU": 8.0, "GPU": 2.0}) == (1, 1)
    with pytest.raises(MoeError, match="--provider cuda: the Ray cluster has no GPUs"):
        plan_workers("cuda", None, 1, {"CPU": 8.0})
    with pytest.raises(MoeError, match="--workers 3: each CUDA worker takes one GPU, and the Ray cluster has 2"):
        plan_workers("cuda", 3, 1, {"CPU": 8.0, "GPU": 2.0})
    with pytest.raises(MoeError, match=r"--workers 3 x --threads-per-worker 2: needs 6 CPUs, and the Ray cluster"):
        plan_workers("cpu", 3, 2, {"CPU": 4.0})


def test_blocks_and_runs():
    assert block_rows(60, 2, 8) == 8  # 8 blocks: 4 per worker
    assert block_rows(10**6, 2, 32) == 64 * 32  # never more than the in-process engine's chunk
    assert block_rows(3, 2, 32) == 32
    assert runs(np.array([4, 5, 6])) == [(0, 3)]
    assert runs(np.array([4, 5, 9, 10, 2])) == [(0, 2), (2, 4), (4, 5)]


def test_blocks_sort_windows_unless_results_depend_on_positions():
    records = [Record(i + 1, i + 1, "x" * n) for i, n in enumerate([3, 9, 1, 5, 7, 2])]
    score = Job("score", rows=1)  # windows (chunks) of CHUNK_BATCHES records, blocks of 1 record (6 / (4 x 2) < 1)
    assert plan_blocks(records, score, 2) == [[1], [4], [3], [0], [5], [2]]  # longest first
    assert plan_blocks(records, Job("generate", rows=2), 1) == [[1, 4], [3, 0], [5, 2]]  # greedy
    assert plan_blocks(records, Job("generate", rows=2, temperature=0.7), 1) == [[0, 1], [2, 3], [4, 5]]
    many = [Record(i + 1, i + 1, "x" * n) for i, n in enumerate([1, 2] * 40)]  # chunks of 64, then 16
    blocks = plan_blocks(many, score, 1)
    assert [len(b) for b in blocks] == [20] * 4  # 80 / (4 blocks per worker)
    order = [i for b in blocks for i in b]  # each chunk longest first: its odd indices (2 characters) first
    assert order == [*range(1, 64, 2), *range(0, 64, 2), *range(65, 80, 2), *range(64, 80, 2)]
    assert [len(c) for c in shards.chunks(many, score)] == [64, 16]


# -----------------------------------------------------------------------------
# the same records as one process


def test_score_on_shards_equals_one_process_with_a_worker_killed(cluster, lm, tmp_path, monkeypatch):
    """Three input shards, the unrolled graph, token log-probs, and one worker SIGKILLed mid-run: a directory of output
    shards named after the inputs, every record once and in order, equal to the in-process engine's within the
    derived bound, and the manifest with the counts."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    monkeypatch.setattr(KillOnce, "marker", str(tmp_path / "killed"))
    monkeypatch.setattr(ray_engine, "Predictor", KillOnce)
    model, E, W = lm
    shards = tmp_path / "in"
    shards.mkdir()
    all_texts = texts(45, seed=0)
    for k, part in enumerate((all_texts[:20], all_texts[20:21], all_texts[21:])):
        write_jsonl(shards / f"part-{k}.jsonl", [{"text": t} for t in part])
    (shards / "notes.md").write_text("not a shard\n", encoding="utf-8")
    args = [model, "--input", shards, "--runtime", "unrolled", "--batch-size", "4", "--token-logprobs"]
    local = serve(*args, "--output", tmp_path / "local", ray_engine_on=False)
    assert local.returncode == 0, local.describe()
    result = serve(*args, "--output", tmp_path / "ray")
    assert result.returncode == 0, result.describe()

    killed = int((tmp_path / "killed").read_text())  # the worker's own pid, which it killed
    deadline = time.monotonic() + 60  # on a loaded machine its parent may reap it a while after the run ends
    while not process_gone(killed):
        assert time.monotonic() < deadline, f"the killed worker {killed} is still running"
        time.sleep(0.1)
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("score: 45 sequences") and "runtime unrolled" in summary
    assert "ray: 2 workers" in summary and "1 worker process restarted" in summary
    assert "engine ray: 2 workers x 1 thread" in result.stdout.splitlines()[0]

    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == ["manifest.json", "part-0.jsonl", "part-1.jsonl",
                                                                     "part-2.jsonl"]
    bound = logprob_bound(E, W)
    assert 0 < bound < 2e-3
    for k in range(3):
        got, want = rows_of(tmp_path / "ray" / f"part-{k}.jsonl"), rows_of(tmp_path / "local" / f"part-{k}.jsonl")
        assert [r["id"] for r in got] == list(range(1, len(got) + 1))  # each shard's own line numbers
        assert_same_records(got, want, bound)
    assert {r["halt_step"] for k in range(3) for r in rows_of(tmp_path / "ray" / f"part-{k}.jsonl")} == {None, 1, 2}
    m = json.loads((tmp_path / "ray" / "manifest.json").read_text(encoding="utf-8"))
    assert m["complete"] and m["mode"] == "score" and m["records"] == 45
    assert [(s["output"], s["records"]) for s in m["shards"]] == [("part-0.jsonl", 20), ("part-1.jsonl", 1),
                                                                    ("part-2.jsonl", 24)]
    assert m["model"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert m["settings"]["runtime"] == "unrolled" and m["settings"]["token_logprobs"] is True
    assert m["engine"] == {"name": "ray", "workers": 2, "threads_per_worker": 1, "ray_address": None}
    local_m = json.loads((tmp_path / "local" / "manifest.json").read_text(encoding="utf-8"))
    assert {**local_m, "engine": None} == {**m, "engine": None}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp directory left


def test_generate_stepwise_equals_one_process(cluster, lm, tmp_path):
    """Seeded sampling on the step graph: the tokens of every record equal, so each worker seeds a sample from its
    position in the whole input, whatever block it is in."""
    model = lm[0]
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": t, "id": f"t{i}"} for i, t in enumerate(texts(30, seed=1))])
    args = [model, "--input", inp, "--mode", "generate", "--runtime", "stepwise", "--batch-size", "3",
            "--max-new-tokens", "5", "--temperature", "0.8", "--seed", "3"]
    local = serve(*args, "--output", tmp_path / "local.jsonl", ray_engine_on=False)
    result = serve(*args, "--output", tmp_path / "ray.jsonl")
    assert local.returncode == 0 and result.returncode == 0, result.describe()
    got = rows_of(tmp_path / "ray.jsonl")
    assert_same_records(got, rows_of(tmp_path / "local.jsonl"))
    assert [r["id"] for r in got] == [f"t{i}" for i in range(30)] and {r["halt_step"] for r in got} == {1, 2}
    assert "runtime stepwise" in result.stdout.strip().splitlines()[-1]


def test_solve_stepwise_equals_one_process(cluster, solver, tmp_path):
    puzzles = sudoku.generate(20, 0, givens=(30, 40))
    rows = [{"puzzle": sudoku.format_grid(p), **({"solution": "".join(map(str, s))} if i % 2 else {})}
            for i, (p, s) in enumerate(zip(puzzles.puzzles, puzzles.solutions, strict=True))]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    args = [solver, "--input", inp, "--mode", "solve", "--batch-size", "2"]
    local = serve(*args, "--output", tmp_path / "local.jsonl", ray_engine_on=False)
    result = serve(*args, "--output", tmp_path / "ray.jsonl")
    assert local.returncode == 0 and result.returncode == 0, result.describe()
    got = rows_of(tmp_path / "ray.jsonl")
    assert_same_records(got, rows_of(tmp_path / "local.jsonl"))
    assert {r["steps"] for r in got} == {1, 2} and sum("correct" in r for r in got) == 10
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("solve: 20 puzzles") and "runtime stepwise" in summary


# -----------------------------------------------------------------------------
# faults


def test_a_model_a_worker_cannot_open_fails_at_once(cluster, lm, tmp_path):
    """--provider cuda on a cluster that offers a GPU: the driver checks the model on its CPU, the worker's
    onnxruntime has no CUDA: one line naming the worker, exit 2, nothing written."""
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts(10, seed=3)])
    out = tmp_path / "out.jsonl"
    result = run_moe(["serve", lm[0], "--input", inp, "--output", out, "--engine", "ray", "--provider", "cuda"],
                     in_process=True)
    assert result.returncode == 2, result.describe()
    lines = [line for line in result.stderr.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: --provider cuda: this onnxruntime has no "
                                                   "CUDAExecutionProvider"), result.stderr
    assert "(on the Ray worker at " in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_a_worker_without_the_model_file_reports_it_with_its_name(tmp_path):
    """What a node that cannot see the model path raises on its first block (the path above, through Ray): the
    usual one-line message, naming the worker."""
    worker = Predictor(str(tmp_path / "elsewhere" / "m.onnx"), {"provider": "cpu", "threads": 1}, Job("score", 4))
    with pytest.raises(MoeError) as e:
        worker({"index": [np.array([0])], "id": [["1"]], "text": [["a"]]})
    assert str(e.value).startswith(f"{tmp_path / 'elsewhere' / 'm.onnx'}: model file not found (on the Ray worker "
                                   "at ") and "\n" not in str(e.value)


def test_bad_input_fails_before_any_cluster(lm, tmp_path, monkeypatch):
    def no_cluster(address):
        raise AssertionError("a cluster was started for a bad input")

    monkeypatch.setattr(ray_engine, "cluster", no_cluster)
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "fine"}\n{"text": 7}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = serve(lm[0], "--input", inp, "--output", out)
    assert result.returncode == 2
    assert result.stderr.strip() == (f'error: {inp}:2: "text" is a JSON number; expected one JSON object per line '
                                     'with a string "text" field (and an optional "id")')
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    write_jsonl(shard_dir / "a.jsonl", [{"text": "x"}])
    (shard_dir / "b.jsonl").write_text('{"text": "y"}\n{"text": "z"\n', encoding="utf-8")
    result = serve(lm[0], "--input", shard_dir, "--output", tmp_path / "outdir")
    assert result.returncode == 2 and result.stderr.startswith(f"error: {shard_dir / 'b.jsonl'}:2: invalid JSON")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "shards"]


def test_without_ray_one_line_names_the_extra(lm, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # importing ray now fails, as where it is not installed
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    result = serve(lm[0], "--input", inp, "--output", tmp_path / "out.jsonl")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --engine ray: Ray is not installed; install it with pip install 'moe[ray]'"


@pytest.mark.parametrize("args, message", [
    (["--workers", "2"], "error: --workers: applies to --engine ray only"),
    (["--engine", "ray", "--threads", "2"], "error: --threads: sets the threads of --engine local"),
])
def test_engine_options_are_checked(lm, tmp_path, args, message):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    result = run_moe(["serve", lm[0], "--input", inp, "--output", tmp_path / "o.jsonl", *args], in_process=True)
    assert result.returncode == 2 and result.stderr.startswith(message), result.stderr


def test_shard_outputs_are_checked(lm, tmp_path):
    """A set of shards writes a directory: a file there, an existing directory of other files (even with
    --overwrite), or an input inside it is refused before any work; an earlier output set is replaced whole, and
    only when it holds nothing its manifest does not list."""
    shards = tmp_path / "in"
    shards.mkdir()
    write_jsonl(shards / "a.jsonl", [{"text": "x"}, {"text": "yz"}])
    (tmp_path / "file").write_text("x", encoding="utf-8")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine", encoding="utf-8")
    for output, extra, message in ((tmp_path / "file", [], "not a directory"),
                                   (other, [], "already exists (pass --overwrite to replace it)"),
                                   (other, ["--overwrite"], "a directory without manifest.json"),
                                   (shards, ["--overwrite"], "a directory without manifest.json")):
        result = serve(lm[0], "--input", shards, "--output", output, *extra, ray_engine_on=False)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert (other / "keep.txt").read_text(encoding="utf-8") == "mine"
    out = tmp_path / "out"
    assert serve(lm[0], "--input", str(shards / "*.jsonl"), "--output", out, ray_engine_on=False).returncode == 0
    first = (out / "a.jsonl").read_text(encoding="utf-8")
    assert serve(lm[0], "--input", shards, "--output", out, ray_engine_on=False).returncode == 2  # exists
    (out / "stale.jsonl").write_text("old\n", encoding="utf-8")  # a file the set's manifest does not list
    result = serve(lm[0], "--input", shards, "--output", out, "--overwrite", ray_engine_on=False)
    assert result.returncode == 2 and "does not list (stale.jsonl)" in result.stderr, result.describe()
    (out / "stale.jsonl").unlink()
    result = serve(lm[0], "--input", shards, "--output", out, "--overwrite", ray_engine_on=False)
    assert result.returncode == 0, result.describe()
    assert sorted(p.name for p in out.iterdir()) == ["a.jsonl", "manifest.json"]
    assert (out / "a.jsonl").read_text(encoding="utf-8") == first
    result = serve(lm[0], "--input", str(tmp_path / "nothing-*.jsonl"), "--output", tmp_path / "o2",
                   ray_engine_on=False)
    assert result.returncode == 2 and "the pattern matches no input file" in result.stderr


def test_sigterm_under_the_ray_engine_is_one_line_and_exit_143(lm, tmp_path):
    """Ray installs its own SIGTERM handler when it connects (a stack dump, exit 15); the command puts its own back:
    one line, no output, exit 143, as every other command."""
    import subprocess
    import time

    from helpers import moe_command, subprocess_env

    inp = tmp_path / "in.jsonl"
    write_jsonl(inp, [{"text": f"the king walked {i}"} for i in range(4000)])
    out, log, err = tmp_path / "out.jsonl", tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(log, "w", encoding="utf-8") as o, open(err, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(moe_command(["serve", str(lm[0]), "--input", str(inp), "--output", str(out),
                                             "--provider", "cpu", "--engine", "ray", "--workers", "1", "--mode",
                                             "generate", "--max-new-tokens", "200"]),
                                env=subprocess_env(), stdout=o, stderr=f, text=True)
        deadline = time.monotonic() + 120
        while "engine ray:" not in log.read_text(encoding="utf-8"):  # the header: connected to the cluster
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text(encoding="utf-8")
            time.sleep(0.2)
        time.sleep(1.0)  # the run under way
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    text = err.read_text(encoding="utf-8")
    assert code == 143 and "interrupted by SIGTERM; unfinished outputs removed" in text, text
    assert "Traceback" not in text and "*** SIG" not in text
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl.*"))
