"""Sudoku without downloads: grids, rules, an exact solver, a seeded generator, augmentation and disjoint splits.

A grid is a numpy uint8 array of shape [81] (row-major), 0 for a blank and 1..9 for a digit; a batch is [N, 81].
Pure Python + numpy (no torch), so serving and tests can check solutions without the model.

  parse_grid / format_grid / read_puzzle_file   text: 81 characters a grid, '.' or '0' for a blank
  VOCAB / digit_tokenizer / cell_answers        a Sudoku model's tokens: a cell's token id is its digit (0 =
                                                blank), and a cell's answer is its likeliest digit 1..9
  conflict / why_invalid / valid_solutions      the rules: what makes a solution valid (never the model's word)
  check_givens / check_solution                 the same rules as input checks: MoeError naming the grid
  search / solve / count_solutions              exact solver: bitmasks, naked + hidden singles, fewest candidates
                                                first; counts solutions up to a limit and reports its effort
  deduction_rounds                              how hard: rounds of singles placed all at once (a model's pass
                                                through its block can take about one such round)
  generate                                      puzzles with exactly one solution, deterministic by seed
  augment                                       the validity-preserving symmetry group, per sample, vectorised
  equivalence_keys / make_splits / make_ladder  train/test sets and difficulty levels (one set per number of
                                                givens), no puzzle equivalent to one of another set
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Sequence, Set
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np

from ..common.errors import MoeError, os_reason
from ..common.jsonl import decode_text, read_lines

CELLS = 81
BLANKS = ".0"
GRID_CHARS = "123456789" + BLANKS
MAX_FILE_BYTES = 1 << 30  # ~6M puzzle+solution lines; the arrays would be ~1 GB
MAX_LINE_CHARS = 1024  # a puzzle and its solution are 163 characters
MIN_GIVENS = 17  # no 16-clue Sudoku has a unique solution (McGuire et al., 2012)
# The givens a generated set may ask for: below 22, random blanking reaches the target in fewer than 1 grid of 20
# (generate), so a set takes minutes; 81 is a solved grid, nothing left to solve.
GENERATED_GIVENS = (22, 80)
VOCAB = 10  # a Sudoku model's vocabulary: blank + 9 digits; the token id of a cell is its digit, 0 = blank

T = TypeVar("T")

# Geometry. UNITS[u] are the 9 cells of unit u: rows 0-8, columns 9-17, boxes 18-26.
_R = tuple(i // 9 for i in range(CELLS))
_C = tuple(i % 9 for i in range(CELLS))
_B = tuple(i // 27 * 3 + i % 9 // 3 for i in range(CELLS))
UNITS = np.array([[r * 9 + c for c in range(9)] for r in range(9)]
                 + [[r * 9 + c for r in range(9)] for c in range(9)]
                 + [[i for i in range(CELLS) if _B[i] == b] for b in range(9)], dtype=np.intp)  # [27, 9]
_UNIT_CELLS = tuple(tuple(int(i) for i in unit) for unit in UNITS)
_UNIT_NAMES = [f"{kind} {k + 1}" for kind in ("row", "column", "box") for k in range(9)]

# Digit d is bit 1 << (d - 1) of a 9-bit candidate mask.
_ALL = 0x1FF
_POP = tuple(bin(m).count("1") for m in range(512))
_BITS = tuple(tuple(1 << d for d in range(9) if m >> d & 1) for m in range(512))
_DIGIT = {1 << d: d + 1 for d in range(9)}


# -----------------------------------------------------------------------------
# text


def parse_grid(text: str, where: str) -> np.ndarray:
    """81 characters (surrounding whitespace ignored): digits 1-9, '.' or '0' for a blank -> uint8 [81].

    MoeError naming `where` (e.g. "puzzles.txt:7") for a wrong length or character."""
    s = text.strip()
    if len(s) != CELLS:
        raise MoeError(f"{where}: a grid of {len(s)} characters; expected {CELLS} (digits 1-9, '.' or '0' for a blank)")
    bad = next((k for k, ch in enumerate(s) if ch not in GRID_CHARS), None)
    if bad is not None:
        raise MoeError(f"{where}: character {s[bad]!r} at cell {bad + 1}; expected digits 1-9, '.' or '0' for a blank")
    grid = np.frombuffer(s.encode("ascii"), dtype=np.uint8) - ord("0")
    grid[grid > 9] = 0  # '.' (46 - 48 wraps to 254)
    return grid


def format_grid(grid: np.ndarray) -> str:
    """81 characters, '.' for a blank: the inverse of parse_grid."""
    return "".join(".123456789"[d] for d in _as_grid(grid))


def read_puzzle_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Puzzles [N, 81] and, when every line carries one, solutions [N, 81] (else None) from a text file.

    One puzzle a line, optionally followed by its solution after a comma or white space (a CSV such as
    "quizzes,solutions" works: a first line of words only is taken as a header). Blank lines and lines
    starting with '#' are skipped. Givens must not conflict and a solution must solve its puzzle; every error
    names path:line."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise MoeError(f"{path}: puzzle file not found") from None
    except OSError as e:
        raise MoeError(f"{path}: cannot read ({os_reason(e)})") from None
    if not path.is_file():
        raise MoeError(f"{path}: not a file; expected a text file of 81-character Sudoku lines")
    if size > MAX_FILE_BYTES:
        raise MoeError(f"{path}: {size:,} bytes; expected a puzzle file of at most {MAX_FILE_BYTES >> 20} MiB")
    puzzles: list[np.ndarray] = []
    solutions: list[np.ndarray] = []
    first = True
    for lineno, raw in read_lines(path):
        where = f"{path}:{lineno}"
        if len(raw) > MAX_LINE_CHARS:
            raise MoeError(f"{where}: line of {len(raw):,} bytes; expected a puzzle of 81 characters "
                           "and an optional solution")
        line = decode_text(raw, where, unit="column").strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split(",")] if "," in line else line.split()
        if first and all(f.replace("_", "").isalpha() for f in fields):
            first = False
            continue  # a CSV header
        first = False
        if len(fields) > 2:
            raise MoeError(f"{where}: {len(fields)} fields; expected a puzzle and an optional solution")
        if puzzles and (len(fields) == 2) != bool(solutions):
            raise MoeError(f"{where}: {'a' if len(fields) == 2 else 'no'} solution, unlike the lines before; "
                           "expected a solution on every line or on none")
        puzzle = check_givens(parse_grid(fields[0], f"{where} (puzzle)"), f"{where} (puzzle)")
        if len(fields) == 2:
            solutions.append(check_solution(puzzle, parse_grid(fields[1], f"{where} (solution)"),
                                            f"{where} (solution)"))
        puzzles.append(puzzle)
    if not puzzles:
        raise MoeError(f"{path}: no puzzles; expected lines of 81 characters (digits 1-9, '.' or '0' for a blank)")
    return np.stack(puzzles), (np.stack(solutions) if solutions else None)


def digit_tokenizer() -> Any:
    """A `tokenizers` Tokenizer for grids (the tokenizer.json of a Sudoku run): one token per character, the
    token id of a digit its value, '.' read as '0' (blank). Imports `tokenizers` only when called."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers  # noqa: PLC0415

    tok = Tokenizer(models.WordLevel({str(d): d for d in range(VOCAB)}, unk_token="0"))
    tok.normalizer = normalizers.Replace(".", "0")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


