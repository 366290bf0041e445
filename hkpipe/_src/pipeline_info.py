"""What a ``Pipeline`` reports besides its steps: the introspection mixin and ``DataLayout``.

:class:`Introspection` holds the facade's read-only views (layout, data layout, timelines,
compile statistics, memory reports); :class:`~hkpipe._src.pipeline.Pipeline` inherits them. Each
forwards to a ``Backend`` hook of ``self.backend``; the base ``Backend`` gives the default of a
backend without the feature (empty, None, or a ConfigError naming the backend that has it), so
no caller reads ``pipe.backend``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from hkpipe._src import errors

if TYPE_CHECKING:
  from hkpipe import schedules
  from hkpipe._src import layout as layout_lib
  from hkpipe._src import watchdog
  from hkpipe._src.pipeline import Backend
  from hkpipe._src.pipeline import Batch
  from hkpipe._src.pipeline import TrainState


@dataclasses.dataclass(frozen=True)
class DataLayout:
  """Which rows of the global batch this process passes to the ``Pipeline``'s methods.

  The global batch of ``global_batch`` rows is cut into ``process_count`` equal shares of
  ``local_batch`` rows; this process passes share ``process_index``, i.e. global rows
  ``rows``. ``process_index``/``process_count`` are the keyword arguments of
  ``hkpipe.data.sample_batch`` that draw exactly those rows.

  Attributes:
    global_batch: rows of one step's global batch (what ``num_microbatches`` divides).
    process_index: which share this process passes (0 when every process passes the whole
      global batch).
    process_count: how many shares the global batch is cut into: ``jax.process_count()`` on
      backends whose processes each pass their own rows (``spmd``, ``pmap``), 1 on those where
      every process passes the whole global batch (``mpmd``, ``single``) or in one process.
  """

  global_batch: int
  process_index: int
  process_count: int

  @property
  def local_batch(self) -> int:
    """Rows this process passes per step (``global_batch // process_count``)."""
    return self.global_batch // self.process_count

  @property
  def rows(self) -> slice:
    """The global batch rows this process passes, as a slice."""
    start = self.process_index * self.local_batch
    return slice(start, start + self.local_batch)


def split_global_batch(global_batch: int, process_count: int, process_index: int) -> DataLayout:
  """The :class:`DataLayout` of ``global_batch`` rows cut into ``process_count`` shares.

  Raises:
    ConfigError: if ``global_batch`` is not a positive int or not a multiple of
      ``process_count`` (naming both and the fix).
  """
  if isinstance(global_batch, bool) or not isinstance(global_batch, (int, np.integer)) or (
      global_batch < 1):
    raise errors.ConfigError(f"The global batch size must be a positive int, got "
                             f"{global_batch!r}; pass the number of rows of one step's batch "
                             "over all processes.")
  if global_batch % process_count:
    raise errors.ConfigError(
        f"The global batch of {global_batch} rows cannot be cut into {process_count} equal "
        f"process-local shares (every process passes its own rows on this backend); use a "
        f"global batch size that is a multiple of {process_count}.")
  return DataLayout(int(global_batch), process_index if process_count > 1 else 0, process_count)


class Introspection:
  """The read-only views of a ``Pipeline`` (a mixin: needs ``self.backend``)."""

  backend: Backend

  @property
  def layout(self) -> layout_lib.Layout | None:
    """The resolved pipeline layout (schedule, stages in model order, ``[p, dp]`` device grid).

    ``None`` on backends without pipeline stages (``single``, ``pmap``).

    Raises:
      ValueError: on ``spmd``/``mpmd`` while the layout is not known yet: call ``init`` (or
        ``from_canonical``) first; ``mpmd`` with explicit ``partition=[...]`` boundaries knows
        it at once.
    """
    return self.backend.layout

  def data_layout(self, global_batch: int) -> DataLayout:
    """Which rows of a ``global_batch``-row batch this process passes to every method.

    In a multi-process run, ``spmd`` and ``pmap`` take each process's own rows (process ``i`` of
    ``P`` passes rows ``i*b:(i+1)*b``), ``mpmd`` the whole global batch on every process (see
    :class:`Backend`). In one process the batch is always the whole global batch. Draw this
    process's rows with ``hkpipe.data.sample_batch(..., batch_size=global_batch,
    process_index=d.process_index, process_count=d.process_count)``.

    Args:
      global_batch: rows of one step's batch over all processes.

    Raises:
      ConfigError: if ``global_batch`` is not a positive multiple of the number of shares.
    """
    return split_global_batch(global_batch, self.backend.batch_process_count(),
                              jax.process_index())

  @property
  def progress(self) -> watchdog.Progress:
    """The ``Progress`` the backend keeps up to date (``options.progress`` or a private one),
    for a hang ``hkpipe.train.Watchdog``."""
    return self.backend.progress

  @property
  def last_timeline(self) -> tuple[schedules.Record, ...]:
    """With ``record_timeline=True`` (``mpmd``), the executed actions of the last step as
    ``hkpipe.schedules.Record`` (rank, kind, stage, mb, start, end; seconds), drawable with
    ``hkpipe.schedules.ascii_grid`` / ``svg_timeline``; ``()`` before a step or without it."""
    return self.backend.last_timeline

  @property
  def last_timeline_origin(self) -> float | None:
    """``time.time()`` at :attr:`last_timeline`'s time 0 on this process; None without one."""
    return self.backend.last_timeline_origin

  @property
  def last_stash_peaks(self) -> tuple[int, ...]:
    """With ``record_timeline=True`` (``mpmd``), per rank, the most (stage, microbatch) residual
    stashes held at once during the last step; ``()`` before a step or without it."""
    return self.backend.last_stash_peaks

  @property
  def last_stash_peak_bytes(self) -> tuple[int, ...]:
    """With ``record_timeline=True`` (``mpmd``), per rank, the most device bytes the last step
    held at once beyond what was live before it (stashes, activations, cotangents, accumulators;
    measured from the live device buffers after every instruction); ``()`` otherwise."""
    return self.backend.last_stash_peak_bytes

  @property
  def last_predicted_bytes(self) -> Any:
    """With ``record_timeline=True`` (``mpmd``), per instruction and rank, the bytes the step
    program's liveness pass predicts (computed before the step runs); ``()`` otherwise."""
    return self.backend.last_predicted_bytes

  @property
  def last_measured_bytes(self) -> Any:
    """With ``record_timeline=True`` (``mpmd``), per instruction and rank, the live device bytes
    measured while the last step ran (minus those live before it); ``()`` otherwise."""
    return self.backend.last_measured_bytes

  @property
  def compile_stats(self) -> Any:
    """Compile statistics of the ``mpmd`` program cache (``traced``, ``traced_by_name``,
    ``compiled``, ``cloned``, their times and a ``log``), updated as programs are built; None on
    the other backends (they compile one ``jax.jit`` program per step kind)."""
    return self.backend.compile_stats

  def layout_report(self, batch: Batch, rng: jax.Array | None = None) -> dict:
    """Bytes of the padded ``spmd`` layout for this batch shape (what padding costs); see
    ``docs/backends.md``. Compiles nothing new if ``train_step`` already ran for this shape.

    Raises:
      ConfigError: on a backend other than ``spmd``.
    """
    return self.backend.layout_report(batch, rng)

  @property
  def decodes_in_place(self) -> bool:
    """Whether :meth:`generate` decodes where the stages live, without gathering them:
    ``single``, ``mpmd``, and ``spmd`` when each rank's devices lie in one process (across
    processes too)."""
    return self.backend.decodes_in_place

  def memory_analysis(self, state: TrainState | None, batch: Batch) -> Any:
    """XLA's memory analysis (per device) of the compiled ``spmd`` ``train_step`` program for
    this batch shape (``temp_size_in_bytes`` includes the stash).

    On ``mpmd``: a dict with, per rank, the per-device bytes of its sharded state, the step's
    peak besides it and every compiled program's memory analysis; ``state`` may be None and
    ``batch`` may hold ``jax.ShapeDtypeStruct`` s, so nothing is allocated (see
    ``docs/sharding.md``).

    On ``spmd`` with ``state=None``: the same per-rank dict, planned from abstract shapes
    (nothing allocated); with a real state, XLA's ``memory_analysis()`` object as above.

    Raises:
      ConfigError: on a backend other than ``spmd`` and ``mpmd``.
    """
    return self.backend.memory_analysis(state, batch)
