"""The Pipeline object, its shared helpers and the single-device reference backend."""

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hkpipe
from hkpipe._src import canonical
from hkpipe._src import model as model_lib
from hkpipe._src import layout as layout_lib
from hkpipe._src import pipeline as pipeline_lib
from hkpipe._src import watchdog
from tests import helpers


@pytest.fixture(scope="module")
def model():
  return helpers.hetero_model()


@pytest.fixture(scope="module")
def batch():
  return helpers.token_batch(batch=8)


def _manual_loss_and_grads(model, params, batch, m):
  """Reference written independently: average value_and_grad over explicit microbatch slices."""
  x, y = batch
  size = x.shape[0] // m
  losses, grads = [], []
  for i in range(m):
    l, g = jax.value_and_grad(model.loss)(params, x[i * size:(i + 1) * size],
                                          y[i * size:(i + 1) * size])
    losses.append(l)
    grads.append(g)
  return np.mean(losses), jax.tree.map(lambda *g: sum(g) / m, *grads)


@pytest.mark.parametrize("m", [1, 2, 4])
def test_single_backend_equals_manual_microbatching(model, batch, m):
  pipe = hkpipe.Pipeline(model, optax.sgd(0.1), num_microbatches=m, donate=False)
  state = pipe.init(jax.random.key(0), batch)
  loss, grads = pipe.loss_and_grads(state, batch)
  ref_loss, ref_grads = _manual_loss_and_grads(model, pipe.params(state), batch, m)
  helpers.assert_trees_close(loss, ref_loss)
  helpers.assert_trees_close(grads, ref_grads)


def test_negative_control_wrong_layer_order_fails(model, batch):
  """The equivalence check must catch a pipeline that runs layers in the wrong order."""
  swapped = list(model.layers)
  swapped[2], swapped[3] = swapped[3], swapped[2]
  wrong = hkpipe.SequentialModel(swapped, model.loss_fn)
  pipe = hkpipe.Pipeline(model, optax.sgd(0.1), donate=False)
  state = pipe.init(jax.random.key(0), batch)
  _, grads = pipe.loss_and_grads(state, batch)
  _, wrong_grads = jax.value_and_grad(wrong.loss)(pipe.params(state), *batch)
  with pytest.raises(AssertionError):
    helpers.assert_trees_close(wrong_grads, grads)


def test_clipping_uses_global_norm(model, batch):
  pipe = hkpipe.Pipeline(model, optax.sgd(1.0), max_grad_norm=0.05, donate=False)
  state = pipe.init(jax.random.key(0), batch)
  _, grads = pipe.loss_and_grads(state, batch)
  new_state, metrics = pipe.train_step(state, batch)
  norm = optax.tree.norm(grads)
  helpers.assert_trees_close(metrics["grad_norm"], norm)
  clipped, _ = optax.clip_by_global_norm(0.05).update(grads, optax.EmptyState())
  expected = jax.tree.map(lambda p, g: p - g, pipe.params(state), clipped)
  helpers.assert_trees_close(pipe.params(new_state), expected)


def test_train_step_reduces_loss_and_counts_steps(model, batch):
  pipe = hkpipe.Pipeline(model, optax.adam(1e-2), num_microbatches=2)
  state = pipe.init(jax.random.key(0), batch)
  first = None
  for _ in range(5):
    state, metrics = pipe.train_step(state, batch)
    first = first if first is not None else float(metrics["loss"])
  assert state.step == 5
  assert float(pipe.eval_step(state, batch)["loss"]) < first


def test_dropout_keys_depend_on_step_and_microbatch():
  k = jax.random.key(0)
  keys = [model_lib.microbatch_rng(k, s, mb) for s in range(2) for mb in range(2)]
  data = {tuple(np.asarray(jax.random.key_data(x)).tolist()) for x in keys}
  assert len(data) == 4
  assert model_lib.microbatch_rng(None, 0, 0) is None


