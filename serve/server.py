"""The serving API: open an exported model once, then score or generate for lists of texts.

    from serve import Server
    server = Server.open("model.onnx")                      # provider="auto" | "cuda" | "cpu", threads=None
    server.score(["To be, or not to be"])                   # -> [ScoreResult(nll=..., ppl=..., n_tokens=5, ...)]
    server.generate(["ROMEO:"], max_new_tokens=32)          # -> [GenerateResult(text=..., tokens=[...], ...)]
    Server.open("sudoku.onnx").solve([".5..83.17..."])     # -> [SolveResult(solution="..." , steps=2, valid=True)]

Scoring. A text of n tokens has n - 1 scored tokens: position t's logits predict token t + 1, and nothing
predicts the first token. nll is the mean negative log-likelihood (nats/token) over them, ppl = exp(nll).
A text of 0 or 1 tokens has nothing to score: nll and ppl are None, n_tokens is 0 (halt_step is still
reported for 1 token). Texts longer than the model's max_seq_len T are scored with a sliding window (see
`windows`): every token is scored exactly once, with at least T - stride tokens of left context (stride
defaults to T // 2); halt_step is then the first window's. Log-probs are computed inside the session
(serve/graph.py), from the exported logits.

Generation. With the model's decode graph (KV cache: moe_core/runtime/decoding.py) a prompt is prefilled once and each
step runs only the new token against the cached keys and values; without one (or with cache=False) each step is one
forward pass of the batch over the last T tokens of prompt + continuation (the oldest tokens drop out of the context
once it is full). A result's halt_step is the halting decided on the prompt (its last T tokens: the prefill, or the
first forward pass), the same on both paths whatever the continuation's length. Greedy (temperature 0) by default;
otherwise temperature / top-k / top-p sampling from a per-sample generator seeded with (seed, index of the sample),
so results do not depend on batch size or order. Only ids the tokenizer knows are ever produced. Generation stops at
<|endoftext|> (not included in the output) or after max_new_tokens. An empty prompt starts from <|endoftext|>, the
document separator the model was trained with.

Solving (a Sudoku model, task "sudoku"). A puzzle is 81 cells, 0 (or '.') for a blank; its tokens are its digits.
The answer of a cell is the likeliest digit 1..9 of the halting-selected logits (the blank token is never an
answer; moe_core.tasks.sudoku.cell_answers, the rule training's evaluation applies); givens are not overwritten, so a
model that changes one gives an invalid solution. `valid` is decided by the rules alone
(moe_core.tasks.sudoku.valid_solutions: every row, column and box a permutation of 1..9 and every given kept), never by
the model; `correct` compares with a solution given with the puzzle.

Runtimes. The unrolled graph (MODEL.onnx) runs every halting step for every sample; a model exported with
`moe export --stepwise` also has MODEL.step.onnx, which serve runs one supervision step at a time, dropping each
sample from the batch at the step it halts (moe_core/runtime/stepwise.py): the same results, less compute when samples
halt early. runtime="auto" takes the step graph when there is one. `server.model.counts` counts the steps computed.

Batching. Work is sorted by length (longest first) and cut into batches of batch_size rows, right-padded with
attention_mask = 0, so padding stays small; results come back in input order. Finished generations leave their
batch, so the remaining ones do not pay for them. A forward pass holds at most MAX_BATCH_ELEMENTS activation
elements, estimated per row as max_seq_len x (halt_max_steps x vocab_size + n_heads x max_seq_len + n_experts x
d_expert + 8 x d_model) — the logits of every unrolled halting step, the attention scores, the experts' hidden
units and the block's own vectors: a larger batch_size is cut to `Server.max_batch_rows` rows, so memory stays
bounded whatever batch_size is asked (results never depend on the batch size, beyond fp32 rounding; an int8 graph is
the exception: ONNX Runtime's dynamic quantisation gives each batch tensor one activation scale).

Arguments are checked before any work: a wrong type or value is a MoeError naming the argument.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, cast

import numpy as np

from moe_core import EOT
from moe_core.common.errors import MoeError
from moe_core.runtime.decoding import Decoder
from moe_core.runtime.graph_contract import HALT_STEP, LOGITS
from moe_core.tasks import MODES, TASKS, sudoku

from .graph import LAST_LOGITS, TOKEN_LOGPROBS
from .runtime import ModelInfo, OrtModel, StepwiseModel, open_decoder, open_model

# Activation elements one forward pass may hold (see "Batching" above): 2^26 float32 = 256 MiB per estimated
# tensor slot. The estimate undercounts what ONNX Runtime keeps alive (by a few times: benchmarks/RESULTS.md), so
# the real peak is a few GiB at most; the default preset (2048 x 128, 3 steps) still runs 60 rows, above the
# default batch of 32.
MAX_BATCH_ELEMENTS = 2**26

Progress = Callable[[int], Any]  # called with the number of input texts a batch has finished


@dataclass
class ScoreResult:
    nll: float | None  # mean negative log-likelihood, nats per scored token; None when nothing was scored
    ppl: float | None  # exp(nll)
    n_tokens: int  # scored tokens: the text's token count minus one (0 for an empty or 1-token text)
    halt_step: int | None  # 1-based halting step of the (first) window; None for an empty text
    n_windows: int  # forward passes over this text: 1, or more when it is longer than max_seq_len
    token_logprobs: list[float] | None = None  # log p(token t | tokens < t) for t = 1..n-1, when requested

    def as_record(self) -> dict[str, Any]:
        r: dict[str, Any] = {"nll": self.nll, "ppl": self.ppl, "n_tokens": self.n_tokens,
                             "halt_step": self.halt_step, "n_windows": self.n_windows}
        if self.token_logprobs is not None:
            r["token_logprobs"] = [round(v, 6) for v in self.token_logprobs]  # float32 holds ~7 digits
        return r


@dataclass
class GenerateResult:
    text: str  # the continuation (decoded new tokens), without the prompt
    tokens: list[int]  # the new token ids (without the final <|endoftext|>)
    finish_reason: str  # "eot" (the model ended the text) or "length" (max_new_tokens reached)
    halt_step: int  # halting step decided on the prompt (its last max_seq_len tokens)

    def as_record(self) -> dict[str, Any]:
        return {"completion": self.text, "n_new_tokens": len(self.tokens), "finish_reason": self.finish_reason,
                "halt_step": self.halt_step}


@dataclass
class SolveResult:
    puzzle: str  # the puzzle, 81 characters, '.' for a blank
    solution: str  # the model's answer, 81 digits
    steps: int  # 1-based halting step whose logits gave the answer
    valid: bool  # the answer obeys the rules and keeps every given (checked by moe_core.tasks.sudoku, not the model)
    correct: bool | None = None  # the answer equals the solution given with the puzzle; None when none was given

    def as_record(self) -> dict[str, Any]:
        r = {"puzzle": self.puzzle, "solution": self.solution, "steps": self.steps, "valid": self.valid}
        if self.correct is not None:
            r["correct"] = self.correct
        return r


@dataclass
class ServeStats:
    """Running totals over every call of one Server (the CLI's final summary)."""

    sequences: int = 0
    tokens: int = 0  # score: tokens of the input texts; generate: new tokens
    positions: int = 0  # valid (non-padding) positions fed to the model
    padding: int = 0  # padding positions fed to the model
    halt_sum: int = 0  # sum of the reported halt_step values
    halt_count: int = 0
    long_inputs: int = 0  # texts longer than max_seq_len (scored with a sliding window / prompt cut to its end)
    valid: int = 0  # solve: rule-checked valid solutions
    checked: int = 0  # solve: puzzles given with a solution
    correct: int = 0  # solve: answers equal to the given solution

    @property
    def padding_fraction(self) -> float:
        return self.padding / max(1, self.padding + self.positions)

    @property
    def mean_halt_step(self) -> float:
        return self.halt_sum / max(1, self.halt_count)


# -----------------------------------------------------------------------------
# pure helpers: windows, batches, padding, sampling


def windows(n: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) of the windows that score an n-token text with a model of length max_len.

    Window k feeds tokens [begin, end) and scores targets [first_target, end) — the targets not scored by an
    earlier window — so every target 1..n-1 is scored exactly once. Windows after the first advance by
    `stride` (< max_len) and keep max_len tokens, so each of their targets sees at least max_len - stride
    tokens of context.
    """
    if n == 0:
        return []
    if n <= max_len:
        return [(0, n, 1)]
    out, end = [(0, max_len, 1)], max_len
    while end < n:
        new_end = min(end + stride, n)
        out.append((new_end - max_len, new_end, end))
        end = new_end
    return out


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (a memory problem shows up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad_batch(rows: Sequence[Sequence[int]] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int64 input_ids and attention_mask [B, max len]. The pad id (0) is never attended to."""
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return ids, mask


def check_finite(values: list[np.ndarray], names: list[str], model: Any) -> list[np.ndarray]:
    """The outputs of one forward, refused when a float output holds NaN or Inf: a result computed from them would
    be wrong (or not JSON), and nothing of the command's output is written."""
    for name, v in zip(names, values, strict=True):
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            rows = np.flatnonzero(~np.isfinite(v.reshape(len(v), -1)).all(axis=1))
            raise MoeError(f"{model}: non-finite {name} (NaN or Inf) for {len(rows)} of the batch's {len(v)} rows "
                           f"(rows {', '.join(map(str, rows[:5]))}{', ...' if len(rows) > 5 else ''}): the model "
                           "overflowed on these inputs or its file is corrupt; nothing was written")
    return values


def pick_token(logits: np.ndarray, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               rng: np.random.Generator | None = None) -> int:
    """Next token from one position's logits [V]: argmax at temperature 0, else a sample from
    softmax(logits / temperature) restricted to the top_k ids (0 = all) and to the smallest set of ids whose
    probability reaches top_p."""
    if temperature == 0:
        return int(np.argmax(logits))  # the first of tied maxima, as torch.argmax
    # Shifted by the maximum before dividing: the largest becomes 0, the others -inf at worst (never inf - inf = NaN),
    # however small the temperature.
    z = (logits.astype(np.float64) - float(np.max(logits))) / temperature
    if 0 < top_k < len(z):
        z = np.where(z >= np.partition(z, -top_k)[-top_k], z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    assert rng is not None, "sampling (temperature > 0) needs a generator"
    return int(rng.choice(len(p), p=p))


def to_grid(value: str | np.ndarray, where: str) -> np.ndarray:
    """A puzzle or solution as uint8 [81]: parsed from 81 characters, or checked (81 integers 0-9)."""
    if isinstance(value, str):
        return sudoku.parse_grid(value, where)
    expected = f"expected 81 characters or 81 integers 0-9 ({sudoku.CELLS} cells)"
    if value is None or isinstance(value, (bytes, dict, set)):
        raise MoeError(f"{where}: {expected}, got {type(value).__name__}")
    try:
        grid = np.asarray(value)
    except (TypeError, ValueError):
        raise MoeError(f"{where}: {expected}, got {type(value).__name__}") from None
    if grid.shape != (sudoku.CELLS,) or grid.dtype.kind not in "iu" or grid.min() < 0 or grid.max() > 9:
        got = f"shape {grid.shape} of {grid.dtype}" if grid.dtype.kind in "iub" else f"{grid.dtype} values"
        raise MoeError(f"{where}: {expected}, got {got}")
    return grid.astype(np.uint8)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_int(name: str, value: Any, minimum: int, note: str = "") -> int:
    """`value` as an int >= minimum (a bool is not an integer here); MoeError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise MoeError(f"{name}: expected an integer >= {minimum}{note}, got {type(value).__name__} {_shown(value)}")
    if value < minimum:
        raise MoeError(f"{name}: expected an integer >= {minimum}{note}, got {value}")
    return int(value)


def check_float(name: str, value: Any, expected: str, ok: Callable[[float], bool]) -> float:
    """`value` as a finite float with ok(value); MoeError naming `name` and `expected` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise MoeError(f"{name}: expected {expected}, got {type(value).__name__} {_shown(value)}")
    value = float(value)
    if not (math.isfinite(value) and ok(value)):
        raise MoeError(f"{name}: expected {expected}, got {value}")
    return value


def check_texts(texts: Any, name: str = "texts") -> list[str]:
    """A list of strings, from any sequence or iterable of str (a bare string is refused: wrap it in a list)."""
    if isinstance(texts, (str, bytes)):
        raise MoeError(f"{name}: expected a list of strings, got a single {type(texts).__name__} (wrap it in a list)")
    try:
        items = list(texts)
    except TypeError:
        raise MoeError(f"{name}: expected a list of strings, got {type(texts).__name__}") from None
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise MoeError(f"{name}[{i}]: expected a string, got {type(t).__name__} {_shown(t)}")
    return items


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int = 0) -> None:
    check_int("max_new_tokens", max_new_tokens, 1)
    check_float("temperature", temperature, "a finite number >= 0 (0 = greedy)", lambda v: v >= 0)
    check_int("top_k", top_k, 0, " (0 = no limit)")
    check_float("top_p", top_p, "a number in (0, 1]", lambda v: 0 < v <= 1)
    check_int("seed", seed, 0)


def _grid_list(value: Any, name: str) -> list[Any]:
    """Puzzles or solutions as a list: a sequence of them, or an array [N, 81]; a bare string is refused."""
    if isinstance(value, (str, bytes)):
        raise MoeError(f"{name}: expected a list of grids (81-character strings or 81 integers 0-9) or an array "
                       f"[N, 81], got a single {type(value).__name__} (wrap it in a list)")
    if isinstance(value, np.ndarray):
        if value.ndim != 2:
            raise MoeError(f"{name}: expected an array [N, {sudoku.CELLS}], got shape {value.shape}")
        return list(value)
    try:
        return list(value)
    except TypeError:
        raise MoeError(f"{name}: expected a list of grids (81-character strings or 81 integers 0-9), got "
                       f"{type(value).__name__}") from None


def max_batch_rows(info: ModelInfo) -> int:
    """Rows one forward pass may hold within MAX_BATCH_ELEMENTS (module docstring, "Batching"); sizes the exported
    metadata does not carry count as 0."""
    found = info.config.get("model")
    model: dict[str, Any] = found if isinstance(found, dict) else {}

    def size(key: str) -> int:
        v = model.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0

    T = info.max_seq_len
    per_position = (info.halt_max_steps * info.vocab_size + size("n_heads") * T + size("n_experts") * size("d_expert")
                    + 8 * size("d_model"))
    return max(1, MAX_BATCH_ELEMENTS // (T * per_position))


# -----------------------------------------------------------------------------
# the server


class Server:
    def __init__(self, model: OrtModel | StepwiseModel, decoder: Decoder | None = None) -> None:
        self.model = model
        # generation with the KV cache (moe_core/runtime/decoding.py); None: recompute every prefix
        self.decoder = decoder
        self.tokenizer = model.tokenizer
        self.eot_id: int | None = self.tokenizer.token_to_id(EOT)
        self.stats = ServeStats()

    @classmethod
    def open(cls, model_path: str | os.PathLike, provider: str = "auto", threads: int | None = None,
             runtime: str = "auto", max_steps: int | None = None, halting: bool = True, cache: bool = True) -> Self:
        """Load MODEL.onnx and the tokenizer beside it (both checked); provider "auto" | "cuda" | "cpu"; runtime
        "auto" (the step graph when the model has one) | "unrolled" | "stepwise" (see the module docstring).
        max_steps / halting=False: run up to max_steps steps / ignore the halt head (step graph only). threads is
        cut to the CPUs this process may use. cache: generate with the decode graph when the model has one (the
        exported steps with halting: not with max_steps / halting=False)."""
        if threads is not None:
            check_int("threads", threads, 1)
        if max_steps is not None:
            check_int("max_steps", max_steps, 1)
        model = open_model(model_path, provider, threads, runtime, max_steps, halting)
        decoder = None
        if cache and max_steps is None and halting and TASKS[model.info.task].generates:
            decoder, why = open_decoder(model.info, provider, threads)
            if why and model.info.decode_graph:
                model.note = f"{model.note}; {why}" if model.note else why
        return cls(model, decoder)

    @property
    def info(self) -> ModelInfo:
        return self.model.info

    @property
    def max_batch_rows(self) -> int:
        """Rows per forward pass at most, whatever batch_size is asked (module docstring, "Batching")."""
        return max_batch_rows(self.info)

    def batch_rows(self, batch_size: Any) -> int:
        """batch_size, checked, cut to max_batch_rows."""
        return min(check_int("batch_size", batch_size, 1), self.max_batch_rows)

    def files(self) -> list[tuple[Path, str]]:
        """(path, what) of every file of the exported model: the graph, its tokenizer, its step and decode graphs
        (when the export has them, served or not); no output may replace them."""
        info = self.info
        out = [(info.path, "the model"), (info.tokenizer_path, "the model's tokenizer")]
        if info.step_graph:
            out.append((info.path.with_name(info.step_graph), "the model's step graph"))
        if info.decode_graph:
            out.append((info.path.with_name(info.decode_graph), "the model's decode graph"))
        return out

    def steps_note(self) -> str:
        """' (up to K steps, halt head ignored)' when the steps served differ from the exported ones, else ''."""
        m = self.model
        if not isinstance(m, StepwiseModel) or (m.n_steps == m.info.halt_max_steps and m.halting):
            return ""
        return f" (serving up to {m.n_steps} steps{'' if m.halting else ', halt head ignored'})"

    @property
    def provider(self) -> str:
        return self.model.provider  # what the session really runs on: "cuda" or "cpu"

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        # No post-processor tokens: a text is scored / continued exactly as written.
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def _forward(self, rows: Sequence[Sequence[int]] | np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        ids, mask = pad_batch(rows)
        self._count(int(mask.sum()), mask.size)
        return check_finite(self.model.run(ids, mask, outputs), outputs, self.info.path)

    def _count(self, valid: int, size: int) -> None:
        self.stats.positions += valid
        self.stats.padding += size - valid

    # -- score -----------------------------------------------------------------------------------------

    def window_stride(self, stride: int | None = None) -> int:
        """The sliding-window stride for long texts: `stride`, checked, or max_seq_len // 2."""
        T = self.info.max_seq_len
        stride = stride or max(1, T // 2)
        if not 1 <= stride < T:  # a window must keep at least one token of context for its first target
            raise MoeError(f"stride: expected 1..{T - 1} (below the model's max_seq_len {T}), got {stride}")
        return stride

    def score(self, texts: Sequence[str], batch_size: int = 32, return_token_logprobs: bool = False,
              stride: int | None = None, progress: Progress | None = None) -> list[ScoreResult]:
        """Per-text mean NLL / perplexity of the scored tokens, in input order (see the module docstring)."""
        self.require_task("score")
        texts = check_texts(texts)
        T = self.info.max_seq_len
        if stride is not None:
            check_int("stride", stride, 1)
        stride = self.window_stride(stride)
        batch_size = self.batch_rows(batch_size)
        ids = self.encode(texts)
        # One row per window; logp[i][t - 1] = log p(token t of text i | its context).
        rows = [(i, b, e, s) for i, x in enumerate(ids) for b, e, s in windows(len(x), T, stride)]
        logp = [np.zeros(max(0, len(x) - 1), dtype=np.float32) for x in ids]
        halt: list[int | None] = [None] * len(ids)
        n_windows = [0] * len(ids)
        for i, *_ in rows:
            n_windows[i] += 1
        remaining = list(n_windows)
        if progress is not None and remaining.count(0):
            progress(remaining.count(0))  # empty texts: nothing to run
        for batch in length_batches([e - b for _, b, e, _ in rows], batch_size):
            lp, hs = self._forward([ids[rows[k][0]][rows[k][1]:rows[k][2]] for k in batch], [TOKEN_LOGPROBS, HALT_STEP])
            done = 0
            for r, k in enumerate(batch):
                i, b, e, s = rows[k]
                logp[i][s - 1:e - 1] = lp[r, s - b - 1:e - b - 1]  # lp[r, j] scores the row's token j + 1
                if b == 0:
                    halt[i] = int(hs[r])
                remaining[i] -= 1
                done += remaining[i] == 0
            if progress is not None and done:
                progress(done)

        results = []
        for i, lp_i in enumerate(logp):
            nll = ppl = None
            if len(lp_i):
                nll = -float(lp_i.sum(dtype=np.float64)) / len(lp_i)
                ppl = math.exp(nll) if nll < 700 else math.inf  # exp overflows a float past ~709
            results.append(ScoreResult(nll, ppl, len(lp_i), halt[i], n_windows[i],
                                       lp_i.tolist() if return_token_logprobs else None))
        self._account([r.halt_step for r in results], tokens=sum(map(len, ids)), long=sum(len(x) > T for x in ids))
        return results

    # -- generate --------------------------------------------------------------------------------------

    def generate(self, texts: Sequence[str], max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, batch_size: int = 32, first_index: int = 0,
                 progress: Progress | None = None) -> list[GenerateResult]:
        """Continue each text (see the module docstring). `first_index` is the index of texts[0] in a longer
        stream, so that a sample's random generator does not depend on how the stream was cut into calls."""
        self.require_task("generate")
        texts = check_texts(texts)
        check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
        first_index = check_int("first_index", first_index, 0)
        batch_size = self.batch_rows(batch_size)
        T = self.info.max_seq_len
        n_valid = self.tokenizer.get_vocab_size()  # ids past the tokenizer's vocabulary are not tokens
        prompts = self.encode(texts)
        for i, p in enumerate(prompts):
            if not p:
                if self.eot_id is None:
                    raise MoeError(f"text {first_index + i + 1}: empty prompt, and the tokenizer has no {EOT} "
                                   "to start from")
                p.append(self.eot_id)
        sampling = temperature > 0
        # Greedy decoding with the cache: the decode graph picks the token on the device (serve/graph.py), and only
        # token ids come back per token.
        greedy_ids = not sampling and self.decoder is not None and self.decoder.gives_tokens
        results: list[GenerateResult | None] = [None] * len(prompts)
        for batch in length_batches([len(p) for p in prompts], batch_size):
            rngs = {i: np.random.default_rng([seed, first_index + i]) for i in batch} if sampling else {}
            new: dict[int, list[int]] = {i: [] for i in batch}
            prompt_halt: dict[int, int] = {}
            active = list(batch)
            state = None
            while active:
                if self.decoder is None:
                    last, hs = self._forward([(prompts[i] + new[i])[-T:] for i in active], [LAST_LOGITS, HALT_STEP])
                elif state is None:
                    rows = [prompts[i][-T:] for i in active]
                    self._count(sum(map(len, rows)), len(rows) * max(map(len, rows)))
                    last, state = self.decoder.prefill(rows, tokens=greedy_ids)
                    hs = state.halt_step
                # The decoder's logits (_forward checked the uncached ones; for token ids from the graph, a corrupt
                # decode graph is refused when it is opened).
                if self.decoder is not None and not greedy_ids:
                    check_finite([last], [LAST_LOGITS], self.info.path)
                still, rows_still = [], []
                for r, i in enumerate(active):
                    prompt_halt.setdefault(i, int(hs[r]))  # the first forward of a sample is its prompt's
                    t = int(last[r]) if greedy_ids else pick_token(last[r, :n_valid], temperature, top_k, top_p,
                                                                   rngs.get(i))
                    if t != self.eot_id:
                        new[i].append(t)
                    if t == self.eot_id or len(new[i]) == max_new_tokens:
                        reason = "eot" if t == self.eot_id else "length"
                        results[i] = GenerateResult(self.tokenizer.decode(new[i]), new[i], reason,
                                                    prompt_halt[i])
                    else:
                        still.append(i)
                        rows_still.append(r)
                if progress is not None and len(still) < len(active):
                    progress(len(active) - len(still))
                if self.decoder is not None and still:
                    assert state is not None  # the prefill above made it
                    state = self.decoder.keep(state, rows_still)
                    self._count(len(still), len(still))
                    last, state = self.decoder.step([new[i][-1] for i in still], state,
                                                    [prompts[i] + new[i] for i in still], greedy=greedy_ids)
                    hs = state.halt_step
                active = still
        done = cast(list[GenerateResult], results)  # every sample ended (eot or length) with its result
        self._account([r.halt_step for r in done], tokens=sum(len(r.tokens) for r in done),
                      long=sum(len(p) > T for p in prompts))
        return done

    # -- solve -----------------------------------------------------------------------------------------

    def solve(self, puzzles: Sequence[str | np.ndarray] | np.ndarray,
              solutions: Sequence[str | np.ndarray | None] | np.ndarray | None = None, batch_size: int = 32,
              progress: Progress | None = None) -> list[SolveResult]:
        """Solve each puzzle (81-character strings, '.' or '0' for a blank, or uint8 grids [81]), in input order;
        `solutions` (same forms, None where unknown) sets each result's `correct`. See the module docstring."""
        self.require_task("solve")
        batch_size = self.batch_rows(batch_size)
        puzzles = _grid_list(puzzles, "puzzles")
        grids = np.zeros((len(puzzles), sudoku.CELLS), dtype=np.uint8)
        for i, p in enumerate(puzzles):
            grids[i] = to_grid(p, f"puzzles[{i}]")
        solutions = [None] * len(grids) if solutions is None else _grid_list(solutions, "solutions")
        given = [None if g is None else to_grid(g, f"solutions[{i}]") for i, g in enumerate(solutions)]
        if len(given) != len(grids):
            raise MoeError(f"solutions: {len(given)} for {len(grids)} puzzles; expected one per puzzle "
                           "(None where unknown)")
        answers = np.zeros_like(grids)
        steps = np.zeros(len(grids), dtype=np.int64)
        for i in range(0, len(grids), batch_size):
            rows = grids[i:i + batch_size].astype(np.int64)
            logits, hs = self._forward(rows, [LOGITS, HALT_STEP])
            answers[i:i + len(rows)] = sudoku.cell_answers(logits)
            steps[i:i + len(rows)] = hs
            if progress is not None:
                progress(len(rows))
        valid = sudoku.valid_solutions(grids, answers)  # the rules decide, never the model
        results = [SolveResult(sudoku.format_grid(p), "".join(map(str, a)), int(n), bool(v),
                               None if g is None else bool(np.array_equal(a, g)))
                   for p, a, n, v, g in zip(grids, answers, steps, valid, given, strict=True)]
        self._account(steps.tolist(), tokens=grids.size, long=0)
        st = self.stats
        st.valid += int(valid.sum())
        st.checked += sum(r.correct is not None for r in results)
        st.correct += sum(bool(r.correct) for r in results)
        return results

    # -- bookkeeping -----------------------------------------------------------------------------------

    def require_task(self, mode: str) -> None:
        """MoeError naming the model file when `mode` (score / generate / solve) is not for its task."""
        task, wanted = TASKS[self.info.task], MODES[mode]
        if wanted is not task:
            raise MoeError(f"{self.info.path}: --mode {mode} needs {wanted.title} (task {wanted.name}), but this "
                           f"model's task is {task.name}; use --mode {' or --mode '.join(task.serve_modes)}")

    def _account(self, halts: Sequence[int | None], tokens: int, long: int) -> None:
        s = self.stats
        s.sequences += len(halts)
        s.tokens += tokens
        s.long_inputs += long
        known = [h for h in halts if h is not None]
        s.halt_sum += sum(known)
        s.halt_count += len(known)
