"""The hang watchdog: deadlines, the report, the MPMD position hook and a stopped process.

The fast tests drive :class:`Watchdog.check` with a fake clock (no sleeps) or a real thread with
sub-second deadlines. The slow tests start a 2-process training run through ``launch/local.py``,
SIGSTOP process 1 once both train, and check that the run ends within 60 s with process 0's
watchdog block naming where it waits.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import optax
import pytest

import hkpipe
from hkpipe import train as train_lib
from hkpipe._src import watchdog as wd
from hkpipe._src.backends import _mpmd_transfer as xfer
from hkpipe._src.errors import ConfigError
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]


class _Clock:
  def __init__(self):
    self.t = 1000.0

  def __call__(self) -> float:
    return self.t


def _warm(progress: wd.Progress, step_times=(0.2, 0.4, 0.3)) -> None:
  """Runs the loop's bookkeeping: a compiled first step, then measured ones."""
  progress.begin_step(1)
  progress.steps_finished(None)
  for i, t in enumerate(step_times):
    progress.begin_step(i + 2)
    progress.steps_finished(t)


# -- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,fix", [
    ("timeout_s", -1.0, "0 turns the watchdog off"),
    ("multiple", -2.0, ">= 0"),
    ("floor_s", -5.0, ">= 0"),
    ("multiple", 0.5, "must be >= 1"),
    ("floor_s", "soon", "must be a number"),
])
def test_bad_config_values_name_the_field_and_the_fix(field, value, fix):
  fields = dict(train_lib.default_config().watchdog)
  fields[field] = value
  with pytest.raises(ConfigError, match=re.escape(f"config.watchdog.{field}=")) as e:
    wd.WatchdogConfig.from_config(fields)
  assert fix in str(e.value)
  assert isinstance(e.value, ValueError)


def test_train_rejects_a_bad_watchdog_before_anything_runs(tmp_path):
  config = train_lib.default_config()
  config.watchdog.floor_s = -1.0
  with pytest.raises(ConfigError, match=r"config\.watchdog\.floor_s=-1"):
    train_lib.train(config, tmp_path / "w")
  assert not (tmp_path / "w").exists()  # nothing was written, prepared or compiled


def test_defaults_and_when_it_is_on():
  default = wd.WatchdogConfig.from_config(train_lib.default_config().watchdog)
  assert default == wd.WatchdogConfig(timeout_s=None, multiple=10.0, floor_s=120.0)
  assert default.enabled(process_count=2) and not default.enabled(process_count=1)
  assert wd.WatchdogConfig(timeout_s=30.0).enabled(process_count=1)
  assert not wd.WatchdogConfig(timeout_s=0.0).enabled(process_count=4)
  with pytest.raises(ConfigError, match="unknown fields"):
    wd.WatchdogConfig.from_config({"timeout": 3.0})


# -- deadlines -----------------------------------------------------------------------------------


def test_no_step_deadline_before_a_step_is_measured():
  p = wd.Progress(0, 2)
  config = wd.WatchdogConfig(floor_s=1.0)
  assert wd.deadline_s(p, config)[0] is None               # setup (init, compile)
  p.begin_step(1)
  assert wd.deadline_s(p, config)[0] is None               # the first step compiles
  p.steps_finished(None)
  p.begin_step(2)
  assert wd.deadline_s(p, config)[0] is None               # not measured yet
  p.steps_finished(0.5)
  p.begin_step(3)
  assert wd.deadline_s(p, config)[0] == pytest.approx(5.0)  # 10 x 0.5 s


def test_step_deadline_is_the_floor_or_a_multiple_of_the_median():
  p = wd.Progress(0, 2)
  _warm(p, step_times=(0.2, 9.0, 0.3, 0.4, 0.25))        # median 0.3 s (9.0 is an outlier)
  p.begin_step(7)
  assert wd.deadline_s(p, wd.WatchdogConfig(floor_s=1.0))[0] == pytest.approx(3.0)
  assert wd.deadline_s(p, wd.WatchdogConfig(floor_s=60.0))[0] == pytest.approx(60.0)
  assert wd.deadline_s(p, wd.WatchdogConfig(floor_s=0.5, multiple=2.0))[0] == pytest.approx(0.6)
  assert wd.deadline_s(p, wd.WatchdogConfig(timeout_s=7.0))[0] == pytest.approx(7.0)
  # Steps issued without waiting (between two log lines) are waited for at once.
  for step in (8, 9, 10):
    p.begin_step(step)
  deadline, why = wd.deadline_s(p, wd.WatchdogConfig(floor_s=1.0))
  assert deadline == pytest.approx(3.0 * 4) and "4 steps" in why


