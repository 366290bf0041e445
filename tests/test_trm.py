"""The Tiny Recursive Model, its Sudoku data and the EMA option (tiny sizes, seconds)."""

import dataclasses

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hkpipe
from hkpipe import models
from hkpipe import train as train_lib
from hkpipe._src import ema as ema_lib
from hkpipe._src import sudoku
from hkpipe._src.models import trm

TINY = models.TRMConfig(d_model=16, n_heads=2, n_layers=1, expansion=2.0, h_cycles=2,
                        l_cycles=1, n_supervision=2, halt_exploration_prob=0.0)


def _step_fn(config, is_training=False):
  """``(params, x, carry) -> (carry, outputs)`` of one supervision step, as a pure function."""
  return hk.without_apply_rng(hk.transform(
      lambda x, carry: trm.supervision_step(config, x, carry, is_training=is_training)))


def _x(batch, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, TINY.seq_len, TINY.d_model))


# ---------------------------------------------------------------------------------------------
# Shapes and carry semantics.


def test_model_output_shapes_and_param_counts():
  model = models.build(TINY)
  tokens = jnp.zeros((3, 81), jnp.int32)
  params = model.init(jax.random.key(0), tokens)
  out = model.apply(params, tokens, is_training=False)
  n, b, l, v = TINY.n_supervision, 3, TINY.seq_len, TINY.vocab_size
  assert out["logits"].shape == (n, b, l, v)
  assert out["q_halt"].shape == out["q_continue"].shape == out["active"].shape == (n, b)
  counts = models.layer_param_counts(TINY)
  for name in ("embed", "recur"):
    assert sum(a.size for a in jax.tree.leaves(params[name])) == counts[name]


