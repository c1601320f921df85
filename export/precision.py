"""Reduced-precision variants of an exported fp32 graph (moe export --precision)."""

from __future__ import annotations

import logging
import warnings

import onnx

from .choices import PRECISIONS
from .passes import with_metadata

__all__ = ["PRECISIONS", "convert_precision"]


def convert_precision(path: str, precision: str, metadata: dict[str, str]) -> None:
    """Rewrite the fp32 graph at `path` as `precision` ("fp16" or "int8"), in place, with `metadata` and its
    precision as the graph's metadata.

    fp16: weights and activations in half precision (for GPU serving); inputs and outputs stay int64 /
    float32, and TopK / CumSum / Range stay fp32 (the converter's default block list), so routing still
    ranks in fp32. int8: dynamic quantisation of the MatMul and Gemm weights that are initializers (a CPU
    speed-up). The export folds every weight's transpose or slice into an initializer (passes.runtime_folded), so
    that is every projection: attention, routers, experts under either MoE dispatch (sparse dispatch's per-expert
    slices included), the halt and output heads. The standard Attention op (opset 23) is left as it is:
    the quantiser would rewrite it as the contrib QAttention, a different operator with other attributes.
    """
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        proto = convert_float_to_float16(onnx.load(path), keep_io_types=True)
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
    onnx.save(with_metadata(proto, {**metadata, "precision": precision}), path)
