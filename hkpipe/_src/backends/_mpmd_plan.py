"""Turns a schedule into the MPMD driver's issue order (a single host thread drives all ranks).

The schedule gives each rank its own ordered list of compute actions. A single-host driver issues
them one by one through JAX's asynchronous dispatch, so it needs one *global* order that

- keeps every rank's own order exactly as the schedule says (each device runs its programs in
  issue order), and
- issues every action after the actions whose outputs it consumes (the driver needs the Python
  handle of an input array to pass it on).

:func:`issue_order` finds such an order by list scheduling with nominal costs (F=1, B=2, I=W=1): it
repeatedly issues the ready action with the earliest nominal start time. The nominal times only
make the issue order resemble the real execution order; results never depend on them. A schedule
with no such order (e.g. a rank waits for a cotangent its peer only produces later) deadlocks on a
real multi-host run too, and is reported here, before anything is compiled.
"""

from __future__ import annotations

from typing import Sequence

from hkpipe.schedules import _ir

Kind = _ir.Kind
Action = _ir.Action

_COST = {Kind.F: 1.0, Kind.B: 2.0, Kind.I: 1.0, Kind.W: 1.0}


def compute_actions(schedule: _ir.Schedule) -> tuple[tuple[Action, ...], ...]:
  """Per rank, the schedule's compute actions (F/B/I/W) in order; SEND/RECV actions dropped.

  The MPMD driver moves activations and cotangents itself, right after they are produced, so a
  lowered schedule (with SEND/RECV actions) and an unlowered one drive the same computation.
  """
  return tuple(tuple(a for a in row if a.kind.is_compute) for row in schedule.actions)


def _deps(a: Action, num_stages: int, grad_kind: dict) -> tuple[tuple[Kind, int, int], ...]:
  """Actions whose outputs ``a`` consumes, as (kind, stage, mb)."""
  s, mb = a.stage, a.mb
  if a.kind is Kind.F:
    return ((Kind.F, s - 1, mb),) if s > 0 else ()
  if a.kind in (Kind.B, Kind.I):
    own = ((Kind.F, s, mb),)
    if s == num_stages - 1:
      return own
    return own + ((grad_kind[(s + 1, mb)], s + 1, mb),)
  return ((Kind.I, s, mb),)  # W


def issue_order(schedule: _ir.Schedule) -> tuple[tuple[int, Action], ...]:
  """A global issue order of all compute actions as ``(rank, action)`` pairs (see module doc).

  Args:
    schedule: a schedule that passed ``hkpipe.schedules.validate`` (every (stage, microbatch)
      has one F and one B, or one I and one W, on the rank that owns the stage).

  Raises:
    ValueError: if the schedule deadlocks (naming each rank's blocked action).
  """
  rows = compute_actions(schedule)
  n_stages = schedule.num_stages
  grad_kind = {(a.stage, a.mb): a.kind for row in rows for a in row
               if a.kind in (Kind.B, Kind.I)}
  done: dict[tuple[Kind, int, int], float] = {}
  pos = [0] * len(rows)
  free = [0.0] * len(rows)
  order: list[tuple[int, Action]] = []
  total = sum(len(r) for r in rows)
  while len(order) < total:
    best = None
    for rank, row in enumerate(rows):
      if pos[rank] == len(row):
        continue
      a = row[pos[rank]]
      deps = _deps(a, n_stages, grad_kind)
      if all(d in done for d in deps):
        start = max([free[rank]] + [done[d] for d in deps])
        if best is None or start < best[0]:
          best = (start, rank, a)
    if best is None:
      blocked = [f"rank {r}: {row[pos[r]]}" for r, row in enumerate(rows) if pos[r] < len(row)]
      raise ValueError(f"Schedule {schedule.name!r} deadlocks: every rank waits for an input no "
                       f"rank can produce next ({'; '.join(blocked)}). Check the per-rank action "
                       "order (hkpipe.schedules.validate).")
    start, rank, a = best
    end = start + _COST[a.kind]
    done[(a.kind, a.stage, a.mb)] = end
    free[rank] = end
    pos[rank] += 1
    order.append((rank, a))
  return tuple(order)


def last_backward_index(order: Sequence[tuple[int, Action]], num_stages: int) -> list[int]:
  """Per stage, the position in ``order`` of its last gradient-producing action (B or W)."""
  last = [-1] * num_stages
  for i, (_, a) in enumerate(order):
    if a.kind in (Kind.B, Kind.W):
      last[a.stage] = i
  return last