def cell_answers(logits: Any) -> Any:
    """Each cell's answer from a Sudoku model's logits [..., VOCAB] (a numpy array or a torch tensor, the same
    type back): the likeliest digit 1..9. The blank token is never an answer."""
    return logits[..., 1:VOCAB].argmax(-1) + 1


def _as_grid(grid: np.ndarray) -> np.ndarray:
    grid = np.asarray(grid)
    if grid.shape != (CELLS,) or not np.issubdtype(grid.dtype, np.integer) or grid.min() < 0 or grid.max() > 9:
        raise MoeError(f"sudoku grid of shape {grid.shape} and dtype {grid.dtype}; expected {CELLS} integers 0-9")
    return grid.astype(np.uint8, copy=False)


def _as_batch(grids: np.ndarray, what: str, digits: bool = True) -> np.ndarray:
    """[N, 81] integers; with `digits`, all of them 0-9."""
    grids = np.asarray(grids)
    if (grids.ndim != 2 or grids.shape[1] != CELLS or not np.issubdtype(grids.dtype, np.integer)
            or digits and grids.size and (grids.min() < 0 or grids.max() > 9)):
        raise MoeError(f"sudoku {what} of shape {grids.shape} and dtype {grids.dtype}; expected [N, {CELLS}] "
                       f"integers{' 0-9' if digits else ''}")
    return grids


