"""The simulator: runs a schedule's lowered program in the engine under given costs and measures
its timeline.

Definitions (all computed from the simulated timeline, never from formulas):

- ``makespan``: end of the last compute action (every rank starts at time 0).
- ``bubble_ratio``: idle / total over all ranks, ``1 - sum(busy) / (num_ranks * makespan)``, where
  ``busy`` sums a rank's compute durations. Waiting in a RECV counts as idle; SENDs take no time.
- ``peak_activations[r]``: the largest number of activation stashes alive at once on rank ``r``.
  The stash of (stage, mb) is alive from the start of ``F(stage, mb)`` to the end of
  ``B(stage, mb)``, or to the end of ``W(stage, mb)`` for a split backward: ``W`` needs the stage
  input and the output cotangent, so the stash (and the cotangent) outlive ``I``. One stash counts
  1 whatever its stage's size; multiply by per-stage activation sizes yourself if they differ.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence, Union

import numpy as np

from hkpipe.schedules import _validate
from hkpipe.schedules._engine import Interval
from hkpipe.schedules._ir import Action
from hkpipe.schedules._ir import Kind
from hkpipe.schedules._ir import Schedule

Cost = Union[float, Sequence[float]]


class Record(NamedTuple):
  """One drawable timeline entry; simulated or measured (any backend may produce these).

  Attributes:
    rank: the rank (row of the picture).
    kind: label, usually ``"F"``, ``"B"``, ``"I"``, ``"W"`` (others are drawn in grey).
    stage: model stage of the action.
    mb: microbatch index.
    start: start time (any unit: slots, seconds).
    end: end time.
  """

  rank: int
  kind: str
  stage: int
  mb: int
  start: float
  end: float


@dataclasses.dataclass(frozen=True)
class Costs:
  """Per-action costs; each is a scalar (all stages) or a sequence with one value per stage.

  Attributes:
    forward: cost of ``F``.
    input_grad: cost of ``I`` (the input-gradient half of backward).
    weight_grad: cost of ``W`` (the weight-gradient half).
    backward: cost of a full ``B``; default ``input_grad + weight_grad``.
    comm: latency of one stage-to-stage transfer, indexed by the SENDING stage (for the cotangent
      sent by stage ``s`` to ``s - 1`` as well as the activation sent by ``s`` to ``s + 1``).
      Transfers between stages on the same rank are free.
  """

  forward: Cost = 1.0
  input_grad: Cost = 1.0
  weight_grad: Cost = 1.0
  backward: Cost | None = None
  comm: Cost = 0.0

  def per_stage(self, num_stages: int) -> dict[Kind, np.ndarray]:
    """Resolves the costs to one float64 array of length ``num_stages`` per kind.

    Raises:
      ValueError: a sequence has the wrong length or a cost is negative / not finite.
    """
    def resolve(name: str, value: Cost) -> np.ndarray:
      arr = np.asarray(value, dtype=np.float64)
      if arr.ndim == 0:
        arr = np.full((num_stages,), float(arr))
      if arr.shape != (num_stages,):
        raise ValueError(f"Costs.{name} must be a scalar or have one value per stage "
                         f"({num_stages}); got shape {arr.shape}.")
      if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"Costs.{name} must be finite and >= 0; got {arr.tolist()}.")
      return arr

    out = {
        Kind.F: resolve("forward", self.forward),
        Kind.I: resolve("input_grad", self.input_grad),
        Kind.W: resolve("weight_grad", self.weight_grad),
    }
    out[Kind.B] = (out[Kind.I] + out[Kind.W] if self.backward is None
                   else resolve("backward", self.backward))
    comm = resolve("comm", self.comm)
    for kind in (Kind.SEND_F, Kind.SEND_B):
      out[kind] = comm
    return out


@dataclasses.dataclass(frozen=True)
class SimResult:
  """What :func:`simulate` measured.

  Attributes:
    schedule: the simulated schedule (as given).
    costs: the costs used.
    timeline: per rank, the compute actions as ``Interval(action, start, end)`` in execution order.
    program: per rank, every action of the executed lowered program (SEND spans are empty; a
      RECV spans the time the rank waited for the message).
    makespan: end of the last compute action.
    busy: per rank, total compute time.
    bubble_ratio: ``1 - sum(busy) / (num_ranks * makespan)``.
    peak_activations: per rank, most stashes alive at once (see the module docstring).
  """

  schedule: Schedule
  costs: Costs
  timeline: tuple[tuple[Interval, ...], ...]
  program: tuple[tuple[Interval, ...], ...]
  makespan: float
  busy: tuple[float, ...]
  bubble_ratio: float
  peak_activations: tuple[int, ...]

  @property
  def idle(self) -> tuple[float, ...]:
    """Per rank, ``makespan - busy``."""
    return tuple(self.makespan - b for b in self.busy)

  def records(self) -> list[Record]:
    """The compute timeline as drawable :class:`Record` s (see ``hkpipe.schedules.draw_*``)."""
    return [Record(rank, iv.action.kind.value, iv.action.stage, iv.action.mb, iv.start, iv.end)
            for rank, row in enumerate(self.timeline) for iv in row]


def _peak_live(row: Sequence[Interval]) -> int:
  """Most stashes alive at once: +1 at each F, -1 at the B or W that ends its backward."""
  live = peak = 0
  for iv in row:
    if iv.action.kind is Kind.F:
      live += 1
      peak = max(peak, live)
    elif iv.action.kind in (Kind.B, Kind.W):
      live -= 1
  return peak


def simulate(schedule: Schedule, costs: Costs | None = None) -> SimResult:
  """Validates ``schedule``, runs its lowered program under ``costs`` and measures the timeline.

  A compute-only schedule is lowered first (:func:`lower`); a lowered one runs as given.

  Args:
    schedule: the schedule.
    costs: per-action costs; default ``Costs()`` (F = I = W = 1, B = 2, no comm latency).

  Returns:
    A :class:`SimResult`.

  Raises:
    ScheduleError: the schedule is invalid or deadlocks (see :func:`validate`).
    ValueError: bad costs.
  """
  costs = Costs() if costs is None else costs
  if not isinstance(costs, Costs):
    raise ValueError(f"costs must be a hkpipe.schedules.Costs, got {type(costs).__name__}.")
  table = costs.per_stage(schedule.num_stages)

  def duration(a: Action) -> float:
    return table[a.kind][a.stage]

  program = _validate.run(schedule, duration, duration).rows
  timeline = tuple(tuple(iv for iv in row if iv.action.kind.is_compute) for row in program)
  makespan = max((iv.end for row in timeline for iv in row), default=0.0)
  busy = tuple(float(sum(iv.end - iv.start for iv in row)) for row in timeline)
  total = schedule.num_ranks * makespan
  bubble = 1.0 - sum(busy) / total if total > 0 else 0.0
  peaks = tuple(_peak_live(row) for row in timeline)
  return SimResult(schedule=schedule, costs=costs, timeline=timeline, program=program,
                   makespan=float(makespan), busy=busy, bubble_ratio=float(bubble),
                   peak_activations=peaks)


def peak_activations(schedule: Schedule) -> tuple[int, ...]:
  """Per rank, the most activation stashes alive at once, derived by :func:`simulate`.

  The count follows each rank's executed order (see the module docstring for when a stash is
  alive), so it does not depend on the costs.

  Args:
    schedule: the schedule.

  Returns:
    One int per rank.
  """
  return simulate(schedule).peak_activations
