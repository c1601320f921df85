"""serve: batch inference of exported models on ONNX Runtime (CUDA where present, else CPU).

`Server.open(MODEL.onnx)` then `.score(texts)` / `.generate(texts)` (a language model) or `.solve(puzzles)` (a Sudoku
model); `moe serve` is a thin command over it.
"""

from .server import GenerateResult, ScoreResult, Server, ServeStats, SolveResult

__all__ = ["GenerateResult", "ScoreResult", "ServeStats", "Server", "SolveResult"]
