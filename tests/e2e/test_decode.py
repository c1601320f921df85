"""KV-cached generation on the decode graph (MODEL.decode.onnx): exported with its own parity check, refused when it
is not the model's, and generating exactly what uncached generation and the eager model generate — greedy and
seeded sampling, prompts of different lengths in one batch, samples halting at different steps."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import make_texts, varied_run

from export.decode import cache_entries, eager_runner
from export.onnx_export import export_run
from moe_core import MoeError, load_model
from moe_core.runtime.graph_contract import CACHE_ENTRIES, decode_path_for
from serve import Server

T = 24  # max_seq_len


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(run_dir, model.onnx, export result) of a random causal model whose routing and halting vary, exported with
    its decode graph and both parity checks."""
    tmp = tmp_path_factory.mktemp("decode")
    run = varied_run(tmp / "run", seed=1, max_seq_len=T)
    out = tmp / "m.onnx"
    result = export_run(run, out, decode=True, log=lambda _: None)
    return run, out, result


def texts(n: int = 12) -> list[str]:
    return [t for t in make_texts(n, seed=5) if t][:n]


def short_texts(server: Server, room: int, n: int = 12) -> list[str]:
    """n texts whose prompt leaves `room` tokens before max_seq_len: cached and uncached see the same context."""
    got = [t for t in make_texts(4 * n, seed=5) if 0 < len(server.encode([t])[0]) <= T - room][:n]
    assert len(got) == n
    return got


def test_export_writes_a_decode_graph_that_passes_parity(exported):
    run, out, result = exported
    assert result.decode_path == decode_path_for(out) and result.decode_path.is_file()
    report = result.decode_reports[0]
    assert report.ok and len(report.cases) == 2, report.summary()
    meta = {p.key: p.value for p in onnx.load(str(result.decode_path)).metadata_props}
    assert meta["graph"] == "decode" and int(meta[CACHE_ENTRIES]) == cache_entries(load_model(run).config)
    main = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert main["decode_graph"] == result.decode_path.name and main["weights_sha256"] == meta["weights_sha256"]


def test_cached_generation_equals_uncached_and_eager(exported):
    """Greedy, within max_seq_len: the same tokens cached, uncached and from the eager model."""
    run, out, _ = exported
    cached = Server.open(out, provider="cpu", threads=1)
    plain = Server.open(out, provider="cpu", threads=1, cache=False)
    assert cached.decoder is not None and plain.decoder is None
    prompts = short_texts(cached, 8)
    a = cached.generate(prompts, max_new_tokens=8, batch_size=5)
    b = plain.generate(prompts, max_new_tokens=8, batch_size=5)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.halt_step for r in a] == [r.halt_step for r in b]
    assert len({r.halt_step for r in a}) >= 2, "halting did not vary across the prompts"
    assert cached.decoder.calls > 0 and cached.decoder.refills == 0
    # The eager model, greedy, recomputing the whole prefix (its own forward is the reference).
    model = load_model(run)
    for text, r in zip(prompts, a, strict=True):
        ids = cached.encode([text])[0]
        tokens = []
        with torch.no_grad():
            for _ in range(8):
                t = int(model(torch.tensor([ids + tokens])).logits[0, -1].argmax())
                if t == cached.eot_id:
                    break
                tokens.append(t)
        assert tokens == r.tokens, text


def test_cached_sampling_with_a_seed_equals_uncached(exported):
    _, out, _ = exported
    kw = dict(max_new_tokens=10, temperature=0.9, top_k=30, top_p=0.95, seed=7, batch_size=4)
    cached = Server.open(out, provider="cpu", threads=1)
    prompts = short_texts(cached, 10)
    a = cached.generate(prompts, **kw)
    b = Server.open(out, provider="cpu", threads=1, cache=False).generate(prompts, **kw)
    assert [r.tokens for r in a] == [r.tokens for r in b]


def test_generation_past_max_seq_len_refills_the_cache(exported):
    _, out, _ = exported
    server = Server.open(out, provider="cpu", threads=1)
    eot = server.eot_id
    results = server.generate(texts(4), max_new_tokens=40, batch_size=4)
    assert server.decoder.refills >= 1 or all(r.finish_reason == "eot" for r in results)
    for r in results:
        assert (r.finish_reason == "length") == (len(r.tokens) == 40) and eot not in r.tokens


