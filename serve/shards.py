"""The batch job `moe serve` runs, whatever the engine (in-process or Ray): its inputs, what each record becomes,
and its outputs.

Inputs. `--input` is one file, or a set of shards: a directory (its files ending in .jsonl / .json / .ndjson, and for
`--mode solve` also .txt / .csv; hidden files and an output set's manifest.json are skipped) or a glob pattern (every
file it matches). Shards are served in the order of their sorted paths, one stream of records: a record's position
in that stream is what seeds its sampling (`--seed`), so results do not depend on how the input was cut.
Each shard is read and checked as a single input is (one line `error: <file:line>: ...` for the first bad record;
an empty shard is an error like an empty input).

Outputs. One input file gives one `--output` file, as always. A set of shards gives a directory `--output`: one
JSONL file per input shard, named after it (the input's name with .jsonl as its suffix), plus MANIFEST (counts,
the model's sha256, mode, settings) written last. The directory is built beside `--output` under a temp name and
renamed into place when complete, so a reader sees no set or a complete one, and a failed or interrupted run leaves
nothing behind; the manifest is there for readers that see files as they are copied (object stores, rsync), so that
they know the set is complete. With --overwrite, an existing set (a directory holding a manifest) is replaced;
a directory of other files never is.

What a record becomes: `serve_chunk` runs a list of records through a Server for the job's mode and gives one
output line per record (`record_line`: {"id": ..., **result}); both engines call it, so both write the same lines.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar, cast

from moe_core.common.errors import MoeError, is_io_error, os_reason
from moe_core.common.files import UMASK, atomic_output, atomic_write_text, check_output, fsync_dir, signals_deferred
from moe_core.runtime.stepwise import StepCounts

from .jsonl import JSONL_SUFFIXES, PUZZLE_FILE_SUFFIXES, chunked, count_records
from .server import ServeStats

if TYPE_CHECKING:
    from .server import GenerateResult, Progress, ScoreResult, Server, SolveResult

T = TypeVar("T")

CHUNK_BATCHES = 64  # records per Server call = CHUNK_BATCHES * rows per pass: bounded memory, good length sorting
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
OUTPUT_SUFFIX = ".jsonl"


# -----------------------------------------------------------------------------
# what a record becomes


@dataclass(frozen=True)
class Job:
    """The mode and every setting that shapes a result (the options of `moe serve` after the Server checked them)."""

    mode: str  # score | generate | solve
    rows: int  # rows per forward pass (Server.batch_rows)
    token_logprobs: bool = False
    stride: int | None = None  # score: the window stride (Server.window_stride)
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


def chunks(records: Iterable[T], job: Job) -> Iterator[list[T]]:
    """The in-process engine's units of work, each one Server call: CHUNK_BATCHES * rows records, and at most
    jsonl.CHUNK_TEXT_CHARS of text. The Server sorts a chunk by length into its batches, so the chunk decides which
    records share a batch."""
    weight = (lambda r: 0) if job.mode == "solve" else (lambda r: len(r.text))
    return chunked(records, CHUNK_BATCHES * job.rows, weight)


def record_line(ident: Any, result: Any) -> str:
    """The output line of one record: its id, then the result's fields. Strict JSON: a NaN or an infinity (a
    perplexity past float range) is refused, naming the record, instead of written as a token no parser reads."""
    try:
        return json.dumps({"id": ident, **result.as_record()}, ensure_ascii=False, allow_nan=False)
    except ValueError:
        raise MoeError(f"record {json.dumps(ident, ensure_ascii=False)[:80]}: a result is not a finite number "
                       f"({result.as_record()}); nothing was written") from None


def serve_chunk(server: Server, job: Job, records: Sequence[Any], first_index: int,
                progress: Progress | None = None) -> list[str]:
    """The output lines of `records` (Record or PuzzleRecord, in input order), whose first is record `first_index` of
    the whole input (generation seeds each sample from its position in the input)."""
    results: list[SolveResult] | list[ScoreResult] | list[GenerateResult]
    if job.mode == "solve":
        results = server.solve([r.puzzle for r in records], [r.solution for r in records], job.rows,
                               progress=progress)
    elif job.mode == "score":
        results = server.score([r.text for r in records], job.rows, job.token_logprobs, job.stride,
                               progress=progress)
    else:
        results = server.generate([r.text for r in records], job.max_new_tokens, job.temperature, job.top_k,
                                  job.top_p, job.seed, job.rows, first_index=first_index, progress=progress)
    return [record_line(rec.id, res) for rec, res in zip(records, results, strict=True)]


@dataclass
class Totals:
    """What a run computed, summed over every Server that served it (one in-process, one per Ray worker): the
    summary line's figures."""

    stats: ServeStats = field(default_factory=ServeStats)
    counts: StepCounts = field(default_factory=StepCounts)
    decode_calls: int = 0  # KV-cache generation: decode-graph calls, and refills at max_seq_len
    refills: int = 0
    providers: set[str] = field(default_factory=set)  # what the sessions really ran on: "cpu" / "cuda"

    def add(self, server: Server) -> None:
        """Add what `server` did since its counters were last reset (reset_counters)."""
        for name, value in asdict(server.stats).items():
            setattr(self.stats, name, getattr(self.stats, name) + value)
        for name, value in asdict(server.model.counts).items():
            setattr(self.counts, name, getattr(self.counts, name) + value)
        if server.decoder is not None:
            self.decode_calls += server.decoder.calls
            self.refills += server.decoder.refills
        self.providers.add(server.provider)

    def as_json(self) -> dict[str, Any]:
        return {"stats": asdict(self.stats), "counts": asdict(self.counts), "decode_calls": self.decode_calls,
                "refills": self.refills, "providers": sorted(self.providers)}

    def add_json(self, obj: dict[str, Any]) -> None:
        """Add the figures of another Totals' as_json (a Ray worker's, for one batch)."""
        for target, part in ((self.stats, obj["stats"]), (self.counts, obj["counts"])):
            for name, value in part.items():
                setattr(target, name, getattr(target, name) + value)
        self.decode_calls += obj["decode_calls"]
        self.refills += obj["refills"]
        self.providers.update(obj["providers"])


