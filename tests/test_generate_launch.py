"""launch/sample.py and hkpipe._src.sample_run: sampling a trained run's newest checkpoint."""

import io
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import hkpipe
from hkpipe import models
from hkpipe import train as train_lib
from hkpipe._src import sample_run
from hkpipe._src import trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import shakespeare_llama  # pylint: disable=wrong-import-position

PROMPT = "ROMEO:"
pytestmark = pytest.mark.slow  # a training run and a subprocess (they run in CI)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny 2-step Llama run trained with mpmd on 2 stages (checkpoint at step 2)."""
  data = tmp_path_factory.mktemp("data")
  hkpipe.data.prepare(data)
  c = shakespeare_llama.get_config("runlocal")
  c.data.dir = str(data)
  c.num_steps, c.checkpoint_every, c.eval_every, c.sample_tokens = 2, 2, 2, 0
  c.optim.warmup_steps = 1
  c.backend, c.pipeline.ranks, c.pipeline.num_microbatches = "mpmd", 2, 2
  work = tmp_path_factory.mktemp("run")
  train_lib.train(c, work, log=io.StringIO())
  return work, c


def reference(work, config, n):
  """Greedy continuation of PROMPT by the checkpoint's params on one device (the layers alone)."""
  model = models.build(train_lib.model_config(config))
  pipe = hkpipe.Pipeline(model, train_lib.adamw(trainer.optimizer_config(config)))
  rows = np.zeros((config.batch_size, config.model.seq_len), np.int32)
  like = pipe.to_canonical(pipe.init(jax.random.key(0), (rows, rows)))
  restored = train_lib.Checkpointer(work / "checkpoints").restore_latest(like)
  assert restored.step == 2
  tokens = hkpipe.data.encode(PROMPT).astype(np.int32)[None]
  out = models.generate(model, restored.state["params"], tokens, max_new_tokens=n,
                        rng=jax.random.key(0), temperature=0.0)
  return hkpipe.data.decode(np.asarray(out[0]))


def test_samples_equal_under_any_decoding_layout(run):
  work, config = run
  want = reference(work, config, 8)
  request = sample_run.Request(prompt=PROMPT, max_new_tokens=8, temperature=0.0, num_samples=2)
  for overrides, backend in [({}, "mpmd"), ({"backend": "single"}, "single")]:
    texts, info = sample_run.sample(work, request, overrides)
    assert texts == [want, want], overrides
    assert info["step"] == 2 and info["backend"] == backend


def test_bad_requests_fail_before_restoring(run, monkeypatch):
  work, _ = run

  def no_restore(*args, **kwargs):
    raise AssertionError("restored before checking the request")

  monkeypatch.setattr(sample_run, "restore", no_restore)
  cases = [(dict(top_p=0.0), {}, "top_p"), (dict(top_k=300), {}, "top_k=300"),
           (dict(max_new_tokens=20), {}, "lower max_new_tokens to at most 10"),
           (dict(num_samples=3, num_groups=2), {}, r"num_groups=2 .* \[1, 3\]"),
           (dict(), {"model.d_model": 64}, "--config.model.d_model cannot change")]
  for fields, overrides, match in cases:
    with pytest.raises(hkpipe.ConfigError, match=match):
      sample_run.sample(work, sample_run.Request(prompt=PROMPT, **fields), overrides)
  with pytest.raises(hkpipe.ConfigError, match="No checkpoint"):
    sample_run.sample(work / "nothing", sample_run.Request())


def test_sample_command(run):
  work, config = run
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  cmd = [sys.executable, "launch/sample.py", f"--workdir={work}", f"--prompt={PROMPT}",
         "--max_new_tokens=8", "--temperature=0", "--num_samples=2", "--host_devices=2",
         "--config.backend=mpmd", "--config.pipeline.ranks=2"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  want = reference(work, config, 8)
  assert proc.stdout.count(f"---\n{want}\n") == 2, proc.stdout
  assert "checkpoint step 2, decoding with backend=mpmd" in proc.stdout
  bad = subprocess.run(cmd + ["--top_p=1.5"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode == 2 and bad.stderr.startswith("hkpipe: error: top_p=1.5"), bad.stderr
