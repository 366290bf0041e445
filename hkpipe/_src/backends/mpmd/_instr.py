"""The MPMD step as a program: typed instructions over numbered buffers (one list per process).

A driver call (a train step, a gradient computation, an evaluation) is lowered
(``_lower.lower_train`` / ``lower_eval``) into a :class:`Program`: the buffers the call uses and
the instructions this process issues, in order. Every buffer holds a *group*: a list of arrays
placed on the devices of one pipeline rank (a stage's parameter leaves, a microbatch's
activations, a scalar as a one-element list). Buffers are written once (a new version of the
gradient accumulator is a new buffer); a buffer that is neither an input nor an output of the
call is dropped by a :class:`Free` after its last read, or moved on by a pass-through :class:`Run`.

The program is checked and its memory computed before anything runs (``_check``), printed by
``_text.describe`` and executed by ``_interp`` against a buffer store.
"""

from __future__ import annotations

import dataclasses
from typing import Union

from hkpipe.schedules import _engine

INPUT, TEMP, OUTPUT = "input", "temp", "output"


@dataclasses.dataclass(frozen=True)
class Buffer:
  """One buffer of a program.

  Attributes:
    name: a readable name (``"p1"``, ``"y0.3"``: stage 0's output for microbatch 3, ...).
    rank: the pipeline rank whose devices hold it.
    role: ``"input"`` (set before the call: parameters, optimizer state, accumulators, batch,
      keys), ``"output"`` (read after the call) or ``"temp"`` (freed during the call).
    stash: ``(stage, microbatch)`` if this buffer is the anchor of that pair's stash (held from
      its forward to its backward), else None; the liveness pass counts live anchors.
  """

  name: str
  rank: int
  role: str = TEMP
  stash: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class Run:
  """A stage program of one schedule action: ``writes = program(*reads)``.

  ``program`` names the stage's compiled program (``fwd``, ``bwd``, ``i``, ``w``, ``last``,
  ``last_fwd_i``, ``eval``); None is a pass-through whose reads move into its writes (the
  last stage's backward hands on the input gradient its fused forward computed).
  """

  rank: int
  stage: int
  kind: str          # the schedule kind: "F", "B", "I" or "W"
  mb: int
  program: str | None
  reads: tuple[int, ...]
  writes: tuple[int, ...]
  donates: tuple[int, ...] = ()

  def __str__(self) -> str:
    return f"rank {self.rank}: {self.kind} of stage {self.stage}, microbatch {self.mb}"


@dataclasses.dataclass(frozen=True)
class Send:
  """Copies buffers to another rank's devices.

  On this process (``remote=False``) each read buffer is copied into the matching write buffer;
  to another process (``remote=True``, ``writes=()``) the arrays are posted as message ``key``,
  which that process's :class:`Recv` pulls.
  """

  src_rank: int
  dst_rank: int
  key: tuple
  reads: tuple[int, ...]
  writes: tuple[int, ...] = ()
  remote: bool = False
  process: int = -1               # the receiving process (remote sends)
  first_shard_only: bool = False

  def __str__(self) -> str:
    where = f"process {self.process}" if self.remote else f"rank {self.dst_rank}"
    return f"rank {self.src_rank}: send {_key_text(self.key)} to {where}"


@dataclasses.dataclass(frozen=True)
class Recv:
  """Pulls message ``key`` posted by another process's :class:`Send` into ``writes[0]``.

  Pulls wait for their posts without blocking the host, so a program issues all of them first.
  """

  src_rank: int
  dst_rank: int | None            # None: a process-level value (metrics, evaluation loss)
  key: tuple
  process: int                    # the sending process
  writes: tuple[int, ...]
  reads: tuple[int, ...] = ()

  def __str__(self) -> str:
    where = f"rank {self.dst_rank}" if self.dst_rank is not None else "this process"
    return (f"{where}: receive {_key_text(self.key)} from rank {self.src_rank} "
            f"(process {self.process})")


@dataclasses.dataclass(frozen=True)
class TieSend:
  """Copies stage ``stage``'s tied gradient leaves ``leaves`` (of buffer ``reads[0]``) to the
  partner stages: into ``writes[i]`` when ``targets[i]`` is on this process (always a copy: the
  partner donates it), else posted as message ``("tie", partner_stage, tie_index)``."""

  rank: int
  stage: int
  reads: tuple[int, ...]
  leaves: tuple[int, ...]
  targets: tuple[tuple[int, int, int], ...]     # (partner stage, tie index, partner rank)
  writes: tuple[int, ...]                       # -1 where the partner is on another process
  processes: tuple[int, ...] = ()               # receiving process per target (-1: this one)

  def __str__(self) -> str:
    return f"rank {self.rank}: send the tied gradients of stage {self.stage}"