def _as_pairs(puzzles: np.ndarray, solutions: np.ndarray, digits: bool = True) -> tuple[np.ndarray, np.ndarray]:
    puzzles, solutions = _as_batch(puzzles, "puzzles"), _as_batch(solutions, "solutions", digits)
    if puzzles.shape != solutions.shape:
        raise MoeError(f"sudoku puzzles {puzzles.shape} and solutions {solutions.shape}; expected the same shape")
    return puzzles, solutions


# -----------------------------------------------------------------------------
# rules


def conflict(grid: np.ndarray) -> str | None:
    """The first rule a (partial) grid breaks, e.g. "row 3 holds 5 twice"; None when no unit repeats a digit."""
    units = _as_grid(grid)[UNITS]  # [27, 9]
    for name, unit in zip(_UNIT_NAMES, units, strict=True):
        counts = np.bincount(unit, minlength=10)[1:]
        most = int(counts.max())
        if most > 1:
            return f"{name} holds {int(counts.argmax()) + 1} {'twice' if most == 2 else f'{most} times'}"
    return None


def why_invalid(puzzle: np.ndarray, solution: np.ndarray) -> str | None:
    """Why `solution` is not a solution of `puzzle` (a blank, a changed given, a repeated digit); None if it is."""
    puzzle, solution = _as_grid(puzzle), _as_grid(solution)
    if (solution == 0).any():
        i = int(np.argmax(solution == 0))
        return f"cell r{_R[i] + 1}c{_C[i] + 1} is blank"
    changed = (puzzle != 0) & (puzzle != solution)
    if changed.any():
        i = int(np.argmax(changed))
        return f"the given {puzzle[i]} at r{_R[i] + 1}c{_C[i] + 1} became {solution[i]}"
    return conflict(solution)


def check_givens(puzzle: np.ndarray, where: str) -> np.ndarray:
    """`puzzle`, when its givens break no rule; else MoeError naming `where` and the rule."""
    broken = conflict(puzzle)
    if broken:
        raise MoeError(f"{where}: the givens conflict ({broken}); expected no digit twice in a row, column or box")
    return puzzle


def check_solution(puzzle: np.ndarray, solution: np.ndarray, where: str) -> np.ndarray:
    """`solution`, when it solves `puzzle`; else MoeError naming `where` (the solution) and why not."""
    reason = why_invalid(puzzle, solution)
    if reason:
        raise MoeError(f"{where}: does not solve the puzzle ({reason})")
    return solution


def is_valid_solution(puzzle: np.ndarray, solution: np.ndarray) -> bool:
    """Complete, every row / column / box a permutation of 1..9, and every given kept."""
    return why_invalid(puzzle, solution) is None


def valid_solutions(puzzles: np.ndarray, solutions: np.ndarray) -> np.ndarray:
    """is_valid_solution for a batch: bool [N] (vectorised). Solutions may hold any integers (a model's output)."""
    puzzles, solutions = _as_pairs(puzzles, solutions, digits=False)
    in_range = ((solutions >= 1) & (solutions <= 9)).all(axis=1)
    bits = np.left_shift(1, np.clip(solutions, 0, 10).astype(np.int32))[:, UNITS]  # [N, 27, 9]
    # nine digits whose bits cover 1..9 are a permutation of 1..9
    units_ok = (np.bitwise_or.reduce(bits, axis=2) == 0x3FE).all(axis=1)
    givens_kept = ((puzzles == 0) | (puzzles == solutions)).all(axis=1)
    return in_range & units_ok & givens_kept


# -----------------------------------------------------------------------------
# solver


class Search(NamedTuple):
    solutions: list[np.ndarray]  # up to `limit`, each uint8 [81], in search order
    nodes: int  # propagation nodes visited
    guesses: int  # digits tried at cells with 2+ candidates; 0 = singles alone solve it (and prove it unique)


