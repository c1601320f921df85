"""Eager PyTorch vs ONNX Runtime on the same inputs: the proof that the exported graph is the model.

Logits. max |logits_ort - logits_eager| over the compared positions, divided by max |logits_eager| (the logit
scale), must be <= TOLERANCE = 1e-4; halt_step must agree exactly. fp32 kernels differ in summation order
between runtimes (~1e-6 per op); a recursive model applies its net H_cycles*(L_cycles+1)*halt_max_steps times,
so a few 1e-6 relative becomes ~1e-5 at the output — 1e-4 leaves an order of magnitude of margin while still
catching any real divergence (a flipped routing or halting decision moves logits by far more than 1e-4).

Conditioning. How far rounding travels through a deep recursion depends on the input: a hard puzzle the model
has not solved after 9 steps can amplify fp32 rounding to 1e-4 of the logit scale in PyTorch itself. So the eager
model also runs each input in fp64 (a copy of it), and a sample whose eager fp32 logits are c (relative) from its
fp64 ones is allowed max(TOLERANCE, CONDITIONING_FACTOR * c): graph - eager32 = (graph - exact) - (eager32 -
exact), two fp32 evaluations of one function whose rounding has the size c measures, so |graph - eager32| is
about 2c; the factor lets the graph's kernels (fused, reordered) round a few times worse, and stays orders below
what a wrong operator or a flipped decision costs (the logits' own scale). c counts only where fp64 halts and
routes every compared decision as fp32 does (else the sample has the plain TOLERANCE): a decision flipped by the
precision is the decision check's business (below), not a measure of rounding. The report prints each case's
largest c ("fp32 vs fp64").

Decisions. The same fp32 noise can flip a discrete choice whose margin is within it: a token routed to its
second expert when two experts' probabilities differ by 1e-7. Such a flip is not a fault of the graph, but it
moves that token's logits (and, through attention, those of the positions that see it) by far more than the
tolerance. So the exported graph also yields every routing and halting decision (a parity-only copy of it,
`DECISIONS_PREFIX` outputs, traced from `moe_core.model.recording_decisions`), and the check compares them in
call order with the eager model's:
- a decision that differs with a relative margin (moe_core.model: how far the compared values are from changing
  it, relative to their scale) above TOLERANCE — the relative drift the logits themselves are allowed — is wrong:
  the case fails, whatever the logits say;
- one within it is a near-tie: the positions it can affect are left out of the logit and halting comparison
  (the sample's later positions in a causal model, the whole sample in a bidirectional one, the whole sample when
  it is a halting decision) and reported. At most NEAR_TIES_PER_1000 near-ties per 1,000 compared decisions (and
  at least one) may occur in a case: exact ties follow one rule in both runtimes (lower index first, see
  moe_core.model.common.ranked), so near-ties are rare, and more than that means the graph decides differently.
Decisions at padded positions, and at positions already affected by an earlier near-tie, are not compared.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from moe_core.common.errors import MoeError
from moe_core.model import Decision, RecursiveMoE, recording_decisions
from moe_core.runtime.metrics import token_logprobs
from moe_core.runtime.ort_session import CPU_EP, ort_session
from moe_core.runtime.stepwise import StepwiseSession
from moe_core.tasks import task_spec

TOLERANCE = 1e-4
CONDITIONING_FACTOR = 10.0  # a sample's allowance over its own fp32 rounding (module docstring, "Conditioning")
NEAR_TIES_PER_1000 = 1
DECISIONS_PREFIX = "decision."  # output names of the parity-only graph: decision.{call}.{kind}


def decision_output(i: int, kind: str) -> str:
    return f"{DECISIONS_PREFIX}{i}.{kind}"


@dataclass
class NearTie:
    call: int  # index of the decision in call order
    kind: str  # heads | experts | halt
    row: int
    position: int | None  # None for a halting decision (one per sample)
    margin: float


@dataclass
class Decisions:
    compared: int = 0
    differ: int = 0  # near-ties + wrong
    wrong: int = 0  # differ with a margin above TOLERANCE
    min_margin: float | None = None  # smallest margin among the differing decisions
    near_ties: list[NearTie] = field(default_factory=list)

    @property
    def limit(self) -> int:
        return max(1, self.compared * NEAR_TIES_PER_1000 // 1000)


@dataclass
class CaseResult:
    name: str
    shape: tuple[int, int]
    max_abs: float
    max_rel: float  # max_abs / max |eager logits| over the compared positions
    halt_equal: bool  # over the compared samples
    halt_steps: list[int]  # distinct halt steps seen in this case (shows halting was exercised)
    top1: float  # fraction of compared positions whose argmax token agrees
    decisions: Decisions | None = None  # None: the graph's decisions were not available
    excluded: np.ndarray | None = None  # [B, T] bool: positions left out after near-ties (None: none)
    # Per sample (None: not measured): max |diff| / the case's logit scale over its compared positions (0 where none
    # is compared), and the same figure for eager fp32 against eager fp64 (0 where fp64 decides differently).
    sample_rel: np.ndarray | None = None
    sample_fp64: np.ndarray | None = None

    @property
    def fp64(self) -> float | None:
        """The case's largest eager fp32 vs fp64 difference (relative), None when not measured."""
        return None if self.sample_fp64 is None else float(self.sample_fp64.max(initial=0.0))

    def within(self, tolerance: float) -> bool:
        """Every compared sample within its allowance (module docstring), or, unmeasured, max_rel <= tolerance."""
        if self.sample_rel is None or self.sample_fp64 is None:
            return self.max_rel <= tolerance
        return bool(np.all(self.sample_rel <= np.maximum(tolerance, CONDITIONING_FACTOR * self.sample_fp64)))

    @property
    def excluded_positions(self) -> int:
        return 0 if self.excluded is None else int(self.excluded.sum())

    @property
    def decisions_ok(self) -> bool:
        d = self.decisions
        return d is None or (d.wrong == 0 and len(d.near_ties) <= d.limit)


