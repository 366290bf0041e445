"""Tests of the gpt-oss style mixture-of-experts model (hkpipe.models.MoEConfig)."""

from __future__ import annotations

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hkpipe
import hkpipe.models as M
from hkpipe._src.models import llama
from hkpipe._src.models import losses
from hkpipe._src.models import moe
from hkpipe._src.models import moe_attention
from hkpipe._src.models import moe_layer
from tests import helpers

V, T = 32, 8
BASE = dict(vocab_size=V, seq_len=T, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24,
            n_experts=4, experts_per_token=2)
CONFIG = M.MoEConfig(**BASE, sliding_window=3, attention_sinks=True, load_balance_weight=0.1,
                     router_z_weight=0.01)


def tokens(batch: int = 4, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, V, (batch, T), dtype=np.int32)


def _rand(rng, *shape, scale=0.3):
  return (scale * rng.standard_normal(shape)).astype(np.float32)


def _experts(rng, e=4, d=6, f=5):
  return _rand(rng, e, d, f), _rand(rng, e, d, f), _rand(rng, e, f, d)


def _swiglu(x, wg, wu, wd):
  g = x @ wg
  return ((g / (1.0 + np.exp(-g))) * (x @ wu)) @ wd


def _np_route(logits, k, softmax):
  """Top-k by a plain sort (ties broken by the lower index, as lax.top_k)."""
  experts = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
  top = np.take_along_axis(logits, experts, axis=-1)
  if softmax == "topk":
    w = np.exp(top - top.max(-1, keepdims=True))
    return experts, w / w.sum(-1, keepdims=True)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  return experts, np.take_along_axis(p, experts, axis=-1)


# ---------------------------------------------------------------------------------------------
# The grouped expert computation and the router.


@pytest.mark.parametrize("softmax,capacity_factor", [("topk", None), ("all", None),
                                                      ("topk", 0.5)])
def test_grouped_experts_equal_token_by_token_reference(softmax, capacity_factor):
  """ragged_dot over expert groups == each token through each of its experts, one at a time
  (with a capacity, the later assignments of an over-full expert contribute nothing)."""
  rng = np.random.default_rng(1)
  n, d, e, k = 13, 6, 4, 2
  x, logits = _rand(rng, n, d, scale=1.0), _rand(rng, n, e, scale=2.0)
  wg, wu, wd = _experts(rng, e, d)
  capacity = moe_layer.capacity_of(n, k, e, capacity_factor)
  routing = moe_layer.route(jnp.asarray(logits), k, softmax, capacity)
  got = jax.jit(moe_layer.grouped_swiglu)(jnp.asarray(x), routing, wg, wu, wd)

  experts, weights = _np_route(logits, k, softmax)
  np.testing.assert_array_equal(np.asarray(routing.experts), experts)
  want = np.zeros((n, d), np.float32)
  taken = np.zeros(e, int)
  dropped = 0
  for t in range(n):            # token-major order decides who is dropped
    for j in range(k):
      ex = experts[t, j]
      taken[ex] += 1
      if capacity is not None and taken[ex] > capacity:
        dropped += 1
        continue
      want[t] += weights[t, j] * _swiglu(x[t], wg[ex], wu[ex], wd[ex])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  assert int((~np.asarray(routing.kept)).sum()) == dropped
  if capacity_factor is not None:
    assert dropped > 0  # the case exercises dropping


def test_one_expert_block_equals_llama_swiglu_block():
  """E=1, k=1, no aux weights: an MoE block is a Llama block with the expert as its SwiGLU."""
  kw = dict(BASE, n_experts=1, experts_per_token=1, load_balance_weight=0.0,
            router_z_weight=0.0)
  c = M.MoEConfig(**kw)
  lc = M.LlamaConfig(**{f: kw[f] for f in ("vocab_size", "seq_len", "d_model", "n_layers",
                                           "n_heads", "n_kv_heads", "d_ff")})
  h = jnp.asarray(_rand(np.random.default_rng(2), 3, T, 16, scale=1.0))
  aux = jnp.zeros((3,), jnp.float32)
  block = hk.transform(functools.partial(moe.block_fn, is_training=False, config=c, layer=1))
  params = jax.jit(block.init)(jax.random.key(0), (h, aux))
  lparams = {k: v for k, v in params.items() if k != "moe"}
  lparams["mlp"] = {n: params["moe"][n][0] for n in ("w_gate", "w_up", "w_down")}
  ref = hk.transform(functools.partial(llama.block_fn, is_training=False, config=lc))
  got_h, got_aux = jax.jit(block.apply)(params, None, (h, aux))
  np.testing.assert_allclose(got_h, jax.jit(ref.apply)(lparams, None, h), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got_aux, aux)


