"""SPMD and pmap across 2 processes x 2 simulated devices equal the single-device reference.

Each case starts 2 processes with the local launcher (``launch/local.py``, which tears both down
on a failure or after ``--timeout``; ``subprocess.run`` adds a hard timeout on top). The workers
(``tests/_mp_worker.py``) feed their own rows of every global batch and write what each process
observes; the reference runs here, in one process on one device, on the global batches.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

import hkpipe
from hkpipe import models
from hkpipe._src import pipeline as pipeline_lib
from hkpipe._src import placement
from hkpipe import train as train_lib
from tests import _mp_worker as worker

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import shakespeare_gpt  # pylint: disable=wrong-import-position

RTOL, ATOL = 1e-5, 1e-6
LAUNCH_TIMEOUT_S = 300  # the launcher kills both processes after this


def _launch(*args: str, script: str | None = None) -> str:
  """Runs 2 processes x 2 devices through the local launcher; returns their prefixed output."""
  cmd = [sys.executable, "launch/local.py", "2", "--devices_per_process=2",
         f"--timeout={LAUNCH_TIMEOUT_S}"]
  if script:
    cmd.append(f"--script={script}")
  proc = subprocess.run(cmd + ["--", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=LAUNCH_TIMEOUT_S + 60)
  assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
  return proc.stdout


@pytest.fixture(scope="module")
def reference():
  """The single-device pipeline on the global batches: what every process must observe."""
  model = models.build(worker.gpt_config())
  assert model.ties  # embedding = head: tie gradients cross the stages (and the processes)
  pipe = hkpipe.Pipeline(model, optax.sgd(worker.LR), num_microbatches=worker.M, donate=False)
  state = pipe.init(jax.random.key(42), worker.batch(0))
  out = worker.flat("init", pipe.params(state))
  loss, grads = pipe.loss_and_grads(state, worker.batch(0))
  out["loss"] = np.asarray(float(loss))
  out.update(worker.flat("grads", grads))
  metrics = []
  for step in range(worker.STEPS):
    state, m = pipe.train_step(state, worker.batch(step))
    metrics.append([float(m["loss"]), float(m["grad_norm"])])
  out["metrics"] = np.asarray(metrics)
  out["eval"] = np.asarray(float(pipe.eval_step(state, worker.batch(5))["loss"]))
  out.update(worker.flat("params", pipe.params(state)))
  out["generated"] = np.asarray(models.generate(  # the KV-cache decoding of one device
      model, pipe.params(state), np.asarray(worker.PROMPT, np.int32), rng=jax.random.key(5),
      use_cache=True, **worker.SAMPLING))
  return out


@pytest.fixture(scope="module")
def dropout_reference():
  """case -> loss/grads of the dropout variant with the case's layout in this one process (8
  simulated devices): equal only if every process's rows land in the same microbatch slots."""
  cache: dict = {}

  def get(case: str) -> dict:
    if case not in cache:
      model = models.build(worker.gpt_config(worker.DROPOUT))
      kw = dict(num_microbatches=worker.M, donate=False)
      devices = jax.devices()[:4]
      if case == "spmd_pp_across":  # dp=1 (tp splits no rows): the reference's own masks
        pipe = hkpipe.Pipeline(model, optax.sgd(worker.LR), **kw)
      elif case == "spmd_dp_across":
        mesh = jax.sharding.Mesh(np.asarray(devices).reshape(2, 2), ("pp", "dp"))
        pipe = hkpipe.Pipeline(model, optax.sgd(worker.LR), backend="spmd", schedule="1f1b",
                               mesh=mesh, **kw)
      else:
        pipe = hkpipe.Pipeline(model, optax.sgd(worker.LR), backend="pmap", devices=devices,
                               **kw)
      state = pipe.init(jax.random.key(42), worker.batch(0))
      loss, grads = pipe.loss_and_grads(state, worker.batch(0))
      cache[case] = {"dropout_loss": np.asarray(float(loss)),
                     **worker.flat("dropout_grads", grads)}
      # Negative control: the processes' rows in the other order give other grads, so the
      # comparison detects a wrong row-to-microbatch mapping.
      half = worker.BATCH // 2
      swapped = tuple(np.concatenate([x[half:], x[:half]]) for x in worker.batch(0))
      _, other = pipe.loss_and_grads(state, swapped)
      gap = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(grads)))
      assert gap > 1e-3, gap
    return cache[case]

  return get


