"""The validator: static checks, then the lowered program must finish in the engine (``_engine``).

Every error is a :class:`ScheduleError` (a ``ValueError``) whose message starts with the rank, the
position in that rank's list and the action text, e.g.
``rank 1, position 2, action 1B0: needs 1F0 earlier on rank 1, but it comes later (position 3)``.
"""

from __future__ import annotations

from typing import Callable, Sequence

from hkpipe.schedules import _engine
from hkpipe.schedules import _lower
from hkpipe.schedules._ir import Action
from hkpipe.schedules._ir import Kind
from hkpipe.schedules._ir import Schedule
from hkpipe.schedules._ir import ScheduleError


def check_compute(s: Schedule) -> None:
  """Ownership, exactly-once, completeness and same-rank order of the compute actions.

  Raises:
    ScheduleError: pointing at the first offending action.
  """
  seen: dict[tuple[Kind, int, int], tuple[int, int]] = {}
  for rank, row in enumerate(s.actions):
    for pos, a in enumerate(row):
      owner = s.rank_of(a.stage)
      if owner != rank:
        raise ScheduleError(f"stage {a.stage} is owned by rank {owner} (stage_to_rank), so this "
                            f"action must be in rank {owner}'s list.", rank=rank, position=pos,
                            action=a)
      if not a.kind.is_compute:
        continue
      key = (a.kind, a.stage, a.mb)
      if key in seen:
        raise ScheduleError(f"duplicate: {a} already runs at rank {seen[key][0]}, position "
                            f"{seen[key][1]}; each action runs exactly once.", rank=rank,
                            position=pos, action=a)
      seen[key] = (rank, pos)
      clash = {Kind.B: (Kind.I, Kind.W), Kind.I: (Kind.B,), Kind.W: (Kind.B,)}.get(a.kind, ())
      for other in clash:
        if (other, a.stage, a.mb) in seen:
          r, p = seen[(other, a.stage, a.mb)]
          raise ScheduleError(f"(stage {a.stage}, microbatch {a.mb}) already has "
                              f"{Action(a.stage, other, a.mb)} at rank {r}, position {p}; use "
                              "either one B or one I plus one W.", rank=rank, position=pos,
                              action=a)

  for stage in range(s.num_stages):
    owner = s.rank_of(stage)
    for mb in range(s.num_microbatches):
      needed = [Kind.F]
      if (Kind.B, stage, mb) not in seen:
        needed += [Kind.I, Kind.W] if ((Kind.I, stage, mb) in seen or
                                       (Kind.W, stage, mb) in seen) else [Kind.B]
      for kind in needed:
        if (kind, stage, mb) not in seen:
          missing = Action(stage, kind, mb)
          raise ScheduleError(f"missing: rank {owner} never runs {missing}; every (stage, "
                              "microbatch) needs one F and one B (or one I and one W).",
                              rank=owner, action=missing)

  for rank, row in enumerate(s.actions):
    done: set[_engine.Key] = set()
    for pos, a in enumerate(row):
      for dep in _engine.dependencies(a, s.num_stages):
        if s.rank_of(dep[1]) == rank and dep not in done:
          later = next(i for i, b in enumerate(row) if dep in _engine.done_keys(b))
          raise ScheduleError(f"needs {_engine.key_text(dep)} earlier on rank {rank}, but it comes "
                              f"later (position {later}).", rank=rank, position=pos, action=a)
      done.update(_engine.done_keys(a))


