"""The trainer's evaluation metrics (TRM accuracy, MoE expert load) on the pipeline's own stages.

References are computed on one device from the gathered parameters with the model functions
alone (one jitted ``trm_metrics(model.apply(...))``, as the trainer computed it before; the jitted
``expert_load``), before ``Pipeline.params`` is made to fail: the in-place metrics must equal
them, bit for bit, without gathering anything.
"""

import importlib
import io
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hkpipe
from hkpipe import models
from hkpipe import train as train_lib
from hkpipe._src import puzzles
from hkpipe._src import staged_eval
from hkpipe._src import sudoku
from hkpipe._src.models import moe

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # experiments/

TRM = models.TRMConfig(d_model=16, n_heads=2, n_layers=1, expansion=2.0, h_cycles=2,
                       l_cycles=1, n_supervision=2, halt_exploration_prob=0.0)
MOE = models.MoEConfig(vocab_size=32, seq_len=8, d_model=16, n_layers=3, n_heads=4, n_kv_heads=2,
                       d_ff=24, n_experts=4, experts_per_token=2, sliding_window=3,
                       attention_sinks=True, capacity_factor=1.0)


def _no_gather(monkeypatch):
  def fail(self, state):
    raise AssertionError("the metric gathered the parameters (Pipeline.params)")
  monkeypatch.setattr(hkpipe.Pipeline, "params", fail)


def _assert_on_own_devices(pipe, staged):
  """Every stage's parameters live on its own rank's devices only, and ranks differ."""
  assert staged.in_place and len(staged.params) == len(pipe.layout.stages) > 1
  for s, params in enumerate(staged.params):
    own = set(pipe.layout.stage_devices(s))
    assert all(leaf.sharding.device_set <= own for leaf in jax.tree.leaves(params)), s
  assert not set(staged.devices[0]) & set(staged.devices[-1])


def _gathered(pipe, state):
  """The reference's parameters: gathered whole onto one device."""
  return jax.device_put(jax.device_get(pipe.params(state)), jax.devices()[0])


def _reference_metrics(model):
  """The single-device accuracy of one batch: apply and metrics in one program."""
  return jax.jit(lambda p, x, y: models.trm_metrics(model.apply(p, x), y, x))


