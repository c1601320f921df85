"""The values `moe export` accepts. Torch- and onnx-free, so export/cli.py declares its options from them without
loading the exporter."""

from __future__ import annotations

# From opset 23 the graph holds ONNX Runtime's fused kernels: the exporter writes scaled-dot-product attention as
# `Attention` and RMSNorm as `RMSNormalization`, and the model's rotary embedding is written as `RotaryEmbedding`
# (moe_core.model.attention.onnx_rotary). Older opsets decompose all three into primitives, for older runtimes.
FUSED_OPSET = 23
DEFAULT_OPSET = FUSED_OPSET
MIN_OPSET, MAX_OPSET = 18, 23  # the ONNX opsets the torch.onnx (dynamo) exporter writes this model's graph in
PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # the fp32 graph, or a variant converted from it (export/precision.py)
# The device a graph is made for (metadata "device"): "cpu" graphs use what is fastest on CPUs (sparse MoE dispatch,
# GroupQueryAttention's fp32 kernel, int8); "cuda" graphs have a CUDA kernel for every compute node at its types
# and no copy between host and device inside a forward, so ONNX Runtime can capture them as CUDA graphs.
DEVICES = ("cpu", "cuda")
CUDA_PRECISIONS = ("fp32", "fp16", "bf16")  # int8 dynamic quantisation's ops have no CUDA kernels