def _close(got, want, key):
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("case", worker.CASES)
def test_two_processes_match_single_device(tmp_path, reference, dropout_reference, case):
  """Loss, grads, 2 SGD steps, params, eval and an orbax round trip, seen from each process."""
  _launch(f"--case={case}", f"--out={tmp_path}", script="tests/_mp_worker.py")
  with_dropout = dropout_reference(case)
  for process in (0, 1):
    got = dict(np.load(tmp_path / f"p{process}.npz"))
    for key, want in with_dropout.items():
      _close(got[key], want, f"process {process}: {key}")
    for key, want in reference.items():
      if key.startswith("init"):  # both layouts place the same initial parameters, bit for bit
        np.testing.assert_array_equal(got[key], want, err_msg=key)
      else:
        _close(got[key], want, f"process {process}: {key}")
    # The checkpoint saved by both processes restores exactly, rng included.
    for key in [k for k in reference if k.startswith("params")]:
      np.testing.assert_array_equal(got["restored" + key[len("params"):]], got[key], err_msg=key)
    np.testing.assert_array_equal(got["restored_rng"], got["rng"])
    assert got["restored_eval"] == got["eval"]
    # Decoded in place on the stages' owners where each rank lies in one process (pp across).
    assert int(got["generate_in_place"]) == (case == "spmd_pp_across"), case
    if case == "spmd_pp_across":
      _check_other_layout_and_partial_arrays(got, process)


def _check_other_layout_and_partial_arrays(got: dict, process: int) -> None:
  # The spmd checkpoint restored into a pmap pipeline over all 4 devices.
  for key in [k for k in got if k.startswith("params")]:
    np.testing.assert_array_equal(got["other_layout" + key[len("params"):]], got[key], err_msg=key)
  # Arrays on one process's devices only (as an MPMD stage's): restored onto their owner only.
  values = {"a": np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5,
            "b": np.arange(6, dtype=np.int32) * 7, "c": np.linspace(-1, 1, 8).astype(np.float32)}
  owner = {"a": 1, "b": 0, "c": process}
  for name, value in values.items():
    shards = int(got[f"partial/{name}/num_shards"])
    assert shards == (2 if owner[name] == process else 0), (name, process, shards)
    for i in range(shards):
      np.testing.assert_array_equal(got[f"partial/{name}/shard{i}"], value)
  np.testing.assert_array_equal(got["partial/rng"], jax.random.key_data(jax.random.key(7)))
  assert int(got["partial/meta_step"]) == 5


# -- the trainer through the launcher --------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  hkpipe.data.prepare(d)
  return str(d)


STEPS = 3
OVERRIDES = {"num_steps": STEPS, "log_every": 1, "eval_every": STEPS, "checkpoint_every": 2}


def _losses(workdir: pathlib.Path) -> tuple[list, list]:
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
             if line.strip()]
  return ([(r["step"], r["loss"]) for r in records if "loss" in r],
          [(r["step"], r["val_loss"]) for r in records if "val_loss" in r])


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, data_dir):
  """The same config in this process on one device (the reference trajectory)."""
  config = shakespeare_gpt.get_config("runlocal")
  config.data.dir = data_dir
  config.update(OVERRIDES)
  config.sample_tokens = 0
  config.pipeline.num_microbatches = 2
  work = tmp_path_factory.mktemp("one_process")
  train_lib.train(config, work)
  return _losses(work)


