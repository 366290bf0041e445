"""Turns a schedule into the MPMD driver's issue order (a single host thread drives all ranks).

The schedule gives each rank its own ordered list of compute actions. A single-host driver issues
them one by one through JAX's asynchronous dispatch, so it needs one *global* order that

- keeps every rank's own order exactly as the schedule says (each device runs its programs in
  issue order), and
- issues every action after the actions whose outputs it consumes (the driver needs the Python
  handle of an input array to pass it on).

:func:`issue_order` is the order in which the schedule engine (``hkpipe.schedules._engine.run``)
starts the compute actions under nominal costs (F=1, B=2, I=W=1): the ready action with the
earliest nominal start time first. The nominal times only make the issue order resemble the real
execution order; results never depend on them. A schedule with no such order (e.g. a rank waits
for a cotangent its peer only produces later) deadlocks on a real multi-host run too, and is
reported here, before anything is compiled.
"""

from __future__ import annotations

from typing import Sequence

from hkpipe.schedules import _engine
from hkpipe.schedules import _ir
from hkpipe.schedules import _lower

Kind = _ir.Kind
Action = _ir.Action

_COST = {Kind.F: 1.0, Kind.B: 2.0, Kind.I: 1.0, Kind.W: 1.0}


def compute_actions(schedule: _ir.Schedule) -> tuple[tuple[Action, ...], ...]:
  """Per rank, the schedule's compute actions (F/B/I/W) in order; SEND/RECV actions dropped.

  The MPMD driver moves activations and cotangents itself, right after they are produced, so a
  lowered schedule (with SEND/RECV actions) and an unlowered one drive the same computation.
  """
  return _lower.strip_comm(schedule).actions


def _nominal_cost(a: Action) -> float:
  return _COST[a.kind]


def issue_order(schedule: _ir.Schedule) -> tuple[tuple[int, Action], ...]:
  """A global issue order of all compute actions as ``(rank, action)`` pairs (see module doc).

  Args:
    schedule: a schedule that passed ``hkpipe.schedules.validate`` (every (stage, microbatch)
      has one F and one B, or one I and one W, on the rank that owns the stage).

  Raises:
    ValueError: if the schedule deadlocks (naming each rank's blocked action).
  """
  result = _engine.run(_lower.strip_comm(schedule), _nominal_cost)
  if result.stuck:
    blocked = [f"rank {r}: {result.blocked(r)[1]}" for r in result.stuck]
    raise ValueError(f"Schedule {schedule.name!r} deadlocks: every rank waits for an input no "
                     f"rank can produce next ({'; '.join(blocked)}). Check the per-rank action "
                     "order (hkpipe.schedules.validate).")
  return tuple((r, result.schedule.actions[r][i]) for r, i in result.order)


def last_backward_index(order: Sequence[tuple[int, Action]], num_stages: int) -> list[int]:
  """Per stage, the position in ``order`` of its last gradient-producing action (B or W)."""
  last = [-1] * num_stages
  for i, (_, a) in enumerate(order):
    if a.kind in (Kind.B, Kind.W):
      last[a.stage] = i
  return last
