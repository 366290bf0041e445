"""The schedule IR: per-rank ordered action lists, shared by every backend, simulator and picture.

A schedule for ``p`` ranks, ``m`` microbatches and ``v`` stages per rank lists, for each rank, the
actions it executes in order. Stages are numbered ``0..p*v-1`` in model order; ``stage_to_rank``
says which rank owns each stage (looped for interleaved schedules, V-shaped for ZBV).

Compute actions: ``F`` forward, ``B`` full backward, or the zero-bubble split ``I`` (input grad)
+ ``W`` (weight grad). Communication actions (added by lowering): ``SEND_F``/``RECV_F`` move the
activation of (stage, mb) from ``stage`` to ``stage + 1``; ``SEND_B``/``RECV_B`` move the cotangent
from ``stage`` to ``stage - 1``. The ``stage`` of a SEND is the sender's stage, of a RECV the
receiver's stage.

Text form of an action: ``{stage}{KIND}{mb}`` (``0F1``, ``3B0``, ``2I5``, ``2W5``,
``1SEND_F3``, ``2RECV_F3``). A rank's program is its actions separated by spaces.

Constructing a :class:`Schedule` checks sizes and ranges only (lists are stored as tuples);
ordering and completeness are checked by ``hkpipe.schedules.validate``. Errors that concern one
action are :class:`ScheduleError` s, whose message starts with ``rank R, position P, action A:``.
"""

from __future__ import annotations

import dataclasses
import enum
import re


class Kind(enum.Enum):
  """What an action does."""

  F = "F"
  B = "B"
  I = "I"  # noqa: E741  (input-gradient half of a split backward)
  W = "W"
  SEND_F = "SEND_F"
  RECV_F = "RECV_F"
  SEND_B = "SEND_B"
  RECV_B = "RECV_B"

  @property
  def is_compute(self) -> bool:
    """True for F, B, I and W."""
    return self in (Kind.F, Kind.B, Kind.I, Kind.W)

  @property
  def is_comm(self) -> bool:
    """True for SEND_F, RECV_F, SEND_B and RECV_B."""
    return not self.is_compute


_ACTION_RE = re.compile(r"^(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W)(\d+)$")