def test_a_sample_refills_alone_and_never_depends_on_its_batch(exported):
    """Past max_seq_len each sample is prefilled again on its own when it gets there: prompts of different lengths
    reach it at different calls, and the tokens are the same whatever the batch (one by one, 5 at a time, all in
    one), on ONNX Runtime and on the eager model through the same loop."""
    run, out, _ = exported
    server = Server.open(out, provider="cpu", threads=1)
    prompts = texts(9)
    lengths = {len(ids) for ids in server.encode(prompts)}
    assert len(lengths) >= 3, lengths
    new = 2 * T  # every sample passes max_seq_len at least once (unless it ends on EOT first)
    runs = [server.generate(prompts, max_new_tokens=new, batch_size=b) for b in (1, 5, len(prompts))]
    assert server.decoder.refills >= len(prompts)
    for other in runs[1:]:
        assert [r.tokens for r in other] == [r.tokens for r in runs[0]]
    assert sum(len(r.tokens) > T for r in runs[0]) >= 3, "too few samples went past max_seq_len"
    eager = Server.open(out, provider="cpu", threads=1)
    eager.decoder.run = eager_runner(load_model(run))
    eager.decoder.last_output = eager.decoder.token_output = None  # the graph's own outputs: what the eager one has
    assert [r.tokens for r in eager.generate(prompts, max_new_tokens=new, batch_size=5)] == \
        [r.tokens for r in runs[0]]


def with_decode_metadata(out, tmp_path, key: str, value: str):
    """A copy of the exported model in tmp_path whose decode graph has metadata `key` = value; its path."""
    for f in (out, out.with_name("m.tokenizer.json")):
        shutil.copy(f, tmp_path / f.name)
    proto = onnx.load(str(decode_path_for(out)))
    for p in proto.metadata_props:
        if p.key == key:
            p.value = value
    onnx.save(proto, str(decode_path_for(tmp_path / "m.onnx")))
    return tmp_path / "m.onnx"


def test_a_decode_graph_of_another_model_is_refused(exported, tmp_path):
    _, out, _ = exported
    with_decode_metadata(out, tmp_path, "weights_sha256", "0" * 64)
    with pytest.raises(MoeError, match="the decode graph does not belong to m.onnx"):
        Server.open(tmp_path / "m.onnx", provider="cpu", threads=1)
    # Without the cache the model still serves.
    assert Server.open(tmp_path / "m.onnx", provider="cpu", threads=1, cache=False).generate(["a"], 2)
    # Another export's decode graph names another tokenizer file: what is refused is the graph, not a missing file.
    with_decode_metadata(out, tmp_path, "tokenizer_file", "other.tokenizer.json")
    proto = onnx.load(str(decode_path_for(tmp_path / "m.onnx")))
    for p in proto.metadata_props:
        if p.key == "weights_sha256":
            p.value = "1" * 64
    onnx.save(proto, str(decode_path_for(tmp_path / "m.onnx")))
    with pytest.raises(MoeError, match="the decode graph does not belong to m.onnx"):
        Server.open(tmp_path / "m.onnx", provider="cpu", threads=1)


