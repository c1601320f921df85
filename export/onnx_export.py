"""`moe export`: a run to one static ONNX graph, checked for parity with the eager model before anything is written.

The steps, each in its own module: trace the eval-mode model (export/trace.py), rewrite the graph
(export/passes.py), check parity (export/parity.py), convert to a reduced precision (export/precision.py).
Here they run in order for the graphs of one export, and the files are written: OUT, then (with `stepwise`) one
supervision step (RecursiveMoE.step) as MODEL.step.onnx, for serving that stops each sample when it halts
(moe_core/runtime/stepwise.py), with its own parity check run step by step as serve runs it, then (with `decode`) the
KV-cached decode graph MODEL.decode.onnx (export/decode.py) with its own parity check, then the tokenizer.

The names the tests replace (to_onnx, step_to_onnx, check_parity) are looked up in this module when called.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from moe_core.checkpoint import load_model, load_run_config, read_json, run_files
from moe_core.common.errors import MoeError
from moe_core.common.files import atomic_outputs, check_not_inputs, check_output
from moe_core.common.tokenizer import read_tokenizer
from moe_core.config import MAX_CYCLES
from moe_core.model import RecursiveMoE
from moe_core.run_layout import CALIBRATION_FILE, TOKENIZER_FILE
from moe_core.runtime.graph_contract import (
    LOGITS,
    SERVE_MAX_STEPS,
    decode_graph_metadata,
    decode_path_for,
    graph_metadata,
    step_graph_metadata,
    step_path_for,
    task_of,
    tokenizer_path_for,
)
from moe_core.runtime.ort_session import ort_session
from moe_core.tasks import task_spec

from .choices import CUDA_PRECISIONS, DEFAULT_OPSET, DEVICES, PRECISIONS
from .decode import GQA_HEAD_MULTIPLE, cache_entries, can_decode, check_decode_parity, decode_to_onnx
from .parity import ParityReport, check_parity, text_nll, text_windows
from .passes import (
    dedupe_initializers,
    has_decisions,
    remove_dead_nodes,
    runtime_folded,
    strip_decisions,
    strip_node_metadata,
    with_graph_metadata,
)
from .precision import convert_precision
from .trace import DecisionGraph, ExportGraph, StepGraph, example_inputs, step_to_onnx, to_onnx, trace

__all__ = [
    "DEFAULT_OPSET", "PRECISIONS", "DecisionGraph", "ExportGraph", "ExportResult", "StepGraph", "check_parity",
    "convert_precision", "dedupe_initializers", "example_inputs", "export_run",
    "remove_dead_nodes", "runtime_folded", "step_to_onnx", "strip_decisions", "to_onnx", "trace", "weights_sha256",
]


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
    decode_path: Path | None = None  # the decode graph (decode=True)
    decode_reports: list[ParityReport] | None = None  # its checks: prefill, then cached calls

    @property
    def parity(self) -> ParityReport | None:
        return self.reports[0] if self.reports else None


@dataclass
class Outputs:
    """The files one export writes."""

    out: Path
    tokenizer: Path
    step: Path | None  # with `stepwise`
    decode: Path | None  # with `decode`


@dataclass
class Job:
    """One export: the model and what its graphs are written with."""

    model: RecursiveMoE
    task: str
    device: str  # the device the graphs are made for (choices.DEVICES)
    opset: int
    check: bool
    precision: str
    metadata: dict[str, str]  # the unrolled graph's
    step_metadata: dict[str, str] | None  # the step graph's (with `stepwise`)
    decode_metadata: dict[str, str] | None  # the decode graph's (with `decode`)
    tokenizer_text: str
    eval_text: str | os.PathLike | None
    eval_ids: np.ndarray | None  # the windows of eval_text


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, opset: int = DEFAULT_OPSET,
               check: bool = True, overwrite: bool = False, precision: str = "fp32",
               eval_text: str | os.PathLike | None = None, stepwise: bool = False, decode: bool = False,
               device: str = "cpu", log=print) -> ExportResult:
    """Export RUN_DIR to OUT (+ OUT's tokenizer, + OUT's step graph with `stepwise`, + OUT's decode graph with
    `decode`: causal language models). Nothing is left at OUT (or beside it) unless every graph exports and passes
    parity.

    The fp32 graph must pass the parity check; an fp16 / int8 variant is converted from it and its own
    parity figures are reported (reduced precision has no 1e-4 tolerance to meet). With `eval_text`, the mean
    next-token loss of eager PyTorch and of the written graph on that text is reported: the accuracy cost.
    With `stepwise`, the step graph (moe_core/runtime/stepwise.py) goes through the same, run step by step as serve runs
    it.
    """
    if precision not in PRECISIONS:
        raise MoeError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device not in DEVICES:
        raise MoeError(f"--device: expected one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and precision not in CUDA_PRECISIONS:
        raise MoeError(f"--precision {precision}: not with --device cuda (dynamic int8 quantisation's "
                       "DynamicQuantizeLinear and MatMulInteger have no CUDA kernels); use "
                       f"{' or '.join(CUDA_PRECISIONS[1:])} for a smaller graph on a GPU")
    run_dir = Path(run_dir)
    outputs = check_outputs(run_dir, out, overwrite, eval_text, stepwise, decode)
    t0 = time.perf_counter()
    job = prepare(run_dir, outputs, opset, check, precision, eval_text, stepwise, device)
    reports, step_reports, decode_reports = write_outputs(job, outputs, overwrite, log)
    final = onnx.load(str(outputs.out))
    n_params = sum(int(np.prod(t.dims)) for t in final.graph.initializer)
    return ExportResult(outputs.out, outputs.tokenizer, opset, precision, len(final.graph.node), n_params,
                        outputs.out.stat().st_size, time.perf_counter() - t0, reports, outputs.step, step_reports,
                        outputs.decode, decode_reports)


def decode_by_default(run_dir: str | os.PathLike) -> bool:
    """`moe export` writes the decode graph unless told not to when the run is one it serves (can_decode); a run
    it cannot read is left for export_run to report."""
    try:
        cfg, full_config = load_run_config(run_dir)
    except MoeError:
        return False
    return can_decode(cfg, task_of(full_config))


def check_outputs(run_dir: Path, out: str | os.PathLike, overwrite: bool, eval_text: str | os.PathLike | None,
                  stepwise: bool, decode: bool) -> Outputs:
    """The files the export writes, refused before any work if one is an input or may not be written."""
    inputs = [(p, f"a file of the run {run_dir}") for p in run_files(run_dir)]
    if eval_text is not None:
        inputs.append((Path(eval_text), "the --eval-text file"))
    beside = [*([step_path_for(out)] if stepwise else []), *([decode_path_for(out)] if decode else [])]
    check_not_inputs([out, tokenizer_path_for(out), *beside], inputs)
    out = check_output(out, overwrite)
    tok_path = check_output(tokenizer_path_for(out), overwrite)
    step_path = check_output(step_path_for(out), overwrite) if stepwise else None
    decode_path = check_output(decode_path_for(out), overwrite) if decode else None
    return Outputs(out, tok_path, step_path, decode_path)


def prepare(run_dir: Path, outputs: Outputs, opset: int, check: bool, precision: str,
            eval_text: str | os.PathLike | None, stepwise: bool, device: str = "cpu") -> Job:
    """Load the run's model and tokenizer and build the graphs' metadata; refuse options the run does not fit."""
    _, full_config = load_run_config(run_dir)
    task = task_of(full_config)
    if eval_text is not None and not task_spec(task).generates:
        raise MoeError(f"--eval-text: a language-model option (mean next-token loss on a text); {run_dir} is a {task} "
                       "run")
    model = load_model(run_dir)
    if device == "cuda":
        model.use_dispatch("dense")  # sparse dispatch's group sizes are data (SplitToSequence: no CUDA kernel)
    cfg = model.config
    if stepwise and not cfg.recursive:
        raise MoeError(f"--stepwise: the model of {run_dir} has no recursion (model.recursive = false): it runs one "
                       "step, which the exported graph already is")
    tokenizer_text, _ = read_tokenizer(run_dir / TOKENIZER_FILE, cfg.vocab_size, owner=f"the model in {run_dir}")
    eval_ids = text_windows(eval_text, tokenizer_text, cfg.max_seq_len) if eval_text is not None else None
    metadata = graph_metadata(full_config, cfg.vocab_size, cfg.max_seq_len, cfg.n_steps, cfg.causal, task,
                              outputs.tokenizer.name, hashlib.sha256(tokenizer_text.encode("utf-8")).hexdigest(),
                              weights_sha256(model), device)
    served = validated_steps(run_dir, model)
    if served is not None:
        metadata[SERVE_MAX_STEPS] = str(served)
    if outputs.decode is not None and not can_decode(cfg, task):
        raise MoeError(f"--decode: the KV-cached decode graph is for causal language models without attn_bias "
                       f"whose head_dim is a multiple of {GQA_HEAD_MULTIPLE}; {run_dir} is a {task} run "
                       f"(causal={cfg.causal}, attn_bias={cfg.attn_bias}, head_dim={cfg.head_dim})")
    step_metadata = decode_metadata = None
    if outputs.step is not None:
        step_metadata = step_graph_metadata(metadata, model.z_H_init.numpy(), model.z_L_init.numpy())
    if outputs.decode is not None:
        decode_metadata = decode_graph_metadata(metadata, cache_entries(cfg))
    if outputs.step is not None:
        metadata["step_graph"] = outputs.step.name
    if outputs.decode is not None:
        metadata["decode_graph"] = outputs.decode.name
    return Job(model, task, device, opset, check, precision, metadata, step_metadata, decode_metadata, tokenizer_text,
               eval_text, eval_ids)


def validated_steps(run_dir: Path, model: RecursiveMoE) -> int | None:
    """The steps the run validated for serving: the K of RUN_DIR/halt_calibration.json (`moe eval --ladder
    --calibrate-halting`) when the weights are the ones it calibrated (their halt bias is its calibrated_bias; weights
    published since are not), else None."""
    path = run_dir / CALIBRATION_FILE
    if not path.exists():
        return None
    record = read_json(path)
    k, bias = (record.get("k"), record.get("calibrated_bias")) if isinstance(record, dict) else (None, None)
    if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= MAX_CYCLES and isinstance(bias, float | int)):
        raise MoeError(f"{path}: k / calibrated_bias: expected a step count in 1..{MAX_CYCLES} and a number (delete "
                       "the file to export without the validated steps)")
    return k if float(model.halt_head.bias.item()) == float(bias) else None


def write_outputs(job: Job, outputs: Outputs, overwrite: bool,
                  log) -> tuple[list[ParityReport], list[ParityReport] | None, list[ParityReport] | None]:
    """Write OUT, its step and decode graphs and its tokenizer; returns the parity reports of OUT, the step graph and
    the decode graph.

    Every file is written to a temp file first and all are published together (files.atomic_outputs), OUT last, so
    OUT existing means every file of the export does; a failure anywhere leaves the files of an earlier export
    exactly as they were (an --overwrite that fails replaces nothing).
    """
    paths = [p for p in (outputs.step, outputs.decode, outputs.tokenizer, outputs.out) if p is not None]
    with atomic_outputs(paths, overwrite) as tmps:
        tmp = dict(zip(paths, tmps, strict=True))
        reports = write_graph(job, tmp[outputs.out], outputs.out, log)
        if job.eval_ids is not None:
            log(accuracy(job, tmp[outputs.out]))
        step_reports = None
        if outputs.step is not None:
            # The step graph leaves out the positions the unrolled graph's near-ties can affect.
            exclude = reports[0] if reports else None
            step_reports = write_graph(job, tmp[outputs.step], outputs.step, log, step=True, exclude=exclude)
        decode_reports = None
        if outputs.decode is not None:
            decode_reports = write_decode_graph(job, tmp[outputs.decode], outputs.decode, log)
        Path(tmp[outputs.tokenizer]).write_text(job.tokenizer_text, encoding="utf-8")
    return reports, step_reports, decode_reports


def write_graph(job: Job, tmp: str, name: Path, log, step: bool = False,
                exclude: ParityReport | None = None) -> list[ParityReport]:
    """Trace one graph (the unrolled graph, or with `step` the step graph) to `tmp`, rewrite it, check parity, and
    convert it to the job's precision; returns the parity reports (fp32, then the variant's figures), each logged
    as it is made. A failed fp32 parity check is a MoeError naming `name`."""
    meta = job.step_metadata if step else job.metadata
    assert meta is not None  # a step graph is written only for a job prepared with stepwise (its metadata)
    proto = traced(job, tmp, step)
    with tempfile.TemporaryDirectory(prefix="moe-parity-") as scratch:
        decisions_path = None
        if has_decisions(proto):  # the parity-only decision graph: kept for the check, stripped for OUT
            decisions_path = os.path.join(scratch, "decisions.onnx")
            onnx.save(proto, decisions_path)
            proto = strip_decisions(proto)
        save_checked(with_graph_metadata(proto, {**meta, "precision": "fp32"}), tmp, name)
        fp32 = fp32_parity(job, tmp, name, step, decisions_path, exclude, log) if job.check else None
    if job.precision == "fp32":
        return [fp32] if fp32 is not None else []
    convert_precision(tmp, job.precision, meta)
    if fp32 is None:
        return []
    if not runs_on_cpu(job.precision):
        log(f"parity ({job.precision}): not measured here, ONNX Runtime has no CPU kernels for it (its fp32 graph "
            "passed above; `make gpu-check` measures it on CUDA)")
        return [fp32]
    variant = check_parity(job.model, tmp, label=job.precision, tolerance=None, task=job.task, stepwise=step)
    log(variant.summary())
    return [fp32, variant]


def write_decode_graph(job: Job, tmp: str, name: Path, log) -> list[ParityReport]:
    """Trace the decode graph to `tmp`, check it as serve runs it (prefill, then cached calls) and convert it to the
    job's precision; returns its parity reports as write_graph does."""
    decode_metadata = job.decode_metadata
    assert decode_metadata is not None  # written only for outputs with a decode graph: prepare made its metadata
    decode_to_onnx(job.model, tmp, job.opset, job.device)
    proto = cleaned(tmp)
    save_checked(with_graph_metadata(proto, {**decode_metadata, "precision": "fp32"}), tmp, name)
    reports = []
    if job.check:
        reports.append(check_decode_parity(job.model, ort_session(tmp)))
        log(reports[-1].summary())
        if not reports[-1].ok:
            raise MoeError(f"{name}: parity check failed ({reports[-1].failure}); nothing was written")
    if job.precision != "fp32":
        # A CUDA graph's KV cache is in the graph's dtype at its inputs and outputs: bound as past and present at
        # once, with no Cast between the buffer and attention.
        convert_precision(tmp, job.precision, decode_metadata, [LOGITS] if job.device == "cuda" else True)
        if job.check and not runs_on_cpu(job.precision):
            log(f"parity ({job.precision}, decode graph): not measured here, ONNX Runtime has no CPU kernels for it")
        elif job.check:
            reports.append(check_decode_parity(job.model, ort_session(tmp), label=job.precision, tolerance=None))
            log(reports[-1].summary())
    return reports


