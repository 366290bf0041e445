"""State on its owners: each ``pp`` rank's packed buffers are built, read and written by programs
that run on that rank's devices only, so no device (and no host) ever holds the whole model.

The packed state is a ``[pp, n]`` array per dtype sharded ``P("pp")`` over the ``("pp", "dp")``
mesh: rank ``r``'s devices (its ``dp`` replicas) each hold row ``r``. Here each row is handled as
its own array on the rank's sub-mesh ``grid[r:r+1, :]`` (same axis names, ``pp`` of size 1):

- :func:`split_rows` / :func:`join_rows` convert between the global buffers and the per-rank rows
  without copying (they regroup the same device buffers);
- :func:`init_program` builds rank ``r``'s parameters (each layer from ``fold_in(rng, i)``, as
  ``SequentialModel.init`` does) and optimizer state, and packs them, in one jitted program whose
  outputs are the rank's rows;
- :func:`pack_program` / :func:`unpack_program` move a rank's canonical leaves into its rows and
  back, on its devices.

Multi-process: a process runs the programs of the ranks it has devices of, and stands in for the
others' arrays with shard-less global arrays of the right shape and sharding.
"""

from __future__ import annotations

import dataclasses
import functools

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hkpipe._src import canonical as canonical_lib
from hkpipe._src import stage_link
from hkpipe._src import model as model_lib
from hkpipe._src.backends import _mpmd_transfer as xfer_lib
from hkpipe._src import placement
from hkpipe._src.backends.spmd import _columns as columns
from hkpipe._src.backends.spmd import _pack as pack
from hkpipe._src.backends.spmd import _zero as zero
from hkpipe._src.backends.spmd._plan import _Plan


def rank_mesh(mesh: Mesh, rank: int) -> Mesh:
  """Rank ``rank``'s devices as a mesh of the same axes with ``pp`` of size 1."""
  grid = np.asarray(mesh.devices, dtype=object)[rank:rank + 1]
  return Mesh(grid, mesh.axis_names, axis_types=mesh.axis_types)


def row_sharding(mesh: Mesh, rank: int) -> NamedSharding:
  """Where rank ``rank``'s ``[1, n]`` rows live: split over the rank's ``("fsdp", "tp")``
  devices, replicated over its ``dp`` replicas."""
  return NamedSharding(rank_mesh(mesh, rank), zero.STATE_SPEC)


def leaf_sharding(mesh: Mesh, rank: int) -> NamedSharding:
  """Where rank ``rank``'s canonical leaves live: replicated over the rank's devices."""
  return NamedSharding(rank_mesh(mesh, rank), P())


def is_here(mesh: Mesh, rank: int) -> bool:
  """Whether this process has devices of rank ``rank`` (and so runs its programs)."""
  me = jax.process_index()
  return any(d.process_index == me for d in np.asarray(mesh.devices, dtype=object)[rank].flat)


def remote(aval: Any, sharding: NamedSharding) -> jax.Array:
  """A global array with no shard on this process: another process's leaf."""
  return jax.make_array_from_single_device_arrays(tuple(aval.shape), sharding, [],
                                                  dtype=aval.dtype)


def remote_rank(plan: _Plan, mesh: Mesh, rank: int) -> tuple[dict, Any]:
  """Stand-ins for another process's rank: its ``({layer: params}, optimizer state)`` as
  shard-less global arrays on its devices."""
  where = leaf_sharding(mesh, rank)
  stand_in = lambda lay: jax.tree.map(lambda a: remote(a, where), lay.treedef.unflatten(lay.avals))
  params = {}
  for s in plan.rank_stages(rank):
    params.update(stand_in(plan.stage_layouts[s]))
  return params, stand_in(plan.opt_layouts[rank])


def split_rows(bufs: Mapping[str, jax.Array], mesh: Mesh, rank: int) -> dict[str, jax.Array]:
  """Rank ``rank``'s rows ``[1, n]`` of global ``[pp, n]`` buffers (no copy; rank here)."""
  sharding = row_sharding(mesh, rank)
  devices = set(sharding.device_set)
  out: dict[str, jax.Array] = {}
  for k, buf in bufs.items():
    shards = [s.data for s in buf.addressable_shards if s.device in devices]
    out[k] = jax.make_array_from_single_device_arrays((1,) + tuple(buf.shape[1:]), sharding,
                                                      shards)
  return out


def ranks_within_processes(mesh: Mesh, num_ranks: int) -> bool:
  """Whether every rank's devices belong to one process (each can then run on its own)."""
  # jaxlib has no Device stubs: process_index is unknown to mypy
  return all(len({d.process_index for d in row_sharding(mesh, r).device_set}) == 1  # type: ignore[attr-defined]
             for r in range(num_ranks))


