"""ONNX Runtime side of `moe serve`: open an exported model, check it is what `moe export` wrote, run batches.

Execution providers
-------------------
`--provider auto` takes CUDA when this onnxruntime build lists CUDAExecutionProvider *and* the session really
got it (ORT silently falls back to CPU when the CUDA/cuDNN libraries are missing, so `sess.get_providers()` is
checked after creation); otherwise CPU. `--provider cuda` without CUDA is an error, `--provider cpu` never tries.
The decision is two pure functions, `choose_providers` and `resolve_provider`, unit-tested with fake lists.

CUDA runs with `use_tf32=0` (the CUDA EP enables TF32 by default; PyTorch fp32 matmuls do not, and parity is
stated for fp32) and with IO binding: inputs are bound from host memory, outputs are allocated on the device and
copied back once per batch. What comes back is small, because the session's graph is the exported graph plus
the reductions serving needs (serve/graph.py): per-token log-probs [B, T-1] for scoring and the last valid
position's logits [B, V] for generation. The full [B, T, V] logits stay on the device as an intermediate.
The CPU session runs through the same IO-binding code, so the tests exercise it; only the device name differs.
The decode graph's KV cache lives in buffers bound as each call's past input and present output at once, so
attention writes them in place: host arrays on the CPU, OrtValues on the device on CUDA (moe_core/runtime/decoding.py
DeviceBuffers; the tests run them on the CPU device). Its serving outputs (serve/graph.py) are the last logits [B, V]
and the greedy token [B]: greedy decoding brings back token ids only.

On CUDA a session reads ONNX Runtime's own placement (moe_core/runtime/ort_session.py session_with_placement): nodes per
provider and Memcpy nodes go into the header, and a graph that runs partly on the CPU, or was made for another
device, gets a note naming what to re-export. A decode graph made for CUDA (`moe export --device cuda`) has every
node on CUDA, so its session enables CUDA graphs and its decoding calls run with static shapes, one captured graph
per batch bucket (moe_core/runtime/decoding.py); a step graph's carry stays on the device between steps (StepwiseModel).

Runtimes
--------
`open_model` gives an `OrtModel` of the unrolled graph (every halting step for every sample) or, for a model
exported with `moe export --stepwise`, a `StepwiseModel`: its step graph MODEL.step.onnx run one supervision step at
a time with halted samples dropped from the batch (moe_core/runtime/stepwise.py) — same `run`, same results. The step
graph must come from the same export (weights sha256, precision, tokenizer and halt_max_steps in both files' metadata).
fp32 results are equal (halt steps exactly, outputs within fp32 noise). Reduced precision agrees within its own noise
only: fp16 graphs pass the carry between steps in fp32 (kept float32 I/O), and int8 graphs quantise activations per
batch, which changes as samples leave it (figures: benchmarks/RESULTS.md).

Verifying the CUDA path on a GPU machine (it cannot run on the CPU-only CI, which proves placement instead:
tests/e2e/test_cuda_placement.py): `make gpu-check` (benchmarks/gpu_check.py).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moe_core.common.errors import MoeError
from moe_core.common.formats import check_format
from moe_core.common.jsonl import json_error, json_type, parse_json
from moe_core.common.tokenizer import read_tokenizer
from moe_core.config import MAX_CYCLES
from moe_core.runtime.decoding import Decoder, DeviceBuffers
from moe_core.runtime.graph_contract import (
    CACHE_ENTRIES,
    CACHE_LAYOUT,
    DECODE_INPUTS,
    DECODE_OUTPUTS,
    DEVICE,
    GRAPH_IO,
    INITIALIZERS_SHA256,
    METADATA_KEYS,
    SERVE_MAX_STEPS,
    STEP_SUFFIX,
    initializers_sha256,
    past_names,
    read_step_metadata,
    task_of,
)
from moe_core.runtime.ort_session import (
    CPU_EP,
    CUDA_EP,
    Placement,
    intra_op_threads,
    ort_session,
    run_bound,
    run_bound_values,
    session_with_placement,
)
from moe_core.runtime.stepwise import CARRY_OUT, StepCounts, run_stepwise
from moe_core.tasks import TASKS

from .graph import LAST_LOGITS, NEXT_TOKEN, add_decode_outputs, add_serving_outputs

PROVIDER_CHOICES = ("auto", "cuda", "cpu")
# fp32 parity with eager PyTorch: no TF32 matmuls (the CUDA EP's default is TF32 on).
CUDA_OPTIONS = {"use_tf32": "0"}

RUNTIMES = ("auto", "unrolled", "stepwise")


# -----------------------------------------------------------------------------
# execution providers (pure: unit-tested with fake provider lists)


def choose_providers(requested: str, available: list[str]) -> list[Any]:
    """The `providers=` list for InferenceSession, given --provider and ort.get_available_providers()."""
    if requested not in PROVIDER_CHOICES:
        raise MoeError(f"--provider: expected one of {', '.join(PROVIDER_CHOICES)}, got {requested!r}")
    if requested == "cuda" and CUDA_EP not in available:
        raise MoeError(f"--provider cuda: this onnxruntime has no {CUDA_EP} (available: {', '.join(available)}); "
                       "install onnxruntime-gpu (pip install \"moe[gpu]\") on a CUDA machine, or use --provider cpu")
    if requested != "cpu" and CUDA_EP in available:
        return [(CUDA_EP, dict(CUDA_OPTIONS)), CPU_EP]
    return [CPU_EP]


def resolve_provider(requested: str, tried: list[Any], session_providers: list[str]) -> tuple[str, str | None]:
    """("cuda" | "cpu", a note for the user or None), from the providers the session actually got: ORT falls
    back to CPU silently when the CUDA libraries are missing. `tried` is what choose_providers returned."""
    if session_providers and session_providers[0] == CUDA_EP:
        return "cuda", None
    wanted_cuda = any(p[0] == CUDA_EP for p in tried if isinstance(p, tuple))
    if requested == "cuda":
        raise MoeError(f"--provider cuda: onnxruntime lists {CUDA_EP} but the session fell back to "
                       f"{', '.join(session_providers) or 'nothing'} (CUDA 13 / cuDNN 9 libraries not found?)")
    if wanted_cuda:
        return "cpu", f"{CUDA_EP} is listed but could not be used (CUDA 13 / cuDNN 9 libraries not found?)"
    return "cpu", None


# -----------------------------------------------------------------------------
# the model file and its tokenizer


@dataclass
class ModelInfo:
    path: Path
    tokenizer_path: Path
    vocab_size: int
    max_seq_len: int
    halt_max_steps: int
    moe_version: str
    config: dict[str, Any]  # the run's full config: {"model": {...}, "train": {...}}
    tokenizer_sha256: str
    precision: str  # "fp32", or the reduced-precision variant `moe export --precision` wrote
    task: str  # "lm" (score, generate) or "sudoku" (solve)
    graph: str = "unrolled"  # or "step": one supervision step (`moe export --stepwise`)
    step_graph: str | None = None  # an unrolled graph's step graph, a file name beside it (when exported)
    decode_graph: str | None = None  # an unrolled graph's decode graph, likewise
    cache_entries: int | None = None  # a decode graph's past/present pairs
    weights_sha256: str | None = None  # of the weights both graphs of one export were traced from
    device: str = "cpu"  # the device the graph was made for (`moe export --device`)
    serve_max_steps: int | None = None  # the steps the run validated for serving (graph_contract.SERVE_MAX_STEPS)


def read_model(path: str | os.PathLike, graph: str = "unrolled") -> tuple[Any, ModelInfo]:
    """(onnx.ModelProto, ModelInfo) of an exported model, the unrolled graph or a step graph; MoeError naming the
    file for anything unexpected."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise MoeError(f"{path}: model file not found" if not path.exists() else f"{path}: not a file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError, OSError, ...
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise MoeError(f"{path}: not an ONNX model ({reason})") from None
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise MoeError(f"{path}: the model refers to external data files; expected the single-file model "
                       "`moe export` writes")
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    meta = {p.key: p.value for p in proto.metadata_props}
    if INITIALIZERS_SHA256 in meta and initializers_sha256(proto) != meta[INITIALIZERS_SHA256]:
        raise MoeError(f"{path}: its weights differ from those `moe export` wrote (sha256 of the initializers does "
                       "not match metadata initializers_sha256): the file is corrupt or was edited; export it again")
    if graph == "unrolled" and meta.get("graph") == "step":
        raise MoeError(f"{path}: a step graph (`moe export --stepwise`); serve the model it belongs to "
                       f"({path.name.removesuffix(STEP_SUFFIX)}.onnx), which runs it with --runtime stepwise")
    want_in: tuple[str, ...]
    want_out: tuple[str, ...]
    if graph == "decode":
        entries = meta.get(CACHE_ENTRIES, "")
        if not (entries.isascii() and entries.isdigit() and 0 < int(entries) < 10**6):
            raise MoeError(f"{path}: malformed metadata {CACHE_ENTRIES}: expected a positive integer, got "
                           f"{entries[:40]!r} (expected a decode graph written by `moe export`)")
        want_in, want_out = (*DECODE_INPUTS, *past_names(int(entries))), DECODE_OUTPUTS
    else:
        want_in, want_out = GRAPH_IO[graph]
    if sorted(inputs) != sorted(want_in) or not set(want_out) <= set(outputs):
        what = {"step": "step graph", "decode": "decode graph"}.get(graph, "model")
        raise MoeError(f"{path}: not a `moe export` {what}: expected inputs "
                       f"{', '.join(want_in)} and outputs {', '.join(want_out)}, found inputs [{', '.join(inputs)}] "
                       f"outputs [{', '.join(outputs)}]")
    if graph == "decode" and meta.get("cache_layout") != CACHE_LAYOUT:
        raise MoeError(f"{path}: a decode graph of another cache layout (metadata cache_layout "
                       f"{meta.get('cache_layout', 'missing')!r:.40}, expected {CACHE_LAYOUT!r}); export the model "
                       f"again with this version of `moe export`")
    missing = [k for k in METADATA_KEYS if k not in meta]
    if missing:
        raise MoeError(f"{path}: missing metadata {', '.join(missing)} (expected a model written by `moe export`)")
    try:
        version = int(meta.get("format_version", "1"))  # models exported before the field existed: format 1
    except ValueError:
        version = meta["format_version"]
    check_format(version, meta["moe_version"], path)
    sizes = {}
    for key in ("vocab_size", "max_seq_len", "halt_max_steps"):
        value = meta[key].strip()
        if not (value.isascii() and value.isdigit() and len(value) < 10 and int(value) >= 1):
            raise MoeError(f"{path}: malformed metadata {key}: expected a positive integer, got {value[:40]!r}")
        sizes[key] = int(value)
    try:
        config = parse_json(meta["config"])
    except ValueError as e:
        raise MoeError(f"{path}: malformed metadata config: invalid JSON ({json_error(e)})") from None
    if not isinstance(config, dict):
        raise MoeError(f"{path}: malformed metadata config: expected a JSON object, got a JSON {json_type(config)}")
    tok_name = file_beside(meta, "tokenizer_file", path)
    assert tok_name is not None  # tokenizer_file is one of METADATA_KEYS, present (checked above)
    task = meta.get("task", task_of(config))  # files exported before the key existed: the run config's
    if task not in TASKS:
        raise MoeError(f"{path}: malformed metadata task: expected one of {', '.join(TASKS)}, got {str(task)[:40]!r}")
    spec = TASKS[task]
    info = ModelInfo(path, path.with_name(tok_name), sizes["vocab_size"], sizes["max_seq_len"],
                     sizes["halt_max_steps"], meta["moe_version"], config, meta["tokenizer_sha256"],
                     meta.get("precision", "fp32"), task, graph, step_graph=file_beside(meta, "step_graph", path),
                     weights_sha256=meta.get("weights_sha256"),
                     decode_graph=file_beside(meta, "decode_graph", path), device=meta.get(DEVICE, "cpu"),
                     serve_max_steps=serve_max_steps_of(meta, path),
                     cache_entries=int(meta[CACHE_ENTRIES]) if graph == "decode" else None)
    logits = next(o for o in proto.graph.output if o.name == "logits")
    dims = logits.type.tensor_type.shape.dim
    if dims and (len(dims) != 3 or (dims[2].HasField("dim_value") and dims[2].dim_value != info.vocab_size)):
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
        raise MoeError(f"{path}: output logits has shape {shape}; expected [batch, seq, {info.vocab_size}] "
                       "(the metadata's vocab_size)")
    problem = spec.graph_problem(info.vocab_size, info.max_seq_len, meta["causal"])
    if problem is not None:
        raise MoeError(f"{path}: {problem}")
    return proto, info


