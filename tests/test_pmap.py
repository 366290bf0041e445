"""The pmap data-parallel backend equals the single-device reference."""

import chex
import haiku as hk
import jax
import numpy as np
import optax
import pytest

import hkpipe
from hkpipe import models
from tests import helpers


@pytest.fixture(scope="module")
def model():
  return helpers.hetero_model()


@pytest.fixture(scope="module")
def batch():
  return helpers.token_batch(batch=8)


def _tokens(batch_size, vocab=32, seq=8, seed=1):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, vocab, (batch_size, seq), dtype=np.int32),
          rng.integers(0, vocab, (batch_size, seq), dtype=np.int32))


def test_matches_reference_on_a_mesh_with_committed_inputs(model, batch):
  """4 devices from a mesh; the batch starts committed to a device outside the mesh."""
  mesh = jax.make_mesh((4,), ("dp",), devices=jax.devices()[2:6])
  elsewhere = jax.device_put(batch, jax.devices()[7])
  pipe, state = helpers.assert_matches_reference(model, elsewhere, num_microbatches=2,
                                                 backend="pmap", mesh=mesh)
  assert pipe.layout is None                  # data parallel only: no pipeline stages
  for leaf in jax.tree.leaves(state.params):  # every mesh device holds an identical replica
    assert {s.device for s in leaf.addressable_shards} == set(jax.devices()[2:6])
    shards = [np.asarray(s.data) for s in leaf.addressable_shards]
    assert len(shards) == 4
    for other in shards[1:]:
      np.testing.assert_array_equal(other, shards[0])


def test_tied_gpt_matches_reference():
  """Ties (embedding = head) are summed after the device mean."""
  gpt = models.build(models.GPTConfig(vocab_size=32, seq_len=8, d_model=16, n_layers=1,
                                      n_heads=2))
  assert gpt.ties
  helpers.assert_matches_reference(gpt, _tokens(8), num_microbatches=2, steps=2, backend="pmap",
                                   devices=jax.devices()[:2])


def test_max_grad_norm_clips_the_global_norm(model, batch):
  kw = dict(num_microbatches=2, max_grad_norm=0.05, donate=False)
  ref = hkpipe.Pipeline(model, optax.sgd(0.5), **kw)
  pipe = hkpipe.Pipeline(model, optax.sgd(0.5), backend="pmap", devices=jax.devices()[:2], **kw)
  state, ref_state = pipe.init(jax.random.key(0), batch), ref.init(jax.random.key(0), batch)
  for _ in range(2):
    state, metrics = pipe.train_step(state, batch)
    ref_state, ref_metrics = ref.train_step(ref_state, batch)
    helpers.assert_trees_close(metrics, ref_metrics)
    assert float(ref_metrics["grad_norm"]) > 2 * 0.05  # the clip is active
  helpers.assert_trees_close(pipe.params(state), ref.params(ref_state), rtol=1e-4, atol=1e-5)


