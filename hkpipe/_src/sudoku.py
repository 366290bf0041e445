"""Sudoku puzzles made locally: a seeded generator, symmetry augmentations, memmapped splits.

A base puzzle is a full grid from randomized backtracking with cells removed (in random order)
while a solver confirms the solution stays unique. The training set is the base puzzles under
random validity-preserving symmetries (digit permutation, transposition, band and stack shuffles,
row shuffles within bands, column shuffles within stacks); the test set uses other base puzzles.

Grids are ``uint8 [n, 81]`` in row-major order: puzzle cells 0 (blank) or 1..9, solutions 1..9.
:func:`prepare` writes ``{train,test}_{inputs,labels}.bin`` and ``meta.json`` (with
``"written_by": "hkpipe.sudoku.prepare"``) into a folder it owns; it never overwrites files it
did not write.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib

import numpy as np

from hkpipe._src import errors

WRITTEN_BY = "hkpipe.sudoku.prepare"
_ALL = 0x3FE  # bits 1..9


@functools.lru_cache(maxsize=1)
def _peers() -> tuple[tuple[int, ...], ...]:
  """For each cell, the 20 cells sharing its row, column or box (a constant table)."""
  table = []
  for i in range(81):
    r, c = divmod(i, 9)
    br, bc = 3 * (r // 3), 3 * (c // 3)
    s = {r * 9 + k for k in range(9)} | {k * 9 + c for k in range(9)}
    s |= {(br + a) * 9 + bc + b for a in range(3) for b in range(3)}
    s.discard(i)
    table.append(tuple(sorted(s)))
  return tuple(table)


def _candidates(grid: list[int], i: int, peers) -> int:
  used = 0
  for p in peers[i]:
    used |= 1 << grid[p]
  return _ALL & ~used


def _search(grid: list[int], limit: int, rng: np.random.Generator | None, peers) -> int:
  """Counts solutions up to ``limit`` (filling ``grid`` with the first one when ``limit == 1``)."""
  best, best_mask, best_n = -1, 0, 10
  for i in range(81):
    if grid[i] == 0:
      mask = _candidates(grid, i, peers)
      n = bin(mask).count("1")
      if n < best_n:
        best, best_mask, best_n = i, mask, n
        if n <= 1:
          break
  if best < 0:
    return 1
  digits = [d for d in range(1, 10) if best_mask >> d & 1]
  if rng is not None:
    rng.shuffle(digits)
  found = 0
  for d in digits:
    grid[best] = d
    found += _search(grid, limit - found, rng, peers)
    if found >= limit:
      if limit == 1:
        return found  # keep the filled grid
      break
  grid[best] = 0
  return found


def count_solutions(puzzle: np.ndarray, limit: int = 2) -> int:
  """Number of solutions of an ``[81]`` puzzle, counted up to ``limit``."""
  return _search([int(v) for v in np.asarray(puzzle).reshape(81)], limit, None, _peers())


def full_grid(rng: np.random.Generator) -> np.ndarray:
  """A random complete valid grid ``uint8 [81]`` by randomized backtracking."""
  grid = [0] * 81
  _search(grid, 1, rng, _peers())
  return np.asarray(grid, np.uint8)


def make_puzzle(rng: np.random.Generator, min_givens: int = 17) -> tuple[np.ndarray, np.ndarray]:
  """``(puzzle, solution)``: a random grid with cells removed while the solution stays unique,
  stopping at ``min_givens`` givens or when no further cell can be removed in one pass."""
  solution = full_grid(rng)
  puzzle = solution.copy()
  givens = 81
  for i in rng.permutation(81):
    if givens <= min_givens:
      break
    keep = puzzle[i]
    puzzle[i] = 0
    if count_solutions(puzzle, 2) != 1:
      puzzle[i] = keep
    else:
      givens -= 1
  return puzzle, solution


def augment(rng: np.random.Generator, puzzle: np.ndarray,
            solution: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The same random symmetry applied to a puzzle and its solution (both ``[81]``): digit
  permutation, transposition, band/stack shuffles and row/column shuffles inside them."""
  digits = np.concatenate([[0], rng.permutation(9) + 1]).astype(np.uint8)
  rows = np.concatenate([3 * b + rng.permutation(3) for b in rng.permutation(3)])
  cols = np.concatenate([3 * s + rng.permutation(3) for s in rng.permutation(3)])
  transpose = bool(rng.integers(2))

  def apply(g):
    g = digits[g.reshape(9, 9)]
    g = g.T if transpose else g
    return g[rows][:, cols].reshape(81)

  return apply(puzzle), apply(solution)