@dataclasses.dataclass(frozen=True)
class Finalize:
  """Sums stage ``stage``'s tied gradients and measures its squared norm; ``fused``: applies
  its optimizer update too (no clipping and no skip guard)."""

  rank: int
  stage: int
  fused: bool
  reads: tuple[int, ...]
  writes: tuple[int, ...]
  donates: tuple[int, ...] = ()

  def __str__(self) -> str:
    if self.fused:
      return f"rank {self.rank}: finalize and update stage {self.stage}"
    return f"rank {self.rank}: finalize the gradients of stage {self.stage}"


@dataclasses.dataclass(frozen=True)
class Metrics:
  """Loss, global gradient norm, global squared norm (NaN: skip) and skip flag from every
  stage's squared norm (``reads = (loss_sum, sq_0, ..., sq_n)``)."""

  rank: int
  reads: tuple[int, ...]
  writes: tuple[int, ...]

  def __str__(self) -> str:
    return f"rank {self.rank}: global gradient norm and metrics"


@dataclasses.dataclass(frozen=True)
class Update:
  """Clipped (or guarded) optimizer updates of this process's stages, one program each:
  ``writes[i] = update_i(*reads[i])`` (params, optimizer state, gradients, global squared norm)."""

  process: int
  stages: tuple[int, ...]
  ranks: tuple[int, ...]
  reads: tuple[tuple[int, ...], ...]
  writes: tuple[tuple[int, ...], ...]
  donates: tuple[int, ...] = ()

  def __str__(self) -> str:
    return f"process {self.process}: clip and update its stages {list(self.stages)}"


@dataclasses.dataclass(frozen=True)
class Mean:
  """The evaluation loss: the microbatch sum ``reads[0]`` divided by the microbatch count."""

  rank: int
  reads: tuple[int, ...]
  writes: tuple[int, ...]

  def __str__(self) -> str:
    return f"rank {self.rank}: mean evaluation loss"


@dataclasses.dataclass(frozen=True)
class Free:
  """Drops buffers after their last read."""

  rank: int
  reads: tuple[int, ...]
  writes: tuple[int, ...] = ()

  def __str__(self) -> str:
    return f"rank {self.rank}: free {len(self.reads)} buffer(s)"


Instr = Union[Run, Send, Recv, TieSend, Finalize, Metrics, Update, Mean, Free]


def reads_of(ins: Instr) -> tuple[int, ...]:
  """Every buffer ``ins`` reads (flattening :class:`Update`'s per-stage groups)."""
  if isinstance(ins, Update):
    return tuple(b for group in ins.reads for b in group)
  return ins.reads


def writes_of(ins: Instr) -> tuple[int, ...]:
  """Every buffer ``ins`` writes (without TieSend's remote placeholders)."""
  if isinstance(ins, Update):
    return tuple(b for group in ins.writes for b in group)
  return tuple(b for b in ins.writes if b >= 0)


def rank_of(ins: Instr) -> int | None:
  """The rank an instruction runs on (None: several, or the whole process)."""
  if isinstance(ins, (Send, Recv)):
    return ins.src_rank if isinstance(ins, Send) else ins.dst_rank
  return getattr(ins, "rank", None)


@dataclasses.dataclass(frozen=True)
class Program:
  """One driver call of one process.

  Attributes:
    name: ``"train"``, ``"grads"`` or ``"eval"``.
    process: the process that issues it.
    buffers: every buffer, indexed by id.
    instrs: the instructions in issue order.
    inputs: named input buffers (``("p", s)``, ``("acc", s)``, ``("x", mb)``, ...) -> id.
    outputs: named output buffers (``("p", s)``, ``("metrics",)``, ...) -> id.
  """

  name: str
  process: int
  buffers: tuple[Buffer, ...]
  instrs: tuple[Instr, ...]
  inputs: dict
  outputs: dict


_KEY_NAMES = {"scale": "global squared norm"}  # the transfer key of the updates' scalar
_VALUES = {"F": "activations", "G": "cotangents"}


def _key_text(key: tuple) -> str:
  if key[0] in _VALUES:         # the engine's message key: "activations 0F3", "cotangents 2B/I0"
    return f"{_VALUES[key[0]]} {_engine.key_text(key)}"
  name = _KEY_NAMES.get(key[0], key[0])
  return f"{name} {key[1:]}" if len(key) > 1 else str(name)
