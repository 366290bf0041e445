"""Measured step timelines across processes: clock alignment, ``timeline.json`` and Chrome/Perfetto
trace JSON.

With ``record_timeline`` the MPMD backend times every instruction of a step on the process that
runs it (``Pipeline.last_timeline``: records in seconds from ``Pipeline.last_timeline_origin``, a
``time.time()`` of that process). A multi-process run aligns the processes' clocks once at start
(:func:`clock_offset`: 0 on process 0's host, which shares its clock; on other hosts, barriers
after which every process compares its clock with process 0's) and gathers the processes'
timelines on process 0 (:func:`gather`), both through ``jax.distributed``'s key-value store.

``timeline.json`` holds the step, the schedule (``hkpipe.schedules`` text form) and one entry per
process (:class:`ProcessTimeline`); :func:`chrome_trace` turns it into the Trace Event Format that
``chrome://tracing`` and https://ui.perfetto.dev open: one process track per JAX process, one
thread track per pipeline rank, one complete event per instruction (with its stage and
microbatch), and a flow arrow per transfer between ranks (activation forward, gradient backward).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import socket
import time
from typing import Any, Callable, Iterable

from hkpipe import schedules

TIMELINE_FILE = "timeline.json"
TRACE_FILE = "trace.json"
_KV_PREFIX = "hkpipe/timeline"
_TIMEOUT_MS = 120_000


@dataclasses.dataclass(frozen=True)
class ProcessTimeline:
  """One process's measured step.

  Attributes:
    process: the JAX process index.
    host: its host name.
    records: its ranks' ``schedules.Record`` s, in seconds from ``origin``.
    origin: ``time.time()`` on this process at the records' time 0.
    clock_offset: this process's clock minus process 0's, in seconds (0 in one process).
  """

  process: int
  host: str
  records: tuple[schedules.Record, ...]
  origin: float
  clock_offset: float = 0.0

  def to_json(self) -> dict:
    return {"process": self.process, "host": self.host, "origin": self.origin,
            "clock_offset": self.clock_offset, "records": [list(r) for r in self.records]}

  @classmethod
  def from_json(cls, d: dict) -> "ProcessTimeline":
    return cls(int(d["process"]), str(d["host"]), tuple(schedules.Record(*r) for r in
                                                        d["records"]),
               float(d["origin"]), float(d["clock_offset"]))

  def aligned(self) -> list[schedules.Record]:
    """The records on process 0's clock (seconds since the epoch)."""
    shift = self.origin - self.clock_offset
    return [r._replace(start=r.start + shift, end=r.end + shift) for r in self.records]


@dataclasses.dataclass(frozen=True)
class StepTimeline:
  """What ``timeline.json`` holds: the measured step ``step`` of ``schedule`` on every process."""

  step: int
  schedule: schedules.Schedule
  processes: tuple[ProcessTimeline, ...]

  def records(self) -> list[schedules.Record]:
    """Every process's records on one clock, in seconds from the earliest start."""
    recs = [r for p in self.processes for r in p.aligned()]
    t0 = min((r.start for r in recs), default=0.0)
    return sorted((r._replace(start=r.start - t0, end=r.end - t0) for r in recs),
                  key=lambda r: (r.start, r.rank))

  def to_json(self) -> dict:
    return {"step": self.step, "schedule": schedules.to_text(self.schedule),
            "processes": [p.to_json() for p in self.processes]}

  @classmethod
  def from_json(cls, d: dict) -> "StepTimeline":
    return cls(int(d["step"]), schedules.from_text(d["schedule"]),
               tuple(ProcessTimeline.from_json(p) for p in d["processes"]))


def write_timeline(path: pathlib.Path, timeline: StepTimeline) -> None:
  path.write_text(json.dumps(timeline.to_json()))


def read_timeline(path: pathlib.Path) -> StepTimeline:
  """The :class:`StepTimeline` a run wrote to ``path`` (``timeline.json``)."""
  return StepTimeline.from_json(json.loads(path.read_text()))


def local_timeline(process: int, records: Iterable[Any], origin: float | None,
                   clock_offset: float) -> ProcessTimeline:
  """This process's :class:`ProcessTimeline` from ``Pipeline.last_timeline`` and its origin."""
  return ProcessTimeline(process, socket.gethostname(), tuple(schedules.Record(*r)
                                                              for r in records),
                         float(origin or 0.0), clock_offset)


# -- across processes (jax.distributed's key-value store) -----------------------------------------


def kv_client() -> Any:
  """The ``jax.distributed`` key-value client (None in a single-process run)."""
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return getattr(jax_distributed.global_state, "client", None)


def run_id(client: Any, process: int) -> int:
  """A number equal on every process for the n-th run that gathers timelines (each process
  counts its own runs; all processes start the same runs)."""
  return int(client.key_value_increment(f"{_KV_PREFIX}/runs/{process}", 1))


