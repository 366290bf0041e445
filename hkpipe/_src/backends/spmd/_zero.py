"""Mesh axes inside SPMD stages: the ``("pp", "dp", "fsdp", "tp")`` mesh and ZeRO-3 style
storage of the packed state.

The spmd backend keeps each rank's parameters and optimizer state as flat per-dtype buffers
(``_pack.FlatLayout``), global ``[pp, n]``. With ``fsdp x tp = z > 1`` devices per rank (per
``dp`` replica), ``n`` is padded to a multiple of ``z`` and each buffer is split along it over
``("fsdp", "tp")``: a device stores ``n / z`` elements of its rank's state. Inside the step
(a ``shard_map`` manual over all four axes) the buffers are all-gathered over ``("fsdp", "tp")``
before the schedule runs, gradients are averaged over the batch axes ``("dp", "fsdp")`` and each
device keeps its own ``n / z`` piece of the updated state. ``tp`` is therefore storage sharding
(like ``fsdp``, without splitting the batch), not tensor-parallel compute.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

AXES: tuple[str, ...] = ("pp", "dp", "fsdp", "tp")
STATE_AXES: tuple[str, ...] = ("fsdp", "tp")  # what a rank's state is split over
BATCH_AXES: tuple[str, ...] = ("dp", "fsdp")  # what a microbatch is split over

STATE_SPEC = P("pp", STATE_AXES)   # [pp, n] state buffers
DATA_SPEC = P(None, BATCH_AXES)    # [m, dp * fsdp, b, ...] microbatches


def make_mesh(grid: np.ndarray, inner_shape: Sequence[int]) -> Mesh:
  """The ``("pp", "dp", "fsdp", "tp")`` mesh of a ``[p, n]`` device grid whose rows are the
  ranks' devices in ``(dp, fsdp, tp)`` order (``n = dp * fsdp * tp``)."""
  grid = np.asarray(grid, dtype=object)
  devices = grid.reshape((grid.shape[0],) + tuple(int(s) for s in inner_shape))
  return Mesh(devices, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def padded(sizes: Mapping[str, int], z: int) -> dict[str, int]:
  """Per-dtype buffer lengths rounded up to a multiple of ``z`` (each device holds ``n / z``)."""
  return {k: -(-n // z) * z for k, n in sizes.items()}


def gather(bufs: Mapping[str, jax.Array], z: int) -> dict[str, jax.Array]:
  """Inside ``shard_map``: a rank's whole ``[n]`` buffers from this device's ``[1, n / z]``
  pieces (an all-gather over ``("fsdp", "tp")``)."""
  if z == 1:
    return {k: v[0] for k, v in bufs.items()}
  return {k: jax.lax.all_gather(v[0], STATE_AXES, axis=0, tiled=True) for k, v in bufs.items()}


def own_piece(bufs: Mapping[str, jax.Array], z: int) -> dict[str, jax.Array]:
  """Inside ``shard_map``: this device's ``[1, n / z]`` piece of whole ``[n]`` buffers (the
  inverse of :func:`gather`; every device of the rank holds the same whole buffers)."""
  if z == 1:
    return {k: v[None] for k, v in bufs.items()}
  index = jax.lax.axis_index(STATE_AXES)
  # Slicing [z, n / z] by row keeps the offset small: ``index * n / z`` overflows int32 once a
  # rank's buffer has more than 2**31 elements (Llama-3-70B's AdamW state at pp8).
  return {k: jax.lax.dynamic_slice_in_dim(v.reshape(z, v.shape[0] // z), index, 1)
          for k, v in bufs.items()}


def batch_index() -> jax.Array:
  """Inside ``shard_map``: which of the ``dp x fsdp`` batch shards this device holds."""
  return jax.lax.axis_index(BATCH_AXES)
