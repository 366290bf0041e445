"""KV-cache decoding and sampling on one device (hkpipe.models.generate)."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hkpipe
import hkpipe.models as M
from hkpipe._src.models import decode
from hkpipe._src.models import sampling

B, T, V = 3, 24, 48
CONFIGS = {
    "gpt_tied": M.GPTConfig(vocab_size=V, seq_len=T, d_model=32, n_layers=2, n_heads=4),
    "llama_gqa": M.LlamaConfig(vocab_size=V, seq_len=T, d_model=32, n_layers=2, n_heads=4,
                               n_kv_heads=2),
}


def prompt(length: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, V, (B, length), dtype=np.int32)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def lm(request):
  """(model, params, jitted full-sequence apply) of each test model."""
  model = M.build(CONFIGS[request.param])
  params = model.init(jax.random.key(1), jnp.asarray(prompt(T)))
  # Larger weights than the init's make logits spread out (greedy margins far above rounding).
  params = jax.tree.map(lambda p: p * 4.0 if p.ndim == 2 else p, params)
  return model, params, jax.jit(model.apply)


def reference_greedy(apply, params, tokens: np.ndarray, steps: int):
  """Greedy decoding by the layers alone: the whole sequence re-run per token (numpy argmax).

  The sequence is zero-padded to the context ``T`` (one compile); a causal model's logits at
  position ``n - 1`` do not depend on the padding after it.
  """
  seq, logits = tokens, []
  for _ in range(steps):
    n = seq.shape[1]
    window = np.zeros((B, T), np.int32)
    window[:, :n] = seq
    last = np.asarray(apply(params, jnp.asarray(window)))[:, n - 1]     # [B, V]
    logits.append(last)
    seq = np.concatenate([seq, last.argmax(-1)[:, None].astype(np.int32)], axis=1)
  return seq[:, tokens.shape[1]:], np.stack(logits, axis=1)


@pytest.mark.parametrize("plen", [1, 7, 16])
def test_cached_greedy_equals_recompute_token_for_token(lm, plen):
  model, params, apply = lm
  steps = T - plen
  p = prompt(plen, seed=plen)
  want, want_logits = reference_greedy(apply, params, p, steps)
  new, logits = decode.cached_decode(model, params, p, max_new_tokens=steps, rng=jax.random.key(0),
                                     sampling_=sampling.Sampling(temperature=0.0), max_len=T,
                                     with_logits=True)
  np.testing.assert_array_equal(np.asarray(new), want)
  np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=1e-5, atol=1e-6)
  assert len(np.unique(want)) > 3  # the test sees varied tokens, not one repeated
  out = M.generate(model, params, p, max_new_tokens=steps, rng=jax.random.key(0),
                   temperature=0.0, use_cache=True)
  np.testing.assert_array_equal(np.asarray(out), np.concatenate([p, want], axis=1))
  ref = M.generate(model, params, p, max_new_tokens=steps, rng=jax.random.key(0),
                   temperature=0.0, use_cache=False)
  np.testing.assert_array_equal(np.asarray(ref), np.asarray(out))


def test_decoding_compiles_once_per_batch_and_length(lm):
  model, params, _ = lm
  M.generate(model, params, prompt(2), max_new_tokens=3, rng=jax.random.key(0))
  compiled = decode._decode._cache_size()
  for plen, n, kw in [(5, 10, {}), (1, 23, {"top_k": 3}), (20, 4, {"top_p": 0.5}),
                      (3, 2, {"temperature": 0.0, "end_token": 5})]:
    out = M.generate(model, params, prompt(plen), max_new_tokens=n, rng=jax.random.key(0), **kw)
    assert out.shape == (B, plen + n)
  assert decode._decode._cache_size() == compiled


def allowed_set(logits: np.ndarray, temperature: float, top_k, top_p) -> set:
  """The tokens top-k then top-p may draw from, in float64 numpy."""
  order = np.argsort(-logits.astype(np.float64))
  k = len(order) if top_k is None else top_k
  kept = order[:k]
  z = logits[kept].astype(np.float64) / temperature
  probs = np.exp(z - z.max())
  probs /= probs.sum()
  before = np.cumsum(probs) - probs
  p = 1.0 if top_p is None else top_p
  return {int(t) for t, b in zip(kept, before) if b < p}


@pytest.mark.parametrize("top_k,top_p", [(4, None), (None, 0.6), (6, 0.7)])
def test_sampled_tokens_stay_in_the_allowed_set(top_k, top_p):
  logits = np.random.default_rng(3).normal(size=(4, V)).astype(np.float32) * 2  # [4, V]
  def draws(settings, n):                                              # [n, 4] tokens
    s = settings.arrays()
    return np.asarray(jax.jit(jax.vmap(lambda step: sampling.sample(
        jnp.asarray(logits), sampling.row_keys(jax.random.key(7), step, jnp.arange(4)), s)))(
            jnp.arange(n)))

  drawn = draws(sampling.Sampling(temperature=1.3, top_k=top_k, top_p=top_p), 300)
  for row in range(4):
    allowed = allowed_set(logits[row], 1.3, top_k, top_p)
    seen = set(drawn[:, row].tolist())
    assert seen <= allowed, (row, seen - allowed)
    assert len(seen) >= min(2, len(allowed))  # the draws are not all the argmax
  unfiltered = draws(sampling.Sampling(temperature=1.3), 50)
  assert any(not set(unfiltered[:, r].tolist()) <= allowed_set(logits[r], 1.3, top_k, top_p)
             for r in range(4))  # without the filter, draws leave the set: the check can fail


def test_generated_tokens_stay_in_the_allowed_set_of_their_logits(lm):
  model, params, _ = lm
  new, logits = decode.cached_decode(
      model, params, prompt(4), max_new_tokens=12, rng=jax.random.key(3), max_len=T,
      sampling_=sampling.Sampling(temperature=2.0, top_k=5, top_p=0.8), with_logits=True)
  new, logits = np.asarray(new), np.asarray(logits)
  for b in range(B):
    for i in range(12):
      assert new[b, i] in allowed_set(logits[b, i], 2.0, 5, 0.8)


def test_temperature_towards_zero_is_greedy(lm):
  model, params, _ = lm
  p = prompt(6, seed=2)
  greedy = M.generate(model, params, p, max_new_tokens=10, rng=jax.random.key(0), temperature=0.0)
  cold = M.generate(model, params, p, max_new_tokens=10, rng=jax.random.key(5), temperature=1e-4)
  top1 = M.generate(model, params, p, max_new_tokens=10, rng=jax.random.key(5), top_k=1)
  np.testing.assert_array_equal(np.asarray(cold), np.asarray(greedy))
  np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))
  warm = M.generate(model, params, p, max_new_tokens=10, rng=jax.random.key(5), temperature=3.0)
  assert not np.array_equal(np.asarray(warm), np.asarray(greedy))


def test_seeded_sampling_is_reproducible_and_row_independent(lm):
  model, params, _ = lm
  p = prompt(4, seed=9)
  a = np.asarray(M.generate(model, params, p, max_new_tokens=8, rng=jax.random.key(1)))
  np.testing.assert_array_equal(a, np.asarray(M.generate(model, params, p, max_new_tokens=8,
                                                         rng=jax.random.key(1))))
  assert not np.array_equal(a, np.asarray(M.generate(model, params, p, max_new_tokens=8,
                                                     rng=jax.random.key(2))))
  # The recompute path draws with the same per-row keys from the same logits.
  ref = M.generate(model, params, p, max_new_tokens=8, rng=jax.random.key(1), use_cache=False)
  np.testing.assert_array_equal(a, np.asarray(ref))


def test_each_sequence_stops_at_the_end_token(lm):
  model, params, _ = lm
  p = prompt(3, seed=4)
  kw = dict(max_new_tokens=12, rng=jax.random.key(4), temperature=1.0)
  want = np.asarray(M.generate(model, params, p, **kw))[:, 3:]          # [B, 12] never stopped
  end = int(want[0, 2])
  out = np.asarray(M.generate(model, params, p, end_token=end, **kw))[:, 3:]
  for b in range(B):
    hits = np.flatnonzero(want[b] == end)
    stop_at = hits[0] if len(hits) else 12
    np.testing.assert_array_equal(out[b, :stop_at + 1], want[b, :stop_at + 1])
    assert (out[b, stop_at:] == end).all()
  assert not (want[0, 3:] == end).all()  # without the end token row 0 goes on differently


def test_bad_input_fails_before_compiling(lm):
  model, params, _ = lm
  key = jax.random.key(0)
  M.generate(model, params, prompt(2), max_new_tokens=1, rng=key)
  compiled = decode._decode._cache_size()
  cases = [
      (dict(max_new_tokens=1), prompt(T + 1), "more than the model's context of 24"),
      (dict(max_new_tokens=T), prompt(2), "lower max_new_tokens to at most 22"),
      (dict(max_new_tokens=1, top_p=0.0), prompt(2), r"top_p=0.0 .* \(0, 1\]"),
      (dict(max_new_tokens=1, top_p=1.5), prompt(2), r"top_p=1.5"),
      (dict(max_new_tokens=1, top_k=0), prompt(2), r"top_k=0"),
      (dict(max_new_tokens=1, top_k=V + 1), prompt(2), rf"top_k={V + 1} .*vocab_size={V}"),
      (dict(max_new_tokens=1, temperature=-1.0), prompt(2), "temperature"),
      (dict(max_new_tokens=1, end_token=V), prompt(2), "end_token"),
  ]
  for kwargs, p, match in cases:
    with pytest.raises(hkpipe.ConfigError, match=match):
      M.generate(model, params, p, rng=key, use_cache=True, **kwargs)
  assert decode._decode._cache_size() == compiled


def test_user_layers_opt_in_with_a_cached_apply():
  """A user model of CachedLayers: a causal running sum, cached per position like a KV cache."""

  def fn(x):                                                            # x [B, T, 1] float
    w = hk.get_parameter("w", (), init=hk.initializers.Constant(2.0))
    return jnp.cumsum(x, axis=1) * w

  def decode_fn(x, cache, pos):                                         # cache {"x": [B, L]}
    w = hk.get_parameter("w", (), init=hk.initializers.Constant(2.0))
    xs = jax.lax.dynamic_update_slice_in_dim(cache["x"], x[..., 0], pos, axis=1)  # [B, L]
    visible = jnp.arange(xs.shape[1])[None, :] <= (pos + jnp.arange(x.shape[1]))[:, None]
    total = jnp.einsum("tl,bl->bt", visible.astype(xs.dtype), xs)[..., None]  # [B, T, 1]
    return total * w, {"x": xs}

  def embed(tokens):
    return tokens[..., None].astype(jnp.float32)

  def embed_decode(tokens, cache, pos):
    del pos
    return embed(tokens), cache

  def head(x):                                                          # [B, T, 1] -> [B, T, 7]
    return -jnp.abs(jnp.mod(x, 7.0) - jnp.arange(7.0))

  def head_decode(x, cache, pos):
    del pos
    return head(x), cache

  layers = [M.CachedLayer.from_fns("embed", embed, embed_decode, lambda b, n: {}),
            M.CachedLayer.from_fns("sum", fn, decode_fn,
                                   lambda b, n: {"x": jnp.zeros((b, n), jnp.float32)}),
            M.CachedLayer.from_fns("head", head, head_decode, lambda b, n: {})]
  model = hkpipe.SequentialModel(layers, lambda y, t: jnp.mean(y))
  p = np.array([[1, 2], [3, 3]], np.int32)
  params = model.init(jax.random.key(0), jnp.asarray(p))
  cached = M.generate(model, params, p, max_new_tokens=5, rng=jax.random.key(0), temperature=0.0,
                      seq_len=10, use_cache=True)
  ref = M.generate(model, params, p, max_new_tokens=5, rng=jax.random.key(0), temperature=0.0,
                   seq_len=10, use_cache=False)
  np.testing.assert_array_equal(np.asarray(cached), np.asarray(ref))
  plain = hkpipe.SequentialModel([hkpipe.Layer.from_fn(l.name, f) for l, f in
                                  zip(layers, (embed, fn, head))], model.loss_fn)
  with pytest.raises(ValueError, match=r"layers \['embed', 'sum', 'head'\] are plain"):
    M.generate(plain, params, p, max_new_tokens=5, rng=jax.random.key(0), seq_len=10,
               use_cache=True)
