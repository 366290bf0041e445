"""``hkpipe.models.generate``: checks, then KV-cache decoding or the recompute reference."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hkpipe._src import errors
from hkpipe._src import model as model_lib
from hkpipe._src.models import cached
from hkpipe._src.models import decode
from hkpipe._src.models import sampling


def context_len(model: model_lib.SequentialModel, seq_len: int | None) -> int:
  """The context length: ``seq_len`` or ``model.config.seq_len``."""
  if seq_len is not None:
    return seq_len
  config = getattr(model, "config", None)
  if config is None or not hasattr(config, "seq_len"):
    raise ValueError("generate() cannot tell the context length of this model; pass seq_len=... "
                     "(models from hkpipe.models.build carry it in model.config.seq_len).")
  return config.seq_len


def check_prompt(prompt_tokens: Any, max_new_tokens: Any) -> np.ndarray:
  """The prompt as an int32 ``[B, P]`` numpy array; a ConfigError for a bad prompt or count."""
  prompt = np.asarray(prompt_tokens)
  if prompt.ndim != 2 or prompt.shape[1] < 1 or not np.issubdtype(prompt.dtype, np.integer):
    raise errors.ConfigError(f"prompt_tokens must be an integer array [batch, length>=1]; got "
                             f"shape {prompt.shape} and dtype {prompt.dtype}. Use prompt[None] for "
                             "one prompt.")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
    raise errors.ConfigError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}.")
  return prompt.astype(np.int32)


def check_fits(prompt_len: int, max_new_tokens: int, context: int) -> None:
  """Raises a ConfigError unless prompt and new tokens fit the KV cache's ``context``."""
  if prompt_len > context:
    raise errors.ConfigError(f"The prompt has {prompt_len} tokens, more than the model's context "
                             f"of {context}; pass at most the last {context} tokens.")
  if prompt_len + max_new_tokens > context:
    raise errors.ConfigError(
        f"prompt ({prompt_len} tokens) + max_new_tokens={max_new_tokens} exceeds the model's "
        f"context of {context}, the size of the KV cache; lower max_new_tokens to at most "
        f"{context - prompt_len}, or decode with use_cache=False (a sliding window, recomputed "
        "for every token).")


def generate(model: model_lib.SequentialModel, params: Any, prompt_tokens: Any, *,
             max_new_tokens: int, rng: jax.Array, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None,
             end_token: int | None = None, seq_len: int | None = None,
             use_cache: bool | None = None) -> jax.Array:
  """Samples ``max_new_tokens`` tokens after a prompt.

  With a KV cache (every layer a :class:`CachedLayer`, as in :func:`build`'s models), the prompt
  is prefilled in one pass and each token costs one single-position step; the whole loop is one
  compiled ``lax.while_loop``, compiled once per ``(model, batch size, seq_len)``. Without one
  (``use_cache=False``, the reference), each token recomputes the last ``seq_len`` tokens (a
  sliding window, so any number of tokens can be sampled).

  Args:
    model: a language model mapping ``[B, T]`` int tokens to ``[B, T, V]`` logits, e.g. from
      :func:`build`.
    params: its canonical parameters, on one device.
    prompt_tokens: ``[B, P]`` integer tokens, ``P >= 1``.
    max_new_tokens: number of tokens to sample (>= 0).
    rng: PRNG key; the same key gives the same tokens (each row draws with its own key, see
      ``docs/generation.md``).
    temperature: logits are divided by this (>= 0); 0 is greedy decoding.
    top_k: if set, sample only among the ``top_k`` most likely tokens.
    top_p: if set, nucleus sampling over the most likely tokens holding ``top_p`` of the
      probability (in ``(0, 1]``).
    end_token: if set, a row stops after this token; its later positions repeat it.
    seq_len: context length; defaults to ``model.config.seq_len``.
    use_cache: True: KV cache (``P + max_new_tokens <= seq_len`` required); False: recompute;
      None (default): the cache when every layer has one and the tokens fit, else recompute.

  Returns:
    ``[B, P + max_new_tokens]`` int32 tokens: the prompt followed by the samples.

  Raises:
    ConfigError: (a ValueError) for a bad prompt, count, sampling setting, a prompt longer than
      the context with ``use_cache=True``, or an unknown context length; before compiling.
  """
  window_len = context_len(model, seq_len)
  prompt = check_prompt(prompt_tokens, max_new_tokens)
  settings = sampling.Sampling(temperature, top_k, top_p, end_token)
  settings.check_vocab(getattr(getattr(model, "config", None), "vocab_size", None))
  if use_cache is None:
    use_cache = (all(isinstance(l, cached.CachedLayer) for l in model.layers)
                 and prompt.shape[1] + max_new_tokens <= window_len)
  if use_cache:
    cached.check_cached(model.layers)
    check_fits(prompt.shape[1], max_new_tokens, window_len)
    new, _ = decode.cached_decode(model, params, prompt, max_new_tokens=max_new_tokens, rng=rng,
                                  sampling_=settings, max_len=window_len)
  else:
    new, _ = sampling.recompute(model, params, prompt, max_new_tokens=max_new_tokens, rng=rng,
                                sampling=settings, window_len=window_len)
  return jnp.concatenate([jnp.asarray(prompt), new.astype(jnp.int32)], axis=1)
