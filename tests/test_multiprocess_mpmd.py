"""The MPMD backend across processes: 2 processes x 2 simulated CPU devices.

Each slow test launches ``tests/_mp_mpmd_worker.py`` twice (through ``launch/local.py``, or
directly for the kill test), under hard timeouts; the workers save what every process read
(np.savez) and the test compares it with the single-process single-device reference computed
here. The fast tests cover the placement checks and the transfer helpers in one process.
"""

from __future__ import annotations

import functools
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

import hkpipe
from hkpipe._src import layout as layout_lib
from hkpipe._src.backends import _mpmd_transfer as xfer

from tests import _mp_mpmd_worker as worker
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = "tests/_mp_mpmd_worker.py"
RTOL, ATOL = 1e-5, 1e-6
LAUNCH_TIMEOUT_S = 300          # per launch of two workers (compiles included)


# -- reference and helpers -------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def reference() -> dict:
  """What the workers compute, on the single-device backend (plus one more step, for resume)."""
  pipe = hkpipe.Pipeline(worker.model(), optax.sgd(worker.LR), backend="single",
                         num_microbatches=worker.M, max_grad_norm=worker.MAX_NORM, donate=False)
  res, state = worker.run_pipeline(pipe)
  state, metrics = pipe.train_step(state, worker.batch(worker.STEPS))
  res["next_loss"] = np.asarray(float(metrics["loss"]))
  res.update(worker.flat(pipe.params(state), "next"))
  return res


def launch(mode: str, out: pathlib.Path) -> str:
  """Runs 2 workers in ``mode`` through launch/local.py; returns their output."""
  cmd = [sys.executable, "launch/local.py", "2", "--devices_per_process=2",
         f"--timeout={LAUNCH_TIMEOUT_S}", f"--script={WORKER}", "--", f"--mode={mode}",
         f"--out={out}"]
  t0 = time.time()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=LAUNCH_TIMEOUT_S + 60)
  print(f"{mode}: {time.time() - t0:.1f}s\n{proc.stdout[-3000:]}")
  assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-3000:]
  return proc.stdout


def load(out: pathlib.Path, name: str, process: int) -> dict:
  with np.load(out / f"{name}_p{process}.npz") as f:
    return dict(f)


def assert_matches(got: dict, expected: dict, what: str) -> None:
  assert set(got) == set(expected), (what, sorted(set(got) ^ set(expected)))
  for key in sorted(expected):
    np.testing.assert_allclose(got[key], expected[key], rtol=RTOL, atol=ATOL,
                               err_msg=f"{what}: {key}")


def expected_run() -> dict:
  ref = reference()
  assert np.all(ref["norms"] > worker.MAX_NORM), "clipping must be active in this test"
  return {k: v for k, v in ref.items() if not k.startswith("next")}


# -- across processes (slow) -----------------------------------------------------------------


@pytest.mark.slow
def test_pp2_across_processes_1f1b_zbv_and_checkpoint(tmp_path):
  """Rank 0 on process 0, rank 1 on process 1: 1F1B (tied embedding/head on two processes) and
  ZBV (split backward, two stages per rank); every process reads loss, grads, metrics, eval and
  params equal to the reference; an orbax checkpoint saved from both processes restores."""
  launch("pp2", tmp_path)
  expected = expected_run()
  # The stage-by-stage evaluation's loss is the model's loss (the eval step's, same batch).
  np.testing.assert_allclose(expected["staged_loss"], expected["eval"], rtol=RTOL)
  for schedule in ("1f1b", "zbv"):
    for process in (0, 1):
      assert_matches(load(tmp_path, schedule, process), expected, f"{schedule} p{process}")
  ref = reference()
  final = {k: v for k, v in load(tmp_path, "1f1b", 0).items() if k.startswith("params/")}
  for process in (0, 1):
    restored = load(tmp_path, "restored", process)
    for key, value in final.items():
      np.testing.assert_array_equal(restored[key], value, err_msg=f"restored p{process} {key}")
    assert_matches({k: v for k, v in restored.items() if k.startswith("next")},
                   {k: v for k, v in ref.items() if k.startswith("next")},
                   f"step after restore p{process}")


