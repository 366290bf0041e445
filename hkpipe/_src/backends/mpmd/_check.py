"""Checks an instruction program and computes its memory before it runs.

:func:`check`: every buffer is written once, before it is read; nothing reads a freed or donated
buffer; every temporary buffer is freed (or moved on) exactly once; outputs stay live.

:func:`liveness`: per rank and after each instruction, the number of live stashes (anchors: one
buffer per (stage, microbatch) held from its forward to its backward) and the bytes of the buffers
the call allocated and still holds, minus the input bytes it donated. Bytes per buffer come from
the compiled programs' output avals (``_interp.buffer_bytes``).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from hkpipe._src.backends.mpmd import _instr as ir

_UNBORN, _LIVE, _DEAD = 0, 1, 2


def check(program: ir.Program) -> None:
  """Raises ValueError naming the instruction and buffer if ``program`` misuses a buffer."""
  bufs = program.buffers
  state = [_LIVE if b.role == ir.INPUT else _UNBORN for b in bufs]
  why = [""] * len(bufs)

  def fail(i: int, ins: ir.Instr, b: int, what: str) -> None:
    raise ValueError(f"Invalid MPMD program {program.name!r} (process {program.process}): "
                     f"instruction {i} ({ins}) {what} buffer {b} ({bufs[b].name}).")

  for i, ins in enumerate(program.instrs):
    if isinstance(ins, ir.Free):     # drops the handle of a live or donated buffer
      for b in ins.reads:
        if bufs[b].role != ir.TEMP:
          fail(i, ins, b, f"frees the {bufs[b].role}")
        if state[b] == _UNBORN or why[b] in ("freed", "moved"):
          fail(i, ins, b, "frees the " + (why[b] or "unwritten"))
        state[b], why[b] = _DEAD, "freed"
      continue
    for b in ir.reads_of(ins):
      if state[b] == _UNBORN:
        fail(i, ins, b, "reads, before anything writes,")
      if state[b] == _DEAD:
        fail(i, ins, b, f"reads the {why[b]}")
    for b in getattr(ins, "donates", ()):
      state[b], why[b] = _DEAD, "donated"
    if isinstance(ins, ir.Run) and ins.program is None:
      for b in ins.reads:
        state[b], why[b] = _DEAD, "moved"
    for b in ir.writes_of(ins):
      if state[b] != _UNBORN:
        fail(i, ins, b, "writes, a second time,")
      state[b] = _LIVE
  for b, buf in enumerate(bufs):
    if buf.role == ir.TEMP and why[b] not in ("freed", "moved"):
      raise ValueError(f"Invalid MPMD program {program.name!r}: temporary buffer {b} "
                       f"({buf.name}) is never freed.")
    if buf.role == ir.OUTPUT and state[b] != _LIVE:
      raise ValueError(f"Invalid MPMD program {program.name!r}: output buffer {b} "
                       f"({buf.name}) is {'never written' if state[b] == _UNBORN else why[b]}.")


@dataclasses.dataclass(frozen=True)
class Liveness:
  """Memory of a program, per rank.

  Attributes:
    peak_stash: the most stashes (stage, microbatch) held at once.
    peak_bytes: the most bytes held at once by buffers the call allocated, minus input bytes it
      donated (None where buffer sizes were not given).
    bytes_after: per instruction, per rank, those bytes right after it (None likewise).
  """

  peak_stash: tuple[int, ...]
  peak_bytes: tuple[int, ...] | None
  bytes_after: tuple[tuple[int, ...], ...] | None


def liveness(program: ir.Program, num_ranks: int,
             nbytes: Sequence[int] | None = None) -> Liveness:
  """The live stashes and bytes of ``program`` after each instruction (see :class:`Liveness`).

  Args:
    program: a program that passes :func:`check`.
    num_ranks: ranks of the pipeline.
    nbytes: per buffer, its bytes on its rank's devices (all shards); None: counts only.
  """
  bufs = program.buffers
  live = [False] * len(bufs)
  stash = [0] * num_ranks
  held = [0] * num_ranks
  peak_stash = [0] * num_ranks
  peak_bytes = [0] * num_ranks
  after: list[tuple[int, ...]] = []

  def drop(b: int) -> None:
    if not live[b]:
      return
    live[b] = False
    r = bufs[b].rank
    if bufs[b].stash is not None:
      stash[r] -= 1
    if nbytes is not None:
      held[r] -= nbytes[b]

  for ins in program.instrs:
    if isinstance(ins, ir.Free):
      for b in ins.reads:
        drop(b)
    else:
      for b in getattr(ins, "donates", ()):
        if bufs[b].role == ir.INPUT and nbytes is not None:
          held[bufs[b].rank] -= nbytes[b]
        else:
          drop(b)
      if isinstance(ins, ir.Run) and ins.program is None:
        for b in ins.reads:
          drop(b)
      for b in ir.writes_of(ins):
        live[b] = True
        r = bufs[b].rank
        if bufs[b].stash is not None:
          stash[r] += 1
        if nbytes is not None:
          held[r] += nbytes[b]
    for r in range(num_ranks):
      peak_stash[r] = max(peak_stash[r], stash[r])
      peak_bytes[r] = max(peak_bytes[r], held[r])
    after.append(tuple(held))
  if nbytes is None:
    return Liveness(tuple(peak_stash), None, None)
  return Liveness(tuple(peak_stash), tuple(peak_bytes), tuple(after))
