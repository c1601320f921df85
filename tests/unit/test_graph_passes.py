"""The graph passes of export/passes.py on small hand-built ONNX graphs: each is pure (its argument is left as it
was) and exact (the rewritten graph computes the same outputs under ONNX Runtime)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.parity import DECISIONS_PREFIX
from export.passes import (
    dedupe_initializers,
    has_decisions,
    remove_dead_nodes,
    runtime_folded,
    strip_decisions,
    strip_node_metadata,
    with_metadata,
)
from moe_core.runtime.ort_session import ort_session

OPSET = 20
FLOAT = TensorProto.FLOAT


def model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    proto = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializers),
                              opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(proto, full_check=True)
    return proto


def tensor(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, FLOAT, shape)


def init(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def run(proto: onnx.ModelProto, **feeds) -> list[np.ndarray]:
    return ort_session(proto.SerializeToString()).run(None, feeds)


def unchanged(before: bytes, proto: onnx.ModelProto) -> bool:
    return proto.SerializeToString() == before


RNG = np.random.default_rng(0)
X = RNG.standard_normal((3, 4)).astype(np.float32)


def test_dedupe_merges_identical_initializers_and_rewires_their_inputs():
    w = RNG.standard_normal((4, 4))
    proto = model([helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("MatMul", ["a", "w2"], ["b"]),
                   helper.make_node("Add", ["b", "w3"], ["y"])],
                  [tensor("x", [3, 4])], [tensor("y", [3, 4])],
                  [init("w1", w), init("w2", w), init("w3", w[0] + 1)])
    before = proto.SerializeToString()
    out = dedupe_initializers(proto)
    assert unchanged(before, proto)
    assert [i.name for i in out.graph.initializer] == ["w1", "w3"]
    assert [list(n.input) for n in out.graph.node] == [["x", "w1"], ["a", "w1"], ["b", "w3"]]
    onnx.checker.check_model(out, full_check=True)
    np.testing.assert_array_equal(run(out, x=X)[0], run(proto, x=X)[0])


def test_dedupe_keeps_initializers_of_equal_bytes_but_other_shapes():
    proto = model([helper.make_node("Add", ["x", "a"], ["s"]), helper.make_node("Add", ["s", "b"], ["t"]),
                   helper.make_node("Add", ["t", "c"], ["y"])],
                  [tensor("x", [4])], [tensor("y", [1, 4])],
                  [init("a", np.zeros(4)), init("b", np.zeros((1, 4))), init("c", np.zeros(4))])
    out = dedupe_initializers(proto)
    assert [i.name for i in out.graph.initializer] == ["a", "b"]
    assert [list(n.input) for n in out.graph.node] == [["x", "a"], ["s", "b"], ["t", "a"]]


def test_remove_dead_nodes_drops_unused_nodes_and_initializers():
    proto = model([helper.make_node("Relu", ["x"], ["dead1"]), helper.make_node("Add", ["dead1", "c"], ["dead2"]),
                   helper.make_node("Add", ["x", "b"], ["y"])],
                  [tensor("x", [3, 4])], [tensor("y", [3, 4])],
                  [init("b", np.ones(4)), init("c", np.ones(4) * 2), init("unused", np.ones(2))])
    before = proto.SerializeToString()
    out = remove_dead_nodes(proto)
    assert unchanged(before, proto)
    assert [n.output[0] for n in out.graph.node] == ["y"]
    assert [i.name for i in out.graph.initializer] == ["b"]
    np.testing.assert_array_equal(run(out, x=X)[0], X + 1)


def test_strip_decisions_drops_the_decision_outputs_and_what_only_they_used():
    decision = f"{DECISIONS_PREFIX}0_experts"
    proto = model([helper.make_node("Add", ["x", "b"], ["h"]), helper.make_node("Relu", ["h"], ["y"]),
                   helper.make_node("Mul", ["h", "s"], ["scaled"]),  # used by the decision only
                   helper.make_node("ArgMax", ["scaled"], [decision], axis=-1)],
                  [tensor("x", [3, 4])],
                  [tensor("y", [3, 4]), helper.make_tensor_value_info(decision, TensorProto.INT64, [3, 1])],
                  [init("b", np.ones(4)), init("s", np.full(4, 3.0))])
    assert has_decisions(proto)
    before = proto.SerializeToString()
    out = strip_decisions(proto)
    assert unchanged(before, proto)
    assert not has_decisions(out)
    assert [o.name for o in out.graph.output] == ["y"]
    assert [n.op_type for n in out.graph.node] == ["Add", "Relu"]
    assert [i.name for i in out.graph.initializer] == ["b"]
    onnx.checker.check_model(out, full_check=True)
    np.testing.assert_array_equal(run(out, x=X)[0], run(proto, x=X)[0])


@pytest.mark.parametrize("op", ["Gather", "Slice"])
def test_runtime_folded_makes_the_slice_an_initializer_with_identical_results(op):
    """A Gather / Slice of a stored [E, D, F] weight (one expert's block, as sparse dispatch takes it) feeding a
    MatMul becomes an initializer of its own, named after what it was computed from (so dynamic int8 quantisation
    finds it); a MatMul whose weight is an initializer is left as it is."""
    stored = RNG.standard_normal((3, 4, 5)).astype(np.float32)
    dense = RNG.standard_normal((5, 2)).astype(np.float32)
    if op == "Gather":
        take = [helper.make_node("Gather", ["stored", "expert"], ["w"], axis=0)]
        constants = [numpy_helper.from_array(np.array(1, dtype=np.int64), "expert")]
    else:
        take = [helper.make_node("Slice", ["stored", "start", "end", "axis"], ["w3"]),
                helper.make_node("Squeeze", ["w3", "axis"], ["w"])]
        constants = [numpy_helper.from_array(np.array([v], dtype=np.int64), n)
                     for n, v in (("start", 1), ("end", 2), ("axis", 0))]
    proto = model([*take, helper.make_node("MatMul", ["x", "w"], ["h"]),
                   helper.make_node("MatMul", ["h", "dense"], ["y"])],
                  [tensor("x", [3, 4])], [tensor("y", [3, 2])],
                  [init("stored", stored), init("dense", dense), *constants])
    before = proto.SerializeToString()
    out = runtime_folded(proto)
    assert unchanged(before, proto)
    assert [n.op_type for n in out.graph.node] == ["MatMul", "MatMul"]
    folded = out.graph.node[0].input[1]
    # Named after the initializers it was computed from (here the weight and the indices), which are dropped.
    assert folded == "+".join(sorted(["stored", *(c.name for c in constants)])) + ".folded0"
    assert out.graph.node[1].input[1] == "dense"
    assert sorted(i.name for i in out.graph.initializer) == sorted(["dense", folded])
    np.testing.assert_array_equal(numpy_helper.to_array(next(i for i in out.graph.initializer if i.name == folded)),
                                  stored[1])
    onnx.checker.check_model(out, full_check=True)
    np.testing.assert_array_equal(run(out, x=X)[0], run(proto, x=X)[0])


def test_runtime_folded_folds_one_computation_once():
    """Two MatMuls whose weights are the same slice of the same initializer share one folded initializer."""
    stored = RNG.standard_normal((2, 4, 4)).astype(np.float32)
    index = numpy_helper.from_array(np.array(0, dtype=np.int64))
    proto = model([helper.make_node("Constant", [], ["i"], value=index),  # the index a node, not an initializer
                   helper.make_node("Gather", ["stored", "i"], ["w1"], axis=0),
                   helper.make_node("Gather", ["stored", "i"], ["w2"], axis=0),
                   helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])],
                  [tensor("x", [3, 4])], [tensor("y", [3, 4])],
                  [init("stored", stored)])
    out = runtime_folded(proto)
    assert [n.input[1] for n in out.graph.node] == ["stored.folded0", "stored.folded0"]
    assert [i.name for i in out.graph.initializer] == ["stored.folded0"]
    np.testing.assert_allclose(run(out, x=X)[0], run(proto, x=X)[0], rtol=0, atol=0)


def test_metadata_passes():
    proto = model([helper.make_node("Relu", ["x"], ["y"], doc_string="stack trace")],
                  [tensor("x", [3, 4])], [tensor("y", [3, 4])], [])
    proto.graph.node[0].metadata_props.add(key="pkg.torch.onnx.fx_node", value="relu")
    proto.metadata_props.add(key="old", value="1")
    before = proto.SerializeToString()
    stripped = strip_node_metadata(proto)
    assert stripped.graph.node[0].doc_string == "" and len(stripped.graph.node[0].metadata_props) == 0
    meta = with_metadata(proto, {"b": "2", "a": "1"})
    assert [(p.key, p.value) for p in meta.metadata_props] == [("b", "2"), ("a", "1")]
    assert unchanged(before, proto)