def test_a_broken_decode_graph_is_one_line_at_the_cli(exported, tmp_path):
    from helpers import run_moe

    _, out, _ = exported
    for f in (out, out.with_name("m.tokenizer.json")):
        shutil.copy(f, tmp_path / f.name)
    decode_path_for(tmp_path / "m.onnx").write_bytes(b"not onnx")
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"text": "the king"}) + "\n", encoding="utf-8")
    r = run_moe(["serve", tmp_path / "m.onnx", "--input", inp, "--output", tmp_path / "o.jsonl", "--mode", "generate",
                 "--max-new-tokens", "2"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "m.decode.onnx: not an ONNX model" in r.stderr, r.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_decoding_writes_the_cache_in_place_and_device_buffers_agree(exported):
    """Each cached call writes its entries into the state's buffers (bound as past and present at once) instead of
    returning a new cache; the same generation over OrtValue buffers on the session's device (what CUDA runs,
    DeviceBuffers, here on the CPU device) chooses the same tokens."""
    from moe_core.runtime.decoding import DeviceBuffers

    _, out, _ = exported
    server = Server.open(out, provider="cpu", threads=1)
    decoder = server.decoder
    prompts = [ids[: T // 2] for ids in server.encode(texts()[:3])]
    _, state = decoder.prefill(prompts)
    buffers = [id(c) for c in state.cache]
    before = state.cache[0].copy()
    lengths = state.lengths.copy()
    _, after = decoder.step([1, 2, 3], state, [p + [t] for p, t in zip(prompts, [1, 2, 3], strict=True)])
    assert [id(c) for c in after.cache] == buffers and all(c.shape[2] == T for c in after.cache)
    changed = np.flatnonzero((after.cache[0] != before).any(axis=(1, 3)).any(axis=0))
    assert set(changed.tolist()) <= set(lengths.tolist()), "a call wrote entries other than its new tokens'"
    assert (after.lengths == lengths + 1).all()
    host = server.generate(texts(6), max_new_tokens=2 * T, batch_size=4)
    decoder.buffers = DeviceBuffers("cpu", ["CPUExecutionProvider"])
    device = server.generate(texts(6), max_new_tokens=2 * T, batch_size=4)
    assert [r.tokens for r in device] == [r.tokens for r in host]


def close(got: np.ndarray, want: np.ndarray) -> None:
    """Within the export's parity tolerance (relative to the largest logit): the same graph, whose attention reads
    the same entries, over buffers of other lengths."""
    from export.parity import TOLERANCE

    assert np.abs(got - want).max() <= TOLERANCE * np.abs(want).max()


def test_a_past_that_grows_from_length_0_gives_the_same_logits(exported):
    """The decode graph driven the other way its contract allows: past length 0 at the prefill and each present fed
    back as the next past, no buffer bound twice. The same logits as serve's shared max_seq_len buffers."""
    from moe_core.runtime.graph_contract import past_names, present_names
    from moe_core.runtime.ort_session import ort_session, run_bound

    _, out, _ = exported
    server = Server.open(out, provider="cpu", threads=1)
    decoder = server.decoder
    prompts = [ids[: T // 2] for ids in server.encode(texts()[:4])]
    first, state = decoder.prefill(prompts)
    shared, _ = decoder.step([5] * len(prompts), state, [p + [5] for p in prompts])
    session = ort_session(decode_path_for(out), threads=1)
    names = present_names(decoder.entries)
    B, P = len(prompts), max(map(len, prompts))
    lengths = np.array([len(p) for p in prompts])
    ids = np.array([p + [0] * (P - len(p)) for p in prompts], dtype=np.int64)
    mask = (np.arange(P)[None] < lengths[:, None]).astype(np.int64)
    empty = np.zeros((B, decoder.heads, 0, decoder.head_dim), dtype=np.float32)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.tile(np.arange(P), (B, 1)),
             "past_halt_step": np.zeros(B, dtype=np.int64), **dict.fromkeys(past_names(decoder.entries), empty)}
    logits, halt, *present = run_bound(session, feeds, ["logits", "halt_step", *names])
    assert all(p.shape[2] == P for p in present)
    close(logits[np.arange(B), lengths - 1], first)
    mask = (np.arange(P + 1)[None] < lengths[:, None] + 1).astype(np.int64)
    feeds = {"input_ids": np.full((B, 1), 5), "attention_mask": mask, "position_ids": lengths[:, None],
             "past_halt_step": halt, **dict(zip(past_names(decoder.entries), present, strict=True))}
    logits, _, *present = run_bound(session, feeds, ["logits", "halt_step", *names])
    assert all(p.shape[2] == P + 1 for p in present)
    close(logits[:, 0], shared)


def test_a_decode_graph_of_another_cache_layout_is_refused(exported, tmp_path):
    _, out, _ = exported
    with_decode_metadata(out, tmp_path, "cache_layout", "concat")
    with pytest.raises(MoeError, match=r"m\.decode\.onnx: a decode graph of another cache layout"):
        Server.open(tmp_path / "m.onnx", provider="cpu", threads=1)


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="needs onnxruntime-gpu and a GPU")
def test_cached_generation_on_cuda_keeps_the_cache_on_the_device(exported):
    """On CUDA the decoder's buffers are device OrtValues (DeviceBuffers), and the tokens are the CPU's."""
    from moe_core.runtime.decoding import DeviceBuffers

    _, out, _ = exported
    gpu = Server.open(out, provider="cuda")
    assert gpu.provider == "cuda" and isinstance(gpu.decoder.buffers, DeviceBuffers)
    cpu = Server.open(out, provider="cpu", threads=1)
    prompts = short_texts(cpu, 8)
    assert [r.tokens for r in gpu.generate(prompts, 8)] == [r.tokens for r in cpu.generate(prompts, 8)]


@pytest.fixture(scope="module")
def exported_for_cuda(exported, tmp_path_factory):
    """The same run exported with --device cuda (its decode graph: ScatterElements + Attention), checked."""
    run, _, _ = exported
    out = tmp_path_factory.mktemp("decode_cuda") / "m.onnx"
    export_run(run, out, decode=True, device="cuda", log=lambda _: None)
    return out


def test_static_shapes_generate_what_the_dynamic_loop_generates(exported, exported_for_cuda):
    """The loop CUDA graph capture needs (moe_core/runtime/decoding.py static shapes: bucket buffers reused across
    batches, a max_seq_len-wide mask, feeds and outputs written in place, rows gathered into a smaller bucket on the
    device, refills written into the bucket's rows), run on the CPU device over the decode graph made for CUDA: the
    tokens of the dynamic loop, greedy (token ids from the graph) and sampled (logits), batch after batch, through
    refills
    past max_seq_len, and the CPU graph's tokens."""
    from moe_core.runtime.decoding import DeviceBuffers

    out = exported_for_cuda
    server = Server.open(out, provider="cpu", threads=1)
    prompts, new = texts(9), 2 * T
    want = [server.generate(prompts, max_new_tokens=new, batch_size=5, **s) for s in ({}, {"temperature": 0.8})]
    d = server.decoder
    assert d.gives_tokens and not d.static
    d.buffers, d.static = DeviceBuffers("cpu", ["CPUExecutionProvider"]), True
    refills = d.refills
    got = [server.generate(prompts, max_new_tokens=new, batch_size=5, **s) for s in ({}, {"temperature": 0.8})]
    assert [[r.tokens for r in g] for g in got] == [[r.tokens for r in w] for w in want]
    assert [[r.halt_step for r in g] for g in got] == [[r.halt_step for r in w] for w in want]
    assert d.refills > refills, "no sample went past max_seq_len"
    assert set(d.buckets) >= {8, 4}, sorted(d.buckets)  # 5 samples in 8 rows, then fewer: gathered into 4, ...
    sizes = {n: [d.buffers.rows(c) for c in b.cache] for n, b in d.buckets.items()}
    assert all(set(rows) == {n} for n, rows in sizes.items())
    cpu = Server.open(exported[1], provider="cpu", threads=1).generate(prompts, max_new_tokens=new, batch_size=5)
    assert [r.tokens for r in got[0]] == [r.tokens for r in cpu]  # one model, either device's graph


def test_halt_step_of_a_long_generation_is_the_prompt_s_on_both_paths(exported):
    """A generation that passes max_seq_len is refilled (cached) or re-read from a later window (uncached); the
    halt_step each reports is the one decided on the prompt, the same on both paths."""
    _, out, _ = exported
    cached = Server.open(out, provider="cpu", threads=1)
    uncached = Server.open(out, provider="cpu", threads=1, cache=False)
    prompts = texts(9)
    a = cached.generate(prompts, max_new_tokens=2 * T, batch_size=4)
    b = uncached.generate(prompts, max_new_tokens=2 * T, batch_size=4)
    assert [r.halt_step for r in a] == [r.halt_step for r in b]
    assert sum(len(r.tokens) > T for r in a) >= 3
    first = [cached.generate([p], max_new_tokens=1)[0].halt_step for p in prompts]
    assert [r.halt_step for r in a] == first


def test_an_onnx_runtime_error_is_one_line_naming_the_model(exported, tmp_path):
    """A graph whose metadata promises more positions than its rotary tables hold: ONNX Runtime fails on a long
    batch, and serve says so in one line naming the model and the inputs."""
    _, out, _ = exported
    with_decode_metadata(out, tmp_path, "cache_layout", "per-row")
    proto = onnx.load(str(tmp_path / "m.onnx"))
    for p in proto.metadata_props:
        if p.key == "max_seq_len":
            p.value = str(4 * T)
    onnx.save(proto, str(tmp_path / "m.onnx"))
    server = Server.open(tmp_path / "m.onnx", provider="cpu", threads=1, cache=False)
    with pytest.raises(MoeError, match=r"m\.onnx: ONNX Runtime cannot run it on input_ids \[\d+, \d+\]"):
        server.score([" ".join(["the king walked"] * 3 * T)])
