"""Attention through jax.nn.dot_product_attention equals the reference einsum attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hkpipe
from hkpipe import models
from hkpipe._src.models import attention
from hkpipe._src.models import common


def _qkv(t, h, kv, hd=8, b=2, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (b, t, h, hd)), jax.random.normal(ks[1], (b, t, kv, hd)),
          jax.random.normal(ks[2], (b, t, kv, hd)))


def _value_and_grads(fn, q, k, v):
  return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v))),
                                    argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("kv", [2, 1])      # grouped-query and multi-query
def test_causal_equals_einsum_reference(kv):
  q, k, v = _qkv(9, 4, kv)
  ref = jax.jit(common.causal_attention)(q, k, v)
  np.testing.assert_allclose(jax.jit(attention.causal, static_argnums=3)(q, k, v, "xla"), ref,
                             rtol=1e-5, atol=1e-6)
  got = _value_and_grads(lambda q, k, v: attention.causal(q, k, v, "xla"), q, k, v)
  want = _value_and_grads(common.causal_attention, q, k, v)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("start,t", [(0, 5), (6, 3)])
def test_cache_path_equals_einsum_reference(start, t):
  q, k, v = _qkv(11, 4, 2)          # cache of length 11, GQA 4 query heads over 2 kv heads
  pos = start + jnp.arange(t)
  ref = jax.jit(common.cached_attention)(q[:, :t], k, v, pos)
  np.testing.assert_allclose(jax.jit(attention.over_cache)(q[:, :t], k, v, pos), ref, rtol=1e-5,
                             atol=1e-6)


def test_model_block_equals_einsum_block(monkeypatch):
  """A whole Llama (GQA, RoPE) forward equals the same model with the einsum attention."""
  cfg = models.LlamaConfig(vocab_size=32, seq_len=8, d_model=32, n_layers=2, n_heads=4,
                           n_kv_heads=2)
  model = models.build(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 32)
  params = model.init(jax.random.key(0), tokens)
  out = jax.jit(model.apply)(params, tokens)
  monkeypatch.setattr(attention, "causal", lambda q, k, v, impl: common.causal_attention(q, k, v))
  ref = jax.jit(model.apply)(params, tokens)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_unknown_impl_is_a_config_error():
  with pytest.raises(hkpipe.ConfigError, match="attention_impl='flash'"):
    models.GPTConfig(vocab_size=8, seq_len=4, d_model=8, n_layers=1, n_heads=2,
                     attention_impl="flash")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the non-GPU error")
def test_cudnn_without_gpu_is_a_config_error():
  cfg = models.GPTConfig(vocab_size=8, seq_len=4, d_model=8, n_layers=1, n_heads=2,
                         attention_impl="cudnn")
  with pytest.raises(hkpipe.ConfigError, match="needs an NVIDIA GPU"):
    models.build(cfg)