def test_aux_losses_equal_numpy():
  rng = np.random.default_rng(3)
  n, e, k = 20, 5, 2
  logits = _rand(rng, n, e, scale=2.0)
  routing = moe_layer.route(jnp.asarray(logits), k, "topk", None)
  experts, _ = _np_route(logits, k, "topk")
  f = np.bincount(experts.reshape(-1), minlength=e) / (n * k)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p = (p / p.sum(-1, keepdims=True)).mean(0)
  lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  np.testing.assert_allclose(moe_layer.load_balance_loss(routing), e * np.sum(f * p), rtol=1e-5)
  np.testing.assert_allclose(moe_layer.router_z_loss(routing), np.mean(lse ** 2), rtol=1e-5)
  np.testing.assert_allclose(moe_layer.expert_load(routing), f, rtol=1e-6)
  c = M.MoEConfig(**BASE, load_balance_weight=0.3, router_z_weight=0.02)
  np.testing.assert_allclose(moe.aux_loss(routing, c),
                             0.3 * e * np.sum(f * p) + 0.02 * np.mean(lse ** 2), rtol=1e-5)


def test_model_loss_adds_every_blocks_aux_loss():
  """loss == cross-entropy of the logits + sum over blocks of numpy aux losses of the logits
  each block's router saw (captured by re-running the blocks one by one)."""
  model = M.build(CONFIG)
  x, y = tokens(seed=4), tokens(seed=5)
  params = jax.jit(model.init)(jax.random.key(0), x)
  h = model.layers[0].apply(params["embed"], None, x, is_training=False)[0]
  expected_aux = 0.0
  for i in range(CONFIG.n_layers):
    fn = hk.transform(lambda v, i=i: moe._block(v, False, CONFIG, i))
    h, routing = jax.jit(fn.apply)(params[f"block_{i}"], None, h)
    logits = np.asarray(routing.logits, np.float64)
    experts, _ = _np_route(logits, CONFIG.experts_per_token, "topk")
    f = np.bincount(experts.reshape(-1), minlength=CONFIG.n_experts) / experts.size
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).mean(0)
    lse = np.log(np.exp(logits).sum(-1))
    expected_aux += (CONFIG.load_balance_weight * CONFIG.n_experts * np.sum(f * p)
                     + CONFIG.router_z_weight * np.mean(lse ** 2))
  ce = losses.cross_entropy(jax.jit(model.apply)(params, x), y)
  np.testing.assert_allclose(jax.jit(model.loss)(params, x, y), ce + expected_aux, rtol=1e-5)
  assert expected_aux > 0.01  # the aux term is visible in the loss


# ---------------------------------------------------------------------------------------------
# Attention: sliding window and sinks.


def test_sink_window_attention_equals_numpy():
  rng = np.random.default_rng(6)
  b, t, h, kv, hd, w = 2, 7, 4, 2, 4, 3
  q, k, v = _rand(rng, b, t, h, hd, scale=1.0), _rand(rng, b, t, kv, hd), _rand(rng, b, t, kv, hd)
  sinks = _rand(rng, h, scale=1.0)
  got = moe_attention.sink_attention(jnp.asarray(q), k, v, jnp.arange(t), window=w, sinks=sinks)
  want = np.zeros((b, t, h, hd), np.float32)
  for bi in range(b):
    for hi in range(h):
      g = hi // (h // kv)
      for i in range(t):
        js = [j for j in range(t) if j <= i and i - j < w]
        s = np.array([q[bi, i, hi] @ k[bi, j, g] / np.sqrt(hd) for j in js])
        z = np.exp(np.append(s, sinks[hi]) - max(s.max(), sinks[hi]))
        pr = z[:-1] / z.sum()
        want[bi, i, hi] = sum(pr[n] * v[bi, j, g] for n, j in enumerate(js))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window,sinks", [(3, True),
                                          pytest.param(2, False, marks=pytest.mark.slow)])
def test_generation_cached_equals_recompute(window, sinks):
  c = CONFIG.replace(sliding_window=window, attention_sinks=sinks)
  model = M.build(c)
  x = tokens(batch=2, seed=7)
  params = jax.jit(model.init)(jax.random.key(1), x)
  if sinks:  # non-zero sinks, so they matter
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: a + 0.5 if "sinks" in jax.tree_util.keystr(p) else a, params)
  kw = dict(max_new_tokens=T - 3, rng=jax.random.key(2), temperature=0.0)
  got = M.generate(model, params, x[:, :3], use_cache=True, **kw)
  want = M.generate(model, params, x[:, :3], use_cache=False, **kw)
  np.testing.assert_array_equal(got, want)
  # The prefill over the whole window gives the training logits (window and sinks in the cache).
  layers = model.layers
  caches = [l.init_cache(2, T) for l in layers]
  from hkpipe._src.models import cached  # pylint: disable=g-import-not-at-top
  logits, _ = jax.jit(lambda p, c: cached.apply_range(layers, p, x, c, 0))(params, caches)
  np.testing.assert_allclose(logits, jax.jit(model.apply)(params, x), rtol=1e-5, atol=1e-5)


