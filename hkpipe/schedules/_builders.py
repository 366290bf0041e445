"""The built-in schedules and the registry (``get``, ``names``).

Convention for the whole library: ``num_ranks`` is the number of pipeline RANKS ``p`` (devices);
``virtual_stages`` is ``v``, the number of stages per rank; the model is cut into
``num_stages = p * v`` stages numbered in model order.

Every builder accepts any ``m >= 1``. Builders whose steady state needs a minimum number of
microbatches (interleaved: ``m`` a multiple of ``p``; ZBV: ``m >= 2p - 1``; DualPipeV:
``m >= 2p``) build the order for the rounded-up count and drop the actions of the extra
microbatches. Removing whole microbatches keeps a deadlock-free order deadlock-free (their actions
depend only on each other), so the result is always valid; it just has a larger bubble.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Callable, Mapping

from hkpipe._src import deprecation
from hkpipe.schedules._ir import Action
from hkpipe.schedules._ir import Kind
from hkpipe.schedules._ir import Schedule

Rows = list[list[Action]]


def _f(stage: int, mb: int) -> Action:
  return Action(stage, Kind.F, mb)


def _b(stage: int, mb: int) -> Action:
  return Action(stage, Kind.B, mb)


def _i(stage: int, mb: int) -> Action:
  return Action(stage, Kind.I, mb)


def _w(stage: int, mb: int) -> Action:
  return Action(stage, Kind.W, mb)


def _drop_extra(rows: Rows, m: int) -> tuple[tuple[Action, ...], ...]:
  return tuple(tuple(a for a in row if a.mb < m) for row in rows)


def _ceil_to(x: int, k: int) -> int:
  return -(-x // k) * k


def _gpipe_rows(p: int, m: int) -> Rows:
  """All forwards, then all backwards (microbatch order), on every rank."""
  return [[_f(r, j) for j in range(m)] + [_b(r, j) for j in range(m)] for r in range(p)]


def _one_f_one_b_row(p: int, m: int, r: int, split: bool) -> list[Action]:
  """1F1B on rank ``r``: ``p - r - 1`` warm-up forwards, then one F and one backward alternately,
  then the remaining backwards. With ``split`` the backward is ``I`` and rank ``r`` defers each
  ``W`` by ``r`` microbatches (ZB-H1): the deferred ``W`` s fill the cool-down bubble."""
  warmup = min(p - r - 1, m)
  row = [_f(r, j) for j in range(warmup)]
  for j in range(m):
    if warmup + j < m:
      row.append(_f(r, warmup + j))
    if not split:
      row.append(_b(r, j))
      continue
    row.append(_i(r, j))
    if j >= r:
      row.append(_w(r, j - r))
  if split:
    row += [_w(r, j) for j in range(max(m - r, 0), m)]
  return row


def _interleaved_rows(p: int, m: int, v: int) -> Rows:
  """Megatron-style interleaved 1F1B; stage ``c * p + r`` is chunk ``c`` of rank ``r``.

  Microbatches go in rounds of ``p``: a rank runs the forwards of a round chunk by chunk
  (chunk 0 for the round's microbatches, then chunk 1, ...), and the backwards in the same rounds
  with the chunks reversed. Rank ``r`` runs ``2 (p - r - 1) + (v - 1) p`` warm-up forwards, then
  alternates one forward and one backward, then drains the backwards.
  """
  mm = _ceil_to(m, p)
  rows = []
  for r in range(p):
    fwd, bwd = [], []
    for g in range(mm // p):
      mbs = range(g * p, (g + 1) * p)
      fwd += [_f(c * p + r, j) for c in range(v) for j in mbs]
      bwd += [_b(c * p + r, j) for c in reversed(range(v)) for j in mbs]
    total = len(fwd)
    warmup = min(2 * (p - r - 1) + (v - 1) * p, total)
    row = fwd[:warmup]
    for k in range(total - warmup):
      row += [fwd[warmup + k], bwd[k]]
    row += bwd[total - warmup:]
    rows.append(row)
  return rows


class _Counters:
  """Emits the next F/I/W/B of one chunk of a rank, each kind counting its own microbatches."""

  def __init__(self, row: list[Action], stage: int):
    self.row, self.stage = row, stage
    self.count = {Kind.F: 0, Kind.I: 0, Kind.W: 0}

  def emit(self, kind: Kind) -> None:
    counter = Kind.I if kind is Kind.B else kind
    mb = self.count[counter]
    self.row.append(Action(self.stage, kind, mb))
    self.count[counter] += 1
    if kind is Kind.B:
      self.count[Kind.W] += 1

  def n(self, kind: Kind) -> int:
    return self.count[kind]


def _zbv_row(p: int, m: int, r: int) -> list[Action]:
  """ZBV on rank ``r`` (stages ``r`` = chunk 0 and ``2p - 1 - r`` = chunk 1), ``m >= 2p - 1``.

  With F = I = W = 1 every rank is busy without a gap from its first forward (at time ``r``) until
  the cool-down, and the whole run takes ``6m + p - 1`` (the lower bound: rank ``p - 1`` cannot
  start before ``p - 1`` and has ``6m`` units of work). Each rank keeps at most ``2p`` chunk
  stashes alive (= ``p`` stashes of a 1F1B stage twice the size).
  """
  row: list[Action] = []
  c0, c1 = _Counters(row, r), _Counters(row, 2 * p - 1 - r)
  F, I, W = Kind.F, Kind.I, Kind.W
  for _ in range(2 * (p - r) - 1):          # fill the pipe with chunk-0 forwards
    c0.emit(F)
  for _ in range(r):                         # chunk-1 forwards arrive every other slot
    c1.emit(F)
    c0.emit(F)
  for _ in range(p - r):                     # first chunk-1 backwards, weight grads right away
    c1.emit(F)
    c1.emit(I)
    c1.emit(W)
  while c0.n(F) < m:                         # steady state: 6 units per microbatch
    for chunk, kind in ((c0, F), (c0, I), (c0, W), (c1, F), (c1, I), (c1, W)):
      chunk.emit(kind)
  while c1.n(F) < m:
    for chunk, kind in ((c0, I), (c0, W), (c1, F), (c1, I), (c1, W)):
      chunk.emit(kind)
  while c1.n(I) < m:                         # cool-down: input grads first, weight grads fill
    c0.emit(I)
    c1.emit(I)
  while c0.n(I) < m:
    c0.emit(I)
    c0.emit(W)
  while c1.n(W) < m:
    c1.emit(W)
  while c0.n(W) < m:
    c0.emit(W)
  return row


def _dualpipev_row(p: int, m: int, r: int) -> list[Action]:
  """DualPipeV on rank ``r`` (V placement as ZBV), ``m >= 2p``.

  Phases (DeepSeek's DualPipeV design): ``2 (p - r - 1)`` chunk-0 forwards; ``r + 1`` pairs
  (F0, F1); ``p - r - 1`` times (I1, W1, F1); a steady state of (F0, B1, F1, B0) — in DualPipe a
  forward and a backward of the other chunk run overlapped, here they are adjacent actions that a
  backend may overlap; ``p - r - 1`` times (B1, F1, B0); ``r + 1`` times (B1, I0); ``p - r - 1``
  times (W0, I0); then the deferred weight gradients.
  """
  row: list[Action] = []
  c0, c1 = _Counters(row, r), _Counters(row, 2 * p - 1 - r)
  F, B, I, W = Kind.F, Kind.B, Kind.I, Kind.W
  for _ in range(2 * (p - r - 1)):
    c0.emit(F)
  for _ in range(r + 1):
    c0.emit(F)
    c1.emit(F)
  for _ in range(p - r - 1):
    c1.emit(I)
    c1.emit(W)
    c1.emit(F)
  while c0.n(F) < m:
    for chunk, kind in ((c0, F), (c1, B), (c1, F), (c0, B)):
      chunk.emit(kind)
  for _ in range(p - r - 1):
    c1.emit(B)
    c1.emit(F)
    c0.emit(B)
  for _ in range(r + 1):
    c1.emit(B)
    c0.emit(I)
  for _ in range(p - r - 1):
    c0.emit(W)
    c0.emit(I)
  while c0.n(W) < m:
    c0.emit(W)
  return row


def _v_placement(p: int) -> tuple[int, ...]:
  return tuple(range(p)) + tuple(reversed(range(p)))


# ---------------------------------------------------------------------------------------------
# Registry.


@dataclasses.dataclass(frozen=True)
class _Spec:
  """A registered schedule: its builder, default ``v`` and a check of ``v``."""

  build: Callable[[int, int, int], Schedule]
  default_v: int | None  # None: the caller must choose
  check_v: Callable[[str, int, int], None]
  summary: str


def _needs_v1(name: str, p: int, v: int) -> None:
  del p
  if v != 1:
    raise ValueError(f"Schedule {name!r} puts one stage on each rank, so virtual_stages must be 1; "
                     f"got virtual_stages={v}. Use 'interleaved_1f1b' for several stages per rank.")


def _needs_v_at_least_2(name: str, p: int, v: int) -> None:
  del p
  if v < 2:
    raise ValueError(f"Schedule {name!r} needs virtual_stages >= 2 (stages per rank); got "
                     f"virtual_stages={v}. Pass virtual_stages=2 or more, or use '1f1b'.")


def _needs_v2(name: str, p: int, v: int) -> None:
  if v != 2:
    odd = " (an odd stage count cannot form a V)" if (p * v) % 2 else ""
    raise ValueError(f"Schedule {name!r} places exactly 2 stages per rank in a V (2p stages); got "
                     f"virtual_stages={v}, i.e. {p * v} stages on {p} ranks{odd}. Pass "
                     "virtual_stages=2 (or leave it unset).")


def _schedule(name: str, p: int, m: int, v: int, stage_to_rank, rows) -> Schedule:
  return Schedule(name=name, num_ranks=p, num_microbatches=m, stages_per_rank=v,
                  stage_to_rank=tuple(stage_to_rank), actions=_drop_extra(rows, m))


def _build_gpipe(p: int, m: int, v: int) -> Schedule:
  return _schedule("gpipe", p, m, v, range(p), _gpipe_rows(p, m))


def _build_1f1b(p: int, m: int, v: int) -> Schedule:
  return _schedule("1f1b", p, m, v, range(p), [_one_f_one_b_row(p, m, r, False) for r in range(p)])


def _build_zb_h1(p: int, m: int, v: int) -> Schedule:
  return _schedule("zb_h1", p, m, v, range(p), [_one_f_one_b_row(p, m, r, True) for r in range(p)])


def _build_interleaved(p: int, m: int, v: int) -> Schedule:
  return _schedule("interleaved_1f1b", p, m, v, [s % p for s in range(p * v)],
                   _interleaved_rows(p, m, v))


def _build_zbv(p: int, m: int, v: int) -> Schedule:
  mm = max(m, 2 * p - 1)
  return _schedule("zbv", p, m, v, _v_placement(p), [_zbv_row(p, mm, r) for r in range(p)])


def _build_dualpipev(p: int, m: int, v: int) -> Schedule:
  mm = max(m, 2 * p)
  return _schedule("dualpipev", p, m, v, _v_placement(p), [_dualpipev_row(p, mm, r)
                                                            for r in range(p)])


_REGISTRY: Mapping[str, _Spec] = types.MappingProxyType({
    "gpipe": _Spec(_build_gpipe, 1, _needs_v1, "all forwards, then all backwards"),
    "1f1b": _Spec(_build_1f1b, 1, _needs_v1, "one-forward-one-backward (PipeDream-flush)"),
    "interleaved_1f1b": _Spec(_build_interleaved, None, _needs_v_at_least_2,
                              "Megatron interleaved 1F1B, v looped stages per rank"),
    "zb_h1": _Spec(_build_zb_h1, 1, _needs_v1, "zero bubble H1: split backward, 1F1B memory"),
    "zbv": _Spec(_build_zbv, 2, _needs_v2, "zero bubble V: 2 stages per rank in a V"),
    "dualpipev": _Spec(_build_dualpipev, 2, _needs_v2, "DeepSeek DualPipeV, V placement"),
})


def names() -> tuple[str, ...]:
  """The registered schedule names, e.g. ``('gpipe', '1f1b', ...)``."""
  return tuple(_REGISTRY)


def describe(name: str) -> str:
  """A one-line description of a registered schedule."""
  return _spec(name).summary


def _spec(name: str) -> _Spec:
  if name not in _REGISTRY:
    raise ValueError(f"Unknown schedule {name!r}; choose one of {list(_REGISTRY)}, or load a "
                     "custom one with hkpipe.schedules.from_text.")
  return _REGISTRY[name]


def _positive_int(what: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{what} must be a positive int, got {value!r}.")
  return value


def get(name: str, *, num_ranks: int | None = None, num_microbatches: int,
        virtual_stages: int | None = None, num_stages: int | None = None) -> Schedule:
  """Builds a registered schedule.

  Args:
    name: one of :func:`names`.
    num_ranks: the number of pipeline ranks ``p`` (devices).
    num_microbatches: ``m``.
    virtual_stages: ``v``, model stages per rank; the model is cut into ``p * v`` stages
      (``Schedule.num_stages``). Default: 1, or 2 for ``zbv`` / ``dualpipev``;
      ``interleaved_1f1b`` requires it (>= 2).
    num_stages: deprecated spelling of ``num_ranks`` (it meant ranks here); warns
      ``FutureWarning``; giving both is a ``ConfigError``.

  Returns:
    The compute-only :class:`Schedule` (call :func:`lower` for the SEND/RECV program).

  Raises:
    ValueError: unknown name, non-positive sizes, or a ``virtual_stages`` the schedule cannot use;
      the message names the constraint and the fix.
  """
  num_ranks = deprecation.renamed(
      "num_stages", num_stages, "num_ranks", num_ranks, where="hkpipe.schedules.get",
      why="num_stages names the p * v model stages (Schedule.num_stages), not the ranks.")
  if num_ranks is None:
    raise TypeError("hkpipe.schedules.get() needs num_ranks= (the number of pipeline ranks).")
  spec = _spec(name)
  p = _positive_int("num_ranks", num_ranks)
  m = _positive_int("num_microbatches", num_microbatches)
  if virtual_stages is None:
    if spec.default_v is None:
      raise ValueError(f"Schedule {name!r} needs virtual_stages >= 2 (stages per rank); pass "
                       "virtual_stages=2 or more.")
    virtual_stages = spec.default_v
  v = _positive_int("virtual_stages", virtual_stages)
  spec.check_v(name, p, v)
  return spec.build(p, m, v)
