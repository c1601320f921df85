"""Exact ties in routing and halting go the same way in eager, compiled and exported code, and parity compares the
decisions themselves: a near-tie is reported and its positions left out, a decision that differs by more than fp32
noise fails the check.

Ties are built on purpose: a router whose weights are zero gives every expert (every head) exactly the same
probability whatever the input, in any runtime; complexity and halt heads with zero weights put a token exactly
on the head-count boundary (target 2.5 heads: rank 3 <= t + 0.5 = 3.0) and every sample exactly on the halting
threshold (halt logit 0: not > 0, so no sample halts before the last step).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_tokenizer_json

from export.onnx_export import export_run
from export.parity import CONDITIONING_FACTOR, TOLERANCE, CaseResult, ParityReport, alike_samples, compare_decisions
from moe_core import ModelConfig, RecursiveMoE, load_model
from moe_core.checkpoint import save_run
from moe_core.model import Decision, recording_decisions
from moe_core.tasks import language_parity_inputs

VOCAB = 300
CFG = dict(vocab_size=VOCAB, max_seq_len=16, d_model=32, n_heads=4, n_layers=1, min_heads=1, max_heads=4,
           n_experts=4, top_k=2, d_expert=32, H_cycles=1, L_cycles=1, halt_max_steps=2)


def tied_model(**overrides) -> RecursiveMoE:
    torch.manual_seed(0)
    model = RecursiveMoE(ModelConfig(**{**CFG, **overrides})).eval()
    with torch.no_grad():
        for block in model.net.blocks:
            block.ffn.router.weight.zero_()  # every expert: probability exactly 1 / n_experts
            block.attn.router.weight.zero_()  # every head: probability exactly 1 / n_heads
            block.attn.complexity_head.weight.zero_()  # complexity sigmoid(0) = 0.5: target 2.5 heads
            block.attn.complexity_head.bias.zero_()
            block.attn.threshold_head.weight.zero_()
            block.attn.threshold_head.bias.fill_(4.0)  # threshold ~0.79: the mass condition keeps 4 heads
        model.halt_head.weight.zero_()  # halt logit exactly 0: on the threshold, never > 0
        model.halt_head.bias.zero_()
    return model


def decisions_of(model: RecursiveMoE, ids: torch.Tensor) -> list[Decision]:
    with torch.no_grad(), recording_decisions(model) as log:
        model(ids)
    return log


def test_exact_ties_take_the_lower_index_in_eager():
    model = tied_model()
    log = decisions_of(model, torch.randint(0, VOCAB, (3, 16)))
    kinds = {d.kind for d in log}
    assert kinds == {"experts", "heads", "halt"}
    for d in log:
        if d.kind == "experts":  # the two lowest-numbered experts, in that order
            assert torch.equal(d.choice, torch.tensor([0, 1]).expand_as(d.choice))
            assert torch.equal(d.margin, torch.zeros_like(d.margin))  # a tie: margin exactly 0
        elif d.kind == "heads":  # heads 0, 1, 2: the count boundary rank 3 <= 3.0 holds exactly
            assert torch.equal(d.choice, torch.tensor([1.0, 1.0, 1.0, 0.0]).expand_as(d.choice))
        else:
            assert torch.equal(d.choice, torch.zeros(3)) and torch.equal(d.margin, torch.zeros(3))
    assert torch.equal(model(torch.zeros(2, 5, dtype=torch.long)).halt_step, torch.tensor([2, 2]))


@pytest.fixture(scope="module")
def tied_export(tmp_path_factory):
    """(run, model.onnx, export result, the parity-only decision graph the export checked the unrolled graph with:
    kept by wrapping the pass that strips it, so it is not traced a second time)."""
    import onnx

    import export.onnx_export as ox

    tmp = tmp_path_factory.mktemp("ties")
    run = tmp / "run"
    save_run(run, tied_model(), make_tokenizer_json(VOCAB))
    out, decisions = tmp / "model.onnx", tmp / "decisions.onnx"
    strip = ox.strip_decisions

    def keeping(proto: onnx.ModelProto) -> onnx.ModelProto:
        if not decisions.exists():  # the unrolled graph's, traced first (the step graph has no decisions)
            onnx.save(proto, str(decisions))
        return strip(proto)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ox, "strip_decisions", keeping)
        result = export_run(run, out, stepwise=True, log=lambda _: None)
    return run, out, result, str(decisions)


def test_exported_and_step_graphs_break_ties_like_eager(tied_export):
    """Every routing decision is an exact tie; the graph agrees with eager on every one (a different tie rule
    would pick other experts and heads: logits far apart), step-wise too."""
    result = tied_export[2]
    report = result.parity
    assert report.ok, report.summary()
    for case in report.cases:
        assert case.decisions is not None and case.decisions.compared > 0
        assert case.decisions.differ == 0 and case.excluded is None, report.summary()
        assert case.max_rel <= TOLERANCE and case.halt_steps == [2]
    assert result.step_reports[0].ok, result.step_reports[0].summary()


def test_parity_fails_a_graph_with_another_tie_rule(tied_export, monkeypatch):
    """Eager breaking ties by the higher index: every routing decision differs at margin 0. Near-ties, but far
    more of them than the stated bound: the check fails."""
    from export.parity import check_parity
    from moe_core.model import attention, moe

    run, out, _, decisions = tied_export
    model = load_model(run)

    def higher_index_first(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, order = x.flip(-1).sort(dim=-1, descending=True, stable=True)
        return values, x.shape[-1] - 1 - order

    for module in (attention, moe):  # where the rule is used (MoH head and MoE expert ranking)
        monkeypatch.setattr(module, "ranked", higher_index_first)
    with torch.no_grad():  # the monkeypatched rule really picks the highest-numbered experts
        assert decisions_of(model, torch.zeros(1, 3, dtype=torch.long))[1].choice.tolist() == [[[3, 2]] * 3]
    report = check_parity(model, str(out), decisions_path=decisions)
    assert not report.ok
    case = max(report.cases, key=lambda c: c.decisions.compared)
    assert case.decisions.differ > case.decisions.limit and case.decisions.wrong == 0, report.summary()
    assert "near-ties (at most" in report.failure


def test_parity_fails_a_decision_that_differs_beyond_noise(tied_export):
    """Eager selects other heads by a wide margin (threshold moved): wrong decisions, the check fails."""
    from export.parity import check_parity

    run, out, _, decisions = tied_export
    model = load_model(run)
    with torch.no_grad():
        model.net.blocks[0].attn.threshold_head.bias.fill_(-4.0)  # threshold ~0.31: 2 heads instead of 3
    report = check_parity(model, str(out), decisions_path=decisions)
    assert not report.ok and all(c.decisions.wrong > 0 for c in report.cases), report.summary()
    assert "decision(s) differ beyond fp32 noise" in report.failure


def test_compiled_blocks_break_ties_like_eager():
    """torch.compile'd blocks (as the trainer runs them) route the tied model exactly as eager does."""
    from train.trainer import compile_blocks

    eager = tied_model()
    compiled = tied_model()
    compile_blocks(compiled)
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        a, b = eager(ids), compiled(ids)
    assert torch.equal(a.halt_step, b.halt_step)
    torch.testing.assert_close(b.logits, a.logits, rtol=TOLERANCE, atol=TOLERANCE * a.logits.abs().max().item())


