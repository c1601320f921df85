"""`moe serve`: a thin command over serve.Server."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from moe_core.cli import run

CHUNK_BATCHES = 64  # records read at a time = CHUNK_BATCHES * batch_size: bounded memory, good length sorting


@click.command(context_settings={"show_default": True})
@click.argument("model", type=click.Path())
@click.option("--input", "input_path", required=True, type=click.Path(),
              help='JSONL, one {"text": ..., "id": ...} object per line ("id" optional: the line number).')
@click.option("--output", "output_path", required=True, type=click.Path(),
              help="JSONL results, one object per input record, in input order.")
@click.option("--mode", type=click.Choice(["score", "generate"]), default="score")
@click.option("--batch-size", default=32, type=click.IntRange(1), help="Rows per forward pass.")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto",
              help="auto: CUDA when onnxruntime-gpu and a GPU are present, else CPU.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU intra-op threads. [default: physical cores]")
@click.option("--stride", type=click.IntRange(1), default=None,
              help="score: sliding-window stride for texts longer than the model's max_seq_len. "
                   "[default: max_seq_len / 2]")
@click.option("--token-logprobs", is_flag=True, help="score: also write each scored token's log-prob.")
@click.option("--max-new-tokens", default=64, type=click.IntRange(1), help="generate: tokens to add at most.")
@click.option("--temperature", default=0.0, type=click.FloatRange(0), help="generate: 0 = greedy.")
@click.option("--top-k", default=0, type=click.IntRange(0), help="generate: sample from the k likeliest (0 = all).")
@click.option("--top-p", default=1.0, type=click.FloatRange(0, 1, min_open=True),
              help="generate: sample from the smallest set of tokens with this much probability.")
@click.option("--seed", default=0, type=int, help="generate: sampling seed (a sample's draws depend on the seed "
                                                   "and its position in the input only).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output file.")
def serve(model, input_path, output_path, mode, batch_size, provider, threads, stride, token_logprobs,
          max_new_tokens, temperature, top_k, top_p, seed, overwrite) -> None:
    """Score or continue every text of a JSONL file with an exported MODEL.onnx on ONNX Runtime.

    \b
    score:    {"id", "nll", "ppl", "n_tokens", "halt_step", "n_windows"[, "token_logprobs"]} per record.
              nll = mean negative log-likelihood (nats) of tokens 2..n, each predicted from the tokens
              before it (nothing predicts the first token); ppl = exp(nll). A text of 0 or 1 tokens has
              nll = ppl = null and n_tokens = 0. A text longer than the model's max_seq_len is scored with a
              sliding window: windows of max_seq_len tokens advancing by --stride, every token scored once
              with at least max_seq_len - stride tokens of context; halt_step is the first window's.
    generate: {"id", "completion", "n_new_tokens", "finish_reason", "halt_step"} per record. The context is
              the last max_seq_len tokens of prompt + continuation; stops at <|endoftext|> ("eot") or after
              --max-new-tokens ("length"); halt_step is that of the last step.

    Inputs are read in chunks of 64 batches, each sorted by length so that padding is small. Every line is
    checked before any compute; the output is written to a temp file beside --output and renamed at the end,
    so a failed run leaves nothing behind.
    """
    from moe_core.checkpoint import atomic_write, check_output
    from moe_core.errors import MoeError

    from .jsonl import chunked, count_records, read_records
    from .server import Server

    out, inp = check_output(output_path, overwrite), Path(input_path)
    if inp.exists() and out.exists() and out.samefile(inp):
        raise MoeError(f"{out}: --output is the --input file")
    n_records = count_records(inp)  # every line checked before the model is loaded or any compute is spent
    server = Server.open(model, provider=provider, threads=threads)
    if mode == "score":
        stride = server.window_stride(stride)
    info = server.info
    click.echo(f"model {info.path.name} | vocab {info.vocab_size} | max_seq_len {info.max_seq_len} | "
               f"halt_max_steps {info.halt_max_steps} | {info.precision} | provider {server.model.describe()}")
    if server.model.note:
        click.echo(f"note: {server.model.note}")

    from tqdm import tqdm

    t0 = time.perf_counter()

    def write(tmp: str) -> None:
        done = 0
        with open(tmp, "w", encoding="utf-8") as f, tqdm(total=n_records, unit="seq", desc=mode) as bar:
            for chunk in chunked(read_records(inp), CHUNK_BATCHES * batch_size):
                texts = [r.text for r in chunk]
                if mode == "score":
                    results = server.score(texts, batch_size, token_logprobs, stride, progress=bar.update)
                else:
                    results = server.generate(texts, max_new_tokens, temperature, top_k, top_p, seed, batch_size,
                                              first_index=done, progress=bar.update)
                for rec, res in zip(chunk, results, strict=True):
                    f.write(json.dumps({"id": rec.id, **res.as_record()}, ensure_ascii=False) + "\n")
                done += len(chunk)

    atomic_write(out, write)
    seconds = time.perf_counter() - t0
    s = server.stats
    what = "tokens" if mode == "score" else "new tokens"
    long = f" | {s.long_inputs} longer than max_seq_len" if s.long_inputs else ""
    click.echo(f"{mode}: {s.sequences} sequences | {s.tokens} {what} | {s.tokens / seconds:,.0f} {what}/s | "
               f"padding {100 * s.padding_fraction:.1f}% | mean halt_step {s.mean_halt_step:.2f}{long} | "
               f"provider {server.provider} | {seconds:.1f}s -> {out}")


def main() -> None:
    run(serve)
