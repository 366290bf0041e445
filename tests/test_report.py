"""What a run writes beside metrics.jsonl: TensorBoard event files, pictures, traces, profiles.

One short MPMD training run (module fixture) produces every file; each test reads one kind back
with a reader that does not share code with the writer (TensorBoard's own event reader, a PNG
header parser, the schedule's instruction lists) and compares it with ``metrics.jsonl`` or the
schedule.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import hkpipe
from hkpipe import train as train_lib
from hkpipe import report
from hkpipe import schedules
from hkpipe._src import config_checks
from hkpipe._src import report as report_lib
from hkpipe._src import tensorboard as tb_lib
from hkpipe._src import trace as trace_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import shakespeare_gpt  # pylint: disable=wrong-import-position

RANKS, MICROBATCHES = 2, 2


def read_scalars(logdir: pathlib.Path) -> dict[str, dict[int, float]]:
  """``{tag: {step: value}}`` as TensorBoard's own reader sees ``logdir`` (it checks the
  TFRecord CRCs and applies START markers)."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"scalars": 0,
                                                                       "tensors": 0})
  acc.Reload()
  return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def read_texts(logdir: pathlib.Path) -> dict[str, dict[int, str]]:
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"tensors": 0})
  acc.Reload()
  return {tag: {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)}
          for tag in acc.Tags()["tensors"]}