@dataclass
class ParityReport:
    cases: list[CaseResult] = field(default_factory=list)
    label: str = "fp32"
    tolerance: float | None = TOLERANCE  # None: figures only (reduced-precision variants)

    def case_ok(self, c: CaseResult) -> bool:
        return self.tolerance is None or (c.within(self.tolerance) and c.halt_equal and c.decisions_ok)

    @property
    def ok(self) -> bool:
        return all(self.case_ok(c) for c in self.cases)

    @property
    def max_abs(self) -> float:
        return max(c.max_abs for c in self.cases)

    @property
    def max_rel(self) -> float:
        return max(c.max_rel for c in self.cases)

    @property
    def failure(self) -> str:
        bad = [c for c in self.cases if not self.case_ok(c)]

        def why(c: CaseResult) -> str:
            allowed = f"tolerance {self.tolerance:.0e}"
            if c.fp64 is not None:
                allowed += f", eager fp32 vs fp64 {c.fp64:.1e}"
            text = (f"{c.name}: max rel diff {c.max_rel:.2e} ({allowed}), "
                    f"halt_step {'agrees' if c.halt_equal else 'DIFFERS'}")
            d = c.decisions
            if d is not None and d.wrong:
                text += f", {d.wrong} decision(s) differ beyond fp32 noise (smallest margin {d.min_margin:.1e})"
            if d is not None and len(d.near_ties) > d.limit:
                text += f", {len(d.near_ties)} near-ties (at most {d.limit} for {d.compared:,} decisions)"
            return text

        return "; ".join(why(c) for c in bad)

    def summary(self) -> str:
        rule = ("figures only" if self.tolerance is None
                else f"tolerance max|diff|/max|logit| <= {self.tolerance:.0e}, or {CONDITIONING_FACTOR:g}x a sample's "
                     "eager fp32 vs fp64 difference where larger; halt_step exact")
        lines = [f"parity ({self.label}, ONNX Runtime CPU vs eager PyTorch fp32; {rule}):"]
        for c in self.cases:
            verdict = "" if self.tolerance is None else ("ok" if self.case_ok(c) else "FAIL")
            lines.append(f"  {c.name:<14} {c.shape[0]:>3}x{c.shape[1]:<4} max abs {c.max_abs:.2e}  "
                         f"max rel {c.max_rel:.2e}  {_fp64_summary(c)}top-1 {c.top1:6.2%}  "
                         f"halt_step {'==' if c.halt_equal else '!='} "
                         f"(steps {','.join(map(str, c.halt_steps))})  {_decision_summary(c.decisions)}  {verdict}")
            lines.extend(f"    near-tie: {t.kind} decision {t.call}, row {t.row}"
                         + ("" if t.position is None else f", position {t.position}") + f", margin {t.margin:.1e}"
                         for t in (c.decisions.near_ties if c.decisions else []))
            if c.excluded_positions:
                lines.append(f"    {c.excluded_positions} position(s) they can affect left out of the comparison")
        top1 = min(c.top1 for c in self.cases)
        lines.append(f"  overall: max abs {self.max_abs:.2e}, max rel {self.max_rel:.2e}, top-1 agreement >= "
                     f"{top1:.2%}, halt_step {'identical' if all(c.halt_equal for c in self.cases) else 'DIFFERS'}"
                     + ("" if self.tolerance is None else f" -> {'PASS' if self.ok else 'FAIL'}"))
        return "\n".join(lines)