def file_beside(meta: dict[str, str], key: str, path: Path) -> str | None:
    """A metadata value naming a file beside the model (None when the key is absent); MoeError for a path."""
    name = meta.get(key)
    if name is not None and (Path(name).name != name or name in ("", ".", "..")):
        raise MoeError(f"{path}: metadata {key} must be a file name beside the model, got {name[:80]!r}")
    return name


def load_tokenizer(info: ModelInfo):
    """The tokenizer beside the model, checked against the model's tokenizer_sha256 and vocabulary size."""
    text, tok = read_tokenizer(info.tokenizer_path, info.vocab_size, owner=f"the model {info.path.name}")
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if sha != info.tokenizer_sha256:
        raise MoeError(f"{info.tokenizer_path}: tokenizer does not match the model {info.path.name} (sha256 "
                       f"{sha[:12]}…, the model expects {info.tokenizer_sha256[:12]}…)")
    return tok


# -----------------------------------------------------------------------------
# the session


class OrtModel:
    """An ONNX Runtime session of an exported model (plus the serving outputs) on the chosen provider: the unrolled
    graph, which runs every halting step (`run`), or a step graph (`run_feeds`, used by StepwiseModel)."""

    runtime = "unrolled"

    def __init__(self, path: str | os.PathLike, provider: str = "auto", threads: int | None = None,
                 graph: str = "unrolled", loaded: tuple[Any, ModelInfo] | None = None) -> None:
        import onnxruntime as ort

        proto, self.info = loaded or read_model(path, graph)
        self.tokenizer = load_tokenizer(self.info)
        if graph == "decode":
            add_decode_outputs(proto, self.tokenizer.get_vocab_size())
        else:
            add_serving_outputs(proto)
        available = ort.get_available_providers()
        providers = choose_providers(provider, available)
        if CUDA_EP in available and provider != "cpu" and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA / cuDNN from the pip nvidia-* packages, when that is how they were installed
        self.threads = intra_op_threads(threads)
        self.placement: Placement | None = None  # where ONNX Runtime put the nodes, when CUDA was tried
        # A decode graph made for CUDA runs its decoding calls as captured CUDA graphs (moe_core/runtime/decoding.py
        # static shapes); ONNX Runtime refuses a session with them when any node is off CUDA, which such a graph has
        # not.
        self.cuda_graphs = graph == "decode" and self.info.device == "cuda" and providers[0] != CPU_EP
        if self.cuda_graphs:
            providers = [(providers[0][0], {**providers[0][1], "enable_cuda_graph": "1"}), *providers[1:]]
        try:
            if providers[0] == CPU_EP:
                self.session = ort_session(proto.SerializeToString(), self.threads, providers)
            else:
                self.session, self.placement = session_with_placement(proto.SerializeToString(), self.threads,
                                                                      providers)
        except Exception as e:  # ORT raises its own exception types for invalid graphs
            raise MoeError(f"{self.info.path}: ONNX Runtime cannot load the model ({str(e).splitlines()[0]})") from None
        self.provider, self.note = resolve_provider(provider, providers, self.session.get_providers())
        self.cuda_graphs = self.cuda_graphs and self.provider == "cuda"
        self.note = "; ".join(filter(None, [self.note, device_note(self.info, self.provider, self.placement)]))
        self.counts = StepCounts()

    def describe(self) -> str:
        if self.provider == "cuda":
            where = f"; {self.placement.summary()}" if self.placement is not None else ""
            graphs = ", decoding as CUDA graphs" if self.cuda_graphs else ""
            return f"cuda (CUDAExecutionProvider, tf32 off, IO binding{graphs}{where})"
        return f"cpu (CPUExecutionProvider, {self.threads} threads, idle workers sleep)"

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        """Run one right-padded batch (int64 [B, T] each) and return the named outputs as host arrays."""
        self.counts.calls += 1
        self.counts.rows += len(input_ids) * self.info.halt_max_steps  # every step, for every row
        self.counts.full = self.counts.rows
        return self.run_feeds({"input_ids": input_ids, "attention_mask": attention_mask}, outputs)

    def run_feeds(self, feeds: dict[str, Any], outputs: list[str], into: dict[str, Any] | None = None,
                  graph: int = -1) -> list[np.ndarray]:
        """The named outputs for these inputs, as host arrays; outputs in `into` written into the buffers given
        (moe_core/runtime/ort_session.py run_bound). IO binding on every provider, so CI exercises the code the CUDA
        path runs: on the CPU the outputs are ONNX Runtime's buffers, not copies (copying a decoding call's outputs cost
        as much as the call itself at batch 32: benchmarks/RESULTS.md). `graph`: a CUDA graph id (run_bound)."""
        return self.guarded(run_bound, feeds, outputs, into, self.provider, graph)

    def run_values(self, feeds: dict[str, Any], outputs: list[str]) -> list[Any]:
        """The named outputs left on the session's device, as OrtValues (run_bound_values)."""
        return self.guarded(run_bound_values, feeds, outputs, self.provider)

    def guarded(self, run, feeds: dict[str, Any], *args: Any) -> Any:
        """`run(session, feeds, *args)`, with an error of ONNX Runtime's (a graph or metadata that does not fit the
        inputs it was given) as one line naming the model and the inputs."""
        try:
            return run(self.session, feeds, *args)
        except MoeError:
            raise
        except Exception as e:  # ONNX Runtime's own exception types
            shapes = ", ".join(f"{k} {list(_shape(v))}" for k, v in feeds.items() if not k.startswith("past_"))
            reason = " ".join(str(e).split())[:300]
            raise MoeError(f"{self.info.path}: ONNX Runtime cannot run it on {shapes} ({reason})") from None


