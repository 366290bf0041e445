"""Chunked cross-entropy equals the plain loss and its gradients, and saves the logits memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hkpipe import models


def _plain(h, w, y, **kw):
  logits = jnp.einsum("btd,vd->btv", h, w).astype(jnp.float32)          # the LMHead reference
  return models.cross_entropy(logits, y, **kw)


def _chunked(h, w, y, chunk, **kw):
  return models.chunked_cross_entropy(models.HeadOutput(h, w), y, chunk_size=chunk, **kw)


@pytest.mark.parametrize("chunk,kw", [(4, {}), (5, {"z_loss": 1e-4, "label_smoothing": 0.1})])
def test_chunked_equals_plain_loss_and_grads(chunk, kw):
  ks = jax.random.split(jax.random.key(0), 3)
  h = jax.random.normal(ks[0], (2, 7, 16))          # 14 tokens: chunk 5 needs padding
  w = jax.random.normal(ks[1], (50, 16)) * 0.3
  y = jax.random.randint(ks[2], (2, 7), 0, 50)
  want = jax.jit(jax.value_and_grad(functools.partial(_plain, **kw), argnums=(0, 1)))(h, w, y)
  got = jax.jit(jax.value_and_grad(functools.partial(_chunked, chunk=chunk, **kw),
                                   argnums=(0, 1)))(h, w, y)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_model_with_loss_chunk_size_matches_plain_model():
  base = dict(vocab_size=40, seq_len=8, d_model=16, n_layers=1, n_heads=2)
  plain = models.build(models.GPTConfig(**base))
  chunked = models.build(models.GPTConfig(**base, loss_chunk_size=6))
  x = jax.random.randint(jax.random.key(1), (2, 8), 0, 40)
  y = jnp.roll(x, -1, axis=1)
  params = plain.init(jax.random.key(0), x)
  grad = lambda m: jax.jit(jax.value_and_grad(lambda p: m.loss(p, x, y, is_training=False)))(
      params)
  for a, b in zip(jax.tree.leaves(grad(chunked)), jax.tree.leaves(grad(plain))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bad_loss_chunk_size_is_rejected():
  with pytest.raises(ValueError, match="loss_chunk_size=0"):
    models.LlamaConfig(vocab_size=8, seq_len=4, d_model=8, n_layers=1, n_heads=2,
                       loss_chunk_size=0)


def _temp_bytes(fn, *args):
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile(
      ).memory_analysis().temp_size_in_bytes


def test_memory_at_vocab_128k():
  """The compiler's temp memory: plain holds [N, V] float32 logits, chunked never does."""
  n, d, v, chunk = 256, 64, 131072, 32
  h = jax.ShapeDtypeStruct((1, n, d), jnp.float32)
  w = jax.ShapeDtypeStruct((v, d), jnp.float32)
  y = jax.ShapeDtypeStruct((1, n), jnp.int32)
  logits_bytes = n * v * 4
  plain = _temp_bytes(_plain, h, w, y)
  chunked = _temp_bytes(functools.partial(_chunked, chunk=chunk), h, w, y)
  print(f"temp bytes at V={v}, N={n}: plain {plain}, chunked {chunked}")
  assert plain >= logits_bytes
  assert chunked < logits_bytes // 2


@pytest.mark.parametrize("use_cache", [False, True])
def test_generate_with_chunked_head_matches_plain(use_cache):
  base = dict(vocab_size=40, seq_len=8, d_model=16, n_layers=1, n_heads=2)
  plain = models.build(models.GPTConfig(**base))
  chunked = models.build(models.GPTConfig(**base, loss_chunk_size=6))
  prompt = jax.random.randint(jax.random.key(1), (2, 3), 0, 40)
  params = plain.init(jax.random.key(0), prompt)
  run = lambda m: models.generate(m, params, prompt, max_new_tokens=5, rng=jax.random.key(2),
                                  temperature=0.0, use_cache=use_cache)
  np.testing.assert_array_equal(run(chunked), run(plain))