def _fp64_summary(c: CaseResult) -> str:
    return "" if c.fp64 is None else f"fp32 vs fp64 {c.fp64:.1e}  "


def _decision_summary(d: Decisions | None) -> str:
    if d is None:
        return "decisions not compared"
    text = f"decisions {d.differ}/{d.compared:,} differ"
    if d.differ:
        text += f" ({len(d.near_ties)} near-tie, {d.wrong} wrong; smallest margin {d.min_margin:.1e})"
    return text


def compare_decisions(eager: list[Decision], graph: list[np.ndarray], valid: np.ndarray,
                      causal: bool) -> tuple[Decisions, np.ndarray]:
    """Eager decisions (with margins) against the graph's, in call order: (the counts, the [B, T] positions that
    near-ties can affect). See the module docstring for the rule."""
    if len(graph) != len(eager):
        raise MoeError(f"the decision graph yields {len(graph)} decisions, the eager model {len(eager)}")
    report, affected = Decisions(), np.zeros_like(valid)
    for call, (e, g) in enumerate(zip(eager, graph, strict=True)):
        choice, margin = e.choice.float().cpu().numpy(), e.margin.float().cpu().numpy()
        same = same_choices(e.kind, choice, g)
        if e.kind == "halt":
            # A causal model's halting reads position 0 only; a bidirectional one's, every valid position.
            open_ = ~affected[:, 0] if causal else ~(affected & valid).any(1)
        else:
            if e.kind == "heads":  # the count's margin where the counts differ, else the set's
                margin = np.where((choice > 0.5).sum(-1) != (g > 0.5).sum(-1), margin[..., 0], margin[..., 1])
            open_ = valid & ~affected
        differ = ~same & open_
        report.compared += int(open_.sum())
        for where in zip(*np.nonzero(differ), strict=True):
            m = float(margin[where])
            report.differ += 1
            report.min_margin = m if report.min_margin is None else min(report.min_margin, m)
            if m > TOLERANCE:
                report.wrong += 1
                continue
            row, pos = int(where[0]), (int(where[1]) if len(where) > 1 else None)
            report.near_ties.append(NearTie(call, e.kind, row, pos, m))
            if pos is None or not causal:
                affected[row] = True
            else:
                affected[row, pos:] = True
    return report, affected & valid