def test_ties_init_equal_and_grads_summed():
  def emb(x, is_training):
    del is_training
    return hk.Embed(5, 3, name="tok")(x)

  def head(x, is_training):
    del is_training
    w = hk.get_parameter("w", [5, 3], init=hk.initializers.RandomNormal(), name=None) \
        if False else hk.Linear(5, with_bias=False, name="out")(x)
    return w

  def head_tied(x, is_training):
    del is_training
    w = hk.get_parameter("w", [5, 3], init=hk.initializers.RandomNormal())
    return x @ w.T                                                   # [B, T, 5]

  tie = hkpipe.Tie(source=("embed", "tok", "embeddings"), target=("head", "~", "w"))
  model = hkpipe.SequentialModel(
      [hkpipe.Layer.from_fn("embed", emb), hkpipe.Layer.from_fn("head", head_tied)],
      helpers.token_ce, ties=(tie,))
  del head
  x, y = helpers.token_batch(batch=4, vocab=5)
  params = model.init(jax.random.key(1), x)
  chex.assert_trees_all_equal(params["embed"]["tok"]["embeddings"], params["head"]["~"]["w"])
  grads = jax.grad(model.loss)(params, x, y)
  tied = model_lib.tie_grads(grads, model.ties)
  total = grads["embed"]["tok"]["embeddings"] + grads["head"]["~"]["w"]
  chex.assert_trees_all_close(tied["embed"]["tok"]["embeddings"], total)
  chex.assert_trees_all_close(tied["head"]["~"]["w"], total)
  assert hkpipe.count_params(params, model.ties) == 15


