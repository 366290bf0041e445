"""Static per-tick tables that drive the SPMD executor, derived from a schedule's IR.

The executor runs the schedule in lock-step *ticks*: in every tick each ``pp`` rank performs at
most one compute action (``F``, ``B``, ``I`` or ``W``), then every rank's outgoing payload (the
activation an ``F`` produced, or the cotangent a ``B``/``I`` produced) moves to its destination
rank with ``lax.ppermute``. Ticks are the start times of ``hkpipe.schedules.simulate`` (the
schedule engine, ``hkpipe/schedules/_engine.py``) with unit costs and no latency: every rank runs
its action list *in its own order*, and an action starts at the first tick after the actions it
depends on have finished, so each dependency is satisfied at a tick boundary, where the transfer
happens. The schedule's per-rank order, and therefore its memory profile, is kept: buffer slots
are allocated by interval colouring over the ticks at which each activation, cotangent or stash
is live, so the number of stash slots is the schedule's peak number of live activations on the
busiest rank.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from hkpipe import schedules
from hkpipe.schedules import _engine
from hkpipe.schedules import _ir

Kind = _ir.Kind


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


_UNIT = schedules.Costs(forward=1.0, input_grad=1.0, weight_grad=1.0, backward=1.0, comm=0.0)


def assign_ticks(schedule: _ir.Schedule) -> tuple[tuple[schedules.Interval, ...], ...]:
  """Per rank, its compute actions with their start ticks: the schedule simulated (by the schedule
  engine) with unit costs and no latency, so every start is an integer and each input is ready at
  a tick boundary.

  Raises:
    ScheduleError: (a ``ValueError``) for an invalid or deadlocking schedule.
  """
  return schedules.simulate(schedule, _UNIT).timeline


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
  timeline = assign_ticks(schedule)
  p, num_stages, m = schedule.num_ranks, schedule.num_stages, schedule.num_microbatches
  rank = schedule.stage_to_rank
  # Start tick of the action producing each completion key: "F" the forward, "G" the first
  # backward (B or I: the cotangent), "W" the last (B or W: the stash is then free).
  key_tick = {key: int(iv.start) for row in timeline for iv in row
              for key in _engine.done_keys(iv.action)}

  act_items, cot_items, stash_items = [], [], []
  transfers = []  # (src rank, dst rank, tick, "act" | "cot", (stage, mb) of the receiver)
  for s in range(num_stages):
    for mb in range(m):
      f = key_tick[("F", s, mb)]
      stash_items.append((rank[s], 2 * f, 2 * key_tick[("W", s, mb)], (s, mb)))
      if s > 0:  # the activation of (s, mb) comes from stage s-1
        src = key_tick[("F", s - 1, mb)]
        act_items.append((rank[s], 2 * src + 1, 2 * f, (s, mb)))
        transfers.append((rank[s - 1], rank[s], src, "act", (s, mb)))
      if s < num_stages - 1:  # the cotangent of (s, mb)'s output comes from stage s+1
        src = key_tick[("G", s + 1, mb)]
        cot_items.append((rank[s], 2 * src + 1, 2 * key_tick[("W", s, mb)], (s, mb)))
        transfers.append((rank[s + 1], rank[s], src, "cot", (s, mb)))
  act_slots, act_peaks = _allocate(act_items, p)
  cot_slots, cot_peaks = _allocate(cot_items, p)
  stash_slots, stash_peaks = _allocate(stash_items, p)
  num_act, num_cot, num_stash = (max(peaks + [1]) for peaks in (act_peaks, cot_peaks, stash_peaks))

  used = sorted({(iv.action.kind.value, iv.action.stage) for row in timeline for iv in row},
                key=lambda ks: (ks[1], "FBIW".index(ks[0])))
  branches = ((None, -1),) + tuple((Kind(k), s) for k, s in used)
  index = {b: i for i, b in enumerate(branches)}
  shape = (p, 1 + max(key_tick.values()))
  branch, mbs, act_slot, cot_slot, stash_slot = (np.zeros(shape, np.int32) for _ in range(5))
  for r, row in enumerate(timeline):
    for a, start, _ in row:
      t = int(start)
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
