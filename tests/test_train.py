"""Training loop, checkpoints, resume equality, crash safety and the launcher."""

import importlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import pytest

import hkpipe
from hkpipe import train as train_lib
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import shakespeare_gpt  # pylint: disable=wrong-import-position
from experiments import shakespeare_llama  # pylint: disable=wrong-import-position


def _leaf_size(params, path):
  node = params
  for key in path:
    node = node[key]
  return int(node.size)


def _losses(workdir):
  records = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().split("\n")
             if l.strip()]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  hkpipe.data.prepare(d)
  return str(d)


def _tiny_config(data_dir, **overrides):
  c = shakespeare_gpt.get_config("runlocal")
  c.data.dir = data_dir
  c.num_steps = 8
  c.log_every = 1
  c.eval_every = 4
  c.checkpoint_every = 4
  c.sample_tokens = 0
  c.model.dropout = 0.1  # dropout keys must be reproduced on resume too
  for k, v in overrides.items():
    c[k] = v
  return c


def test_checkpoint_round_trip(tmp_path):
  model = helpers.hetero_model()
  batch = helpers.token_batch()
  pipe = hkpipe.Pipeline(model, train_lib.adamw(train_lib.OptimizerConfig(warmup_steps=1,
                                                                          total_steps=4)))
  state, _ = pipe.train_step(pipe.init(jax.random.key(0), batch), batch)
  ckpt = train_lib.Checkpointer(tmp_path / "ck", max_to_keep=2)
  ckpt.save(1, pipe.to_canonical(state), {"step": 1})
  ckpt.wait()
  fresh = pipe.init(jax.random.key(9), batch)
  restored, meta = ckpt.restore(ckpt.latest_step(), pipe.to_canonical(fresh))
  assert meta == {"step": 1}
  chex.assert_trees_all_equal(restored["params"], pipe.params(state))
  chex.assert_trees_all_equal(restored["opt_state"], pipe.to_canonical(state)["opt_state"])
  chex.assert_trees_all_equal(jax.random.key_data(restored["rng"]), jax.random.key_data(state.rng))
  again = pipe.from_canonical(restored, int(meta["step"]))
  loss_a, _ = pipe.loss_and_grads(again, batch)
  loss_b, _ = pipe.loss_and_grads(state, batch)
  chex.assert_trees_all_equal(loss_a, loss_b)
  ckpt.close()


def test_resumed_run_reproduces_uninterrupted_losses(tmp_path, data_dir):
  config = _tiny_config(data_dir)
  work = tmp_path / "run"
  summary = train_lib.train(config, work)
  full = _losses(work)
  assert sorted(full) == list(range(1, 9)) and summary["steps"] == 8
  # Forget the last checkpoint: the next run must resume at step 4 and replay steps 5..8.
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(work / "checkpoints" / "8")
  summary = train_lib.train(config, work)
  assert summary["resumed_from"] == 4
  resumed = _losses(work)
  assert sorted(resumed) == list(range(1, 9))
  for step in range(5, 9):
    assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), step


def test_loss_falls_on_shakespeare(tmp_path, data_dir):
  config = _tiny_config(data_dir, num_steps=30)
  config.optim.learning_rate = 1e-2
  config.optim.warmup_steps = 3
  config.eval_every = 30
  config.checkpoint_every = 0
  summary = train_lib.train(config, tmp_path / "run")
  assert summary["last_loss"] < summary["first_loss"] - 1.0, summary
  assert summary["last_val_loss"] < 4.5


def test_bad_configs_raise_before_compiling(tmp_path, data_dir):
  config = _tiny_config(data_dir)
  config.model.name = "bert"
  with pytest.raises(ValueError, match="config.model.name='bert'"):
    train_lib.train(config, tmp_path / "a")
  config = _tiny_config(data_dir)
  config.model.vocab_size = 100
  with pytest.raises(ValueError, match="vocab_size=100"):
    train_lib.train(config, tmp_path / "b")
  config = _tiny_config(data_dir)
  config.backend = "mpmd"
  config.pipeline.ranks = 64
  with pytest.raises(ValueError, match="--host_devices=64"):
    train_lib.pipeline_options(config)
  with pytest.raises(ValueError, match="warmup_steps"):
    train_lib.OptimizerConfig(warmup_steps=10, total_steps=5)
  with pytest.raises(ValueError, match="Unknown variant"):
    shakespeare_llama.get_config("huge")


def test_crash_save_is_bounded():
  """The save attempted after an exception in a multi-process run waits at most its timeout (a
  collective whose peer died never returns) and reports instead of raising."""
  from hkpipe._src import trainer  # pylint: disable=g-import-not-at-top
  start = time.time()
  message = trainer._run_bounded(lambda: time.sleep(30), 0.5)  # pylint: disable=protected-access
  assert time.time() - start < 10 and "gave up after 0s" in message, message
  error = trainer._run_bounded(lambda: 1 / 0, 10)  # pylint: disable=protected-access
  assert isinstance(error, ZeroDivisionError)
  assert trainer._run_bounded(lambda: None, None) is None  # pylint: disable=protected-access
  assert isinstance(trainer._run_bounded(lambda: 1 / 0, None),  # pylint: disable=protected-access
                    ZeroDivisionError)