def reset_counters(server: Server) -> None:
    """Zero the counters Totals.add reads, so that the next add counts only what follows."""
    server.stats = ServeStats()
    server.model.counts = StepCounts()
    if server.decoder is not None:
        server.decoder.calls = server.decoder.refills = 0


# -----------------------------------------------------------------------------
# inputs


@dataclass
class Shard:
    input: Path
    name: str | None  # the output file's name in the output directory; None: the single --output file
    records: int = 0  # counted (every record checked) by count_inputs


@dataclass
class Inputs:
    shards: list[Shard]
    sharded: bool  # a directory or a pattern (a set of shards, even of one), else one input file
    given: str  # --input as given

    @property
    def records(self) -> int:
        return sum(s.records for s in self.shards)

    def paths(self) -> list[Path]:
        return [s.input for s in self.shards]


def find_inputs(input_path: str, mode: str) -> Inputs:
    """The input file, or the shards of a directory / glob pattern (module docstring); MoeError for a directory or a
    pattern that holds none, or two shards whose outputs would have the same name."""
    path = Path(input_path)
    if path.is_dir():
        suffixes = JSONL_SUFFIXES + (PUZZLE_FILE_SUFFIXES if mode == "solve" else ())
        found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.name != MANIFEST and p.suffix.lower() in suffixes)
        if not found:
            raise MoeError(f"{path}: no input shards in this directory; expected files ending in "
                           f"{' / '.join(suffixes)}")
    elif not path.exists() and glob.has_magic(input_path):
        found = sorted(Path(p) for p in glob.glob(input_path) if Path(p).is_file())
        if not found:
            raise MoeError(f"{input_path}: the pattern matches no input file")
    else:
        return Inputs([Shard(path, None)], False, input_path)
    shards: list[Shard] = []
    names: dict[str, Path] = {}
    for p in found:
        name = p.stem + OUTPUT_SUFFIX
        if name in names:
            raise MoeError(f"{p}: its output shard would be {name}, as {names[name]}'s; expected input shards with "
                           "distinct names")
        names[name] = p
        shards.append(Shard(p, name))
    return Inputs(shards, True, input_path)


def count_inputs(inputs: Inputs, read: Callable[[Path], Iterable[Any]], expected: str,
                 keep: list[Any] | None = None) -> int:
    """Check every record of every shard (before any compute) and count them; with `keep`, also collect them there,
    in input order. An empty input or shard is an error (jsonl.count_records)."""
    for shard in inputs.shards:
        if keep is None:
            shard.records = count_records(shard.input, read, expected)
        else:
            def reading(path: Path) -> Iterator[Any]:
                for record in read(path):
                    keep.append(record)
                    yield record

            shard.records = count_records(shard.input, reading, expected)
    return inputs.records