def clock_offset(client: Any, process: int, process_count: int, run: int, *, rounds: int = 5,
                 host: str | None = None, clock: Callable[[], float] = time.time) -> float:
  """This process's clock minus process 0's, in seconds (every process calls it).

  Processes on process 0's host share its clock: 0. The others and process 0 meet at ``rounds``
  barriers; after each, process 0 publishes its clock and the others take the difference with
  theirs; the median is the offset (precise to the skew with which a barrier releases the
  processes: about a millisecond between idle hosts). ``host`` (default: this host's name) and
  ``clock`` (default ``time.time``) are for tests.
  """
  client.key_value_set(f"{_KV_PREFIX}/host/{run}/{process}", host or socket.gethostname())
  hosts = [client.blocking_key_value_get(f"{_KV_PREFIX}/host/{run}/{p}", _TIMEOUT_MS)
           for p in range(process_count)]
  remote = [p for p in range(process_count) if hosts[p] != hosts[0]]
  if process != 0 and process not in remote or not remote:
    return 0.0
  diffs = []
  for i in range(rounds):
    client.wait_at_barrier(f"{_KV_PREFIX}/clock/{run}/{i}", _TIMEOUT_MS, [0] + remote)
    now = clock()
    key = f"{_KV_PREFIX}/clock/{run}/{i}"
    if process == 0:
      client.key_value_set(key, repr(now))
    else:
      diffs.append(now - float(client.blocking_key_value_get(key, _TIMEOUT_MS)))
  return float(sorted(diffs)[len(diffs) // 2]) if diffs else 0.0


def gather(client: Any, mine: ProcessTimeline, process_count: int,
           run: int) -> tuple[ProcessTimeline, ...] | None:
  """Every process's timeline on process 0 (None elsewhere); each process publishes its own."""
  client.key_value_set(f"{_KV_PREFIX}/step/{run}/{mine.process}", json.dumps(mine.to_json()))
  if mine.process != 0:
    return None
  return (mine,) + tuple(ProcessTimeline.from_json(json.loads(client.blocking_key_value_get(
      f"{_KV_PREFIX}/step/{run}/{p}", _TIMEOUT_MS))) for p in range(1, process_count))


# -- Chrome / Perfetto trace ----------------------------------------------------------------------


def transfers(schedule: schedules.Schedule) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
  """Every cross-rank transfer of one step: ``(what, (stage, mb) of the producer, (stage, mb) of
  the consumer)``, ``what`` = ``"activation"`` (forward of stage ``s`` to ``s + 1``) or
  ``"gradient"`` (backward of stage ``s`` to ``s - 1``); from the lowered schedule's SENDs."""
  lowered = schedules.lower(schedule)
  out = []
  for row in lowered.actions:
    for a in row:
      if a.kind == schedules.Kind.SEND_F:
        out.append(("activation", (a.stage, a.mb), (a.stage + 1, a.mb)))
      elif a.kind == schedules.Kind.SEND_B:
        out.append(("gradient", (a.stage, a.mb), (a.stage - 1, a.mb)))
  return out


def _us(seconds: float) -> float:
  return round(seconds * 1e6, 3)


def chrome_trace(timeline: StepTimeline) -> dict:
  """The Trace Event Format document of ``timeline`` (see the module docstring).

  Events: ``M`` metadata naming each process (``process <i> (<host>)``) and rank thread; one ``X``
  event per measured instruction (``name`` like ``F3 (stage 1)``, ``args`` with rank, stage,
  microbatch, kind); per transfer an ``s``/``f`` flow pair from the producing instruction to the consuming one.
  Times are microseconds from the step's earliest start on process 0's clock.
  """
  events: list[dict] = []
  owner: dict[int, int] = {}
  for p in timeline.processes:
    events.append({"ph": "M", "name": "process_name", "pid": p.process,
                   "args": {"name": f"process {p.process} ({p.host})"}})
    for rank in sorted({r.rank for r in p.records}):
      owner[rank] = p.process
      events.append({"ph": "M", "name": "thread_name", "pid": p.process, "tid": rank,
                     "args": {"name": f"rank {rank}"}})
      events.append({"ph": "M", "name": "thread_sort_index", "pid": p.process, "tid": rank,
                     "args": {"sort_index": rank}})
  records = timeline.records()
  by_key: dict[tuple[str, int, int], schedules.Record] = {}
  for r in records:
    events.append({"ph": "X", "name": f"{r.kind}{r.mb} (stage {r.stage})", "cat": "compute",
                   "pid": owner[r.rank], "tid": r.rank, "ts": _us(r.start),
                   "dur": _us(r.end - r.start),
                   "args": {"rank": r.rank, "stage": r.stage, "microbatch": r.mb,
                            "kind": r.kind, "step": timeline.step}})
    direction = "F" if r.kind == "F" else ("B" if r.kind in ("B", "I") else None)
    if direction is not None:
      by_key[(direction, r.stage, r.mb)] = r
  for i, (what, src, dst) in enumerate(transfers(timeline.schedule)):
    direction = "F" if what == "activation" else "B"
    a, b = by_key.get((direction, *src)), by_key.get((direction, *dst))
    if a is None or b is None:  # a partial timeline (a process's records missing)
      continue
    common = {"name": what, "cat": "transfer", "id": i}
    events.append({**common, "ph": "s", "pid": owner[a.rank], "tid": a.rank,
                   "ts": _us(a.end - min(1e-6, (a.end - a.start) / 2))})
    events.append({**common, "ph": "f", "bp": "e", "pid": owner[b.rank], "tid": b.rank,
                   "ts": _us(b.start)})
  return {"traceEvents": events, "displayTimeUnit": "ms",
          "otherData": {"step": timeline.step, "schedule": timeline.schedule.name}}


def write_chrome_trace(path: pathlib.Path, timeline: StepTimeline) -> None:
  path.write_text(json.dumps(chrome_trace(timeline)))

