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
  """``accuracy(params, batch_fn, num_batches)``: the mean :func:`trm_metrics` of
  ``num_batches`` batches with canonical ``params`` on one local device (the model is tiny; the
  batches are this process's rows). Compiled once per returned function."""
  metrics = jax.jit(lambda p, x, y: trm.trm_metrics(model.apply(p, x, is_training=False), y, x))

  def accuracy(params: Any, batch_fn: Callable[[int], Any], num_batches: int) -> dict:
    params = jax.device_put(jax.device_get(params), jax.local_devices()[0])
    rows = [jax.device_get(metrics(params, *batch_fn(i))) for i in range(num_batches)]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}

  return accuracy
