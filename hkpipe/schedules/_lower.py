"""The lowering pass (adds SEND/RECV), its inverse and the I+W merge pass.

Data flow between stages follows the dependency rule of ``_engine``: ``F(s, mb)`` needs the
activation of ``F(s - 1, mb)``; ``B(s, mb)``/``I(s, mb)`` need the stash of ``F(s, mb)`` and the
cotangent of ``B(s + 1, mb)``/``I(s + 1, mb)``; ``W(s, mb)`` needs ``I(s, mb)``.

When producer and consumer live on different ranks, lowering inserts ``SEND_*`` right after the
producer and ``RECV_*`` right before the consumer; the pair shares ``_engine.message_key``, the
completion key it carries. When they live on the same rank (the V turn of ZBV: stages ``p - 1``
and ``p`` on the last rank; or ``p = 1``) nothing is inserted: the driver hands the value over
locally.
"""

from __future__ import annotations

from hkpipe.schedules import _engine
from hkpipe.schedules._ir import Action
from hkpipe.schedules._ir import Kind
from hkpipe.schedules._ir import Schedule


def recv_before(s: Schedule, a: Action) -> Action | None:
  """The RECV that must precede compute action ``a`` on its rank, or None if the input is local."""
  for what, stage, mb in _engine.dependencies(a, s.num_stages):
    if s.rank_of(stage) != s.rank_of(a.stage):
      return Action(a.stage, _engine.COMM[what][1], mb)
  return None


def send_after(s: Schedule, a: Action) -> Action | None:
  """The SEND that must follow compute action ``a`` on its rank, or None for a local consumer."""
  for key in _engine.done_keys(a):
    other = _engine.consumer_stage(key, s.num_stages)
    if other is not None and s.rank_of(other) != s.rank_of(a.stage):
      return Action(a.stage, _engine.COMM[key[0]][0], a.mb)
  return None


def strip_comm(schedule: Schedule) -> Schedule:
  """``schedule`` without its SEND/RECV actions (undoes :func:`lower`)."""
  return schedule.replace(actions=tuple(tuple(a for a in row if a.kind.is_compute)
                                        for row in schedule.actions))


def lower(schedule: Schedule) -> Schedule:
  """Adds the communication actions to a compute-only schedule.

  Each cross-rank input gets a ``RECV_*`` immediately before its consumer and each cross-rank
  output a ``SEND_*`` immediately after its producer. With non-blocking sends and blocking receives
  this placement never waits longer than the data dependency itself, so the lowered program
  deadlocks exactly when the compute order does (which :func:`validate` rules out).

  Args:
    schedule: a compute-only schedule (F, B, I, W actions).

  Returns:
    A new schedule with the same name and layout whose rows include SEND/RECV actions.

  Raises:
    ValueError: if ``schedule`` already contains communication actions.
  """
  return lower_with_origin(schedule)[0]


def lower_with_origin(schedule: Schedule) -> tuple[Schedule, tuple[tuple[int, ...], ...]]:
  """Like :func:`lower`, also returning, per rank and lowered position, the position in the
  compute-only row of the compute action it belongs to (a RECV belongs to its consumer, a SEND to
  its producer). Used to point error messages at the user's own list."""
  if schedule.is_lowered:
    raise ValueError(f"Schedule {schedule.name!r} already contains SEND/RECV actions; lower() "
                     "takes a compute-only schedule.")
  rows, origins = [], []
  for row in schedule.actions:
    out, origin = [], []
    for pos, a in enumerate(row):
      recv = recv_before(schedule, a)
      send = send_after(schedule, a)
      for item in (recv, a, send):
        if item is not None:
          out.append(item)
          origin.append(pos)
    rows.append(tuple(out))
    origins.append(tuple(origin))
  return schedule.replace(actions=tuple(rows)), tuple(origins)


def merge_backward(schedule: Schedule) -> Schedule:
  """Replaces every adjacent pair ``I(s, mb) W(s, mb)`` on a rank by ``B(s, mb)``.

  Useful for a backend without a split backward: the order of all other actions is unchanged.
  Pairs that are not adjacent (the W was deferred to fill a bubble) stay split.

  Args:
    schedule: a compute-only schedule.

  Returns:
    The merged schedule.

  Raises:
    ValueError: if ``schedule`` contains communication actions (merge before lowering).
  """
  if schedule.is_lowered:
    raise ValueError("merge_backward() takes a compute-only schedule: merge first, then lower().")
  rows = []
  for row in schedule.actions:
    out: list[Action] = []
    for a in row:
      prev = out[-1] if out else None
      if (a.kind is Kind.W and prev is not None and prev.kind is Kind.I
          and (prev.stage, prev.mb) == (a.stage, a.mb)):
        out[-1] = Action(a.stage, Kind.B, a.mb)
      else:
        out.append(a)
    rows.append(tuple(out))
  return schedule.replace(actions=tuple(rows))