def iter_records(inputs: Inputs, read: Callable[[Path], Iterable[Any]]) -> Iterator[Any]:
    """Every record of every shard, in input order, lazily."""
    for shard in inputs.shards:
        yield from read(shard.input)


# -----------------------------------------------------------------------------
# outputs


def check_outputs(inputs: Inputs, output_path: str, overwrite: bool) -> Path:
    """Refuse the output before any work: for one input file, as check_output does; for shards, a path that is a
    file, an existing set without --overwrite, a directory of other files (never replaced), a missing or read-only
    parent, or a directory that holds an input."""
    if not inputs.sharded:
        return check_output(output_path, overwrite, "--output")
    out = Path(output_path)
    if out.exists() and not out.is_dir():
        raise MoeError(f"{out}: not a directory; a set of input shards ({inputs.given}) writes a directory of output "
                       "shards: expected the path of a directory to create")
    if out.name in ("", ".", ".."):
        raise MoeError(f"{out}: expected the path of a directory to create (not . or ..) for the output shards")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise MoeError(f"{out}: already exists (pass --overwrite to replace it)")
        why = not_an_output_set(out)
        if why:
            raise MoeError(f"{out}: {why}; --overwrite replaces only an output set moe serve wrote (its manifest and "
                           "the shards it lists, nothing else): expected such a set or a new directory")
    if not out.parent.is_dir():
        raise MoeError(f"{out.parent}: output directory does not exist")
    if not os.access(out.parent, os.W_OK):
        raise MoeError(f"{out.parent}: output directory is not writable")
    check_not_inside(out, [(p, "an input shard") for p in inputs.paths()])
    return out


