"""Layers with a cached apply (KV-cache decoding), and running a range of them.

The contract a layer opts in with (see ``docs/generation.md``): a :class:`CachedLayer` is a
:class:`hkpipe.Layer` plus

- ``decode``: an ``hk.Transformed`` of ``fn(x, cache, pos) -> (y, cache)`` that uses **the same
  parameters** as the layer's ``fn`` (same module and parameter names). ``x`` holds the layer's
  inputs for ``T`` new positions ``pos .. pos+T-1`` (``[B, T, ...]``), ``cache`` what the layer
  keeps from earlier positions, ``pos`` an int32 scalar (traced: it must not change shapes). It
  returns the outputs for those positions and the updated cache, with the cache's shapes and
  dtypes unchanged. Run on a whole sequence from ``pos = 0`` it must give the layer's ``fn``
  outputs (evaluation mode).
- ``init_cache(batch, max_len)``: the empty cache of one layer for ``batch`` sequences of up to
  ``max_len`` positions, a pytree of arrays (``{}`` for a layer that keeps nothing, e.g. a
  position-wise head).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from hkpipe._src import model as model_lib

Cache = Any


@dataclasses.dataclass(frozen=True)
class CachedLayer(model_lib.Layer):
  """A :class:`hkpipe.Layer` that can also decode incrementally with a cache.

  Attributes:
    name: as :class:`hkpipe.Layer`.
    transformed: as :class:`hkpipe.Layer` (the training / full-sequence apply).
    decode: ``hk.Transformed`` of ``fn(x, cache, pos) -> (y, cache)`` with the same parameters.
    init_cache: ``(batch, max_len) -> cache`` pytree of (zero) arrays.
  """

  decode: hk.Transformed = None  # type: ignore[assignment]
  init_cache: Callable[[int, int], Cache] = None  # type: ignore[assignment]

  def __post_init__(self):
    super().__post_init__()
    if not isinstance(self.decode, hk.Transformed) or not callable(self.init_cache):
      raise TypeError(f"CachedLayer {self.name!r} needs decode=hk.transform(fn(x, cache, pos) -> "
                      "(y, cache)) and a callable init_cache(batch, max_len); got "
                      f"decode={type(self.decode).__name__}, "
                      f"init_cache={type(self.init_cache).__name__}.")

  @classmethod
  def from_fns(cls, name: str, fn: Callable[..., Any], decode_fn: Callable[..., Any],
               init_cache: Callable[[int, int], Cache]) -> "CachedLayer":
    """Builds a cached layer from Haiku functions ``fn(x[, is_training])`` and
    ``decode_fn(x, cache, pos) -> (y, cache)`` that share parameters."""
    return cls(name, hk.transform(fn), decode=hk.transform(decode_fn), init_cache=init_cache)

  def apply_cached(self, params: hk.Params, x: Any, cache: Cache, pos: jax.Array
                   ) -> tuple[Any, Cache]:
    """Runs ``decode`` (no rng: decoding is evaluation)."""
    return self.decode.apply(params, None, x, cache, pos)


def cached_with_compute_dtype(layer: CachedLayer, dtype: Any) -> CachedLayer:
  """:func:`hkpipe.with_compute_dtype` for both applies of a cached layer."""
  plain = model_lib.with_compute_dtype(layer, dtype)
  if plain is layer:
    return layer
  base = layer.decode

  def apply(params, rng, x, cache, pos):
    return base.apply(model_lib.cast_floating(params, dtype), rng,
                      model_lib.cast_floating(x, dtype), cache, pos)

  return CachedLayer(layer.name, plain.transformed, decode=hk.Transformed(base.init, apply),
                     init_cache=layer.init_cache)


def check_cached(layers: Sequence[model_lib.Layer]) -> tuple[CachedLayer, ...]:
  """The layers, if every one is a :class:`CachedLayer`; else a ValueError naming the others."""
  missing = [layer.name for layer in layers if not isinstance(layer, CachedLayer)]
  if missing:
    raise ValueError(f"Cached decoding needs a cached apply on every layer; layers {missing} are "
                     "plain hkpipe.Layers. Build them as hkpipe.models.CachedLayer (see "
                     "docs/generation.md), or decode with use_cache=False.")
  return tuple(layers)  # type: ignore[arg-type]


def init_caches(layers: Sequence[CachedLayer], batch: int, max_len: int) -> list:
  """The empty caches of ``layers``, in order."""
  return [layer.init_cache(batch, max_len) for layer in layers]


def apply_range(layers: Sequence[CachedLayer], params: Any, x: Any, caches: Sequence[Cache],
                pos: jax.Array | int) -> tuple[Any, list]:
  """Runs ``layers`` in order on new positions ``pos..``: ``(outputs, updated caches)``.

  Args:
    layers: consecutive cached layers (a whole model or one pipeline stage).
    params: ``{layer_name: params}`` holding at least these layers.
    x: inputs of the first layer for the new positions.
    caches: one cache per layer.
    pos: int32 scalar position of the first new position.
  """
  out = []
  for layer, cache in zip(layers, caches):
    x, cache = layer.apply_cached(params[layer.name], x, cache, jnp.asarray(pos, jnp.int32))
    out.append(cache)
  return x, out
