"""Tracing: the eval-mode model as nn.Modules with the graph contract's inputs and outputs, written to ONNX by
`torch.export` (the `dynamo=True` exporter), which unrolls the fixed-range Python loops.

The eval-mode model already is a static function: every H/L cycle and every halting step runs, halting is
selected with masks, MoE and MoH routing use TopK / sort / cumsum / scatter. What is traced here is written as the
exporter leaves it; export/passes.py rewrites it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

import torch
from torch import Tensor, nn

from moe_core.model import Carry, RecursiveMoE, recording_decisions
from moe_core.model.attention import onnx_rotary
from moe_core.runtime.graph_contract import INPUTS, OUTPUTS, STEP_INPUTS, STEP_OUTPUTS

from .choices import DEFAULT_OPSET, FUSED_OPSET
from .parity import decision_output

# An input's dynamic axes (axis -> Dim), or those of each tensor of a variadic input (DecodeGraph's *past).
DynamicAxes = dict[int, torch.export.Dim] | tuple[dict[int, torch.export.Dim], ...]


class ExportGraph(nn.Module):
    """The exported function: (input_ids, attention_mask) -> (logits, halt_step)."""

    def __init__(self, model: RecursiveMoE) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(input_ids, attention_mask)
        return out.logits, out.halt_step


class DecisionGraph(nn.Module):
    """ExportGraph plus every routing and halting decision as an output (parity.DECISIONS_PREFIX), in call order.
    Parity-only: the shipped graph is this graph with those outputs removed (passes.strip_decisions), so both come
    from one trace and compute the logits with the same nodes."""

    def __init__(self, model: RecursiveMoE) -> None:
        super().__init__()
        self.model = model
        self.kinds: list[str] = []  # filled when traced: the kind of each decision output

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        with recording_decisions(self.model) as log:
            out = self.model(input_ids, attention_mask)
        self.kinds = [d.kind for d in log]
        return (out.logits, out.halt_step, *(d.choice for d in log))


class StepGraph(nn.Module):
    """One supervision step: (input_ids, attention_mask, z_H, z_L) -> (next_z_H, next_z_L, logits, halt_logit)."""

    def __init__(self, model: RecursiveMoE) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, z_H: Tensor,
                z_L: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        m = self.model
        c, h, q = m.step(Carry(z_H, z_L), m.embed_inputs(input_ids), attention_mask.bool())
        return c.z_H, c.z_L, m.lm_head(h), q


def to_onnx(model: RecursiveMoE, path: str | os.PathLike, opset: int = DEFAULT_OPSET, decisions: bool = False) -> None:
    """Trace the eval-mode `model` and write the ONNX graph to `path` (one file, no external data); with
    `decisions`, the parity-only DecisionGraph (passes.strip_decisions turns it into the graph itself)."""
    ids, mask, dims = example_inputs(model)
    graph: ExportGraph | DecisionGraph
    names: tuple[str, ...]
    graph, names = ExportGraph(model), OUTPUTS
    if decisions:
        graph = DecisionGraph(model)
        with torch.no_grad():
            graph(ids, mask)  # the decisions' kinds name the outputs
        names = (*OUTPUTS, *(decision_output(i, k) for i, k in enumerate(graph.kinds)))
    trace(graph, (ids, mask), INPUTS, names, {"input_ids": dims, "attention_mask": dims}, path, opset)


def step_to_onnx(model: RecursiveMoE, path: str | os.PathLike, opset: int = DEFAULT_OPSET) -> None:
    """Trace one supervision step of the eval-mode `model` (StepGraph) and write it to `path`."""
    ids, mask, dims = example_inputs(model)
    z = torch.randn(*ids.shape, model.config.d_model)
    trace(StepGraph(model), (ids, mask, z, z.clone()), STEP_INPUTS, STEP_OUTPUTS, dict.fromkeys(STEP_INPUTS, dims),
          path, opset)


def example_inputs(model: RecursiveMoE) -> tuple[Tensor, Tensor, dict[int, torch.export.Dim]]:
    """Example input_ids and attention_mask, and the dynamic axes: batch, and the sequence unless the model's token
    mixer is the MLP, whose weights fix it at max_seq_len."""
    cfg = model.config
    batch = torch.export.Dim("batch", min=1, max=65536)
    if cfg.token_mixer == "mlp":
        ids = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len))
        return ids, torch.ones_like(ids), {0: batch}
    # Example inputs of size >= 2 on both axes: torch.export specialises dimensions of size 0 and 1.
    T = min(cfg.max_seq_len, 8) if cfg.max_seq_len >= 2 else 2
    ids = torch.randint(0, cfg.vocab_size, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    seq = torch.export.Dim("seq", min=1, max=max(cfg.max_seq_len, 2))
    return ids, mask, {0: batch, 1: seq}


def trace(graph: nn.Module, args: tuple[Tensor, ...], input_names: tuple[str, ...], output_names: tuple[str, ...],
          dynamic_shapes: dict[str, DynamicAxes], path: str | os.PathLike, opset: int) -> None:
    """torch.onnx.export (dynamo) of the eval-mode `graph` (a wrapper of one RecursiveMoE, its .model) to `path`,
    one file."""
    model = graph.model
    assert isinstance(model, RecursiveMoE)
    graph.eval()
    # The exporter logs "torchvision is not installed. Skipping torchvision::..." on every export: noise on stderr.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    fused = onnx_rotary(model) if opset >= FUSED_OPSET else contextlib.nullcontext()
    try:
        with warnings.catch_warnings(), torch.no_grad(), fused:
            warnings.simplefilter("ignore")
            program = torch.onnx.export(graph, args, dynamo=True, opset_version=opset,
                                        input_names=list(input_names), output_names=list(output_names),
                                        dynamic_shapes=dynamic_shapes, external_data=False, verbose=False,
                                        # The exporter's own graph optimiser is off: it costs a large share of
                                        # the export time and its graph runs slower on ONNX Runtime, which
                                        # optimises on load anyway (figures: benchmarks/RESULTS.md).
                                        optimize=False)
    finally:
        registration_log.setLevel(level)
    assert program is not None  # dynamo=True: always a program
    program.save(str(path), external_data=False)
