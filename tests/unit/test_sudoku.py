"""moe_core.tasks.sudoku: text, rules, solver, generator, augmentation and disjoint splits. No model, no network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_core.common.errors import MoeError
from moe_core.tasks import sudoku as S

# Well-known puzzles and their solutions, typed in (not computed by the solver under test).
WIKIPEDIA = ("53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79",
             "534678912672195348198342567859761423426853791713924856961537284287419635345286179")
INKALA = ("8..........36......7..9.2...5...7.......457.....1...3...1....68..85...1..9....4..",  # "world's hardest"
          "812753649943682175675491283154237896369845721287169534521974368438526917796318452")
NORVIG_HARD = ("4.....8.5.3..........7......2.....6.....8.4......1.......6.3.7.5..2.....1.4......",
               "417369825632158947958724316825437169791586432346912758289643571573291684164875293")
KNOWN = [WIKIPEDIA, INKALA, NORVIG_HARD]


def grid(text: str) -> np.ndarray:
    return S.parse_grid(text, "test")


@pytest.fixture(scope="module")
def sample() -> S.SudokuSet:
    return S.generate(24, seed=7, givens=(24, 34))


# -----------------------------------------------------------------------------
# text


def test_parse_format_round_trip(sample: S.SudokuSet) -> None:
    puzzle, solution = WIKIPEDIA
    g = grid(puzzle)
    assert g.dtype == np.uint8 and g.shape == (81,) and g[:5].tolist() == [5, 3, 0, 0, 7]
    assert np.array_equal(grid(" " + puzzle.replace(".", "0") + "\n"), g)
    assert S.format_grid(g) == puzzle  # '.' for blanks
    for p in [*sample.puzzles, *sample.solutions]:
        assert np.array_equal(grid(S.format_grid(p)), p)


@pytest.mark.parametrize("text, expected", [
    ("123", "puzzles.txt:7: a grid of 3 characters; expected 81"),
    (WIKIPEDIA[0] + "1", "puzzles.txt:7: a grid of 82 characters; expected 81"),
    (WIKIPEDIA[0][:40] + "x" + WIKIPEDIA[0][41:], "puzzles.txt:7: character 'x' at cell 41;"),
    (WIKIPEDIA[0][:80] + "é", "puzzles.txt:7: character 'é' at cell 81;"),
])
def test_parse_errors(text: str, expected: str) -> None:
    with pytest.raises(MoeError) as e:
        S.parse_grid(text, "puzzles.txt:7")
    assert str(e.value).startswith(expected) and "\n" not in str(e.value)


def test_read_puzzle_file(tmp_path: Path) -> None:
    (p1, s1), (p2, s2) = WIKIPEDIA, INKALA
    csv = tmp_path / "sudoku.csv"
    csv.write_text(f"quizzes,solutions\n# a comment\n\n{p1},{s1}\n{p2.replace('.', '0')} , {s2}\n")
    puzzles, solutions = S.read_puzzle_file(csv)
    assert puzzles.shape == solutions.shape == (2, 81)
    assert [S.format_grid(p) for p in puzzles] == [p1, p2]
    assert [S.format_grid(s) for s in solutions] == [s1, s2]
    txt = tmp_path / "puzzles.txt"
    txt.write_text(f"{p1}\n  {p2}\t\n")
    puzzles, solutions = S.read_puzzle_file(txt)
    assert solutions is None and puzzles.shape == (2, 81)
    txt.write_text(f"{p1}  {s1}\n")
    assert S.read_puzzle_file(txt)[1].shape == (1, 81)


@pytest.mark.parametrize("content, expected", [
    (f"{WIKIPEDIA[0]}\n\n{'55' + WIKIPEDIA[0][2:]}\n", ":3 (puzzle): the givens conflict (row 1 holds 5 twice)"),
    (f"{WIKIPEDIA[0]}\n{WIKIPEDIA[0][:-1]}\n", ":2 (puzzle): a grid of 80 characters"),
    (f"{WIKIPEDIA[0]},{INKALA[1]}\n", ":1 (solution): does not solve the puzzle (the given 5 at r1c1 became 8)"),
    (f"{WIKIPEDIA[0]},{WIKIPEDIA[0]}\n", ":1 (solution): does not solve the puzzle (cell r1c3 is blank)"),
    (f"{WIKIPEDIA[0]},{WIKIPEDIA[1][:80]}x\n", ":1 (solution): character 'x' at cell 81"),
    (f"{WIKIPEDIA[0]},{WIKIPEDIA[1]}\n{INKALA[0]}\n", ":2: no solution, unlike the lines before"),
    (f"{WIKIPEDIA[0]} {WIKIPEDIA[1]} extra\n", ":1: 3 fields; expected a puzzle and an optional solution"),
    ("x" * 5000 + "\n", ":1: line of 5,000 bytes"),
    ("# only a comment\n\n", ": no puzzles"),
    (b"\xff" * 81, ":1: not valid UTF-8"),
])
def test_read_puzzle_file_errors(tmp_path: Path, content: str | bytes, expected: str) -> None:
    path = tmp_path / "puzzles.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(MoeError) as e:
        S.read_puzzle_file(path)
    assert str(e.value).startswith(f"{path}{expected}") and "\n" not in str(e.value)


def test_read_puzzle_file_missing(tmp_path: Path) -> None:
    with pytest.raises(MoeError, match="puzzle file not found"):
        S.read_puzzle_file(tmp_path / "nope.txt")
    with pytest.raises(MoeError, match="not a file"):
        S.read_puzzle_file(tmp_path)


# -----------------------------------------------------------------------------
# rules


def test_rules_on_valid_and_broken_grids() -> None:
    puzzle, solution = grid(WIKIPEDIA[0]), grid(WIKIPEDIA[1])
    assert S.is_valid_solution(puzzle, solution) and S.conflict(puzzle) is None
    swapped = solution.copy()
    swapped[[2, 3]] = swapped[[3, 2]]  # two blanks of row 1 swapped: rows stay permutations, columns do not
    assert S.why_invalid(puzzle, swapped) == "column 3 holds 6 twice"
    blank = solution.copy()
    blank[80] = 0
    assert S.why_invalid(puzzle, blank) == "cell r9c9 is blank"
    changed = solution.copy()
    changed[solution == 5], changed[solution == 3] = 3, 5  # digits 3 and 5 relabelled: a valid grid, another puzzle's
    assert S.why_invalid(puzzle, changed) == "the given 5 at r1c1 became 3"
    assert S.is_valid_solution(np.zeros(81, np.uint8), changed)
    assert S.conflict(grid("1" * 3 + "." * 78)) == "row 1 holds 1 3 times"


def test_valid_solutions_batch_matches_single(sample: S.SudokuSet) -> None:
    rng = np.random.default_rng(0)
    puzzles, solutions = np.repeat(sample.puzzles, 4, 0), np.repeat(sample.solutions, 4, 0)
    broken = solutions.copy()
    for k in range(1, len(broken), 2):  # every other sample: a random cell set to a random value 0..9
        broken[k, rng.integers(81)] = rng.integers(10)
    expected = [S.is_valid_solution(p, s) for p, s in zip(puzzles, broken, strict=True)]
    assert S.valid_solutions(puzzles, broken).tolist() == expected
    assert not all(expected) and any(expected)
    out_of_range = solutions.astype(np.int64)
    out_of_range[0, 0] = 10 + out_of_range[0, 0]
    out_of_range[1, 0] = 255
    assert S.valid_solutions(puzzles, out_of_range).tolist() == [False, False] + [True] * (len(puzzles) - 2)
    with pytest.raises(MoeError, match="expected the same shape"):
        S.valid_solutions(puzzles, solutions[:1])


# -----------------------------------------------------------------------------
# solver


@pytest.mark.parametrize("puzzle, solution", KNOWN, ids=["wikipedia", "inkala", "norvig"])
def test_solver_solves_known_puzzles(puzzle: str, solution: str) -> None:
    found = S.search(grid(puzzle), limit=2)
    assert len(found.solutions) == 1 and S.format_grid(found.solutions[0]) == solution
    assert S.format_grid(S.solve(grid(puzzle))) == solution
    assert found.nodes >= 1 and (found.guesses == 0) == (puzzle == WIKIPEDIA[0])  # only Wikipedia's is easy


def test_count_solutions() -> None:
    solution = grid(WIKIPEDIA[1])
    assert S.count_solutions(solution) == 1
    rectangle = solution.copy()
    rectangle[[3, 4, 30, 31]] = 0  # 6 7 / 7 6 in two boxes: the digits can swap, so exactly two solutions
    assert S.count_solutions(rectangle, limit=10) == 2
    assert S.count_solutions(np.zeros(81, np.uint8)) == 2
    assert S.count_solutions(grid("11" + "." * 79)) == 0 and S.solve(grid("11" + "." * 79)) is None
    with pytest.raises(MoeError, match="expected 81 integers 0-9"):
        S.solve(np.zeros(80, np.uint8))


# -----------------------------------------------------------------------------
# generator


def test_generate_unique_with_requested_givens(sample: S.SudokuSet) -> None:
    puzzles, solutions, guesses = sample
    assert puzzles.shape == solutions.shape == (24, 81) and puzzles.dtype == solutions.dtype == np.uint8
    n_givens = (puzzles > 0).sum(1)
    assert n_givens.min() >= 24 and n_givens.max() <= 34 and len(set(n_givens.tolist())) > 3
    assert S.valid_solutions(puzzles, solutions).all()
    for p, g in zip(puzzles, guesses, strict=True):
        found = S.search(p, limit=2)
        assert len(found.solutions) == 1 and found.guesses == g
    exact = S.generate(5, seed=1, givens=30)
    assert ((exact.puzzles > 0).sum(1) == 30).all()
    assert np.array_equal(S.generate(3, seed=1, givens=[30, 30]).puzzles, exact.puzzles[:3])  # a TOML list


def test_generate_is_deterministic_by_seed() -> None:
    a, b = S.generate(4, seed=3, givens=(26, 40)), S.generate(6, seed=3, givens=(26, 40))
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y[:4])  # a puzzle depends on (seed, index) only
    assert not np.array_equal(a.puzzles, S.generate(4, seed=4, givens=(26, 40)).puzzles)
    # pinned: the generator must give these puzzles on every machine and Python version
    pinned = "798..124...2.4..37....721.......8.7..632.7..9...6..3.2.2.7.95.38....6............"
    assert S.format_grid(S.generate(1, seed=0, givens=30).puzzles[0]) == pinned


def test_generate_min_guesses() -> None:
    hard = S.generate(3, seed=0, givens=26, min_guesses=1)
    assert (hard.guesses >= 1).all()


@pytest.mark.parametrize("kwargs, expected", [
    (dict(givens=16), "givens=16; expected a whole number or a (low, high) range within 17..81"),
    (dict(givens=(30, 25)), "givens=(30, 25);"),
    (dict(givens=[30, 32.5]), "givens=[30, 32.5];"),
    (dict(attempts=0), "attempts=0; expected 1 or more"),
    (dict(givens=17, attempts=2), "givens=17: no unique puzzle with 17 givens in 2 full grids"),
    (dict(givens=45, min_guesses=50, attempts=2), "min_guesses=50: no puzzle with 45 givens needed"),
])
def test_generate_errors(kwargs: dict, expected: str) -> None:
    with pytest.raises(MoeError) as e:
        S.generate(1, seed=0, **kwargs)
    assert expected in str(e.value)


# -----------------------------------------------------------------------------
# augmentation and splits


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_augment_preserves_validity(seed: int, sample: S.SudokuSet) -> None:
    rng = np.random.default_rng(seed)
    puzzles, solutions = S.augment(sample.puzzles, sample.solutions, rng)
    assert puzzles.dtype == np.uint8 and puzzles.shape == sample.puzzles.shape
    assert S.valid_solutions(puzzles, solutions).all()
    assert ((puzzles > 0).sum(1) == (sample.puzzles > 0).sum(1)).all()
    assert (puzzles != sample.puzzles).any(1).all()
    assert S.equivalence_keys(puzzles) == S.equivalence_keys(sample.puzzles)
    assert S.count_solutions(puzzles[0]) == 1


def test_augment_is_deterministic_and_covers_the_group(sample: S.SudokuSet) -> None:
    puzzles = np.repeat(sample.puzzles[1:2], 400, 0)
    solutions = np.repeat(sample.solutions[1:2], 400, 0)
    a = S.augment(puzzles, solutions, np.random.default_rng(1))
    b = S.augment(puzzles, solutions, np.random.default_rng(1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    # per-sample draws: the 400 copies become (almost surely) 400 different grids
    assert len({s.tobytes() for s in a[1]}) == 400
    # rows are permuted among rows, so only a transposition brings the givens-per-column counts to the rows
    def row_counts(p: np.ndarray) -> list[int]:
        return sorted((p > 0).reshape(9, 9).sum(1).tolist())

    transposed = [row_counts(p) == row_counts(puzzles[0].reshape(9, 9).T) for p in a[0]]
    assert row_counts(puzzles[0]) != row_counts(puzzles[0].reshape(9, 9).T)
    assert 150 < sum(transposed) < 250


def test_equivalence_keys() -> None:
    puzzle = grid(WIKIPEDIA[0])
    transposed = puzzle.reshape(9, 9).T.reshape(81)
    keys = S.equivalence_keys(np.stack([puzzle, transposed, grid(INKALA[0]), grid(NORVIG_HARD[0])]))
    assert keys[0] == keys[1] and len(set(keys)) == 3


def test_make_splits_disjoint(monkeypatch: pytest.MonkeyPatch) -> None:
    train, test = S.make_splits(30, 10, seed=0, givens=(28, 36))
    assert len(train.puzzles) == 30 and len(test.puzzles) == 10
    train_keys, test_keys = S.equivalence_keys(train.puzzles), S.equivalence_keys(test.puzzles)
    assert len(set(train_keys + test_keys)) == 40
    augmented = S.augment(np.repeat(train.puzzles, 20, 0), np.repeat(train.solutions, 20, 0),
                          np.random.default_rng(0))[0]
    assert not set(S.equivalence_keys(augmented)) & set(test_keys)
    # a collision is skipped: with the number of givens as the key, train and test can share no count
    monkeypatch.setattr(S, "equivalence_keys", lambda p: [bytes([int((p[0] > 0).sum())])])
    train, test = S.make_splits(1, 1, seed=0, givens=(30, 31))
    assert (train.puzzles > 0).sum() != (test.puzzles > 0).sum()
    with pytest.raises(MoeError, match="too few distinct puzzles"):
        S.make_splits(2, 1, seed=0, givens=(30, 31))


# -----------------------------------------------------------------------------
# difficulty


def test_deduction_rounds_count_the_longest_chain_of_singles() -> None:
    solution = grid(WIKIPEDIA[1])
    assert S.deduction_rounds(solution) == S.Rounds(0, 0)
    one = solution.copy()
    one[40] = 0
    assert S.deduction_rounds(one) == S.Rounds(1, 0)
    # Row 1 and column 1 blank (17 cells). Every cell but r1c1 has its column (or row) full but for itself: a
    # naked single in round 1. r1c1 still has 5 candidates (only its box's 4 givens rule digits out), so naked
    # singles alone need a second round; as a hidden single (its digit is in every other blank cell's column or
    # row, so it has one place left in the box) it goes in round 1.
    cross = solution.reshape(9, 9).copy()
    cross[0, :] = 0
    cross[:, 0] = 0
    cross = cross.reshape(81)
    assert S.deduction_rounds(cross, hidden=False) == S.Rounds(2, 0)
    assert S.deduction_rounds(cross) == S.Rounds(1, 0)
    assert S.deduction_rounds(grid(INKALA[0])).left > 0  # singles stall: the search has to guess
    with pytest.raises(MoeError, match="the givens conflict"):
        S.deduction_rounds(grid("11" + "." * 79))


def test_deduction_rounds_end_where_the_search_needs_no_guess(sample: S.SudokuSet) -> None:
    """On a puzzle with one solution every single is that solution's digit, so singles placed round by round end
    where the search's one-at-a-time propagation ends: no blank left exactly when the search needs no guess."""
    rounds = [S.deduction_rounds(p) for p in sample.puzzles]
    solved = [r.left == 0 for r in rounds]
    assert solved == [g == 0 for g in sample.guesses.tolist()]
    assert any(solved) and not all(solved)
    assert all(r.rounds >= 1 for r in rounds)


