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

import collections
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


def check_schedule(schedule: _ir.Schedule) -> None:
  """Checks the compute actions cover every (stage, microbatch) exactly once, on the right rank.

  Raises:
    ValueError: naming the first offending action and what is wrong with it.
  """
  s_count, m = schedule.num_stages, schedule.num_microbatches
  if len(schedule.stage_to_rank) != s_count:
    raise ValueError(f"Schedule {schedule.name!r}: stage_to_rank has {len(schedule.stage_to_rank)} "
                     f"entries but the schedule has {s_count} stages.")
  if len(schedule.actions) != schedule.num_ranks:
    raise ValueError(f"Schedule {schedule.name!r}: {len(schedule.actions)} action lists for "
                     f"{schedule.num_ranks} ranks.")
  seen: collections.Counter = collections.Counter()
  for rank, row in enumerate(compute_actions(schedule)):
    for a in row:
      if not (0 <= a.stage < s_count and 0 <= a.mb < m):
        raise ValueError(f"Schedule {schedule.name!r}: action {a} on rank {rank} is out of range "
                         f"({s_count} stages, {m} microbatches).")
      if schedule.stage_to_rank[a.stage] != rank:
        raise ValueError(f"Schedule {schedule.name!r}: action {a} is on rank {rank} but stage "
                         f"{a.stage} belongs to rank {schedule.stage_to_rank[a.stage]}.")
      seen[(a.kind, a.stage, a.mb)] += 1
  for s in range(s_count):
    for mb in range(m):
      f, b = seen[(Kind.F, s, mb)], seen[(Kind.B, s, mb)]
      i, w = seen[(Kind.I, s, mb)], seen[(Kind.W, s, mb)]
      if f != 1:
        raise ValueError(f"Schedule {schedule.name!r}: forward {s}F{mb} appears {f} times "
                         "(expected exactly once).")
      if not ((b == 1 and i == 0 and w == 0) or (b == 0 and i == 1 and w == 1)):
        raise ValueError(f"Schedule {schedule.name!r}: stage {s} microbatch {mb} needs exactly one "
                         f"B, or one I and one W; got B x{b}, I x{i}, W x{w}.")


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

  Raises:
    ValueError: if the schedule is malformed or deadlocks (naming each rank's blocked action).
  """
  check_schedule(schedule)
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


def stash_peaks(schedule: _ir.Schedule) -> tuple[int, ...]:
  """Per rank, the most (stage, microbatch) stashes alive at once in the driver.

  A stash is created by F and released by B (or by W for a split backward), so this follows from
  each rank's own action order.
  """
  peaks = []
  for row in compute_actions(schedule):
    live = peak = 0
    for a in row:
      if a.kind is Kind.F:
        live += 1
        peak = max(peak, live)
      elif a.kind in (Kind.B, Kind.W):
        live -= 1
    peaks.append(peak)
  return tuple(peaks)


def last_backward_index(order: Sequence[tuple[int, Action]], num_stages: int) -> list[int]:
  """Per stage, the position in ``order`` of its last gradient-producing action (B or W)."""
  last = [-1] * num_stages
  for i, (_, a) in enumerate(order):
    if a.kind in (Kind.B, Kind.W):
      last[a.stage] = i
  return last