def _decision(kind: str, choice, margin) -> Decision:
    return Decision(kind, torch.tensor(choice, dtype=torch.float32), torch.tensor(margin, dtype=torch.float32))


@pytest.mark.parametrize("causal", [True, False])
def test_near_tie_leaves_out_what_it_can_affect(causal):
    """The rule itself, on decisions written by hand: batch 2 x 4 positions, two experts top-1."""
    valid = np.ones((2, 4), dtype=bool)
    eager = [_decision("experts", [[[0], [1], [0], [1]], [[1], [1], [0], [0]]], [[0.3, 0.3, 0.3, 0.3],
                                                                                 [0.3, 1e-7, 0.3, 0.3]]),
             _decision("experts", [[[0], [0], [0], [0]], [[0], [0], [0], [0]]], [[0.3] * 4, [0.3] * 4]),
             _decision("halt", [1.0, 0.5], [1.0, 0.5])]
    graph = [np.array([[[0], [1], [0], [1]], [[1], [0], [0], [0]]]),  # row 1 position 1: a near-tie flip
             np.array([[[0], [0], [0], [0]], [[0], [0], [1], [1]]]),  # after it: affected in row 1, not compared
             np.array([1.0, -0.5])]  # row 1 halts differently: affected by the near-tie (bidirectional only)
    report, excluded = compare_decisions(eager, graph, valid, causal)
    assert [(t.kind, t.call, t.row, t.position) for t in report.near_ties] == [("experts", 0, 1, 1)]
    assert report.min_margin == pytest.approx(1e-7)
    if causal:
        # The flip reaches row 1's positions 1.. only. Halting reads position 0, which it does not reach: row 1's
        # halting is compared, and differs by 0.5: wrong.
        assert excluded.tolist() == [[False] * 4, [False, True, True, True]]
        assert (report.differ, report.wrong, report.compared) == (2, 1, 8 + 5 + 2)
    else:  # the flip reaches all of row 1, its halting included
        assert excluded.tolist() == [[False] * 4, [True] * 4]
        assert (report.differ, report.wrong, report.compared) == (1, 0, 8 + 4 + 1)


