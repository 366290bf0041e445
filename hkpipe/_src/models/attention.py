"""Attention through ``jax.nn.dot_product_attention``, with the implementation chosen by config.

``attention_impl`` (a model-config field) picks the kernel:

- ``"xla"`` (default): XLA's fused einsum + softmax; runs everywhere, float32 softmax.
- ``"cudnn"``: cuDNN flash attention (GPU only; bfloat16/float16 inputs). Building a model with it
  on a machine without a GPU raises :class:`hkpipe.ConfigError` before anything is compiled.

The training path is causal self-attention (``is_causal=True``); the KV-cache decode path attends
queries at positions ``pos..`` over the cache with an explicit ``[T, L]`` mask, which only the
``xla`` implementation accepts, so decoding always uses ``xla`` (it is memory-bound anyway).
Attention dropout is not supported by ``jax.nn.dot_product_attention``: with dropout active in
training the layer falls back to the reference einsum attention in :mod:`common`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from hkpipe._src import errors

IMPLS = ("xla", "cudnn")


def check_impl(config_name: str, value: Any) -> None:
  """Raises :class:`hkpipe.ConfigError` unless ``value`` is one of :data:`IMPLS`."""
  if value not in IMPLS:
    raise errors.ConfigError(
        f"{config_name}.attention_impl={value!r} is invalid: it must be one of {list(IMPLS)}. "
        'Use "xla" (any device) or "cudnn" (flash attention on NVIDIA GPUs).')


def check_available(impl: str, platform: str | None = None) -> None:
  """Raises :class:`hkpipe.ConfigError` if ``impl`` cannot run on ``platform``.

  Args:
    impl: an attention implementation from :data:`IMPLS`.
    platform: the platform the model will run on; default ``jax.default_backend()``.
  """
  platform = jax.default_backend() if platform is None else platform
  if impl == "cudnn" and platform != "gpu":
    raise errors.ConfigError(
        f'attention_impl="cudnn" needs an NVIDIA GPU, but the default JAX platform is '
        f'{platform!r}. Use attention_impl="xla" on {platform}.')


def causal(q: jax.Array, k: jax.Array, v: jax.Array, impl: str) -> jax.Array:
  """Causal grouped-query attention ``[B, T, H, hd] x [B, T, K, hd] -> [B, T, H, hd]``."""
  # impl is one of IMPLS (a str here, the stub wants Literal['xla', 'cudnn'])
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)  # type: ignore[call-overload]


def over_cache(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array) -> jax.Array:
  """Queries ``[B, T, H, hd]`` at ``q_positions [T]`` over a cache ``[B, L, K, hd]``.

  Query ``i`` sees cache slots ``<= q_positions[i]`` (slots past the written prefix are never
  read). Always the ``xla`` implementation (an explicit mask).
  """
  cache_len = k.shape[1]
  mask = jnp.arange(cache_len)[None, :] <= q_positions[:, None]         # [T, L]
  return jax.nn.dot_product_attention(q, k, v, mask=mask[None, None], implementation="xla")
