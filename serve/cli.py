"""`moe serve`: a thin command over serve.Server."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import click

from moe_core.cli import finite, run
from moe_core.tasks import MODES

from .runtime import PROVIDER_CHOICES, RUNTIMES

ENGINES = ("local", "ray")


@click.command(context_settings={"show_default": True})
@click.argument("model", type=click.Path())
@click.option("--input", "input_path", required=True, type=click.Path(),
              help='JSONL, one {"text": ..., "id": ...} object per line ("id" optional: the line number); solve: '
                   '{"puzzle": ..., "solution": ..., "id": ...} lines ("solution" optional), or a puzzle file '
                   '(.txt / .csv: one 81-character puzzle a line, optionally followed by its solution). Or a set of '
                   'shards: a directory of such files (.jsonl / .json / .ndjson; solve: also .txt / .csv) or a glob '
                   'pattern (quoted), served in sorted order as one input.')
@click.option("--output", "output_path", required=True, type=click.Path(),
              help="JSONL results, one object per input record, in input order. For a set of shards: a directory "
                   "of output shards named after the inputs, plus manifest.json (counts, model sha256, mode, "
                   "settings), written last.")
@click.option("--mode", type=click.Choice(list(MODES)), default="score",
              help="score / generate: a language model (task lm); solve: a Sudoku model (task sudoku).")
@click.option("--batch-size", default=32, type=click.IntRange(1),
              help="Rows per forward pass, at most the model's memory budget allows: rows x max_seq_len x "
                   "(halt_max_steps x vocab + heads x max_seq_len + experts x d_expert + 8 x d_model) <= 2^26 "
                   "activation elements (a note says when --batch-size is cut). Results never depend on it beyond fp32 "
                   "rounding, except with an int8 model: its activations are quantised with one scale per batch "
                   "tensor, so a row's results depend on its batch-mates (use fp32 or fp16 where that matters).")
@click.option("--provider", type=click.Choice(PROVIDER_CHOICES), default="auto",
              help="auto: CUDA when onnxruntime-gpu and a GPU are present, else CPU.")
@click.option("--runtime", type=click.Choice(RUNTIMES), default="auto",
              help="unrolled: MODEL.onnx, every halting step for every sample; stepwise: MODEL.step.onnx (moe export "
                   "--stepwise) one step at a time, each sample leaving the batch when it halts (same results); "
                   "auto: stepwise when the step graph is there.")
@click.option("--max-steps", type=click.IntRange(1), default=None, metavar="K",
              help="Step graph only: run up to K supervision steps instead of the exported halt_max_steps (the "
                   "steps share their weights; `moe eval RUN --halt-max-steps` measures what more steps buy). "
                   "[default: the steps the run validated (`moe eval --ladder --calibrate-halting`, exported as "
                   "metadata serve_max_steps), else the exported halt_max_steps]")
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
@click.option("--overwrite", is_flag=True, help="Replace an existing --output file (or output set of shards).")
@click.option("--engine", type=click.Choice(ENGINES), default="local",
              help="local: serve in this process; ray: on a Ray cluster (pip install 'moe[ray]'), one ONNX Runtime "
                   "session per worker, the same results (see docs/serving.md, \"Serving on a Ray cluster\").")
@click.option("--ray-address", default=None, metavar="auto|HOST:PORT",
              help="--engine ray: the cluster to join (auto: the one `ray start` runs on this node, or $RAY_ADDRESS). "
                   "[default: start a local cluster]")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="--engine ray: worker actors, each with its own session. [default: one per GPU with CUDA, else the "
                   "cluster's CPUs / --threads-per-worker]")
@click.option("--threads-per-worker", type=click.IntRange(1), default=None,
              help="--engine ray: CPU threads (and Ray CPUs) of each worker's session. [default: 1]")
def serve(model, input_path, output_path, mode, batch_size, provider, runtime, max_steps, halting, threads, stride,
          token_logprobs, max_new_tokens, temperature, top_k, top_p, seed, cache, overwrite, engine, ray_address,
          workers, threads_per_worker) -> None:
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
    the model (its tokenizer, its step graph), with or without --overwrite. A set of shards (--input a directory or
    a pattern) is one input in sorted order, written as a directory of output shards plus manifest.json, built
    under a temp name beside --output and renamed into place when complete.

    --engine ray serves on a Ray cluster: the input is read and checked here first, then every worker opens the
    model once (at its absolute path, which every node must be able to read) and serves blocks of records with the
    same code; the output is the same, record for record, and written here in input order.
    """
    from moe_core.common.errors import MoeError
    from moe_core.common.files import check_not_inputs, note_inputs
    from moe_core.runtime.ort_session import usable_cpus

    from . import shards
    from .jsonl import EXPECTED, PUZZLE_EXPECTED, read_puzzles, read_records
    from .server import Server

    on_ray = engine == "ray"
    ray_options = [name for name, value in (("--ray-address", ray_address), ("--workers", workers),
                                            ("--threads-per-worker", threads_per_worker)) if value is not None]
    if ray_options and not on_ray:
        raise MoeError(f"{ray_options[0]}: applies to --engine ray only; add --engine ray (or leave it out)")
    if on_ray:
        from .ray_engine import require_ray

        if threads is not None:
            raise MoeError("--threads: sets the threads of --engine local; with --engine ray use --threads-per-worker")
        require_ray()  # before any work: a missing extra is one line, not a failure after the input was read
        threads_per_worker = threads_per_worker or 1
    inputs = shards.find_inputs(input_path, mode)
    note_inputs([(p, "an --input shard" if inputs.sharded else "the --input file") for p in inputs.paths()]
                + [(Path(model), "the model")])
    out = shards.check_outputs(inputs, output_path, overwrite)
    if threads is not None and threads > usable_cpus():
        click.echo(f"note: --threads {threads}: using {usable_cpus()}, the CPUs this process may use", err=True)
    # With --engine ray this session only checks the model and the options (the driver may have no GPU): the
    # workers open their own, with --provider, on the runtime found here.
    server = Server.open(model, provider="cpu" if on_ray else provider, threads=1 if on_ray else threads,
                         runtime=runtime, max_steps=max_steps, halting=halting, cache=cache and mode == "generate")
    note_inputs(server.files())
    if inputs.sharded:
        shards.check_not_inside(out, server.files())
    else:
        check_not_inputs([out], option="--output")
    server.require_task(mode)
    rows = server.batch_rows(batch_size)
    if rows < batch_size:
        click.echo(f"note: --batch-size {batch_size}: {rows} rows per forward pass, the most this model's memory "
                   "budget allows (see --help)", err=True)
    read, expected = (read_puzzles, PUZZLE_EXPECTED) if mode == "solve" else (read_records, EXPECTED)
    records: list | None = [] if on_ray else None  # the Ray driver keeps the records it hands to the workers
    n_records = shards.count_inputs(inputs, read, expected, records)  # every record checked before any compute is spent
    if mode == "score":
        stride = server.window_stride(stride)
    job = shards.Job(mode, rows, token_logprobs, stride, max_new_tokens, temperature, top_k, top_p, seed)
    settings = {"batch_size": batch_size, "provider": provider, "runtime": server.model.runtime,
                "max_steps": max_steps, "halting": halting, "cache": server.decoder is not None}
    engine_info = {"name": engine, **({"workers": workers, "threads_per_worker": threads_per_worker,
                                       "ray_address": ray_address} if on_ray else {"threads": threads})}

    def make_manifest() -> dict:
        return shards.manifest(inputs, job, settings, server.files(), engine_info)

    info = server.info

    def header(where: str) -> None:
        click.echo(f"model {info.path.name} | vocab {info.vocab_size} | max_seq_len {info.max_seq_len} | "
                   f"halt_max_steps {info.halt_max_steps}{server.steps_note()} | {info.precision} | {where}"
                   + (f" | {server.decoder.describe}" if server.decoder is not None else ""))
        if server.model.note:
            click.echo(f"note: {server.model.note}")

    from tqdm import tqdm

    unit = "puzzle" if mode == "solve" else "seq"
    t0 = time.perf_counter()
    workers_note = ""
    if on_ray:
        from .ray_engine import serve_on_ray

        assert records is not None  # on Ray, count_inputs kept the records in it
        open_args = dict(provider=provider, threads=threads_per_worker, runtime=server.model.runtime,
                         max_steps=max_steps, halting=halting, cache=cache and mode == "generate")
        with contextlib.ExitStack() as stack:
            bars = []

            def announce(where: str) -> None:  # the cluster is up: the header, then progress from here
                header(where)
                bars.append(stack.enter_context(tqdm(total=n_records, unit=unit, desc=mode)))

            totals, workers_note = serve_on_ray(
                server, open_args, job, records, inputs, out, overwrite, make_manifest, address=ray_address,
                workers=workers, threads=threads_per_worker, provider=provider, announce=announce,
                progress=lambda n: bars[0].update(n))
        workers_note = f" | {workers_note}"
    else:
        header(f"provider {server.model.describe()}")
        with shards.open_outputs(inputs, out, overwrite, make_manifest) as sink, \
                tqdm(total=n_records, unit=unit, desc=mode) as bar:
            done = 0
            for chunk in shards.chunks(shards.iter_records(inputs, read), job):
                for line in shards.serve_chunk(server, job, chunk, done, progress=bar.update):
                    sink.write(line)
                done += len(chunk)
        totals = shards.Totals()
        totals.add(server)
    seconds = time.perf_counter() - t0
    click.echo(summary(mode, server, totals, seconds, f"{workers_note} | {seconds:.1f}s -> {out}"))