def test_decision_beyond_noise_is_wrong():
    valid = np.array([[True, True, False]])
    eager = [_decision("experts", [[[0], [1], [1]]], [[0.3, 0.2, 1e-9]])]
    graph = [np.array([[[0], [0], [0]]])]  # position 1 differs by a wide margin; position 2 is padding
    report, excluded = compare_decisions(eager, graph, valid, causal=True)
    assert report.wrong == 1 and not report.near_ties and report.min_margin == pytest.approx(0.2)
    assert report.compared == 2 and not excluded.any()


def test_a_sample_is_allowed_what_fp32_rounding_costs_it():
    """A sample whose eager fp32 logits are c from fp64 may differ from the graph by CONDITIONING_FACTOR * c where
    that exceeds TOLERANCE; a sample with c = 0 (not measured, or decided differently in fp64) has TOLERANCE."""
    def case(rel, fp64):
        return CaseResult("c", (2, 4), 0.0, max(rel), True, [1], 1.0, None, None, np.array(rel),
                          None if fp64 is None else np.array(fp64))

    report = ParityReport(tolerance=TOLERANCE)
    ill = 3e-5  # eager fp32 vs fp64 on sample 0: its allowance is 10 x 3e-5 = 3e-4
    assert report.case_ok(case([2.9e-4, 1e-6], [ill, 1e-7]))
    assert not report.case_ok(case([3.1e-4, 1e-6], [ill, 1e-7]))
    assert not report.case_ok(case([1e-6, 2e-4], [ill, 1e-7]))  # sample 1's own allowance is TOLERANCE
    assert not report.case_ok(case([2e-4, 1e-6], None))  # unmeasured: TOLERANCE on max_rel
    assert CONDITIONING_FACTOR * ill > TOLERANCE
    assert "fp32 vs fp64 3.0e-05" in ParityReport([case([2e-4, 1e-6], [ill, 0.0])]).summary()


def test_alike_samples_compare_every_decision_at_valid_positions():
    valid = np.array([[True, True, False], [True, True, True]])
    base = [_decision("experts", [[[0, 1], [1, 2], [0, 1]], [[2, 3], [0, 1], [1, 3]]], [[0.1] * 3] * 2),
            _decision("halt", [1.0, -1.0], [1.0, 1.0])]
    swapped = [_decision("experts", [[[1, 0], [1, 2], [3, 2]], [[2, 3], [0, 1], [1, 3]]], [[0.1] * 3] * 2),
               _decision("halt", [2.0, -0.5], [1.0, 1.0])]  # the same sets, padding apart; same halting
    assert alike_samples(base, swapped, valid).tolist() == [True, True]
    routed = [_decision("experts", [[[0, 1], [1, 2], [0, 1]], [[2, 3], [0, 2], [1, 3]]], [[0.1] * 3] * 2), base[1]]
    assert alike_samples(base, routed, valid).tolist() == [True, False]
    halted = [base[0], _decision("halt", [-1.0, -1.0], [1.0, 1.0])]
    assert alike_samples(base, halted, valid).tolist() == [False, True]
    assert alike_samples(base, base[:1], valid).tolist() == [False, False]  # another number of decisions


def test_recording_decisions_changes_nothing():
    """Recording decisions does not change what the model computes."""
    model = tied_model(causal=False)
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # no ties: an ordinary model
    name, ids, mask = language_parity_inputs(VOCAB, 16, 0)[6]
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    other = tied_model(causal=False)
    with torch.no_grad():
        plain = model(ids, mask)
        with recording_decisions(model) as log:
            recorded = model(ids, mask)
            other(ids, mask)  # the recording is the model's own, not the process's
    assert torch.equal(plain.logits, recorded.logits) and torch.equal(plain.halt_step, recorded.halt_step)
    assert len(log) == CFG["halt_max_steps"] * (CFG["H_cycles"] * (CFG["L_cycles"] + 1) * 2 + 1)
    assert model.tracing.decisions is None and other.tracing.decisions is None