def test_make_ladder_levels_are_exact_unique_deterministic_and_held_out() -> None:
    train, test = S.make_splits(20, 5, seed=0, givens=(28, 42))
    exclude = set(S.equivalence_keys(np.concatenate([train.puzzles, test.puzzles])))
    ladder = S.make_ladder([40, 28], 4, seed=0, exclude=exclude)
    assert [len(s.puzzles) for s, _ in ladder] == [4, 4]
    for (s, skipped), g in zip(ladder, [40, 28], strict=True):
        assert ((s.puzzles > 0).sum(1) == g).all() and skipped == 0
        assert S.valid_solutions(s.puzzles, s.solutions).all()
        assert all(S.count_solutions(p) == 1 for p in s.puzzles)
    keys = S.equivalence_keys(np.concatenate([s.puzzles for s, _ in ladder]))
    assert len(set(keys)) == 8 and not set(keys) & exclude
    again = S.make_ladder([40, 28], 4, seed=0, exclude=exclude)
    assert all(np.array_equal(a.puzzles, b.puzzles) for (a, _), (b, _) in zip(ladder, again, strict=True))
    assert not np.array_equal(S.make_ladder([40], 4, seed=1)[0][0].puzzles, ladder[0][0].puzzles)
    # a puzzle equivalent to an excluded one (here: the first of level 40, relabelled and permuted) is skipped
    seen = S.augment(ladder[0][0].puzzles[:1], ladder[0][0].solutions[:1], np.random.default_rng(0))[0]
    shifted, skipped = S.make_ladder([40], 4, seed=0, exclude=set(S.equivalence_keys(seen)))[0]
    assert skipped == 1 and np.array_equal(shifted.puzzles[:3], ladder[0][0].puzzles[1:])
