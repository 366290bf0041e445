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
    return self in (Kind.F, Kind.B, Kind.I, Kind.W)

  @property
  def is_comm(self) -> bool:
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
