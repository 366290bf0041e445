"""``hkpipe.testing``'s schedule assertions: ``hkpipe.schedules.validate``/``simulate`` as asserts.

The rules live in ``hkpipe.schedules`` (``_validate``: placement, exactly-once, per-rank order,
communication, deadlock freedom; ``_simulate``: the timeline, bubble and stash counts); this
module only turns their verdicts into ``AssertionError`` s that show the offending rank's row.
"""

from __future__ import annotations

import re
from typing import Sequence

from hkpipe import schedules


def _check_type(schedule: object) -> None:
  if not isinstance(schedule, schedules.Schedule):
    raise TypeError(f"Expected a hkpipe.schedules.Schedule, got {type(schedule).__name__}; build "
                    "one with hkpipe.schedules.get(name, ...) or hkpipe.schedules.from_text(...).")


def _title(s: schedules.Schedule) -> str:
  return (f"schedule {s.name!r} ({s.num_ranks} ranks, {s.num_microbatches} microbatches, "
          f"{s.stages_per_rank} stages per rank)")


def _row_with_marker(s: schedules.Schedule, rank: int | None, position: int | None) -> str:
  """``rank R: 0F0 0F1 [0B0] 0B1`` with the offending action bracketed (all ranks if unknown)."""
  ranks = range(s.num_ranks) if rank is None else [rank]
  lines = []
  for r in ranks:
    cells = [f"[{a}]" if r == rank and i == position else str(a)
             for i, a in enumerate(s.actions[r])]
    lines.append(f"  rank {r}: {' '.join(cells) or '(no actions)'}")
  return "\n".join(lines)


def assert_schedule_valid(schedule: schedules.Schedule, *,
                          costs: schedules.Costs | None = None,
                          max_bubble_ratio: float | None = None,
                          max_peak_activations: int | Sequence[int] | None = None,
                          ) -> schedules.SimResult:
  """Asserts ``schedule`` passes :func:`hkpipe.schedules.validate` and, optionally, bounds of its
  simulation.

  Args:
    schedule: a compute-only or lowered :class:`hkpipe.schedules.Schedule`.
    costs: the simulator's per-action costs (default ``Costs()``: F = I = W = 1, B = 2).
    max_bubble_ratio: the simulated ``bubble_ratio`` must be at most this.
    max_peak_activations: each rank's most live activation stashes must be at most this (one
      int for every rank, or one per rank).

  Returns:
    The :class:`hkpipe.schedules.SimResult` under ``costs``.

  Raises:
    AssertionError: with the validator's message (rank, position, action and why) and the
      offending rank's row, the offending action in brackets; or the bound that was exceeded.
  """
  _check_type(schedule)
  try:
    schedules.validate(schedule)
  except schedules.ScheduleError as e:
    raise AssertionError(f"{_title(schedule)} is invalid: {e}\n"
                         f"{_row_with_marker(schedule, e.rank, e.position)}") from e
  result = schedules.simulate(schedule, costs)
  if max_bubble_ratio is not None and result.bubble_ratio > max_bubble_ratio:
    raise AssertionError(f"{_title(schedule)}: simulated bubble ratio {result.bubble_ratio:.4f} "
                         f"> max_bubble_ratio={max_bubble_ratio} (costs {result.costs}).")
  if max_peak_activations is not None:
    bounds = ([max_peak_activations] * schedule.num_ranks
              if isinstance(max_peak_activations, int) else list(max_peak_activations))
    if len(bounds) != schedule.num_ranks:
      raise ValueError(f"max_peak_activations has {len(bounds)} entries for "
                       f"{schedule.num_ranks} ranks; give one int or one per rank.")
    over = [(r, peak, b) for r, (peak, b) in enumerate(zip(result.peak_activations, bounds))
            if peak > b]
    if over:
      shown = "; ".join(f"rank {r}: {peak} > {b}" for r, peak, b in over)
      raise AssertionError(f"{_title(schedule)}: peak live activation stashes exceed "
                           f"max_peak_activations ({shown}); all ranks: "
                           f"{result.peak_activations}.")
  return result


def assert_schedule_invalid(schedule: schedules.Schedule,
                            match: str | None = None) -> schedules.ScheduleError:
  """Asserts :func:`hkpipe.schedules.validate` rejects ``schedule`` (e.g. a hand-written order
  that must deadlock), with a message matching the regex ``match`` if given.

  Returns:
    The :class:`hkpipe.schedules.ScheduleError` (``rank``, ``position``, ``action``, ``detail``).

  Raises:
    AssertionError: the schedule is valid, or the message does not match.
  """
  _check_type(schedule)
  try:
    schedules.validate(schedule)
  except schedules.ScheduleError as e:
    if match is not None and not re.search(match, str(e)):
      raise AssertionError(f"{_title(schedule)} is rejected, but the message does not match "
                           f"{match!r}: {e}") from e
    return e
  raise AssertionError(f"{_title(schedule)} is valid, but a ScheduleError was expected"
                       f"{f' matching {match!r}' if match else ''}:\n"
                       f"{_row_with_marker(schedule, None, None)}")
