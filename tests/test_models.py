"""Tests of the model zoo: configs, shapes, causality, RoPE, GQA, loss, tying, generation."""

from __future__ import annotations

import math

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hkpipe
import hkpipe.models as M
from hkpipe._src.models import common
from tests import helpers

B, T, V, D, L, H = 2, 16, 64, 32, 2, 4

GPT = M.GPTConfig(vocab_size=V, seq_len=T, d_model=D, n_layers=L, n_heads=H)
LLAMA = M.LlamaConfig(vocab_size=V, seq_len=T, d_model=D, n_layers=L, n_heads=H, n_kv_heads=2)
CONFIGS = {"gpt": GPT, "llama": LLAMA}


def tokens(batch: int = B, seq: int = T, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, V, (batch, seq), dtype=np.int32)


@pytest.fixture(scope="module")
def pipelines():
  """{name: (Pipeline, initial state, batch)}: single-backend Adam pipelines, compiled once."""
  x, y = tokens(batch=4, seed=6), tokens(batch=4, seed=7)
  out = {}
  for name, config in CONFIGS.items():
    pipe = hkpipe.Pipeline(M.build(config), optax.adam(1e-2), backend="single", donate=False)
    out[name] = (pipe, pipe.init(jax.random.key(0), (x, y)), (x, y))
  return out


@pytest.fixture(scope="module")
def built(pipelines):
  """{name: (config, model, initial params, jitted apply)} of the fp32 test models."""
  out = {}
  for name, (pipe, state, _) in pipelines.items():
    model = pipe.model
    out[name] = (model.config, model, pipe.params(state),
                 jax.jit(lambda p, x, m=model: m.apply(p, x)))
  return out


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def fp32_model(request, built):
  """(config, model, params, jitted apply) of each fp32 test model."""
  return built[request.param]


# ---------------------------------------------------------------------------------------------
# Configs.


@pytest.mark.parametrize("cls, kwargs, match", [
    (M.GPTConfig, dict(d_model=30), r"n_heads=4 .*must divide d_model=30"),
    (M.GPTConfig, dict(n_layers=0), r"GPTConfig\.n_layers=0 .*positive int"),
    (M.GPTConfig, dict(vocab_size=-3), r"GPTConfig\.vocab_size=-3"),
    (M.GPTConfig, dict(seq_len=16.0), r"GPTConfig\.seq_len=16\.0 .*positive int"),
    (M.GPTConfig, dict(d_ff=0), r"GPTConfig\.d_ff=0"),
    (M.GPTConfig, dict(dropout=1.0), r"GPTConfig\.dropout=1\.0 .*\[0\.0, 1\.0\)"),
    (M.GPTConfig, dict(dropout=-0.1), r"GPTConfig\.dropout=-0\.1"),
    (M.GPTConfig, dict(dtype="float16"), r"GPTConfig\.dtype='float16' .*bfloat16"),
    (M.GPTConfig, dict(bias=1), r"GPTConfig\.bias=1 .*bool"),
    (M.GPTConfig, dict(z_loss=-1e-4), r"GPTConfig\.z_loss=-0\.0001"),
    (M.GPTConfig, dict(label_smoothing=1.0), r"GPTConfig\.label_smoothing=1\.0"),
    (M.LlamaConfig, dict(n_kv_heads=3), r"LlamaConfig\.n_kv_heads=3 .*must divide n_heads=4"),
    (M.LlamaConfig, dict(n_kv_heads=0), r"LlamaConfig\.n_kv_heads=0 .*positive int"),
    (M.LlamaConfig, dict(d_model=12), r"odd head dim 3.*RoPE"),
    (M.LlamaConfig, dict(rope_theta=0.0), r"LlamaConfig\.rope_theta=0\.0"),
    (M.LlamaConfig, dict(norm_eps=-1e-5), r"LlamaConfig\.norm_eps"),
    (M.LlamaConfig, dict(dtype="fp32"), r"LlamaConfig\.dtype='fp32'"),
])
def test_bad_config_raises(cls, kwargs, match):
  base = dict(vocab_size=V, seq_len=T, d_model=D, n_layers=L, n_heads=H)
  with pytest.raises(ValueError, match=match):
    cls(**{**base, **kwargs})


def test_replace_revalidates():
  with pytest.raises(ValueError, match=r"n_heads=5"):
    GPT.replace(n_heads=5)


