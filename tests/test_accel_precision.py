"""Mixed-precision policies: per-layer bf16 compute trains like float32."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hkpipe
from hkpipe import models
from hkpipe import precision

_BASE = dict(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=4)


def _losses(dtype, steps=6):
  model = models.build(models.GPTConfig(**_BASE, dtype=dtype))
  x = jax.random.randint(jax.random.key(1), (8, 16), 0, 64)
  batch = (x, jnp.roll(x, -1, axis=1))
  pipe = hkpipe.Pipeline(model, optax.adamw(3e-3, b1=0.9, b2=0.95, weight_decay=0.1),
                         donate=False)
  state = pipe.init(jax.random.key(0), batch)
  out = []
  for _ in range(steps):
    state, metrics = pipe.train_step(state, batch)
    out.append(float(metrics["loss"]))
  return np.array(out), pipe.params(state)


def test_bf16_policy_trains_like_float32():
  f32, f32_params = _losses("float32")
  bf16, bf16_params = _losses("params=float32,compute=bfloat16,output=float32")
  assert f32[-1] < f32[0] - 0.1                               # the run really trains
  np.testing.assert_allclose(bf16, f32, rtol=2e-2)            # bf16 tolerance
  assert not np.array_equal(bf16, f32)                        # bf16 compute is really active
  for leaf in jax.tree.leaves(bf16_params):                   # parameters stay float32
    assert leaf.dtype == jnp.float32


def test_policy_dtypes_per_layer():
  model = models.build(models.LlamaConfig(**_BASE, dtype="bfloat16"))
  x = jnp.zeros((2, 16), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)
  assert {l.dtype for l in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  h = jax.eval_shape(lambda p: model.layers[0].apply(p["embed"], None, x, is_training=False),
                     params)
  assert h.dtype == jnp.bfloat16                             # activations between layers: bf16
  logits = jax.eval_shape(lambda p: model.apply(p, x), params)
  assert logits.dtype == jnp.float32                         # output dtype


def test_policy_strings():
  assert precision.get_policy("bfloat16") == precision.Policy(compute_dtype=jnp.bfloat16)
  assert precision.get_policy("p=f32,c=bf16,o=bf16") == precision.Policy(
      compute_dtype=jnp.bfloat16, output_dtype=jnp.bfloat16)
  with pytest.raises(hkpipe.ConfigError, match="unknown key 'compute_dtype'"):
    precision.get_policy("compute_dtype=bf16")
  with pytest.raises(ValueError, match="unknown dtype 'int8'"):
    models.GPTConfig(**_BASE, dtype="params=float32,compute=int8")
