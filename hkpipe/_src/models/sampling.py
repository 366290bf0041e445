"""Token sampling (greedy, temperature, top-k, top-p) and the recompute reference step.

Sampling settings travel into compiled code as traced scalars (:meth:`Sampling.arrays`), so
changing them never recompiles. Each sequence draws with its own key, ``fold_in(fold_in(rng,
step), row)`` where ``row`` is its index in the whole batch: a sequence's samples do not depend on
how the batch is cut into groups (pipelined decoding) or on the other rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from hkpipe._src import errors
from hkpipe._src import model as model_lib
from hkpipe._src.models import losses


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How to pick each token from the logits. Checked on construction (before any compile).

  Attributes:
    temperature: logits are divided by this; ``0`` is greedy (argmax).
    top_k: sample among the ``top_k`` most likely tokens only; None: all.
    top_p: nucleus sampling: among the most likely tokens whose probability (after temperature
      and top-k) adds up to ``top_p``, in ``(0, 1]``; None (or 1): all.
    end_token: a sequence stops after emitting this id; later positions repeat it. None: never.
  """

  temperature: float = 1.0
  top_k: int | None = None
  top_p: float | None = None
  end_token: int | None = None

  def __post_init__(self):
    t, k, p, e = self.temperature, self.top_k, self.top_p, self.end_token
    if not _is_real(t) or not t >= 0 or t == float("inf"):
      raise errors.ConfigError(f"temperature={t!r} is invalid: it must be a finite number >= 0 "
                               "(0 is greedy decoding).")
    if k is not None and (not _is_int(k) or k < 1):
      raise errors.ConfigError(f"top_k={k!r} is invalid: it must be None or an int in "
                               "[1, vocab_size] (1 is greedy).")
    if p is not None and (not _is_real(p) or not 0 < p <= 1):
      raise errors.ConfigError(f"top_p={p!r} is invalid: it must be None or a number in (0, 1] "
                               "(1 keeps every token).")
    if e is not None and (not _is_int(e) or e < 0):
      raise errors.ConfigError(f"end_token={e!r} is invalid: it must be None or a token id >= 0.")

  def check_vocab(self, vocab: int | None) -> None:
    """Raises a ConfigError if ``top_k`` or ``end_token`` exceed the vocabulary."""
    if vocab is None:
      return
    if self.top_k is not None and self.top_k > vocab:
      raise errors.ConfigError(f"top_k={self.top_k} is invalid: it must be None or an int in "
                               f"[1, vocab_size={vocab}].")
    if self.end_token is not None and self.end_token >= vocab:
      raise errors.ConfigError(f"end_token={self.end_token} is invalid: it must be a token id in "
                               f"[0, vocab_size={vocab}).")

  def arrays(self) -> dict:
    """The settings as traced scalars: ``top_k=0`` / ``top_p=1`` / ``end_token=-1`` mean off."""
    return {"temperature": jnp.float32(self.temperature),
            "top_k": jnp.int32(self.top_k or 0),
            "top_p": jnp.float32(1.0 if self.top_p is None else self.top_p),
            "end_token": jnp.int32(-1 if self.end_token is None else self.end_token)}


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Sets logits outside the top-k, then outside the top-p nucleus, to ``-inf``.

  The nucleus is the smallest set of most likely tokens (of the top-k ones) whose probabilities
  add up to at least ``top_p``: token ``i`` in descending order is kept iff the probability mass
  strictly before it is ``< top_p`` (so the most likely token is always kept).

  Args:
    logits: ``[B, V]`` float32 (already divided by the temperature).
    top_k: int32 scalar; ``0`` keeps all.
    top_p: float32 scalar; ``1`` keeps all.

  Returns:
    ``[B, V]`` filtered logits.
  """
  v = logits.shape[-1]
  desc = -jnp.sort(-logits, axis=-1)                                    # [B, V]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)                    # scalar
  in_k = jnp.arange(v) < k                                              # [V]
  desc = jnp.where(in_k, desc, -jnp.inf)                                # [B, V]
  probs = jax.nn.softmax(desc, axis=-1)                                 # [B, V]
  before = jnp.cumsum(probs, axis=-1) - probs                           # [B, V] mass before i
  keep = in_k & ((before < top_p) | (jnp.arange(v) == 0))               # [B, V]
  n_keep = jnp.sum(keep, axis=-1, keepdims=True)                        # [B, 1]
  threshold = jnp.take_along_axis(desc, n_keep - 1, axis=-1)            # [B, 1]
  return jnp.where(logits < threshold, -jnp.inf, logits)


def row_keys(rng: jax.Array, step: jax.Array, rows: jax.Array) -> jax.Array:
  """Per-sequence keys of one decoding step: ``fold_in(fold_in(rng, step), row)``; ``[B]``."""
  step_key = jax.random.fold_in(rng, step)
  return jax.vmap(lambda r: jax.random.fold_in(step_key, r))(rows)


def sample(logits: jax.Array, keys: jax.Array, s: dict) -> jax.Array:
  """One token per row: greedy when ``temperature == 0``, else filtered categorical.

  Args:
    logits: ``[B, V]`` float logits.
    keys: ``[B]`` keys (see :func:`row_keys`).
    s: :meth:`Sampling.arrays`.

  Returns:
    ``[B]`` int32 tokens.
  """
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)                # [B]
  temp = s["temperature"]
  scaled = logits / jnp.where(temp > 0, temp, 1.0)                      # [B, V]
  needs_filter = (s["top_k"] > 0) | (s["top_p"] < 1)
  scaled = jax.lax.cond(needs_filter, filter_logits, lambda l, k, p: l, scaled, s["top_k"],
                        s["top_p"])
  drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)  # [B]
  return jnp.where(temp > 0, drawn, greedy)


def stop(token: jax.Array, done: jax.Array, end_token: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Applies the end token: finished rows repeat it; returns ``(token, done)`` ``[B]`` each."""
  token = jnp.where(done, end_token, token)
  return token, done | (token == end_token)