@dataclasses.dataclass(frozen=True)
class SudokuSpec:
  """What :func:`prepare` makes. Validated on construction.

  Attributes:
    seed: generator seed.
    train_base: base puzzles of the training set.
    test_base: base puzzles of the test set (different from the training ones).
    augmentations: augmented copies per training base puzzle (the original is kept too).
    min_givens: removal stops at this many givens (17..80); more givens = easier puzzles.
  """

  seed: int = 0
  train_base: int = 200
  test_base: int = 50
  augmentations: int = 20
  min_givens: int = 17

  def __post_init__(self):
    for field in ("train_base", "test_base"):
      v = getattr(self, field)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise errors.ConfigError(f"SudokuSpec.{field}={v!r} is invalid: it must be an int >= 1. "
                                 f"Pass a whole number of puzzles for {field}.")
    a = self.augmentations
    if isinstance(a, bool) or not isinstance(a, int) or a < 0:
      raise errors.ConfigError(f"SudokuSpec.augmentations={a!r} is invalid: it must be an int "
                               ">= 0. Pass 0 for no augmentation.")
    g = self.min_givens
    if isinstance(g, bool) or not isinstance(g, int) or not 17 <= g <= 80:
      raise errors.ConfigError(f"SudokuSpec.min_givens={g!r} is invalid: it must be an int in "
                               "[17, 80] (no unique Sudoku has fewer than 17 givens).")
    if isinstance(self.seed, bool) or not isinstance(self.seed, int):
      raise errors.ConfigError(f"SudokuSpec.seed={self.seed!r} is invalid: pass an int.")


def generate(spec: SudokuSpec) -> dict[str, np.ndarray]:
  """``{"train_inputs", "train_labels", "test_inputs", "test_labels"}``, ``uint8 [n, 81]``.

  Train has ``train_base * (1 + augmentations)`` rows (shuffled), test ``test_base``.
  """
  rng = np.random.default_rng(spec.seed)
  base = [make_puzzle(rng, spec.min_givens) for _ in range(spec.train_base + spec.test_base)]
  train = []
  for puzzle, solution in base[:spec.train_base]:
    train.append((puzzle, solution))
    train += [augment(rng, puzzle, solution) for _ in range(spec.augmentations)]
  order = rng.permutation(len(train))
  test = base[spec.train_base:]
  return {"train_inputs": np.stack([train[i][0] for i in order]),
          "train_labels": np.stack([train[i][1] for i in order]),
          "test_inputs": np.stack([p for p, _ in test]),
          "test_labels": np.stack([s for _, s in test])}


def prepare(data_dir: str | os.PathLike, spec: SudokuSpec) -> dict:
  """Makes sure ``data_dir`` holds the puzzles of ``spec``; returns its ``meta.json``.

  A new or empty folder is filled (arrays first, ``meta.json`` last, each written to a temporary
  name and renamed). A folder this function filled with the same spec is reused as is. Anything
  else (other files, another spec) raises ``ConfigError``: nothing is overwritten.
  """
  folder = pathlib.Path(data_dir)
  want = {"written_by": WRITTEN_BY, **dataclasses.asdict(spec)}
  meta_path = folder / "meta.json"
  if meta_path.exists():
    meta = json.loads(meta_path.read_text())
    if {k: meta.get(k) for k in want} == want:
      return meta
    raise errors.ConfigError(
        f"{folder} already holds data that is not these Sudoku puzzles ({meta_path}: "
        f"written_by={meta.get('written_by')!r}); hkpipe does not overwrite it. Use another "
        "data.dir (or an empty one), or set the generator fields to the ones it was made with.")
  if folder.exists() and any(not p.name.startswith(".tmp-") for p in folder.iterdir()):
    raise errors.ConfigError(f"{folder} holds files that hkpipe did not write; it does not "
                             "overwrite them. Use a new or empty data.dir.")
  folder.mkdir(parents=True, exist_ok=True)
  arrays = generate(spec)
  for name, array in arrays.items():
    tmp = folder / f".tmp-{os.getpid()}-{name}.bin"
    array.astype(np.uint8).tofile(tmp)
    os.replace(tmp, folder / f"{name}.bin")
  meta = {**want, **{f"{k}_rows": int(v.shape[0]) for k, v in arrays.items()}}
  tmp = folder / f".tmp-{os.getpid()}-meta.json"
  tmp.write_text(json.dumps(meta, indent=1))
  os.replace(tmp, meta_path)
  return meta


def load(data_dir: str | os.PathLike) -> dict[str, np.ndarray]:
  """The prepared arrays as read-only ``uint8 [n, 81]`` memmaps."""
  folder = pathlib.Path(data_dir)
  meta = json.loads((folder / "meta.json").read_text())
  return {k: np.memmap(folder / f"{k}.bin", dtype=np.uint8, mode="r",
                       shape=(meta[f"{k}_rows"], 81))
          for k in ("train_inputs", "train_labels", "test_inputs", "test_labels")}


def sample_batch(inputs: np.ndarray, labels: np.ndarray, *, batch_size: int, seed: int, step: int,
                 split: str = "train", process_index: int = 0,
                 process_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Random rows ``(inputs, labels)``, ``int32 [batch_size // process_count, 81]``, a pure
  function of ``(seed, split, step)``; each process keeps its slice of the global batch."""
  rng = np.random.default_rng((seed, 0 if split == "train" else 1, step))
  rows = rng.integers(0, inputs.shape[0], size=batch_size)
  local = batch_size // process_count
  rows = np.sort(rows[process_index * local:(process_index + 1) * local])
  return (np.asarray(inputs[rows], np.int32), np.asarray(labels[rows], np.int32))
