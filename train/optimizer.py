"""The optimizer and the parameter groups: AdamW with weight decay, no decay and the router's LR multiplier,
and the groups whose gradient norms the trainer logs."""

from __future__ import annotations

import torch

from moe_core.model import RecursiveMoE

from .config import RunConfig
from .distributed import full_tensor


def build_optimizer(model: RecursiveMoE, cfg: RunConfig) -> torch.optim.AdamW:
    tc = cfg.train
    groups = model.param_groups()
    spec = [  # (name, weight decay, LR multiplier)
        ("decay", tc.weight_decay, 1.0),
        ("no_decay", 0.0, 1.0),
        ("router", 0.0, tc.router_lr_mult),
    ]
    param_groups = [{"params": groups[name], "name": name, "weight_decay": wd, "lr_mult": mult, "lr": tc.lr * mult}
                    for name, wd, mult in spec if groups[name]]
    return torch.optim.AdamW(param_groups, lr=tc.lr, betas=(tc.beta1, tc.beta2),
                             fused=None if any(p.is_cuda for p in model.parameters()) else False)


def norm_groups(model: RecursiveMoE) -> dict[str, list[torch.nn.Parameter]]:
    """The parameter groups whose gradient norms are logged, so that "does gradient reach the router" is a
    number, not a guess: the optimizer's groups with the MoH predictors split off the router, and the halt head."""
    named = dict(model.named_parameters())
    predictor = [p for n, p in named.items() if "complexity_head" in n or "threshold_head" in n]
    groups = {**model.param_groups(), "halt": list(model.halt_head.parameters())}
    groups["router"] = [p for p in groups["router"] if not any(p is q for q in predictor)]
    groups["predictor"] = predictor
    return groups


def global_grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the group's gradients, a plain tensor (with FSDP a collective: all ranks call it)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return full_tensor(torch.nn.utils.get_total_norm(grads))
