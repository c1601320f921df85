"""`moe serve` and serve.Server: results equal the eager model's, batching never changes them, bad input fails
cleanly. One tiny model is exported once for the whole module (an export costs ~30 s on this CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from helpers import (
    LM_WORDS,
    VARIED_SEQ_LEN,
    assert_clean_failure,
    make_texts,
    moe_serve,
    varied_run,
    write_jsonl,
)

from export.onnx_export import export_run
from moe_core import MoeError, RecursiveMoE, load_model
from moe_core.cli import cli
from moe_core.runtime.graph_contract import HALT_STEP
from moe_core.runtime.stepwise import StepCounts
from serve import Server
from serve.graph import LAST_LOGITS, TOKEN_LOGPROBS
from serve.runtime import CPU_EP, CUDA_EP, choose_providers, resolve_provider
from serve.server import length_batches, pick_token, windows
from train.data import train_tokenizer

T = VARIED_SEQ_LEN  # the exported model's max_seq_len


@pytest.fixture(scope="module")
def server(exported) -> Server:
    return Server.open(exported[1], provider="cpu", threads=1, runtime="unrolled")


@pytest.fixture(scope="module")
def stepwise_server(exported) -> Server:
    return Server.open(exported[1], provider="cpu", threads=1, runtime="stepwise")


@pytest.fixture(params=["unrolled", "stepwise"])
def any_server(request, server, stepwise_server) -> Server:
    return server if request.param == "unrolled" else stepwise_server


@pytest.fixture(scope="module")
def eager(exported) -> RecursiveMoE:
    return load_model(exported[0])


# -----------------------------------------------------------------------------
# eager references, written independently of serve's loops


@torch.no_grad()
def eager_scores(model: RecursiveMoE, ids: list[int], stride: int) -> tuple[list[float], int | None]:
    """log p(token t | context) for t = 1..n-1 under the sliding-window rule, and the first window's halt_step.

    Target t < T sees tokens 0..t-1; a later target belongs to window k = ceil((t - T + 1) / stride), which
    ends at min(T + k * stride, n) and holds the T tokens before that end."""
    n = len(ids)
    out = []
    for t in range(1, n):
        if t < T:
            begin = 0
        else:
            k = -(-(t - T + 1) // stride)
            begin = min(T + k * stride, n) - T
        # Causal: the logits at position t-1 of the window do not depend on what follows, and halting is
        # decided at the window's first position.
        logits = model(torch.tensor([ids[begin:t]])).logits[0, -1]
        out.append(float(logits.log_softmax(-1)[ids[t]]))
    halt = int(model(torch.tensor([ids[:T]])).halt_step[0]) if n else None
    return out, halt


@torch.no_grad()
def eager_greedy(model: RecursiveMoE, prompt: list[int], max_new: int, eot: int, n_valid: int):
    """(new tokens, finish reason, halt_step): the halting decided on the prompt, as serve reports it."""
    seq, new, halt = list(prompt), [], None
    for _ in range(max_new):
        out = model(torch.tensor([seq[-T:]]))
        halt = int(out.halt_step[0]) if halt is None else halt
        nxt = int(out.logits[0, -1, :n_valid].argmax())
        if nxt == eot:
            return new, "eot", halt
        seq.append(nxt)
        new.append(nxt)
    return new, "length", halt


# -----------------------------------------------------------------------------
# results equal the eager model's


def test_score_matches_eager(server, eager):
    # The step-wise runtime: test_stepwise_equals_unrolled_and_drops_halted_rows (the eager loop here is slow).
    texts = make_texts(24, seed=0) + [" ".join(LM_WORDS * 2)]  # the last one takes ~9 windows
    results = server.score(texts, batch_size=5, return_token_logprobs=True)
    assert len({r.halt_step for r in results if r.halt_step}) == 2, "the fixture must exercise both halt steps"
    for text, res in zip(texts, results, strict=True):
        ids = server.encode([text])[0]
        ref, ref_halt = eager_scores(eager, ids, stride=T // 2)
        assert res.n_tokens == len(ref) == max(0, len(ids) - 1)
        assert res.halt_step == ref_halt
        assert res.n_windows == len(windows(len(ids), T, T // 2))
        np.testing.assert_allclose(res.token_logprobs, ref, rtol=1e-4, atol=1e-4)
        if ref:
            ref_nll = -float(np.mean(ref))
            assert abs(res.nll - ref_nll) <= 1e-4 * ref_nll
            assert res.ppl == pytest.approx(np.exp(res.nll))
        else:  # empty or one-token text: nothing to score
            assert res.nll is None and res.ppl is None
    assert results[-1].n_windows > 2 and results[-1].n_tokens == len(server.encode([texts[-1]])[0]) - 1


def test_greedy_generate_matches_eager(any_server, eager):
    server = any_server
    # Prompts up to 2T tokens and 12 new tokens: the context fills up and slides.
    texts = ["", "a", "the king", "ALICE walked through the garden", " ".join(LM_WORDS[:6]), " ".join(LM_WORDS)]
    results = server.generate(texts, max_new_tokens=12, batch_size=4)
    n_valid = server.tokenizer.get_vocab_size()
    for text, res in zip(texts, results, strict=True):
        prompt = server.encode([text])[0] or [server.eot_id]
        tokens, reason, halt = eager_greedy(eager, prompt, 12, server.eot_id, n_valid)
        assert (res.tokens, res.finish_reason, res.halt_step) == (tokens, reason, halt), text
        assert res.text == server.tokenizer.decode(tokens)


def test_batch_size_and_order_do_not_change_results(server):
    texts = make_texts(15, seed=3)
    one, seven = server.score(texts, batch_size=1), server.score(texts, batch_size=7)
    for a, b in zip(one, seven, strict=True):
        assert (a.n_tokens, a.halt_step, a.n_windows) == (b.n_tokens, b.halt_step, b.n_windows)
        assert a.nll == b.nll or abs(a.nll - b.nll) <= 1e-6 * abs(b.nll)
    kw = dict(max_new_tokens=5, temperature=0.9, top_k=40, top_p=0.95, seed=7)
    s1 = server.generate(texts, batch_size=1, **kw)
    s7 = server.generate(texts[5:], batch_size=7, first_index=5, **kw)  # a later call of the same stream
    assert [r.tokens for r in s1[5:]] == [r.tokens for r in s7]
    other = server.generate(texts, batch_size=1, **{**kw, "seed": 8})
    assert [r.tokens for r in s1] != [r.tokens for r in other]
    greedy = [server.generate(texts, max_new_tokens=4, batch_size=bs) for bs in (1, 7)]
    assert [r.tokens for r in greedy[0]] == [r.tokens for r in greedy[1]]


def test_padding_is_small_and_counted(server):
    texts = make_texts(40, seed=5)
    before = (server.stats.padding, server.stats.positions)
    server.score(texts, batch_size=8)
    padding, positions = server.stats.padding - before[0], server.stats.positions - before[1]
    lengths = [e - b for x in server.encode(texts) for b, e, _ in windows(len(x), T, T // 2)]
    assert positions == sum(lengths)
    sorted_pad = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b)
                     for b in length_batches(lengths, 8))
    input_order_pad = sum(max(lengths[i:i + 8]) * len(lengths[i:i + 8]) - sum(lengths[i:i + 8])
                          for i in range(0, len(lengths), 8))
    assert padding == sorted_pad < input_order_pad


# -----------------------------------------------------------------------------
# step-wise serving: the step graph run step by step, halted samples dropped from the batch


def test_stepwise_equals_unrolled_and_drops_halted_rows(server, stepwise_server):
    """Same halt steps and outputs as the unrolled graph on a padded batch whose samples halt at step 1 or 2, and
    the second step runs only the samples that did not halt at the first."""
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 300, size=(24, T), dtype=np.int64)
    mask = (np.arange(T)[None, :] < rng.integers(1, T + 1, size=(24, 1))).astype(np.int64)
    ids *= mask
    outputs = [TOKEN_LOGPROBS, LAST_LOGITS, "logits", HALT_STEP]
    step, rows = stepwise_server.model.step, []
    run_feeds = step.run_feeds
    step.run_feeds = lambda feeds, names: rows.append(len(feeds["input_ids"])) or run_feeds(feeds, names)
    try:
        *got, halt = stepwise_server.model.run(ids, mask, outputs)
    finally:
        del step.run_feeds
    *ref, ref_halt = server.model.run(ids, mask, outputs)
    assert np.array_equal(halt, ref_halt) and set(ref_halt.tolist()) == {1, 2}
    assert rows == [24, int((ref_halt > 1).sum())]
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[0][valid[:, 1:]], ref[0][valid[:, 1:]], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-5)
    scale = np.abs(ref[2][valid]).max()
    assert np.abs(got[2][valid] - ref[2][valid]).max() / scale < 1e-4  # the parity tolerance


def test_stepwise_server_counts_the_steps_it_skips(stepwise_server, server):
    texts = make_texts(30, seed=17)
    stepwise_server.model.counts = StepCounts()
    a, b = stepwise_server.score(texts, batch_size=8), server.score(texts, batch_size=8)
    assert [r.halt_step for r in a] == [r.halt_step for r in b]
    assert all(x.nll == y.nll or abs(x.nll - y.nll) <= 1e-5 * y.nll for x, y in zip(a, b, strict=True))
    c, n_rows = stepwise_server.model.counts, sum(r.n_windows for r in a)  # one row per window
    assert c.full == 2 * n_rows and n_rows <= c.rows < c.full  # samples halting at step 1 ran one step only
    assert c.calls <= 2 * -(-n_rows // 8)


def test_cli_runtimes(exported, tmp_path):
    """--runtime auto takes the step graph, --runtime unrolled does not; both write the same records."""
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in make_texts(20, seed=23)])
    rows = {}
    for runtime in ("auto", "unrolled"):
        out = tmp_path / f"{runtime}.jsonl"
        code, stdout, stderr = moe_serve(exported[1], "--input", inp, "--output", out, "--runtime", runtime,
                                         "--provider", "cpu")
        assert code == 0, stderr
        rows[runtime] = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        shown = "stepwise" if runtime == "auto" else "unrolled"
        assert f"runtime {shown}: " in stdout.splitlines()[-1] and "of unrolled" in stdout.splitlines()[-1]
        assert ("step-wise (m.step.onnx)" in stdout.splitlines()[0]) == (runtime == "auto")
    for a, b in zip(rows["auto"], rows["unrolled"], strict=True):
        assert a["halt_step"] == b["halt_step"] and (a["nll"] == b["nll"] or abs(a["nll"] - b["nll"]) <= 1e-5)


def test_step_graph_errors(exported, tmp_path):
    """A missing, foreign or absent step graph: --runtime stepwise fails naming it; auto falls back, saying so."""
    models = tmp_path / "models"
    models.mkdir()
    model = damaged_model(exported[1], models, "none")
    step = models / "m.step.onnx"
    inp = tmp_path / "in.jsonl"
    inp.write_text(GOOD, encoding="utf-8")
    assert_clean_failure(tmp_path, "m.step.onnx: step graph not found", model, "--input", inp, "--runtime", "stepwise")
    code, stdout, stderr = moe_serve(model, "--input", inp, "--output", tmp_path / "auto.jsonl")
    assert code == 0 and "note: step graph m.step.onnx not found: running the unrolled graph" in stdout, stderr
    assert "runtime unrolled" in stdout.splitlines()[-1]

    shutil.copy(exported[1].with_name("m.step.onnx"), step)
    set_metadata_value(step, "weights_sha256", "0" * 64)
    assert_clean_failure(tmp_path, "m.step.onnx: the step graph does not belong to m.onnx (weights differ)", model,
                         "--input", inp, out_name="foreign.jsonl")
    assert_clean_failure(tmp_path, "m.step.onnx: a step graph (`moe export --stepwise`); serve the model it belongs "
                         "to (m.onnx)", step, "--input", inp, out_name="step.jsonl")
    set_metadata_value(model, "step_graph", None)
    assert_clean_failure(tmp_path, "m.onnx: --runtime stepwise needs the model's step graph, and it was exported "
                         "without one", model, "--input", inp, "--runtime", "stepwise", out_name="none.jsonl")


def set_metadata_value(path: Path, key: str, value: str | None) -> None:
    proto = onnx.load(str(path))
    keep = [p for p in proto.metadata_props if p.key != key]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    if value is not None:
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


# -----------------------------------------------------------------------------
# pure pieces


@pytest.mark.parametrize("stride", [1, 5, 8, 15])
def test_windows_score_every_token_once_with_enough_context(stride):
    for n in range(0, 60):
        scored = []
        for begin, end, first in windows(n, T, stride):
            assert 0 <= begin < first <= end <= n and end - begin <= T
            for t in range(first, end):
                assert t - begin >= min(t, T - stride)  # at least T - stride tokens of context (all of them early)
            scored += range(first, end)
        assert scored == list(range(1, n))


def test_pick_token():
    logits = np.array([0.1, 2.0, 1.9, -1.0, 0.5], dtype=np.float32)
    assert pick_token(logits) == 1
    rng = np.random.default_rng(0)
    assert {pick_token(logits, 1.0, top_k=1, rng=rng) for _ in range(20)} == {1}
    assert {pick_token(logits, 1.0, top_k=2, rng=rng) for _ in range(200)} == {1, 2}
    assert {pick_token(logits, 1.0, top_p=0.01, rng=rng) for _ in range(20)} == {1}
    draws = [pick_token(logits, 5.0, rng=np.random.default_rng(1)) for _ in range(3)]
    assert len(set(draws)) == 1  # the same generator state draws the same token


def test_provider_selection():
    cpu_only, with_cuda = ["AzureExecutionProvider", CPU_EP], [CUDA_EP, CPU_EP]
    assert choose_providers("auto", cpu_only) == [CPU_EP]
    assert choose_providers("auto", with_cuda) == [(CUDA_EP, {"use_tf32": "0"}), CPU_EP]
    assert choose_providers("cpu", with_cuda) == [CPU_EP]
    assert choose_providers("cuda", with_cuda)[0][0] == CUDA_EP
    with pytest.raises(MoeError, match="--provider cuda: this onnxruntime has no CUDAExecutionProvider"):
        choose_providers("cuda", cpu_only)
    tried = choose_providers("auto", with_cuda)
    assert resolve_provider("auto", tried, [CUDA_EP, CPU_EP]) == ("cuda", None)
    provider, note = resolve_provider("auto", tried, [CPU_EP])  # ORT fell back silently
    assert provider == "cpu" and "could not be used" in note
    with pytest.raises(MoeError, match="fell back"):
        resolve_provider("cuda", choose_providers("cuda", with_cuda), [CPU_EP])
    assert resolve_provider("cpu", [CPU_EP], [CPU_EP]) == ("cpu", None)


@pytest.mark.skipif(CUDA_EP not in ort.get_available_providers(), reason="needs onnxruntime-gpu and a GPU")
def test_cuda_matches_cpu(exported, server):
    gpu = Server.open(exported[1], provider="cuda")
    assert gpu.provider == "cuda"
    texts = make_texts(20, seed=9)
    for a, b in zip(gpu.score(texts), server.score(texts), strict=True):
        assert a.halt_step == b.halt_step and (a.nll is None or abs(a.nll - b.nll) <= 1e-4 * b.nll)
    assert [r.tokens for r in gpu.generate(texts, 8)] == [r.tokens for r in server.generate(texts, 8)]


# -----------------------------------------------------------------------------
# the CLI


def test_cli_keeps_order_and_ids_across_chunks(exported, server, tmp_path):
    # 70 records with shuffled lengths, batch size 1: two chunks of 64 records; some without an id.
    texts = make_texts(70, seed=11)
    records = [{"text": t} if i % 3 == 0 else {"id": f"r{i}", "text": t} for i, t in enumerate(texts)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in records[:30]) + "\n\n" +  # a blank line is skipped
                   "\n".join(json.dumps(r) for r in records[30:]) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    code, stdout, stderr = moe_serve(exported[1], "--input", inp, "--output", out, "--batch-size", 1,
                                     "--provider", "cpu", "--token-logprobs")
    assert code == 0, stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    line_numbers = [i + 1 if i < 30 else i + 2 for i in range(70)]
    assert [r["id"] for r in rows] == [r.get("id", n) for r, n in zip(records, line_numbers, strict=True)]
    expected = server.score(texts, batch_size=7, return_token_logprobs=True)
    for row, res in zip(rows, expected, strict=True):
        assert (row["n_tokens"], row["halt_step"], row["n_windows"]) == (res.n_tokens, res.halt_step, res.n_windows)
        assert row["nll"] == res.nll or abs(row["nll"] - res.nll) <= 1e-6 * res.nll
        np.testing.assert_allclose(row["token_logprobs"], res.token_logprobs, atol=1e-6)
    summary = stdout.strip().splitlines()[-1]
    assert summary.startswith("score: 70 sequences") and "padding" in summary and "tokens/s" in summary
    assert "mean halt_step" in summary and "provider cpu" in summary
    assert "provider cpu (CPUExecutionProvider" in stdout.splitlines()[0]


def test_cli_generate_sampling_is_batch_independent(exported, tmp_path):
    texts = make_texts(70, seed=13)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "text": t} for i, t in enumerate(texts)])
    outs = []
    for bs in (1, 7):
        out = tmp_path / f"out{bs}.jsonl"
        code, stdout, stderr = moe_serve(exported[1], "--input", inp, "--output", out, "--mode", "generate",
                                         "--batch-size", bs, "--max-new-tokens", 3, "--temperature", 0.8,
                                         "--top-p", 0.9, "--seed", 1)
        assert code == 0, stderr
        outs.append([json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()])
        assert "generate: 70 sequences" in stdout
    assert outs[0] == outs[1]
    assert [r["id"] for r in outs[0]] == list(range(70))
    assert all(set(r) == {"id", "completion", "n_new_tokens", "finish_reason", "halt_step"} for r in outs[0])


def test_cli_help_documents_the_long_input_rule():
    code, stdout, _ = moe_serve("--help")
    assert code == 0 and "sliding window" in stdout and "--stride" in stdout


# -- bad input: one line naming the file (and line), exit 2, no output left --------------------------------------

GOOD = '{"text": "the king"}\n'


def damaged_model(src: Path, dst: Path, damage: str) -> Path:
    """A copy of the exported model (and its tokenizer) in `dst`, damaged."""
    model, tok = dst / src.name, dst / src.with_suffix("").with_suffix(".tokenizer.json").name
    shutil.copy(src, model)
    shutil.copy(src.with_name(tok.name), tok)
    if damage == "not_onnx":
        model.write_bytes(b"this is not an onnx model\n")
    elif damage == "no_metadata":
        set_metadata_value(model, "tokenizer_sha256", None)
    elif damage == "no_tokenizer":
        tok.unlink()
    elif damage == "tokenizer_sha":
        tok.write_text(tok.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    elif damage == "tokenizer_too_big":
        import hashlib

        text = train_tokenizer([" ".join(LM_WORDS * 50)], 400).to_str()  # all the merges this corpus has: 355 tokens
        tok.write_text(text, encoding="utf-8")
        proto = onnx.load(str(model))
        for p in proto.metadata_props:
            if p.key == "tokenizer_sha256":
                p.value = hashlib.sha256(text.encode("utf-8")).hexdigest()
        onnx.save(proto, str(model))
    return model


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": "broken\n', "in.jsonl:2: invalid JSON"),
    (GOOD + '["text"]\n', "in.jsonl:2: got a JSON array"),
    (GOOD + GOOD + '{"id": 3}\n', 'in.jsonl:3: missing "text" field'),
    ('{"text": 5}\n', 'in.jsonl:1: "text" is a JSON number'),
    ("", "in.jsonl: no input records"),
    ("\n  \n\n", "in.jsonl: no input records"),
    (GOOD.encode() + b'{"text": "caf\xe9"}\n', "in.jsonl:2: not valid UTF-8"),
    (None, "in.jsonl: input file not found"),
])
def test_cli_bad_input(exported, tmp_path, content, message):
    inp = tmp_path / "in.jsonl"
    if isinstance(content, bytes):
        inp.write_bytes(content)
    elif content is not None:
        inp.write_text(content, encoding="utf-8")
    assert_clean_failure(tmp_path, message, exported[1], "--input", inp)


@pytest.mark.parametrize("damage, message", [
    ("missing", "m.onnx: model file not found"),
    ("not_onnx", "m.onnx: not an ONNX model"),
    ("no_metadata", "m.onnx: missing metadata tokenizer_sha256"),
    ("no_tokenizer", "m.tokenizer.json: tokenizer file not found"),
    ("tokenizer_sha", "m.tokenizer.json: tokenizer does not match the model m.onnx"),
    ("tokenizer_too_big", "m.tokenizer.json: tokenizer has 355 tokens but the model m.onnx has vocab_size 300"),
])
def test_cli_bad_model(exported, tmp_path, damage, message):
    models = tmp_path / "models"
    models.mkdir()
    model = models / "m.onnx" if damage == "missing" else damaged_model(exported[1], models, damage)
    inp = tmp_path / "in.jsonl"
    inp.write_text(GOOD, encoding="utf-8")
    assert_clean_failure(tmp_path, message, model, "--input", inp)


def test_cli_refuses_existing_output_bad_stride_and_unavailable_cuda(exported, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(GOOD, encoding="utf-8")
    out = tmp_path / "out.jsonl"
    out.write_text("precious", encoding="utf-8")
    code, _, stderr = moe_serve(exported[1], "--input", inp, "--output", out)
    assert code == 2 and "--overwrite" in stderr and out.read_text(encoding="utf-8") == "precious"
    assert_clean_failure(tmp_path, "stride: expected 1..15", exported[1], "--input", inp, "--stride", 16,
                         out_name="stride.jsonl")
    if CUDA_EP not in ort.get_available_providers():
        assert_clean_failure(tmp_path, "--provider cuda:", exported[1], "--input", inp, "--provider", "cuda",
                             out_name="cuda.jsonl")


def test_cli_refuses_solve_for_a_language_model(exported, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"puzzle": "' + "." * 81 + '"}\n', encoding="utf-8")
    assert_clean_failure(tmp_path, "m.onnx: --mode solve needs a Sudoku model (task sudoku), but this model's task "
                         "is lm; use --mode score or --mode generate", exported[1], "--input", inp, "--mode", "solve")


@pytest.mark.parametrize("max_steps, halting", [(4, True), (4, False), (1, True), (2, False)])
def test_step_graph_serves_other_step_counts_as_eager_does(exported, max_steps, halting):
    """--max-steps K / --no-halt: the step graph runs up to K steps (more or fewer than the exported 2), with or
    without the halt head, and gives what the eager model limited the same way (`moe eval`'s with_steps) gives."""
    from train.evaluate import with_steps

    run_dir, onnx_path = exported
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 300, size=(16, T), dtype=np.int64)
    mask = np.ones_like(ids)
    served = Server.open(onnx_path, provider="cpu", threads=1, max_steps=max_steps, halting=halting)
    assert served.model.runtime == "stepwise" and served.model.n_steps == max_steps
    logits, halt = served.model.run(ids, mask, ["logits", HALT_STEP])
    with torch.no_grad():
        ref = with_steps(load_model(run_dir), max_steps, halting)(torch.from_numpy(ids))
    assert np.array_equal(halt, ref.halt_step.numpy())
    if halting and max_steps > 2:
        assert len(set(halt.tolist())) >= 2  # some samples halt early
    if not halting:
        assert (halt == max_steps).all()
    scale = np.abs(ref.logits.numpy()).max()
    assert np.abs(logits - ref.logits.numpy()).max() / scale < 1e-4  # the parity tolerance
    note = served.steps_note()
    assert (f"up to {max_steps} steps" in note) and (("halt head ignored" in note) == (not halting))


