"""Multi-host placement helpers: where batch rows and replicated values live across processes.

Pure functions over ``jax.Array`` placement; none runs a collective unless its docstring says so
(:func:`gather` and :func:`check_same_batch_on_every_process` do). In one process every helper
reduces to ``jax.device_put`` or the identity.
"""

from __future__ import annotations

import itertools
import zlib
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P


def _is_key(x: Any) -> bool:
  return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def example_microbatch(tree: Any, global_size: int, num_microbatches: int) -> Any:
  """The first rows of a (possibly process-local) batch, at most one global microbatch's worth.

  Only shapes matter (parameter initialisation, cost-balanced partitioning), so a process whose
  local rows are fewer than a microbatch uses what it has.
  """
  rows = max(1, global_size // num_microbatches)
  return jax.tree.map(lambda x: x[:rows], tree)


def process_batch_spec(mesh: Any, process_count: int | None = None) -> Any:
  """The ``PartitionSpec`` of a batch's leading axis that gives process ``p``'s devices exactly
  the global rows ``p * b : (p + 1) * b`` (its process-local rows, ``b = B / process_count``).

  The leading axis is split over some of the mesh's axes (in some order) so that, walking the
  blocks in order, the first ``1 / P`` of them lie on process 0's devices, the next on process
  1's, and so on; the remaining axes replicate. In one process this is ``P()`` (every device
  holds the whole batch).

  Args:
    mesh: a ``jax.sharding.Mesh`` (anything with ``devices`` and ``axis_names``).
    process_count: processes in the run; default ``jax.process_count()``.

  Raises:
    ValueError: if some process owns no device of the mesh, or the mesh's devices are not laid
      out in process order along any combination of its axes (with the fix).
  """
  grid = np.asarray(mesh.devices, dtype=object)
  names = tuple(mesh.axis_names)
  count = jax.process_count() if process_count is None else process_count
  procs = sorted({int(d.process_index) for d in grid.flat})
  if len(procs) != count:
    raise ValueError(
        f"The pipeline's devices belong to processes {procs}, but this run has {count} "
        "processes. Every process passes its own rows of the global batch, so every process must "
        "own devices of the pipeline: build the mesh/devices from jax.devices() (all processes), "
        "e.g. the first k of jax.local_devices(process_index=i) for every i.")
  rank = {p: i for i, p in enumerate(procs)}
  cells: dict[tuple[int, ...], Any] = {i: grid[i] for i in np.ndindex(*grid.shape)}
  owner = {i: rank[int(d.process_index)] for i, d in cells.items()}
  candidates: list[tuple[int, ...]] = [()]
  for size in range(1, len(names) + 1):
    candidates += list(itertools.permutations(range(len(names)), size))
  for axes in candidates:
    sizes = [grid.shape[a] for a in axes]
    blocks = int(np.prod(sizes)) if axes else 1
    if blocks % count:
      continue
    per = blocks // count
    ok = True
    for index, process in owner.items():
      block = int(np.ravel_multi_index([index[a] for a in axes], sizes)) if axes else 0
      if process != block // per:
        ok = False
        break
    if ok:
      if not axes:
        return P()
      chosen = tuple(names[a] for a in axes)
      return P(chosen[0] if len(chosen) == 1 else chosen)
  raise ValueError(
      f"The mesh {dict(zip(names, grid.shape))} does not lay its devices out in process order "
      "along any of its axes, so process-local batch rows cannot be placed without moving data "
      "between processes. Order the devices by process (e.g. sorted(devices, key=lambda d: "
      "(d.process_index, d.id))) before reshaping them into the mesh.")


def put_process_batch(tree: Any, sharding: Any) -> Any:
  """Global arrays from process-local batch rows, without collectives.

  Every leaf ``[b, ...]`` holds this process's rows ``p * b : (p + 1) * b`` of a global
  ``[P * b, ...]`` array placed with ``sharding`` (from :func:`process_batch_spec`); each process
  fills only its own devices. In one process this is ``jax.device_put`` (inputs may live anywhere).
  """
  if sharding.is_fully_addressable:
    return jax.device_put(tree, sharding)
  count, me = jax.process_count(), jax.process_index()
  spec = tuple(sharding.spec)
  axes = spec[0] if spec and spec[0] is not None else ()
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  blocks = int(np.prod([sharding.mesh.shape[a] for a in axes])) if axes else 1

  def put(x):
    host = np.asarray(x)
    b = host.shape[0]
    shape = (count * b,) + host.shape[1:]
    if shape[0] % blocks:
      raise ValueError(f"The global batch of {count} x {b} = {shape[0]} rows is split over the "
                       f"mesh axes {axes} ({blocks} blocks) to place each process's rows on its "
                       f"devices; use a global batch size that is a multiple of {blocks}.")

    def rows(index):
      first = index[0]
      start, stop = (first.start or 0), (shape[0] if first.stop is None else first.stop)
      if start < me * b or stop > (me + 1) * b:
        raise ValueError(f"Process {me} holds global rows {me * b}..{(me + 1) * b - 1} but its "
                         f"devices need rows {start}..{stop - 1}; place the batch with "
                         "process_batch_spec(mesh).")
      return host[(slice(start - me * b, stop - me * b),) + tuple(index[1:])]

    return jax.make_array_from_callback(shape, sharding, rows)

  return jax.tree.map(put, tree)


def put_global(tree: Any, sharding: Any) -> Any:
  """Places host values (the same on every process) as global arrays with ``sharding``.

  Each process fills only its addressable devices, so there is no collective and no
  cross-process check (``jax.device_put`` of host data onto a global sharding runs one). Leaves
  may be numpy arrays, fully addressable ``jax.Array`` s (including PRNG key arrays), or global
  arrays that are fully replicated. In one process this is ``jax.device_put``.
  """
  if sharding.is_fully_addressable:
    return jax.device_put(tree, sharding)

  def put(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and x.sharding == sharding:
      return x
    x = local_value(x)
    impl = jax.random.key_impl(x) if _is_key(x) else None
    host = np.asarray(jax.random.key_data(x) if impl is not None else x)
    shape = tuple(np.shape(x))
    shards = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
      shard = jax.device_put(host[index], device)
      shards.append(jax.random.wrap_key_data(shard, impl=impl) if impl is not None else shard)
    return jax.make_array_from_single_device_arrays(shape, sharding, shards)

  return jax.tree.map(put, tree)


def process_mesh() -> Mesh:
  """A mesh of the first local device of every process, in process order: ``("proc",)``."""
  devices = [jax.local_devices(process_index=p)[0] for p in range(jax.process_count())]
  return Mesh(np.asarray(devices, dtype=object), ("proc",))


def local_value(x: Any) -> Any:
  """A value of ``x`` usable on this process, without collectives.

  Host values and fully addressable arrays are returned as they are; a global array that is fully
  replicated gives its copy on this process's first device that holds one.

  Raises:
    ValueError: for a global array that is not fully replicated (use :func:`gather`).
  """
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return x
  if x.is_fully_replicated and x.sharding.has_addressable_devices:
    return x.addressable_data(0)
  raise ValueError(f"A global array of shape {x.shape} with sharding {x.sharding} has no full "
                   "copy on this process; gather it with hkpipe._src.placement.gather "
                   "(every process must call it).")


def gather(tree: Any) -> Any:
  """Process-local copies of every leaf of ``tree`` (arrays usable on this process).

  Leaves that :func:`local_value` can serve locally are; the others (global arrays sharded across
  processes) are all-gathered, which is a collective: in a multi-process run every process must
  call this with the same tree.
  """
  leaves, treedef = jax.tree.flatten(tree)
  need = [i for i, x in enumerate(leaves)
          if isinstance(x, jax.Array) and not x.is_fully_addressable
          and not (x.is_fully_replicated and x.sharding.has_addressable_devices)]
  if need:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    got = multihost_utils.process_allgather([leaves[i] for i in need], tiled=True)
    for i, value in zip(need, got):
      leaves[i] = value
  return jax.tree.unflatten(treedef, [local_value(x) for x in leaves])


def check_same_batch_on_every_process(batch: Any) -> None:
  """Checks every process passes a batch of the same structure, shapes and dtypes.

  A collective (a small all-gather): in a multi-process run every process must call it. Without
  it, processes passing different shapes would build different global arrays and compile
  mismatched programs, which hangs or aborts inside the collectives instead of raising.

  Raises:
    ValueError: naming this process's batch signature.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  leaves, treedef = jax.tree.flatten(batch)
  signature = repr((str(treedef), [(tuple(np.shape(x)), str(x.dtype if hasattr(x, "dtype")
                                                            else np.asarray(x).dtype))
                                   for x in leaves]))
  digest = np.array([zlib.crc32(signature.encode())], np.uint32)
  try:
    multihost_utils.assert_equal(digest)
  except AssertionError as e:
    raise ValueError(f"Process {jax.process_index()} passed a batch {signature} that differs in "
                     "structure, shapes or dtypes from another process's. Every process must "
                     "pass batches of the same shapes (its own rows of the global batch, or the "
                     "full global batch, as Pipeline.data_layout says).") from e