@dataclasses.dataclass(frozen=True, order=True)
class Action:
  """One action of one rank: ``kind`` on ``stage`` for microbatch ``mb``."""

  stage: int
  kind: Kind
  mb: int

  def __str__(self) -> str:
    return f"{self.stage}{self.kind.value}{self.mb}"

  @classmethod
  def parse(cls, text: str) -> "Action":
    """Parses ``'0F1'``-style text; raises ValueError naming the bad token."""
    match = _ACTION_RE.match(text.strip())
    if not match:
      raise ValueError(f"Cannot parse action {text!r}: expected '<stage><KIND><mb>' with KIND in "
                       "F, B, I, W, SEND_F, RECV_F, SEND_B, RECV_B (e.g. '0F1', '2SEND_B3').")
    return cls(int(match.group(1)), Kind(match.group(2)), int(match.group(3)))


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A complete pipeline schedule.

  Attributes:
    name: e.g. ``"1f1b"``.
    num_ranks: ``p``, the number of pipeline ranks (devices or device groups).
    num_microbatches: ``m``.
    stages_per_rank: ``v`` (1 for GPipe/1F1B, >= 2 for interleaved, 2 for ZBV).
    stage_to_rank: owner rank of each of the ``p * v`` stages.
    actions: per-rank tuple of actions, in execution order.
  """

  name: str
  num_ranks: int
  num_microbatches: int
  stages_per_rank: int
  stage_to_rank: tuple[int, ...]
  actions: tuple[tuple[Action, ...], ...]

  @property
  def num_stages(self) -> int:
    return self.num_ranks * self.stages_per_rank

  def stages_of_rank(self, rank: int) -> tuple[int, ...]:
    """The stages owned by ``rank``, in model order."""
    return tuple(s for s, r in enumerate(self.stage_to_rank) if r == rank)

  @property
  def split_backward(self) -> bool:
    """True when backward is split into I and W actions (zero-bubble schedules)."""
    return any(a.kind in (Kind.I, Kind.W) for row in self.actions for a in row)

  def __post_init__(self):
    _check_structure(self)

  def rank_of(self, stage: int) -> int:
    """The rank that owns ``stage``."""
    return self.stage_to_rank[stage]

  @property
  def is_lowered(self) -> bool:
    """True when the per-rank lists contain communication actions (see ``lower``)."""
    return any(a.kind.is_comm for row in self.actions for a in row)

  def compute_actions(self, rank: int) -> tuple[Action, ...]:
    """The compute actions (F, B, I, W) of ``rank``, in order, without communication."""
    return tuple(a for a in self.actions[rank] if a.kind.is_compute)

  def replace(self, **changes) -> "Schedule":
    """A copy with some fields replaced (e.g. ``actions=...``, ``name=...``)."""
    return dataclasses.replace(self, **changes)


class ScheduleError(ValueError):
  """A schedule is malformed; ``rank``, ``position`` and ``action`` point at the offence.

  Attributes:
    rank: the rank whose list holds the offending action (None when not rank-specific).
    position: index of the action in that rank's list (None when the action is missing).
    action: the offending (or missing) action, if any.
    detail: the message without the location prefix.
  """

  def __init__(self, message: str, *, rank: int | None = None, position: int | None = None,
               action: Action | None = None):
    where = []
    if rank is not None:
      where.append(f"rank {rank}")
    if position is not None:
      where.append(f"position {position}")
    if action is not None:
      where.append(f"action {action}")
    super().__init__(f"{', '.join(where)}: {message}" if where else message)
    self.detail = message
    self.rank = rank
    self.position = position
    self.action = action

  def __reduce__(self):
    return (_make_error, (self.detail, self.rank, self.position, self.action))


def _make_error(detail: str, rank: int | None, position: int | None,
                action: Action | None) -> ScheduleError:
  return ScheduleError(detail, rank=rank, position=position, action=action)


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _check_structure(s: Schedule) -> None:
  """Checks sizes and types only; ordering and completeness are ``validate``'s job."""
  for field in ("num_ranks", "num_microbatches", "stages_per_rank"):
    value = getattr(s, field)
    if not _is_int(value) or value < 1:
      raise ValueError(f"Schedule.{field} must be a positive int, got {value!r}.")
  try:  # accept lists; store tuples so the schedule stays immutable and hashable
    object.__setattr__(s, "stage_to_rank", tuple(s.stage_to_rank))
    object.__setattr__(s, "actions", tuple(tuple(row) for row in s.actions))
  except TypeError:
    raise ValueError("Schedule.stage_to_rank must be a sequence of ints and Schedule.actions a "
                     "sequence (one per rank) of sequences of Action.") from None
  if len(s.stage_to_rank) != s.num_stages:
    raise ValueError(f"stage_to_rank has {len(s.stage_to_rank)} entries but num_ranks * "
                     f"stages_per_rank = {s.num_ranks} * {s.stages_per_rank} = {s.num_stages}.")
  for stage, rank in enumerate(s.stage_to_rank):
    if not _is_int(rank) or not 0 <= rank < s.num_ranks:
      raise ValueError(f"stage_to_rank[{stage}] = {rank!r} is not a rank in 0..{s.num_ranks - 1}.")
  if len(s.actions) != s.num_ranks:
    raise ValueError(f"actions has {len(s.actions)} rows but num_ranks = {s.num_ranks}; give one "
                     "(possibly empty) tuple of actions per rank.")
  for rank, row in enumerate(s.actions):
    for pos, a in enumerate(row):
      if not isinstance(a, Action):
        raise ScheduleError(f"expected an Action, got {a!r}.", rank=rank, position=pos)
      if not 0 <= a.stage < s.num_stages:
        raise ScheduleError(f"stage {a.stage} is out of range 0..{s.num_stages - 1}.", rank=rank,
                            position=pos, action=a)
      if not 0 <= a.mb < s.num_microbatches:
        raise ScheduleError(f"microbatch {a.mb} is out of range 0..{s.num_microbatches - 1}.",
                            rank=rank, position=pos, action=a)