def test_configs_are_hashable_static_args():
  same = M.GPTConfig(vocab_size=V, seq_len=T, d_model=D, n_layers=L, n_heads=H)
  assert same == GPT and hash(same) == hash(GPT)
  assert hash(LLAMA) != hash(LLAMA.replace(n_kv_heads=4))
  f = jax.jit(lambda x, cfg: x * cfg.d_model, static_argnums=1)
  chex.assert_trees_all_equal(f(jnp.ones(()), GPT), jnp.float32(D))


def test_config_defaults():
  assert GPT.ff_dim == 4 * D and GPT.replace(d_ff=48).ff_dim == 48
  assert GPT.replace(d_model=64).ff_dim == 256  # d_ff=None follows d_model through replace
  assert LLAMA.kv_heads == 2 and LLAMA.replace(n_kv_heads=None).kv_heads == H
  assert LLAMA.ff_dim % 8 == 0 and LLAMA.ff_dim >= 8 * D / 3 > LLAMA.ff_dim - 8


def test_build_rejects_other_configs():
  with pytest.raises(TypeError, match="GPTConfig, LlamaConfig, MoEConfig or TRMConfig"):
    M.build(dict(d_model=32))


# ---------------------------------------------------------------------------------------------
# Shapes, dtypes and layout.


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shapes_and_dtypes(name, dtype):
  config = CONFIGS[name].replace(dtype=dtype)
  model = M.build(config)
  x = jax.ShapeDtypeStruct((B, T), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)
  assert model.layer_names == ("embed", "block_0", "block_1", "head")
  assert set(params) == set(model.layer_names)
  chex.assert_trees_all_equal_dtypes(params, jax.tree.map(lambda _: jnp.zeros((), jnp.float32),
                                                          params))

  def run(p, x):
    h = model.apply_range(p, x, 0, 1)                                   # embed
    blocks = model.apply_range(p, h, 1, 1 + L)                          # blocks
    return h, blocks, model.apply_range(p, blocks, 1 + L, 2 + L)        # head

  h, blocks, logits = jax.eval_shape(run, params, x)
  compute = jnp.dtype(dtype)
  chex.assert_shape([h, blocks], (B, T, D))
  chex.assert_type([h, blocks], compute)
  chex.assert_shape(logits, (B, T, V))
  chex.assert_type(logits, jnp.float32)
  # A shorter sequence is fine (positions are sliced), a longer one is rejected at trace time.
  chex.assert_shape(jax.eval_shape(model.apply, params, jax.ShapeDtypeStruct((B, 5), jnp.int32)),
                    (B, 5, V))
  with pytest.raises(ValueError, match=r"length 17 exceeds the model's seq_len=16"):
    jax.eval_shape(model.apply, params, np.zeros((B, T + 1), np.int32))
  with pytest.raises(ValueError, match="must be integers"):
    jax.eval_shape(model.apply, params, np.zeros((B, T), np.float32))


def test_bf16_matches_fp32_closely(fp32_model):
  config, model, params, apply = fp32_model
  bf16 = M.build(config.replace(dtype="bfloat16"))
  x = tokens()
  ref = apply(params, x)
  got = jax.jit(bf16.apply)(params, x)
  chex.assert_tree_all_finite(got)
  assert float(jnp.max(jnp.abs(got - ref))) < 0.05
  assert float(jnp.max(jnp.abs(got - ref))) > 0.0  # really computed in bf16


def test_param_counts_match_closed_form():
  for config in [GPT, GPT.replace(bias=False, tie_embeddings=False, d_ff=40), LLAMA,
                 LLAMA.replace(n_kv_heads=1, d_ff=24)]:
    model = M.build(config)
    params = jax.eval_shape(model.init, jax.random.key(0), tokens())
    per_layer = {k: sum(math.prod(a.shape) for a in jax.tree.leaves(v)) for k, v in params.items()}
    assert per_layer == M.layer_param_counts(config)


def test_flops_per_token():
  for config in [GPT, LLAMA]:
    params = jax.eval_shape(M.build(config).init, jax.random.key(0), tokens())
    non_embed = sum(math.prod(a.shape) for k, v in params.items() if k != "embed"
                    for a in jax.tree.leaves(v))
    assert M.flops_per_token(config) == 6 * non_embed + 12 * L * D * T


def test_summary_traces_without_compiling(fp32_model):
  config, model, params, _ = fp32_model
  with helpers.backend_compiles() as compiles:
    text = M.summary(model, jax.ShapeDtypeStruct((B, T), jnp.int32))
    compiled_during_summary = list(compiles)
    jax.jit(lambda v: v * 3 + 1)(jnp.arange(7))  # control: a fresh compile is observed
  assert not compiled_during_summary
  assert compiles
  for name in model.layer_names:
    assert name in text
  assert f"({B}, {T}, {V})" in text and f"({B}, {T}, {D})" in text
  total = text.splitlines()[-1].split()
  assert total[0] == "total" and int(total[1].replace(",", "")) == M.param_count(model, params)


