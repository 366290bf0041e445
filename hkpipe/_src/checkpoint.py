"""Checkpoints of the canonical (layout-independent) training state with orbax.

A checkpoint holds ``{"params", "opt_state", "rng"}`` in the canonical layout (see
``Pipeline.to_canonical``) plus JSON metadata (step, config). Because the layout is canonical, a run
saved under one backend, stage count, mesh or process count restores under another: the restore
target carries the new pipeline's shardings and orbax places every array directly where the new
layout wants it. Saves are asynchronous and atomic (orbax writes to a temporary folder and renames
it), and only the newest ``max_to_keep`` are kept.

From the owners (``hkpipe._src.checkpoint_arrays``): canonical leaves are global arrays that may
live on any subset of the devices and processes (an MPMD stage's on its own devices only, an SPMD
rank's on its rank's devices, pmap's everywhere). A save writes, on every process, only the shards
that process holds; a restore reads, on every process, only the slices its target devices need,
straight into the target sharding (a target with no device on this process is not read and comes
back as a global array with no shard here). Nothing is gathered, copied to another device or
widened to every process, so no device and no host holds more than its own share of the state
(plus orbax's buffers for that share). ``Pipeline.params`` and ``Pipeline.to_canonical`` of some
backends do gather; the checkpoint never asks for more than the tree it is given. The PRNG key is
stored as host key data (identical on every process).

Multi-process runs: every process calls ``save``/``restore`` with the same tree structure. A save
is a collective (one small all-gather of the leaves' fingerprints, then orbax's own barriers); a
restore reads without orbax's barrier and ends with every process agreeing on its outcome, so a
read that fails on one process cannot leave the others waiting.

Faults (see ``Checkpointer.restore_latest``): a save refuses a state holding NaN or Inf; every
checkpoint records each leaf's path, shape, dtype and fingerprint (``hkpipe._src.integrity``,
computed where the arrays live); a restore checks the target's leaves against that record before
reading anything (a mismatch is a ``ConfigError``), and after reading compares the fingerprints,
so bytes changed on disk are caught even where orbax reads them without complaint. A damaged
checkpoint is moved aside to ``<step>.corrupt`` (never deleted) and the previous one is used. An
interrupted save leaves only orbax's ``<step>.orbax-checkpoint-tmp`` folder, which the next
``Checkpointer`` on the folder removes; the completed checkpoints are untouched.
"""

from __future__ import annotations

import os
import pathlib
import warnings
from typing import Any, Callable, Mapping, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from hkpipe._src import checkpoint_arrays
from hkpipe._src import integrity
from hkpipe._src import placement
from hkpipe._src.errors import ConfigError

_CORRUPT_SUFFIX = ".corrupt"
DEFAULT_INFLIGHT_BYTES = 256 * 2**20


class CorruptCheckpointError(RuntimeError):
  """A checkpoint whose files cannot be read or whose data differs from what was saved.

  Attributes:
    seen_here: whether this process saw the damage itself (in a multi-process run, the others
      learn of it from the processes that did).
  """

  def __init__(self, message: str, *, seen_here: bool = True):
    super().__init__(message)
    self.seen_here = seen_here


class Restored(NamedTuple):
  """What :meth:`Checkpointer.restore_latest` returns."""
  step: int
  state: dict
  meta: dict


def _is_key(x: Any) -> bool:
  return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _to_storable(canonical: Mapping[str, Any]) -> dict:
  """The tree orbax writes: the PRNG key becomes host key data (the same on every process)."""
  out = dict(canonical)
  rng = placement.local_value(out["rng"])
  out["rng"] = np.asarray(jax.random.key_data(rng) if _is_key(rng) else rng)
  return out


def _abstract(tree: Any) -> Any:
  """Restore targets: arrays as shape/dtype/sharding (``ShapeDtypeStruct`` leaves as they are),
  host leaves as numpy (restored as numpy)."""

  def one(a):
    if isinstance(a, jax.ShapeDtypeStruct):
      if a.sharding is None:
        raise ValueError(f"A restore target {a} has no sharding; give every abstract leaf the "
                         "sharding it should be restored with.")
      return a
    if isinstance(a, jax.Array):
      return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)
    return np.asarray(a)

  return jax.tree.map(one, tree)


def _failing_processes(failed: bool) -> list[int]:
  """The processes for which ``failed`` is True (a collective in a multi-process run)."""
  if jax.process_count() == 1:
    return [0] if failed else []
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = np.asarray(multihost_utils.process_allgather(np.asarray([int(failed)], np.int32)))
  return [int(i) for i in np.flatnonzero(flags.reshape(-1))]


def _error_text(error: BaseException) -> str:
  """One line: the error's type and message (without tensorstore's spec dump), at most 500 chars."""
  text = " ".join(str(error).split(" [tensorstore_spec")[0].split())
  return f"{type(error).__name__}: {text[:500]}"


