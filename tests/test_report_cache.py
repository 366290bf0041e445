"""The launcher's persistent compilation cache: a second identical start compiles nothing."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import pytest

import hkpipe
from hkpipe._src import compile_cache

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_cache_folder_from_flag_and_environment(monkeypatch, tmp_path):
  monkeypatch.setenv(compile_cache.ENV_DIR, str(tmp_path / "env"))
  assert compile_cache.resolve("auto") == tmp_path / "env"
  assert compile_cache.resolve("off") is None
  assert compile_cache.resolve(str(tmp_path / "x")) == tmp_path / "x"
  monkeypatch.setenv(compile_cache.ENV_DIR, "off")
  assert compile_cache.resolve("auto") is None
  monkeypatch.delenv(compile_cache.ENV_DIR)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compile_cache.resolve("auto") == tmp_path / "xdg" / "hkpipe" / "jax"


def _losses(workdir: pathlib.Path) -> dict:
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow
def test_second_start_loads_every_program_from_the_cache(tmp_path):
  """MPMD over 2 ranks (its stage programs, split and update programs included): the first start
  compiles and stores n programs (n files in the folder), the second loads those n and compiles
  none, and trains to the same losses."""
  hkpipe.data.prepare(tmp_path / "data")
  cache = tmp_path / "cache"

  def start(name: str) -> tuple[int, int]:
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "--config=experiments/shakespeare_gpt.py:runlocal",
         f"--workdir={tmp_path / name}", f"--config.data.dir={tmp_path / 'data'}",
         "--host_devices=2", "--config.backend=mpmd", "--config.pipeline.ranks=2",
         "--config.pipeline.num_microbatches=2", "--config.num_steps=3",
         "--config.eval_every=0", "--config.checkpoint_every=0", "--config.sample_tokens=0",
         f"--compilation_cache={cache}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = next(line for line in proc.stdout.splitlines() if "step      1/3" in line)
    print(name, first)
    match = re.search(r"compilation cache .*: (\d+) programs loaded, (\d+) compiled", proc.stdout)
    assert match, proc.stdout[-2000:]
    return int(match.group(1)), int(match.group(2))

  loaded, compiled = start("cold")
  assert loaded == 0 and compiled > 0
  assert len([p for p in cache.iterdir() if p.name.endswith("-cache")]) == compiled
  assert start("warm") == (compiled, 0)
  assert _losses(tmp_path / "warm") == _losses(tmp_path / "cold")
