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

from moe_core.model import RecursiveMoE

TOLERANCE = 1e-4


@dataclass
class CaseResult:
    name: str
    shape: tuple[int, int]
    max_abs: float
    max_rel: float  # max_abs / max |eager logits|
    halt_equal: bool
    halt_steps: list[int]  # distinct halt steps seen in this case (shows halting was exercised)

    @property
    def ok(self) -> bool:
        return self.max_rel <= TOLERANCE and self.halt_equal


@dataclass
class ParityReport:
    cases: list[CaseResult] = field(default_factory=list)
    label: str = "fp32"
    tolerance: float = TOLERANCE

    @property
    def ok(self) -> bool:
        return all(c.max_rel <= self.tolerance and c.halt_equal for c in self.cases)

    @property
    def max_abs(self) -> float:
        return max(c.max_abs for c in self.cases)

    @property
    def max_rel(self) -> float:
        return max(c.max_rel for c in self.cases)

    @property
    def failure(self) -> str:
        bad = [c for c in self.cases if not (c.max_rel <= self.tolerance and c.halt_equal)]
        return "; ".join(f"{c.name}: max rel diff {c.max_rel:.2e} (tolerance {self.tolerance:.0e}), "
                         f"halt_step {'agrees' if c.halt_equal else 'DIFFERS'}" for c in bad)

    def summary(self) -> str:
        lines = [f"parity ({self.label}, ONNX Runtime CPU vs eager PyTorch; tolerance max|diff|/max|logit| <= "
                 f"{self.tolerance:.0e}, halt_step exact):"]
        for c in self.cases:
            lines.append(f"  {c.name:<22} {c.shape[0]:>3}x{c.shape[1]:<4} max abs {c.max_abs:.2e}  "
                         f"max rel {c.max_rel:.2e}  halt_step {'==' if c.halt_equal else '!='} "
                         f"(steps {','.join(map(str, c.halt_steps))})  {'ok' if c.ok else 'FAIL'}")
        lines.append(f"  overall: max abs {self.max_abs:.2e}, max rel {self.max_rel:.2e}, "
                     f"halt_step {'identical' if all(c.halt_equal for c in self.cases) else 'DIFFERS'} -> "
                     f"{'PASS' if self.ok else 'FAIL'}")
        return "\n".join(lines)


def parity_inputs(vocab_size: int, max_seq_len: int, seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, input_ids, attention_mask) cases: batch 1 and larger, lengths 1 / middle / maximum, right-padded
    batches, and every token id of the vocabulary."""
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
    return CaseResult(name, ids.shape, max_abs, max_abs / scale, bool(np.array_equal(halt, ref_halt)),
                      sorted(set(ref_halt.tolist())))


def check_parity(model: RecursiveMoE, onnx_path: str, seed: int = 0) -> ParityReport:
    model.eval()
    session = ort_cpu_session(onnx_path)
    cfg = model.config
    return ParityReport([compare(model, session, name, ids, mask)
                         for name, ids, mask in parity_inputs(cfg.vocab_size, cfg.max_seq_len, seed)])
