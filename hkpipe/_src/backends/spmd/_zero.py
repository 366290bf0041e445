"""Mesh axes inside SPMD stages: the ``("pp", "dp", "fsdp", "tp")`` mesh and ZeRO-3 over the
packed state.

The spmd backend keeps each rank's parameters and optimizer state as flat per-dtype buffers
(``_pack.FlatLayout``), global ``[pp, n]``. With ``fsdp x tp = z > 1`` devices per rank (per
``dp`` replica), each buffer is split along ``n`` over ``("fsdp", "tp")`` so that every device
holds ``1/z`` of *every leaf* (the column layout of ``_columns``). Inside the step (a
``shard_map``, see :class:`StepAxes`) a stage's parameters are all-gathered for each stage call
only, its gradients are reduce-scattered back onto the pieces, and the optimizer update gathers
one layer at a time (ZeRO-3). ``fsdp`` also splits the batch; ``tp`` splits the stage compute
(left to the compiler) when the parameters are float32, else only the stored state.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from hkpipe._src import errors

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


@dataclasses.dataclass(frozen=True)
class StepAxes:
  """How the step's ``shard_map`` treats the inner axes.

  With tensor-parallel compute (``tp > 1`` and float32 parameters: see
  :func:`tensor_parallel_compute`) it is manual over ``("pp", "dp", "fsdp")`` and leaves ``tp``
  to the compiler (GSPMD): a stage's parameters, gathered over ``fsdp``, are constrained to their
  rules' ``tp`` specs and the compiler splits the stage's compute over ``tp``. Otherwise it is
  manual over all four axes and ``tp`` only divides the stored state (its devices compute the
  same rows).

  Attributes:
    fsdp: the ``fsdp`` size.
    tp: the ``tp`` size.
    tp_compute: whether ``tp`` is left to the compiler.
  """

  fsdp: int
  tp: int
  tp_compute: bool

  @property
  def manual(self) -> frozenset[str]:
    """The ``shard_map``'s manual axes."""
    return frozenset(AXES[:3] if self.tp_compute else AXES)

  @property
  def state(self) -> tuple[str, ...]:
    """The manual state axes of size > 1 the pieces' rows are split over (collectives)."""
    axes = ("fsdp",) if self.tp_compute else STATE_AXES
    return tuple(a for a in axes if getattr(self, a) > 1)

  @property
  def rows(self) -> int:
    """Rows of the ``[z, n / z]`` view one shard holds: ``tp`` with tensor-parallel compute."""
    return self.tp if self.tp_compute else 1

  @property
  def state_spec(self) -> P:
    """The ``shard_map`` spec of the ``[pp, n]`` state buffers (manual axes only)."""
    return P("pp", "fsdp") if self.tp_compute else STATE_SPEC

  @property
  def sum_copies(self) -> int:
    """How many shards' gradients a ``psum_scatter`` over :attr:`state` adds per batch shard:
    ``fsdp`` batch shards, times ``tp`` identical copies when ``tp`` is manual."""
    return self.fsdp * (1 if self.tp_compute else self.tp)


def tensor_parallel_compute(tp: int, param_dtypes: Sequence[str]) -> bool:
  """Whether the step leaves ``tp`` to the compiler: ``tp > 1`` and every parameter float32.

  With bfloat16 (or other non-float32) parameters the CPU compiler of jax 0.10 aborts the process
  while compiling the tensor-parallel backward (``Invalid binary instruction opcode copy``), so
  those keep ``tp`` manual (storage only).
  """
  return tp > 1 and all(d == "float32" for d in param_dtypes)


INDEX_LIMIT = 2**31 - 1  # jax indexes with int32 (x64 off): larger offsets wrap silently


def check_index_range(kind: str, sizes: Mapping[str, int], z: int) -> None:
  """Refuses per-device pieces of ``2**31`` or more elements before a real state is built: the
  step's column offsets into them are int32 and would wrap around (memory planning is allowed).

  Raises:
    ConfigError: naming the buffer, its length per device and the fix.
  """
  for k, n in sizes.items():
    if n // z > INDEX_LIMIT:
      raise errors.ConfigError(
          f"The spmd {kind} buffer of dtype {k} would hold {n // z} elements per device "
          f"({n} per rank over fsdp x tp = {z}), more than 2**31 - 1: its int32 offsets would "
          "wrap. Use more pipeline ranks or a larger fsdp/tp, or backend='mpmd'.")


def padded(sizes: Mapping[str, int], z: int) -> dict[str, int]:
  """Per-dtype buffer lengths rounded up to a multiple of ``z`` (each device holds ``n / z``)."""
  return {k: -(-n // z) * z for k, n in sizes.items()}


def batch_index() -> jax.Array:
  """Inside ``shard_map``: which of the ``dp x fsdp`` batch shards this device holds."""
  return jax.lax.axis_index(BATCH_AXES)