def rank_decode_params(program: Callable, bufs: Mapping[str, jax.Array], mesh: Mesh, rank: int) -> dict:
  """``{layer: params}`` of rank ``rank`` by its ``unpack_params_program``: on its devices where
  this process owns them, else their shapes and dtypes (``jax.ShapeDtypeStruct`` s)."""
  sharding = row_sharding(mesh, rank)
  # jaxlib has no Device stubs: process_index is unknown to mypy
  if all(d.process_index == jax.process_index() for d in sharding.device_set):  # type: ignore[attr-defined]
    return program(split_rows(bufs, mesh, rank))
  rows = {k: jax.ShapeDtypeStruct((1,) + tuple(b.shape[1:]), b.dtype, sharding=sharding)
          for k, b in bufs.items()}
  return stage_link.abstract(jax.eval_shape(program, rows))


def next_channel(last: stage_link.Channel | None) -> stage_link.Channel | None:
  """The channel of a backend's next walk across processes: ``last``'s namespace and call + 1;
  a new namespace of this process's transport at the first (every process reaches its spmd
  pipelines' first walks in the same order); None in one process."""
  if jax.process_count() == 1:
    return None
  if last is None:
    transport = xfer_lib.transport()
    last = stage_link.Channel(transport, transport.new_namespace(), 0)
  return dataclasses.replace(last, call=last.call + 1)


def join_rows(rows: Sequence[Mapping[str, jax.Array] | None], mesh: Mesh,
              sizes: Mapping[str, int]) -> dict[str, jax.Array]:
  """Global ``[pp, n]`` buffers sharded ``zero.STATE_SPEC`` from every rank's ``[1, n]`` rows
  (None for ranks of other processes), without copying."""
  sharding = NamedSharding(mesh, zero.STATE_SPEC)
  out: dict[str, jax.Array] = {}
  for k, n in sizes.items():
    shards = [s.data for r in rows if r is not None for s in r[k].addressable_shards]
    out[k] = jax.make_array_from_single_device_arrays((len(rows), n), sharding, shards,
                                                      dtype=jnp.dtype(k))
  return out


def _layers_needed(model: model_lib.SequentialModel, own: Sequence[str]) -> list[int]:
  """Indices of the layers whose parameters rank-local init needs: its own, plus the sources of
  the ties whose targets it holds (transitively), in model order."""
  need = set(own)
  grew = True
  while grew:
    grew = False
    for tie in model.ties:
      if tie.target[0] in need and tie.source[0] not in need:
        need.add(tie.source[0])
        grew = True
  return [i for i, layer in enumerate(model.layers) if layer.name in need]


def rank_params(model: model_lib.SequentialModel, names: Sequence[str], rng: jax.Array,
                example: Any, in_avals: Sequence[Any]) -> dict:
  """The canonical parameters of layers ``names``, equal to ``model.init(rng, example)``'s.

  Layer ``i`` is initialised from ``fold_in(rng, i)`` on ``example`` (``i == 0``) or zeros of its
  input shape ``in_avals[i]``, then ties are applied in model order (a tie's source layer is
  initialised here too, when this rank holds its target).
  """
  tree = {}
  for i in _layers_needed(model, names):
    layer = model.layers[i]
    x = example if i == 0 else jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), in_avals[i])
    tree[layer.name] = layer.init(jax.random.fold_in(rng, i), x)
  ties = [t for t in model.ties if t.target[0] in tree]
  tree = model_lib.tie_params(tree, ties)
  return {n: tree[n] for n in names}


def pack_rank(plan: _Plan, rank: int, params: Mapping[str, Any], opt_state: Any
              ) -> tuple[dict, dict]:
  """Rank ``rank``'s canonical params and optimizer state as its ``[1, n]`` rows (traced)."""
  bufs = pack.zeros(plan.param_sizes)
  for s in plan.rank_stages(rank):
    bufs = columns.pack_into(plan.stage_layouts[s], bufs,
                             {n: params[n] for n in plan.layout.stages[s].layer_names})
  opt = columns.pack_into(plan.opt_layouts[rank], pack.zeros(plan.opt_sizes), opt_state)
  expand = lambda d: {k: v[None] for k, v in d.items()}
  return expand(bufs), expand(opt)


def _unpack_params(plan: _Plan, rank: int, prow: Mapping[str, jax.Array]) -> dict:
  """``{layer: params}`` of rank ``rank`` from its parameter rows (traced)."""
  prow = {k: v[0] for k, v in prow.items()}
  params = {}
  for s in plan.rank_stages(rank):
    params.update(columns.unpack(plan.stage_layouts[s], prow))
  return params