def _sync(name: str) -> None:
  """A barrier over every process (nothing in a single-process run)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _warn(message: str) -> None:
  warnings.warn(message, RuntimeWarning, stacklevel=3)


class Checkpointer:
  """Saves and restores canonical training states under ``directory``.

  In a multi-process run every process creates one on the same directory and calls every method
  (see the module docstring).

  Args:
    directory: checkpoint folder (created); one sub-folder per saved step.
    max_to_keep: how many of the newest checkpoints to keep.
    inflight_bytes: on each process, at most about this many bytes are being written or read at
      a time (raised to twice the largest shard when that is more): bounds the host memory a
      save or restore needs beyond the process's own shards.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3,
               inflight_bytes: int = DEFAULT_INFLIGHT_BYTES):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}.")
    if inflight_bytes < 1:
      raise ValueError(f"inflight_bytes must be >= 1, got {inflight_bytes}.")
    self.directory = os.path.abspath(os.fspath(directory))
    self._inflight_bytes = int(inflight_bytes)
    self._manager = ocp.CheckpointManager(
        self.directory, item_handlers={"state": checkpoint_arrays.save_handler(inflight_bytes),
                                       "meta": ocp.JsonCheckpointHandler(),
                                       "integrity": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Every complete checkpoint's step, oldest first."""
    return list(self._manager.all_steps())

  def step_dir(self, step: int) -> str:
    """The folder of step ``step``'s checkpoint."""
    return os.path.join(self.directory, str(step))

  def save(self, step: int, canonical: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """Starts an asynchronous save (device arrays are copied before this returns).

    Each process writes the shards it holds, nothing else (see the module docstring).

    Args:
      step: the step to save under.
      canonical: ``Pipeline.to_canonical(state)``: leaves are host values or global arrays on
        any subset of the devices and processes.
      meta: JSON-serialisable metadata (step, config).

    Raises:
      FloatingPointError: a leaf holds NaN or Inf (nothing is written; the message names the step
        and the first such leaf).
    """
    storable = _to_storable(canonical)
    summaries = integrity.summarize(storable)
    bad = [s for s in summaries if not s.finite]
    if bad:
      raise FloatingPointError(
          f"Refusing to checkpoint step {step}: the state is not finite; {bad[0].path} (shape "
          f"{list(bad[0].shape)}, {bad[0].dtype}) holds NaN or Inf"
          + (f", and {len(bad) - 1} more leaves" if len(bad) > 1 else "")
          + f". The checkpoints already in {self.directory} are kept; lower the learning rate "
          "or check the data, then resume from the last of them.")
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(storable), meta=ocp.args.JsonSave(dict(meta)),
        integrity=ocp.args.JsonSave(integrity.to_json(summaries))))

  def read_meta(self, step: int) -> dict:
    """Step ``step``'s metadata, read without touching its arrays (no collective)."""
    return dict(ocp.JsonCheckpointHandler().restore(pathlib.Path(self.step_dir(step)) / "meta"))

  def newest_meta(self) -> tuple[int, dict] | None:
    """``(step, meta)`` of the newest checkpoint whose metadata reads, or None (no collective)."""
    for step in reversed(self.all_steps()):
      try:
        return step, self.read_meta(step)
      except Exception:  # pylint: disable=broad-except  (restore_latest reports it)
        continue
    return None

  def restore(self, step: int, like: Mapping[str, Any]) -> tuple[dict, dict]:
    """Restores step ``step`` into the structure, dtypes and shardings of ``like``.

    Args:
      step: a saved step (see :meth:`latest_step`).
      like: a canonical state of the target pipeline (e.g. ``pipe.to_canonical(pipe.init(...))``);
        only its structure, shapes, dtypes and shardings are used, so its array leaves may also
        be ``jax.ShapeDtypeStruct`` s with a sharding (``rng`` stays a key or key data).

    Returns:
      ``(canonical_state, meta)``; the arrays have ``like``'s shardings, each process holding
      only the shards on its own devices.

    Raises:
      ConfigError: ``like``'s leaves (paths, shapes, dtypes) differ from the checkpoint's; raised
        before any array is read.
      CorruptCheckpointError: the checkpoint's files cannot be read, or the data read differs
        from the data saved.
    """
    return self._load(step, like, None)

  def restore_latest(self, like: Mapping[str, Any], *,
                     check_meta: Callable[[int, dict], None] | None = None,
                     report: Callable[[str], None] | None = None) -> Restored | None:
    """Restores the newest good checkpoint; damaged ones are reported and moved aside.

    Newest first: reads the step's metadata and calls ``check_meta(step, meta)`` (it may raise,
    e.g. a ``ConfigError`` for a run that cannot resume: that propagates), then restores it as
    :meth:`restore` does. A checkpoint that cannot be read or fails its fingerprints is renamed
    to ``<step>.corrupt`` (never deleted; a later save of that step does not collide) and the
    previous one is tried.

    Args:
      like: as for :meth:`restore`.
      check_meta: called with each candidate's step and metadata before its arrays are read.
      report: called with a message for each damaged checkpoint (on process 0, and on any
        process that saw the error itself); default: a ``RuntimeWarning``.

    Returns:
      ``Restored(step, state, meta)``, or None if no checkpoint is left.
    """
    report = report or _warn
    self._manager.wait_until_finished()
    for step in reversed(self.all_steps()):
      try:
        state, meta = self._load(step, like, check_meta)
      except CorruptCheckpointError as e:
        moved = self._move_aside(step)
        if jax.process_index() == 0 or e.seen_here:
          report(f"Warning: {e} Moved it to {moved} (kept for inspection, not deleted); "
                 "trying the previous checkpoint.")
        continue
      return Restored(step, state, meta)
    return None

  def _load(self, step: int, like: Mapping[str, Any],
            check_meta: Callable[[int, dict], None] | None) -> tuple[dict, dict]:
    """Reads and verifies one checkpoint; every process ends with the same outcome."""
    folder = self.step_dir(step)
    target = _to_storable(like)
    problem, restored, record = None, None, None
    try:
      meta = self.read_meta(step)
      record = self._read_record(step)
    except Exception as e:  # pylint: disable=broad-except
      problem = f"its metadata cannot be read ({_error_text(e)})"
    if problem is None:
      if check_meta is not None:
        check_meta(step, meta)
      if record is not None:
        mismatched = integrity.layout_mismatches(record, target)
        if mismatched:
          raise ConfigError(
              f"Checkpoint step {step} in {folder} does not fit this model: "
              + "; ".join(mismatched[:5])
              + (f"; and {len(mismatched) - 5} more" if len(mismatched) > 5 else "")
              + ". Resume with the model config the checkpoint was written with, or use a new "
              "workdir.")
      try:
        restored = self._read_state(step, target)
      except Exception as e:  # pylint: disable=broad-except
        if record is None:
          raise  # no record (an older checkpoint): damage and a wrong target look alike
        problem = f"its arrays cannot be read ({_error_text(e)})"
    failing = _failing_processes(problem is not None)
    if failing:
      raise CorruptCheckpointError(
          f"checkpoint step {step} in {folder} is damaged: "
          + (problem if problem is not None else f"process(es) {failing} could not read it"),
          seen_here=problem is not None)
    assert restored is not None
    if record is not None:
      changed = integrity.changed_leaves(record, integrity.summarize(restored))
      if changed:
        raise CorruptCheckpointError(
            f"checkpoint step {step} in {folder} is damaged: the data read differs from the data "
            f"saved (fingerprint mismatch) in {len(changed)} leaves: {', '.join(changed[:3])}"
            + (" ..." if len(changed) > 3 else "") + ".")
    state = dict(restored)
    if _is_key(placement.local_value(like["rng"])):
      state["rng"] = jax.random.wrap_key_data(state["rng"],
                                              impl=jax.random.key_impl(placement.local_value(like["rng"])))
    return state, meta

  def _read_record(self, step: int) -> list[integrity.LeafSummary] | None:
    """The step's integrity record, or None for a checkpoint written before records existed."""
    folder = pathlib.Path(self.step_dir(step)) / "integrity"
    if not folder.exists() and (pathlib.Path(self.step_dir(step)) / "state").exists():
      return None
    return integrity.from_json(ocp.JsonCheckpointHandler().restore(folder))

  def _read_state(self, step: int, target: dict) -> dict:
    """The step's arrays in ``target``'s placements, each process reading only its own shards
    (no collective: a process whose read fails cannot leave the others waiting)."""
    return dict(checkpoint_arrays.read(pathlib.Path(self.step_dir(step)) / "state",
                                       _abstract(target), self._inflight_bytes))

  def _move_aside(self, step: int) -> str:
    """Renames step ``step``'s folder to a free ``<step>.corrupt[.N]`` (on process 0)."""
    source = self.step_dir(step)
    _sync(f"hkpipe_checkpoint_move_{step}")  # every process sees the folder as it was
    dest, n = source + _CORRUPT_SUFFIX, 1
    while os.path.exists(dest):
      n += 1
      dest = f"{source}{_CORRUPT_SUFFIX}.{n}"
    _sync(f"hkpipe_checkpoint_named_{step}")
    if jax.process_index() == 0:
      os.rename(source, dest)
    _sync(f"hkpipe_checkpoint_moved_{step}")
    self._manager.reload()
    return dest

  def wait(self) -> None:
    """Blocks until pending saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's resources."""
    self._manager.wait_until_finished()
    self._manager.close()
