"""Static per-tick tables that drive the SPMD executor, derived from a schedule's IR.

The executor runs the schedule in lock-step *ticks*: in every tick each ``pp`` rank performs at
most one compute action (``F``, ``B``, ``I`` or ``W``), then every rank's outgoing payload (the
activation an ``F`` produced, or the cotangent a ``B``/``I`` produced) moves to its destination
rank with ``lax.ppermute``. Ticks are the start times of ``hkpipe.schedules.simulate`` with unit
costs and no latency: every rank runs its action list *in its own order*, and an action starts at
the first tick after the actions it depends on have finished, so each dependency is satisfied at
a tick boundary, where the transfer happens. The schedule's per-rank order, and therefore its memory
profile, is kept: buffer slots are allocated by interval colouring over the ticks at which each
activation, cotangent or stash is live, so the number of stash slots is the schedule's peak
number of live activations on the busiest rank.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from hkpipe import schedules
from hkpipe.schedules import _ir

Kind = _ir.Kind
Key = tuple[int, int]  # (stage, microbatch)


@dataclasses.dataclass(frozen=True)
class TickTables:
  """Everything the executor needs, as static numpy tables indexed ``[rank, tick, ...]``.

  Attributes:
    branches: ``branches[i]`` is ``(kind, stage)`` of switch branch ``i``; branch 0 is idle
      (``(None, -1)``).
    branch: ``[p, T]`` branch index of each rank's action in each tick.
    mb: ``[p, T]`` microbatch of that action.
    act_slot: ``[p, T]`` activation-inbox slot an ``F`` reads (stages after the first).
    cot_slot: ``[p, T]`` cotangent-inbox slot a ``B``/``I``/``W`` reads (stages before the last).
    stash_slot: ``[p, T]`` stash slot an ``F`` writes and ``B``/``I``/``W`` read.
    deltas: rank offsets (mod ``p``) payloads travel; 0 means delivery on the same rank.
    perms: per delta, the ``(source, destination)`` rank pairs that ever use it.
    recv_act: ``[p, T, len(deltas)]`` inbox slot a payload arriving over each delta at the end of
      the tick is written to; ``num_act`` (a scratch row) when nothing useful arrives.
    recv_cot: same for the cotangent inbox (scratch row ``num_cot``).
    num_act: activation-inbox slots (peak over ranks of activations received, not yet consumed).
    num_cot: cotangent-inbox slots.
    num_stash: stash slots (peak over ranks of forwards whose backward has not finished).
    stash_peak: per rank, its own peak number of stashed forwards.
  """

  branches: tuple[tuple[Any, int], ...]
  branch: np.ndarray
  mb: np.ndarray
  act_slot: np.ndarray
  cot_slot: np.ndarray
  stash_slot: np.ndarray
  deltas: tuple[int, ...]
  perms: tuple[tuple[tuple[int, int], ...], ...]
  recv_act: np.ndarray
  recv_cot: np.ndarray
  num_act: int
  num_cot: int
  num_stash: int
  stash_peak: tuple[int, ...]

  @property
  def num_ticks(self) -> int:
    return int(self.branch.shape[1])

  def arrays(self) -> dict[str, np.ndarray]:
    """The per-rank tables (leading axis ``p``), ready to be sharded along ``pp``."""
    return {"branch": self.branch, "mb": self.mb, "act_slot": self.act_slot,
            "cot_slot": self.cot_slot, "stash_slot": self.stash_slot,
            "recv_act": self.recv_act, "recv_cot": self.recv_cot}


def _deps(a: _ir.Action, num_stages: int, split: set[Key]) -> list[tuple[Kind, int, int]]:
  """Actions whose results ``a`` consumes: they must finish in an earlier tick."""
  s, mb = a.stage, a.mb
  back = lambda st: (Kind.I if (st, mb) in split else Kind.B, st, mb)
  if a.kind == Kind.F:
    return [(Kind.F, s - 1, mb)] if s > 0 else []
  if a.kind in (Kind.B, Kind.I):
    return [(Kind.F, s, mb)] + ([back(s + 1)] if s < num_stages - 1 else [])
  return [(Kind.I, s, mb)]  # W


def assign_ticks(schedule: _ir.Schedule) -> dict[tuple[Kind, int, int], int]:
  """Start tick of every compute action: the schedule simulated with unit costs, no latency.

  Raises:
    ScheduleError: (a ``ValueError``) for an invalid or deadlocking schedule.
  """
  schedules.validate(schedule)
  unit = schedules.Costs(forward=1.0, input_grad=1.0, weight_grad=1.0, backward=1.0, comm=0.0)
  result = schedules.simulate(schedule, unit)
  ticks, split = {}, set()
  for rank, row in enumerate(result.timeline):
    used = set()
    for iv in row:
      a, t = iv.action, int(iv.start)
      if t != iv.start or t in used:
        raise RuntimeError(f"Unit-cost simulation put {a} on rank {rank} at {iv.start}, which is "
                           "not a free integer tick.")
      used.add(t)
      ticks[(a.kind, a.stage, a.mb)] = t
      if a.kind == Kind.I:
        split.add((a.stage, a.mb))
  for (kind, s, mb), t in ticks.items():
    for dep in _deps(_ir.Action(s, kind, mb), schedule.num_stages, split):
      if ticks[dep] >= t:
        raise RuntimeError(f"Unit-cost simulation starts {s}{kind.value}{mb} at tick {t} before "
                           f"its input from {dep} (tick {ticks[dep]}) is ready.")
  return ticks


def _allocate(items: Sequence[tuple[int, int, int, Any]], num_ranks: int
              ) -> tuple[dict[Any, int], list[int]]:
  """Interval colouring per rank. ``items``: ``(rank, write_time, last_read_time, key)``.

  A slot is reusable by an item written strictly after the previous item's last read.
  """
  slots: dict[Any, int] = {}
  peaks = [0] * num_ranks
  for r in range(num_ranks):
    free_after: list[int] = []  # per slot: last read time of its current item
    for _, w, last, key in sorted(i for i in items if i[0] == r):
      for i, t in enumerate(free_after):
        if t < w:
          free_after[i] = last
          slots[key] = i
          break
      else:
        slots[key] = len(free_after)
        free_after.append(last)
    peaks[r] = len(free_after)
  return slots, peaks


def build(schedule: _ir.Schedule) -> TickTables:
  """Tick tables for ``schedule`` (compute-only or lowered; communication is derived here).

  Times inside a tick: compute at ``2t`` (reads inboxes and stash, writes stash), receive at
  ``2t + 1`` (writes inboxes). Evaluation runs the same tables with every non-``F`` action idle.

  Raises:
    ScheduleError: (a ``ValueError``) for an invalid or deadlocking schedule.
  """
  ticks = assign_ticks(schedule)
  rows = tuple(schedule.compute_actions(r) for r in range(schedule.num_ranks))
  p, num_stages, m = schedule.num_ranks, schedule.num_stages, schedule.num_microbatches
  rank = schedule.stage_to_rank
  split = {(a.stage, a.mb) for row in rows for a in row if a.kind == Kind.I}

  def first_backward(s: int, mb: int) -> int:
    return ticks[(Kind.I if (s, mb) in split else Kind.B, s, mb)]

  def last_backward(s: int, mb: int) -> int:
    return ticks[(Kind.W if (s, mb) in split else Kind.B, s, mb)]

  act_items, cot_items, stash_items = [], [], []
  transfers = []  # (src rank, dst rank, tick, "act" | "cot", (stage, mb) of the receiver)
  for s in range(num_stages):
    for mb in range(m):
      f = ticks[(Kind.F, s, mb)]
      stash_items.append((rank[s], 2 * f, 2 * last_backward(s, mb), (s, mb)))
      if s > 0:  # the activation of (s, mb) comes from stage s-1
        src = ticks[(Kind.F, s - 1, mb)]
        act_items.append((rank[s], 2 * src + 1, 2 * f, (s, mb)))
        transfers.append((rank[s - 1], rank[s], src, "act", (s, mb)))
      if s < num_stages - 1:  # the cotangent of (s, mb)'s output comes from stage s+1
        src = first_backward(s + 1, mb)
        cot_items.append((rank[s], 2 * src + 1, 2 * last_backward(s, mb), (s, mb)))
        transfers.append((rank[s + 1], rank[s], src, "cot", (s, mb)))
  act_slots, act_peaks = _allocate(act_items, p)
  cot_slots, cot_peaks = _allocate(cot_items, p)
  stash_slots, stash_peaks = _allocate(stash_items, p)
  num_act, num_cot, num_stash = (max(peaks + [1]) for peaks in (act_peaks, cot_peaks, stash_peaks))

  used = sorted({(a.kind.value, a.stage) for row in rows for a in row},
                key=lambda ks: (ks[1], "FBIW".index(ks[0])))
  branches = ((None, -1),) + tuple((Kind(k), s) for k, s in used)
  index = {b: i for i, b in enumerate(branches)}
  shape = (p, 1 + max(ticks.values()))
  branch, mbs, act_slot, cot_slot, stash_slot = (np.zeros(shape, np.int32) for _ in range(5))
  for r, row in enumerate(rows):
    for a in row:
      t = ticks[(a.kind, a.stage, a.mb)]
      branch[r, t] = index[(a.kind, a.stage)]
      mbs[r, t] = a.mb
      stash_slot[r, t] = stash_slots[(a.stage, a.mb)]
      if a.kind == Kind.F and a.stage > 0:
        act_slot[r, t] = act_slots[(a.stage, a.mb)]
      if a.kind != Kind.F and a.stage < num_stages - 1:
        cot_slot[r, t] = cot_slots[(a.stage, a.mb)]

  deltas = tuple(sorted({(dst - src) % p for src, dst, *_ in transfers}))
  pairs: dict[int, set[tuple[int, int]]] = {d: set() for d in deltas}
  recv_act = np.full(shape + (len(deltas),), num_act, np.int32)
  recv_cot = np.full(shape + (len(deltas),), num_cot, np.int32)
  for src, dst, t, what, key in transfers:
    d = (dst - src) % p
    pairs[d].add((src, dst))
    if what == "act":
      recv_act[dst, t, deltas.index(d)] = act_slots[key]
    else:
      recv_cot[dst, t, deltas.index(d)] = cot_slots[key]
  perms = tuple(tuple(sorted(pairs[d])) for d in deltas)
  return TickTables(branches=branches, branch=branch, mb=mbs, act_slot=act_slot,
                    cot_slot=cot_slot, stash_slot=stash_slot, deltas=deltas, perms=perms,
                    recv_act=recv_act, recv_cot=recv_cot, num_act=num_act, num_cot=num_cot,
                    num_stash=num_stash, stash_peak=tuple(stash_peaks))
