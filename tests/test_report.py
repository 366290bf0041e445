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
import sys

import numpy as np
import pytest

import hkpipe
from hkpipe import train as train_lib
from hkpipe._src import tensorboard as tb_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import shakespeare_gpt  # pylint: disable=wrong-import-position


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
  """A 4-step MPMD run (2 ranks, 1F1B over 2 microbatches) with every extra turned on."""
  base = tmp_path_factory.mktemp("report")
  hkpipe.data.prepare(base / "data")
  c = shakespeare_gpt.get_config("runlocal")
  c.data.dir = str(base / "data")
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 4, 1, 2, 0
  c.sample_tokens = 12
  c.backend = "mpmd"
  c.pipeline.ranks, c.pipeline.num_microbatches = 2, 2
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
