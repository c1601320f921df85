"""Likelihood figures computed from logits in numpy (torch-free), the one implementation that export's parity
check and the benchmarks share. Training's loss is torch cross-entropy (train/loss.py): it must backpropagate.

  log_softmax     log-probabilities over the last axis, max-shifted so that no exp overflows
  token_logprobs  the log-probability of each target token: logits [..., V], targets [...] -> [...]

Arithmetic is in the logits' dtype: pass float64 for a figure to compare across runtimes, float32 for what a
float32 runtime computes.
"""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis: logits - logsumexp(logits)."""
    m = logits.max(-1, keepdims=True)
    return logits - (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))


def token_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(targets[i]) under logits[i]: logits [..., V], integer targets [...] -> [...]."""
    return np.take_along_axis(log_softmax(logits), targets[..., None], -1)[..., 0]