def _pipeline(model, batch, kind):
  backend, options = {
      "mpmd_dp2": ("mpmd", dict(mesh=jax.make_mesh((2, 2), ("pp", "dp")))),
      "mpmd_fsdp_tp": ("mpmd", dict(mesh=jax.make_mesh(
          (2, 2, 2), ("pp", "fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 3))),
      "spmd": ("spmd", dict(devices=jax.devices()[:2])),
      "spmd_dp2": ("spmd", dict(mesh=jax.make_mesh((2, 2), ("pp", "dp")))),
      "pmap": ("pmap", dict(devices=jax.devices()[:2])),
  }[kind]
  pipe = hkpipe.Pipeline(model, optax.adam(1e-2), backend=backend, num_microbatches=2,
                         donate=False, **options)
  return pipe, pipe.init(jax.random.key(0), batch)


@pytest.fixture(scope="module")
def puzzle_batches():
  data = sudoku.generate(sudoku.SudokuSpec(seed=4, train_base=4, test_base=2, augmentations=1,
                                           min_givens=45))
  x = np.asarray(data["train_inputs"][:8], np.int32)
  y = np.asarray(data["train_labels"][:8], np.int32)
  return [(x[:4], y[:4]), (x[4:], y[4:])]


@pytest.mark.parametrize("kind", ["mpmd_dp2", "spmd"])
def test_trm_accuracy_on_the_stages_equals_the_gathered_model(kind, puzzle_batches, monkeypatch):
  model = models.build(TRM)
  pipe, state = _pipeline(model, puzzle_batches[0], kind)
  params = _gathered(pipe, state)
  rows = [jax.device_get(_reference_metrics(model)(params, x, y)) for x, y in puzzle_batches]
  want = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
  assert set(want) == {"cell_accuracy", "exact_accuracy", "mean_steps", "blank_accuracy"}

  _no_gather(monkeypatch)
  staged = staged_eval.stages(pipe, state)
  _assert_on_own_devices(pipe, staged)
  got = puzzles.accuracy_fn(model)(staged, lambda i: puzzle_batches[i], 2)
  assert got == want


@pytest.mark.parametrize("kind", ["mpmd_fsdp_tp", "spmd_dp2"])
def test_moe_expert_load_on_the_stages_equals_the_gathered_model(kind, monkeypatch):
  model = models.build(MOE)
  tokens = np.random.default_rng(0).integers(0, MOE.vocab_size, (4, MOE.seq_len), np.int32)
  pipe, state = _pipeline(model, (tokens, tokens), kind)
  want = jax.device_get(jax.jit(moe.expert_load, static_argnums=0)(
      MOE, _gathered(pipe, state), jnp.asarray(tokens)))
  assert want["load"].shape == (MOE.n_layers, MOE.n_experts)
  np.testing.assert_allclose(want["load"].sum(axis=1), 1.0, rtol=1e-6)
  assert want["dropped"].max() > 0  # capacity_factor=1: some assignments are dropped

  _no_gather(monkeypatch)
  staged = staged_eval.stages(pipe, state)
  _assert_on_own_devices(pipe, staged)
  got = staged_eval.expert_load(MOE, staged, tokens)
  np.testing.assert_array_equal(got["load"], want["load"])
  np.testing.assert_array_equal(got["dropped"], want["dropped"])
  assert moe.load_record(got) == moe.load_record(want)


def test_pmap_gathers_explicitly_and_gives_the_same_metrics(puzzle_batches):
  """pmap's parameters are replicated by design: the metrics run on one gathered copy."""
  model = models.build(TRM)
  pipe, state = _pipeline(model, puzzle_batches[0], "pmap")
  staged = staged_eval.stages(pipe, state)
  assert not staged.in_place and staged.devices == ((jax.local_devices()[0],),)
  x, y = puzzle_batches[0]
  want = jax.device_get(_reference_metrics(model)(_gathered(pipe, state), x, y))
  got = puzzles.accuracy_fn(model)(staged, lambda i: puzzle_batches[i], 1)
  assert got == {k: float(v) for k, v in want.items()}


def _eval_records(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, filter(None, lines))
          if "val_loss" in r or "moe/max_load" in r]


# MoE in the trainer: tests/test_train.py's moe_tiny launcher run logs the record; its in-place
# computation is checked above (suite time: one trainer run here).
@pytest.mark.parametrize("experiment,backend", [("sudoku_trm", "mpmd")])
def test_trainer_logs_the_single_device_metrics_without_gathering(tmp_path, monkeypatch,
                                                                 experiment, backend):
  """The trainer's periodic TRM accuracy / MoE expert load on a 2-stage pipeline, with
  ``Pipeline.params`` failing, equal those of the same run on one device."""
  def run(backend, workdir):
    c = importlib.import_module(f"experiments.{experiment}").get_config("runlocal")
    c.data.dir = str(tmp_path / "data")
    if experiment != "sudoku_trm":
      hkpipe.data.prepare(c.data.dir)
    c.backend, c.num_steps, c.eval_every, c.log_every = backend, 3, 3, 1
    c.checkpoint_every, c.sample_tokens = 0, 0
    c.pipeline.num_microbatches = 2
    if backend != "single":
      c.pipeline.ranks = 2
    train_lib.train(c, workdir, log=io.StringIO())
    return _eval_records(workdir)

  want = run("single", tmp_path / "single")
  _no_gather(monkeypatch)
  got = run(backend, tmp_path / backend)
  metric = "cell_accuracy" if experiment == "sudoku_trm" else "moe/max_load"
  assert any(metric in r for r in want)
  assert [set(r) for r in got] == [set(r) for r in want]
  for g, w in zip(got, want):
    assert g == pytest.approx(w, rel=1e-6), (g, w)
