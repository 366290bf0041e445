"""Hang watchdog: where each process is in the run, and a clear exit when it stops moving.

A multi-process run hangs, instead of failing, when a peer stays alive but stops sending (a
stopped process, a stuck collective, a bug that skips a call on one process): the others wait on
transfers or collectives forever, and the distributed heartbeat does not see it while the peer's
runtime still answers. Two pieces catch it:

- :class:`Progress`, the position record: the training loop, the backend's driver and the thread
  that waits on incoming transfers write plain attributes (one assignment per driver op, one per
  received message), so it costs nothing measurable. It says which step and phase the process is
  in, the last instruction it issued and what it waits for, from which rank and process.
- :class:`Watchdog`, a daemon thread that samples the position about once a second. When it has
  not changed for longer than the deadline (:func:`deadline_s`), it prints one block naming the
  step, the instruction and the awaited rank/process to stderr and ends the process with
  :data:`EXIT_STATUS` through ``os._exit`` (a thread stuck in a collective cannot be unwound).
  Every live process of the run does the same; the launcher then stops the rest.

Deadlines (:class:`WatchdogConfig`, ``config.watchdog`` of the trainer): a train step gets
``timeout_s`` or, by default, ``max(floor_s, multiple x median step time)``, and none before a
step has been measured (the first step compiles); evaluation, checkpoint saves and the final
gather get ``max(floor_s, timeout_s, multiple x their longest earlier duration)``, and
``multiple x max(floor_s, timeout_s)`` the first time (they may compile).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import threading
import time
from typing import Any, Callable, TextIO

from hkpipe._src.errors import ConfigError

EXIT_STATUS = 124
"""Exit status of a process ended by the watchdog (as coreutils ``timeout``)."""

# Phases of a training run (``Progress.phase``).
SETUP = "setup"                    # init, restore, first compiles: no deadline
TRAIN = "train step"
EVAL = "eval"
CHECKPOINT = "checkpoint save"
FINISH = "final save and parameter gather"
SAMPLE = "end-of-run sample"         # decoding on the stages (across processes: all of them)

_KEEP = 32                         # durations remembered per phase


@dataclasses.dataclass(frozen=True)
class WatchdogConfig:
  """How long a process may make no progress before the watchdog ends it.

  Attributes:
    timeout_s: seconds a train step may go without progress; None: automatic,
      ``max(floor_s, multiple x median step time)``; 0: the watchdog is off.
    multiple: the automatic deadline in median step times (and of other phases in their
      longest earlier duration).
    floor_s: the least deadline, whatever the step time.
  """

  timeout_s: float | None = None
  multiple: float = 10.0
  floor_s: float = 120.0

  def __post_init__(self):
    hints = {"timeout_s": " (0 turns the watchdog off, None picks it from the step time)",
             "multiple": "", "floor_s": ""}
    for name, hint in hints.items():
      value = getattr(self, name)
      if value is None and name == "timeout_s":
        continue
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config.watchdog.{name}={value!r} must be a number{hint}.")
      if value < 0:
        raise ConfigError(f"config.watchdog.{name}={value} is negative; use a value >= 0{hint}.")
    if self.multiple < 1:
      raise ConfigError(f"config.watchdog.multiple={self.multiple} must be >= 1 (the deadline "
                        "is this many median step times); the default is 10.")

  @classmethod
  def from_config(cls, fields: Any) -> "WatchdogConfig":
    """From a ``config.watchdog`` ConfigDict or mapping (missing fields: defaults)."""
    if fields is None:
      return cls()
    given = {k: fields[k] for k in ("timeout_s", "multiple", "floor_s") if k in fields}
    unknown = set(fields) - set(given)
    if unknown:
      raise ConfigError(f"config.watchdog has unknown fields {sorted(unknown)}; the fields are "
                        "timeout_s, multiple and floor_s.")
    return cls(**given)

  def enabled(self, process_count: int) -> bool:
    """Off with ``timeout_s=0``; automatic deadlines only across processes (see module doc)."""
    if self.timeout_s == 0:
      return False
    return self.timeout_s is not None or process_count > 1


class Progress:
  """Where this process is in the run: written by the driver, read by the :class:`Watchdog`.

  Hot paths assign attributes only: ``progress.op = op`` per driver op (any object whose ``str``
  describes it), and the transfer thread sets ``awaiting`` and counts ``received``.

  Attributes:
    process_index, process_count: this process and how many the run has.
    step: the step being run, numbered as the log prints it (1 is the first step).
    phase: one of the module's phases (``SETUP``, ``TRAIN``, ``EVAL``...).
    op: the last instruction the driver issued in this phase (None: one compiled program).
    awaiting: ``(step, receiver, message)`` the process waits for (texts, e.g. ``"rank 0
      (process 0)"`` and ``"cotangents of microbatch 3 for stage 0 from rank 1 (process 1)"``;
      the step in which it was requested), or None.
    received: messages received so far (moves while transfers arrive).
    pending: steps issued since the loop last waited for one to finish.
    confirmed: how many times the loop waited for its steps (moves at every log line).
  """

  def __init__(self, process_index: int = 0, process_count: int = 1):
    self.process_index = process_index
    self.process_count = process_count
    self.step = 0
    self.phase = SETUP
    self.op: Any = None
    self.awaiting: tuple[int, str, str] | None = None
    self.received = 0
    self.pending = 0
    self.confirmed = 0
    self._durations: dict[str, list[float]] = {}
    self._started = time.monotonic()

  # -- the training loop ---------------------------------------------------------------------

  def begin_step(self, step: int) -> None:
    """The loop issues step ``step`` (1-based)."""
    self.phase, self.step, self.op = TRAIN, step, None
    self.pending += 1

  def steps_finished(self, step_time_s: float | None) -> None:
    """The loop waited for its issued steps; ``step_time_s``: their measured time per step
    (None for a step that compiled)."""
    self.pending = 0
    self.confirmed += 1
    if step_time_s is not None:
      self._remember(TRAIN, step_time_s)

  def enter(self, phase: str) -> None:
    """Starts a phase other than train steps (``end`` records its duration)."""
    self.phase, self.op = phase, None
    self._started = time.monotonic()

  def end(self) -> None:
    """Ends the current phase, recording how long it took."""
    self._remember(self.phase, time.monotonic() - self._started)

  def durations(self, phase: str) -> list[float]:
    """The recent measured durations of ``phase`` (per step for ``TRAIN``)."""
    return list(self._durations.get(phase, ()))

  def _remember(self, phase: str, seconds: float) -> None:
    kept = self._durations.setdefault(phase, [])
    kept.append(float(seconds))
    del kept[:-_KEEP]

  # -- the watchdog --------------------------------------------------------------------------

  def snapshot(self) -> tuple:
    """What changes whenever the process makes progress."""
    return (self.step, self.phase, self.op, self.awaiting, self.received, self.confirmed)


def deadline_s(progress: Progress, config: WatchdogConfig) -> tuple[float | None, str]:
  """The current deadline in seconds (None: none) and how it was computed."""
  phase = progress.phase
  if phase == SETUP:
    return None, "no deadline while setting up and compiling"
  if phase == TRAIN:
    steps = progress.durations(TRAIN)
    if config.timeout_s is not None:
      if not progress.confirmed:
        return None, "no deadline before the first step (it compiles)"
      base, why = float(config.timeout_s), f"timeout_s={config.timeout_s:g}"
    else:
      if not steps:
        return None, "no deadline before a step time is measured (the first step compiles)"
      median = statistics.median(steps)
      base = max(config.floor_s, config.multiple * median)
      why = (f"max(floor_s={config.floor_s:g}, {config.multiple:g} x median step time "
             f"{median:.3g} s)")
    waiting = max(1, progress.pending)
    if waiting > 1:
      return base * waiting, f"{why} x {waiting} steps waited for at once"
    return base, why
  least = max(config.floor_s, config.timeout_s or 0.0)
  earlier = progress.durations(phase)
  if not earlier:
    return config.multiple * least, (f"first {phase}: {config.multiple:g} x "
                                     f"max(floor_s, timeout_s) = {config.multiple * least:g} s")
  longest = max(earlier)
  return (max(least, config.multiple * longest),
          f"max({least:g} s, {config.multiple:g} x longest earlier {phase} {longest:.3g} s)")


def position(progress: Progress) -> list[str]:
  """Lines naming the step, the awaited message and its sender, and the last instruction."""
  where = f"step {progress.step}" if progress.phase == TRAIN else (
      f"{progress.phase} after step {progress.step}")
  lines = []
  if progress.awaiting is not None:
    step, receiver, message = progress.awaiting
    at = f"step {step}" if progress.phase == TRAIN else where
    lines.append(f"{at}, {receiver}: waiting for {message}")
  if progress.op is not None:
    lines.append(f"{where}: last instruction issued: {progress.op}")
  elif not lines:
    compiled = "compiled " if progress.phase in (TRAIN, EVAL) else ""
    peers = (f" (collectives with processes {list(range(progress.process_count))})"
             if progress.process_count > 1 else "")
    lines.append(f"{where}: in the {compiled}{progress.phase}{peers}")
  return lines


def report(progress: Progress, idle_s: float, deadline: float, why: str) -> str:
  """The block the watchdog prints before ending the process."""
  me = (f"process {progress.process_index} of {progress.process_count}"
        if progress.process_count > 1 else "this process")
  head = (f"hkpipe watchdog: {me} made no progress for {idle_s:.1f} s (deadline {deadline:.1f} "
          f"s: {why}); exiting with status {EXIT_STATUS}.")
  tail = ("  Another process probably stopped or is stuck (see its own watchdog block, if any). "
          "config.watchdog sets the deadline (docs/launch.md, failures).")
  return "\n".join([head, *[f"  {line}" for line in position(progress)], tail])


def _die(text: str, out: TextIO) -> None:
  print(text, file=out, flush=True)
  sys.stdout.flush()
  os._exit(EXIT_STATUS)


class Watchdog:
  """A daemon thread that ends the process when ``progress`` stops changing for a deadline.

  Args:
    progress: the position record the driver updates.
    config: the deadlines.
    on_hang: called with the report when the deadline passes (default: print it to ``out`` and
      ``os._exit(EXIT_STATUS)``); tests pass their own.
    out: where the default ``on_hang`` prints (stderr).
    poll_s: how often the position is sampled (default: a quarter of the least deadline, at
      most 1 s).
    clock: monotonic seconds (tests pass their own).
  """

  def __init__(self, progress: Progress, config: WatchdogConfig, *,
               on_hang: Callable[[str], None] | None = None, out: TextIO | None = None,
               poll_s: float | None = None, clock: Callable[[], float] = time.monotonic):
    self.progress = progress
    self.config = config
    self._on_hang = on_hang or (lambda text: _die(text, out or sys.stderr))
    least = min([x for x in (config.floor_s, config.timeout_s) if x] or [1.0])
    self.poll_s = poll_s if poll_s is not None else min(1.0, max(0.05, least / 4))
    self._clock = clock
    self._last: tuple | None = None
    self._since = clock()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def check(self) -> str | None:
    """Samples the position once; returns the report if the deadline has passed."""
    now = self._clock()
    snap = self.progress.snapshot()
    if snap != self._last:
      self._last, self._since = snap, now
      return None
    deadline, why = deadline_s(self.progress, self.config)
    idle = now - self._since
    if deadline is None or idle <= deadline:
      return None
    return report(self.progress, idle, deadline, why)

  def start(self) -> "Watchdog":
    """Starts the thread (returns self)."""
    self._thread = threading.Thread(target=self._loop, name="hkpipe-watchdog", daemon=True)
    self._thread.start()
    return self

  def stop(self) -> None:
    """Stops the thread (the watchdog never fires afterwards)."""
    self._stop.set()
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join(timeout=5)

  def _loop(self) -> None:
    while not self._stop.wait(self.poll_s):
      text = self.check()
      if text is not None and not self._stop.is_set():
        self._on_hang(text)
        return