def runs_on_cpu(precision: str) -> bool:
    """Whether ONNX Runtime's CPU provider runs a graph of `precision` (it has next to no bfloat16 kernels)."""
    return precision != "bf16"


def traced(job: Job, tmp: str, step: bool) -> onnx.ModelProto:
    """The traced graph (with its decisions as outputs when the job checks parity), cleaned."""
    if step:
        step_to_onnx(job.model, tmp, job.opset)
    else:
        to_onnx(job.model, tmp, job.opset, decisions=job.check)
    return cleaned(tmp)


def cleaned(path: str) -> onnx.ModelProto:
    """The graph traced to `path`, its weights' copies merged, its constant plumbing folded (passes.runtime_folded)
    and the exporter's per-node metadata dropped. A decision graph is folded whole, so that the graph shipped (its
    decision outputs stripped afterwards) computes the logits with the nodes the decisions were checked on."""
    return strip_node_metadata(runtime_folded(dedupe_initializers(onnx.load(path))))


def save_checked(proto: onnx.ModelProto, path: str, name: Path) -> None:
    """Save `proto` to `path` once onnx.checker (full_check) passes it; a MoeError naming `name` if not."""
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise MoeError(f"{name}: exported graph fails onnx.checker ({str(e).splitlines()[0]})") from None
    onnx.save(proto, path)


