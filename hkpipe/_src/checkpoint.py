"""Checkpoints of the canonical (layout-independent) training state with orbax.

A checkpoint holds ``{"params", "opt_state", "rng"}`` in the canonical layout (see
``Pipeline.to_canonical``) plus JSON metadata (step, config). Because the layout is canonical, a run
saved under one backend or stage count restores under another: the restore target carries the new
pipeline's shardings and orbax places every array directly where the new layout wants it.
Saves are asynchronous and atomic (orbax writes to a temporary folder and renames it), and only the
newest ``max_to_keep`` are kept.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp


def _to_storable(canonical: Mapping[str, Any]) -> dict:
  out = dict(canonical)
  rng = out["rng"]
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    out["rng"] = jax.random.key_data(rng)
  return out


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


class Checkpointer:
  """Saves and restores canonical training states under ``directory``.

  Args:
    directory: checkpoint folder (created); one sub-folder per saved step.
    max_to_keep: how many of the newest checkpoints to keep.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}.")
    self.directory = os.path.abspath(os.fspath(directory))
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, canonical: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """Starts an asynchronous save (device arrays are copied before this returns)."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_to_storable(canonical)),
        meta=ocp.args.JsonSave(dict(meta))))

  def restore(self, step: int, like: Mapping[str, Any]) -> tuple[dict, dict]:
    """Restores step ``step`` into the structure, dtypes and shardings of ``like``.

    Args:
      step: a saved step (see :meth:`latest_step`).
      like: a canonical state of the target pipeline (e.g. ``pipe.to_canonical(pipe.init(...))``);
        only its structure, shapes, dtypes and shardings are used.

    Returns:
      ``(canonical_state, meta)``.
    """
    target = _to_storable(like)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(target)), meta=ocp.args.JsonRestore()))
    state = dict(restored["state"])
    if jax.dtypes.issubdtype(like["rng"].dtype, jax.dtypes.prng_key):
      state["rng"] = jax.random.wrap_key_data(state["rng"])
    return state, dict(restored["meta"])

  def wait(self) -> None:
    """Blocks until pending saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