def serve_max_steps_of(meta: dict[str, str], path: Path) -> int | None:
    """Metadata SERVE_MAX_STEPS as a step count (None when absent); MoeError naming the file when malformed."""
    value = meta.get(SERVE_MAX_STEPS)
    if value is None:
        return None
    if not (value.isascii() and value.isdigit() and 1 <= int(value) <= MAX_CYCLES):
        raise MoeError(f"{path}: malformed metadata {SERVE_MAX_STEPS}: expected a step count in 1..{MAX_CYCLES}, got "
                       f"{value[:40]!r}")
    return int(value)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape() if callable(getattr(value, "shape", None)) else np.shape(value))


def device_note(info: ModelInfo, provider: str, placement: Placement | None) -> str:
    """What the user should know when a graph runs on another device than it was made for, or runs partly off CUDA
    (ONNX Runtime's own placement: moe_core/runtime/ort_session.py); "" when nothing."""
    again = f"export it again with `moe export RUN --out {info.path.name} --device {provider}`"
    if provider == "cuda" and placement is not None and not placement.clean:
        made = f" (it was made for {info.device}: {again})" if info.device != "cuda" else ""
        return (f"{info.path.name} runs partly on the CPU: {placement.summary()}; each Memcpy node copies activations "
                f"to the host and back in every forward, and CUDA graphs cannot be captured{made}")
    if provider != info.device:
        return f"{info.path.name} was made for {info.device}, this session runs on {provider}: {again}"
    return ""


