"""Resolves a pipeline layout (schedule, stages, device grid) from ``PipelineOptions``.

Shared by the pipelined backends (MPMD, SPMD) so they agree on what ``devices``, ``mesh``,
``schedule``, ``virtual_stages``, ``num_ranks`` and ``partition`` mean:

- ranks ``p``: the ``pp`` axis of ``mesh``, else ``len(devices)``, else ``num_ranks`` (the first
  ``num_ranks`` devices), else every device; ``num_ranks``, if given, must equal ``p``;
- data-parallel width ``dp``: the mesh's ``dp`` axis (1 without a mesh);
- inside each rank, a sub-mesh ``("dp", "fsdp", "tp")`` of the mesh's inner axes (size 1 where
  absent; see ``hkpipe._src.sharding``): :meth:`Layout.rank_mesh`;
- ``v``: ``virtual_stages``, else the schedule's registry default (2 for V schedules, 1 for
  flat ones);
- the model is cut into ``p * v`` stages.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence, cast

import jax
import numpy as np

from hkpipe._src import model as model_lib
from hkpipe._src import partition as partition_lib
from hkpipe._src import options as options_lib
from hkpipe._src import sharding as sharding_lib


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where every stage runs and in which order.

  Attributes:
    schedule: the (unlowered) schedule; ``schedule.stage_to_rank[s]`` is stage ``s``'s rank.
    stages: the model stages in model order (``len == schedule.num_stages``).
    device_grid: numpy object array ``[p, n]``: row ``r`` holds rank ``r``'s ``n = dp * fsdp *
      tp`` devices (in the mesh's order).
    inner_axes: the inner axes the mesh has (a subset of ``("dp", "fsdp", "tp")``, in order).
    inner_shape: the sizes of ``("dp", "fsdp", "tp")`` (1 where absent); default ``(n, 1, 1)``.
  """

  schedule: Any
  stages: tuple[partition_lib.StageSpec, ...]
  device_grid: np.ndarray
  inner_axes: tuple[str, ...] = ("dp",)
  inner_shape: tuple[int, int, int] | None = None

  @property
  def num_ranks(self) -> int:
    return int(self.device_grid.shape[0])

  @property
  def sub_mesh_shape(self) -> tuple[int, int, int]:
    """``(dp, fsdp, tp)`` of every rank's sub-mesh."""
    return self.inner_shape or (int(self.device_grid.shape[1]), 1, 1)

  @property
  def dp(self) -> int:
    return self.sub_mesh_shape[0]

  @property
  def fsdp(self) -> int:
    return self.sub_mesh_shape[1]

  @property
  def tp(self) -> int:
    return self.sub_mesh_shape[2]

  @property
  def axis_sizes(self) -> dict[str, int]:
    """The sizes of the inner axes the mesh has (what sharding rules may name)."""
    return dict(zip(sharding_lib.INNER_AXES, self.sub_mesh_shape))

  def rank_mesh(self, rank: int) -> Any:
    """Rank ``rank``'s sub-mesh, axes ``("dp", "fsdp", "tp")`` (all ``Auto``)."""
    devices = np.asarray(self.device_grid[rank], dtype=object).reshape(self.sub_mesh_shape)
    return jax.sharding.Mesh(devices, sharding_lib.INNER_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * 3)

  def rank_devices(self, rank: int) -> tuple[Any, ...]:
    return tuple(self.device_grid[rank])

  def stage_devices(self, stage: int) -> tuple[Any, ...]:
    return self.rank_devices(self.schedule.stage_to_rank[stage])