def test_adam_state_canonical_round_trip_and_eval(model, batch):
  """Metrics and eval equal the reference; to_canonical gives optax's own layout; a reference
  state placed with from_canonical continues exactly like the reference."""
  opt = optax.adam(1e-2)
  ref = hkpipe.Pipeline(model, opt, num_microbatches=2, donate=False)
  pipe = hkpipe.Pipeline(model, opt, backend="pmap", num_microbatches=2,
                         devices=jax.devices()[:2])
  ref_state = ref.init(jax.random.key(3), batch)
  state = pipe.init(jax.random.key(3), batch)
  for _ in range(2):
    ref_state, ref_metrics = ref.train_step(ref_state, batch)
    state, metrics = pipe.train_step(state, batch)
    helpers.assert_trees_close(metrics, ref_metrics)
  assert state.step == 2
  helpers.assert_trees_close(pipe.eval_step(state, batch), ref.eval_step(ref_state, batch))
  canonical, expected = pipe.to_canonical(state), ref.to_canonical(ref_state)
  helpers.assert_trees_close(canonical["opt_state"], expected["opt_state"], rtol=1e-4, atol=1e-5)
  helpers.assert_trees_close(canonical["params"], expected["params"], rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_equal(jax.random.key_data(canonical["rng"]),
                              jax.random.key_data(expected["rng"]))
  # Round trip is exact; then continue from the reference's own state.
  again = pipe.to_canonical(pipe.from_canonical(canonical, state.step))
  chex.assert_trees_all_equal(jax.device_get(again["params"]), jax.device_get(canonical["params"]))
  chex.assert_trees_all_equal(jax.device_get(again["opt_state"]),
                              jax.device_get(canonical["opt_state"]))
  state = pipe.from_canonical(expected, ref_state.step)
  state, metrics = pipe.train_step(state, batch)
  ref_state, ref_metrics = ref.train_step(ref_state, batch)
  helpers.assert_trees_close(metrics, ref_metrics)
  helpers.assert_trees_close(pipe.params(state), ref.params(ref_state))


def _dropout_model():
  def embed(x, is_training):
    del is_training
    return hk.Embed(11, 8)(x)                                                    # [B, T, 8]

  def drop(x, is_training):
    x = hk.Linear(8)(x)                                                          # [B, T, 8]
    return hk.dropout(hk.next_rng_key(), 0.5, x) if is_training else x

  def head(x, is_training):
    del is_training
    return hk.Linear(11)(x)                                                      # [B, T, 11]

  layers = [hkpipe.Layer.from_fn("embed", embed), hkpipe.Layer.from_fn("drop", drop),
            hkpipe.Layer.from_fn("head", head)]
  return hkpipe.SequentialModel(layers, helpers.token_ce)


def test_dropout_keys_one_device_exact_two_devices_independent(batch):
  """One device reproduces the reference's dropout exactly; with two, the devices draw
  independent masks (so the loss differs from the reference, but is still deterministic)."""
  model = _dropout_model()
  ref = hkpipe.Pipeline(model, optax.sgd(0.1), num_microbatches=2, donate=False)
  ref_state = ref.init(jax.random.key(42), batch)
  ref_loss, ref_grads = ref.loss_and_grads(ref_state, batch)
  assert abs(float(ref_loss) - float(ref.eval_step(ref_state, batch)["loss"])) > 1e-3
  losses = {}
  for n in (1, 2):
    pipe = hkpipe.Pipeline(model, optax.sgd(0.1), backend="pmap", num_microbatches=2,
                           devices=jax.devices()[:n], donate=False)
    state = pipe.from_canonical(ref.to_canonical(ref_state), 0)
    losses[n], grads = pipe.loss_and_grads(state, batch)
    if n == 1:
      helpers.assert_trees_close(losses[n], ref_loss)
      helpers.assert_trees_close(grads, ref_grads)
    else:
      assert float(losses[n]) == float(pipe.loss_and_grads(state, batch)[0])
  assert abs(float(losses[2]) - float(ref_loss)) > 1e-4


def test_bad_inputs_raise_clear_errors(model, batch):
  with pytest.raises(ValueError, match=r"multiple of 4 \* 2 = 8"):
    pipe = hkpipe.Pipeline(model, optax.sgd(0.1), backend="pmap", num_microbatches=2,
                           devices=jax.devices()[:4])
    pipe.init(jax.random.key(0), helpers.token_batch(batch=4))
  with pytest.raises(ValueError, match="either devices"):
    hkpipe.Pipeline(model, optax.sgd(0.1), backend="pmap",
                    devices=jax.devices()[:2], mesh=jax.make_mesh((2,), ("dp",)))
  with pytest.raises(ValueError, match="twice"):
    hkpipe.Pipeline(model, optax.sgd(0.1), backend="pmap", devices=[jax.devices()[0]] * 2)
  pipe = hkpipe.Pipeline(model, optax.sgd(0.1), backend="pmap", num_microbatches=2,
                         devices=jax.devices()[:2])
  state = pipe.init(jax.random.key(0), batch)
  with pytest.raises(ValueError, match=r"multiple of 2 \* 2 = 4"):
    pipe.train_step(state, helpers.token_batch(batch=6))