class StepwiseModel:
    """The step graph of an exported model, run step by step with halted samples dropped from the batch
    (moe_core/runtime/stepwise.py): the same `run` and results as the unrolled graph's OrtModel, less compute when
    samples halt early. On CUDA the carry stays on the device between steps, the running rows gathered there
    (moe_core/runtime/decoding.py DeviceBuffers); only the per-sample outputs and the halt logits come to the host."""

    runtime = "stepwise"

    def __init__(self, info: ModelInfo, step: OrtModel, max_steps: int | None = None, halting: bool = True) -> None:
        s = step.info
        for what, mine, theirs in (("weights", info.weights_sha256, s.weights_sha256),
                                   ("precision", info.precision, s.precision),
                                   ("halt_max_steps", info.halt_max_steps, s.halt_max_steps),
                                   ("tokenizer", info.tokenizer_sha256, s.tokenizer_sha256)):
            if mine is None or mine != theirs:
                raise MoeError(f"{s.path}: the step graph does not belong to {info.path.name} ({what} differ); "
                               "export both again with `moe export RUN --stepwise`")
        self.info, self.step = info, step
        self.tokenizer, self.provider, self.note = step.tokenizer, step.provider, step.note
        z_H, z_L, exported = read_step_metadata(step.session.get_modelmeta().custom_metadata_map, s.path)
        # The steps share their weights, so the step graph runs as many as asked (more than the model was trained
        # and exported with: `moe eval` measures what they buy).
        self.n_steps = max_steps or exported
        self.halting = halting
        self.z_init = (z_H, z_L)
        self.counts = StepCounts()
        self.carry = DeviceBuffers(step.provider, step.session.get_providers()) if step.provider != "cpu" else None

    def describe(self) -> str:
        return f"{self.step.describe()}, step-wise ({self.step.info.path.name})"

    def _step(self, feeds: dict[str, Any], names: list[str]) -> list[Any]:
        """One step: the carry left where the session computed it when it is kept on a device (self.carry)."""
        if self.carry is None:
            return self.step.run_feeds(feeds, names)
        values = self.step.run_values(feeds, names)
        return [v if n in CARRY_OUT else v.numpy() for n, v in zip(names, values, strict=True)]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        """Run one right-padded batch (int64 [B, T] each) and return the named outputs as host arrays."""
        return run_stepwise(self._step, self.z_init, self.n_steps, input_ids, attention_mask, outputs,
                            self.counts, self.halting, self.carry)