def test_other_step_counts_need_the_step_graph(exported, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "the king"}])
    assert_clean_failure(tmp_path, "--max-steps / --no-halt: the unrolled graph runs its exported steps", exported[1],
                         "--input", inp, "--runtime", "unrolled", "--max-steps", "3")
    assert_clean_failure(tmp_path, "--max-steps / --no-halt: the unrolled graph", exported[1],
                         "--input", inp, "--runtime", "unrolled", "--no-halt", out_name="b.jsonl")
    code, stdout, stderr = moe_serve(exported[1], "--input", inp, "--output", tmp_path / "c.jsonl", "--max-steps", "3",
                                     "--provider", "cpu")
    assert code == 0 and "halt_max_steps 2 (serving up to 3 steps)" in stdout.splitlines()[0], stderr
    assert "of every sample running 3 steps)" in stdout.splitlines()[-1]
    models = tmp_path / "models"
    models.mkdir()
    model = damaged_model(exported[1], models, "none")
    set_metadata_value(model, "step_graph", None)
    assert_clean_failure(tmp_path, "m.onnx: --max-steps / --no-halt needs the model's step graph, and it was exported "
                         "without one", model, "--input", inp, "--no-halt", out_name="d.jsonl")


def test_device_note_says_what_runs_off_cuda_and_how_to_re_export(exported) -> None:
    """`moe serve` tells the user when a graph runs on another device than it was made for, and when ONNX Runtime
    placed nodes of it off CUDA (its placement record and log: moe_core/runtime/ort_session.py)."""
    from moe_core.runtime.ort_session import Placement
    from serve.runtime import device_note, read_model

    _, info = read_model(exported[1])
    assert info.device == "cpu"
    fallback = Placement({CUDA_EP: 300, CPU_EP: 40}, {"SplitToSequence": 36}, 108)
    note = device_note(info, "cuda", fallback)
    assert "runs partly on the CPU" in note and "Memcpy nodes: 108" in note and "SplitToSequence x36" in note
    assert f"moe export RUN --out {info.path.name} --device cuda" in note
    info.device = "cuda"
    assert device_note(info, "cuda", Placement({CUDA_EP: 300, CPU_EP: 20}, {}, 0)) == ""
    assert "made for cuda, this session runs on cpu" in device_note(info, "cpu", None)