# ---------------------------------------------------------------------------------------------
# Causality, RoPE, attention.


def test_causality(fp32_model):
  _, _, params, apply = fp32_model
  x = tokens(batch=1)[0]
  variants = np.stack([x] + [np.where(np.arange(T) == t + 1, (x + 1) % V, x)
                             for t in range(T - 1)])                    # [T, T]
  logits = np.asarray(apply(params, variants))                          # [T, T, V]
  for t in range(T - 1):
    changed = logits[t + 1]
    np.testing.assert_allclose(changed[:t + 1], logits[0][:t + 1], atol=1e-5, rtol=0,
                               err_msg=f"changing token {t + 1} changed logits at <= {t}")
    assert np.max(np.abs(changed[t + 1] - logits[0][t + 1])) > 1e-4


def test_rope_depends_only_on_relative_position():
  rng = np.random.default_rng(1)
  hd, n = 8, 12
  q, k = rng.normal(size=(2, hd)).astype(np.float32)
  pos = jnp.arange(n)
  rq = M.rope(jnp.broadcast_to(q, (1, n, 1, hd)), pos, 10000.0)[0, :, 0]  # [n, hd]
  rk = M.rope(jnp.broadcast_to(k, (1, n, 1, hd)), pos, 10000.0)[0, :, 0]  # [n, hd]
  scores = np.asarray(rq @ rk.T)                                        # [m, n]
  for offset in range(-n + 1, n):
    diag = np.diagonal(scores, offset=offset)
    np.testing.assert_allclose(diag, np.full_like(diag, diag[0]), rtol=1e-5, atol=1e-5)
  assert abs(scores[0, 0] - scores[0, 1]) > 1e-3  # positions do matter
  np.testing.assert_allclose(np.linalg.norm(rq, axis=-1), np.linalg.norm(q), rtol=1e-5)
  chex.assert_trees_all_close(rq[0], jnp.asarray(q))  # position 0 is the identity


def naive_mha(x, wq, wk, wv, wo, n_heads, rope_theta):
  """Plain multi-head attention, one head at a time, from full-size q/k/v weights (numpy)."""
  t, d = x.shape[1], wq.shape[1]
  hd = d // n_heads
  q = (x @ wq).reshape(x.shape[0], t, n_heads, hd)
  k = (x @ wk).reshape(x.shape[0], t, n_heads, hd)
  v = (x @ wv).reshape(x.shape[0], t, n_heads, hd)
  if rope_theta is not None:
    q = np.asarray(M.rope(jnp.asarray(q), jnp.arange(t), rope_theta))
    k = np.asarray(M.rope(jnp.asarray(k), jnp.arange(t), rope_theta))
  heads = []
  for h in range(n_heads):
    s = q[:, :, h] @ k[:, :, h].transpose(0, 2, 1) / math.sqrt(hd)     # [B, T, T]
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    heads.append((p / p.sum(-1, keepdims=True)) @ v[:, :, h])          # [B, T, hd]
  return np.concatenate(heads, axis=-1) @ wo                            # [B, T, D]


@pytest.mark.parametrize("n_kv_heads, rope_theta", [(4, None), (4, 10000.0), (2, 10000.0),
                                                     (1, None)])
def test_gqa_equals_mha_with_shared_kv_heads(n_kv_heads, rope_theta):
  hd = D // H

  def fn(x):
    return common.Attention(n_heads=H, n_kv_heads=n_kv_heads, head_dim=hd, bias=False,
                            w_init=common.normal_init(0.3), out_init=common.normal_init(0.3),
                            rope_theta=rope_theta, name="attn")(x, False)

  f = hk.without_apply_rng(hk.transform(fn))
  x = np.random.default_rng(2).normal(size=(B, T, D)).astype(np.float32)
  p = jax.jit(f.init)(jax.random.key(3), x)["attn"]
  got = np.asarray(jax.jit(f.apply)({"attn": p}, x))
  # Query head h uses kv head h // (H // n_kv_heads): repeat each kv head's columns.
  group = H // n_kv_heads

  def expand(w):  # [D, K*hd] -> [D, H*hd]
    return np.repeat(np.asarray(w).reshape(D, n_kv_heads, hd), group, axis=1).reshape(D, D)

  want = naive_mha(x, np.asarray(p["w_q"]), expand(p["w_k"]), expand(p["w_v"]),
                   np.asarray(p["w_o"]), H, rope_theta)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