def test_window_and_sinks_change_the_model():
  x = tokens(seed=8)
  full = M.build(CONFIG.replace(sliding_window=None, attention_sinks=False))
  params = jax.jit(full.init)(jax.random.key(0), x)
  windowed = M.build(CONFIG.replace(sliding_window=2, attention_sinks=False))
  assert not np.allclose(jax.jit(full.apply)(params, x), jax.jit(windowed.apply)(params, x),
                         atol=1e-4)
  sinky = M.build(CONFIG.replace(sliding_window=None))
  sp = jax.jit(sinky.init)(jax.random.key(0), x)
  assert set(sp["block_0"]["attn"]) == {"w_q", "w_k", "w_v", "w_o", "sinks"}


# ---------------------------------------------------------------------------------------------
# Configs, counts, rules, the experiment.


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_experts=0), r"MoEConfig\.n_experts=0 .*positive int"),
    (dict(experts_per_token=5), r"MoEConfig\.experts_per_token=5 .*<= n_experts=4"),
    (dict(experts_per_token=0), r"MoEConfig\.experts_per_token=0"),
    (dict(router_softmax="sparse"), r"MoEConfig\.router_softmax='sparse' .*topk"),
    (dict(capacity_factor=0.0), r"MoEConfig\.capacity_factor=0\.0"),
    (dict(load_balance_weight=-1.0), r"MoEConfig\.load_balance_weight=-1\.0"),
    (dict(router_z_weight=float("nan")), r"MoEConfig\.router_z_weight=nan"),
    (dict(sliding_window=0), r"MoEConfig\.sliding_window=0 .*positive int"),
    (dict(attention_sinks=1), r"MoEConfig\.attention_sinks=1 .*bool"),
    (dict(n_kv_heads=3), r"MoEConfig\.n_kv_heads=3 .*must divide n_heads=4"),
    (dict(d_model=12), r"odd head dim"),
    (dict(dtype="params=float32,compute=bfloat16,output=float32"), r"MoEConfig\.dtype=.*'float32' or 'bfloat16'"),
    (dict(attention_impl="cudnn"), r"MoEConfig\.attention_impl='cudnn' .*'xla' only"),
    (dict(loss_chunk_size=8), r"MoEConfig\.loss_chunk_size=8 .*no chunked loss"),
])
def test_bad_config_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    M.MoEConfig(**dict(BASE, **kwargs))


def test_trainer_rejects_bad_moe_config_before_compiling():
  from hkpipe._src import trainer  # pylint: disable=g-import-not-at-top
  config = __import__("experiments.moe_tiny", fromlist=["get_config"]).get_config("runlocal")
  assert isinstance(trainer.model_config(config), M.MoEConfig)
  config.model.experts_per_token = 9
  with pytest.raises(hkpipe.ConfigError, match=r"experts_per_token=9 .*<= n_experts=4"):
    trainer.model_config(config)


