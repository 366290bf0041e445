"""Checkpoints of the canonical (layout-independent) training state with orbax.

A checkpoint holds ``{"params", "opt_state", "rng"}`` in the canonical layout (see
``Pipeline.to_canonical``) plus JSON metadata (step, config). Because the layout is canonical, a run
saved under one backend or stage count restores under another: the restore target carries the new
pipeline's shardings and orbax places every array directly where the new layout wants it.
Saves are asynchronous and atomic (orbax writes to a temporary folder and renames it), and only the
newest ``max_to_keep`` are kept.

Multi-process runs: every process calls ``save``/``restore`` with the same tree (each writes the
shards it holds; orbax synchronises the processes). Canonical leaves are global arrays:

- arrays on devices of every process (``spmd``/``pmap``: replicated over the pipeline's devices)
  are saved and restored by orbax as they are;
- arrays on the devices of some processes only (``mpmd``: a stage's parameters live on the
  process that owns the stage; other processes hold them without any shard) are first copied to
  one device of every process (a small collective over all processes), saved like the others, and
  on restore read on every process and kept only on the target's own devices;
- the PRNG key is stored as host key data (identical on every process), never as a process-local
  device array.

The checkpoint itself does not depend on any of this: it holds plain arrays, so a state saved
from one layout or process count restores into another.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hkpipe._src import pipeline as pl


def _is_key(x: Any) -> bool:
  return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _to_storable(canonical: Mapping[str, Any]) -> dict:
  """The tree orbax writes: the PRNG key becomes host key data (the same on every process)."""
  out = dict(canonical)
  rng = pl.local_value(out["rng"])
  out["rng"] = np.asarray(jax.random.key_data(rng) if _is_key(rng) else rng)
  return out


def _spans_all_processes(x: Any) -> bool:
  """Whether ``x`` is a host value, or a global array with devices on every process."""
  if not isinstance(x, jax.Array) or jax.process_count() == 1:
    return True
  devices: set[Any] = set(x.sharding.device_set)
  return len({d.process_index for d in devices}) == jax.process_count()


def _own_slot(mine: np.ndarray, index: tuple) -> np.ndarray:
  """This process's slot ``[1, ...]`` of a ``[P, ...]`` array (the callback's index selects it)."""
  return mine[(slice(None),) + tuple(index[1:])]


def _sum_slots(slots: list) -> list:
  return [jnp.sum(x, axis=0).astype(x.dtype) for x in slots]


def _widen(tree: Any) -> Any:
  """Copies leaves that live on some processes only to one device of every process.

  A collective: every process must call it with the same tree. Each process contributes, in its
  own slot of a ``[P, ...]`` array, the shards it holds (replica 0 of each, zeros elsewhere); the
  sum over slots is the array, replicated on every process (exact: every element has exactly one
  contributor).
  """
  leaves, treedef = jax.tree.flatten(tree)
  partial = [i for i, x in enumerate(leaves) if not _spans_all_processes(x)]
  if not partial:
    return tree
  mesh = pl.process_mesh()
  count = jax.process_count()
  slots = []
  for i in partial:
    x = leaves[i]
    if _is_key(x):
      raise ValueError(f"Canonical leaf {i} is a PRNG key array on the devices of processes "
                       f"{sorted({d.process_index for d in x.sharding.device_set})} only; store "
                       "key data (jax.random.key_data) instead.")
    mine = np.zeros(x.shape, x.dtype)
    for shard in x.addressable_shards:
      if shard.replica_id == 0:
        mine[shard.index] = np.asarray(shard.data)
    slots.append(jax.make_array_from_callback(
        (count,) + tuple(x.shape), NamedSharding(mesh, P("proc")),
        functools.partial(_own_slot, mine[None])))
  summed = jax.jit(_sum_slots, out_shardings=NamedSharding(mesh, P()))(slots)
  for i, value in zip(partial, summed):
    leaves[i] = value
  return jax.tree.unflatten(treedef, leaves)


def _narrow(value: jax.Array, like: jax.Array) -> jax.Array:
  """The restored (replicated on every process) ``value`` placed with ``like``'s sharding, which
  may have no device on this process (then the result has no shard here). No collective."""
  sharding = like.sharding
  host = np.asarray(value.addressable_data(0))
  shards = [jax.device_put(host[index], device)
            for device, index in sharding.addressable_devices_indices_map(host.shape).items()]
  return jax.make_array_from_single_device_arrays(host.shape, sharding, shards, dtype=like.dtype)


def _placed_like(value: Any, want: Any) -> Any:
  """A restored leaf with the target's placement (see ``_abstract``)."""
  return value if _spans_all_processes(want) else _narrow(value, want)


def _abstract(tree: Any) -> Any:
  """Restore targets: host leaves as they are (restored as numpy), arrays as shape/dtype/sharding
  (arrays on some processes only: replicated on one device of every process, see ``_narrow``)."""
  mesh = pl.process_mesh() if jax.process_count() > 1 else None

  def one(a):
    if not isinstance(a, jax.Array):
      return np.asarray(a)
    sharding = a.sharding if _spans_all_processes(a) else NamedSharding(mesh, P())
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

  return jax.tree.map(one, tree)


class Checkpointer:
  """Saves and restores canonical training states under ``directory``.

  In a multi-process run every process creates one on the same directory and calls every method
  (see the module docstring).

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
    """Every complete checkpoint's step, oldest first."""
    return list(self._manager.all_steps())

  def save(self, step: int, canonical: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """Starts an asynchronous save (device arrays are copied before this returns).

    Args:
      step: the step to save under.
      canonical: ``Pipeline.to_canonical(state)``.
      meta: JSON-serialisable metadata (step, config).
    """
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_widen(_to_storable(canonical))),
        meta=ocp.args.JsonSave(dict(meta))))

  def restore(self, step: int, like: Mapping[str, Any]) -> tuple[dict, dict]:
    """Restores step ``step`` into the structure, dtypes and shardings of ``like``.

    Args:
      step: a saved step (see :meth:`latest_step`).
      like: a canonical state of the target pipeline (e.g. ``pipe.to_canonical(pipe.init(...))``);
        only its structure, shapes, dtypes and shardings are used.

    Returns:
      ``(canonical_state, meta)``; the arrays have ``like``'s shardings.
    """
    target = _to_storable(like)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(target)), meta=ocp.args.JsonRestore()))
    state = jax.tree.map(_placed_like, dict(restored["state"]), target)
    if _is_key(pl.local_value(like["rng"])):
      state["rng"] = jax.random.wrap_key_data(state["rng"],
                                              impl=jax.random.key_impl(pl.local_value(like["rng"])))
    return state, dict(restored["meta"])

  def wait(self) -> None:
    """Blocks until pending saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's resources."""
    self._manager.wait_until_finished()
    self._manager.close()
