"""The training step's math (hkpipe/_src/step.py): the global gradient norm counts each tied
weight once, on every backend, and clipping uses that norm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hkpipe
from hkpipe._src import step as step_lib
from tests import helpers

M, LR, KEY = 2, 0.5, jax.random.key(3)
# mid_0.w = mid_1.w (stages 0 and 1 of a cut before layer 3: a cross-stage tie) and
# mid_2.w = mid_3.w (both on stage 1: a tie within a stage).
TIES = (hkpipe.Tie(("mid_0", "linear", "w"), ("mid_1", "linear", "w")),
        hkpipe.Tie(("mid_2", "linear", "w"), ("mid_3", "linear", "w")))
BOUNDARY = [3]  # stage 0: embed, widen, mid_0; stage 1: mid_1 .. head


def _model() -> hkpipe.SequentialModel:
  base = helpers.hetero_model(n_mid=4)
  return hkpipe.SequentialModel(base.layers, base.loss_fn, TIES)


def _one_weight(params: dict) -> dict:
  """The params as the model sees them with every tie as one weight: each target is its source
  (written out here, independently of hkpipe's tie helpers)."""
  out = {layer: {mod: dict(leaves) for mod, leaves in mods.items()}
         for layer, mods in params.items()}
  for (sl, sm, sn), (tl, tm, tn) in ((t.source, t.target) for t in TIES):
    out[tl][tm][tn] = out[sl][sm][sn]
  return out


def _expected(model, params, batch, max_norm):
  """From ``jax.grad`` of the mean microbatch loss with the ties applied by hand: the gradient
  of each tied weight sits once, on its source (its target's gradient is 0 here); its norm is
  the expected global norm, and plain SGD with that clip gives the expected next params."""
  x, y = batch
  size = x.shape[0] // M

  def loss(p):
    q = _one_weight(p)
    return sum(model.loss(q, x[i * size:(i + 1) * size], y[i * size:(i + 1) * size])
               for i in range(M)) / M

  g = jax.grad(loss)(params)
  norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(v, np.float64)))
                           for v in jax.tree.leaves(g))))
  scale = 1.0 if max_norm is None else min(1.0, max_norm / norm)
  new = jax.tree.map(lambda w, d: w - LR * scale * d, params, g)
  return norm, _one_weight(new)


def _pipe(model, backend, **kw):
  if backend in ("spmd", "mpmd"):
    kw = dict(devices=jax.devices()[:2], schedule="1f1b", partition=BOUNDARY, **kw)
  if backend == "pmap":
    kw = dict(devices=jax.devices()[:2], **kw)
  return hkpipe.Pipeline(model, optax.sgd(LR), backend=backend, num_microbatches=M,
                         donate=False, **kw)


@pytest.mark.parametrize("backend, max_grad_norm, skip_nonfinite", [
    ("single", 0.05, True), ("pmap", 0.05, True), ("spmd", 0.05, True), ("mpmd", 0.05, True),
    # MPMD without clipping and guard fuses the norm into each stage's update program.
    ("mpmd", None, False)])
def test_global_norm_counts_each_tied_weight_once(backend, max_grad_norm, skip_nonfinite):
  model, batch = _model(), helpers.token_batch(batch=8, seq=5)
  pipe = _pipe(model, backend, max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite)
  state = pipe.init(KEY, batch)
  params = jax.device_get(pipe.params(state))
  norm, new_params = _expected(model, params, batch, max_grad_norm)
  if max_grad_norm is not None:
    assert norm > 2 * max_grad_norm  # the clip is active
  state, metrics = pipe.train_step(state, batch)
  helpers.assert_trees_close(metrics["grad_norm"], np.float32(norm))
  helpers.assert_trees_close(pipe.params(state), new_params, rtol=1e-4, atol=1e-5)


def test_clip_by_global_norm_takes_the_squared_norm_as_an_extra_argument():
  clip = step_lib.clip_by_global_norm(1.0)
  assert isinstance(clip, optax.GradientTransformationExtraArgs)
  grads = {"a": jnp.array([3.0, 4.0])}
  state = clip.init(grads)
  # The norm of these grads alone is 5, but the global one (other stages) is 10: scale 0.1.
  out, _ = clip.update(grads, state, global_sq_norm=jnp.float32(100.0))
  np.testing.assert_allclose(out["a"], [0.3, 0.4], rtol=1e-6)
  out, _ = clip.update(grads, state, global_sq_norm=jnp.float32(0.25))  # below 1: unchanged
  np.testing.assert_allclose(out["a"], [3.0, 4.0])
  same, _ = step_lib.clip_by_global_norm(None).update(grads, state)
  assert same is grads
  with pytest.raises(ValueError, match="global_sq_norm"):
    clip.update(grads, state)