def test_other_phases_get_their_own_deadline():
  p = wd.Progress(0, 2)
  _warm(p)
  config = wd.WatchdogConfig(floor_s=2.0)
  p.enter(wd.CHECKPOINT)
  assert wd.deadline_s(p, config)[0] == pytest.approx(20.0)  # first save: 10 x floor
  p.end()                                                    # took far less than 0.2 s
  assert 0 <= p.durations(wd.CHECKPOINT)[0] < 0.2
  p.enter(wd.CHECKPOINT)
  assert wd.deadline_s(p, config)[0] == pytest.approx(2.0)   # measured (fast): the floor
  time.sleep(0.3)
  p.end()
  p.enter(wd.CHECKPOINT)
  deadline = wd.deadline_s(p, config)[0]                     # 10 x the longest earlier save
  assert deadline == pytest.approx(10 * max(p.durations(wd.CHECKPOINT))) and deadline >= 3.0
  p.enter(wd.EVAL)
  assert wd.deadline_s(p, wd.WatchdogConfig(floor_s=2.0, timeout_s=5.0))[0] == pytest.approx(50)


# -- detection and the report ---------------------------------------------------------------------


def test_fires_only_after_the_deadline_without_progress_and_names_the_position():
  p = wd.Progress(0, 2)
  _warm(p, step_times=(0.1,))
  clock = _Clock()
  fired: list[str] = []
  dog = wd.Watchdog(p, wd.WatchdogConfig(floor_s=3.0), clock=clock, on_hang=fired.append)
  p.begin_step(7)
  p.op = "rank 0: B of stage 0, microbatch 3"
  p.awaiting = (7, "rank 0 (process 0)", xfer.describe(("G", 1, 3), 1, 1))
  assert dog.check() is None
  clock.t += 2.9
  assert dog.check() is None
  p.received += 1                              # a message arrived: progress
  clock.t += 2.9
  assert dog.check() is None                   # the clock restarts here
  clock.t += 2.9
  assert dog.check() is None
  clock.t += 0.2
  text = dog.check()
  assert text is not None
  lines = text.splitlines()
  assert lines[0].startswith("hkpipe watchdog: process 0 of 2 made no progress for 3.1 s "
                             "(deadline 3.0 s: max(floor_s=3, 10 x median step time 0.1 s))")
  assert f"exiting with status {wd.EXIT_STATUS}" in lines[0]
  assert lines[1] == ("  step 7, rank 0 (process 0): waiting for cotangents of microbatch 3 for "
                      "stage 0 from rank 1 (process 1)")
  assert lines[2] == "  step 7: last instruction issued: rank 0: B of stage 0, microbatch 3"
  assert "docs/launch.md" in lines[-1]


def test_report_of_a_compiled_step_names_the_collective_processes():
  p = wd.Progress(1, 3)
  _warm(p)
  p.begin_step(12)
  assert wd.position(p) == [
      "step 12: in the compiled train step (collectives with processes [0, 1, 2])"]
  p.enter(wd.CHECKPOINT)
  assert wd.position(p) == [
      "checkpoint save after step 12: in the checkpoint save (collectives with processes "
      "[0, 1, 2])"]


def test_message_descriptions():
  assert xfer.describe(("F", 1, 5), 1, 0) == (
      "activations of microbatch 5 for stage 2 from rank 1 (process 0)")
  assert xfer.describe(("G", 3, 0), 3, 1) == (
      "cotangents of microbatch 0 for stage 2 from rank 3 (process 1)")
  assert xfer.describe(("sq", 1), 1, 1) == "the squared gradient norm of stage 1 from rank 1 " \
                                           "(process 1)"
  assert xfer.describe(("metrics", 0), 3, 1) == ("the step's loss and gradient norm from rank 3 "
                                                 "(process 1)")
  assert xfer.describe(("gather", "params", 1, 0), 1, 1).startswith("gather ('params', 1, 0)")


def test_watchdog_thread_fires_on_a_stall_and_not_while_moving():
  p = wd.Progress(0, 2)
  _warm(p, step_times=(0.01,))
  p.begin_step(5)
  fired: list[str] = []
  config = wd.WatchdogConfig(timeout_s=0.3)
  dog = wd.Watchdog(p, config, on_hang=fired.append, poll_s=0.02).start()
  moving = threading.Event()

  def move():                                   # a transfer thread receiving messages
    while not moving.wait(0.05):
      p.received += 1
  mover = threading.Thread(target=move)
  mover.start()
  time.sleep(0.8)
  assert not fired                              # progress every 50 ms: never 0.3 s idle
  moving.set()
  mover.join()
  t0 = time.monotonic()
  while not fired and time.monotonic() - t0 < 3:
    time.sleep(0.02)
  assert fired and "no progress for 0.3 s" in fired[0]
  took = time.monotonic() - t0
  assert 0.25 <= took < 2.0, took
  dog.stop()

  quiet: list[str] = []
  dog = wd.Watchdog(p, config, on_hang=quiet.append, poll_s=0.02).start()
  dog.stop()
  time.sleep(0.5)
  assert not quiet                              # a stopped watchdog never fires


# -- the MPMD driver's position hook ---------------------------------------------------------------


class _Recording(wd.Progress):
  """Records every op the driver reports."""

  def __init__(self):
    self.seen: list = []
    super().__init__()

  @property
  def op(self):
    return self.seen[-1] if self.seen else None

  @op.setter
  def op(self, value):
    self.seen.append(value)


