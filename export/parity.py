"""Eager PyTorch vs ONNX Runtime on the same inputs: the proof that the exported graph is the model.

Tolerance: max |logits_ort - logits_eager| over valid (unpadded) positions, divided by max |logits_eager|
(the logit scale), must be <= 1e-4; halt_step must agree exactly. fp32 kernels differ in summation order
between runtimes (~1e-6 per op); a recursive model applies its net H_cycles*(L_cycles+1)*halt_max_steps times,
so a few 1e-6 relative becomes ~1e-5 at the output — 1e-4 leaves an order of magnitude of margin while still
catching any real divergence (a flipped routing or halting decision moves logits by far more than 1e-4).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from moe_core import sudoku as S
from moe_core.model import RecursiveMoE
from serve.stepwise import StepwiseSession

TOLERANCE = 1e-4


@dataclass
class CaseResult:
    name: str
    shape: tuple[int, int]
    max_abs: float
    max_rel: float  # max_abs / max |eager logits|
    halt_equal: bool
    halt_steps: list[int]  # distinct halt steps seen in this case (shows halting was exercised)
    top1: float  # fraction of valid positions whose argmax token agrees


@dataclass
class ParityReport:
    cases: list[CaseResult] = field(default_factory=list)
    label: str = "fp32"
    tolerance: float | None = TOLERANCE  # None: figures only (reduced-precision variants)

    def case_ok(self, c: CaseResult) -> bool:
        return self.tolerance is None or (c.max_rel <= self.tolerance and c.halt_equal)

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
        return "; ".join(f"{c.name}: max rel diff {c.max_rel:.2e} (tolerance {self.tolerance:.0e}), "
                         f"halt_step {'agrees' if c.halt_equal else 'DIFFERS'}" for c in bad)

    def summary(self) -> str:
        rule = ("figures only" if self.tolerance is None
                else f"tolerance max|diff|/max|logit| <= {self.tolerance:.0e}, halt_step exact")
        lines = [f"parity ({self.label}, ONNX Runtime CPU vs eager PyTorch fp32; {rule}):"]
        for c in self.cases:
            verdict = "" if self.tolerance is None else ("ok" if self.case_ok(c) else "FAIL")
            lines.append(f"  {c.name:<14} {c.shape[0]:>3}x{c.shape[1]:<4} max abs {c.max_abs:.2e}  "
                         f"max rel {c.max_rel:.2e}  top-1 {c.top1:6.2%}  halt_step {'==' if c.halt_equal else '!='} "
                         f"(steps {','.join(map(str, c.halt_steps))})  {verdict}")
        top1 = min(c.top1 for c in self.cases)
        lines.append(f"  overall: max abs {self.max_abs:.2e}, max rel {self.max_rel:.2e}, top-1 agreement >= "
                     f"{top1:.2%}, halt_step {'identical' if all(c.halt_equal for c in self.cases) else 'DIFFERS'}"
                     + ("" if self.tolerance is None else f" -> {'PASS' if self.ok else 'FAIL'}"))
        return "\n".join(lines)


def parity_inputs(vocab_size: int, max_seq_len: int, seed: int = 0,
                  task: str = "lm") -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, input_ids, attention_mask) cases: batch 1 and larger, lengths 1 / middle / maximum, right-padded
    batches, and every token id of the vocabulary. A Sudoku model (task "sudoku") also gets real puzzles: its
    inputs are 81-cell grids, but the graph's axes stay dynamic, so the other cases hold for it too."""
    rng = np.random.default_rng(seed)
    T, mid = max_seq_len, max(1, max_seq_len // 2)

    def rand(b: int, t: int) -> np.ndarray:
        return rng.integers(0, vocab_size, size=(b, t), dtype=np.int64)

    cases = [("batch1_seq1", rand(1, 1)), ("batch1_max", rand(1, T)), ("batch4_mid", rand(4, mid)),
             ("batch8_max", rand(8, T)), ("batch5_seq1", rand(5, 1))]
    out = [(name, ids, np.ones_like(ids)) for name, ids in cases]
    # Every id appears at least once (first, last and everything between), with random context around it.
    n = -(-vocab_size // T)
    ids = rand(n, T).reshape(-1)
    ids[:vocab_size] = rng.permutation(vocab_size)
    out.append(("whole_vocab", ids.reshape(n, T), np.ones((n, T), dtype=np.int64)))
    # Right padding: random lengths 1..T, pad id 0 (any id: padded positions must not matter).
    lengths = np.concatenate([[1, T], rng.integers(1, T + 1, size=4)])
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    out.append(("padded_batch6", np.where(mask == 1, rand(6, T), 0), mask))
    if task == "sudoku":
        puzzles = S.generate(8, seed, givens=(25, 50)).puzzles.astype(np.int64)  # ~20 ms
        out.append(("sudoku_grids", puzzles, np.ones_like(puzzles)))
    return out


def ort_cpu_session(path: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def compare(model: RecursiveMoE, session, name: str, ids: np.ndarray, mask: np.ndarray) -> CaseResult:
    with torch.no_grad():
        out = model(torch.from_numpy(ids), torch.from_numpy(mask))
    ref_logits, ref_halt = out.logits.float().numpy(), out.halt_step.numpy()
    logits, halt = session.run(["logits", "halt_step"], {"input_ids": ids, "attention_mask": mask})
    valid = mask.astype(bool)
    diff = np.abs(logits - ref_logits)[valid]
    scale = max(float(np.abs(ref_logits[valid]).max()), 1e-12)
    max_abs = float(diff.max())
    top1 = float((logits.argmax(-1) == ref_logits.argmax(-1))[valid].mean())
    return CaseResult(name, ids.shape, max_abs, max_abs / scale, bool(np.array_equal(halt, ref_halt)),
                      sorted(set(ref_halt.tolist())), top1)


def check_parity(model: RecursiveMoE, onnx_path: str, seed: int = 0, label: str = "fp32",
                 tolerance: float | None = TOLERANCE, task: str = "lm", stepwise: bool = False) -> ParityReport:
    """Eager vs the graph at `onnx_path` on parity_inputs. `stepwise`: the graph is a step graph, run step by step
    with halted samples dropped, exactly as `moe serve --runtime stepwise` runs it (serve/stepwise.py)."""
    model.eval()
    session = ort_cpu_session(onnx_path)
    if stepwise:
        session = StepwiseSession(session, onnx_path)
        label = f"{label}, step graph run step-wise"
    cfg = model.config
    return ParityReport([compare(model, session, name, ids, mask)
                         for name, ids, mask in parity_inputs(cfg.vocab_size, cfg.max_seq_len, seed, task)],
                        label, tolerance)


def text_windows(path, tokenizer_json: str, seq_len: int, max_windows: int = 64) -> np.ndarray:
    """Up to `max_windows` non-overlapping windows of seq_len + 1 tokens of a text file: [N, seq_len + 1]."""
    from tokenizers import Tokenizer

    from moe_core.errors import MoeError
    from moe_core.jsonl import read_text_file

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
        logits = logits.astype(np.float64)
        m = logits.max(-1, keepdims=True)
        logz = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
        picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
        total += float((logz - picked).sum())
        count += targets.size
    return total / count
