"""What the tests share: tiny configs and models, generated corpora and tokenizers, and ways to run the `moe` CLI.

Test modules import these from here (never from each other or from conftest); conftest.py holds the fixtures.
Everything is deterministic and offline: corpora come from word lists through a seeded random.Random (never the
real corpus), and every model is small enough for a 2-core CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from click.testing import CliRunner

from moe_core import ModelConfig, RecursiveMoE
from moe_core.checkpoint import save_run
from moe_core.cli import cli, run
from train.data import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
VOCAB = 300  # the vocabulary of the tests' tiny language models that have a trained tokenizer
VARIED_SEQ_LEN = 16  # max_seq_len of the varied model conftest's `exported` fixture exports


# -----------------------------------------------------------------------------
# tiny models


TINY_MODEL = dict(vocab_size=97, max_seq_len=16, d_model=32, n_heads=4, n_layers=1, min_heads=1, max_heads=4,
                  n_experts=4, top_k=2, d_expert=32, H_cycles=2, L_cycles=2, halt_max_steps=3, dropout=0.0)


def tiny_model_config(**overrides) -> ModelConfig:
    """A validated tiny ModelConfig; keyword arguments override single fields."""
    cfg = ModelConfig(**{**TINY_MODEL, **overrides})
    cfg.validate()
    return cfg


@torch.no_grad()
def vary_routing(model: torch.nn.Module, lm_scale: float = 1.0) -> torch.nn.Module:
    """Random routers and predictors (a fresh model routes almost uniformly: here tokens use different experts and
    head counts) and a halt head that stops samples of one batch at different steps (halting is decided at the
    first position in a causal model). lm_scale widens the logits' spread, so that greedy argmax never sits within
    float noise of a tie."""
    for name, p in model.named_parameters():
        if any(k in name for k in ("router", "complexity_head", "threshold_head")):
            p.normal_(0.0, 0.5)
    model.halt_head.weight.normal_(0.0, 1.0)
    model.halt_head.bias.zero_()
    model.lm_head.weight.mul_(lm_scale)
    return model


def varied_run(run_dir: Path, seed: int, max_seq_len: int, H_cycles: int = 2) -> Path:
    """A run dir of a tiny random causal language model whose routing and halting vary between inputs
    (vary_routing), with a tokenizer trained on LM_WORDS. Each H cycle adds a block call per step to every
    export of it (a few seconds of tracing each)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=300, max_seq_len=max_seq_len, d_model=32, n_heads=4, n_layers=1, n_experts=4,
                      d_expert=32, H_cycles=H_cycles, L_cycles=1, halt_max_steps=2)
    model = vary_routing(RecursiveMoE(cfg), lm_scale=10.0)
    rng = random.Random(1)
    corpus = [" ".join(rng.choice(LM_WORDS) for _ in range(2000))]
    save_run(run_dir, model, train_tokenizer(corpus, cfg.vocab_size).to_str())
    return run_dir


TINY_LM = dict(vocab_size=VOCAB, max_seq_len=16, d_model=32, n_heads=4, n_layers=1, n_experts=4, top_k=2, d_expert=32,
            H_cycles=1, L_cycles=1, halt_max_steps=2)


# -----------------------------------------------------------------------------
# corpora and tokenizers


_WORDS = (
    "the a an one every some old young quiet bright dark small large green river mountain city garden king "
    "queen child teacher merchant sailor farmer soldier poet walked sang whispered carried found lost watched "
    "built opened closed remembered under over beside through across before after slowly quickly gently "
    "loudly happily stone water fire wind light shadow bread letter ship road house door window morning "
    "evening night winter summer and but because while when although if then so"
).split()


def make_corpus(n_chars: int = 12_000, seed: int = 1234) -> str:
    """English-like text: sentences of random words with capitals and punctuation, one per line."""
    rng = random.Random(seed)
    lines: list[str] = []
    size = 0
    while size < n_chars:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        sentence = " ".join(words)
        sentence = sentence[0].upper() + sentence[1:] + rng.choice(".,.!?;")
        if rng.random() < 0.15:
            sentence = rng.choice(["ALICE", "BOB", "CAROL"]) + ":\n" + sentence
        lines.append(sentence)
        size += len(sentence) + 1
    return "\n".join(lines) + "\n"