def not_an_output_set(out: Path) -> str:
    """Why the directory `out` is not an output set this project wrote ("" when it is): its manifest must be one
    (this format, its shard list) and the directory must hold that manifest and the shards it lists, nothing else.
    Only such a set is ever replaced (and with it deleted) by --overwrite."""
    from moe_core.common.jsonl import parse_json

    try:
        record = parse_json((out / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"a directory without {MANIFEST}"
    except (OSError, ValueError, UnicodeDecodeError):
        return f"its {MANIFEST} is not one moe serve wrote (unreadable, or not JSON)"
    if not isinstance(record, dict) or record.get("format_version") != MANIFEST_FORMAT:
        return f"its {MANIFEST} is not one moe serve wrote (format_version {MANIFEST_FORMAT} expected)"
    shards = record.get("shards")
    if not isinstance(shards, list) or not all(isinstance(x, dict) and isinstance(x.get("output"), str)
                                               for x in shards):
        return f"its {MANIFEST} is not one moe serve wrote (no list of output shards)"
    listed = {x["output"] for x in shards} | {MANIFEST}
    others = sorted(p.name for p in out.iterdir() if p.name not in listed or not p.is_file())
    if others:
        more = ", ..." if len(others) > 3 else ""
        return f"it holds files its {MANIFEST} does not list ({', '.join(others[:3])}{more})"
    return ""


def check_not_inside(out: Path, files: Iterable[tuple[Path, str]]) -> None:
    """MoeError when a file the command reads lies in the output directory `out` (which is replaced as a whole)."""
    root = out.resolve()
    for path, what in files:
        resolved = path.resolve()
        if resolved == root or root in resolved.parents:
            raise MoeError(f"{out}: --output holds {what} {path}; expected a directory that holds no input of this "
                           "command (--overwrite does not change this)")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def manifest(inputs: Inputs, job: Job, settings: dict[str, Any], model_files: Sequence[tuple[Path, str]],
             engine: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a set of output shards (module docstring): written last, so its presence means complete."""
    model, *others = model_files
    return {
        "format_version": MANIFEST_FORMAT,
        "complete": True,
        "mode": job.mode,
        "records": inputs.records,
        "model": {"path": str(model[0].resolve()), "sha256": file_sha256(model[0])},
        "model_files": [{"path": str(p.resolve()), "what": what, "sha256": file_sha256(p)} for p, what in others],
        "settings": {**asdict(job), **settings},
        "engine": engine,
        "shards": [{"input": str(s.input.resolve()), "output": s.name, "records": s.records} for s in inputs.shards],
    }


@dataclass
class Sink:
    """Writes the output lines of the whole input, in input order, into the output file of each shard in turn (a
    shard's file is complete after its `records` lines)."""

    shards: list[Shard]
    paths: list[str]  # where each shard's lines go (temp files)
    written: int = 0  # lines written to the current shard
    current: int = 0  # index of the current shard
    _file: TextIO | None = field(default=None, repr=False)

    def write(self, line: str) -> None:
        while self.written == self.shards[self.current].records:  # never true for the last shard (see finish)
            self._close()
            self.current += 1
            self.written = 0
        if self._file is None:
            self._file = open(self.paths[self.current], "w", encoding="utf-8")
        self._file.write(line + "\n")
        self.written += 1

    def _close(self) -> None:
        if self._file is None:  # a shard whose lines were never written: create it (empty only for 0 records)
            self._file = open(self.paths[self.current], "w", encoding="utf-8")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def finish(self) -> None:
        """Close the last shard; MoeError (nothing is written) unless every shard got exactly its lines."""
        done = sum(s.records for s in self.shards[:self.current]) + self.written
        total = sum(s.records for s in self.shards)
        if self.current != len(self.shards) - 1 or done != total:
            raise MoeError(f"{done} output records for {total} input records; nothing was written")
        self._close()

    def abandon(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@contextlib.contextmanager
def open_outputs(inputs: Inputs, out: Path, overwrite: bool,
                 make_manifest: Callable[[], dict[str, Any]] | None = None) -> Iterator[Sink]:
    """A Sink for the job's lines; when the block ends normally the outputs are committed (one file: atomic_output;
    shards: the temp directory, manifest written last, renamed into place), when it raises nothing is left."""
    if not inputs.sharded:
        with atomic_output(out, overwrite) as tmp:
            sink = Sink(inputs.shards, [tmp])
            try:
                yield sink
                sink.finish()
            finally:
                sink.abandon()
        return
    tmp_dir: Path | None = None
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        # Sharded inputs: every shard names its output file (find_inputs).
        sink = Sink(inputs.shards, [str(tmp_dir / cast(str, s.name)) for s in inputs.shards])
        try:
            yield sink
            sink.finish()
        finally:
            sink.abandon()
        if make_manifest is not None:
            atomic_write_text(tmp_dir / MANIFEST, json.dumps(make_manifest(), indent=1, ensure_ascii=False) + "\n")
        os.chmod(tmp_dir, 0o777 & ~UMASK)  # mkdtemp makes 0700
        fsync_dir(tmp_dir)
        _commit_dir(tmp_dir, out, overwrite)
        tmp_dir = None
    except BaseException as e:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        if isinstance(e, Exception) and not isinstance(e, MoeError) and is_io_error(e):
            raise MoeError(f"{out}: cannot write ({os_reason(e)}); nothing was written") from None
        raise


def _commit_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished set `tmp` to `out`. A new or empty `out` is replaced by one rename. An existing set (with
    --overwrite) is first renamed aside, so a reader finds the old set, no set for a moment, or the new one, never a
    mix; without --overwrite, a set another process created meanwhile is never replaced."""
    old = None
    with signals_deferred():  # SIGINT / SIGTERM wait until the set is in place (or left as it was)
        if out.is_dir() and any(out.iterdir()):
            if not overwrite:
                raise MoeError(f"{out}: already exists (another process created it while this one ran; pass "
                               "--overwrite to replace it); nothing was written")
            why = not_an_output_set(out)  # again: what is there now is what would be deleted
            if why:
                raise MoeError(f"{out}: {why} (it changed while this command ran); nothing was written")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            try:
                os.rename(out, old / out.name)
            except BaseException:
                old.rmdir()
                raise
        try:
            os.rename(tmp, out)  # onto a missing or empty directory only (POSIX)
        except OSError as e:
            if old is not None:
                os.rename(old / out.name, out)
                old.rmdir()
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise MoeError(f"{out}: already exists (another process created it while this one ran); nothing was "
                               "written") from None
            raise
        fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["MANIFEST", "Inputs", "Job", "Shard", "Sink", "check_not_inside", "check_outputs", "chunks", "count_inputs",
           "find_inputs", "iter_records", "manifest", "open_outputs", "record_line", "serve_chunk"]
