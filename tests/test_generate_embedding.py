"""The token embedding is a gather that equals the one-hot matmul (issue #12, part 6)."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hkpipe._src.models import common

V, D = 64, 16


def one_hot_matmul(w, ids):
  """The previous embedding: ``one_hot(ids) @ w``."""
  return jnp.einsum("btv,vd->btd", jax.nn.one_hot(ids, w.shape[0], dtype=w.dtype), w)


def table_and_ids():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(V, D)), jnp.float32)
  ids = rng.integers(0, V, (4, 8)).astype(np.int32)
  ids[0, :3] = [-1, V, 5]  # out of range on both sides, and a repeated id below
  ids[1, :3] = 5
  return w, jnp.asarray(ids)


def test_lookup_forward_and_grads_equal_the_one_hot_matmul():
  w, ids = table_and_ids()
  np.testing.assert_array_equal(np.asarray(common.lookup(w, ids)),
                                np.asarray(one_hot_matmul(w, ids)))
  cot = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8, D)), jnp.float32)
  grad = lambda f: jax.grad(lambda t: jnp.sum(f(t, ids) * cot))(w)       # [V, D]
  np.testing.assert_allclose(np.asarray(grad(common.lookup)), np.asarray(grad(one_hot_matmul)),
                             rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(grad(common.lookup)[5]).sum()) > 0  # the repeated id's rows add up


def test_token_embedding_module_is_the_lookup():
  _, ids = table_and_ids()
  f = hk.without_apply_rng(hk.transform(lambda t: common.TokenEmbedding(V, D, name="wte")(t)))
  params = f.init(jax.random.key(0), ids)
  np.testing.assert_array_equal(np.asarray(f.apply(params, ids)),
                                np.asarray(one_hot_matmul(params["wte"]["embeddings"], ids)))


def test_vocab_sharded_table_is_partitioned_not_gathered():
  w, ids = table_and_ids()
  mesh = jax.make_mesh((2, 2), ("dp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  w_sh = jax.device_put(w, NamedSharding(mesh, P("tp", None)))          # vocab-sharded
  ids_sh = jax.device_put(ids, NamedSharding(mesh, P("dp", None)))      # batch-sharded
  compiled = jax.jit(common.lookup).lower(w_sh, ids_sh).compile()
  text = compiled.as_text()
  assert "all-gather" not in text  # no device assembles the whole table
  assert f"f32[{V // 2},{D}]" in text  # each device gathers from its own vocab shard
  np.testing.assert_array_equal(np.asarray(compiled(w_sh, ids_sh)),
                                np.asarray(one_hot_matmul(w, ids)))


@pytest.mark.parametrize("table_spec", [P("tp", None), P(None, None), P(None, "tp")])
def test_lookup_under_explicit_axes(table_spec):
  """Explicit mesh axes reject a plain gather on batch-sharded ids; the lookup names its output
  sharding, and still equals the one-hot matmul (forward and gradient) without an all-gather."""
  w, ids = table_and_ids()
  mesh = jax.make_mesh((2, 2), ("dp", "tp"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  w_sh = jax.device_put(w, NamedSharding(mesh, table_spec))
  ids_sh = jax.device_put(ids, NamedSharding(mesh, P("dp", None)))
  cot = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8, D)), jnp.float32)
  with jax.set_mesh(mesh):
    fwd = jax.jit(common.lookup)
    y = fwd(w_sh, ids_sh)
    assert "all-gather" not in fwd.lower(w_sh, ids_sh).compile().as_text()
    g = jax.jit(jax.grad(lambda t, i: jnp.sum(common.lookup(t, i) * cot)))(w_sh, ids_sh)
  assert y.sharding.spec == P("dp", None, table_spec[1])
  np.testing.assert_array_equal(np.asarray(y), np.asarray(one_hot_matmul(w, ids)))
  want = jax.grad(lambda t: jnp.sum(one_hot_matmul(t, ids) * cot))(w)
  np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-6, atol=1e-6)