class _Solver:
    """Depth-first search over a grid held as Python ints (numpy scalars cost an object each per operation here).

    Each node places singles until none is left, then branches on the empty cell with the fewest candidates.
    State is the grid plus the digits used per row / column / box as 9-bit masks; every node undoes its own
    placements, so the state is as the caller left it after a call. `rand` tries digits in random order;
    `hidden=False` skips hidden singles (cheaper where they are rare, as on an empty grid)."""

    def __init__(self, grid: list[int], limit: int, rand: Callable[[], float] | None = None,
                 hidden: bool = True) -> None:
        self.grid, self.limit, self.rand, self.hidden = grid, limit, rand, hidden
        self.rows, self.cols, self.boxes = [0] * 9, [0] * 9, [0] * 9
        self.solutions: list[list[int]] = []
        self.nodes = self.guesses = 0
        self.ok = True  # False when two givens conflict: no solution
        for i, d in enumerate(grid):
            if d and not self.place(i, 1 << (d - 1)):
                self.ok = False

    def place(self, i: int, bit: int) -> bool:
        r, c, b = _R[i], _C[i], _B[i]
        if (self.rows[r] | self.cols[c] | self.boxes[b]) & bit:
            return False
        self.rows[r] |= bit
        self.cols[c] |= bit
        self.boxes[b] |= bit
        self.grid[i] = _DIGIT[bit]
        return True

    def unplace(self, i: int) -> None:
        bit = ~(1 << (self.grid[i] - 1))
        self.rows[_R[i]] &= bit
        self.cols[_C[i]] &= bit
        self.boxes[_B[i]] &= bit
        self.grid[i] = 0

    def candidates(self, i: int) -> int:
        return _ALL & ~(self.rows[_R[i]] | self.cols[_C[i]] | self.boxes[_B[i]])

    def run(self, empty: list[int] | None = None) -> bool:
        """Search from the current state (`empty`: its blank cells, if known); True when `limit` solutions were
        found and the search stopped there."""
        if not self.ok:
            return False
        return self._node([i for i, d in enumerate(self.grid) if not d] if empty is None else empty)

    def _node(self, empty: list[int]) -> bool:
        self.nodes += 1
        trail: list[int] = []
        found = self._propagate(empty, trail)
        stop = False
        if found is None:
            pass  # a contradiction
        elif not found[0]:
            self.solutions.append(self.grid.copy())
            stop = len(self.solutions) >= self.limit
        else:
            empty, best, bits = found
            empty.remove(best)
            for bit in _shuffled(_BITS[bits], self.rand) if self.rand else _BITS[bits]:
                self.guesses += 1
                self.place(best, bit)  # always legal: deeper nodes undo all they place
                stop = self._node(empty)
                self.unplace(best)
                if stop:
                    break
        for i in trail:
            self.unplace(i)
        return stop

    def _propagate(self, empty: list[int], trail: list[int]) -> tuple[list[int], int, int] | None:
        """Place singles (appending their cells to `trail`) until none is left. None on a contradiction; else
        the cells still empty and, if any, the one with the fewest candidates and its candidate mask."""
        grid, rows, cols, boxes, R, C, B, POP, DIGIT = (self.grid, self.rows, self.cols, self.boxes, _R, _C, _B,
                                                        _POP, _DIGIT)
        while True:
            # naked singles: a cell with one candidate left takes it (one pass may place many)
            rest, forced, best, best_m, best_n, cand = [], False, -1, 0, 10, [0] * CELLS
            for i in empty:
                r, c, b = R[i], C[i], B[i]
                m = 0x1FF & ~(rows[r] | cols[c] | boxes[b])
                n = POP[m]
                if n == 1:
                    rows[r] |= m
                    cols[c] |= m
                    boxes[b] |= m
                    grid[i] = DIGIT[m]
                    trail.append(i)
                    forced = True
                elif n == 0:
                    return None
                else:
                    cand[i] = m
                    rest.append(i)
                    if n < best_n:
                        best, best_m, best_n = i, m, n
            empty = rest
            if forced:
                continue  # masks seen early in the pass may be stale
            if not empty or not self.hidden:
                return empty, best, best_m
            # hidden singles: a digit with one place left in a row / column / box goes there
            used = (rows, cols, boxes)
            for u, cells in enumerate(_UNIT_CELLS):
                once = twice = 0
                for i in cells:
                    twice |= once & cand[i]
                    once |= cand[i]
                if once | used[u // 9][u % 9] != 0x1FF:
                    return None  # a digit has no place left in this unit
                for bit in _BITS[once & ~twice]:
                    i = next(i for i in cells if cand[i] & bit)
                    if grid[i] == DIGIT[bit]:
                        continue  # the only place in two units
                    if grid[i] or not self.place(i, bit):
                        return None  # taken by another hidden single of this pass
                    trail.append(i)
                    forced = True
            if not forced:
                return empty, best, best_m
            empty = [i for i in empty if not grid[i]]


def _shuffled(items: Sequence[T], rand: Callable[[], float]) -> list[T]:
    """Fisher-Yates driven by random.Random.random() alone: the one stream Python promises never to change."""
    out = list(items)
    for k in range(len(out) - 1, 0, -1):
        j = int(rand() * (k + 1))
        out[k], out[j] = out[j], out[k]
    return out


def search(grid: np.ndarray, limit: int = 1) -> Search:
    """Up to `limit` solutions of a grid, with the effort it took (a search to limit=2 proves uniqueness)."""
    if limit < 1:
        raise MoeError(f"sudoku search limit={limit}; expected 1 or more")
    solver = _Solver(_as_grid(grid).tolist(), limit)
    solver.run()
    return Search([np.array(s, dtype=np.uint8) for s in solver.solutions], solver.nodes, solver.guesses)


def solve(grid: np.ndarray) -> np.ndarray | None:
    """A solution (uint8 [81]) of a grid, or None when it has none."""
    found = search(grid, limit=1).solutions
    return found[0] if found else None


def count_solutions(grid: np.ndarray, limit: int = 2) -> int:
    """The number of solutions, counted up to `limit` (limit=2: 0 none, 1 unique, 2 several)."""
    return len(search(grid, limit).solutions)


class Rounds(NamedTuple):
    rounds: int  # rounds in which singles were placed
    left: int  # blanks left when no single remains: 0 = singles alone solve the grid (Search.guesses == 0)


def deduction_rounds(grid: np.ndarray, hidden: bool = True) -> Rounds:
    """How many rounds of deduction a grid takes: in each round every single of the grid as it stands is placed
    at once — naked singles (a cell with one candidate) and, with `hidden`, hidden singles (a digit with one
    place left in a row, column or box) — until the grid is full or no single is left.

    The search's propagation (search) places singles one after another, each seeing the last; here a round sees
    only what earlier rounds placed, as a model's pass through its block sees only the previous pass's state, so
    the rounds count the longest chain of deductions. On a grid with one solution every single is that
    solution's digit, so the rounds end in the state the search's propagation reaches: left == 0 exactly when
    the search needs no guess. A grid without a solution stops at its first contradiction."""
    solver = _Solver(_as_grid(grid).tolist(), limit=1)
    if not solver.ok:
        raise MoeError("sudoku grid: the givens conflict; expected no digit twice in a row, column or box")
    empty = [i for i, d in enumerate(solver.grid) if not d]
    rounds = 0
    while empty:
        cand = {i: solver.candidates(i) for i in empty}
        found = {i: m for i, m in cand.items() if _POP[m] == 1}  # cell -> the bit it takes this round
        if hidden:
            for cells in _UNIT_CELLS:
                once = twice = 0
                for i in cells:
                    m = cand.get(i, 0)
                    twice |= once & m
                    once |= m
                for bit in _BITS[once & ~twice]:
                    i = next(i for i in cells if cand.get(i, 0) & bit)
                    if found.setdefault(i, bit) != bit:
                        return Rounds(rounds, len(empty))  # two digits forced into one cell: no solution
        if not found or 0 in cand.values():
            break
        if not all(solver.place(i, bit) for i, bit in found.items()):
            break  # two cells of a unit forced to the same digit: no solution
        rounds += 1
        empty = [i for i in empty if not solver.grid[i]]
    return Rounds(rounds, len(empty))


# -----------------------------------------------------------------------------
# generator


class SudokuSet(NamedTuple):
    puzzles: np.ndarray  # uint8 [N, 81], 0 = blank
    solutions: np.ndarray  # uint8 [N, 81], each the puzzle's only solution
    guesses: np.ndarray  # int32 [N]: search effort (Search.guesses) to solve the puzzle and prove it unique


def _full_grid(rand: Callable[[], float]) -> list[int]:
    solver = _Solver([0] * CELLS, limit=1, rand=rand, hidden=False)
    solver.run()
    return solver.solutions[0]


def _unique_without(solver: _Solver, i: int, digit: int, empty: list[int]) -> bool:
    """Whether the unique puzzle in `solver` stays unique with cell i (holding `digit`) blanked.

    Any other solution of the reduced puzzle must differ at i, so try each other candidate of i and search for
    one solution: cheaper than counting to two."""
    solver.unplace(i)
    others = solver.candidates(i) & ~(1 << (digit - 1))
    unique = True
    for bit in _BITS[others]:
        solver.place(i, bit)
        solver.solutions.clear()
        found = solver.run(empty)
        solver.unplace(i)
        if found:
            unique = False
            break
    solver.place(i, 1 << (digit - 1))
    return unique


def _carve(solution: list[int], target: int, rand: Callable[[], float]) -> list[int]:
    """Blank cells of a full grid in random order, keeping the solution unique, until `target` givens are left
    (or no cell can be blanked: the puzzle is then minimal, with more givens than the target)."""
    solver = _Solver(solution.copy(), limit=1)
    empty: list[int] = []
    for i in _shuffled(range(CELLS), rand):
        if CELLS - len(empty) <= target:
            break
        if _unique_without(solver, i, solution[i], empty):
            solver.unplace(i)
            empty.append(i)
    return solver.grid


def _givens_range(givens: int | tuple[int, int]) -> tuple[int, int]:
    pair = list(givens) if isinstance(givens, tuple | list) else [givens] * 2  # a TOML range is a list
    whole = all(isinstance(g, int | np.integer) and not isinstance(g, bool) for g in pair)
    if not (len(pair) == 2 and whole and MIN_GIVENS <= pair[0] <= pair[1] <= CELLS):
        raise MoeError(f"sudoku givens={givens!r}; expected a whole number or a (low, high) range within "
                       f"{MIN_GIVENS}..{CELLS}")
    return int(pair[0]), int(pair[1])


def _puzzles(seed: int | str, givens: int | tuple[int, int], min_guesses: int,
             attempts: int) -> Iterator[tuple[list[int], list[int], int]]:
    """Puzzle k of the stream is a function of (seed, k) alone: generate(n) is a prefix of generate(n + 1)."""
    lo, hi = _givens_range(givens)
    k = 0
    while True:
        rand = random.Random(f"moe.sudoku/{seed}/{k}").random
        target = lo + int(rand() * (hi - lo + 1))
        fewest, hardest = CELLS, -1
        for _ in range(attempts):
            solution = _full_grid(rand)
            puzzle = _carve(solution, target, rand)
            n_givens = sum(1 for d in puzzle if d)
            fewest = min(fewest, n_givens)
            if n_givens > target:
                continue  # the grid got stuck: every remaining given is needed for uniqueness
            proof = _Solver(puzzle.copy(), limit=2)
            proof.run()
            if proof.guesses >= min_guesses:
                yield puzzle, solution, proof.guesses
                break
            hardest = max(hardest, proof.guesses)
        else:
            if hardest < 0:
                raise MoeError(f"sudoku givens={givens}: no unique puzzle with {target} givens in {attempts} full "
                               f"grids (fewest {fewest}); expected at least ~22 givens, or more attempts")
            raise MoeError(f"sudoku min_guesses={min_guesses}: no puzzle with {target} givens needed that many "
                           f"guesses in {attempts} full grids (most {hardest}); expected fewer, or more attempts")
        k += 1


def _collect(puzzles: Iterator[tuple[list[int], list[int], int]], n: int) -> SudokuSet:
    if n < 0:
        raise MoeError(f"sudoku: {n} puzzles asked for; expected 0 or more")
    rows = [next(puzzles) for _ in range(n)]
    return SudokuSet(np.array([p for p, _, _ in rows], dtype=np.uint8).reshape(n, CELLS),
                     np.array([s for _, s, _ in rows], dtype=np.uint8).reshape(n, CELLS),
                     np.array([g for _, _, g in rows], dtype=np.int32))


def generate(n: int, seed: int | str, givens: int | tuple[int, int] = (25, 35), min_guesses: int = 0,
             attempts: int = 500) -> SudokuSet:
    """`n` puzzles with exactly one solution, identical for a seed on any machine and Python version.

    Each puzzle: a random full grid (the solver on an empty grid, digits tried in random order), then cells
    blanked in random order while the solution stays unique, down to exactly a target number of givens drawn
    uniformly from `givens` (an int, or an inclusive (low, high) range). A grid that gets stuck above the
    target (every given left is needed) is replaced by a new one; so is a puzzle that took fewer than
    `min_guesses` guesses to solve and prove unique: min_guesses=1 drops every puzzle that singles alone
    solve. One puzzle not made in `attempts` grids is a MoeError: random blanking gets to 25 givens in 5 grids
    of 6, to 23 in 1 of 4, to 22 in 1 of 20, to 21 in 1 of 300."""
    if attempts < 1:
        raise MoeError(f"sudoku attempts={attempts}; expected 1 or more")
    return _collect(_puzzles(seed, givens, min_guesses, attempts), n)


# -----------------------------------------------------------------------------
# augmentation


def _perms(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Independent uniform permutations of 0..shape[-1]-1, one per leading index."""
    return np.argsort(rng.random(shape), axis=-1, kind="stable")


def _lines(rng: np.random.Generator, n: int) -> np.ndarray:
    """Per sample, an order of the 9 rows (or columns): the 3 bands permuted, then the 3 rows within each."""
    return (_perms(rng, (n, 3))[:, :, None] * 3 + _perms(rng, (n, 3, 3))).reshape(n, 9)  # [N, 9]


def augment(puzzles: np.ndarray, solutions: np.ndarray,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The same random symmetry, drawn per sample, applied to each puzzle and its solution.

    A symmetry is a digit relabelling, the bands (and the rows within each band) permuted, the stacks (and the
    columns within each stack) permuted, and a transposition half of the time: every valid puzzle / solution
    pair maps to a valid pair. Returns new uint8 arrays [N, 81]."""
    puzzles, solutions = _as_pairs(puzzles, solutions)
    n = len(puzzles)
    relabel = np.concatenate([np.zeros((n, 1), np.uint8), 1 + _perms(rng, (n, 9)).astype(np.uint8)], axis=1)
    src = _lines(rng, n)[:, :, None] * 9 + _lines(rng, n)[:, None, :]  # [N, 9, 9] source cell of each cell
    transpose = rng.random(n) < 0.5
    src[transpose] = src[transpose].transpose(0, 2, 1)
    src = src.reshape(n, CELLS)

    def apply(grids: np.ndarray) -> np.ndarray:
        return np.take_along_axis(relabel, np.take_along_axis(grids, src, axis=1).astype(np.intp), axis=1)

    return apply(puzzles), apply(solutions)


# -----------------------------------------------------------------------------
# disjoint splits


def equivalence_keys(puzzles: np.ndarray) -> list[bytes]:
    """A key per puzzle that augment() never changes: equivalent puzzles always have equal keys.

    Each given is described by what the symmetries keep: how many givens share its row, column, box, band and
    stack, how often its digit is given, and how often in its band and in its stack. The key is the sorted
    list of these descriptions, the smaller of the puzzle's and its transpose's (a transposition swaps the row
    and column parts). Inequivalent puzzles may share a key, but rarely: 1,000 generated puzzles had 1,000."""
    puzzles = _as_batch(puzzles, "puzzles")
    n = len(puzzles)
    given = (puzzles > 0).reshape(n, 9, 9).astype(np.int64)  # [N, row, col]
    onehot = (puzzles.reshape(n, 9, 9, 1) == np.arange(1, 10)).astype(np.int64)  # [N, row, col, digit]
    row, col = given.sum(2, keepdims=True), given.sum(1, keepdims=True)
    box = given.reshape(n, 3, 3, 3, 3).sum((2, 4), keepdims=True)
    box = np.broadcast_to(box, (n, 3, 3, 3, 3)).reshape(n, 9, 9)
    band = given.reshape(n, 3, 27).sum(2).repeat(3, 1)[:, :, None]
    stack = given.reshape(n, 9, 3, 3).sum((1, 3)).repeat(3, 1)[:, None, :]
    digit = (onehot * onehot.sum((1, 2), keepdims=True)).sum(3)
    digit_band = (onehot * onehot.reshape(n, 3, 3, 9, 9).sum((2, 3)).repeat(3, 1)[:, :, None, :]).sum(3)
    digit_stack = (onehot * onehot.reshape(n, 9, 3, 3, 9).sum((1, 3)).repeat(3, 1)[:, None, :, :]).sum(3)
    shape = (n, 9, 9)
    feats = [np.broadcast_to(f, shape) for f in (row, col, box, band, stack, digit, digit_band, digit_stack)]
    swap = [feats[k] for k in (1, 0, 2, 4, 3, 5, 7, 6)]  # the same features seen from the transpose

    def codes(fs: list[np.ndarray]) -> np.ndarray:
        code = np.zeros(shape, np.int64)
        for f in fs:  # every feature is 0..81: 7 bits each, 56 bits in all
            code = code << 7 | f
        return np.sort(np.where(given > 0, code, -1).reshape(n, CELLS), axis=1)

    # min: any choice that depends only on the unordered pair {puzzle, transpose} is invariant
    return [min(a.tobytes(), b.tobytes()) for a, b in zip(codes(feats), codes(swap), strict=True)]


def _distinct(stream: str, givens: int | tuple[int, int], n: int, taken: set[bytes], min_guesses: int,
              attempts: int, what: str) -> tuple[SudokuSet, int]:
    """`n` puzzles of the seed stream `stream`, skipping every puzzle whose equivalence key is in `taken` (each
    key taken is added to it); also returns how many were skipped."""
    skipped = 0

    def rows() -> Iterator[tuple[list[int], list[int], int]]:
        nonlocal skipped
        for row in _puzzles(stream, givens, min_guesses, attempts):
            key = equivalence_keys(np.array([row[0]], dtype=np.uint8))[0]
            if key not in taken:
                taken.add(key)
                yield row
                continue
            skipped += 1
            if skipped > 10 * n + 100:  # only when givens leave few keys, e.g. near-complete grids
                raise MoeError(f"sudoku {what}: {skipped} puzzles skipped as equivalent to earlier ones; "
                               f"givens={givens!r} allows too few distinct puzzles, expected fewer givens")

    return _collect(rows(), n), skipped


def make_splits(n_train: int, n_test: int, seed: int | str, givens: int | tuple[int, int] = (25, 35),
                min_guesses: int = 0, attempts: int = 500) -> tuple[SudokuSet, SudokuSet]:
    """Train and test sets, disjoint under every symmetry augment() can apply.

    Train and test come from independent seed streams ("{seed}/train", "{seed}/test"). A puzzle whose
    equivalence key was already taken (by a train puzzle, or an earlier puzzle of its own set) is skipped and
    the stream's next puzzle is used. Since equivalent puzzles always share a key, no test puzzle is a
    relabelled / permuted / transposed copy of a train puzzle, nor of another test puzzle, so augmenting the
    train set can never produce a test puzzle. Not guaranteed: that no test solution grid is equivalent to a
    train solution grid (there are ~5.5e9 inequivalent grids, so for independent streams it is improbable).
    The train set is not generate(n_train, seed): each set has its own stream."""
    taken: set[bytes] = set()
    train, _ = _distinct(f"{seed}/train", givens, n_train, taken, min_guesses, attempts, "splits: train")
    test, _ = _distinct(f"{seed}/test", givens, n_test, taken, min_guesses, attempts, "splits: test")
    return train, test


def make_ladder(levels: list[int], n: int, seed: int | str, exclude: Set[bytes] = frozenset(),
                attempts: int = 500) -> list[tuple[SudokuSet, int]]:
    """A difficulty ladder: for each number of givens in `levels`, `n` puzzles with exactly that many givens and
    one solution, with how many of its stream's puzzles were skipped.

    Level g is the stream "ladder/{seed}/{g}", which no train / test stream of make_splits can be (their seeds are
    the run's seed, then "/train" or "/test"). A puzzle equivalent to one in `exclude` (equivalence_keys, e.g. of
    a run's training set) or to an earlier ladder puzzle is skipped, so the ladder is held out under the symmetry
    group. Deterministic: the same arguments give the same ladder on every machine."""
    taken = set(exclude)
    return [_distinct(f"ladder/{seed}/{g}", g, n, taken, 0, attempts, f"ladder ({g} givens)") for g in levels]
