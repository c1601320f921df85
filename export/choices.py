"""The values `moe export` accepts. Torch- and onnx-free, so export/cli.py declares its options from them without
loading the exporter."""

from __future__ import annotations

DEFAULT_OPSET = 20
MIN_OPSET, MAX_OPSET = 18, 23  # the ONNX opsets the torch.onnx (dynamo) exporter writes this model's graph in
PRECISIONS = ("fp32", "fp16", "int8")  # the fp32 graph, or a variant converted from it (export/precision.py)
