"""What a training run records besides metrics and checkpoints, driven by the training loop.

- ``config.profile_steps = (first, last)``: a ``jax.profiler`` trace of train steps ``first`` to
  ``last`` (1-based, inclusive) in ``<workdir>/profile`` (open it with TensorBoard's profile
  plugin or Perfetto).
- ``config.pipeline.record_timeline`` (``mpmd``): the measured timeline of the run's last train
  step, from every process, on process 0's clock, in ``timeline.json`` (see ``_src/trace.py``).
- At the end, process 0 draws the pictures and writes the trace (``_src/report.py``).

:class:`RunExtras` holds the little state this needs (is the profiler running, the newest
timeline); the loop calls :meth:`RunExtras.before_step`, :meth:`RunExtras.after_step`,
:meth:`RunExtras.finish` and, when it fails, :meth:`RunExtras.abort`.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable, cast

import jax

from hkpipe import schedules
from hkpipe._src import config_checks
from hkpipe._src import report as report_lib
from hkpipe._src import trace as trace_lib

PROFILE_DIR = "profile"


class RunExtras:
  """Profiler window, timeline capture and end-of-run pictures of one ``train`` call.

  Args:
    config: the run's config (``profile_steps``, ``pipeline.record_timeline``; validated).
    workdir: the run's folder.
    pipe: the run's ``Pipeline`` (read through ``last_timeline``, ``last_timeline_origin``,
      ``layout``).
    say: prints a line on process 0.
  """

  def __init__(self, config: Any, workdir: pathlib.Path, pipe: Any, say: Callable[[str], None]):
    self.work = workdir
    self.pipe = pipe
    self.say = say
    self.window = config_checks.profile_window(config)
    self.record = bool(config.pipeline.get("record_timeline"))
    self.process, self.count = jax.process_index(), jax.process_count()
    self._profiling = False
    self._timeline: tuple[int, tuple, float | None] | None = None
    self._client, self._run, self._offset = None, 0, 0.0
    if self.record and self.count > 1:  # every process, before the first step
      self._client = trace_lib.kv_client()
      self._run = trace_lib.run_id(self._client, self.process)
      self._offset = trace_lib.clock_offset(self._client, self.process, self.count,
                                            self._run)

  def before_step(self, step: int) -> None:
    """Called before train step ``step + 1`` runs (``step`` = steps done)."""
    if self.window is not None and step + 1 == self.window[0]:
      jax.profiler.start_trace(str(self.work / PROFILE_DIR))
      self._profiling = True

  def after_step(self, done: int, metrics: Any) -> None:
    """Called after train step ``done`` was issued (``metrics`` are its outputs)."""
    if self.record:
      self._timeline = (done, self.pipe.last_timeline, self.pipe.last_timeline_origin)
    if self._profiling and done == cast(tuple[int, int], self.window)[1]:  # set when profiling
      jax.block_until_ready(metrics)
      self._stop_profile()

  def _stop_profile(self) -> None:
    assert self.window is not None  # only called while profiling, which needs a window
    jax.profiler.stop_trace()
    self._profiling = False
    self.say(f"Profile of steps {self.window[0]}-{self.window[1]} in {self.work / PROFILE_DIR}")

  def abort(self) -> None:
    """The run failed: stop the profiler (its trace so far is written)."""
    if self._profiling:
      self._stop_profile()

  def finish(self) -> None:
    """Every process: gathers the timeline; process 0 writes it and the pictures."""
    self.abort()
    timeline = None
    if self._timeline is not None and self._timeline[1]:
      step, records, origin = self._timeline
      mine = trace_lib.local_timeline(self.process, records, origin, self._offset)
      parts = ((mine,) if self._client is None
               else trace_lib.gather(self._client, mine, self.count, self._run))
      if parts is not None:
        timeline = trace_lib.StepTimeline(step, self.pipe.layout.schedule, parts)
    if self.process != 0:
      return
    if timeline is not None:
      trace_lib.write_timeline(self.work / trace_lib.TIMELINE_FILE, timeline)
    try:  # the run's work is saved: a picture that fails is reported, not raised
      written = report_lib.write_report(self.work)
    except Exception as e:  # pylint: disable=broad-except
      self.say(f"hkpipe: warning: could not write the pictures and traces: {e!r}; retry with "
               f"python -m hkpipe.report {self.work}")
      return
    if timeline is not None:
      measured = report_lib.bubble_fraction(timeline.records(), timeline.schedule.num_ranks)
      self.say(f"Timeline of step {timeline.step}: measured bubble {measured:.1%}, simulated "
               f"{schedules.simulate(timeline.schedule).bubble_ratio:.1%} "
               f"(unit costs); see {self.work / report_lib.TIMELINE_SVG} and "
               f"{self.work / trace_lib.TRACE_FILE} (chrome://tracing, ui.perfetto.dev)")
    if written:
      self.say("Wrote " + ", ".join(p.name for p in written))
