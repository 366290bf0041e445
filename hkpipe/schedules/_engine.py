"""The schedule engine: the one dependency rule and the one event loop.

Everything that asks "when may this action run?" derives from this module: the validator (the
lowered program must finish), the simulator (its timeline under costs), the MPMD backend's issue
order (the order in which :func:`run` starts actions under nominal costs) and the SPMD backend's
tick tables (start times under unit costs).

**The dependency rule.** Finishing a compute action on (stage ``s``, microbatch ``mb``) makes
*completion keys* available:

- ``F(s)`` -> ``("F", s, mb)``: the activation out of stage ``s``;
- ``B(s)`` -> ``("G", s, mb)`` and ``("W", s, mb)``; ``I(s)`` -> ``("G", s, mb)`` (the cotangent
  of stage ``s``'s input); ``W(s)`` -> ``("W", s, mb)`` (the weight gradient, done).

An action needs: ``F(s)`` the key ``("F", s - 1)``; ``B(s)``/``I(s)`` ``("F", s)`` (its stash)
and ``("G", s + 1)``; ``W(s)`` ``("G", s)``; keys of stages outside ``0..n-1`` do not exist.
Activations flow to the next stage and cotangents to the previous one (:data:`FLOW`); only those
two keys cross a stage boundary, each to exactly one consumer stage, so a message (a SEND/RECV
pair of a lowered schedule) is identified by the key it carries (:func:`message_key`).

**The event loop** (:func:`run`). Each rank runs its list in order, from time 0. A compute action
starts when the rank is free and its dependencies have finished, and takes ``duration(action)``;
a SEND takes no time and posts its message, which arrives ``latency(send)`` later; a RECV blocks
until its message has arrived (its span is the wait). Among the actions that can start, the loop
starts communication first, then the compute action with the earliest start time (the lowest rank
on ties), so :attr:`Run.order` is a global order that respects every dependency and, for compute
actions, is sorted by start time. Start and end times do not depend on that choice. A
compute-only schedule runs as if lowered with zero latency. When no rank can start anything, the
ranks that did not finish are :attr:`Run.stuck` (a deadlock); ``run`` itself never raises.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Callable, NamedTuple, Union

from hkpipe.schedules._ir import Action
from hkpipe.schedules._ir import Kind
from hkpipe.schedules._ir import Schedule

# A completion key: (what, stage, microbatch) with what in "F", "G", "W" (see the module doc).
Key = tuple[str, int, int]

# Stage offset from the producer of a key to its consumer on another stage.
FLOW: dict[str, int] = {"F": 1, "G": -1}
# The (SEND, RECV) kinds that move each crossing key between ranks.
COMM: dict[str, tuple[Kind, Kind]] = {"F": (Kind.SEND_F, Kind.RECV_F),
                                      "G": (Kind.SEND_B, Kind.RECV_B)}
_CARRIES: dict[Kind, str] = {kind: what for what, kinds in COMM.items() for kind in kinds}
_SENDS = frozenset(send for send, _ in COMM.values())
_KEY_TEXT = {"F": "F", "G": "B/I", "W": "B/W"}


def done_keys(a: Action) -> tuple[Key, ...]:
  """What finishing compute action ``a`` makes available (nothing for SEND/RECV)."""
  s, mb = a.stage, a.mb
  if a.kind is Kind.F:
    return (("F", s, mb),)
  if a.kind is Kind.B:
    return (("G", s, mb), ("W", s, mb))
  if a.kind is Kind.I:
    return (("G", s, mb),)
  if a.kind is Kind.W:
    return (("W", s, mb),)
  return ()


def dependencies(a: Action, num_stages: int) -> tuple[Key, ...]:
  """The completion keys compute action ``a`` needs before it may start (none for SEND/RECV)."""
  s, mb = a.stage, a.mb
  if a.kind is Kind.F:
    needs: tuple[Key, ...] = (("F", s - FLOW["F"], mb),)
  elif a.kind is Kind.B or a.kind is Kind.I:
    needs = (("F", s, mb), ("G", s - FLOW["G"], mb))
  elif a.kind is Kind.W:
    needs = (("G", s, mb),)
  else:
    return ()
  return tuple(key for key in needs if 0 <= key[1] < num_stages)


def consumer_stage(key: Key, num_stages: int) -> int | None:
  """The other stage that consumes ``key`` (activation: ``s + 1``, cotangent: ``s - 1``), if any."""
  what, stage, _ = key
  other = stage + FLOW[what] if what in FLOW else -1
  return other if 0 <= other < num_stages else None


def message_key(a: Action) -> Key:
  """The completion key a SEND posts or a RECV waits for; a SEND/RECV pair shares it.

  ``SEND_F(s)`` and ``RECV_F(s + 1)`` carry ``("F", s, mb)``; ``SEND_B(s)`` and ``RECV_B(s - 1)``
  carry ``("G", s, mb)``.

  Raises:
    ValueError: ``a`` is a compute action.
  """
  if a.kind not in _CARRIES:
    raise ValueError(f"{a} is not a communication action.")
  what = _CARRIES[a.kind]
  return (what, a.stage if a.kind in _SENDS else a.stage - FLOW[what], a.mb)


def key_text(key: Key) -> str:
  """Human text for a completion key, e.g. ``'2F1'`` or ``'3B/I0'``."""
  what, stage, mb = key
  return f"{stage}{_KEY_TEXT[what]}{mb}"


class Interval(NamedTuple):
  """One executed action on the simulated timeline."""

  action: Action
  start: float
  end: float


@dataclasses.dataclass(frozen=True)
class Run:
  """What :func:`run` executed.

  Attributes:
    schedule: the schedule that ran.
    rows: per rank, its executed actions as :class:`Interval` s, in list order (a SEND's span is
      empty, a RECV's is the wait); a stuck rank's row stops before its blocked action.
    order: every executed action as ``(rank, position in the rank's list)``, in the order the loop
      started them (see the module doc).
    stuck: the ranks that could not finish (empty unless the schedule deadlocks).
  """

  schedule: Schedule
  rows: tuple[tuple[Interval, ...], ...]
  order: tuple[tuple[int, int], ...]
  stuck: tuple[int, ...]

  def blocked(self, rank: int) -> tuple[int, Action]:
    """``(position, action)`` at which stuck ``rank`` waits."""
    pos = len(self.rows[rank])
    return pos, self.schedule.actions[rank][pos]

  def waiting_for(self, rank: int) -> Key:
    """The completion key stuck ``rank`` waits for: the message of a RECV, or the first
    unfinished dependency of a compute action."""
    _, a = self.blocked(rank)
    if a.kind.is_comm:
      return message_key(a)
    done = {key for row in self.rows for iv in row for key in done_keys(iv.action)}
    return next(key for key in dependencies(a, self.schedule.num_stages) if key not in done)


def no_latency(a: Action) -> float:
  """Zero transfer time for every message (the default ``latency``)."""
  del a
  return 0.0


# What the loop tracks: a completion key once its compute action finished, ("message", key) once
# the message carrying that key arrived.
_Event = Union[Key, tuple[str, Key]]


class _Step(NamedTuple):
  """One action as the loop sees it: what it waits for and what it makes available."""

  compute: bool
  needs: tuple[_Event, ...]
  makes: tuple[_Event, ...]


def _step(a: Action, num_stages: int) -> _Step:
  if a.kind.is_compute:
    return _Step(True, dependencies(a, num_stages), done_keys(a))
  message = ("message", message_key(a))
  return _Step(False, (), (message,)) if a.kind in _SENDS else _Step(False, (message,), ())


def run(schedule: Schedule, duration: Callable[[Action], float],
        latency: Callable[[Action], float] = no_latency) -> Run:
  """Executes ``schedule`` (compute-only or lowered) as described in the module doc.

  Args:
    schedule: the schedule; it is not validated here (see ``hkpipe.schedules.validate``).
    duration: cost of a compute action.
    latency: transfer time of a SEND's message (unused for a compute-only schedule).

  Returns:
    A :class:`Run`; check :attr:`Run.stuck` for a deadlock.
  """
  actions, n = schedule.actions, schedule.num_stages
  steps = [[_step(a, n) for a in row] for row in actions]
  num_ranks = len(actions)
  pos = [0] * num_ranks  # each rank's next action
  clock = [0.0] * num_ranks
  ready: dict[_Event, float] = {}  # when each finished key / arrived message became available
  rows: list[list[Interval]] = [[] for _ in range(num_ranks)]
  order: list[tuple[int, int]] = []
  # (is compute, start time, rank) of each rank whose next action can start: the loop starts the
  # smallest. A blocked rank waits in `waiting` under the first event it misses.
  heads: list[tuple[bool, float, int]] = []
  waiting: dict[_Event, list[int]] = {}

  def refresh(rank: int) -> None:
    if pos[rank] == len(steps[rank]):
      return
    compute, needs, _ = steps[rank][pos[rank]]
    for need in needs:
      if need not in ready:
        waiting.setdefault(need, []).append(rank)
        return
    start = clock[rank]  # a RECV starts at once and spans its wait; a compute action waits first
    if compute and needs:
      start = max(start, *(ready[need] for need in needs))
    heapq.heappush(heads, (compute, start, rank))

  for rank in range(num_ranks):
    refresh(rank)
  while heads:
    _, start, rank = heapq.heappop(heads)
    a, (compute, needs, makes) = actions[rank][pos[rank]], steps[rank][pos[rank]]
    if compute:
      end = available = start + float(duration(a))
    elif needs:  # RECV
      end = available = max(start, ready[needs[0]])
    else:  # SEND
      end, available = start, start + float(latency(a))
    woken: list[int] = []
    for event in makes:
      ready[event] = available
      woken += waiting.pop(event, ())
    order.append((rank, pos[rank]))
    rows[rank].append(Interval(a, start, end))
    clock[rank] = end
    pos[rank] += 1
    refresh(rank)
    for r in woken:
      refresh(r)
  stuck = tuple(r for r in range(num_ranks) if pos[r] < len(actions[r]))
  return Run(schedule=schedule, rows=tuple(map(tuple, rows)), order=tuple(order), stuck=stuck)