def device_grid(options: options_lib.PipelineOptions, inner: bool = False) -> np.ndarray:
  """The ``[p, n]`` device grid of the options (see module docstring).

  Args:
    options: the options.
    inner: accept meshes with any inner axes ``"dp"``, ``"fsdp"``, ``"tp"`` (``n`` is then
      their product); False: only ``("pp",)`` or ``("pp", "dp")``.
  """
  if options.mesh is not None and options.devices is not None:
    raise ValueError("Pass either devices=... or mesh=..., not both.")
  if options.mesh is not None:
    mesh = options.mesh
    names = tuple(mesh.axis_names)
    if inner:
      sharding_lib.check_mesh_axes(names)
    elif names not in (("pp",), ("pp", "dp")):
      raise ValueError(f"Pipeline meshes need axes ('pp',) or ('pp', 'dp'); got {names}. "
                       "Build one with jax.make_mesh((pp, dp), ('pp', 'dp')).")
    grid = np.asarray(mesh.devices, dtype=object)
    return grid.reshape(grid.shape[0], -1)
  if options.devices is not None:
    devices = list(options.devices)
  else:
    devices = jax.devices()
    if options.num_ranks is not None:
      if options.num_ranks > len(devices):
        raise ValueError(f"num_ranks={options.num_ranks} pipeline ranks need as many devices, "
                         f"but {len(devices)} are visible. On CPU, simulate more with "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=N (or "
                         "launch/train.py --host_devices=N).")
      devices = default_rank_devices(options.num_ranks)
  if not devices:
    raise ValueError("devices=... is empty; pass at least one device.")
  if len(set(devices)) != len(devices) and options.backend != "mpmd":  # mpmd: stages may share
    raise ValueError(f"devices=... lists a device twice: {devices}.")
  return np.asarray(devices, dtype=object).reshape(len(devices), 1)


def default_rank_devices(num_ranks: int) -> list:
  """One device per rank, ranks in process order, spread evenly over the processes.

  In one process: the first ``num_ranks`` devices. With ``P`` processes and ``num_ranks`` a
  multiple of ``P`` (each process having enough devices): the first ``num_ranks / P`` local
  devices of every process, so that e.g. 2 ranks over 2 processes put rank 0 on process 0 and
  rank 1 on process 1. Otherwise the first ``num_ranks`` devices of ``jax.devices()`` (which
  lists the devices process by process).
  """
  try:
    return spread_devices(num_ranks)
  except ValueError:
    return list(jax.devices()[:num_ranks])


def spread_devices(count: int) -> list:
  """``count`` devices spread evenly over the processes, in process order.

  One process: the first ``count`` devices. ``P`` processes: the first ``count / P`` local
  devices of every process, process by process (a ``(pp, dp)`` mesh built from this list row by
  row puts ``pp`` ranks on processes in order).

  Raises:
    ValueError: when ``count`` is not a multiple of the process count, or a process has too few
      devices (with the fix).
  """
  procs = jax.process_count()
  if procs == 1:
    return list(jax.devices()[:count])
  if count % procs:
    raise ValueError(f"{count} devices cannot be spread evenly over {procs} processes; use a "
                     f"device count (pipeline ranks x dp, or dp for pmap) that is a multiple of "
                     f"{procs}.")
  per = count // procs
  local = [jax.local_devices(process_index=p) for p in range(procs)]
  short = [p for p in range(procs) if len(local[p]) < per]
  if short:
    raise ValueError(f"{count} devices over {procs} processes need {per} on each, but processes "
                     f"{short} have fewer; simulate more with --host_devices={per}.")
  return [d for p in range(procs) for d in local[p][:per]]


def check_ranks_within_processes(layout: Layout) -> None:
  """Raises if a pipeline rank's devices belong to several processes (MPMD drives each rank
  from the one process that owns its devices).

  Raises:
    ValueError: naming the rank, the processes of its devices and the fix.
  """
  for r in range(layout.num_ranks):
    devices = layout.rank_devices(r)
    procs = sorted({int(d.process_index) for d in devices})
    if len(procs) > 1:
      raise ValueError(
          f"Pipeline rank {r} has devices {list(devices)} of processes {procs}, but an MPMD rank "
          "must live on one process. Build the ('pp', 'dp') mesh so that each 'pp' row holds "
          "devices of a single process (e.g. rows of jax.local_devices(process_index=i)), or "
          "use a 'dp' width that divides each process's local device count.")


def inner_axes(options: options_lib.PipelineOptions) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """The inner axes the options' mesh has and the ``(dp, fsdp, tp)`` sizes (1 where absent)."""
  if options.mesh is None:
    return (), (1, 1, 1)
  names = tuple(options.mesh.axis_names)
  sizes = sharding_lib.inner_sizes(names, options.mesh.devices.shape)
  return (tuple(a for a in sharding_lib.INNER_AXES if a in names),
          tuple(sizes[a] for a in sharding_lib.INNER_AXES))


def resolve(model: model_lib.SequentialModel, options: options_lib.PipelineOptions,
            example_microbatch: Any, inner: bool = False) -> Layout:
  """Builds the schedule, the stages and the device grid, validating them against each other.

  Args:
    model: the model.
    options: the pipeline options.
    example_microbatch: one microbatch of inputs (for cost-balanced partitioning).
    inner: accept the inner mesh axes ``"fsdp"``, ``"tp"`` (see :func:`device_grid`).

  Raises:
    ValueError: naming the inconsistent option and the fix, before anything is compiled.
  """
  from hkpipe import schedules  # pylint: disable=g-import-not-at-top

  grid = device_grid(options, inner)
  p = int(grid.shape[0])
  m = cast(int, options.num_microbatches)  # PipelineOptions always sets it
  if isinstance(options.schedule, str):
    # virtual_stages=None lets the registry apply the schedule's own default (2 for V schedules,
    # 1 for flat ones; interleaved_1f1b asks for it explicitly).
    schedule = schedules.get(options.schedule, num_ranks=p, num_microbatches=m,
                             virtual_stages=options.virtual_stages)
  else:
    schedule = options.schedule
    if options.virtual_stages is not None and options.virtual_stages != schedule.stages_per_rank:
      raise ValueError(f"virtual_stages={options.virtual_stages} but the given schedule has "
                       f"{schedule.stages_per_rank} stages per rank; drop virtual_stages or make "
                       "them equal.")
    if schedule.num_ranks != p:
      raise ValueError(f"The schedule has {schedule.num_ranks} ranks but the pipeline has {p} "
                       "(devices or mesh 'pp' axis); make them equal.")
    if schedule.num_microbatches != m:
      raise ValueError(f"The schedule has {schedule.num_microbatches} microbatches but "
                       f"num_microbatches={m}; make them equal.")
  num_stages = schedule.num_stages
  if options.num_ranks is not None and options.num_ranks != p:
    raise ValueError(f"num_ranks={options.num_ranks} pipeline ranks, but the devices/mesh give "
                     f"{p}; pass matching values or only one of them.")
  if num_stages > len(model.layers):
    raise ValueError(f"The schedule needs {num_stages} stages ({p} ranks x "
                     f"{schedule.stages_per_rank} per rank) but the model has only "
                     f"{len(model.layers)} layers; use fewer devices/virtual stages or a deeper model.")
  part = options.partition
  if isinstance(part, Sequence) and not isinstance(part, str):
    stages = partition_lib.partition(model, num_stages, boundaries=part)
  else:
    stages = partition_lib.partition(model, num_stages, cost=part,
                                     example_inputs=example_microbatch)
  axes, shape = inner_axes(options) if inner else (("dp",), (int(grid.shape[1]), 1, 1))
  return Layout(schedule=schedule, stages=stages, device_grid=grid, inner_axes=axes,
                inner_shape=shape)  # type: ignore[arg-type]
