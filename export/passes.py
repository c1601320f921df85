"""Graph passes: pure ModelProto -> ModelProto rewrites of a traced graph. Each returns a new ModelProto and leaves
its argument as it was; each is exact (the graph computes the same outputs from the same inputs).
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import onnx
from onnx import numpy_helper

from moe_core.runtime.graph_contract import INITIALIZERS_SHA256, initializers_sha256

from .parity import DECISIONS_PREFIX


def copy_model(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


def strip_node_metadata(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Drop each node's metadata and doc string: the exporter's per-node stack traces and FX names are half the file
    and of no use to a runtime."""
    proto = copy_model(proto)
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    return proto


def with_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> onnx.ModelProto:
    """`proto` with exactly `metadata` as its metadata_props, in the dict's order."""
    proto = copy_model(proto)
    del proto.metadata_props[:]
    for k, v in metadata.items():
        proto.metadata_props.add(key=k, value=v)
    return proto


def with_graph_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> onnx.ModelProto:
    """with_metadata for a graph as the export writes it: `metadata` plus the sha256 of the graph's initializers
    (graph_contract.INITIALIZERS_SHA256), which serve verifies before it runs the graph."""
    return with_metadata(proto, {**metadata, INITIALIZERS_SHA256: initializers_sha256(proto)})


def dedupe_initializers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Merge byte-identical initializers (same type, shape and bytes) into the first of them, and point every node
    input at the one kept.

    The exporter constant-folds each use of a weight (e.g. the transpose inside every unrolled call of a Linear)
    into an initializer of its own, so an unrolled recursive model would store every weight
    H_cycles * (L_cycles + 1) * halt_max_steps times over.
    """
    proto = copy_model(proto)
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
        return proto
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    return proto


def remove_dead_nodes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the nodes none of whose outputs is used (by a node or as a graph output), repeatedly, then the
    initializers no node reads."""
    proto = copy_model(proto)
    graph = proto.graph
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
    return proto


def runtime_folded(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The graph after ONNX Runtime's basic optimisations, run once here and saved: constant folding (the exporter
    writes thousands of Constant, CastLike and shape-computing Cast / Reshape / Concat chains), redundant-node
    elimination and the exact node fusions. The result holds standard ONNX operators only, so it runs on any
    runtime; the hardware-specific levels (fused contrib kernels, layouts) still run when a session loads it, and
    they see a graph whose patterns are no longer split by constant plumbing. Exact: folding evaluates the same
    operators once, ahead of time. Weights a fold copies (a transposed weight per unrolled call) are merged again,
    and the opset imports are cut to the domains the graph uses."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="moe-fold-") as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = os.path.join(tmp, "folded.onnx")
        opts.log_severity_level = 3  # "can't constant fold CastLike": ORT expands the function op instead
        ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        folded = onnx.load(opts.optimized_model_filepath)
    used = {n.domain for n in folded.graph.node}
    imports = [o for o in folded.opset_import if o.domain in used or o.domain in ("", "ai.onnx")]
    del folded.opset_import[:]
    folded.opset_import.extend(imports)
    return dedupe_initializers(_named_by_source(folded, proto.graph))


def _named_by_source(folded: onnx.ModelProto, before: onnx.GraphProto) -> onnx.ModelProto:
    """Name each initializer a fold made after the stored weights it was computed from (a fold names it after the
    node output it replaces, e.g. `val_380`): `model.net.blocks.0.ffn.w_gate.folded3`. In place."""
    weights = {i.name for i in before.initializer}
    producer = {o: n for n in before.node for o in n.output}
    order = {id(n): i for i, n in enumerate(before.node)}
    rename: dict[str, str] = {}
    for init in folded.graph.initializer:
        if init.name in weights or init.name not in producer:
            continue
        sources = sorted({i for n in _computing(init.name, producer, order) for i in n.input if i in weights})
        if sources:
            rename[init.name] = init.name = f"{'+'.join(sources)}.folded{len(rename)}"
    for node in folded.graph.node:
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = rename[name]
    return folded


def has_decisions(proto: onnx.ModelProto) -> bool:
    """Whether the graph has decision outputs (a DecisionGraph's, export/trace.py)."""
    return any(o.name.startswith(DECISIONS_PREFIX) for o in proto.graph.output)


def strip_decisions(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Drop a DecisionGraph's decision outputs and the nodes and initializers only they needed."""
    proto = copy_model(proto)
    outputs = [o for o in proto.graph.output if not o.name.startswith(DECISIONS_PREFIX)]
    del proto.graph.output[:]
    proto.graph.output.extend(outputs)
    return remove_dead_nodes(proto)


def _computing(name: str, producer: dict[str, onnx.NodeProto], order: dict[int, int]) -> list[onnx.NodeProto]:
    """The nodes computing constant `name`, in graph order."""
    nodes, stack = {}, [name]
    while stack:
        v = stack.pop()
        if v in producer and id(producer[v]) not in nodes:
            nodes[id(producer[v])] = producer[v]
            stack.extend(i for i in producer[v].input if i)
    return sorted(nodes.values(), key=lambda n: order[id(n)])