def test_mpmd_driver_reports_every_op_it_issues():
  progress = _Recording()
  m, ranks = 2, 2
  pipe = hkpipe.Pipeline(helpers.hetero_model(n_mid=1), optax.sgd(0.1), backend="mpmd",
                         num_microbatches=m, devices=jax.devices()[:ranks], progress=progress,
                         max_grad_norm=1.0)
  assert pipe.progress is progress
  batch = helpers.token_batch()
  state = pipe.init(jax.random.key(0), batch)
  progress.seen.clear()
  pipe.train_step(state, batch)
  texts = [str(op) for op in progress.seen]
  # Every forward and backward of the schedule, on its rank, once (in the driver's issue order).
  actions = sorted(t for t in texts if re.fullmatch(r"rank \d: [FB] of stage \d, microbatch \d", t))
  expected = sorted(f"rank {s}: {k} of stage {s}, microbatch {mb}"
                    for s in range(ranks) for k in "FB" for mb in range(m))
  assert actions == expected
  assert texts[-1] == "process 0: clip and update its stages [0, 1]"
  assert any(t.endswith("finalize the gradients of stage 1") for t in texts)
  assert progress.seen[-1] is pipe.progress.op


# -- a stopped process (slow) ----------------------------------------------------------------------


def _children(pid: int) -> dict[int, str]:
  """The child processes of ``pid`` and their command lines (from /proc)."""
  out = {}
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      stat = pathlib.Path(f"/proc/{entry}/stat").read_text()
      cmdline = pathlib.Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
      continue
    ppid = int(stat.rsplit(")", 1)[1].split()[1])
    if ppid == pid:
      out[int(entry)] = cmdline.decode(errors="replace")
  return out


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["mpmd", "spmd"])
def test_a_stopped_process_ends_the_run_with_the_position(backend, tmp_path):
  """Process 1 of a 2-process run (pp=2, one rank per process) is SIGSTOPped mid-training:
  process 0's watchdog (floor 4 s) prints where it waits and exits 124, the launcher kills the
  stopped process and exits with that status, all within 60 s of the signal."""
  data = tmp_path / "data"
  hkpipe.data.prepare(data)
  flags = ["--config=experiments/shakespeare_gpt.py:runlocal", f"--workdir={tmp_path / 'w'}",
           f"--config.data.dir={data}", f"--config.backend={backend}",
           "--config.pipeline.ranks=2", "--config.pipeline.num_microbatches=2",
           "--config.model.n_layers=2",
           "--config.num_steps=100000", "--config.optim.warmup_steps=1", "--config.log_every=1",
           "--config.eval_every=0", "--config.checkpoint_every=0", "--config.sample_tokens=0",
           "--config.watchdog.floor_s=4"]
  log_path = tmp_path / "launch.txt"
  log = open(log_path, "w")  # pylint: disable=consider-using-with
  launcher = subprocess.Popen([sys.executable, "launch/local.py", "2", "--devices_per_process=1",
                               "--timeout=400", "--", *flags], cwd=ROOT, stdout=log,
                              stderr=subprocess.STDOUT)
  stopped = None

  def output() -> str:
    log.flush()
    return log_path.read_text()

  try:
    deadline = time.time() + 300                # start-up and compiles on a loaded machine
    while not re.search(r"\[p0\] step +([5-9]|\d\d+)/", output()):
      assert launcher.poll() is None, output()[-5000:]
      assert time.time() < deadline, "no training progress\n" + output()[-5000:]
      time.sleep(0.2)
    workers = _children(launcher.pid)
    [stopped] = [pid for pid, cmd in workers.items() if "--process_id=1" in cmd]
    os.kill(stopped, signal.SIGSTOP)
    t_stop = time.time()
    try:
      code = launcher.wait(timeout=90)
    except subprocess.TimeoutExpired:
      pytest.fail("the run was still going 90 s after process 1 stopped\n" + output()[-5000:])
    took = time.time() - t_stop
    text = output()
    print(f"launcher exited with {code} {took:.1f} s after SIGSTOP")
    assert took < 60, text[-5000:]
    assert code == wd.EXIT_STATUS, text[-5000:]  # process 0's watchdog, not a heartbeat abort
    assert not any(pathlib.Path(f"/proc/{pid}").exists() for pid in workers), "left running"
    block = text[text.index("[p0] hkpipe watchdog: process 0 of 2 made no progress"):]
    if backend == "mpmd":
      assert re.search(r"\[p0\]   step \d+, (rank 0 )?\(?process 0\)?: waiting for .* from "
                       r"rank 1 \(process 1\)", block), block
      assert "last instruction issued: " in block, block
    else:
      assert re.search(r"\[p0\]   step \d+: in the compiled train step \(collectives with "
                       r"processes \[0, 1\]\)", block), block
  finally:
    if stopped is not None and pathlib.Path(f"/proc/{stopped}").exists():
      os.kill(stopped, signal.SIGKILL)
    helpers.stop_processes([launcher], [log])
