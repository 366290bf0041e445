"""Autoregressive sampling with a fixed-shape, sliding context window."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hkpipe._src import model as model_lib


@functools.partial(jax.jit, static_argnames=("model", "top_k"))
def _step(model: model_lib.SequentialModel, params: Any, window: jax.Array, length: jax.Array,
          key: jax.Array, temperature: jax.Array, top_k: int | None
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Samples one token and slides it into the window; shapes never change, so this compiles once.

  The window ``[B, W]`` holds the context left-aligned in its first ``length`` slots; the slots
  after it hold stale tokens that a causal model cannot see from position ``length - 1``.
  """
  w = window.shape[1]
  logits = model.apply(params, window)                                  # [B, W, V]
  last = jax.lax.dynamic_index_in_dim(logits, length - 1, axis=1,
                                      keepdims=False).astype(jnp.float32)  # [B, V]
  last = last / temperature
  if top_k is not None:
    kth = jax.lax.top_k(last, top_k)[0][:, -1:]                         # [B, 1]
    last = jnp.where(last < kth, -jnp.inf, last)
  token = jax.random.categorical(key, last, axis=-1).astype(jnp.int32)  # [B]
  appended = jax.lax.dynamic_update_index_in_dim(
      window, token[:, None], jnp.minimum(length, w - 1), axis=1)       # [B, W]
  shifted = jnp.concatenate([window[:, 1:], token[:, None]], axis=1)    # [B, W]
  window = jnp.where(length < w, appended, shifted)
  return window, jnp.minimum(length + 1, w), token


def _context_len(model: model_lib.SequentialModel, seq_len: int | None) -> int:
  if seq_len is not None:
    return seq_len
  config = getattr(model, "config", None)
  if config is None or not hasattr(config, "seq_len"):
    raise ValueError("generate() cannot tell the context length of this model; pass seq_len=... "
                     "(models from hkpipe.models.build carry it in model.config.seq_len).")
  return config.seq_len


def generate(model: model_lib.SequentialModel, params: Any, prompt_tokens: Any, *,
             max_new_tokens: int, rng: jax.Array, temperature: float = 1.0,
             top_k: int | None = None, seq_len: int | None = None) -> jax.Array:
  """Samples ``max_new_tokens`` tokens after a prompt, conditioning on the last ``seq_len`` tokens.

  Each new token recomputes the model over a fixed ``[B, seq_len]`` window (no KV cache; fine for
  small models). The per-token step is jitted with fixed shapes, so it compiles once per
  ``(model, batch size, top_k)`` regardless of the prompt length or ``max_new_tokens``.

  Args:
    model: a language model mapping ``[B, T]`` int tokens to ``[B, T, V]`` logits, e.g. from
      :func:`build`.
    params: its canonical parameters.
    prompt_tokens: ``[B, P]`` integer tokens, ``P >= 1``.
    max_new_tokens: number of tokens to sample (>= 0).
    rng: PRNG key; the same key gives the same tokens.
    temperature: logits are divided by this (> 0); lower is greedier.
    top_k: if set, sample only among the ``top_k`` most likely tokens (``top_k=1`` is greedy).
    seq_len: context window; defaults to ``model.config.seq_len``.

  Returns:
    ``[B, P + max_new_tokens]`` int32 tokens: the prompt followed by the samples.

  Raises:
    ValueError: for a bad prompt, count, temperature, top_k or unknown context length.
  """
  window_len = _context_len(model, seq_len)
  prompt = np.asarray(prompt_tokens)
  if prompt.ndim != 2 or prompt.shape[1] < 1 or not np.issubdtype(prompt.dtype, np.integer):
    raise ValueError(f"prompt_tokens must be an integer array [batch, length>=1]; got shape "
                     f"{prompt.shape} and dtype {prompt.dtype}. Use prompt[None] for one prompt.")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}.")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}; use top_k=1 for greedy "
                     "decoding.")
  vocab = getattr(getattr(model, "config", None), "vocab_size", None)
  if top_k is not None and (not isinstance(top_k, int) or top_k < 1 or
                            (vocab is not None and top_k > vocab)):
    raise ValueError(f"top_k must be None or an int in [1, vocab_size={vocab}], got {top_k!r}.")

  batch = prompt.shape[0]
  context = prompt[:, -window_len:].astype(np.int32)                    # [B, L]
  window = np.zeros((batch, window_len), np.int32)                      # [B, W]
  window[:, :context.shape[1]] = context
  window_arr, length = jnp.asarray(window), jnp.int32(context.shape[1])
  temp = jnp.float32(temperature)
  new = []
  for i in range(max_new_tokens):
    window_arr, length, token = _step(model, params, window_arr, length,
                                      jax.random.fold_in(rng, i), temp, top_k)
    new.append(token)                                                   # [B]
  sampled = jnp.stack(new, axis=1) if new else jnp.zeros((batch, 0), jnp.int32)  # [B, N]
  return jnp.concatenate([jnp.asarray(prompt, jnp.int32), sampled], axis=1)
