"""The recursive Mixture-of-Experts / Mixture-of-Heads model, in the order data flows through it.

    x    = embed(ids) * sqrt(d_model)
    for step in 1..halt_max_steps:                       # supervision steps
        for h in 1..H_cycles:
            for l in 1..L_cycles:  z_L = net(z_L + z_H + x)
            z_H = net(z_H + z_L)
        logits_step = lm_head(norm(z_H)); halt_logit_step = halt_head(norm(z_H))

`net` is a stack of pre-norm blocks: h = x + MoH(norm(x)); y = h + MoE(norm(h)).
With recursion off the model is the plain baseline: logits = lm_head(norm(net(x))).

Training returns every step's logits (deep supervision) with the aux losses and statistics; evaluation runs
every step and keeps, per sample, the state of the first step whose halt probability is > 0.5 (the last
step if none) — selected with masks, so eager eval and the exported ONNX graph are the same function.

The package, in that order: common.py (decisions, aux values, RMSNorm), attention.py (MoH attention, rotary, KV
cache, the token-mixing MLP), moe.py (the MoE feed-forward and its dispatch), recursion.py (blocks, the net,
RecursiveMoE).
"""

from .common import Decision, recording_decisions
from .recursion import Carry, ModelOutput, RecursiveMoE

__all__ = ["Carry", "Decision", "ModelOutput", "RecursiveMoE", "recording_decisions"]
