"""The README's sharded command: the Shakespeare GPT with pp=2 x fsdp=2 on 4 simulated devices."""

import io
import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

import hkpipe
from hkpipe import train as train_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import shakespeare_gpt  # pylint: disable=wrong-import-position

SHORT = {"num_steps": 3, "log_every": 1, "eval_every": 0, "checkpoint_every": 0,
         "sample_tokens": 0, "optim.warmup_steps": 1}


def readme_command(marker: str) -> list[str]:
  """The README's ``bash`` command that contains ``marker``, as arguments."""
  text = (ROOT / "README.md").read_text()
  for block in text.split("```bash")[1:]:
    block = block.split("```")[0]
    if marker in block:
      return shlex.split(block.replace("\\\n", " "))
  raise AssertionError(f"README.md has no bash command with {marker!r}")


def _losses(workdir: pathlib.Path) -> dict:
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
             if line.strip()]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow
def test_readme_fsdp_command_trains_like_one_device(tmp_path):
  """The README's pp=2 x fsdp=2 line, run for 3 steps: each stage lives on 2 devices, and the
  losses equal those of the same config trained in this process on one device."""
  data = tmp_path / "data"
  hkpipe.data.prepare(data)
  cmd = readme_command("--config.pipeline.fsdp=2")
  assert cmd[:2] == ["python", "launch/train.py"] and "--host_devices=4" in cmd, cmd
  cmd = [sys.executable] + [a for a in cmd[1:] if not a.startswith("--workdir=")]
  cmd += [f"--workdir={tmp_path / 'w'}", f"--config.data.dir={data}", "--compilation_cache=off"]
  cmd += [f"--config.{k}={v}" for k, v in SHORT.items()]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-5000:]
  assert "stage 0 (rank 0, devices 0,1)" in out and "stage 1 (rank 1, devices 2,3)" in out, out
  assert ", dp=1, fsdp=2" in out, out
  got = _losses(tmp_path / "w")

  config = shakespeare_gpt.get_config("cpu")
  config.data.dir = str(data)
  for k, v in SHORT.items():
    section, _, name = k.rpartition(".")
    (config[section] if section else config)[name] = v
  mb = [a.split("=")[1] for a in cmd if a.startswith("--config.pipeline.num_microbatches=")]
  config.pipeline.num_microbatches = int(mb[-1]) if mb else 1
  train_lib.train(config, tmp_path / "single", log=io.StringIO())
  ref = _losses(tmp_path / "single")
  assert sorted(got) == sorted(ref) == [1, 2, 3]
  for step in ref:
    assert got[step] == pytest.approx(ref[step], rel=1e-5), (step, got, ref)