@pytest.mark.slow
def test_dispatch_far_ahead_of_the_devices_does_not_stop_the_processes(tmp_path):
  """32 microbatches on a (pp=2, dp=2) mesh: each process's host issues far more work than its
  devices have done. Before the driver waited on the host for pulled data, this run stopped
  for good every time (the CPU runtime's ~32 in-flight computations per device all waited on
  the peer, so neither sent anything); now both finish with the single-device losses."""
  launch("deep", tmp_path)
  pipe = hkpipe.Pipeline(worker.deep_model(), optax.sgd(worker.LR), backend="single",
                         num_microbatches=worker.DEEP_M, donate=False)
  state = pipe.init(jax.random.key(worker.SEED), worker.deep_batch(0))
  expected = []
  for step in range(worker.STEPS):
    state, metrics = pipe.train_step(state, worker.deep_batch(step))
    expected.append(float(metrics["loss"]))
  for process in (0, 1):
    np.testing.assert_allclose(load(tmp_path, "deep", process)["losses"], expected, rtol=RTOL,
                               atol=ATOL, err_msg=f"p{process}")


@pytest.mark.slow
def test_pp2_dp2_across_processes(tmp_path):
  """A (pp=2, dp=2) mesh: each rank's 2 devices on one process; batch-split activations and
  replicated tie gradients, norms and clip factors cross processes as per-device shards."""
  launch("pp2dp2", tmp_path)
  expected = expected_run()
  for process in (0, 1):
    assert_matches(load(tmp_path, "dp", process), expected, f"pp2dp2 p{process}")


@pytest.mark.slow
def test_pp2_fsdp2_across_processes(tmp_path):
  """A (pp=2, fsdp=2) mesh, pp across the processes: each process's stage has its parameters
  and optimizer state sharded over its own 2 devices; results equal the single device's."""
  launch("pp2fsdp2", tmp_path)
  expected = expected_run()
  for process in (0, 1):
    assert_matches(load(tmp_path, "fsdp", process), expected, f"pp2fsdp2 p{process}")


@pytest.mark.slow
def test_nonfinite_steps_skipped_on_both_processes(tmp_path):
  """Rank 0 on process 0, rank 1 (loss, global norm) on process 1, no clipping: the skip decision
  reaches rank 0 as a NaN factor from the other process. Both processes read skipped = [0, 1, 1, 0],
  the parameters after the two bad steps equal those before them bit for bit, and the final ones
  equal the plain-JAX reference that applied only the finite batches."""
  launch("nan", tmp_path)
  good_a, _, _, good_b = helpers.float_batches()
  model = helpers.float_model()
  for process in (0, 1):
    got = load(tmp_path, "nan", process)
    np.testing.assert_array_equal(got["skipped"], [0.0, 1.0, 1.0, 0.0])
    assert int(got["steps"]) == 4
    before = {k: v for k, v in got.items() if k.startswith("after1/")}
    assert len(before) == 8, sorted(got)      # 4 layers x (w, b)
    for key, value in before.items():
      np.testing.assert_array_equal(got[key.replace("after1/", "after3/")], value, key)
    init = _unflat(got, "init")
    ref_params, _ = helpers.adam_reference(model, init, [good_a, good_b],
                                           num_microbatches=worker.NAN_M, lr=worker.NAN_LR)
    helpers.assert_trees_close(_unflat(got, "final"), ref_params)


def _unflat(flat: dict, prefix: str) -> dict:
  """``{"prefix/layer/module/name": array}`` -> ``{layer: {module: {name: array}}}``."""
  out: dict = {}
  for key, value in flat.items():
    if key.startswith(prefix + "/"):
      node = out
      *path, leaf = key[len(prefix) + 1:].split("/")
      for part in path:
        node = node.setdefault(part, {})
      node[leaf] = value
  return out