@pytest.mark.slow
@pytest.mark.parametrize("backend,ranks,dp", [("spmd", 2, 2), ("pmap", None, None)])
def test_trainer_across_two_processes(tmp_path, data_dir, one_process_run, backend, ranks, dp):
  """``launch/local.py 2`` trains the Shakespeare runlocal config with the per-step losses of a
  single-process run; only process 0 writes metrics and samples; both save the checkpoints, and
  (spmd) with the newest one damaged, a second launch moves it aside, resumes from the one before
  and replays the last step. pmap is given no sizes: it uses every device of both processes
  (dp=4)."""
  work = tmp_path / "run"
  flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  args = ["--config=experiments/shakespeare_gpt.py:runlocal", f"--workdir={work}",
          f"--config.data.dir={data_dir}", f"--config.backend={backend}",
          "--config.pipeline.num_microbatches=2", *flags]
  args += [f"--config.pipeline.{k}={v}" for k, v in (("ranks", ranks), ("dp", dp)) if v]
  out = _launch(*args)
  want_losses, want_val = one_process_run

  def check_losses():
    losses, val = _losses(work)
    assert [s for s, _ in losses] == [s for s, _ in want_losses] == [1, 2, 3]  # written once
    for (step, got), (_, want) in zip(losses + val, want_losses + want_val):
      assert got == pytest.approx(want, rel=RTOL), (step, got, want)

  check_losses()
  assert f"[p0] step      {STEPS}/{STEPS}" in out and "[p1] step" not in out, out
  assert "[p0] ---- sample ----" in out
  assert (work / "samples.txt").read_text().startswith("ROMEO:")
  assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["2", str(STEPS)]
  if backend == "spmd":
    # The newest checkpoint damaged (its array files cut short): both processes agree, it is moved
    # aside (not deleted) and the run resumes from the one before.
    for f in (work / "checkpoints" / str(STEPS) / "state").rglob("*"):
      if f.is_file() and f.parent.name == "d":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    out = _launch(*args, "--config.sample_tokens=0")
    assert "[p0] Resumed from checkpoint at step 2" in out, out
    assert f"[p0] [process 0] Warning: checkpoint step {STEPS} in " in out, out
    assert "is damaged: its arrays cannot be read" in out, out
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == [
        "2", str(STEPS), f"{STEPS}.corrupt"]
    check_losses()  # step 3 replayed from the restored state: the same loss


# -- placement rules, without processes ------------------------------------------------------------


class _Device:
  def __init__(self, process_index: int):
    self.process_index = process_index


class _Mesh:
  def __init__(self, grid, names):
    self.devices = np.asarray([[_Device(p) for p in row] for row in grid], dtype=object)
    self.axis_names = names


def test_process_batch_spec_finds_the_axes_that_follow_process_order():
  spec = placement.process_batch_spec
  one = _Mesh([[0, 0], [0, 0]], ("pp", "dp"))
  assert spec(one, process_count=1) == jax.sharding.PartitionSpec()
  # pp across processes (a rank per process), dp within: split over pp.
  assert spec(_Mesh([[0, 0], [1, 1]], ("pp", "dp")), 2) == jax.sharding.PartitionSpec("pp")
  # dp across processes: split over dp.
  assert spec(_Mesh([[0, 1], [0, 1]], ("pp", "dp")), 2) == jax.sharding.PartitionSpec("dp")
  # 4 processes, one device each, pp=2 x dp=2 in row-major process order: both axes, pp major.
  assert spec(_Mesh([[0, 1], [2, 3]], ("pp", "dp")), 4) == jax.sharding.PartitionSpec(
      ("pp", "dp"))
  # ... in column-major order: dp major.
  assert spec(_Mesh([[0, 2], [1, 3]], ("pp", "dp")), 4) == jax.sharding.PartitionSpec(
      ("dp", "pp"))
  with pytest.raises(ValueError, match="does not lay its devices out in process order"):
    spec(_Mesh([[0, 1], [1, 0]], ("pp", "dp")), 2)
  with pytest.raises(ValueError, match=r"belong to processes \[0\], but this run has 2"):
    spec(one, 2)


def test_global_batch_rules_name_the_processes():
  x = np.zeros((3, 4), np.int32)
  assert pipeline_lib.validate_batch((x, x), 3) == 3
  assert pipeline_lib.validate_batch((x, x), 2, process_count=2) == 6
  with pytest.raises(ValueError, match=r"2 processes x 3 process-local rows = 6\) is not "
                     r"divisible by num_microbatches=4"):
    pipeline_lib.validate_batch((x, x), 4, process_count=2)
  assert jax.tree.map(np.shape, placement.example_microbatch((x, x), 6, 2)) == ((3, 4), (3, 4))
  assert jax.tree.map(np.shape, placement.example_microbatch((x, x), 12, 6)) == ((2, 4), (2, 4))


def test_one_process_placement_helpers():
  """In one process the helpers are plain device_put / identity (the multi-process paths run in
  the workers above)."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]).reshape(2, 1), ("pp", "dp"))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rows = np.arange(12).reshape(6, 2)
  placed = placement.put_process_batch((rows,), sharding)[0]
  assert placed.sharding == sharding
  np.testing.assert_array_equal(placed, rows)
  key = placement.put_global(jax.random.key(3), sharding)
  np.testing.assert_array_equal(jax.random.key_data(placement.local_value(key)),
                                jax.random.key_data(jax.random.key(3)))
  assert placement.gather({"k": placed})["k"] is placed
