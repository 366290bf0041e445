"""What a training run prints and writes: the layout description, the per-step records of
``metrics.jsonl`` and the console lines.

Pure functions of their inputs plus :class:`MetricsWriter` (the one that touches the file); the
training loop (``trainer``) decides when to call them.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping, TextIO

from hkpipe._src import tensorboard as tb_lib


def describe_layout(layout: Any) -> str:
  """Text for the console: the stages with their layers and devices, and the schedule's simulated
  timeline (unit costs, backward = 2 x forward) with its bubble and peak stashed activations."""
  from hkpipe import schedules  # pylint: disable=g-import-not-at-top
  sched = layout.schedule
  lines = [f"schedule {sched.name}: {sched.num_ranks} ranks x {sched.stages_per_rank} stage(s)/rank"
           f", {sched.num_microbatches} microbatches, dp={layout.dp}"
           + "".join(f", {axis}={getattr(layout, axis, 1)}" for axis in ("fsdp", "tp")
                     if getattr(layout, axis, 1) > 1)]
  for spec in layout.stages:
    devs = ",".join(str(d.id) for d in layout.stage_devices(spec.index))
    lines.append(f"  stage {spec.index} (rank {sched.stage_to_rank[spec.index]}, devices {devs}): "
                 f"{', '.join(spec.layer_names)}")
  sim = schedules.simulate(sched)
  lines.append(schedules.ascii_grid(sim.records()).rstrip())
  lines.append(f"simulated bubble {sim.bubble_ratio:.1%}, peak stashed activations per rank "
               f"{list(sim.peak_activations)}")
  return "\n".join(lines)


def train_record(*, step: int, loss: float, grad_norm: float, lr: float, step_time: float,
                 tokens_per_step: int, flops_per_token: float, peak_tflops: float | None,
                 skipped_steps: int) -> dict:
  """One train record of ``metrics.jsonl`` (``mfu`` only with ``peak_tflops``)."""
  record = {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr,
            "step_time_s": step_time, "tokens_per_s": tokens_per_step / step_time,
            "model_tflops": flops_per_token * tokens_per_step / step_time / 1e12,
            "skipped_steps": skipped_steps}
  if peak_tflops:
    record["mfu"] = record["model_tflops"] / peak_tflops
  return record


def fmt_eta(seconds: float) -> str:
  """``H:MM:SS`` (negative times as 0)."""
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_line(record: Mapping[str, Any], num_steps: int, compiled: bool) -> str:
  """The console line of a :func:`train_record` (``compiled``: the step included compiling)."""
  done, skipped = record["step"], record["skipped_steps"]
  eta = record["step_time_s"] * (num_steps - done)
  return (f"step {done:>6}/{num_steps} | loss {record['loss']:.4f} | gnorm "
          f"{record['grad_norm']:.3f} | lr {record['lr']:.2e} | {record['tokens_per_s']:,.0f} "
          f"tok/s | {1000 * record['step_time_s']:.1f} ms/step"
          f"{' (incl. compile)' if compiled else ''}"
          f"{f' | skipped {skipped}' if skipped else ''} | ETA {fmt_eta(eta)}")


def eval_line(step: int, num_steps: int, val_loss: float) -> str:
  """The console line of an eval record."""
  return f"step {step:>6}/{num_steps} | val loss {val_loss:.4f}"


def _jsonable(metrics: Mapping[str, Any]) -> dict:
  return {k: (float(v) if not isinstance(v, (int, str)) else v) for k, v in metrics.items()}


class MetricsWriter:
  """Appends one JSON object per line to ``metrics.jsonl``; on resume, drops records past the
  checkpoint so the file describes exactly one run.

  With ``tensorboard`` (a folder), every record's numeric fields also go to a new TensorBoard
  event file there (see ``hkpipe._src.tensorboard``), which starts with a START marker at
  ``resume_step + 1``: TensorBoard hides what earlier files logged from there on, as the JSONL
  file drops it.
  """

  def __init__(self, path: pathlib.Path, resume_step: int,
               tensorboard: pathlib.Path | None = None):
    self.path = path
    if path.exists():
      kept = [line for line in path.read_text().splitlines()
              if line.strip() and json.loads(line).get("step", 0) <= resume_step]
      path.write_text("".join(line + "\n" for line in kept))
    self._file: TextIO = open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
    self._events = (None if tensorboard is None
                    else tb_lib.EventWriter(tensorboard, start_step=resume_step + 1))

  def write(self, record: Mapping[str, Any]) -> None:
    self._file.write(json.dumps(_jsonable(record)) + "\n")
    self._file.flush()
    if self._events is not None:
      self._events.write(record)

  def text(self, tag: str, text: str, step: int) -> None:
    """Writes ``text`` to TensorBoard's text tab (JSONL has no text: samples go to
    ``samples.txt``)."""
    if self._events is not None:
      self._events.text(tag, text, step)

  def close(self) -> None:
    self._file.close()
    if self._events is not None:
      self._events.close()


class NoWriter:
  """The metrics writer of processes other than 0 (only process 0 writes ``metrics.jsonl``)."""

  def write(self, record: Mapping[str, Any]) -> None:
    del record

  def text(self, tag: str, text: str, step: int) -> None:
    del tag, text, step

  def close(self) -> None:
    pass
