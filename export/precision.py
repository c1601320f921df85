"""Reduced-precision variants of an exported fp32 graph (moe export --precision)."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .choices import PRECISIONS
from .passes import with_graph_metadata

__all__ = ["PRECISIONS", "convert_precision", "to_bfloat16"]


# Ops a bf16 graph keeps in fp32 (between Casts): ONNX Runtime's CUDA provider has no bfloat16 kernel for the
# comparisons (routing and halting decide with them) and neither has its CPU provider.
BF16_FLOAT32_OPS = ["Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal"]


def convert_precision(path: str, precision: str, metadata: dict[str, str], keep_float32: bool | list[str] = True
                      ) -> None:
    """Rewrite the fp32 graph at `path` as `precision` ("fp16", "bf16" or "int8"), in place, with `metadata` and
    its precision as the graph's metadata.

    fp16 / bf16: weights and activations in half precision (for GPU serving); TopK / CumSum / Range stay fp32 (the
    fp16 converter's default block list), so routing still ranks in fp32. The float inputs and outputs stay float32
    (`keep_float32` True) or only those named (a decode graph made for CUDA keeps its KV cache in the graph's dtype,
    so that serving binds one buffer as past and present with no Cast between them). bf16 is the fp16 graph with
    every half-precision type made bfloat16 and its constants rounded from the fp32 values (to_bfloat16), its
    comparisons kept in fp32 (BF16_FLOAT32_OPS).
    int8: dynamic quantisation of the MatMul and Gemm weights that are initializers (a CPU speed-up). The export
    folds every weight's transpose or slice into an initializer (passes.runtime_folded), so that is every
    projection: attention, routers, experts under either MoE dispatch (sparse dispatch's per-expert slices
    included), the halt and output heads. The standard Attention op (opset 23) is left as it is: the quantiser would
    rewrite it as the contrib QAttention, a different operator with other attributes.
    """
    if precision in ("fp16", "bf16"):
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        fp32 = onnx.load(path)
        blocked = DEFAULT_OP_BLOCK_LIST + (BF16_FLOAT32_OPS if precision == "bf16" else [])
        proto = convert_float_to_float16(fp32, keep_io_types=keep_float32, op_block_list=blocked)
        if precision == "bf16":
            proto = to_bfloat16(proto, fp32)
    else:
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.registry import IntegerOpsRegistry

        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # "Please consider to run pre-processing" on the root logger, every call
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_dynamic(path, path, weight_type=QuantType.QInt8,
                                 op_types_to_quantize=[op for op in IntegerOpsRegistry if op != "Attention"])
        finally:
            logging.disable(previous)
        proto = onnx.load(path)
    onnx.save(with_graph_metadata(proto, {**metadata, "precision": precision}), path)


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values as bfloat16 bit patterns (uint16), rounded to nearest, ties to even; NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def _bf16_tensor(values: np.ndarray, name: str) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.BFLOAT16, dims=list(values.shape))
    t.raw_data = bfloat16_bits(values).tobytes()
    return t


def to_bfloat16(fp16: onnx.ModelProto, fp32: onnx.ModelProto) -> onnx.ModelProto:
    """The fp16 graph `fp16` (convert_float_to_float16 of `fp32`) with bfloat16 wherever it has float16: value types,
    Cast targets, and every half-precision constant, rounded once from its fp32 value in `fp32` (found by name) rather
    than from its fp16 rounding (which would also have clipped it to fp16's range)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(fp16)
    g = proto.graph
    originals = {t.name: t for t in fp32.graph.initializer}
    originals.update({o: a.t for n in fp32.graph.node if n.op_type == "Constant" for o in n.output
                      for a in n.attribute if a.name == "value"})

    def retyped(t: TensorProto, key: str) -> TensorProto:
        source = originals.get(key)
        values = numpy_helper.to_array(source if source is not None and source.data_type == TensorProto.FLOAT
                                       and list(source.dims) == list(t.dims) else t).astype(np.float32)
        return _bf16_tensor(values, t.name)

    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT16:
            g.initializer[i].CopyFrom(retyped(t, t.name))
    for v in (*g.input, *g.output, *g.value_info):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT16:
            v.type.tensor_type.elem_type = TensorProto.BFLOAT16
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT16:
                a.i = TensorProto.BFLOAT16
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT16:
                a.t.CopyFrom(retyped(a.t, n.output[0] if n.op_type == "Constant" else ""))
    return proto