def same_choices(kind: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Where two records of one decision choose alike: halt [B] (logit > 0 or not), experts [B, T] (the same set of
    experts, in any order), heads [B, T] (the same heads on)."""
    if kind == "halt":
        return (a > 0) == (b > 0)
    if kind == "experts":
        return np.all(np.sort(a, -1) == np.sort(b, -1), -1)
    return np.all((a > 0.5) == (b > 0.5), -1)


def alike_samples(a: list[Decision], b: list[Decision], valid: np.ndarray) -> np.ndarray:
    """[B]: the samples for which two eager runs of one model take every decision alike (at valid positions)."""
    same = np.full(valid.shape[0], len(a) == len(b))
    for x, y in zip(a, b, strict=False):
        equal = same_choices(x.kind, x.choice.float().cpu().numpy(), y.choice.float().cpu().numpy())
        same &= equal if x.kind == "halt" else (equal | ~valid).all(1)
    return same


def compare(model: RecursiveMoE, session, name: str, ids: np.ndarray, mask: np.ndarray,
            decision_session=None, exclude: np.ndarray | None = None,
            model64: RecursiveMoE | None = None) -> CaseResult:
    """One input set. `decision_session`: the parity-only graph yielding the decisions (compared, and their
    near-ties' positions left out); `exclude`: [B, T] positions to leave out (found by another graph's check);
    `model64`: the model in fp64, which measures each sample's conditioning (module docstring)."""
    feeds = {"input_ids": ids, "attention_mask": mask}
    device = next(model.parameters()).device
    ids_t, mask_t = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
    with torch.no_grad(), recording_decisions(model) as eager_decisions:
        out = model(ids_t, mask_t)
    ref_logits, ref_halt = out.logits.float().cpu().numpy(), out.halt_step.cpu().numpy()
    logits, halt = session.run(["logits", "halt_step"], feeds)
    valid = mask.astype(bool)
    decisions = None
    excluded = np.zeros_like(valid) if exclude is None else exclude.copy()
    if decision_session is not None:
        names = [o.name for o in decision_session.get_outputs() if o.name.startswith(DECISIONS_PREFIX)]
        decisions, affected = compare_decisions(eager_decisions, decision_session.run(names, feeds), valid,
                                                model.config.causal)
        excluded |= affected
    compared = valid & ~excluded
    samples = ~excluded.any(1)
    diff = np.abs(logits - ref_logits)[compared]
    scale = max(float(np.abs(ref_logits[compared]).max()), 1e-12) if diff.size else 1.0
    max_abs = float(diff.max()) if diff.size else 0.0
    top1 = float((logits.argmax(-1) == ref_logits.argmax(-1))[compared].mean()) if diff.size else 1.0

    def per_sample(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # [B]: max |a - b| over compared positions / scale
        return np.where(compared[..., None], np.abs(a - b), 0.0).max(axis=(1, 2)) / scale

    sample_fp64 = None
    if model64 is not None:
        with torch.no_grad(), recording_decisions(model64) as decisions64:
            out64 = model64(ids_t, mask_t)
        alike = (alike_samples(eager_decisions, decisions64, valid)
                 & (out64.halt_step.cpu().numpy() == ref_halt))
        sample_fp64 = np.where(alike, per_sample(ref_logits.astype(np.float64), out64.logits.cpu().numpy()), 0.0)
    return CaseResult(name, ids.shape, max_abs, max_abs / scale, bool(np.array_equal(halt[samples], ref_halt[samples])),
                      sorted(set(ref_halt.tolist())), top1, decisions, excluded if excluded.any() else None,
                      per_sample(logits, ref_logits), sample_fp64)


def check_parity(model: RecursiveMoE, onnx_path: str, seed: int = 0, label: str = "fp32",
                 tolerance: float | None = TOLERANCE, task: str = "lm", stepwise: bool = False,
                 decisions_path: str | None = None, exclude: ParityReport | None = None,
                 providers: Sequence[Any] = (CPU_EP,)) -> ParityReport:
    """Eager vs the graph at `onnx_path` on the task's parity inputs (moe_core.tasks). `stepwise`: the graph is a
    step graph, run step by step with halted samples dropped, exactly as `moe serve --runtime stepwise` runs it
    (moe_core/runtime/stepwise.py).
    `decisions_path`: the parity-only copy of the graph with its decisions as outputs (onnx_export.to_onnx with
    decisions): decisions are compared too. `exclude`: an earlier report on the same inputs (the unrolled graph's,
    for its step graph) whose near-tie positions are left out here as well. `providers`: where ONNX Runtime runs
    the graph (the eager model runs where its parameters are)."""
    model.eval()
    session = ort_session(onnx_path, providers=providers)
    if stepwise:
        session = StepwiseSession(session, onnx_path)
        label = f"{label}, step graph run step-wise"
    decision_session = ort_session(decisions_path) if decisions_path is not None else None
    cfg = model.config
    skip = {c.name: c.excluded for c in exclude.cases} if exclude is not None else {}
    model64 = copy.deepcopy(model).double() if tolerance is not None else None
    return ParityReport([compare(model, session, name, ids, mask, decision_session, skip.get(name), model64)
                         for name, ids, mask in task_spec(task).parity_inputs(cfg.vocab_size, cfg.max_seq_len, seed)],
                        label, tolerance)


def text_windows(path, tokenizer_json: str, seq_len: int, max_windows: int = 64) -> np.ndarray:
    """Up to `max_windows` non-overlapping windows of seq_len + 1 tokens of a text file: [N, seq_len + 1]."""
    from tokenizers import Tokenizer

    from moe_core.common.jsonl import read_text_file

    text = read_text_file(path, "--eval-text file")
    ids = np.asarray(Tokenizer.from_str(tokenizer_json).encode(text).ids, dtype=np.int64)
    n = min(max_windows, len(ids) // (seq_len + 1))
    if n == 0:
        raise MoeError(f"{path}: {len(ids)} tokens; need at least {seq_len + 1} for one evaluation window")
    return ids[: n * (seq_len + 1)].reshape(n, seq_len + 1)


def text_nll(model_or_session, windows: np.ndarray, batch_size: int = 16) -> float:
    """Mean next-token negative log-likelihood (nats) of an eager model or an ORT session on `windows`."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i: i + batch_size]
        ids, targets = w[:, :-1], w[:, 1:]
        if isinstance(model_or_session, torch.nn.Module):
            with torch.no_grad():
                logits = model_or_session(torch.from_numpy(ids)).logits.float().numpy()
        else:
            logits = model_or_session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
        total -= float(token_logprobs(logits.astype(np.float64), targets).sum())
        count += targets.size
    return total / count
