"""Text form of a schedule: one row of actions per rank, plus an optional header comment.

Example (1F1B, 2 ranks, 3 microbatches)::

  # schedule: name=1f1b microbatches=3 stage_to_rank=0,1
  0F0 0F1 0B0 0F2 0B1 0B2
  1F0 1B0 1F1 1B1 1F2 1B2

Rules:

- Each non-blank, non-comment line is the program of the next rank (rank 0 first): actions in the
  ``{stage}{KIND}{mb}`` form of :class:`Action`, separated by whitespace. A rank with no actions is
  written ``-``.
- ``#`` starts a comment. A comment line ``# schedule: key=value ...`` is the header; keys are
  ``name``, ``microbatches`` and ``stage_to_rank`` (comma-separated owner rank of each stage).
- Without a header (a hand-written schedule), :func:`from_text` infers the missing facts: the
  number of ranks is the number of rows, a stage belongs to the row its actions appear on, the
  number of stages is ``max stage + 1`` and must be a multiple of the number of ranks, and the
  number of microbatches is ``max mb + 1``.
"""

from __future__ import annotations

import shlex
from typing import Sequence

from hkpipe.schedules._ir import Action
from hkpipe.schedules._ir import Schedule
from hkpipe.schedules._ir import ScheduleError

_HEADER = "schedule:"


def to_text(schedule: Schedule) -> str:
  """Writes ``schedule`` in the text form; ``from_text(to_text(s)) == s``.

  Args:
    schedule: any schedule, compute-only or lowered.

  Returns:
    A header comment line followed by one line per rank, ending with a newline.
  """
  header = (f"# {_HEADER} name={shlex.quote(schedule.name)} "
            f"microbatches={schedule.num_microbatches} "
            f"stage_to_rank={','.join(str(r) for r in schedule.stage_to_rank)}")
  rows = [" ".join(str(a) for a in row) if row else "-" for row in schedule.actions]
  return "\n".join([header] + rows) + "\n"


def _parse_header(line: str) -> dict[str, str]:
  body = line.lstrip("#").strip()[len(_HEADER):]
  fields = {}
  for token in shlex.split(body):
    key, sep, value = token.partition("=")
    if not sep or key not in ("name", "microbatches", "stage_to_rank"):
      raise ValueError(f"Bad schedule header field {token!r}; expected name=..., "
                       "microbatches=<int> or stage_to_rank=<r0>,<r1>,...")
    fields[key] = value
  return fields


def _parse_ints(text: str, what: str) -> tuple[int, ...]:
  try:
    return tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError:
    raise ValueError(f"Cannot parse {what} {text!r}: expected comma-separated ints.") from None


def _infer_stage_to_rank(rows: Sequence[Sequence[Action]]) -> tuple[int, ...]:
  owner: dict[int, tuple[int, int]] = {}
  for rank, row in enumerate(rows):
    for pos, a in enumerate(row):
      if a.stage in owner and owner[a.stage][0] != rank:
        first_rank, first_pos = owner[a.stage]
        raise ScheduleError(
            f"stage {a.stage} already appears on rank {first_rank} (position {first_pos}); a "
            "stage belongs to one rank. Move the action, or pass stage_to_rank= explicitly.",
            rank=rank, position=pos, action=a)
      owner.setdefault(a.stage, (rank, pos))
  num_stages = max(owner) + 1 if owner else len(rows)
  missing = [s for s in range(num_stages) if s not in owner]
  if missing:
    raise ValueError(f"Stages {missing} never appear, so their owner rank cannot be inferred; "
                     "pass stage_to_rank= (or a '# schedule:' header).")
  if num_stages % len(rows):
    raise ValueError(f"The text has {num_stages} stages on {len(rows)} ranks; the stage count must "
                     "be a multiple of the rank count (stages_per_rank = stages / ranks).")
  return tuple(owner[s][0] for s in range(num_stages))


def from_text(text: str, *, name: str | None = None, num_microbatches: int | None = None,
              stage_to_rank: Sequence[int] | None = None) -> Schedule:
  """Parses the text form (see the module docstring) into a :class:`Schedule`.

  Keyword arguments override the header; facts given by neither are inferred from the rows.

  Args:
    text: the schedule text, one row per rank.
    name: schedule name (default: header name, else ``"custom"``).
    num_microbatches: ``m`` (default: header, else ``max mb + 1``).
    stage_to_rank: owner rank of each stage (default: header, else inferred from the rows).

  Returns:
    The schedule. It is NOT validated: call :func:`validate` on it.

  Raises:
    ValueError: a token does not parse, or the facts cannot be inferred (the message names the
      line/token and the fix). :class:`ScheduleError` points at an action in the wrong place.
  """
  header: dict[str, str] = {}
  rows: list[tuple[Action, ...]] = []
  for lineno, raw in enumerate(text.splitlines(), start=1):
    stripped = raw.strip()
    if stripped.startswith("#") and stripped.lstrip("#").strip().startswith(_HEADER):
      header = _parse_header(stripped)
      continue
    body = raw.split("#", 1)[0].strip()
    if not body:
      continue
    if body == "-":
      rows.append(())
      continue
    row = []
    for token in body.split():
      try:
        row.append(Action.parse(token))
      except ValueError as e:
        raise ValueError(f"line {lineno} (rank {len(rows)}): {e}") from None
    rows.append(tuple(row))
  if not rows:
    raise ValueError("The schedule text has no rows; write one line of actions per rank.")

  if name is None:
    name = header.get("name", "custom")
  if num_microbatches is None and "microbatches" in header:
    try:
      num_microbatches = int(header["microbatches"])
    except ValueError:
      raise ValueError(f"Header microbatches={header['microbatches']!r} is not an int.") from None
  if num_microbatches is None:
    num_microbatches = 1 + max((a.mb for row in rows for a in row), default=0)
  if stage_to_rank is None and "stage_to_rank" in header:
    stage_to_rank = _parse_ints(header["stage_to_rank"], "stage_to_rank")
  if stage_to_rank is None:
    stage_to_rank = _infer_stage_to_rank(rows)
  stage_to_rank = tuple(int(r) for r in stage_to_rank)
  if len(stage_to_rank) % len(rows):
    raise ValueError(f"stage_to_rank has {len(stage_to_rank)} stages for {len(rows)} rank rows; "
                     "the stage count must be a multiple of the number of rows.")
  return Schedule(name=name, num_ranks=len(rows), num_microbatches=num_microbatches,
                  stages_per_rank=len(stage_to_rank) // len(rows), stage_to_rank=stage_to_rank,
                  actions=tuple(rows))
