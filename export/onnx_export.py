"""Export a run to one static ONNX graph (DESIGN.md section 3) and prove parity with the eager model.

The eval-mode model already is a static function: every H/L cycle and every halting step runs, halting is
selected with masks, MoE and MoH routing use TopK / sort / cumsum / scatter. Export therefore traces the
plain module with `torch.export` (the `dynamo=True` exporter) and unrolls the fixed-range Python loops.

With `stepwise`, one supervision step (RecursiveMoE.step) is also exported as MODEL.step.onnx, for serving that
stops each sample when it halts (moe_core/stepwise.py); it passes its own parity check, run step by step as serve
runs it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import Tensor, nn

from moe_core.checkpoint import TOKENIZER_FILE, load_model, load_run_config, run_files
from moe_core.errors import MoeError
from moe_core.files import atomic_write, atomic_write_text, check_not_inputs, check_output
from moe_core.graph_contract import (
    INPUTS,
    OUTPUTS,
    STEP_INPUTS,
    STEP_OUTPUTS,
    graph_metadata,
    run_task,
    step_graph_metadata,
    step_path_for,
    tokenizer_path_for,
)
from moe_core.model import Carry, RecursiveMoE, recording_decisions
from moe_core.ort_session import ort_session
from moe_core.tokenizer import read_tokenizer

from .parity import (
    DECISIONS_PREFIX,
    ParityReport,
    check_parity,
    decision_output,
    text_nll,
    text_windows,
)

DEFAULT_OPSET = 20
PRECISIONS = ("fp32", "fp16", "int8")


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
    Parity-only: the shipped graph is this graph with those outputs removed (strip_decisions), so both come from
    one trace and compute the logits with the same nodes."""

    def __init__(self, model: RecursiveMoE) -> None:
        super().__init__()
        self.model = model
        self.kinds: list[str] = []  # filled when traced: the kind of each decision output

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        with recording_decisions() as log:
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


@dataclass
class ExportResult:
    path: Path
    tokenizer_path: Path
    opset: int
    precision: str
    nodes: int
    params: int
    size_bytes: int
    seconds: float
    reports: list[ParityReport]  # fp32 parity, then the precision variant's figures (empty with check=False)
    step_path: Path | None = None  # the step graph (stepwise=True)
    step_reports: list[ParityReport] | None = None  # the same checks, of the step graph run step by step

    @property
    def parity(self) -> ParityReport | None:
        return self.reports[0] if self.reports else None


def to_onnx(model: RecursiveMoE, path: str | os.PathLike, opset: int = DEFAULT_OPSET, decisions: bool = False) -> None:
    """Trace the eval-mode `model` and write the ONNX graph to `path` (one file, no external data); with
    `decisions`, the parity-only DecisionGraph (strip_decisions turns it into the graph itself)."""
    ids, mask, dims = example_inputs(model)
    graph, names = ExportGraph(model), OUTPUTS
    if decisions:
        graph = DecisionGraph(model)
        with torch.no_grad():
            graph(ids, mask)  # the decisions' kinds name the outputs
        names = (*OUTPUTS, *(decision_output(i, k) for i, k in enumerate(graph.kinds)))
    trace(graph, (ids, mask), INPUTS, names, {"input_ids": dims, "attention_mask": dims}, path, opset)


def strip_decisions(proto: onnx.ModelProto) -> bool:
    """Drop a DecisionGraph's decision outputs and the nodes only they needed; False if it had none."""
    outputs = [o for o in proto.graph.output if not o.name.startswith(DECISIONS_PREFIX)]
    if len(outputs) == len(proto.graph.output):
        return False
    del proto.graph.output[:]
    proto.graph.output.extend(outputs)
    remove_dead_nodes(proto.graph)
    return True


def step_to_onnx(model: RecursiveMoE, path: str | os.PathLike, opset: int = DEFAULT_OPSET) -> None:
    """Trace one supervision step of the eval-mode `model` (StepGraph) and write it to `path`."""
    ids, mask, dims = example_inputs(model)
    z = torch.randn(*ids.shape, model.config.d_model)
    trace(StepGraph(model), (ids, mask, z, z.clone()), STEP_INPUTS, STEP_OUTPUTS, dict.fromkeys(STEP_INPUTS, dims),
          path, opset)


