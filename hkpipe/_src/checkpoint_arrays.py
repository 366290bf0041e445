"""Canonical arrays to and from orbax, from their owners: no process touches a shard it does not hold.

Save (:func:`save_handler`): one orbax pytree item holds the whole canonical tree, every leaf a
plain global array in the checkpoint. Each process writes the shards it holds (replica 0 of each
shard, or with orbax's replica-parallel writing each replica's slice of it, so every element is
written exactly once), whatever subset of the processes an array lives
on: an MPMD stage's arrays on its process only, SPMD/pmap arrays on every process, or anything in
between. orbax 0.12's own ``ArrayHandler`` cannot do that: it refuses arrays that live on one
process in a multi-process run ("host local jax.Array") and fails on arrays with no shard on the
calling process. :class:`OwnersArrayHandler` replaces it for saving and keeps orbax's writing code
(the same tensorstore/OCDBT files, read back by the standard handler): it groups the arrays by
their *writer*, the lowest-numbered process holding a shard, which creates the array's metadata
in the checkpoint (orbax's ``primary_host`` role, per array); every holder writes its own shards
into its per-process OCDBT database, which orbax merges when the save is finalised. Arrays with no
shard here are skipped. Nothing is copied between devices or processes.

Restore (:func:`read`): the target tree gives each array's shape, dtype and sharding. Arrays with
a device on this process are read by orbax's standard handler straight into their target
sharding (each process reads only the slices its devices need); the others are orbax
placeholders, not read at all, and come back as global arrays with no shard here (what the other
processes' stages look like in an MPMD run).

Host memory: orbax reads and writes every array at once by default, so a process's transient
host buffers grow with its whole share. Both directions here take ``inflight_bytes``, orbax's
per-process limit on the bytes being read or written at a time (raised, per call, to twice the
largest shard, since orbax refuses a single request above its limit): the transient stays within
that limit, whatever the share. A save still copies all of this process's shards off the devices
before it returns (so training may go on), which is its share of host memory on an accelerator
(on CPU the copy is a view).

Coupling: :class:`OwnersArrayHandler` calls ``_serialize_arrays`` of orbax-checkpoint 0.12.x's
``jax_array_handlers`` (the function ``ArrayHandler.serialize`` ends in) and its ``limits``; the
2-process test in ``tests/test_checkpoint_owners.py`` catches a change of them.
"""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import type_handlers as _type_handlers
from orbax.checkpoint._src.serialization import jax_array_handlers as _orbax_arrays
from orbax.checkpoint._src.serialization import limits as _orbax_limits


def _is_key(x: Any) -> bool:
  return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _largest_shard(leaves: Sequence[Any]) -> int:
  """Bytes of the largest shard any of ``leaves`` (arrays or abstract arrays) has on this process."""
  me = jax.process_index()
  sizes = [int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize
           for leaf in leaves if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct))
           and any(d.process_index == me for d in leaf.sharding.device_set)]
  return max(sizes, default=0)


def fitted_limit(inflight_bytes: int, leaves: Sequence[Any]) -> int:
  """``inflight_bytes``, raised to fit twice the largest shard here (orbax refuses a request at or
  above its limit)."""
  return max(int(inflight_bytes), 2 * _largest_shard(leaves) + 1)


def writer(x: jax.Array) -> int:
  """The process that creates ``x``'s metadata in a checkpoint: the lowest one holding a shard."""
  # jaxlib has no Device stubs: process_index is unknown to mypy
  return min(d.process_index for d in x.sharding.device_set)  # type: ignore[attr-defined]