def unpack_rank(plan: _Plan, rank: int, prow: Mapping[str, jax.Array],
                orow: Mapping[str, jax.Array]) -> tuple[dict, Any]:
  """Inverse of :func:`pack_rank` (traced): ``({layer: params}, optimizer state)``."""
  return (_unpack_params(plan, rank, prow),
          columns.unpack(plan.opt_layouts[rank], {k: v[0] for k, v in orow.items()}))


def init_program(model: model_lib.SequentialModel, optimizer: optax.GradientTransformation,
                 plan: _Plan, mesh: Mesh, rank: int, in_avals: Sequence[Any]) -> Callable:
  """Jitted ``(rng, example) -> (param rows, optimizer rows)`` of rank ``rank``, on its devices."""
  names = plan.rank_names(rank)

  def init(rng, example):
    params = rank_params(model, names, rng, example, in_avals)
    return pack_rank(plan, rank, params, optimizer.init(params))

  return jax.jit(init, out_shardings=row_sharding(mesh, rank))


def pack_program(plan: _Plan, mesh: Mesh, rank: int) -> Callable:
  """Jitted ``(params, opt_state) -> (param rows, optimizer rows)`` of rank ``rank``."""
  return jax.jit(lambda p, o: pack_rank(plan, rank, p, o), out_shardings=row_sharding(mesh, rank))


def unpack_program(plan: _Plan, mesh: Mesh, rank: int) -> Callable:
  """Jitted ``(param rows, optimizer rows) -> (params, opt_state)`` of rank ``rank``, the leaves
  replicated over the rank's devices."""
  return jax.jit(lambda p, o: unpack_rank(plan, rank, p, o),
                 out_shardings=leaf_sharding(mesh, rank))


def unpack_params_program(plan: _Plan, mesh: Mesh, rank: int) -> Callable:
  """Jitted ``param rows -> {layer: params}`` of rank ``rank``, the leaves replicated over the
  rank's devices (no optimizer state: what decoding needs)."""
  return jax.jit(functools.partial(_unpack_params, plan, rank),
                 out_shardings=leaf_sharding(mesh, rank))


def shared_opt_leaves(plan: _Plan) -> list[tuple[int, int]]:
  """Optimizer-state leaves every rank holds a copy of (step counters...): per such leaf of the
  canonical (merged) tree, ``(its index there, its index in rank 0's tree)``.

  ``canonical.merge`` takes them from the first part; merging the parts in reverse order takes
  them from the last, so they are the leaves whose origin differs between the two merges.
  """
  names = [plan.rank_names(r) for r in range(plan.num_ranks)]
  marks = [lay.treedef.unflatten([f"{r}:{i}" for i in range(len(lay.avals))])
           for r, lay in enumerate(plan.opt_layouts)]
  first = jax.tree.leaves(canonical_lib.merge(marks, names))
  last = jax.tree.leaves(canonical_lib.merge(marks[::-1], names[::-1]))
  return [(j, int(a.split(":")[1])) for j, (a, b) in enumerate(zip(first, last)) if a != b]


def shared_program(plan: _Plan, mesh: Mesh, rank0_indices: Sequence[int]) -> Callable:
  """Jitted ``optimizer buffers -> [rank 0's shared leaves]``, replicated over the whole mesh
  (tiny: counters), so that every rank and every process holds them."""

  def read(obufs):
    leaves = jax.tree.leaves(columns.unpack(plan.opt_layouts[0],
                                            {k: v[0] for k, v in obufs.items()}))
    return [leaves[i] for i in rank0_indices]

  return jax.jit(read, out_shardings=NamedSharding(mesh, P()))


def place_leaf(x: Any, sharding: NamedSharding) -> Any:
  """A canonical leaf on ``sharding`` (a rank's devices): kept if already there, else copied from
  a value this process holds (host data, a local array, or a replicated global array).

  Raises:
    ValueError: for a global array this process holds no full copy of (another process's leaf):
      it would need a collective.
  """
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if not (x.is_fully_replicated and x.sharding.has_addressable_devices):
      raise ValueError(
          f"A canonical leaf of shape {x.shape} lives on {x.sharding}, which this process "
          f"holds no full copy of, but the spmd pipeline needs it on {sharding.mesh.devices}. "
          "Restore canonical states through hkpipe.train.Checkpointer with "
          "like=pipe.to_canonical(state) (leaves then arrive on their owners), or pass host "
          "(numpy) values.")
    x = placement.local_value(x)  # this process's copy of a replicated leaf (counters)
  return placement.put_global(x, sharding)
