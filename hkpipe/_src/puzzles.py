"""The training loop's puzzle task (the TRM model on Sudoku): data, batches and accuracy.

``hkpipe.train`` uses it when ``config.model.name == "trm"``: the puzzles of
``config.data.sudoku`` (a :class:`hkpipe._src.sudoku.SudokuSpec`) are generated into
``data.dir`` (default ``workdir/data``) once, then read as memmaps; train batches are random
training rows, a pure function of ``(seed, step)``; evaluation adds cell, blank-cell and
exact-puzzle accuracy of the last supervision step.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np

from hkpipe._src import staged_eval
from hkpipe._src import sudoku
from hkpipe._src.models import trm

VOCAB_SIZE = 10  # 0 = blank, 1..9 digits


def spec(config: Any) -> sudoku.SudokuSpec:
  """The generator spec of ``config.data.sudoku`` (raises ``ConfigError`` for bad values)."""
  return sudoku.SudokuSpec(**dict(config.data.sudoku))


def batch_fns(config: Any, data_dir: str, shard: dict) -> tuple[Callable, Callable]:
  """``(train_batch(step), val_batch(i))`` over the prepared puzzles (prepared here if needed)."""
  sudoku.prepare(data_dir, spec(config))
  arrays = sudoku.load(data_dir)
  size = int(config.batch_size)
  train = functools.partial(sudoku.sample_batch, arrays["train_inputs"], arrays["train_labels"],
                            batch_size=size, seed=config.seed, **shard)
  val = functools.partial(sudoku.sample_batch, arrays["test_inputs"], arrays["test_labels"],
                          batch_size=size, seed=config.seed, split="test", **shard)
  return (lambda step: train(step=step)), (lambda i: val(step=i))


def accuracy_fn(model: Any) -> Callable[[Any, Callable[[int], Any], int], dict[str, float]]:
  """``accuracy(staged, batch_fn, num_batches)``: the mean :func:`trm_metrics` of ``num_batches``
  batches (this process's rows), the model run stage by stage where ``staged`` (a
  :class:`hkpipe._src.staged_eval.Stages`, see :func:`hkpipe._src.staged_eval.stages`) holds it.
  Compiled once per stage per returned function."""
  stage_fn = staged_eval.apply_fn(model)
  metrics = jax.jit(lambda outputs, x, y: trm.trm_metrics(outputs, y, x))

  def accuracy(staged: staged_eval.Stages, batch_fn: Callable[[int], Any],
               num_batches: int) -> dict:
    rows = []
    for i in range(num_batches):
      x, y = batch_fn(i)
      outputs, _ = staged_eval.walk(staged, stage_fn, x, (i,))
      rows.append(staged_eval.on_last(staged, metrics, outputs, (x, y), (i,)))
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}

  return accuracy