def fp32_parity(job: Job, path: str, name: Path, step: bool, decisions_path: str | None,
                exclude: ParityReport | None, log) -> ParityReport:
    """The fp32 graph at `path` against the eager model, logged; a MoeError naming `name` if it fails."""
    report = check_parity(job.model, path, task=job.task, stepwise=step, decisions_path=decisions_path,
                          exclude=exclude if step else None)
    log(report.summary())
    if not report.ok:
        raise MoeError(f"{name}: parity check failed ({report.failure}); nothing was written")
    return report


def accuracy(job: Job, path: str) -> str:
    """The mean next-token loss of eager PyTorch and of the graph at `path` on the --eval-text windows, as a line."""
    eval_ids = job.eval_ids
    assert eval_ids is not None  # called only for a job with --eval-text
    eager_nll, onnx_nll = text_nll(job.model, eval_ids), text_nll(ort_session(path), eval_ids)
    return (f"accuracy on {job.eval_text} ({eval_ids.size:,} tokens): eager loss {eager_nll:.4f}, ONNX "
            f"{job.precision} loss {onnx_nll:.4f} (cost {onnx_nll - eager_nll:+.2e} nats/token)")


def weights_sha256(model: nn.Module) -> str:
    """sha256 of the model's weights (names, dtypes, shapes and bytes): ties a step graph to its unrolled graph."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, bf16 included
    return h.hexdigest()
