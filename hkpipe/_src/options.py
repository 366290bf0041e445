"""``PipelineOptions``: every option a backend takes besides the model and the optimizer.

The options are validated here once, when they are built, so a bad value fails before any
backend is constructed or anything is compiled. ``available_backends`` names the backends
``Pipeline(backend=...)`` accepts.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Mapping, Sequence

import numpy as np

from hkpipe._src import deprecation
from hkpipe._src import errors
from hkpipe._src import sharding as sharding_lib
from hkpipe._src import remat as remat_lib

# name -> "module:Class"; imported lazily so a backend's dependencies load only when used.
_BACKENDS: Mapping[str, str] = {
    "single": "hkpipe._src.backends.single:SingleBackend",
    "mpmd": "hkpipe._src.backends.mpmd:MpmdBackend",
    "spmd": "hkpipe._src.backends.spmd:SpmdBackend",
    "pmap": "hkpipe._src.backends.pmap:PmapBackend",
}


def available_backends() -> tuple[str, ...]:
  """Names accepted by ``Pipeline(backend=...)``."""
  return tuple(_BACKENDS)


def backend_class(name: str) -> Any:
  """The backend class registered as ``name`` (one of :func:`available_backends`), imported now.

  Raises:
    ConfigError: for a name that is not registered.
  """
  if name not in _BACKENDS:
    raise errors.ConfigError(f"Unknown backend {name!r}; choose one of {list(_BACKENDS)}.")
  module_name, cls_name = _BACKENDS[name].split(":")
  return getattr(importlib.import_module(module_name), cls_name)


PIPELINED = ("mpmd", "spmd")  # the backends that cut the model into pipeline stages

# The one table of which backend uses which option: every option not listed is used by every
# backend; giving a listed option (a value other than its default) to a backend that is not in its
# row is a ConfigError. The trainer's checks of ``config.pipeline.*`` derive from it too
# (``config_checks.pipeline_sizes``).
OPTION_BACKENDS: Mapping[str, tuple[str, ...]] = {
    "schedule": PIPELINED,
    "num_ranks": PIPELINED,
    "virtual_stages": PIPELINED,
    "partition": PIPELINED,
    "mesh": ("pmap",) + PIPELINED,
    "record_timeline": ("mpmd",),
    # Sharding inside stages: also config.pipeline.fsdp/tp (mesh axes inside each stage).
    "sharding_rules": PIPELINED,
}


def unused_options(backend: str) -> tuple[str, ...]:
  """The options of :class:`PipelineOptions` that ``backend`` does not use (see
  ``OPTION_BACKENDS``)."""
  return tuple(name for name, users in OPTION_BACKENDS.items() if backend not in users)


def backends_using(options: Sequence[str]) -> tuple[str, ...]:
  """The backends that use every one of ``options``, in :func:`available_backends` order."""
  return tuple(b for b in _BACKENDS if all(b in OPTION_BACKENDS.get(n, _BACKENDS)
                                           for n in options))


_PIPELINED_DEFAULTS: Mapping[str, Any] = {"schedule": "1f1b", "partition": "params"}


def _positive_int(name: str, value: Any, fix: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise errors.ConfigError(f"{name} must be a positive int, got {value!r}; {fix}.")


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
  """Everything a backend needs besides the model and the optimizer.

  Every option is used by the backend or rejected: giving an option that ``backend`` does not use
  (``schedule``, ``num_ranks``, ``virtual_stages``, ``partition`` on ``single``/``pmap``; ``mesh``
  on ``single``; ``record_timeline`` anywhere but ``mpmd``) raises a ``ConfigError``.

  Attributes:
    backend: one of :func:`available_backends`.
    num_microbatches: microbatches per step (gradient accumulation on the single backend);
      default: the ``schedule`` object's, else 1.
    schedule: schedule name (see ``hkpipe.schedules``) or a ``Schedule`` object (then its ranks
      and microbatches are the pipeline's); pipelined backends only; default ``"1f1b"``.
    num_ranks: number of pipeline ranks ``p`` (as in ``hkpipe.schedules.get``); default from
      ``devices``/``mesh`` or the ``schedule`` object; without any, the first ``num_ranks``
      devices are used. The model is cut into ``p * virtual_stages`` stages.
    num_stages: deprecated spelling of ``num_ranks`` (it meant ranks here; "stages" now names
      the ``p * v`` model stages): warns ``FutureWarning`` and is moved to ``num_ranks`` (then
      reads ``None``); giving both is a ``ConfigError``.
    virtual_stages: stages per rank ``v`` (interleaved/V schedules); default from the schedule.
    partition: stage boundaries (layer indices where stages 1.. start), or a cost name
      (``"params"``, ``"flops"``) or a callable ``cost(layer, example_input) -> float``;
      pipelined backends only; default ``"params"``.
    devices: devices for the pipeline ranks (one per rank; ``pmap``: the data-parallel devices;
      ``single``: one device), default ``jax.devices()``.
    mesh: alternatively a mesh with axes ``("pp",)`` or ``("pp", "dp")`` (``pmap``: its devices);
      ``mpmd`` also takes ``"fsdp"`` and ``"tp"``: ``"pp"`` then any of ``"dp"``, ``"fsdp"``,
      ``"tp"`` in that order (see ``docs/sharding.md``).
    sharding_rules: how parameters (and their gradients and optimizer state) are sharded over
      the mesh's ``"fsdp"``/``"tp"`` axes inside each stage: a ``hkpipe.sharding.Rules`` or a
      sequence of ``(regex, PartitionSpec)`` pairs. None: a GPT/Llama model from
      ``hkpipe.models`` on a mesh with ``tp > 1`` uses ``hkpipe.models.sharding_rules(config)``;
      otherwise every leaf gets the default FSDP spec (replicated without ``"fsdp"``).
      ``mpmd`` only for now (``spmd`` rejects it until it shards inside stages).
    max_grad_norm: clip the global gradient norm (over all stages) to this value; None or 0: no
      clipping.
    remat: rematerialisation of each stage's forward in the backward (activation
      checkpointing): False (none), True (recompute everything), or a policy name from
      ``hkpipe._src.remat.POLICIES`` (``"nothing_saveable"``, ``"dots_saveable"``,
      ``"dots_with_no_batch_dims_saveable"``, ``"offload_dots_with_no_batch_dims"``); on
      ``spmd``/``mpmd`` also a tuple of those, one per model stage.
    record_timeline: record the executed per-rank actions with their times (``mpmd`` only).
    donate: donate parameter and optimizer buffers to the update (saves memory; the old state
      becomes invalid after ``train_step``).
    progress: a ``hkpipe.train.Progress`` the backend keeps up to date (the MPMD driver: the
      last op issued and the message awaited), for a hang ``Watchdog``; None: a private one.
    skip_nonfinite: skip a step whose loss or global gradient norm is NaN/Inf: parameters and
      optimizer state stay bit-identical (the decision is global: every stage, replica and
      process skips), ``TrainState.step`` still advances, and ``metrics["skipped"]`` is 1.0
      (0.0 otherwise; always 0.0 when False). The check is one scalar per step, fused with the
      update; on ``mpmd`` it makes every stage's update wait for the global decision, as
      clipping does (see ``hkpipe._src.step_guard``).
  """

  backend: str = "single"
  num_microbatches: int | None = None
  schedule: Any = None
  num_ranks: int | None = None
  num_stages: int | None = None  # deprecated spelling of num_ranks
  virtual_stages: int | None = None
  partition: Any = None
  devices: Sequence[Any] | None = None
  mesh: Any = None
  max_grad_norm: float | None = None
  remat: Any = False
  record_timeline: bool = False
  donate: bool = True
  progress: Any = None
  skip_nonfinite: bool = True
  sharding_rules: Any = None

  def __post_init__(self):
    if self.backend not in _BACKENDS:
      raise errors.ConfigError(f"Unknown backend {self.backend!r}; choose one of "
                               f"{list(_BACKENDS)}.")
    ranks = deprecation.renamed(
        "num_stages", self.num_stages, "num_ranks", self.num_ranks, where="PipelineOptions",
        why="num_stages names the p * v model stages (Schedule.num_stages), not the ranks.",
        stacklevel=4)
    object.__setattr__(self, "num_ranks", ranks)
    object.__setattr__(self, "num_stages", None)
    unused = [n for n in unused_options(self.backend) if getattr(self, n) not in (None, False)]
    if unused:
      shown = ", ".join(f"{n}={getattr(self, n)!r}" for n in unused)
      raise errors.ConfigError(
          f"backend={self.backend!r} does not use {shown}; drop "
          f"{'it' if len(unused) == 1 else 'them'}, or pick a backend that does "
          f"({' or '.join(backends_using(unused))}).")
    if self.sharding_rules is not None:
      object.__setattr__(self, "sharding_rules", sharding_lib.as_rules(self.sharding_rules))
    if isinstance(self.remat, list):
      object.__setattr__(self, "remat", tuple(self.remat))
    remat_lib.check(self.remat, self.devices, self.backend)
    if not isinstance(self.skip_nonfinite, bool):
      raise errors.ConfigError(f"skip_nonfinite must be True or False, got "
                               f"{self.skip_nonfinite!r}.")
    if self.backend == "single" and self.devices is not None and len(self.devices) != 1:
      raise errors.ConfigError(f"backend='single' runs on one device, but devices= lists "
                               f"{len(self.devices)}; pass one device (or use backend='pmap', "
                               "'spmd' or 'mpmd' for several).")
    sched = self.schedule
    if sched is not None and not isinstance(sched, str):
      for name, value in (("num_microbatches", sched.num_microbatches),
                          ("num_ranks", sched.num_ranks)):
        given = getattr(self, name)
        if given is None and (name == "num_microbatches" or (self.devices is None
                                                             and self.mesh is None)):
          object.__setattr__(self, name, int(value))
        elif given is not None and given != value:
          raise errors.ConfigError(
              f"{name}={given} but the schedule object {getattr(sched, 'name', sched)!r} has "
              f"{value}; drop {name} (the schedule's is used) or make them equal.")
    if self.num_microbatches is None:
      object.__setattr__(self, "num_microbatches", 1)
    _positive_int("num_microbatches", self.num_microbatches,
                  "pass the number of microbatches per step, e.g. num_microbatches=4")
    for name in ("num_ranks", "virtual_stages"):
      if getattr(self, name) is not None:
        _positive_int(name, getattr(self, name), f"pass {name}=N with N >= 1, or leave it unset")
    if self.max_grad_norm is not None:
      norm = self.max_grad_norm
      if isinstance(norm, bool) or not isinstance(norm, (int, float)) or not norm >= 0 or (
          norm == float("inf")):
        raise errors.ConfigError(f"max_grad_norm must be a finite number >= 0 (0 or None: no "
                                 f"clipping), got {norm!r}.")
      if norm == 0:
        object.__setattr__(self, "max_grad_norm", None)  # documented: 0 disables clipping
    if self.backend in PIPELINED:
      for name, default in _PIPELINED_DEFAULTS.items():
        if getattr(self, name) is None:
          object.__setattr__(self, name, default)