LM_WORDS = ("the king queen walked through a garden and found letter under stone while river sang quietly "
         "ALICE BOB night morning bright dark, old young door window.").split()


def make_texts(n: int, seed: int) -> list[str]:
    """Texts of 0 to ~70 tokens (the tokenizer is nearly character-level): empty, one token, and long ones."""
    rng = random.Random(seed)
    texts = ["", "a"] + [" ".join(rng.choice(LM_WORDS) for _ in range(rng.choice([1, 2, 3, 5, 8, 14])))
                         for _ in range(n - 2)]
    rng.shuffle(texts)
    return texts


VERSE_WORDS = ("the king queen lord night day sword crown love death heart blood sleep dream fair foul "
         "speak hear know never ever more sweet gentle noble honest brave").split()


def make_tokenizer_json(vocab: int = VOCAB) -> str:
    import random

    from train.data import train_tokenizer

    rng = random.Random(0)
    docs = [" ".join(rng.choice(VERSE_WORDS) for _ in range(200)) + ".\n" for _ in range(20)]
    return train_tokenizer(docs, vocab).to_str()


def tokenizer_json(vocab: int, seed: int = 0) -> str:
    return train_tokenizer([make_corpus(6000, seed=seed)], vocab).to_str()


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


GOOD_JSONL = '{"text": "the king"}\n'


def contract_graph(vocab: int, tokenizer_text: str, config: dict) -> onnx.ModelProto:
    """A model with the exported graph's contract and metadata (export/onnx_export.py) that serve runs: logits are
    rows of a random [V, V] table (a bigram model), halt_step is 1. Damage to the file, its metadata or its
    tokenizer is checked before any of the graph runs, so a real export (tens of seconds) would add nothing here;
    tests/e2e/test_serve.py serves real exports."""
    from onnx import TensorProto, helper, numpy_helper

    table = torch.Generator().manual_seed(0)
    weights = numpy_helper.from_array(torch.randn(vocab, vocab, generator=table).numpy(), "table")
    one = numpy_helper.from_array(torch.ones(1, dtype=torch.int64).numpy(), "one_value")
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["logits"], axis=0),
             helper.make_node("Shape", ["attention_mask"], ["batch"], start=0, end=1),
             helper.make_node("Expand", ["one_value", "batch"], ["halt_step"])]
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "seq"])
              for name in ("input_ids", "attention_mask")]
    graph = helper.make_graph(
        nodes, "moe_contract", inputs,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab]),
         helper.make_tensor_value_info("halt_step", TensorProto.INT64, ["batch"])],
        initializer=[weights, one])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    meta = {"moe_version": "0.1.0", "format_version": "1", "config": json.dumps(config), "vocab_size": str(vocab),
            "max_seq_len": "16", "halt_max_steps": "2", "causal": "true", "tokenizer_file": "m.tokenizer.json",
            "tokenizer_sha256": hashlib.sha256(tokenizer_text.encode("utf-8")).hexdigest(), "precision": "fp32"}
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto, full_check=True)
    return proto


# -----------------------------------------------------------------------------
# running the CLI


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return f"exit {self.returncode}\n--- stdout ---\n{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-3000:]}"


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONHASHSEED"] = "0"
    env["TQDM_DISABLE"] = "1"  # keep captured output small; tqdm reads TQDM_* defaults from the environment
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: a second thread only contends on a shared 2-core CPU
    return env


def moe_command(args: Sequence[str], module: str | None = None) -> list[str]:
    """argv for `moe ARGS` (module=None) or `python -m MODULE ARGS` (e.g. module="train")."""
    if module is not None:
        return [sys.executable, "-m", module, *map(str, args)]
    return [sys.executable, "-c", "from moe_core.cli import main; main()", *map(str, args)]