def metrics(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
          if line.strip()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 4-step MPMD run (2 ranks, 1F1B over 2 microbatches) with the timeline recorded and step 3
  profiled."""
  base = tmp_path_factory.mktemp("report")
  hkpipe.data.prepare(base / "data")
  c = shakespeare_gpt.get_config("runlocal")
  c.data.dir = str(base / "data")
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 4, 1, 2, 0
  c.sample_tokens = 12
  c.backend = "mpmd"
  c.pipeline.ranks, c.pipeline.num_microbatches = RANKS, MICROBATCHES
  c.pipeline.record_timeline = True
  c.profile_steps = (3, 3)
  work = base / "work"
  summary = train_lib.train(c, work, log=io.StringIO())
  return work, summary


def test_tensorboard_scalars_equal_metrics_jsonl(run):
  work, summary = run
  scalars = read_scalars(work / "tensorboard")
  expected: dict[str, dict[int, float]] = {}
  for record in metrics(work):
    for key, value in record.items():
      if key != "step":
        expected.setdefault(tb_lib.TAGS.get(key, f"metrics/{key}"), {})[record["step"]] = value
  assert {"train/loss", "val/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s"} <= set(
      expected)
  assert set(scalars) == set(expected)
  for tag, by_step in expected.items():
    assert set(scalars[tag]) == set(by_step), tag
    for step, value in by_step.items():  # TensorBoard scalars are float32
      assert scalars[tag][step] == np.float32(value), (tag, step)
  texts = read_texts(work / "tensorboard")
  assert texts["sample"] == {4: f"```\n{summary['sample']}\n```"}


def test_tensorboard_restart_marker_hides_redone_steps(tmp_path):
  """A resumed run's event file starts with a START marker: TensorBoard drops the old file's
  steps from there on, as metrics.jsonl drops its records."""
  first = tb_lib.EventWriter(tmp_path)
  for step in range(1, 7):
    first.write({"step": step, "loss": float(step)})
  first.close()
  second = tb_lib.EventWriter(tmp_path, start_step=4)
  for step in range(4, 6):
    second.write({"step": step, "loss": 10.0 * step})
  second.close()
  assert len(os.listdir(tmp_path)) == 2
  assert read_scalars(tmp_path) == {"train/loss": {1: 1.0, 2: 2.0, 3: 3.0, 4: 40.0, 5: 50.0}}


def test_tensorboard_crc_matches_tensorboards_own():
  from tensorboard.compat.tensorflow_stub import pywrap_tensorflow  # pylint: disable=import-outside-toplevel
  assert tb_lib.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
  data = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
  assert tb_lib.masked_crc32c(data) == pywrap_tensorflow.masked_crc32c(data)


def test_tensorboard_off_writes_jsonl_only(tmp_path):
  from hkpipe._src import run_log  # pylint: disable=import-outside-toplevel
  assert train_lib.default_config().tensorboard is True
  writer = run_log.MetricsWriter(tmp_path / "metrics.jsonl", 0, None)  # config.tensorboard=False
  writer.write({"step": 1, "loss": 2.0})
  writer.text("sample", "abc", 1)
  writer.close()
  assert os.listdir(tmp_path) == ["metrics.jsonl"]
  assert metrics(tmp_path) == [{"step": 1, "loss": 2.0}]


# -- pictures -------------------------------------------------------------------------------------


def png_size(path: pathlib.Path) -> tuple[int, int]:
  """(width, height) from a PNG's IHDR chunk (read per the PNG spec, not by the writer)."""
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
  return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_loss_series_equals_metrics_jsonl(run):
  work, _ = run
  config = json.loads((work / "config.json").read_text())
  per_step = config["batch_size"] * config["model"]["seq_len"]
  series = report.loss_series(metrics(work), per_step)
  train = [r for r in metrics(work) if "loss" in r]
  val = [r for r in metrics(work) if "val_loss" in r]
  assert series["train_step"] == [1, 2, 3, 4] and series["val_step"] == [2, 4]
  assert series["train_loss"] == [r["loss"] for r in train]
  assert series["val_loss"] == [r["val_loss"] for r in val]
  assert series["train_tokens"] == [s * 8 * 16 for s in (1, 2, 3, 4)]  # runlocal: batch 8 x 16
  assert series["val_tokens"] == [s * 8 * 16 for s in (2, 4)]


def test_loss_png_has_its_size_and_both_curves(run):
  import matplotlib.image  # pylint: disable=import-outside-toplevel
  work, _ = run
  assert png_size(work / "loss.png") == report_lib.LOSS_PNG_SIZE == (1000, 400)
  pixels = matplotlib.image.imread(work / "loss.png")[..., :3]
  assert pixels.shape == (400, 1000, 3)
  for color in ("#1f77b4", "#ff7f0e"):  # matplotlib's first two line colours: train, val
    rgb = np.array([int(color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    assert (np.abs(pixels - rgb).max(-1) < 0.05).sum() > 50, color


def _x_events(trace: dict) -> list[dict]:
  return [e for e in trace["traceEvents"] if e["ph"] == "X"]


def test_trace_has_every_instruction_of_the_schedule_per_rank(run):
  work, _ = run
  trace = json.loads((work / "trace.json").read_text())
  sched = schedules.get("1f1b", num_ranks=RANKS, num_microbatches=MICROBATCHES)
  events = _x_events(trace)
  for rank in range(RANKS):
    mine = [e["args"] for e in events if e["tid"] == rank]
    assert len(mine) == len(sched.compute_actions(rank))
    assert sorted((a["stage"], a["kind"], a["microbatch"]) for a in mine) == sorted(
        (a.stage, a.kind.value, a.mb) for a in sched.compute_actions(rank))
  # 1F1B, one stage per rank: each microbatch crosses every rank boundary forward and back.
  starts = {e["id"]: e for e in trace["traceEvents"] if e["ph"] == "s"}
  ends = {e["id"]: e for e in trace["traceEvents"] if e["ph"] == "f"}
  assert len(starts) == len(ends) == 2 * (RANKS - 1) * MICROBATCHES
  for i, start in starts.items():
    assert start["tid"] != ends[i]["tid"]
    assert ends[i]["ts"] >= start["ts"]  # the consumer starts after the producer ends


def test_timeline_svg_titles_carry_the_bubble_fractions(run):
  work, _ = run
  events = _x_events(json.loads((work / "trace.json").read_text()))
  span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
  measured = 1 - sum(e["dur"] for e in events) / (RANKS * span)
  simulated = schedules.simulate(schedules.get("1f1b", num_ranks=RANKS,
                                               num_microbatches=MICROBATCHES)).bubble_ratio
  svg = (work / "timeline.svg").read_text()
  assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
  assert f"simulated, unit costs: bubble {simulated:.1%}" in svg
  assert f"measured, step 4: bubble {measured:.1%}" in svg
  mean = {(k, st): np.mean([e["dur"] / 1e6 for e in events if e["args"]["kind"] == k
                            and e["args"]["stage"] == st]) for k in "FB" for st in range(RANKS)}
  costed = schedules.simulate(
      schedules.get("1f1b", num_ranks=RANKS, num_microbatches=MICROBATCHES),
      schedules.Costs(forward=[mean["F", st] for st in range(RANKS)],
                      backward=[mean["B", st] for st in range(RANKS)]))
  assert (f"simulated with the measured per-stage costs: bubble {costed.bubble_ratio:.1%}, "
          f"{costed.makespan * 1e3:.1f} ms") in svg


def test_measured_costs_need_every_stage_and_kind():
  sched = schedules.get("1f1b", num_ranks=2, num_microbatches=2)
  rec = schedules.Record
  full = [rec(0, "F", 0, 0, 0, 1), rec(0, "F", 0, 1, 1, 4), rec(1, "F", 1, 0, 4, 5),
          rec(1, "B", 1, 0, 5, 7), rec(0, "B", 0, 0, 7, 8)]
  costs = report_lib.measured_costs(full, sched)
  assert (costs.forward, costs.backward) == ([2.0, 1.0], [1.0, 2.0])
  assert report_lib.measured_costs(full[:3], sched) is None  # no B measured


def test_profile_trace_of_the_chosen_steps(run):
  work, _ = run
  assert list((work / "profile").glob("plugins/profile/*/*.xplane.pb"))


def test_report_command_redraws_the_files(run, tmp_path, capsys):
  work, _ = run
  copy = tmp_path / "copy"
  copy.mkdir()
  for name in ("metrics.jsonl", "config.json", "timeline.json"):
    (copy / name).write_bytes((work / name).read_bytes())
  assert report.main([str(copy)]) == 0
  assert sorted(capsys.readouterr().out.split()) == sorted(
      str(copy / n) for n in ("loss.png", "timeline.svg", "trace.json"))
  assert (copy / "trace.json").read_text() == (work / "trace.json").read_text()
  assert report.main([str(tmp_path / "missing")]) == 2
  assert "has no metrics.jsonl" in capsys.readouterr().err


def test_processes_are_aligned_by_their_clock_offsets():
  """Two processes whose clocks differ by 5 s: their records land on process 0's clock."""
  sched = schedules.get("1f1b", num_ranks=2, num_microbatches=1)
  true = {0: [("F", 0, 0.0, 1.0), ("B", 0, 4.0, 6.0)], 1: [("F", 1, 1.5, 2.5), ("B", 1, 2.5, 3.5)]}
  parts = []
  for proc, offset in ((0, 0.0), (1, 5.0)):
    origin = 1000.0 + offset + (0.0 if proc == 0 else 1.5)  # its step began 1.5 s later
    local = [schedules.Record(proc, k, s, 0, a - (origin - offset - 1000.0),
                              b - (origin - offset - 1000.0)) for k, s, a, b in true[proc]]
    parts.append(trace_lib.ProcessTimeline(proc, f"h{proc}", tuple(local), origin, offset))
  timeline = trace_lib.StepTimeline(7, sched, tuple(parts))
  back = trace_lib.StepTimeline.from_json(json.loads(json.dumps(timeline.to_json())))
  got = sorted((r.rank, r.kind, r.start, r.end) for r in back.records())
  assert got == sorted((p, k, a, b) for p, rows in true.items() for k, _, a, b in rows)
  trace = trace_lib.chrome_trace(back)
  assert {e["pid"] for e in _x_events(trace)} == {0, 1}
  flows = [e for e in trace["traceEvents"] if e["ph"] in "sf"]
  assert [(e["ph"], e["pid"]) for e in flows] == [("s", 0), ("f", 1), ("s", 1), ("f", 0)]


class FakeKV:
  """The key-value store and barriers of ``jax.distributed``'s client, for threads."""

  def __init__(self):
    self._values: dict[str, str] = {}
    self._cond = threading.Condition()
    self._barriers: dict[str, threading.Barrier] = {}

  def key_value_set(self, key, value):
    with self._cond:
      assert key not in self._values, key
      self._values[key] = value
      self._cond.notify_all()

  def blocking_key_value_get(self, key, timeout_ms):
    with self._cond:
      assert self._cond.wait_for(lambda: key in self._values, timeout_ms / 1000), key
      return self._values[key]

  def wait_at_barrier(self, barrier_id, timeout_ms, process_ids):
    with self._cond:
      barrier = self._barriers.setdefault(barrier_id, threading.Barrier(len(process_ids)))
    barrier.wait(timeout_ms / 1000)


def test_clock_offsets_zero_on_one_host_measured_across_hosts():
  """Process 1 shares process 0's host (offset 0 whatever its clock); process 2's clock runs
  5 s ahead on another host: the barrier rounds measure that."""
  kv, got = FakeKV(), {}
  setups = {0: ("a", 0.0), 1: ("a", 3.0), 2: ("b", 5.0)}

  def proc(i):
    host, ahead = setups[i]
    got[i] = trace_lib.clock_offset(kv, i, 3, run=1, host=host,
                                    clock=lambda: time.time() + ahead)

  threads = [threading.Thread(target=proc, args=(i,)) for i in setups]
  for t in threads:
    t.start()
  for t in threads:
    t.join(30)
  assert got[0] == 0.0 and got[1] == 0.0
  assert got[2] == pytest.approx(5.0, abs=0.1)


@pytest.mark.parametrize("value", [(0,), (3, 2), (1, 99), ("a",), (1, 2, 3)])
def test_bad_profile_steps_raise(value):
  c = shakespeare_gpt.get_config("runlocal")
  c.profile_steps = value
  with pytest.raises(hkpipe.ConfigError, match="config.profile_steps"):
    train_lib.validate_config(c)


def test_profile_steps_and_record_timeline_config():
  c = shakespeare_gpt.get_config("runlocal")
  assert config_checks.profile_window(c) is None
  c.profile_steps = (4,)
  assert config_checks.profile_window(c) == (4, 4)
  c.pipeline.record_timeline = True  # backend single
  with pytest.raises(hkpipe.ConfigError, match="record_timeline=True"):
    train_lib.pipeline_options(c)
  c.backend, c.pipeline.ranks = "mpmd", 2
  assert train_lib.pipeline_options(c)["record_timeline"] is True


@pytest.mark.slow
def test_two_process_trace_is_merged_on_one_clock(tmp_path):
  """MPMD with one rank per process: process 0 writes one trace with both processes' ranks; on
  the aligned clocks every transfer's consumer starts after its producer ended."""
  hkpipe.data.prepare(tmp_path / "data")
  work = tmp_path / "mp"
  flags = ["--config=experiments/shakespeare_gpt.py:runlocal", f"--workdir={work}",
           f"--config.data.dir={tmp_path / 'data'}", "--config.backend=mpmd",
           "--config.pipeline.ranks=2", "--config.pipeline.num_microbatches=2",
           "--config.pipeline.record_timeline=True", "--config.num_steps=3",
           "--config.eval_every=0", "--config.checkpoint_every=0", "--config.sample_tokens=0"]
  t0 = time.time()
  proc = subprocess.run(["bash", "launch/local.sh", "2", "--devices_per_process=1",
                         "--timeout=400", "--", *flags], cwd=ROOT, capture_output=True,
                        text=True, timeout=450)
  print(f"two processes: {time.time() - t0:.1f}s")
  assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
  trace = json.loads((work / "trace.json").read_text())
  events = _x_events(trace)
  assert {(e["pid"], e["tid"]) for e in events} == {(0, 0), (1, 1)}
  sched = schedules.get("1f1b", num_ranks=2, num_microbatches=2)
  for rank in range(2):
    assert len([e for e in events if e["tid"] == rank]) == len(sched.compute_actions(rank))
  slices = {(e["tid"], e["args"]["kind"], e["args"]["microbatch"]): e for e in events}
  flows = [e for e in trace["traceEvents"] if e["ph"] in "sf"]
  assert len(flows) == 2 * 2 * (2 - 1) * 2
  for start, end in zip(flows[::2], flows[1::2]):
    assert (start["ph"], end["ph"], start["pid"] != end["pid"]) == ("s", "f", True)
  for mb in range(2):  # causality across processes (one host: one clock)
    assert slices[(1, "F", mb)]["ts"] >= slices[(0, "F", mb)]["ts"] + slices[(0, "F", mb)]["dur"]
    assert slices[(0, "B", mb)]["ts"] >= slices[(1, "B", mb)]["ts"] + slices[(1, "B", mb)]["dur"]
  timeline = json.loads((work / "timeline.json").read_text())
  assert [(p["process"], p["clock_offset"]) for p in timeline["processes"]] == [(0, 0.0), (1, 0.0)]
  assert (work / "timeline.svg").exists() and (work / "loss.png").exists()
