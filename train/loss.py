"""The training loss: deep supervision over every step, the halt head's target, and the weighted aux losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_core.model import ModelOutput


def per_sample_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token negative log-likelihood of each sample: logits [B, T, V], targets [B, T] -> [B]."""
    B, T, V = logits.shape
    nll = F.cross_entropy(logits.reshape(B * T, V).float(), targets.reshape(B * T), reduction="none")
    return nll.view(B, T).mean(dim=1)


def training_loss(out: ModelOutput, targets: Tensor, aux_weights: dict[str, float], halt_weight: float,
                  halt_target: str = "no_gain", loss_key: str = "lm_loss") -> tuple[Tensor, dict[str, Tensor]]:
    """The loss to backpropagate and its parts (all tensors; the caller decides when to sync them). The task's own
    loss is reported under `loss_key` (its Task.loss_key: "lm_loss" for language, "cell_loss" for puzzles).

    Deep supervision: the mean next-token (or per-cell) loss over every supervision step. The halt head's
    target at step s, by task:
      no_gain  (language) halt when step s+1 does not lower this sample's loss any further — halting there
               loses nothing. The last step has no target: evaluation keeps it anyway when no step halted.
      correct  (puzzles) halt when the answer at step s is completely right (TRM's rule), at every step.
    """
    nll = torch.stack([per_sample_nll(lg, targets) for lg in out.step_logits])  # [S, B]
    task_loss = nll.mean()
    total = task_loss
    parts: dict[str, Tensor] = {loss_key: task_loss.detach(), "last_step_loss": nll[-1].mean().detach()}
    if out.halt_logits is not None:
        if halt_target == "no_gain":
            q, target = out.halt_logits[:-1], (nll[1:] >= nll[:-1]).detach()  # [S-1, B]
        elif halt_target == "correct":
            right = torch.stack([(lg.argmax(-1) == targets).all(dim=-1) for lg in out.step_logits])  # [S, B]
            q, target = out.halt_logits, right
            parts["exact_last_step"] = right[-1].float().mean()
        else:
            raise ValueError(f"halt_target: expected 'no_gain' or 'correct', got {halt_target!r}")
        if q.numel():
            target = target.to(q.dtype)
            halt_loss = F.binary_cross_entropy_with_logits(q, target)
            total = total + halt_weight * halt_loss
            parts["halt_loss"] = halt_loss.detach()
            parts["halt_acc"] = ((q > 0) == target.bool()).float().mean().detach()
            parts["halt_target"] = target.mean().detach()
    for name, value in out.aux_losses.items():
        weighted = aux_weights[name] * value
        total = total + weighted
        parts[f"aux.{name}"] = value.detach()
        parts[f"aux_weighted.{name}"] = weighted.detach()
    parts["loss"] = total.detach()
    return total, parts