def spawn_moe(args: Sequence[str], module: str | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """Start `moe ARGS` (or `python -m MODULE ARGS`) without waiting: several can run at once."""
    return subprocess.Popen(moe_command(args, module), cwd=cwd or REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> CliResult:
    stdout, stderr = proc.communicate(timeout=timeout)
    return CliResult(proc.returncode, stdout, stderr)


def run_moe(args: Sequence[str], module: str | None = None, in_process: bool = False,
            timeout: float = 600) -> CliResult:
    """Run `moe ARGS`: as a subprocess (the real entry point, exit codes and all), or in-process through
    click's CliRunner (no torch import cost; exceptions other than MoeError show up as exit code 1)."""
    if not in_process:
        return finish(spawn_moe(args, module), timeout)
    from click.testing import CliRunner

    from moe_core.cli import cli

    argv = [str(a) for a in args]
    if module == "train":
        argv = ["train", *argv]
    elif module is not None:
        raise ValueError(f"in-process runs support module=None or 'train', got {module!r}")
    result = CliRunner().invoke(cli, argv, catch_exceptions=True)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        stderr += "".join(traceback.format_exception(result.exception))
    return CliResult(result.exit_code, result.stdout, stderr)


def moe(*args) -> tuple[int, str, str]:
    """`moe ARGS` in-process, through moe_core.cli.run as the console entry point runs it: (code, stdout, stderr).
    Any exception other than a MoeError or a click error escapes, and fails the test with its traceback."""
    with CliRunner().isolation() as (out, err, _):
        try:
            run(cli, [str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
        return code, out.getvalue().decode(), err.getvalue().decode()


def moe_serve(*args) -> tuple[int, str, str]:
    """`moe serve ARGS` in-process (see moe)."""
    return moe("serve", *args)


def leftovers(*paths: Path) -> list[Path]:
    """Outputs that exist, and temp files atomic_write would leave beside them (".NAME.*.tmp")."""
    found = [p for p in paths if p.exists()]
    for p in paths:
        found += list(p.parent.glob(f".{p.name}.*"))
    return found


PROGRESS = re.compile(r"^\w+: +\d+%\|")  # a tqdm bar: stderr of a command that failed after its work


def assert_refused(result: tuple[int, str, str], *needles: str, outputs: tuple[Path, ...] = ()) -> str:
    """Exit code 2, exactly one line on stderr (besides progress bars), `error: ...` holding every needle; none of
    `outputs` exists."""
    code, stdout, stderr = result
    lines = [line for line in stderr.splitlines() if line.strip() and not PROGRESS.match(line)]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), f"exit {code}\n{stdout}\n{stderr}"
    assert "Traceback" not in stdout + stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert leftovers(*outputs) == []
    return lines[0]


def assert_clean_failure(tmp_path: Path, message: str, *args, out_name: str = "out.jsonl") -> None:
    """`moe serve ARGS --output tmp_path/out_name` is refused (assert_refused) with `message` in its line."""
    out = tmp_path / out_name
    assert_refused(moe_serve(*args, "--output", out), message, outputs=(out,))


# -----------------------------------------------------------------------------
# training runs


TINY_RUN_STEPS = 12


TINY_RUN_VOCAB = 300


def tiny_train_args(corpus: Path, out: Path, steps: int = TINY_RUN_STEPS, compile_: bool = False) -> list[str]:
    return ["--preset", "tiny", "--compile" if compile_ else "--no-compile", "--data", str(corpus),
            "--device", "cpu", "--out", str(out),
            "--set", f"model.vocab_size={TINY_RUN_VOCAB}",
            "--set", f"train.max_steps={steps}",
            "--set", f"train.eval_every={max(1, steps // 2)}",
            "--set", "train.log_every=3",
            "--set", "train.batch_size=8",
            "--set", "train.eval_batches=2",
            "--set", "train.plots=false"]  # the plots' own tests draw them (test_plots.py)


def last_logged_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return -1
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass  # a line being written
    return max(steps, default=-1)


def stop_at(proc: subprocess.Popen, run_dir: Path, step: int, sig: int) -> CliResult:
    """Send `sig` once the run has logged `step` (0: as soon as the step-0 evaluation is logged)."""
    deadline = time.monotonic() + 300
    while last_logged_step(run_dir) < step:
        assert proc.poll() is None, finish(proc).describe()
        assert time.monotonic() < deadline, "the run did not reach the step"
        time.sleep(0.005)
    proc.send_signal(sig)
    return finish(proc)
