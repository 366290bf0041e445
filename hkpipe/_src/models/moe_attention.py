"""gpt-oss attention: grouped-query attention with an optional sliding window and learned sinks.

Both options work in training (full sequence) and in cached decoding: the same mask and softmax
run over the positions of the KV cache.
"""

from __future__ import annotations

import math

import haiku as hk
import jax
import jax.numpy as jnp

from hkpipe._src.models import common


def sink_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, *,
                   window: int | None, sinks: jax.Array | None,
                   dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None) -> jax.Array:
  """Causal GQA attention of queries at ``q_positions`` over keys at positions ``0..L-1``.

  Query ``i`` sees keys ``j`` with ``j <= q_positions[i]`` and, with a ``window`` W,
  ``q_positions[i] - j < W``. With ``sinks`` (one logit per query head), each head's softmax has
  one extra column of that logit and no value: the probabilities over real keys sum to less
  than 1. Scores and softmax in float32.

  Args:
    q: ``[B, T, H, hd]`` queries.
    k: ``[B, L, K, hd]`` keys (the whole sequence, or the cache), ``K`` divides ``H``.
    v: ``[B, L, K, hd]`` values.
    q_positions: ``[T]`` int positions of the queries.
    window: sliding window W >= 1, or None for full causal attention.
    sinks: ``[H]`` sink logits, or None.
    dropout_rate: dropout on the probabilities (only with ``dropout_rng``).
    dropout_rng: key for attention dropout, or None.

  Returns:
    ``[B, T, H, hd]`` in ``v.dtype``.
  """
  b, t, h, hd = q.shape
  kv, length = k.shape[2], k.shape[1]
  q = q.reshape(b, t, kv, h // kv, hd)                                  # [B, T, K, G, hd]
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k,
                      preferred_element_type=jnp.float32) / math.sqrt(hd)  # [B, K, G, T, L]
  k_pos = jnp.arange(length)[None, :]                                   # [1, L]
  mask = k_pos <= q_positions[:, None]                                  # [T, L]
  if window is not None:
    mask = mask & (q_positions[:, None] - k_pos < window)
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  if sinks is not None:
    sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, kv, h // kv, 1, 1),
                            (b, kv, h // kv, t, 1))                     # [B, K, G, T, 1]
    probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]
  else:
    probs = jax.nn.softmax(scores, axis=-1)                             # [B, K, G, T, L]
  if dropout_rng is not None and dropout_rate > 0.0:
    probs = hk.dropout(dropout_rng, dropout_rate, probs)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)       # [B, T, K, G, hd]
  return out.reshape(b, t, h, hd)


class SinkAttention(common.Attention):
  """:class:`common.Attention` (RoPE, GQA, no biases) with a sliding window and learned sinks.

  Extra parameter with ``sinks=True``: ``sinks [H]`` (initialised to 0).
  """

  def __init__(self, *, window: int | None, sinks: bool, **kwargs):
    super().__init__(**kwargs)
    self.window = window
    self.use_sinks = sinks

  def _sinks(self) -> jax.Array | None:
    if not self.use_sinks:
      return None
    return common.param("sinks", (self.n_heads,), jnp.zeros)            # [H]

  def decode(self, x: jax.Array, cache: dict, pos: jax.Array) -> tuple[jax.Array, dict]:
    """As :meth:`common.Attention.decode` (cache ``{"k", "v": [B, L, K, hd]}``), with the window
    and sinks."""
    t, d = x.shape[1], x.shape[2]
    positions = pos + jnp.arange(t)                                     # [T]
    q, k, v = self._qkv(x, positions)
    k_all, v_all = common.write_cache(cache, k, v, pos)                 # [B, L, K, hd] each
    y = sink_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), positions,
                       window=self.window, sinks=self._sinks())
    return self._out(y, d), {"k": k_all, "v": v_all}

  def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:     # x [B, T, D]
    t, d = x.shape[1], x.shape[2]
    positions = jnp.arange(t)
    q, k, v = self._qkv(x, positions)
    use_dropout = is_training and self.dropout > 0.0
    y = sink_attention(q, k, v, positions, window=self.window, sinks=self._sinks(),
                       dropout_rate=self.dropout,
                       dropout_rng=hk.next_rng_key() if use_dropout else None)  # [B, T, H, hd]
    return common.dropout(self._out(y, d), self.dropout, is_training)