def test_pipeline_options_spread_devices_over_processes():
  """In one process the backends get the first devices, as before."""
  config = _tiny_config("unused")
  config.backend, config.pipeline.ranks, config.pipeline.dp = "spmd", 2, 2
  mesh = train_lib.pipeline_options(config)["mesh"]
  assert list(mesh.devices.flat) == jax.devices()[:4] and mesh.axis_names == ("pp", "dp")
  config.backend, config.pipeline.ranks = "pmap", None
  assert train_lib.pipeline_options(config)["devices"] == jax.devices()[:2]
  config.pipeline.dp = None  # pmap's default: every device
  assert train_lib.pipeline_options(config)["devices"] == jax.devices()


def _launch(workdir, *extra, config="experiments/shakespeare_gpt.py:runlocal"):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.Popen(
      [sys.executable, "launch/train.py", f"--config={config}", f"--workdir={workdir}", *extra],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["shakespeare_gpt", "shakespeare_llama", "moe_tiny"])
def test_launcher_end_to_end(tmp_path, data_dir, experiment):
  proc = _launch(tmp_path / "w", f"--config.data.dir={data_dir}", "--config.num_steps=4",
                 config=f"experiments/{experiment}.py:runlocal")
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert "step      4/4" in out and "---- sample ----" in out, out
  assert (tmp_path / "w" / "samples.txt").read_text().startswith("ROMEO:")
  assert sorted(_losses(tmp_path / "w")) == [1, 2, 3, 4]
  assert (tmp_path / "w" / "checkpoints" / "4").is_dir()
  # The logged parameter count (computed from shapes) equals a count of really initialised
  # parameters, with the tied head counted once.
  cfg = importlib.import_module(f"experiments.{experiment}").get_config("runlocal")
  mcfg = train_lib.model_config(cfg)
  model = hkpipe.models.build(mcfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, mcfg.seq_len), jnp.int32))
  tied = sum(_leaf_size(params, t.target) for t in model.ties)
  expected = sum(int(x.size) for x in jax.tree.leaves(params)) - tied
  assert f"params={expected:,} " in out, out


@pytest.mark.slow
def test_kill_9_then_resume_matches_uninterrupted(tmp_path, data_dir):
  flags = [f"--config.data.dir={data_dir}", "--config.num_steps=40", "--config.checkpoint_every=2",
           "--config.eval_every=0", "--config.sample_tokens=0", "--config.log_every=1"]
  ref = _launch(tmp_path / "ref", *flags)
  out, _ = ref.communicate(timeout=300)
  assert ref.returncode == 0, out

  victim = _launch(tmp_path / "run", *flags)
  deadline = time.time() + 240
  ckpt_dir = tmp_path / "run" / "checkpoints"
  while time.time() < deadline and not (ckpt_dir / "6").is_dir():
    time.sleep(0.05)
  victim.send_signal(signal.SIGKILL)
  victim.communicate(timeout=60)
  assert victim.returncode == -signal.SIGKILL
  killed_at = max(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
  assert killed_at < 40, "the run finished before it could be killed"

  resumed = _launch(tmp_path / "run", *flags)
  out, _ = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, out
  assert f"Resumed from checkpoint at step {killed_at}" in out
  expected, got = _losses(tmp_path / "ref"), _losses(tmp_path / "run")
  assert sorted(got) == list(range(1, 41))
  for step in range(1, 41):
    assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


def _trajectory(workdir, data_dir, backend, **pipeline):
  config = _tiny_config(data_dir, num_steps=4, checkpoint_every=0, eval_every=4)
  config.model.dropout = 0.0
  config.backend = backend
  config.pipeline.num_microbatches = 2
  config.pipeline.update(pipeline)
  summary = train_lib.train(config, workdir)
  return _losses(workdir), summary["last_val_loss"]


@pytest.fixture(scope="module")
def single_trajectory(tmp_path_factory, data_dir):
  return _trajectory(tmp_path_factory.mktemp("single"), data_dir, "single")


@pytest.mark.slow
@pytest.mark.parametrize("backend,ranks,dp", [("mpmd", 4, 1), ("mpmd", 2, 2), ("spmd", 2, 1),
                                              ("pmap", 1, 2)])
def test_backends_give_the_single_device_loss_trajectory(tmp_path, data_dir, single_trajectory,
                                                         backend, ranks, dp):
  """One flag swaps the backend; the Shakespeare run's losses stay those of one device."""
  ref, ref_val = single_trajectory
  got, val = _trajectory(tmp_path, data_dir, backend, ranks=ranks, dp=dp)
  assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
  for step in ref:
    assert got[step] == pytest.approx(ref[step], rel=1e-5), step
  assert val == pytest.approx(ref_val, rel=1e-5)


def test_end_of_run_sample_decodes_on_the_stages_without_gathering(tmp_path, data_dir,
                                                                   monkeypatch):
  """The mpmd and spmd runs' samples come from their own stages (Pipeline.params would gather: it
  is made to fail) and equal the greedy sample of the same run on one device."""
  def sample_of(backend, workdir, **pipeline):
    c = _tiny_config(data_dir, num_steps=3, checkpoint_every=0, eval_every=3, sample_tokens=10,
                     sample_temperature=0.0)
    c.model.dropout = 0.0
    c.backend = backend
    c.pipeline.num_microbatches = 2
    c.pipeline.update(pipeline)
    return train_lib.train(c, workdir)["sample"]

  ref = sample_of("single", tmp_path / "single")

  def no_gather(self, state):
    raise AssertionError("the end-of-run sample gathered the parameters")
  monkeypatch.setattr(hkpipe.Pipeline, "params", no_gather)
  got = sample_of("mpmd", tmp_path / "mpmd", ranks=2)
  assert got == ref and got.startswith("ROMEO:") and len(got) > len("ROMEO:")
  assert sample_of("spmd", tmp_path / "spmd", ranks=2) == ref