def test_restrict_and_merge_round_trip_optax_state(model, batch):
  opt = optax.adamw(1e-3, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
  params = model.init(jax.random.key(0), batch[0])
  state = opt.init(params)
  names = model.layer_names
  parts = [names[:3], names[3:]]
  pieces = [canonical.restrict(state, p, names) for p in parts]
  chex.assert_trees_all_equal_structs(pieces[0], opt.init({k: params[k] for k in parts[0]}))
  merged = canonical.merge(pieces, parts)
  chex.assert_trees_all_equal_structs(merged, state)
  chex.assert_trees_all_equal(merged, state)


def test_bad_inputs_raise_before_compiling(model, batch):
  with pytest.raises(ValueError, match="Unknown backend"):
    hkpipe.Pipeline(model, optax.sgd(0.1), backend="tpu_magic")
  with pytest.raises(TypeError, match="Unknown Pipeline options"):
    hkpipe.Pipeline(model, optax.sgd(0.1), microbatches=2)
  with pytest.raises(ValueError, match="num_microbatches"):
    hkpipe.Pipeline(model, optax.sgd(0.1), num_microbatches=0)
  with pytest.raises(ValueError, match="max_grad_norm"):
    hkpipe.Pipeline(model, optax.sgd(0.1), max_grad_norm=-1.0)
  with pytest.raises(TypeError, match="SequentialModel"):
    hkpipe.Pipeline(lambda x: x, optax.sgd(0.1))
  pipe = hkpipe.Pipeline(model, optax.sgd(0.1), num_microbatches=3)
  with pytest.raises(ValueError, match="not divisible by num_microbatches=3"):
    pipe.init(jax.random.key(0), batch)
  with pytest.raises(ValueError, match="pair"):
    pipe.init(jax.random.key(0), batch[0])
  with pytest.raises(ValueError, match="same leading"):
    pipe.init(jax.random.key(0), (batch[0], batch[1][:4]))
  with pytest.raises(ValueError, match="unique"):
    hkpipe.SequentialModel([model.layers[0], model.layers[0]], model.loss_fn)


def test_bf16_compute_keeps_fp32_params(batch):
  model = helpers.hetero_model()
  layers = [hkpipe.with_compute_dtype(l, jnp.bfloat16) for l in model.layers]
  bf = hkpipe.SequentialModel(layers, model.loss_fn)
  pipe = hkpipe.Pipeline(bf, optax.sgd(0.1), donate=False)
  state = pipe.init(jax.random.key(0), batch)
  loss, grads = pipe.loss_and_grads(state, batch)
  chex.assert_type(jax.tree.leaves(grads), jnp.float32)
  ref_loss, _ = hkpipe.Pipeline(model, optax.sgd(0.1), donate=False).loss_and_grads(state, batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=2e-2)


# -- the facade: what callers read instead of ``pipe.backend`` ------------------------------------


def test_facade_layout_is_the_resolved_stages_or_none(model, batch):
  """``Pipeline.layout``: None without stages; spmd's after init; mpmd's at once with explicit
  boundaries. The stages are checked against the boundaries given, not against the backend."""
  names = model.layer_names
  for backend in ("single", "pmap"):
    assert hkpipe.Pipeline(model, optax.sgd(0.1), backend=backend).layout is None
  devices = jax.devices()[:2]
  mpmd = hkpipe.Pipeline(model, optax.sgd(0.1), backend="mpmd", devices=devices, partition=[2])
  spmd = hkpipe.Pipeline(model, optax.sgd(0.1), backend="spmd", devices=devices,
                         num_microbatches=2)
  with pytest.raises(ValueError, match="call init"):
    spmd.layout  # pylint: disable=pointless-statement
  spmd.init(jax.random.key(0), batch)
  for pipe in (mpmd, spmd):
    layout = pipe.layout
    assert isinstance(layout, layout_lib.Layout)
    assert sum((s.layer_names for s in layout.stages), ()) == tuple(names)
    assert list(layout.device_grid[:, 0]) == devices
    assert layout.schedule.name == "1f1b"
  assert [s.layer_names for s in mpmd.layout.stages] == [tuple(names[:2]), tuple(names[2:])]


def test_facade_data_layout_matches_the_data_sampler(model):
  """``data_layout`` names the rows ``hkpipe.data.sample_batch`` draws for a process: checked
  against slicing the sampler's full global batch."""
  single = hkpipe.Pipeline(model, optax.sgd(0.1)).data_layout(8)
  assert single == hkpipe.DataLayout(global_batch=8, process_index=0, process_count=1)
  assert single.rows == slice(0, 8) and single.local_batch == 8
  tokens = np.arange(200, dtype=np.int32)
  full = hkpipe.data.sample_batch(tokens, batch_size=12, seq_len=4, seed=0, step=3)
  for index in range(3):
    part = pipeline_lib.split_global_batch(12, 3, index)
    assert part.local_batch == 4 and part.rows == slice(4 * index, 4 * index + 4)
    mine = hkpipe.data.sample_batch(tokens, batch_size=12, seq_len=4, seed=0, step=3,
                                    process_index=part.process_index,
                                    process_count=part.process_count)
    np.testing.assert_array_equal(mine[0], full[0][part.rows])
  assert pipeline_lib.split_global_batch(12, 1, 5).process_index == 0   # one share: the whole batch
  with pytest.raises(hkpipe.ConfigError, match="multiple of 3"):
    pipeline_lib.split_global_batch(10, 3, 0)
  with pytest.raises(hkpipe.ConfigError, match="positive int, got 0"):
    hkpipe.Pipeline(model, optax.sgd(0.1)).data_layout(0)


def test_facade_stats_outside_mpmd_and_spmd_only_reports(model, batch):
  """Timeline/compile statistics are empty on backends that do not record them; the
  spmd-only reports name the backend to use instead."""
  pipe = hkpipe.Pipeline(model, optax.sgd(0.1), num_microbatches=2, donate=False)
  state = pipe.init(jax.random.key(0), batch)
  pipe.train_step(state, batch)
  assert (pipe.last_timeline, pipe.last_stash_peaks, pipe.last_stash_peak_bytes,
          pipe.last_predicted_bytes, pipe.last_measured_bytes) == ((), (), (), (), ())
  assert pipe.compile_stats is None
  with pytest.raises(hkpipe.ConfigError, match="describe is available on backend='mpmd' only; "
                     "this pipeline uses backend='single'"):
    pipe.describe(batch)
  with pytest.raises(hkpipe.ConfigError, match="backend='spmd' only; this pipeline uses "
                     "backend='single'"):
    pipe.layout_report(batch)
  with pytest.raises(hkpipe.ConfigError, match="memory_analysis is available on backend='spmd' or backend='mpmd' only"):
    pipe.memory_analysis(state, batch)
  progress = watchdog.Progress()
  assert hkpipe.Pipeline(model, optax.sgd(0.1), progress=progress).progress is progress