def example_inputs(model: RecursiveMoE) -> tuple[Tensor, Tensor, dict[int, torch.export.Dim]]:
    """Example input_ids and attention_mask, and the dynamic batch and sequence axes."""
    cfg = model.config
    # Example inputs of size >= 2 on both axes: torch.export specialises dimensions of size 0 and 1.
    T = min(cfg.max_seq_len, 8) if cfg.max_seq_len >= 2 else 2
    ids = torch.randint(0, cfg.vocab_size, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    batch = torch.export.Dim("batch", min=1, max=65536)
    seq = torch.export.Dim("seq", min=1, max=max(cfg.max_seq_len, 2))
    return ids, mask, {0: batch, 1: seq}


def trace(graph: nn.Module, args: tuple[Tensor, ...], input_names: tuple[str, ...], output_names: tuple[str, ...],
          dynamic_shapes: dict[str, dict[int, torch.export.Dim]], path: str | os.PathLike, opset: int) -> None:
    """torch.onnx.export (dynamo) of the eval-mode `graph` to `path`, one file."""
    graph.eval()
    # The exporter logs "torchvision is not installed. Skipping torchvision::..." on every export: noise on stderr.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(graph, args, dynamo=True, opset_version=opset,
                                        input_names=list(input_names), output_names=list(output_names),
                                        dynamic_shapes=dynamic_shapes, external_data=False, verbose=False,
                                        # The exporter's own graph optimiser took 40% of the export time and
                                        # made the graph slower on ONNX Runtime, which optimises on load anyway.
                                        optimize=False)
    finally:
        registration_log.setLevel(level)
    program.save(str(path), external_data=False)


def dedupe_initializers(proto: onnx.ModelProto) -> int:
    """Merge byte-identical initializers; returns how many were dropped.

    The exporter constant-folds each use of a weight (e.g. the transpose inside every unrolled call of
    a Linear) into an initializer of its own, so an unrolled recursive model would store every weight
    H_cycles * (L_cycles + 1) * halt_max_steps times over.
    """
    graph = proto.graph
    keep: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    kept = []
    for init in graph.initializer:
        key = (init.data_type, tuple(init.dims), hashlib.sha256(numpy_helper.to_array(init).tobytes()).hexdigest())
        if key in keep:
            rename[init.name] = keep[key]
        else:
            keep[key] = init.name
            kept.append(init)
    if not rename:
        return 0
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    return len(rename)


def fold_sliced_weights(proto: onnx.ModelProto) -> int:
    """Make every MatMul weight that is a slice of a stored weight an initializer of its own; returns how many
    distinct weights were folded.

    Sparse MoE dispatch multiplies each expert's rows by its block of the stored [D, E*F] / [E*F, D] weights:
    in the graph, Reshape / Transpose / Gather of the initializer feed the MatMul, and dynamic quantisation only
    quantises a MatMul whose weight is an initializer (ONNX Runtime folds these constants at load, after
    quantisation has passed them by). Folded here, each expert's weight is quantised as the dense graph's are.
    A weight that is not sliced (e.g. a Linear's transposed weight) is left as it is: int8 covers the same
    weights under both dispatches. Folding is exact (it only moves values), dead nodes are dropped, and the
    copies the unrolled recursion makes are merged by dedupe_initializers.
    """
    from onnx.reference import ReferenceEvaluator

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    signature: dict[str, tuple] = {name: ("initializer", name) for name in inits}  # constant values only
    for node in graph.node:
        if node.op_type == "Constant" or (node.input and all(i in signature for i in node.input if i)):
            attrs = tuple(a.SerializeToString() for a in node.attribute)
            for k, out in enumerate(node.output):
                signature[out] = (node.op_type, attrs, tuple(signature.get(i) for i in node.input), k)

    order = {id(n): i for i, n in enumerate(graph.node)}

    def subgraph(name: str) -> list[onnx.NodeProto]:
        """The nodes computing constant `name`, in graph order."""
        nodes, stack = {}, [name]
        while stack:
            v = stack.pop()
            if v in producer and id(producer[v]) not in nodes:
                nodes[id(producer[v])] = producer[v]
                stack.extend(i for i in producer[v].input if i)
        return sorted(nodes.values(), key=lambda n: order[id(n)])

    folded: dict[tuple, str] = {}
    for node in graph.node:
        w = node.input[1] if node.op_type == "MatMul" else None
        if w is None or w in inits or w not in signature:
            continue
        nodes = subgraph(w)
        if not any(n.op_type in ("Gather", "Slice") for n in nodes):
            continue
        key = signature[w]
        if key not in folded:
            used = sorted({i for n in nodes for i in n.input if i in inits})
            model = onnx.helper.make_model(
                onnx.helper.make_graph(nodes, "fold", [], [onnx.helper.make_tensor_value_info(w, 0, None)],
                                       [inits[i] for i in used]), opset_imports=proto.opset_import)
            value = np.ascontiguousarray(ReferenceEvaluator(model).run(None, {})[0])
            folded[key] = f"{'+'.join(used)}.slice{len(folded)}"  # e.g. model.net.blocks.0.ffn.w_gate.slice3
            graph.initializer.append(numpy_helper.from_array(value, folded[key]))
        node.input[1] = folded[key]
    if folded:
        remove_dead_nodes(graph)
    return len(folded)