def summary(mode: str, server, totals, seconds: float, tail: str) -> str:
    """The last line of a run: what it computed and how fast. totals: summed over every Server that served it (this
    process's, or each Ray worker's); server: the one this process opened (what was served)."""
    s, c = totals.stats, totals.counts
    of = f"every sample running {server.model.n_steps} steps" if server.steps_note() else "unrolled"
    if server.decoder is not None and mode == "generate":
        runtime = (f"runtime KV cache: {totals.decode_calls:,} decode-graph calls, {totals.refills} refills at "
                   "max_seq_len")
    else:
        runtime = (f"runtime {server.model.runtime}: {c.rows:,} sample-steps computed ({c.rows / max(1, c.full):.0%} "
                   f"of {of})")
    tail = f"{runtime} | provider {', '.join(sorted(totals.providers))}{tail}"
    if mode == "solve":
        correct = f" | correct {s.correct}/{s.checked} ({s.correct / s.checked:.1%})" if s.checked else ""
        return (f"solve: {s.sequences} puzzles | valid {s.valid}/{s.sequences} ({s.valid / s.sequences:.1%}, "
                f"rule-checked){correct} | mean steps {s.mean_halt_step:.2f} | {s.sequences / seconds:,.1f} "
                f"puzzles/s | {tail}")
    what = "tokens" if mode == "score" else "new tokens"
    long = f" | {s.long_inputs} longer than max_seq_len" if s.long_inputs else ""
    return (f"{mode}: {s.sequences} sequences | {s.tokens} {what} | {s.tokens / seconds:,.0f} {what}/s | "
            f"padding {100 * s.padding_fraction:.1f}% | mean halt_step {s.mean_halt_step:.2f}{long} | {tail}")


def main() -> None:
    run(serve)