# ---------------------------------------------------------------------------------------------
# Loss.


def test_cross_entropy_hand_computed():
  logits = jnp.array([[0.0, math.log(3.0)]])                           # p = [1/4, 3/4]
  targets = jnp.array([1])
  nll = math.log(4 / 3)
  lse = math.log(4.0)
  uniform = 0.5 * (math.log(4.0) + math.log(4 / 3))                    # mean_v -log p_v
  chex.assert_trees_all_close(M.cross_entropy(logits, targets), jnp.float32(nll), rtol=1e-6)
  got_z = M.cross_entropy(logits, targets, z_loss=0.1)
  chex.assert_trees_all_close(got_z, jnp.float32(nll + 0.1 * lse**2), rtol=1e-6)
  got_ls = M.cross_entropy(logits, targets, label_smoothing=0.2)
  chex.assert_trees_all_close(got_ls, jnp.float32(0.8 * nll + 0.2 * uniform), rtol=1e-6)
  both = M.cross_entropy(logits, targets, z_loss=0.1, label_smoothing=0.2)
  chex.assert_trees_all_close(both, jnp.float32(0.8 * nll + 0.2 * uniform + 0.1 * lse**2),
                              rtol=1e-6)
  assert float(got_z) > nll and float(got_ls) > nll  # confident and right: both penalise


def test_cross_entropy_mean_dtype_and_errors():
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.bfloat16)
  targets = jnp.asarray(rng.integers(0, 7, (3, 5)), jnp.int32)
  loss = M.cross_entropy(logits, targets)
  chex.assert_type(loss, jnp.float32)
  chex.assert_shape(loss, ())
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  want = -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))
  chex.assert_trees_all_close(loss, want, rtol=1e-6)
  # z-loss vanishes exactly when the softmax normaliser is 1 (lse = 0).
  normalised = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(4, 7)), jnp.float32))
  chex.assert_trees_all_close(M.cross_entropy(normalised, targets[0, :4], z_loss=1.0),
                              M.cross_entropy(normalised, targets[0, :4]), atol=1e-6)
  with pytest.raises(ValueError, match="matching leading shape"):
    M.cross_entropy(logits, targets[:, :4])
  with pytest.raises(ValueError, match="integer class ids"):
    M.cross_entropy(logits, targets.astype(jnp.float32))


def test_build_uses_config_loss_options():
  config = GPT.replace(z_loss=0.5, label_smoothing=0.1)
  model = M.build(config)
  logits = jnp.asarray(np.random.default_rng(5).normal(size=(B, T, V)), jnp.float32)
  y = jnp.asarray(tokens())
  chex.assert_trees_all_close(model.loss_fn(logits, y),
                              M.cross_entropy(logits, y, z_loss=0.5, label_smoothing=0.1))


# ---------------------------------------------------------------------------------------------
# Training behaviour.


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_overfits_one_batch(name, pipelines):
  pipe, state, batch = pipelines[name]
  first = None
  for _ in range(200):
    state, metrics = pipe.train_step(state, batch)
    first = float(metrics["loss"]) if first is None else first
  assert first > 3.5  # starts near log(64) = 4.16
  assert float(pipe.eval_step(state, batch)["loss"]) < 0.05


def test_dropout_only_in_training():
  model = M.build(GPT.replace(dropout=0.5, n_layers=1))
  x = tokens()
  params = jax.jit(model.init)(jax.random.key(0), x)

  @jax.jit
  def run(p, k):
    return (model.apply(p, x, rng=k, is_training=False), model.apply(p, x, rng=k, is_training=True))

  eval1, train1 = run(params, jax.random.key(1))
  eval2, train2 = run(params, jax.random.key(2))
  chex.assert_trees_all_equal(eval1, eval2)
  chex.assert_trees_all_equal(train1, run(params, jax.random.key(1))[1])
  assert float(jnp.max(jnp.abs(train1 - train2))) > 1e-3
  assert float(jnp.max(jnp.abs(train1 - eval1))) > 1e-3