class OwnersArrayHandler(_type_handlers.ArrayHandler):
  """orbax's array handler, saving arrays that live on any subset of the processes (see module)."""

  def __init__(self):
    # orbax's defaults otherwise: replica 0 of each shard written once (replica-parallel: split
    # over the replicas, where orbax enables it); no sharding file and no per-process array
    # metadata (both would be written by process 0 for arrays it may not hold; restores always
    # name their target shardings).
    super().__init__(replica_id=0, enable_write_sharding_file=False, array_metadata_store=None)

  async def serialize(self, values: Sequence[jax.Array], infos: Sequence[Any],
                      args: Sequence[Any] | None = None) -> list:
    """Starts writing this process's shards of ``values`` (see the module docstring)."""
    args = list(args or [ocp.SaveArgs()] * len(values))
    _type_handlers.check_input_arguments(values, infos, args)
    _orbax_arrays.check_array_values(values, infos)
    limiter = infos[0].byte_limiter if infos else None
    if isinstance(limiter, _orbax_limits.LimitInFlightBytes):
      fitted = fitted_limit(limiter.max_bytes, values)
      if fitted > limiter.max_bytes:
        limiter = _orbax_limits.LimitInFlightBytes(fitted)
        infos = [info.replace(byte_limiter=limiter) for info in infos]
    groups: dict[int, list] = {}
    for value, info, arg in zip(values, infos, args):
      if _is_key(value):
        raise ValueError(f"{info.name}: a PRNG key array; checkpoint its key data "
                         "(jax.random.key_data) instead.")
      if value.addressable_shards:  # arrays with no shard here are written by their holders
        groups.setdefault(writer(value), []).append((value, info, arg))
    futures = []
    for owner, items in sorted(groups.items()):
      arrays, group_infos, group_args = (list(t) for t in zip(*items))
      futures.append(_orbax_arrays._serialize_arrays(  # pylint: disable=protected-access
          arrays=arrays, infos=group_infos, args=group_args, dispatcher=None, replica_id=0,
          use_replica_parallel=self._use_replica_parallel,
          min_slice_bytes_for_replica_parallel=self._min_slice_bytes_for_replica_parallel,
          max_replicas_for_replica_parallel=self._max_replicas_for_replica_parallel,
          primary_host=owner,
          metadata_key=self._metadata_key, array_metadata_store=None,
          enable_replica_parallel_separate_folder=False, ext_metadata={},
          callback=self._callback))
    return futures


def _registry() -> Any:
  """orbax's standard type handlers, with :class:`OwnersArrayHandler` for ``jax.Array``."""
  types = (int, float, bytes, np.number, np.ndarray, str, type(ocp.PLACEHOLDER))
  return _type_handlers.create_type_handler_registry(
      *[(t, _type_handlers.get_type_handler(t)) for t in types], (jax.Array, OwnersArrayHandler()))


def save_handler(inflight_bytes: int) -> ocp.PyTreeCheckpointHandler:
  """The handler of the checkpoint's ``state`` item (save with ``ocp.args.PyTreeSave``), writing at
  most about ``inflight_bytes`` at a time on each process (see the module docstring)."""
  return ocp.PyTreeCheckpointHandler(handler_impl=ocp.BasePyTreeCheckpointHandler(
      type_handler_registry=_registry(), save_concurrent_bytes=int(inflight_bytes)))


def has_shard_here(leaf: Any) -> bool:
  """Whether an array (or abstract array with a sharding) has a device on this process."""
  me = jax.process_index()
  return any(d.process_index == me for d in leaf.sharding.device_set)


def _request(leaf: Any) -> tuple[Any, Any]:
  """``(item, restore_args)`` of one target leaf (numpy or ``ShapeDtypeStruct`` with sharding)."""
  if isinstance(leaf, np.ndarray):
    return leaf, ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)
  if not has_shard_here(leaf):
    return ocp.PLACEHOLDER, ocp.PLACEHOLDER
  return leaf, ocp.ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape,
                                    dtype=leaf.dtype)


def _absent(leaf: jax.ShapeDtypeStruct) -> jax.Array:
  """A global array with ``leaf``'s shape, dtype and sharding and no shard on this process."""
  return jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding, [], dtype=leaf.dtype)


def read(directory: str | pathlib.Path, targets: Any, inflight_bytes: int) -> Any:
  """Reads the ``state`` item in ``directory`` into ``targets``' placements (no collective).

  Args:
    directory: the item's folder (``<step>/state``).
    targets: the tree to restore: numpy leaves (restored as numpy) and ``jax.ShapeDtypeStruct``
      leaves with a sharding (restored as global arrays with that sharding: the shards on this
      process's devices are read, the others are not).
    inflight_bytes: at most about this many bytes are being read at a time on this process
      (raised to twice the largest shard read here).
  """
  leaves, treedef = jax.tree.flatten(targets)  # jaxlib has no PyTreeDef stubs: ignores below
  pairs = [_request(leaf) for leaf in leaves]
  handler = ocp.PyTreeCheckpointHandler(handler_impl=ocp.BasePyTreeCheckpointHandler(
      restore_concurrent_bytes=fitted_limit(inflight_bytes, leaves)))
  try:
    got = handler.restore(pathlib.Path(directory), args=ocp.args.PyTreeRestore(
        item=treedef.unflatten([p[0] for p in pairs]),  # type: ignore[attr-defined]
        restore_args=treedef.unflatten([p[1] for p in pairs])))  # type: ignore[attr-defined]
  finally:
    handler.close()
  values = treedef.flatten_up_to(got)  # type: ignore[attr-defined]
  return treedef.unflatten([_absent(leaf) if value is ocp.PLACEHOLDER else value  # type: ignore[attr-defined]
                            for value, leaf in zip(values, leaves)])