@pytest.mark.slow
def test_killed_peer_ends_the_survivor_within_60s(tmp_path):
  """kill -9 of process 1 mid-training: process 0 exits non-zero within 60 s, with an error
  naming the failed transfer or the dead peer."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  logs = [open(tmp_path / f"log_p{i}.txt", "w") for i in range(2)]  # pylint: disable=consider-using-with
  procs = [subprocess.Popen(
      [sys.executable, "-u", WORKER, f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}", "--host_devices=2", "--mode=kill",
       f"--out={tmp_path}"], cwd=ROOT, env=env, stdout=logs[i], stderr=subprocess.STDOUT)
           for i in range(2)]

  def steps(i: int) -> int:
    path = tmp_path / f"steps_p{i}"
    return int(path.read_text() or 0) if path.exists() else 0

  def output(i: int, tail: int = 4000) -> str:
    logs[i].flush()
    return (tmp_path / f"log_p{i}.txt").read_text()[-tail:]

  try:
    deadline = time.time() + LAUNCH_TIMEOUT_S
    while min(steps(0), steps(1)) < 3:
      assert all(p.poll() is None for p in procs), output(0) + output(1)
      assert time.time() < deadline, "workers made no progress\n" + output(0) + output(1)
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    try:
      rc = procs[0].wait(timeout=90)
    except subprocess.TimeoutExpired:
      pytest.fail("the survivor was still running 90 s after its peer was killed\n" + output(0))
    elapsed = time.time() - killed
    print(f"survivor exited with {rc} {elapsed:.1f} s after the kill (steps {steps(0)})")
    assert rc != 0, output(0)
    assert elapsed < 60, output(0)
    text = output(0, tail=10**7)
    # The clear message of the transfer watcher: which value from which process failed.
    assert "hkpipe MPMD: Receiving" in text and "from process 1 failed" in text, output(0)
  finally:
    helpers.stop_processes(procs, logs)


# -- one process (fast) ----------------------------------------------------------------------


class _FakeDevice:
  def __init__(self, name: str, process_index: int):
    self.name, self.process_index = name, process_index

  def __repr__(self):
    return self.name


def test_a_rank_spanning_processes_is_refused():
  grid = np.asarray([[_FakeDevice("a0", 0), _FakeDevice("a1", 0)],
                     [_FakeDevice("b0", 0), _FakeDevice("b1", 1)]], dtype=object)
  layout = layout_lib.Layout(schedule=None, stages=(), device_grid=grid)
  with pytest.raises(ValueError, match=r"rank 1 has devices \[b0, b1\] of processes \[0, 1\]"):
    layout_lib.check_ranks_within_processes(layout)
  layout_lib.check_ranks_within_processes(
      layout_lib.Layout(schedule=None, stages=(), device_grid=grid[:1]))


def test_single_process_defaults_and_no_transport():
  assert layout_lib.default_rank_devices(3) == jax.devices()[:3]
  pipe = hkpipe.Pipeline(worker.model(), optax.sgd(0.1), backend="mpmd", num_ranks=2,
                         num_microbatches=2)
  assert pipe.backend.transport is None and not pipe.backend.multi_process


def test_transfer_ids_are_deterministic_and_distinct():
  a = xfer.uuid(1, 7, ("F", 1, 0))
  assert a == xfer.uuid(1, 7, ("F", 1, 0)) and 0 <= a < 2**63
  others = {xfer.uuid(ns, call, (kind, s, mb)) for ns in (1, 2) for call in range(20)
            for kind in ("F", "G") for s in range(4) for mb in range(8)}
  assert len(others) == 2 * 20 * 2 * 4 * 8
  # Equal across interpreters (Python's str hash is salted per process; this must not be).
  code = "from hkpipe._src.backends import _mpmd_transfer as x; print(x.uuid(1, 7, ('F', 1, 0)))"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONHASHSEED": "123"})
  assert out.stdout.strip() == str(a), out.stderr


def test_shards_and_their_specs_line_up():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[2:4], dtype=object), ("dp",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("dp"))
  x = jax.device_put(np.arange(12, dtype=np.float32).reshape(4, 3), sharding)
  shards = xfer.ordered_shards(x)
  np.testing.assert_array_equal(np.concatenate([np.asarray(s) for s in shards]), np.asarray(x))
  specs = xfer.shard_specs(jax.ShapeDtypeStruct((4, 3), np.float32, sharding=sharding))
  assert [s.shape for s in specs] == [(2, 3), (2, 3)]
  assert [s.sharding.device_set for s in specs] == [s.devices() for s in shards]
  # Reassembly, as the receiver does it, gives the array back.
  back = jax.make_array_from_single_device_arrays((4, 3), sharding, shards)
  np.testing.assert_array_equal(np.asarray(back), np.asarray(x))