def check_comm(s: Schedule) -> None:
  """Checks the SEND/RECV actions of a lowered schedule: exactly the needed ones, each RECV before
  its consumer and each SEND after its producer, none between stages on the same rank.

  Raises:
    ScheduleError: pointing at the offending communication or compute action.
  """
  for rank, row in enumerate(s.actions):
    expected: dict[Action, tuple[int, str]] = {}  # comm action -> (position of its compute, side)
    for pos, a in enumerate(row):
      if a.kind.is_compute:
        recv, send = _lower.recv_before(s, a), _lower.send_after(s, a)
        if recv is not None:
          expected[recv] = (pos, "before")
        if send is not None:
          expected[send] = (pos, "after")
    placed: set[Action] = set()
    for pos, a in enumerate(row):
      if a.kind.is_compute:
        continue
      if a in placed:
        raise ScheduleError("duplicate communication action.", rank=rank, position=pos, action=a)
      placed.add(a)
      if a not in expected:
        raise ScheduleError("no compute action on this rank needs this transfer (the peer stage is "
                            "on the same rank, at the model's end, or never runs here).", rank=rank,
                            position=pos, action=a)
      compute_pos, side = expected[a]
      if (side == "before") != (pos < compute_pos):
        raise ScheduleError(f"must come {side} {row[compute_pos]} (position {compute_pos}).",
                            rank=rank, position=pos, action=a)
    for a, (compute_pos, side) in expected.items():
      if a not in placed:
        raise ScheduleError(f"missing {a} {side} it; run lower() on the compute-only schedule.",
                            rank=rank, position=compute_pos, action=row[compute_pos])


def run(schedule: Schedule, duration: Callable[[Action], float],
        latency: Callable[[Action], float] = _engine.no_latency) -> _engine.Run:
  """Checks ``schedule`` and runs its lowered program in the engine (a lowered one runs as given).

  Args:
    schedule: a compute-only or a lowered schedule.
    duration: cost of a compute action.
    latency: transfer time of a SEND action's message; default none.

  Returns:
    The finished :class:`_engine.Run` of the lowered program.

  Raises:
    ScheduleError: from the static checks, or on deadlock naming every blocked rank and what it
      waits for (pointing into ``schedule``'s own rows).
  """
  check_compute(schedule)
  if schedule.is_lowered:
    check_comm(schedule)
    lowered, origin = schedule, None
  else:
    lowered, origin = _lower.lower_with_origin(schedule)
  result = _engine.run(lowered, duration, latency)
  if result.stuck:
    raise _deadlock(result, schedule, origin)
  return result


def _deadlock(result: _engine.Run, source: Schedule,
              origin: Sequence[Sequence[int]] | None) -> ScheduleError:
  """The error naming every blocked rank; points at the first one's action in ``source``'s rows
  (``origin`` maps a lowered position to it)."""
  s = result.schedule
  parts, first = [], None
  for rank in result.stuck:
    pos, a = result.blocked(rank)
    key = result.waiting_for(rank)
    if a.kind.is_comm:
      what = (f"{'activation' if key[0] == 'F' else 'cotangent'} of stage {key[1]} "
              f"microbatch {key[2]} from rank {s.rank_of(key[1])}")
    else:
      what = _engine.key_text(key)
    p = pos if origin is None else origin[rank][pos]
    shown = source.actions[rank][p]
    parts.append(f"rank {rank} blocks at position {p} ({shown}) waiting for {what}")
    if first is None:
      first = (rank, p, shown)
  assert first is not None
  return ScheduleError("deadlock: no rank can make progress; " + "; ".join(parts) +
                       ". Reorder so each rank runs the action its peer is waiting for first.",
                       rank=first[0], position=first[1], action=first[2])


def _unit_duration(a: Action) -> float:
  return 2.0 if a.kind is Kind.B else 1.0


def validate(schedule: Schedule) -> None:
  """Checks that ``schedule`` is complete, correctly placed and runs without deadlock.

  Checks, in order: every action is on the rank owning its stage; every (stage, mb) has exactly
  one F and one B, or one I and one W (never both forms); each rank's list respects its own
  dependencies (F of stage s before F of s + 1, B/I of s + 1 before B/I of s, F before B/I, I
  before W, when both are on this rank); for a lowered schedule, exactly the needed SEND/RECV are
  present and placed around their compute actions; finally, the lowered program is executed (sends
  non-blocking, receives blocking) and must finish, which proves it is deadlock-free and that every
  cross-rank dependency (F of stage s before F of s + 1, B of s + 1 before B of s) holds.

  Args:
    schedule: a compute-only or a lowered schedule.

  Raises:
    ScheduleError: (a ``ValueError``) whose message starts with ``rank R, position P, action A:``.
  """
  run(schedule, _unit_duration)