def test_halted_rows_reset_and_others_continue():
  fn = _step_fn(TINY)
  x = _x(2)
  params = fn.init(jax.random.key(0), x, trm.init_carry(TINY, 2))
  init = trm.init_carry(TINY, 2)
  # A carry from a different state: row 0 halted (must restart), row 1 running (must continue).
  mid = trm.Carry(y=init.y + 0.7, z=init.z - 0.3, steps=jnp.array([5, 1], jnp.int32),
                  halted=jnp.array([True, False]))
  new, out = fn.apply(params, x, mid)
  # Independent runs of each row: row 0 from the initial carry, row 1 from its own carry.
  _, fresh = fn.apply(params, x[:1], trm.init_carry(TINY, 1))
  cont = trm.Carry(y=mid.y[1:], z=mid.z[1:], steps=mid.steps[1:], halted=jnp.array([False]))
  _, kept = fn.apply(params, x[1:], cont)
  np.testing.assert_allclose(out["logits"][0], fresh["logits"][0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["logits"][1], kept["logits"][0], rtol=1e-5, atol=1e-5)
  assert not np.allclose(out["logits"][0], kept["logits"][0], atol=1e-3)
  np.testing.assert_array_equal(new.steps, [1, 2])
  # Evaluation halts only at n_supervision.
  np.testing.assert_array_equal(new.halted, [False, True])


def test_deep_supervision_masks_rows_after_they_halt():
  config = dataclasses.replace(TINY, n_supervision=3)
  model = models.build(config)
  tokens = jnp.zeros((2, 81), jnp.int32)
  params = model.init(jax.random.key(0), tokens)
  # q_head bias: row-independent; +5 on q_halt makes every row halt after its first step.
  params["recur"]["q_head"]["b"] = jnp.array([5.0, -5.0])
  out = model.apply(params, tokens, rng=jax.random.key(1), is_training=True)
  np.testing.assert_array_equal(out["active"], [[1, 1], [0, 0], [0, 0]])
  out = model.apply(params, tokens, is_training=False)  # eval runs every step
  np.testing.assert_array_equal(out["active"], np.ones((3, 2)))


# ---------------------------------------------------------------------------------------------
# Gradients only through the last H cycle.


def _one_step_loss(config):
  fn = _step_fn(config)

  def loss(params, x, carry, labels):
    _, out = fn.apply(params, x, carry)
    return trm.trm_loss({k: v[None] for k, v in out.items()} | {"active": jnp.ones((1, 2))},
                        labels)
  return fn, loss


def test_gradient_flows_only_through_the_last_h_cycle():
  labels = jax.random.randint(jax.random.key(3), (2, 81), 1, 10)
  x = _x(2)
  init = trm.init_carry(TINY, 2)
  carry = trm.Carry(y=init.y + 0.1 * _x(2, 1), z=init.z + 0.1 * _x(2, 2), steps=init.steps,
                    halted=jnp.zeros((2,), bool))
  fn2, loss2 = _one_step_loss(TINY)                                   # h_cycles = 2
  params = fn2.init(jax.random.key(0), x, carry)
  grads = jax.grad(loss2)(params, x, carry, labels)
  # Reference from the layers alone: the first cycle run forward, then a 1-cycle step from there.
  one = dataclasses.replace(TINY, h_cycles=1)
  first = hk.without_apply_rng(hk.transform(
      lambda x, y, z: trm.recursion(trm.Net(one), one, x, y, z)))
  y1, z1 = first.apply({k: v for k, v in params.items() if k.startswith("net")}, x, carry.y,
                       carry.z)
  _, loss1 = _one_step_loss(one)
  ref = jax.grad(loss1)(params, x, carry._replace(y=y1, z=z1), labels)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    np.testing.assert_allclose(g, _at(ref, path), rtol=2e-4, atol=1e-6, err_msg=str(path))
  # Nothing reaches the incoming carry (it only feeds the detached first cycle).
  dy, dz = jax.grad(lambda y, z: loss2(params, x, carry._replace(y=y, z=z), labels),
                    argnums=(0, 1))(carry.y, carry.z)
  assert float(jnp.abs(dy).max()) == 0.0 and float(jnp.abs(dz).max()) == 0.0


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


# ---------------------------------------------------------------------------------------------
# Learning: overfit a handful of puzzles.


def test_overfits_four_puzzles_to_full_cell_accuracy():
  data = sudoku.generate(sudoku.SudokuSpec(seed=1, train_base=4, test_base=1, augmentations=0,
                                           min_givens=45))
  x = jnp.asarray(data["train_inputs"][:4], jnp.int32)
  y = jnp.asarray(data["train_labels"][:4], jnp.int32)
  config = dataclasses.replace(TINY, d_model=32, n_supervision=2, h_cycles=1)
  model = models.build(config)
  params = model.init(jax.random.key(0), x)
  opt = optax.adam(1e-2)  # measured: 100% cell and exact accuracy from step 300 on
  state = opt.init(params)

  @jax.jit
  def step(params, state, i):
    loss, g = jax.value_and_grad(model.loss)(params, x, y, rng=jax.random.key(i),
                                             is_training=True)
    updates, state = opt.update(g, state, params)
    return optax.apply_updates(params, updates), state, loss

  for i in range(400):
    params, state, _ = step(params, state, i)
  metrics = models.trm_metrics(model.apply(params, x, is_training=False), y)
  assert float(metrics["cell_accuracy"]) == 1.0
  assert float(metrics["exact_accuracy"]) == 1.0


def test_blank_accuracy_counts_only_blank_cells():
  rng = np.random.default_rng(0)
  labels = rng.integers(1, 10, (3, 81))
  inputs = np.where(rng.random((3, 81)) < 0.4, 0, labels)            # givens copy the solution
  pred = np.where(rng.random((3, 81)) < 0.5, labels, labels % 9 + 1)  # about half right
  pred = np.where(inputs > 0, labels, pred)                           # every given right
  logits = np.eye(10, dtype=np.float32)[pred][None]                   # [N=1, B, L, V]
  outputs = {"logits": jnp.asarray(logits), "active": jnp.ones((1, 3))}
  got = models.trm_metrics(outputs, jnp.asarray(labels), jnp.asarray(inputs))
  blanks = [(b, i) for b in range(3) for i in range(81) if inputs[b, i] == 0]
  want = sum(pred[b, i] == labels[b, i] for b, i in blanks) / len(blanks)
  assert 0.3 < want < 0.7
  np.testing.assert_allclose(float(got["blank_accuracy"]), want, rtol=1e-6)
  np.testing.assert_allclose(float(got["cell_accuracy"]), np.mean(pred == labels), rtol=1e-6)
  # copying the givens (a blank predicted as 0, never a label) scores 0 on blanks
  copy = np.eye(10, dtype=np.float32)[inputs][None]
  zero = models.trm_metrics({**outputs, "logits": jnp.asarray(copy)}, jnp.asarray(labels),
                            jnp.asarray(inputs))
  assert float(zero["blank_accuracy"]) == 0.0
  assert "blank_accuracy" not in models.trm_metrics(outputs, jnp.asarray(labels))


@pytest.mark.slow
def test_data_parallel_pmap_matches_single_device():
  config = dataclasses.replace(TINY, n_supervision=2)
  model = models.build(config)
  data = sudoku.generate(sudoku.SudokuSpec(seed=2, train_base=4, test_base=1, augmentations=1,
                                           min_givens=45))
  batch = (jnp.asarray(data["train_inputs"], jnp.int32),
           jnp.asarray(data["train_labels"], jnp.int32))
  pipe = hkpipe.Pipeline(model, optax.sgd(0.1), backend="pmap", devices=jax.devices()[:2])
  state = pipe.init(jax.random.key(0), batch)
  loss, grads = pipe.loss_and_grads(state, batch)
  params = pipe.params(state)
  # Per-device means of a masked mean: equal to the reference when every row is active (the q
  # head starts at -5, so nothing halts and every row is active in both halves).
  ref_loss, ref = jax.value_and_grad(lambda p: 0.5 * sum(
      model.loss(p, batch[0][i:i + 4], batch[1][i:i + 4], is_training=False) for i in (0, 4)))(
          params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Sudoku data.


def _independent_count(grid, limit=2):
  """Solutions of a puzzle by plain set-based backtracking (no bitmasks, first empty cell)."""
  grid = [list(map(int, grid[r * 9:(r + 1) * 9])) for r in range(9)]

  def options(r, c):
    used = set(grid[r]) | {grid[i][c] for i in range(9)}
    br, bc = 3 * (r // 3), 3 * (c // 3)
    used |= {grid[br + i][bc + j] for i in range(3) for j in range(3)}
    return [d for d in range(1, 10) if d not in used]

  def go():
    empties = [(r, c) for r in range(9) for c in range(9) if grid[r][c] == 0]
    if not empties:
      return 1
    r, c = min(empties, key=lambda rc: len(options(*rc)))
    found = 0
    for d in options(r, c):
      grid[r][c] = d
      found += go()
      grid[r][c] = 0
      if found >= limit:
        break
    return found

  return go()


def _valid_solution(sol):
  g = np.asarray(sol).reshape(9, 9)
  full = set(range(1, 10))
  boxes = [g[r:r + 3, c:c + 3].ravel() for r in (0, 3, 6) for c in (0, 3, 6)]
  return all(set(u) == full for u in list(g) + list(g.T) + boxes)


def test_generator_makes_valid_unique_puzzles_and_augments_them():
  spec = sudoku.SudokuSpec(seed=3, train_base=3, test_base=2, augmentations=2, min_givens=26)
  data = sudoku.generate(spec)
  assert data["train_inputs"].shape == (9, 81) and data["test_inputs"].shape == (2, 81)
  for split in ("train", "test"):
    for puzzle, sol in zip(data[f"{split}_inputs"], data[f"{split}_labels"]):
      assert _valid_solution(sol)
      given = puzzle > 0
      np.testing.assert_array_equal(puzzle[given], sol[given])
      assert 26 <= given.sum() < 81
      assert _independent_count(puzzle) == 1
  again = sudoku.generate(spec)  # seeded
  for k in data:
    np.testing.assert_array_equal(data[k], again[k])
  assert not np.array_equal(data["train_inputs"], sudoku.generate(
      dataclasses.replace(spec, seed=4))["train_inputs"])


def test_prepare_writes_memmaps_reuses_them_and_never_overwrites(tmp_path):
  spec = sudoku.SudokuSpec(seed=0, train_base=2, test_base=1, augmentations=1, min_givens=50)
  meta = sudoku.prepare(tmp_path / "d", spec)
  assert meta["written_by"] == sudoku.WRITTEN_BY and meta["train_inputs_rows"] == 4
  arrays = sudoku.load(tmp_path / "d")
  assert isinstance(arrays["train_inputs"], np.memmap) and arrays["test_labels"].shape == (1, 81)
  np.testing.assert_array_equal(arrays["train_labels"], sudoku.generate(spec)["train_labels"])
  assert sudoku.prepare(tmp_path / "d", spec) == meta
  with pytest.raises(hkpipe.ConfigError, match="does not overwrite"):
    sudoku.prepare(tmp_path / "d", dataclasses.replace(spec, seed=1))
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("user file")
  with pytest.raises(hkpipe.ConfigError, match="did not write"):
    sudoku.prepare(tmp_path / "mine", spec)
  assert (tmp_path / "mine" / "notes.txt").read_text() == "user file"


# ---------------------------------------------------------------------------------------------
# EMA.


def test_ema_equals_an_independent_computation():
  params = {"a": {"w": jnp.array([1.0, -2.0])}, "b": {"w": jnp.array([[0.5]])}}
  grads = [{"a": {"w": jnp.array([0.3, 0.1])}, "b": {"w": jnp.array([[-1.0]])}},
           {"a": {"w": jnp.array([-0.2, 0.4])}, "b": {"w": jnp.array([[2.0]])}},
           {"a": {"w": jnp.array([0.0, 1.0])}, "b": {"w": jnp.array([[0.5]])}}]
  decay, lr = 0.9, 0.5
  opt = ema_lib.with_ema(optax.sgd(lr), decay)
  state = opt.init(params)
  p = params
  for g in grads:
    updates, state = opt.update(g, state, p)
    p = optax.apply_updates(p, updates)
  # By hand, in numpy: SGD parameters and their running average.
  w = {k: np.asarray(v["w"], np.float64) for k, v in params.items()}
  avg = {k: v.copy() for k, v in w.items()}
  for g in grads:
    for k in w:
      w[k] = w[k] - lr * np.asarray(g[k]["w"])
      avg[k] = decay * avg[k] + (1 - decay) * w[k]
  for k in w:
    np.testing.assert_allclose(p[k]["w"], w[k], rtol=1e-6)
    np.testing.assert_allclose(ema_lib.ema_params(state)[k]["w"], avg[k], rtol=1e-6)


@pytest.mark.slow
def test_ema_eval_state_on_a_pipeline_uses_the_average():
  model = models.build(TINY)
  tokens = jnp.asarray(sudoku.generate(sudoku.SudokuSpec(
      seed=5, train_base=2, test_base=1, augmentations=0, min_givens=50))["train_inputs"],
      jnp.int32)
  batch = (tokens, tokens)
  pipe = hkpipe.Pipeline(model, ema_lib.with_ema(optax.sgd(0.5), 0.5), backend="pmap",
                         devices=jax.devices()[:2])
  state = pipe.init(jax.random.key(0), batch)
  p0 = pipe.params(state)
  state, _ = pipe.train_step(state, batch)
  p1 = pipe.params(state)
  scored = pipe.params(ema_lib.eval_state(pipe, state))
  for e, a, b in zip(jax.tree.leaves(scored), jax.tree.leaves(p0), jax.tree.leaves(p1)):
    np.testing.assert_allclose(e, 0.5 * a + 0.5 * b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Config errors, before anything compiles.


@pytest.mark.parametrize("field,value,match", [
    ("mixer", "conv", "TRMConfig.mixer='conv'"),
    ("h_cycles", 0, "TRMConfig.h_cycles=0"),
    ("l_cycles", 1.5, "TRMConfig.l_cycles=1.5"),
    ("n_supervision", -1, "TRMConfig.n_supervision=-1"),
    ("halt_exploration_prob", 1.5, "TRMConfig.halt_exploration_prob=1.5"),
    ("act_continue", 1, "TRMConfig.act_continue=1"),
    ("n_heads", 3, "TRMConfig.n_heads=3"),
    ("q_loss_weight", -1.0, "TRMConfig.q_loss_weight=-1.0"),
    ("expansion", 0.0, "TRMConfig.expansion=0.0"),
])
def test_trm_config_rejects_bad_values(field, value, match):
  with pytest.raises(ValueError, match=match.replace(".", r"\.").replace("(", r"\(")):
    dataclasses.replace(TINY, **{field: value})


@pytest.mark.parametrize("path,value,match", [
    ("ema_decay", 1.0, r"config\.ema_decay=1\.0 .*\[0, 1\)"),
    ("model.mixer", "conv", r"TRMConfig\.mixer='conv'"),
    ("data.sudoku.min_givens", 10, r"SudokuSpec\.min_givens=10 .*\[17, 80\]"),
    ("data.sudoku.train_base", 0, r"SudokuSpec\.train_base=0"),
    ("data.sudoku.augmentations", -1, r"SudokuSpec\.augmentations=-1"),
])
def test_training_config_rejects_bad_values_before_compiling(path, value, match):
  from experiments import sudoku_trm  # pylint: disable=g-import-not-at-top
  config = sudoku_trm.get_config("runlocal")
  node = config
  *parents, leaf = path.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(hkpipe.ConfigError, match=match):
    train_lib.validate_config(config)
