"""Dependencies between actions, the lowering pass (adds SEND/RECV) and the I+W merge pass.

Data flow between stages:

- ``F(s, mb)`` needs the activation of ``F(s - 1, mb)``;
- ``B(s, mb)`` / ``I(s, mb)`` need the stash of ``F(s, mb)`` and the cotangent of
  ``B(s + 1, mb)`` / ``I(s + 1, mb)``;
- ``W(s, mb)`` needs ``I(s, mb)`` (and the stash of ``F(s, mb)``).

When producer and consumer live on different ranks, lowering inserts ``SEND_*`` right after the
producer and ``RECV_*`` right before the consumer. When they live on the same rank (the V turn of
ZBV: stages ``p - 1`` and ``p`` on the last rank; or ``p = 1``) nothing is inserted: the driver
hands the value over locally.
"""

from __future__ import annotations

from hkpipe.schedules._ir import Action
from hkpipe.schedules._ir import Kind
from hkpipe.schedules._ir import Schedule

# Completion keys: ("F", s, mb) when the forward is done, ("G", s, mb) when the input gradient is
# done (by B or I), ("W", s, mb) when the weight gradient is done (by B or W).
Key = tuple[str, int, int]


def done_keys(a: Action) -> tuple[Key, ...]:
  """What finishing compute action ``a`` makes available."""
  if a.kind is Kind.F:
    return (("F", a.stage, a.mb),)
  if a.kind is Kind.B:
    return (("G", a.stage, a.mb), ("W", a.stage, a.mb))
  if a.kind is Kind.I:
    return (("G", a.stage, a.mb),)
  if a.kind is Kind.W:
    return (("W", a.stage, a.mb),)
  return ()


def dependencies(a: Action, num_stages: int) -> tuple[Key, ...]:
  """The completion keys compute action ``a`` needs before it may start."""
  if a.kind is Kind.F:
    return (("F", a.stage - 1, a.mb),) if a.stage > 0 else ()
  if a.kind in (Kind.B, Kind.I):
    deps = [("F", a.stage, a.mb)]
    if a.stage < num_stages - 1:
      deps.append(("G", a.stage + 1, a.mb))
    return tuple(deps)
  if a.kind is Kind.W:
    return (("G", a.stage, a.mb),)
  return ()


_KEY_TEXT = {"F": "F", "G": "B/I", "W": "B/W"}


def key_text(key: Key) -> str:
  """Human text for a completion key, e.g. ``'2F1'`` or ``'3B/I0'``."""
  what, stage, mb = key
  return f"{stage}{_KEY_TEXT[what]}{mb}"


def recv_before(s: Schedule, a: Action) -> Action | None:
  """The RECV that must precede compute action ``a`` on its rank, or None if the input is local."""
  if a.kind is Kind.F and a.stage > 0 and s.rank_of(a.stage - 1) != s.rank_of(a.stage):
    return Action(a.stage, Kind.RECV_F, a.mb)
  if (a.kind in (Kind.B, Kind.I) and a.stage < s.num_stages - 1
      and s.rank_of(a.stage + 1) != s.rank_of(a.stage)):
    return Action(a.stage, Kind.RECV_B, a.mb)
  return None


def send_after(s: Schedule, a: Action) -> Action | None:
  """The SEND that must follow compute action ``a`` on its rank, or None for a local consumer."""
  if (a.kind is Kind.F and a.stage < s.num_stages - 1
      and s.rank_of(a.stage + 1) != s.rank_of(a.stage)):
    return Action(a.stage, Kind.SEND_F, a.mb)
  if a.kind in (Kind.B, Kind.I) and a.stage > 0 and s.rank_of(a.stage - 1) != s.rank_of(a.stage):
    return Action(a.stage, Kind.SEND_B, a.mb)
  return None


def message_key(a: Action) -> tuple[str, int, int]:
  """Identifies the message a SEND posts or a RECV waits for: (direction, receiving stage, mb)."""
  if a.kind is Kind.SEND_F:
    return ("F", a.stage + 1, a.mb)
  if a.kind is Kind.SEND_B:
    return ("B", a.stage - 1, a.mb)
  if a.kind is Kind.RECV_F:
    return ("F", a.stage, a.mb)
  if a.kind is Kind.RECV_B:
    return ("B", a.stage, a.mb)
  raise ValueError(f"{a} is not a communication action.")


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
