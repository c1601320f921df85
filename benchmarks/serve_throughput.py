"""Alias: `python -m benchmarks.serve_throughput RUN_DIR [--onnx MODEL.onnx] [...]` is the suite's serving section,
`python -m benchmarks --run RUN_DIR --only serving [...]`."""

import sys

from .cli import main

if __name__ == "__main__":
    main(["--run", *sys.argv[1:2], "--only", "serving", *sys.argv[2:]])