def remove_dead_nodes(graph: onnx.GraphProto) -> None:
    """Drop the nodes none of whose outputs is used, repeatedly, then the initializers no node reads."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input} | outputs
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def set_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    del proto.metadata_props[:]
    for k, v in metadata.items():
        proto.metadata_props.add(key=k, value=v)


def convert_precision(path: str, precision: str, metadata: dict[str, str]) -> None:
    """Rewrite the fp32 graph at `path` as `precision`, in place.

    fp16: weights and activations in half precision (for GPU serving); inputs and outputs stay int64 /
    float32, and TopK / CumSum / Range stay fp32 (the converter's default block list), so routing still
    ranks in fp32. int8: dynamic quantisation of the MatMul weights that are initializers (a CPU speed-up): the
    experts' weights under either MoE dispatch (sparse dispatch's per-expert slices are folded into initializers
    first, fold_sliced_weights) and the halt head's Gemm; the attention, router and output projections (Linear
    weights, a Transpose in the graph) stay fp32.
    """
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        proto = convert_float_to_float16(onnx.load(path), keep_io_types=True)
    else:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        proto = onnx.load(path)
        if fold_sliced_weights(proto):
            dedupe_initializers(proto)
            onnx.save(proto, path)
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # "Please consider to run pre-processing" on the root logger, every call
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_dynamic(path, path, weight_type=QuantType.QInt8)
        finally:
            logging.disable(previous)
        proto = onnx.load(path)
    set_metadata(proto, {**metadata, "precision": precision})
    onnx.save(proto, path)


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, opset: int = DEFAULT_OPSET,
               check: bool = True, overwrite: bool = False, precision: str = "fp32",
               eval_text: str | os.PathLike | None = None, stepwise: bool = False, log=print) -> ExportResult:
    """Export RUN_DIR to OUT (+ OUT's tokenizer, + OUT's step graph with `stepwise`). Nothing is left at OUT (or
    beside it) unless every graph exports and passes parity.

    The fp32 graph must pass the parity check; an fp16 / int8 variant is converted from it and its own
    parity figures are reported (reduced precision has no 1e-4 tolerance to meet). With `eval_text`, the mean
    next-token loss of eager PyTorch and of the written graph on that text is reported: the accuracy cost.
    With `stepwise`, the step graph (moe_core/stepwise.py) goes through the same, run step by step as serve runs it.
    """
    if precision not in PRECISIONS:
        raise MoeError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    run_dir = Path(run_dir)
    inputs = [(p, f"a file of the run {run_dir}") for p in run_files(run_dir)]
    if eval_text is not None:
        inputs.append((Path(eval_text), "the --eval-text file"))
    check_not_inputs([out, tokenizer_path_for(out), *([step_path_for(out)] if stepwise else [])], inputs)
    out = check_output(out, overwrite)
    tok_path = check_output(tokenizer_path_for(out), overwrite)
    step_path = check_output(step_path_for(out), overwrite) if stepwise else None
    t0 = time.perf_counter()
    _, full_config = load_run_config(run_dir)
    task = run_task(full_config)
    if eval_text is not None and task != "lm":
        raise MoeError(f"--eval-text: a language-model option (mean next-token loss on a text); {run_dir} is a {task} "
                       "run")
    model = load_model(run_dir)
    cfg = model.config
    if stepwise and not cfg.recursive:
        raise MoeError(f"--stepwise: the model of {run_dir} has no recursion (model.recursive = false): it runs one "
                       "step, which the exported graph already is")
    tokenizer_text, _ = read_tokenizer(run_dir / TOKENIZER_FILE, cfg.vocab_size, owner=f"the model in {run_dir}")
    eval_ids = text_windows(eval_text, tokenizer_text, cfg.max_seq_len) if eval_text is not None else None
    metadata = graph_metadata(full_config, cfg.vocab_size, cfg.max_seq_len, cfg.n_steps, cfg.causal, task,
                              tok_path.name, hashlib.sha256(tokenizer_text.encode("utf-8")).hexdigest(),
                              weights_sha256(model))
    if step_path is not None:
        step_metadata = step_graph_metadata(metadata, model.z_H_init.numpy(), model.z_L_init.numpy())
        metadata["step_graph"] = step_path.name

    def write_graph(tmp: str, make: Callable[..., None], meta: dict[str, str], name: Path,
                    step: bool) -> list[ParityReport]:
        if step:
            make(model, tmp, opset)
        else:
            make(model, tmp, opset, decisions=check)
        proto = onnx.load(tmp)
        dedupe_initializers(proto)
        for node in proto.graph.node:  # per-node stack traces and FX names: half the file, no use to a runtime
            del node.metadata_props[:]
            node.doc_string = ""
        with tempfile.TemporaryDirectory(prefix="moe-parity-") as scratch:
            decisions_path = None
            if not step:
                decisions_path = os.path.join(scratch, "decisions.onnx")
                onnx.save(proto, decisions_path)
                if not strip_decisions(proto):
                    decisions_path = None
            set_metadata(proto, {**meta, "precision": "fp32"})
            try:
                onnx.checker.check_model(proto, full_check=True)
            except onnx.checker.ValidationError as e:
                raise MoeError(f"{name}: exported graph fails onnx.checker ({str(e).splitlines()[0]})") from None
            onnx.save(proto, tmp)
            got: list[ParityReport] = []
            if check:
                # The step graph leaves out the positions the unrolled graph's near-ties can affect.
                got.append(check_parity(model, tmp, task=task, stepwise=step, decisions_path=decisions_path,
                                        exclude=reports[0] if step and reports else None))
                log(got[-1].summary())
                if not got[-1].ok:
                    raise MoeError(f"{name}: parity check failed ({got[-1].failure}); nothing was written")
        if precision != "fp32":
            convert_precision(tmp, precision, meta)
            if check:
                got.append(check_parity(model, tmp, label=precision, tolerance=None, task=task, stepwise=step))
                log(got[-1].summary())
        return got

    reports: list[ParityReport] = []
    step_reports: list[ParityReport] = []
    written: list[Path] = []  # beside OUT, before OUT's own rename

    def build(tmp: str) -> None:
        reports.extend(write_graph(tmp, to_onnx, metadata, out, step=False))
        if eval_ids is not None:
            eager_nll, onnx_nll = text_nll(model, eval_ids), text_nll(ort_session(tmp), eval_ids)
            log(f"accuracy on {eval_text} ({eval_ids.size:,} tokens): eager loss {eager_nll:.4f}, ONNX {precision} "
                f"loss {onnx_nll:.4f} (cost {onnx_nll - eager_nll:+.2e} nats/token)")
        if step_path is not None:
            atomic_write(step_path, lambda t: step_reports.extend(write_graph(t, step_to_onnx, step_metadata,
                                                                              step_path, step=True)), overwrite)
            written.append(step_path)
        atomic_write_text(tok_path, tokenizer_text, overwrite)  # last: only a model that passed gets its tokenizer
        written.append(tok_path)

    try:
        atomic_write(out, build, overwrite)
    except BaseException:
        for path in written:  # the model's own rename failed: what belongs to it must not stay behind alone
            path.unlink(missing_ok=True)
        raise
    final = onnx.load(str(out))
    n_params = sum(int(np.prod(t.dims)) for t in final.graph.initializer)
    return ExportResult(out, tok_path, opset, precision, len(final.graph.node), n_params, out.stat().st_size,
                        time.perf_counter() - t0, reports, step_path, step_reports if step_path else None)


def weights_sha256(model: nn.Module) -> str:
    """sha256 of the model's weights (names, dtypes, shapes and bytes): ties a step graph to its unrolled graph."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, bf16 included
    return h.hexdigest()
