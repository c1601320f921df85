"""The torch-free pieces export and serve share: the graphs' contract (names, metadata, the step and decode graphs),
ONNX Runtime sessions, the step-wise loop, KV-cached decoding and likelihood figures from logits."""
