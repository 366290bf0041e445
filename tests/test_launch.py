"""The multi-process launcher and distributed start-up configuration."""

import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from hkpipe._src import distributed
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))

import local  # pylint: disable=wrong-import-position


def test_distributed_config_validation():
  assert distributed.DistributedConfig().coordinator_address is None
  with pytest.raises(ValueError, match="all of coordinator_address"):
    distributed.DistributedConfig(coordinator_address="127.0.0.1:1234")
  with pytest.raises(ValueError, match="process_id=2"):
    distributed.DistributedConfig("127.0.0.1:1", 2, 2)
  with pytest.raises(ValueError, match="host:port"):
    distributed.DistributedConfig("localhost", 2, 0)


def test_distributed_from_env_and_cluster_detection():
  cfg = distributed.from_env({"HKPIPE_COORDINATOR_ADDRESS": "10.0.0.1:99",
                              "HKPIPE_NUM_PROCESSES": "4", "HKPIPE_PROCESS_ID": "3"})
  assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id) == ("10.0.0.1:99", 4, 3)
  assert distributed.from_env({}) == distributed.DistributedConfig()
  assert distributed.cluster_detected({"SLURM_NTASKS": "8"})
  assert distributed.cluster_detected({"TPU_WORKER_HOSTNAMES": "a,b"})
  assert not distributed.cluster_detected({"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "a"})
  assert not distributed.initialize(distributed.DistributedConfig("127.0.0.1:1", 1, 0))


def test_commands_carry_rank_flags_and_pinning():
  cmds = local.build_commands(2, "launch/train.py", 4321, 2, True, ["--workdir=w"])
  assert cmds[1][:3] == ["taskset", "-c", str(1 % (local.os.cpu_count() or 1))]
  for i, cmd in enumerate(cmds):
    assert "--coordinator_address=127.0.0.1:4321" in cmd and f"--process_id={i}" in cmd
    assert "--num_processes=2" in cmd and "--host_devices=2" in cmd and cmd[-1] == "--workdir=w"


def test_one_failing_process_tears_down_the_rest(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(
      "import sys, time\n"
      "rank = int([a for a in sys.argv if a.startswith('--process_id=')][0].split('=')[1])\n"
      "print('hello from', rank, flush=True)\n"
      "if rank == 0:\n"
      "  time.sleep(0.5); sys.exit(3)\n"
      "time.sleep(600)\n")
  start = time.time()
  proc = subprocess.run([sys.executable, "launch/local.py", "2", f"--script={script}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 3, proc.stdout + proc.stderr
  assert time.time() - start < 30
  assert "[p0] hello from 0" in proc.stdout and "[p1] hello from 1" in proc.stdout
  assert "stopping the others" in proc.stdout


def test_launcher_timeout_kills_everything(tmp_path):
  script = tmp_path / "sleeper.py"
  script.write_text("import time\ntime.sleep(600)\n")
  proc = subprocess.run([sys.executable, "launch/local.py", "2", "--timeout=2",
                         f"--script={script}"], cwd=ROOT, capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == 124 and "timeout" in proc.stdout


def _metrics(workdir: pathlib.Path) -> tuple[dict, dict]:
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
             if line.strip()]
  return ({r["step"]: r["loss"] for r in records if "loss" in r},
          {r["step"]: r["val_loss"] for r in records if "val_loss" in r})


@pytest.mark.slow
def test_local_sh_trains_shakespeare_across_two_processes_with_mpmd(tmp_path):
  """``launch/local.sh 2`` trains the Shakespeare experiment with MPMD ranks on two processes:
  the per-step losses equal a single-process single-device run; checkpoints written by both
  processes resume the run (after the newest one is deleted) with the same losses."""
  import hkpipe  # pylint: disable=import-outside-toplevel
  from hkpipe import train as train_lib  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, str(ROOT))
  from experiments import shakespeare_gpt  # pylint: disable=import-outside-toplevel

  data = tmp_path / "data"
  hkpipe.data.prepare(data)
  overrides = {"num_steps": 6, "log_every": 1, "eval_every": 3, "checkpoint_every": 2,
               "sample_tokens": 8}
  config = shakespeare_gpt.get_config("runlocal")
  config.data.dir = str(data)
  config.update(overrides)
  config.pipeline.num_microbatches = 2
  train_lib.train(config, tmp_path / "ref", log=io.StringIO())
  ref_loss, ref_val = _metrics(tmp_path / "ref")

  work = tmp_path / "mpmd"
  flags = ["--config=experiments/shakespeare_gpt.py:runlocal", f"--workdir={work}",
           f"--config.data.dir={data}", "--config.backend=mpmd", "--config.pipeline.ranks=2",
           "--config.pipeline.num_microbatches=2",
           *[f"--config.{k}={v}" for k, v in overrides.items()]]

  def launch() -> str:
    proc = subprocess.run(["bash", "launch/local.sh", "2", "--devices_per_process=1",
                           "--timeout=400", "--", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=450)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    return proc.stdout

  out = launch()
  assert "[p0] step      6/6" in out and "[p1] step" not in out  # process 0 prints
  loss, val = _metrics(work)
  assert sorted(loss) == list(range(1, 7)) and sorted(val) == [3, 6]
  for step in ref_loss:
    assert loss[step] == pytest.approx(ref_loss[step], rel=1e-5), step
  for step in ref_val:
    assert val[step] == pytest.approx(ref_val[step], rel=1e-5), step
  assert (work / "samples.txt").read_text()  # sampled after gathering both ranks' params

  ckpts = work / "checkpoints"
  assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [2, 4, 6]
  shutil.rmtree(ckpts / "6")
  out = launch()
  assert "[p0] Resumed from checkpoint at step 4" in out
  first = next(line for line in out.splitlines() if line.startswith("[p0] step      5/6"))
  assert "(incl. compile)" in first  # the resumed run's first step is timed on its own
  loss, _ = _metrics(work)
  assert sorted(loss) == list(range(1, 7))
  for step in (5, 6):
    assert loss[step] == pytest.approx(ref_loss[step], rel=1e-5), step


@pytest.mark.slow
def test_a_raising_process_ends_the_other_within_60s(tmp_path):
  """Process 1 of a 2-process MPMD training run raises (SIGINT: KeyboardInterrupt) mid-run: both
  processes exit non-zero within 60 s, none waits for the other forever."""
  import hkpipe  # pylint: disable=import-outside-toplevel
  data = tmp_path / "data"
  hkpipe.data.prepare(data)
  port = local.free_port()
  flags = ["--config=experiments/shakespeare_gpt.py:runlocal", f"--workdir={tmp_path / 'w'}",
           f"--config.data.dir={data}", "--config.backend=mpmd", "--config.pipeline.ranks=2",
           "--config.num_steps=100000", "--config.optim.warmup_steps=1", "--config.log_every=1",
           "--config.eval_every=0", "--config.checkpoint_every=0", "--config.sample_tokens=0"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  logs = [open(tmp_path / f"p{i}.txt", "w") for i in range(2)]  # pylint: disable=consider-using-with
  procs = [subprocess.Popen(
      [sys.executable, "-u", "launch/train.py", f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}", "--host_devices=1", *flags], cwd=ROOT, env=env,
      stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
  metrics = tmp_path / "w" / "metrics.jsonl"

  def output(i: int) -> str:
    logs[i].flush()
    return (tmp_path / f"p{i}.txt").read_text()[-4000:]

  try:
    deadline = time.time() + 300
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:
      assert all(p.poll() is None for p in procs), output(0) + output(1)
      assert time.time() < deadline, "no progress\n" + output(0) + output(1)
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGINT)
    raised = time.time()
    codes, took = [], []
    for p in procs:
      try:
        codes.append(p.wait(timeout=max(1.0, raised + 90 - time.time())))
      except subprocess.TimeoutExpired:
        pytest.fail("a process was still running 90 s after process 1 raised\n" + output(0))
      took.append(time.time() - raised)
    print(f"exit codes {codes} after {took[0]:.1f} s (p0) and {took[1]:.1f} s (p1)")
    assert codes[0] != 0 and codes[1] != 0, output(0) + output(1)
    assert max(took) < 60, (took, output(0), output(1))
    assert "KeyboardInterrupt" in output(1)
  finally:
    helpers.stop_processes(procs, logs)