# ---------------------------------------------------------------------------------------------
# The recompute reference: the whole window per token, no cache.


@functools.partial(jax.jit, static_argnames=("model",))
def _step(model: model_lib.SequentialModel, params: Any, window: jax.Array, length: jax.Array,
          rng: jax.Array, step: jax.Array, done: jax.Array, s: dict
          ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
  """Samples one token and slides it into the window; shapes never change, so this compiles once.

  The window ``[B, W]`` holds the context left-aligned in its first ``length`` slots; the slots
  after it hold stale tokens that a causal model cannot see from position ``length - 1``.

  Returns:
    ``(window, length, token [B], done [B], logits [B, V])``.
  """
  w = window.shape[1]
  logits = losses.as_logits(model.apply(params, window))                # [B, W, V]
  last = jax.lax.dynamic_index_in_dim(logits, length - 1, axis=1,
                                      keepdims=False).astype(jnp.float32)  # [B, V]
  keys = row_keys(rng, step, jnp.arange(window.shape[0]))
  token, done = stop(sample(last, keys, s), done, s["end_token"])       # [B]
  appended = jax.lax.dynamic_update_index_in_dim(
      window, token[:, None], jnp.minimum(length, w - 1), axis=1)       # [B, W]
  shifted = jnp.concatenate([window[:, 1:], token[:, None]], axis=1)    # [B, W]
  window = jnp.where(length < w, appended, shifted)
  return window, jnp.minimum(length + 1, w), token, done, last


def recompute(model: model_lib.SequentialModel, params: Any, prompt: Any, *,
              max_new_tokens: int, rng: jax.Array, sampling: Sampling, window_len: int
              ) -> tuple[jax.Array, jax.Array]:
  """Decodes by recomputing the last ``window_len`` tokens for every new one (a Python loop).

  Returns:
    ``([B, N] new tokens, [B, N, V] float32 logits they were drawn from)``.
  """
  batch = prompt.shape[0]
  context = jnp.asarray(prompt[:, -window_len:], jnp.int32)             # [B, L]
  window = jnp.zeros((batch, window_len), jnp.int32).at[:, :context.shape[1]].set(context)
  length, done, s = jnp.int32(context.shape[1]), jnp.zeros((batch,), bool), sampling.arrays()
  new, logits = [], []
  for i in range(max_new_tokens):
    window, length, token, done, last = _step(model, params, window, length, rng, jnp.int32(i),
                                              done, s)
    new.append(token)                                                   # [B]
    logits.append(last)                                                 # [B, V]
  if not new:
    return jnp.zeros((batch, 0), jnp.int32), jnp.zeros((batch, 0, 0), jnp.float32)
  return jnp.stack(new, axis=1), jnp.stack(logits, axis=1)
