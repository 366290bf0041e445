"""KV-cache decoding on one device: a prefill pass, then a compiled loop of one-token steps.

Shapes depend only on the batch size and the cache length ``L`` (the model's context): the
prompt is padded to ``L`` and prefilled in one pass (positions after the prompt are computed but
never attended to: each is overwritten by its token's keys and values before any query can see
it), and each step feeds one token at a traced position. So :func:`cached_decode` compiles once
per ``(model, batch, L)``, whatever the prompt length, the number of new tokens or the sampling
settings.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from hkpipe._src import model as model_lib
from hkpipe._src.models import cached
from hkpipe._src.models import sampling


@functools.partial(jax.jit, static_argnames=("model", "with_logits"))
def _decode(model: model_lib.SequentialModel, params: Any, window: jax.Array,
            prompt_len: jax.Array, num_new: jax.Array, rng: jax.Array, s: dict,
            with_logits: bool) -> tuple[jax.Array, jax.Array | None]:
  """Prefill ``window [B, L]`` (prompt in its first ``prompt_len`` slots), then decode.

  Returns:
    ``(window [B, L] with the new tokens after the prompt, logits [B, L, V] of each new token
    (row ``i`` is the distribution token ``i`` was drawn from) or None)``.
  """
  layers = cached.check_cached(model.layers)
  batch, max_len = window.shape
  rows = jnp.arange(batch)
  caches = cached.init_caches(layers, batch, max_len)
  logits, caches = cached.apply_range(layers, params, window, caches, 0)  # [B, L, V]
  last = jax.lax.dynamic_index_in_dim(logits, prompt_len - 1, axis=1, keepdims=False)  # [B, V]
  buf = jnp.zeros((batch, max_len, last.shape[-1]), jnp.float32) if with_logits else None

  def cond(carry):
    i, _, _, _, done, _ = carry
    return (i < num_new) & ~jnp.all(done)

  def body(carry):
    i, window, caches, last, done, buf = carry
    token, done = sampling.stop(sampling.sample(last, sampling.row_keys(rng, i, rows), s), done,
                                s["end_token"])                         # [B]
    pos = prompt_len + i
    window = jax.lax.dynamic_update_index_in_dim(window, token[:, None], pos, axis=1)  # [B, L]
    if buf is not None:
      buf = jax.lax.dynamic_update_index_in_dim(buf, last[:, None].astype(jnp.float32), i, axis=1)
    logits, caches = cached.apply_range(layers, params, token[:, None], caches, pos)  # [B, 1, V]
    return i + 1, window, caches, logits[:, 0], done, buf

  done = jnp.zeros((batch,), bool)
  i, window, _, _, done, buf = jax.lax.while_loop(
      cond, body, (jnp.int32(0), window, caches, last, done, buf))
  # Rows that stopped early: the slots the loop did not reach repeat the end token.
  after = jnp.arange(max_len)[None, :] >= prompt_len + i                # [1, L]
  window = jnp.where(after & done[:, None], s["end_token"], window)
  return window, buf


def cached_decode(model: model_lib.SequentialModel, params: Any, prompt: Any, *,
                  max_new_tokens: int, rng: jax.Array, sampling_: sampling.Sampling,
                  max_len: int, with_logits: bool = False) -> tuple[jax.Array, jax.Array | None]:
  """Decodes ``max_new_tokens`` after ``prompt [B, P]`` with KV caches of ``max_len`` positions.

  The caller checks ``P + max_new_tokens <= max_len``.

  Returns:
    ``([B, max_new_tokens] new tokens, [B, max_new_tokens, V] logits or None)``.
  """
  batch, plen = prompt.shape
  window = jnp.zeros((batch, max_len), jnp.int32).at[:, :plen].set(jnp.asarray(prompt, jnp.int32))
  window, logits = _decode(model, params, window, jnp.int32(plen), jnp.int32(max_new_tokens), rng,
                           sampling_.arrays(), with_logits)
  new = window[:, plen:plen + max_new_tokens]
  return new, None if logits is None else logits[:, :max_new_tokens]
