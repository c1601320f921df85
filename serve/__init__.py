"""serve: batch inference of exported models on ONNX Runtime (CUDA where present, else CPU).

`Server.open(MODEL.onnx)` then `.score(texts)` / `.generate(texts)`; `moe serve` is a thin command over it.
"""

from .server import GenerateResult, ScoreResult, Server, ServeStats

__all__ = ["GenerateResult", "ScoreResult", "ServeStats", "Server"]
