"""The run directory's files, by name: the one place that names them (readers and writers import from here).

RUN_DIR/
  config.json                 CONFIG_FILE: {"model", "train", "format_version", ...}, the whole resolved config
  model.safetensors           WEIGHTS_FILE: the weights (the EMA's or the best evaluation's when the run keeps them)
  model.shards.json           SHARD_INDEX: a sharded model (FSDP), read in place of WEIGHTS_FILE; its rank files
                              match SHARD_FILES
  tokenizer.json              TOKENIZER_FILE
  halt_calibration.json       CALIBRATION_FILE: `moe eval --ladder --calibrate-halting`'s record
  metrics.jsonl               METRICS_FILE: one JSON object per logged step or evaluation
  plots/                      PLOTS_DIR: the PNGs `moe plot` draws
  tensorboard/                TENSORBOARD_DIR: when the tensorboard extra is installed
  .lock                       LOCK_FILE: the advisory lock of the process writing the run
  eval/                       EVAL_DIR: `moe eval`'s default output (its figures and PUZZLES_FILE)
  trainer_state/              STATE_DIR: checkpoint sets step-NNNNNNNN/, each with OPTIMIZER_FILE, STATE_FILE,
                              EMA_FILE (with an EMA); BEST_DIR/BEST_FILE (keep_best) records the best evaluation
"""

from __future__ import annotations

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SHARD_INDEX = "model.shards.json"
SHARD_FILES = "model-*-rank*-of-*.safetensors"  # glob of the rank files an index names
TOKENIZER_FILE = "tokenizer.json"
# The halting threshold folded into the weights and the K it was chosen at, which export passes on to serve.
CALIBRATION_FILE = "halt_calibration.json"
METRICS_FILE = "metrics.jsonl"
PLOTS_DIR = "plots"
TENSORBOARD_DIR = "tensorboard"
LOCK_FILE = ".lock"
EVAL_DIR = "eval"
PUZZLES_FILE = "test_puzzles.txt"
STATE_DIR = "trainer_state"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
EMA_FILE = "ema.safetensors"
BEST_DIR = "best"
BEST_FILE = "best.json"
