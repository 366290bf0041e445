"""Mesh axes inside SPMD stages: the ``("pp", "dp", "fsdp", "tp")`` mesh and ZeRO-3 over the
packed state.

The spmd backend keeps each rank's parameters and optimizer state as flat per-dtype buffers
(``_pack.FlatLayout``), global ``[pp, n]``. With ``fsdp x tp = z > 1`` devices per rank (per
``dp`` replica), each buffer is split along ``n`` over ``("fsdp", "tp")`` so that every device
holds ``1/z`` of *every leaf* (the column layout of ``_columns``). Inside the step (a
``shard_map`` manual over all four axes) a stage's parameters are all-gathered for each stage
call only, its gradients are reduce-scattered back onto the pieces, and the optimizer update
gathers one layer at a time (ZeRO-3). ``fsdp`` also splits the batch; ``tp`` devices compute the
same rows (``tp`` divides the state, not the compute, on this backend).
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


def batch_index() -> jax.Array:
  """Inside ``shard_map``: which of the ``dp x fsdp`` batch shards this device holds."""
  return jax.lax.axis_index(BATCH_AXES)
