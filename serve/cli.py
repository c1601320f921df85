"""`moe serve`: a thin command over serve.Server."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import click

from moe_core.cli import run

from .runtime import PROVIDER_CHOICES, RUNTIMES
from .server import MODE_TASK

CHUNK_BATCHES = 64  # records read at a time = CHUNK_BATCHES * rows per pass: bounded memory, good length sorting


def finite(expected: str, ok):
    """A click callback: the float option must be finite and satisfy ok (click's FloatRange lets inf and nan by)."""

    def check(ctx: click.Context, param: click.Parameter, value: float) -> float:
        if not (math.isfinite(value) and ok(value)):
            raise click.BadParameter(f"expected {expected}, got {value}", ctx, param)
        return value

    return check


@click.command(context_settings={"show_default": True})
@click.argument("model", type=click.Path())
@click.option("--input", "input_path", required=True, type=click.Path(),
              help='JSONL, one {"text": ..., "id": ...} object per line ("id" optional: the line number); solve: '
                   '{"puzzle": ..., "solution": ..., "id": ...} lines ("solution" optional), or a puzzle file '
                   '(.txt / .csv: one 81-character puzzle a line, optionally followed by its solution).')
@click.option("--output", "output_path", required=True, type=click.Path(),
              help="JSONL results, one object per input record, in input order.")
@click.option("--mode", type=click.Choice(list(MODE_TASK)), default="score",
              help="score / generate: a language model (task lm); solve: a Sudoku model (task sudoku).")
@click.option("--batch-size", default=32, type=click.IntRange(1),
              help="Rows per forward pass, at most the model's memory budget allows: rows x max_seq_len x "
                   "(halt_max_steps x vocab + heads x max_seq_len + experts x d_expert + 8 x d_model) <= 2^26 "
                   "activation elements (a note says when --batch-size is cut). Results never depend on it.")
@click.option("--provider", type=click.Choice(PROVIDER_CHOICES), default="auto",
              help="auto: CUDA when onnxruntime-gpu and a GPU are present, else CPU.")
@click.option("--runtime", type=click.Choice(RUNTIMES), default="auto",
              help="unrolled: MODEL.onnx, every halting step for every sample; stepwise: MODEL.step.onnx (moe export "
                   "--stepwise) one step at a time, each sample leaving the batch when it halts (same results); "
                   "auto: stepwise when the step graph is there.")
@click.option("--max-steps", type=click.IntRange(1), default=None, metavar="K",
              help="Step graph only: run up to K supervision steps instead of the exported halt_max_steps (the "
                   "steps share their weights; `moe eval RUN --halt-max-steps` measures what more steps buy). "
                   "[default: the exported halt_max_steps]")
@click.option("--halt/--no-halt", "halting", default=True,
              help="--no-halt (step graph only): ignore the halt head, every sample runs every step.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU intra-op threads, at most the CPUs this process may use (a note says when cut). "
                   "[default: physical cores]")
@click.option("--stride", type=click.IntRange(1), default=None,
              help="score: sliding-window stride for texts longer than the model's max_seq_len. "
                   "[default: max_seq_len / 2]")
@click.option("--token-logprobs", is_flag=True, help="score: also write each scored token's log-prob.")
@click.option("--max-new-tokens", default=64, type=click.IntRange(1), help="generate: tokens to add at most.")
@click.option("--temperature", default=0.0, type=float, callback=finite("a finite number >= 0", lambda v: v >= 0),
              help="generate: 0 = greedy.")
@click.option("--top-k", default=0, type=click.IntRange(0), help="generate: sample from the k likeliest (0 = all).")
@click.option("--top-p", default=1.0, type=float, callback=finite("a number in (0, 1]", lambda v: 0 < v <= 1),
              help="generate: sample from the smallest set of tokens with this much probability.")
@click.option("--seed", default=0, type=click.IntRange(0),
              help="generate: sampling seed (a sample's draws depend on the seed and its position in the input only).")
@click.option("--cache/--no-cache", default=True,
              help="generate: with the model's decode graph (MODEL.decode.onnx, `moe export` writes it for causal "
                   "language models), run only the new token per step against the cached keys and values; "
                   "--no-cache recomputes the whole context for every token (same tokens within max_seq_len).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output file.")
def serve(model, input_path, output_path, mode, batch_size, provider, runtime, max_steps, halting, threads, stride,
          token_logprobs, max_new_tokens, temperature, top_k, top_p, seed, cache, overwrite) -> None:
    """Score or continue every text of a JSONL file with an exported MODEL.onnx on ONNX Runtime.

    \b
    score:    {"id", "nll", "ppl", "n_tokens", "halt_step", "n_windows"[, "token_logprobs"]} per record.
              nll = mean negative log-likelihood (nats) of tokens 2..n, each predicted from the tokens
              before it (nothing predicts the first token); ppl = exp(nll). A text of 0 or 1 tokens has
              nll = ppl = null and n_tokens = 0. A text longer than the model's max_seq_len is scored with a
              sliding window: windows of max_seq_len tokens advancing by --stride, every token scored once
              with at least max_seq_len - stride tokens of context; halt_step is the first window's.
    generate: {"id", "completion", "n_new_tokens", "finish_reason", "halt_step"} per record. The context is
              the last max_seq_len tokens of prompt + continuation (with the cache: the prompt's last max_seq_len
              tokens, and when a text reaches max_seq_len, its last 3/4 of it prefilled again); stops at
              <|endoftext|> ("eot") or after --max-new-tokens ("length"); halt_step is decided on the prompt.
    solve:    {"id", "puzzle", "solution", "steps", "valid"[, "correct"]} per puzzle. solution = the model's answer
              (81 digits); steps = the halting step it came from; valid = the answer obeys the rules and keeps every
              given, checked by the rules (never by the model); correct = it equals the solution given in the
              input (only when one was given). A puzzle file's ids are the puzzles' positions (1-based).

    A model exported with `moe export --stepwise` has a step graph beside it (MODEL.step.onnx): by default it is
    run one supervision step at a time and each sample leaves the batch at the step it halts, with the same results
    as the unrolled graph (--runtime unrolled), which runs every step for every sample.

    Inputs are streamed in chunks of 64 batches (and at most 32 MiB of text), each sorted by length so that padding
    is small. Every line is checked before any compute (a mode the model's task does not serve is refused first);
    a missing "id" is the line number, so lines without "id" and numeric ids do not mix. The output is written to
    a temp file beside --output and moved into place at the end (without --overwrite only if --output still does
    not exist), so a failed or interrupted run leaves nothing behind. --output may not be the input or any file of
    the model (its tokenizer, its step graph), with or without --overwrite.
    """
    from moe_core.files import atomic_write, check_not_inputs, check_output, note_inputs
    from moe_core.ort_session import usable_cpus

    from .jsonl import EXPECTED, PUZZLE_EXPECTED, chunked, count_records, read_puzzles, read_records
    from .server import Server

    inp = Path(input_path)
    note_inputs([(inp, "the --input file"), (Path(model), "the model")])
    out = check_output(output_path, overwrite, "--output")
    if threads is not None and threads > usable_cpus():
        click.echo(f"note: --threads {threads}: using {usable_cpus()}, the CPUs this process may use", err=True)
    server = Server.open(model, provider=provider, threads=threads, runtime=runtime, max_steps=max_steps,
                         halting=halting, cache=cache and mode == "generate")
    note_inputs(server.files())
    check_not_inputs([out], option="--output")
    server.require_task(mode)
    rows = server.batch_rows(batch_size)
    if rows < batch_size:
        click.echo(f"note: --batch-size {batch_size}: {rows} rows per forward pass, the most this model's memory "
                   "budget allows (see --help)", err=True)
    read, expected = (read_puzzles, PUZZLE_EXPECTED) if mode == "solve" else (read_records, EXPECTED)
    n_records = count_records(inp, read, expected)  # every record checked before any compute is spent
    if mode == "score":
        stride = server.window_stride(stride)
    info = server.info
    click.echo(f"model {info.path.name} | vocab {info.vocab_size} | max_seq_len {info.max_seq_len} | "
               f"halt_max_steps {info.halt_max_steps}{server.steps_note()} | {info.precision} | provider "
               f"{server.model.describe()}"
               + (f" | {server.decoder.describe}" if server.decoder is not None else ""))
    if server.model.note:
        click.echo(f"note: {server.model.note}")

    from tqdm import tqdm

    t0 = time.perf_counter()

    def write(tmp: str) -> None:
        done = 0
        unit = "puzzle" if mode == "solve" else "seq"
        with open(tmp, "w", encoding="utf-8") as f, tqdm(total=n_records, unit=unit, desc=mode) as bar:
            weight = (lambda r: 0) if mode == "solve" else (lambda r: len(r.text))
            for chunk in chunked(read(inp), CHUNK_BATCHES * rows, weight):
                if mode == "solve":
                    results = server.solve([r.puzzle for r in chunk], [r.solution for r in chunk], rows,
                                           progress=bar.update)
                elif mode == "score":
                    results = server.score([r.text for r in chunk], rows, token_logprobs, stride,
                                           progress=bar.update)
                else:
                    results = server.generate([r.text for r in chunk], max_new_tokens, temperature, top_k, top_p,
                                              seed, rows, first_index=done, progress=bar.update)
                for rec, res in zip(chunk, results, strict=True):
                    f.write(json.dumps({"id": rec.id, **res.as_record()}, ensure_ascii=False) + "\n")
                done += len(chunk)

    atomic_write(out, write, overwrite)
    seconds = time.perf_counter() - t0
    s, c = server.stats, server.model.counts
    of = f"every sample running {server.model.n_steps} steps" if server.steps_note() else "unrolled"
    if server.decoder is not None and mode == "generate":
        runtime = (f"runtime KV cache: {server.decoder.calls:,} decode-graph calls, {server.decoder.refills} "
                   "refills at max_seq_len")
    else:
        runtime = (f"runtime {server.model.runtime}: {c.rows:,} sample-steps computed ({c.rows / max(1, c.full):.0%} "
                   f"of {of})")
    tail = f"{runtime} | provider {server.provider} | {seconds:.1f}s -> {out}"
    if mode == "solve":
        correct = f" | correct {s.correct}/{s.checked} ({s.correct / s.checked:.1%})" if s.checked else ""
        click.echo(f"solve: {s.sequences} puzzles | valid {s.valid}/{s.sequences} ({s.valid / s.sequences:.1%}, "
                   f"rule-checked){correct} | mean steps {s.mean_halt_step:.2f} | {s.sequences / seconds:,.1f} "
                   f"puzzles/s | {tail}")
        return
    what = "tokens" if mode == "score" else "new tokens"
    long = f" | {s.long_inputs} longer than max_seq_len" if s.long_inputs else ""
    click.echo(f"{mode}: {s.sequences} sequences | {s.tokens} {what} | {s.tokens / seconds:,.0f} {what}/s | "
               f"padding {100 * s.padding_fraction:.1f}% | mean halt_step {s.mean_halt_step:.2f}{long} | {tail}")


def main() -> None:
    run(serve)