def open_model(path: str | os.PathLike, provider: str = "auto", threads: int | None = None,
               runtime: str = "auto", max_steps: int | None = None, halting: bool = True) -> OrtModel | StepwiseModel:
    """The exported model at `path` on ONNX Runtime. runtime "unrolled": its graph; "stepwise": its step graph
    (written beside it by `moe export --stepwise`; an error when there is none); "auto": the step graph when the
    model has one, else the unrolled graph. max_steps (run up to this many steps instead of the exported
    halt_max_steps; None: the steps the run validated, metadata SERVE_MAX_STEPS, on the step graph when it has one)
    and halting=False (every sample runs every step) need the step graph."""
    if runtime not in RUNTIMES:
        raise MoeError(f"--runtime: expected one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if max_steps is not None and not 1 <= max_steps <= MAX_CYCLES:
        raise MoeError(f"--max-steps: expected 1..{MAX_CYCLES}, got {max_steps}")
    steps_option = max_steps is not None or not halting
    if steps_option:
        if runtime == "unrolled":
            raise MoeError("--max-steps / --no-halt: the unrolled graph runs its exported steps with halting as "
                           "they are; use the step graph (--runtime stepwise, from `moe export --stepwise`)")
        runtime = "stepwise"
    if runtime == "unrolled":
        return OrtModel(path, provider, threads)  # the exported steps: what --runtime unrolled asks for
    proto, info = read_model(path)
    step = info.path.with_name(info.step_graph) if info.step_graph else None
    asked = "--max-steps / --no-halt" if steps_option else "--runtime stepwise"
    if runtime == "stepwise":
        if step is None:
            raise MoeError(f"{info.path}: {asked} needs the model's step graph, and it was exported without one; "
                           "export it with `moe export RUN --out MODEL.onnx --stepwise`")
        if not step.exists():
            fallback = "" if steps_option else ", or serve with --runtime unrolled"
            raise MoeError(f"{step}: step graph not found (the model {info.path.name} was exported with it; copy it "
                           f"beside the model{fallback})")
    if runtime == "auto" and (step is None or not step.exists()):
        model = OrtModel(path, provider, threads, loaded=(proto, info))
        if step is not None:
            missing = f"step graph {step.name} not found: running the unrolled graph (every halting step)"
            model.note = f"{model.note}; {missing}" if model.note else missing
        if info.serve_max_steps is not None:
            validated = (f"the run validated {info.serve_max_steps} steps, which need the step graph (`moe export "
                         "--stepwise`); running the exported ones")
            model.note = f"{model.note}; {validated}" if model.note else validated
        return model
    if max_steps is None and info.serve_max_steps is not None:
        max_steps = info.serve_max_steps  # what the run validated (graph_contract.SERVE_MAX_STEPS); --max-steps wins
    assert step is not None  # "stepwise" without a step graph raised above, "auto" without one returned
    return StepwiseModel(info, OrtModel(step, provider, threads, graph="step"), max_steps, halting)


def open_decoder(info: ModelInfo, provider: str = "auto", threads: int | None = None) -> tuple[Decoder | None, str]:
    """The decode graph of the model `info` describes, ready to generate with (moe_core/runtime/decoding.py), or None
    with the reason: the model was exported without one, or it is missing beside the model."""
    if not info.decode_graph:
        return None, "no decode graph (exported without one)"
    path = info.path.with_name(info.decode_graph)
    if not path.exists():
        return None, f"decode graph {path.name} not found: generating without the cache"
    proto, d = read_model(path, "decode")
    assert d.cache_entries is not None  # read_model sets it for every decode graph
    for what, mine, theirs in (("weights", info.weights_sha256, d.weights_sha256),
                               ("precision", info.precision, d.precision),
                               ("tokenizer", info.tokenizer_sha256, d.tokenizer_sha256)):
        if mine is None or mine != theirs:  # before anything the foreign graph names (its tokenizer) is looked for
            raise MoeError(f"{path}: the decode graph does not belong to {info.path.name} ({what} differ); export "
                           "both again with `moe export`")
    model = OrtModel(path, provider, threads, graph="decode", loaded=(proto, d))
    cfg = info.config.get("model", {}) if isinstance(info.config, dict) else {}
    heads, d_model = cfg.get("n_heads"), cfg.get("d_model")
    if not (isinstance(heads, int) and isinstance(d_model, int) and heads > 0 and d_model % heads == 0):
        raise MoeError(f"{info.path}: metadata config lacks model.n_heads / model.d_model (needed for the cache)")
    # Host buffers on the CPU: the session binds numpy arrays without a copy, and row changes are plain indexing.
    buffers = DeviceBuffers(model.provider, model.session.get_providers()) if model.provider != "cpu" else None
    cache_type = next(i.type for i in model.session.get_inputs() if i.name == past_names(1)[0])
    graphs = ", decoding calls as CUDA graphs per batch bucket" if model.cuda_graphs else ""
    return Decoder(model.run_feeds, d.cache_entries, heads, d_model // heads, info.max_seq_len,
                   f"KV cache ({path.name}, {d.cache_entries} block applications, buffers of {info.max_seq_len} "
                   f"on {model.provider}{graphs})", buffers, cache_type, last_output=LAST_LOGITS,
                   token_output=NEXT_TOKEN, static=model.cuda_graphs, vocab_size=info.vocab_size), ""