def test_a_step_graph_carry_kept_on_the_device_gives_the_same_results(exported) -> None:
    """Step-wise serving on CUDA keeps the carry on the device and gathers the running rows there
    (moe_core/runtime/decoding.py DeviceBuffers); here on the CPU device: results identical to the host carry's."""
    from moe_core.runtime.decoding import DeviceBuffers

    host = Server.open(exported[1], provider="cpu", threads=1, runtime="stepwise")
    device = Server.open(exported[1], provider="cpu", threads=1, runtime="stepwise")
    device.model.carry = DeviceBuffers("cpu", [CPU_EP])
    texts = make_texts(40, seed=3)
    want, got = host.score(texts, batch_size=8), device.score(texts, batch_size=8)
    assert [(r.nll, r.halt_step) for r in got] == [(r.nll, r.halt_step) for r in want]
    assert len({r.halt_step for r in want if r.halt_step is not None}) > 1, "no sample left the batch early"


@pytest.fixture(scope="module")
def reduced(tmp_path_factory) -> dict[str, Path]:
    """The varied model exported as fp16 and as int8 (no decode or step graph)."""
    tmp = tmp_path_factory.mktemp("reduced")
    run_dir = varied_run(tmp / "run", seed=0, max_seq_len=T, H_cycles=1)
    out = {}
    for precision in ("fp16", "int8"):
        out[precision] = tmp / f"{precision}.onnx"
        export_run(run_dir, out[precision], check=False, precision=precision, log=lambda _: None)
    return out


def test_batch_size_changes_no_result_but_int8_s_as_stated(reduced) -> None:
    """fp16 keeps the promise (results never depend on --batch-size): the same discrete results and scores within
    fp32 rounding of its fp32 accumulation. int8 is the stated exception: its activations are quantised with one
    scale per batch tensor, which --batch-size's help and docs/serving.md say."""
    texts = make_texts(15, seed=3)
    fp16 = Server.open(reduced["fp16"], provider="cpu", threads=1, runtime="unrolled")
    one, seven = fp16.score(texts, batch_size=1), fp16.score(texts, batch_size=7)
    for a, b in zip(one, seven, strict=True):
        assert (a.n_tokens, a.halt_step) == (b.n_tokens, b.halt_step)
        assert a.nll == b.nll or abs(a.nll - b.nll) <= 1e-6 * abs(b.nll)
    greedy = [fp16.generate(texts, max_new_tokens=4, batch_size=bs) for bs in (1, 7)]
    assert [r.tokens for r in greedy[0]] == [r.tokens for r in greedy[1]]
    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert "except with an int8 model: its activations are quantised with one scale per batch" in " ".join(
        result.output.split())