def test_param_counts_flops_and_expert_load():
  model = M.build(CONFIG)
  x = tokens(seed=9)
  params = jax.jit(model.init)(jax.random.key(0), x)
  counts = M.layer_param_counts(CONFIG)
  for name, p in params.items():
    assert counts[name] == sum(a.size for a in jax.tree.leaves(p)), name
  e, k, d, f = 4, 2, 16, 24
  inactive = 3 * (e - k) * d * f * CONFIG.n_layers
  total = sum(c for n, c in counts.items() if n != "embed")
  assert M.flops_per_token(CONFIG) == 6 * (total - inactive) + 12 * 2 * d * T
  stats = jax.jit(M.expert_load, static_argnums=0)(CONFIG, params, x)
  assert stats["load"].shape == (2, e)
  np.testing.assert_allclose(stats["load"].sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(stats["dropped"], 0.0)


def test_sharding_rules_shard_experts():
  from hkpipe._src import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  params = jax.eval_shape(M.build(CONFIG).init, jax.random.key(0), tokens())
  specs = sharding_lib.resolve(params, M.sharding_rules(CONFIG), {"fsdp": 2, "tp": 2})
  moe_specs = specs["block_0"]["moe"]
  assert moe_specs["w_gate"] == jax.sharding.PartitionSpec(None, "fsdp", "tp")
  assert moe_specs["w_up"] == jax.sharding.PartitionSpec(None, "fsdp", "tp")
  assert moe_specs["w_down"] == jax.sharding.PartitionSpec(None, "tp", "fsdp")


def test_bf16_keeps_aux_float32_and_close_to_fp32():
  x, y = tokens(seed=10), tokens(seed=11)
  fp32 = M.build(CONFIG)
  params = jax.jit(fp32.init)(jax.random.key(0), x)
  bf16 = M.build(CONFIG.replace(dtype="bfloat16"))
  out = jax.jit(lambda p: bf16.apply_range(p, x, 0, len(bf16.layers)))(params)
  assert out[0].dtype == jnp.float32 and out[1].dtype == jnp.float32
  np.testing.assert_allclose(jax.jit(bf16.loss)(params, x, y), jax.jit(fp32.loss)(params, x, y),
                             rtol=2e-2)


# ---------------------------------------------------------------------------------------------
# Pipelined training equals the single device (loss, every gradient, 2 AdamW steps).


@functools.lru_cache(maxsize=None)
def _reference(num_microbatches: int):
  """``(model, batch, optimizer, hkpipe.testing.ReferenceRun)`` of the single device: init,
  loss, gradients and 2 AdamW steps."""
  model = M.build(CONFIG)
  batch = (tokens(batch=8, seed=12), tokens(batch=8, seed=13))
  opt = optax.adamw(1e-2, weight_decay=0.1)
  ref = hkpipe.Pipeline(model, opt, backend="single", num_microbatches=num_microbatches)
  return model, batch, opt, hkpipe.testing.reference_run(ref, batch, steps=2,
                                                         rng=jax.random.key(42))


def test_single_backend_equals_plain_jax_grad():
  """The reference itself: plain jax.grad of the layer chain's loss (mean over 4 microbatches)
  and optax AdamW, without any hkpipe Pipeline."""
  model, batch, opt, ref = _reference(4)
  params = ref.init_params
  parts = [jax.tree.map(lambda a, i=i: a[2 * i:2 * i + 2], batch) for i in range(4)]
  value_and_grad = jax.jit(jax.value_and_grad(model.loss))
  opt_state = opt.init(params)
  for k in range(2):  # a step's metrics["loss"] is the loss before its update
    outs = [value_and_grad(params, *part) for part in parts]
    loss = sum(o[0] for o in outs) / 4
    grads = jax.tree.map(lambda *g: sum(g) / 4, *[o[1] for o in outs])
    helpers.assert_trees_close(ref.step_metrics[k]["loss"], loss)
    if k == 0:
      helpers.assert_trees_close(ref.loss, loss)
      helpers.assert_trees_close(ref.grads, grads)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  helpers.assert_trees_close(ref.step_params[-1], params, rtol=1e-4, atol=1e-5)


def _check_against_reference(pipe, state, batch, ref):
  """Initial params, loss, every gradient, 2 AdamW steps (losses, gradient norms, params after
  each step) equal the single-device reference ``ref``."""
  hkpipe.testing.assert_pipeline_matches_reference(
      pipe, batch, steps=2, rng=jax.random.key(42), state=state, reference=ref,
      rtol=helpers.RTOL, atol=helpers.ATOL, params_rtol=1e-4, params_atol=1e-5)


@pytest.mark.parametrize("backend,stages", [  # 4 MPMD stages: the pp2 x fsdp2 x tp2 test below
    ("mpmd", 2), ("spmd", 2), pytest.param("spmd", 4, marks=pytest.mark.slow)])
def test_pipelined_equals_single_device(backend, stages):
  model, batch, opt, ref = _reference(4)
  pipe = hkpipe.Pipeline(model, opt, backend=backend, num_microbatches=4,
                         devices=jax.devices()[:stages], donate=False)
  state = pipe.init(jax.random.key(42), batch)
  assert len(pipe.layout.stages) == stages
  _check_against_reference(pipe, state, batch, ref)


def test_sharded_experts_on_pp2_fsdp2_tp2_equal_single_device():
  """MPMD on a pp2 x fsdp2 x tp2 mesh: the MoE rules shard the experts inside each stage, and
  loss, every gradient and 2 AdamW steps still equal the single device."""
  model, batch, opt, ref = _reference(4)
  mesh = jax.make_mesh((2, 2, 2), ("pp", "fsdp", "tp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  pipe = hkpipe.Pipeline(model, opt, backend="mpmd", num_microbatches=4, mesh=mesh, donate=False)
  state = pipe.init(jax.random.key(42), batch)
  experts = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)
             if "w_gate" in jax.tree_util.keystr(path)]
  assert experts and all(not leaf.sharding.is_fully_replicated for leaf in experts)
  _check_against_reference(pipe, state, batch, ref)