def test_weight_tying_survives_a_train_step(pipelines):
  pipe, state, batch = pipelines["gpt"]
  model = pipe.model
  assert model.ties == (hkpipe.Tie(source=("embed", "wte", "embeddings"),
                                   target=("head", "lm_head", "w")),)
  before = pipe.params(state)
  chex.assert_trees_all_equal(before["embed"]["wte"]["embeddings"], before["head"]["lm_head"]["w"])
  state, _ = pipe.train_step(state, batch)
  after = pipe.params(state)
  chex.assert_trees_all_equal(after["embed"]["wte"]["embeddings"], after["head"]["lm_head"]["w"])
  assert float(jnp.max(jnp.abs(after["head"]["lm_head"]["w"] -
                               before["head"]["lm_head"]["w"]))) > 1e-3
  total = sum(x.size for x in jax.tree.leaves(after))
  assert M.param_count(model, after) == total - V * D
  assert M.param_count(model, after) == sum(M.layer_param_counts(GPT).values()) - V * D


def test_untied_gpt_has_no_tie():
  config = GPT.replace(tie_embeddings=False)
  model = M.build(config)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens())
  assert model.ties == ()
  assert M.param_count(model, params) == sum(M.layer_param_counts(config).values())
  assert M.param_count(M.build(GPT), params) == M.param_count(model, params) - V * D


# ---------------------------------------------------------------------------------------------
# Generation.


def test_generate_shape_dtype_determinism(fp32_model):
  config, model, params, _ = fp32_model
  prompt = tokens(seq=4)
  out = M.generate(model, params, prompt, max_new_tokens=20, rng=jax.random.key(1))
  chex.assert_shape(out, (B, 24))
  chex.assert_type(out, jnp.int32)
  np.testing.assert_array_equal(np.asarray(out[:, :4]), prompt)
  assert int(out.min()) >= 0 and int(out.max()) < config.vocab_size
  again = M.generate(model, params, prompt, max_new_tokens=20, rng=jax.random.key(1))
  chex.assert_trees_all_equal(out, again)
  other = M.generate(model, params, prompt, max_new_tokens=20, rng=jax.random.key(2))
  assert not np.array_equal(np.asarray(other), np.asarray(out))


def test_generate_greedy_matches_sliding_window_reference(fp32_model):
  _, model, params, apply = fp32_model
  prompt = tokens(seq=T - 1, seed=8)
  steps = 4  # fills the window, then slides it for 3 tokens
  out = np.asarray(M.generate(model, params, prompt, max_new_tokens=steps, rng=jax.random.key(0),
                              temperature=0.5, top_k=1))
  seq = prompt
  for _ in range(steps):
    logits = np.asarray(apply(params, seq[:, -T:]))                     # [B, <=T, V]
    seq = np.concatenate([seq, logits[:, -1].argmax(-1)[:, None].astype(np.int32)], axis=1)
  np.testing.assert_array_equal(out, seq)


def test_generate_compiles_the_step_once(built):
  from hkpipe._src.models import sampling
  _, model, params, _ = built["gpt"]
  M.generate(model, params, tokens(seq=2), max_new_tokens=1, rng=jax.random.key(0),
             use_cache=False)
  compiled = sampling._step._cache_size()
  for plen, n in [(3, 4), (7, 2), (20, 5)]:  # sliding window: a prompt longer than it is cropped
    out = M.generate(model, params, tokens(seq=plen), max_new_tokens=n, rng=jax.random.key(0),
                     use_cache=False)
    chex.assert_shape(out, (B, plen + n))
  assert sampling._step._cache_size() == compiled


def test_generate_rejects_bad_arguments(built):
  _, model, params, _ = built["gpt"]
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r"prompt\[None\]"):
    M.generate(model, params, np.zeros((4,), np.int32), max_new_tokens=1, rng=key)
  with pytest.raises(ValueError, match="max_new_tokens"):
    M.generate(model, params, tokens(), max_new_tokens=-1, rng=key)
  with pytest.raises(ValueError, match="temperature"):
    M.generate(model, params, tokens(), max_new_tokens=1, rng=key, temperature=-0.5)  # 0 is greedy
  with pytest.raises(ValueError, match="top_k"):
    M.generate(model, params, tokens(), max_new_tokens=1, rng=key, top_k=V + 1)
  plain = hkpipe.SequentialModel(model.layers, model.loss_fn, model.ties)
  with pytest.raises(ValueError, match="pass seq_len"):
    M.generate(plain, params, tokens(), max_new_tokens=1, rng=key)
  with_len = M.generate(plain, params, tokens(), max_new_tokens=3, rng=key, seq_len=T)
  chex.assert_trees_all_equal(with_len,
                              M.generate(model, params, tokens(), max_new_tokens=3, rng=key))
