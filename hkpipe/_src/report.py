"""Pictures and trace files of a run, made from what it wrote in its workdir.

- ``loss.png``: train and validation loss against step and against tokens seen (from
  ``metrics.jsonl``; tokens per step from ``config.json``: ``batch_size * model.seq_len``).
- With a recorded timeline (``timeline.json``, written with ``config.pipeline.record_timeline``):
  ``timeline.svg``, the measured per-rank timeline of one real step under the schedule simulated
  with unit costs and with the step's measured per-stage costs, each titled with its bubble
  fraction; and ``trace.json``, the Chrome/Perfetto trace of that step (see ``_src/trace.py``).

:func:`write_report` makes every file it has data for; the training loop calls it at the end of a
run and ``python -m hkpipe.report WORKDIR`` calls it on any workdir. The other functions are pure.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from hkpipe import schedules
from hkpipe._src import trace as trace_lib

LOSS_FILE = "loss.png"
TIMELINE_SVG = "timeline.svg"
LOSS_PNG_SIZE = (1000, 400)  # pixels (width, height)


def read_metrics(path: pathlib.Path) -> list[dict]:
  """The records of a ``metrics.jsonl`` file."""
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tokens_per_step(config: Mapping[str, Any]) -> int:
  """Tokens of one global batch, from a run's ``config.json`` contents."""
  return int(config["batch_size"]) * int(config["model"]["seq_len"])


def loss_series(records: Sequence[Mapping[str, Any]], tokens_per_step_: int) -> dict[str, list]:
  """The curves of ``loss.png``: ``train_step``, ``train_tokens``, ``train_loss`` from the train
  records and ``val_step``, ``val_tokens``, ``val_loss`` from the eval records, in file order
  (tokens = step x ``tokens_per_step_``)."""
  out: dict[str, list] = {f"{split}_{what}": [] for split in ("train", "val")
                          for what in ("step", "tokens", "loss")}
  for r in records:
    for split, key in (("train", "loss"), ("val", "val_loss")):
      if key in r:
        out[f"{split}_step"].append(int(r["step"]))
        out[f"{split}_tokens"].append(int(r["step"]) * tokens_per_step_)
        out[f"{split}_loss"].append(float(r[key]))
  return out


def plot_losses(series: Mapping[str, Sequence[float]], path: pathlib.Path, *,
                title: str = "") -> None:
  """Draws :func:`loss_series` as a PNG of :data:`LOSS_PNG_SIZE` pixels: loss against step
  (left) and against tokens (right)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top  (no pyplot state)
  dpi = 100
  fig = Figure(figsize=(LOSS_PNG_SIZE[0] / dpi, LOSS_PNG_SIZE[1] / dpi), dpi=dpi)
  for ax, x in zip(fig.subplots(1, 2), ("step", "tokens")):
    ax.plot(series[f"train_{x}"], series["train_loss"], label="train", lw=1.2)
    if series["val_loss"]:
      ax.plot(series[f"val_{x}"], series["val_loss"], "o-", label="val", ms=4)
    ax.set_xlabel(x)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)


def bubble_fraction(records: Sequence[schedules.Record], num_ranks: int) -> float:
  """``1 - busy / (num_ranks * makespan)`` of a measured timeline, as ``schedules.simulate``
  defines it for a simulated one (makespan from the earliest start to the latest end)."""
  if not records:
    raise ValueError("An empty timeline has no bubble fraction.")
  makespan = max(r.end for r in records) - min(r.start for r in records)
  busy = sum(r.end - r.start for r in records)
  return 1.0 - busy / (num_ranks * makespan)


def measured_costs(records: Sequence[schedules.Record],
                   schedule: schedules.Schedule) -> schedules.Costs | None:
  """Per-stage mean durations of each kind of action the schedule runs, as simulator costs; None
  when the timeline lacks a (kind, stage) the schedule has (a partial timeline)."""
  kinds = {a.kind.value for row in schedule.actions for a in row if a.kind.is_compute}
  means: dict[str, list[float]] = {}
  for kind in kinds:
    per_stage = [[r.end - r.start for r in records if r.kind == kind and r.stage == s]
                 for s in range(schedule.num_stages)]
    if not all(per_stage):
      return None
    means[kind] = [float(np.mean(d)) for d in per_stage]
  return schedules.Costs(forward=means.get("F", 1.0), input_grad=means.get("I", 1.0),
                         weight_grad=means.get("W", 1.0), backward=means.get("B"))


def timeline_panels(timeline: trace_lib.StepTimeline) -> list[tuple[str, list]]:
  """The panels of ``timeline.svg``: ``(title with bubble fraction, records)`` for the schedule
  simulated with unit costs (B = I + W = 2 F), simulated with the measured per-stage costs (left
  out for a partial timeline), and measured."""
  sched = timeline.schedule
  measured = timeline.records()
  unit = schedules.simulate(sched)
  costs = measured_costs(measured, sched)
  ms = 1e3
  panels = [(f"simulated, unit costs: bubble {unit.bubble_ratio:.1%}", unit.records())]
  if costs is not None:
    costed = schedules.simulate(sched, costs)
    panels.append((f"simulated with the measured per-stage costs: bubble "
                   f"{costed.bubble_ratio:.1%}, {costed.makespan * ms:.1f} ms",
                   [r._replace(start=r.start * ms, end=r.end * ms) for r in costed.records()]))
  return panels + [
      (f"measured, step {timeline.step}: bubble "
       f"{bubble_fraction(measured, sched.num_ranks):.1%}, "
       f"{(max(r.end for r in measured) - min(r.start for r in measured)) * ms:.1f} ms",
       [r._replace(start=r.start * ms, end=r.end * ms) for r in measured]),
  ]


def write_report(workdir: str | pathlib.Path) -> list[pathlib.Path]:
  """Writes ``loss.png`` (with train records in ``metrics.jsonl``) and, with ``timeline.json``,
  ``timeline.svg`` and ``trace.json`` into ``workdir``; returns the files written."""
  work = pathlib.Path(workdir)
  written = []
  metrics_path, config_path = work / "metrics.jsonl", work / "config.json"
  if metrics_path.exists() and config_path.exists():
    series = loss_series(read_metrics(metrics_path),
                         tokens_per_step(json.loads(config_path.read_text())))
    if series["train_loss"]:
      last = f"train {series['train_loss'][-1]:.3f}"
      if series["val_loss"]:
        last += f", val {series['val_loss'][-1]:.3f}"
      plot_losses(series, work / LOSS_FILE, title=f"{work.name}: loss ({last} at the end)")
      written.append(work / LOSS_FILE)
  if (work / trace_lib.TIMELINE_FILE).exists():
    timeline = trace_lib.read_timeline(work / trace_lib.TIMELINE_FILE)
    (work / TIMELINE_SVG).write_text(schedules.svg_timelines(timeline_panels(timeline)))
    trace_lib.write_chrome_trace(work / trace_lib.TRACE_FILE, timeline)
    written += [work / TIMELINE_SVG, work / trace_lib.TRACE_FILE]
  return written
