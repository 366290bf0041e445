"""Building blocks shared by the model zoo: config checks, norms, embeddings, RoPE, attention.

Everything here is written for the canonical ``[B, T, D]`` activation layout. Parameters are always
created in float32; under mixed precision the layer's policy (:mod:`hkpipe.precision`) casts them
to the compute dtype before ``apply``, so the modules compute in whatever dtype their inputs and
parameters arrive in. Numerically sensitive reductions (norm statistics, softmax) run in float32.
"""

from __future__ import annotations

import math
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hkpipe._src import precision
from hkpipe._src.models import attention as attention_lib
from hkpipe._src.models import losses

DTYPES = ("float32", "bfloat16")


# ---------------------------------------------------------------------------------------------
# Config validation: each check raises a ValueError that names the field, the value and the fix.


def _fail(config_name: str, field: str, value: Any, requirement: str, fix: str) -> None:
  raise ValueError(f"{config_name}.{field}={value!r} is invalid: {requirement}. {fix}")


def check_positive_int(config_name: str, field: str, value: Any) -> None:
  """Raises unless ``value`` is an int (not a bool) greater than zero."""
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    _fail(config_name, field, value, "it must be a positive int",
          f"Pass a whole number >= 1 for {field}.")


def check_bool(config_name: str, field: str, value: Any) -> None:
  """Raises unless ``value`` is a bool."""
  if not isinstance(value, bool):
    _fail(config_name, field, value, "it must be a bool", f"Pass True or False for {field}.")


def check_real(config_name: str, field: str, value: Any, low: float, high: float | None, *,
               low_inclusive: bool = True) -> None:
  """Raises unless ``value`` is a real number in ``[low, high)`` (or ``(low, high)``)."""
  is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
  above = is_number and (value >= low if low_inclusive else value > low)
  below = is_number and (high is None or value < high)
  if not (is_number and above and below and math.isfinite(value)):
    left = "[" if low_inclusive else "("
    right = "inf)" if high is None else f"{high})"
    _fail(config_name, field, value, f"it must be a number in {left}{low}, {right}",
          f"Pick {field} in that range.")


def check_dtype(config_name: str, value: Any) -> None:
  """Raises unless ``value`` is one of :data:`DTYPES` or a ``jmp``-style policy string
  (``"params=float32,compute=bfloat16,output=float32"``, see :mod:`hkpipe._src.precision`)."""
  if isinstance(value, str) and "=" in value:
    try:
      precision.get_policy(value)
    except ValueError as e:
      _fail(config_name, "dtype", value, str(e), "Fix the policy string.")
  elif value not in DTYPES:
    _fail(config_name, "dtype", value, f"it must be one of {list(DTYPES)} or a policy string",
          'Use "float32", or "bfloat16" for mixed precision (parameters stay float32), or '
          '"params=float32,compute=bfloat16,output=float32".')


def check_divides(config_name: str, field: str, value: int, other_field: str, other: int) -> None:
  """Raises unless ``value`` divides ``other``."""
  if other % value:
    _fail(config_name, field, value, f"it must divide {other_field}={other}",
          f"Choose {field} among the divisors of {other}, or change {other_field}.")


class LlamaDims:
  """Derived widths and shared checks of the Llama-style configs (``LlamaConfig``,
  ``MoEConfig``): a mixin over their ``n_heads``, ``n_kv_heads``, ``d_model``, ``d_ff``,
  ``rope_theta`` and ``norm_eps`` fields."""

  n_heads: int
  n_kv_heads: int | None
  d_model: int
  d_ff: int | None
  rope_theta: float
  norm_eps: float

  @property
  def kv_heads(self) -> int:
    """Number of key/value heads: ``n_kv_heads`` or, when None, ``n_heads``."""
    return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

  @property
  def head_dim(self) -> int:
    """Width of one attention head, ``d_model // n_heads``."""
    return self.d_model // self.n_heads

  @property
  def ff_dim(self) -> int:
    """SwiGLU hidden width: ``d_ff`` or, when None, ``ceil(8 * d_model / 3)`` rounded up to 8."""
    if self.d_ff is not None:
      return self.d_ff
    return -(-(8 * self.d_model) // 24) * 8

  def check_llama_fields(self) -> None:
    """Checks the Llama-style fields (``n_kv_heads``, an even RoPE head dim, ``rope_theta``,
    ``norm_eps``); errors name the config class."""
    name = type(self).__name__
    n_kv_heads = self.n_kv_heads
    if n_kv_heads is not None:
      check_positive_int(name, "n_kv_heads", n_kv_heads)
      check_divides(name, "n_kv_heads", n_kv_heads, "n_heads", self.n_heads)
    if self.head_dim % 2:
      raise ValueError(f"{name}.d_model={self.d_model} with n_heads={self.n_heads} gives an "
                       f"odd head dim {self.head_dim}, but RoPE needs an even head dim. Choose "
                       "d_model and n_heads so that d_model // n_heads is even.")
    check_real(name, "rope_theta", self.rope_theta, 0.0, None, low_inclusive=False)
    check_real(name, "norm_eps", self.norm_eps, 0.0, None, low_inclusive=False)


def check_common(config: Any) -> None:
  """Checks the fields every language-model config shares."""
  name = type(config).__name__
  for field in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads"):
    check_positive_int(name, field, getattr(config, field))
  if config.d_ff is not None:
    check_positive_int(name, "d_ff", config.d_ff)
  check_divides(name, "n_heads", config.n_heads, "d_model", config.d_model)
  check_real(name, "dropout", config.dropout, 0.0, 1.0)
  check_real(name, "z_loss", config.z_loss, 0.0, None)
  check_real(name, "label_smoothing", config.label_smoothing, 0.0, 1.0)
  if config.loss_chunk_size is not None:
    check_positive_int(name, "loss_chunk_size", config.loss_chunk_size)
  check_dtype(name, config.dtype)
  attention_lib.check_impl(name, config.attention_impl)


def check_tokens(tokens: jax.Array, seq_len: int) -> None:
  """Checks the token input of an embed layer (shapes are static, so this runs at trace time)."""
  if tokens.ndim != 2:
    raise ValueError(f"Token inputs must have shape [batch, time]; got shape {tokens.shape}. "
                     "Add a batch axis (tokens[None]) or flatten extra axes.")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"Token inputs must be integers; got dtype {tokens.dtype}. "
                     "Cast them with tokens.astype(jnp.int32).")
  if tokens.shape[1] > seq_len:
    raise ValueError(f"Token sequence length {tokens.shape[1]} exceeds the model's seq_len="
                     f"{seq_len}. Crop inputs to the last {seq_len} tokens or build the model "
                     "with a larger seq_len.")


# ---------------------------------------------------------------------------------------------
# Initialisers and small helpers.


def normal_init(stddev: float) -> hk.initializers.Initializer:
  """Plain (untruncated) normal initialiser, as in nanoGPT."""
  return hk.initializers.RandomNormal(stddev=stddev)


def residual_init(n_layers: int, stddev: float = 0.02) -> hk.initializers.Initializer:
  """Init of projections that write into the residual stream: ``stddev / sqrt(2 * n_layers)``."""
  return normal_init(stddev / math.sqrt(2 * n_layers))


def param(name: str, shape: tuple[int, ...], init: hk.initializers.Initializer) -> jax.Array:
  """A float32 parameter of the current module (cast later by ``with_compute_dtype``)."""
  return hk.get_parameter(name, shape, jnp.float32, init=init)


def dropout(x: jax.Array, rate: float, is_training: bool) -> jax.Array:
  """Inverted dropout, only while training and only if ``rate > 0``."""
  if is_training and rate > 0.0:
    return hk.dropout(hk.next_rng_key(), rate, x)
  return x


def dense(x: jax.Array, features: int, *, w_name: str, b_name: str | None,
          w_init: hk.initializers.Initializer) -> jax.Array:
  """``x @ w (+ b)`` with ``w: [in, features]`` created in the current module."""
  w = param(w_name, (x.shape[-1], features), w_init)                    # [D_in, F]
  y = jnp.einsum("...d,df->...f", x, w.astype(x.dtype))                 # [..., F]
  if b_name is not None:
    y = y + param(b_name, (features,), jnp.zeros).astype(x.dtype)
  return y


# ---------------------------------------------------------------------------------------------
# Normalisation.


class LayerNorm(hk.Module):
  """LayerNorm over the last axis with an optional offset (bias); statistics in float32."""

  def __init__(self, *, bias: bool, eps: float = 1e-5, name: str | None = None):
    super().__init__(name=name)
    self.bias = bias
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:                        # x [..., D]
    d = x.shape[-1]
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)                        # [..., 1]
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)      # [..., 1]
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)                    # [..., D]
    y = y * param("scale", (d,), jnp.ones).astype(jnp.float32)
    if self.bias:
      y = y + param("offset", (d,), jnp.zeros).astype(jnp.float32)
    return y.astype(x.dtype)


class RMSNorm(hk.Module):
  """Root-mean-square norm over the last axis (no mean subtraction, no bias); float32 stats."""

  def __init__(self, *, eps: float, name: str | None = None):
    super().__init__(name=name)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:                        # x [..., D]
    x32 = x.astype(jnp.float32)
    ms = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)              # [..., 1]
    y = x32 * jax.lax.rsqrt(ms + self.eps)                              # [..., D]
    y = y * param("scale", (x.shape[-1],), jnp.ones).astype(jnp.float32)
    return y.astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Embeddings and the language-model head.


class TokenEmbedding(hk.Module):
  """Token embedding ``[V, D]`` looked up with a gather (``jnp.take`` along the vocab axis).

  The forward equals the one-hot matmul ``one_hot(tokens) @ w`` exactly (ids outside ``[0, V)``
  give a zero row, as the one-hot does), and the gradient (a scatter-add into ``w``) equals the
  one-hot matmul's to float32 rounding, without materialising the ``[B, T, V]`` one-hot. GSPMD
  partitions the gather for batch-sharded tokens and for a vocab-sharded table (under explicit
  mesh axes too, where the output sharding is spelled out). The parameter is
  named ``embeddings`` (shape ``[vocab_size, d_model]``).
  """

  def __init__(self, vocab_size: int, d_model: int, *, stddev: float = 0.02,
               name: str | None = None):
    super().__init__(name=name)
    self.vocab_size = vocab_size
    self.d_model = d_model
    self.stddev = stddev

  def __call__(self, tokens: jax.Array) -> jax.Array:                   # tokens [B, T] int
    w = param("embeddings", (self.vocab_size, self.d_model), normal_init(self.stddev))  # [V, D]
    return lookup(w, tokens)                                            # [B, T, D]


def lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
  """Rows ``table[ids]`` (``[V, D]``, ``[...]`` -> ``[..., D]``); ids outside ``[0, V)`` give 0.

  Negative ids are out of range too (no wrap-around), so the result equals
  ``one_hot(ids, V) @ table`` for every integer id.
  """
  v = table.shape[0]
  valid = (ids >= 0) & (ids < v)                                        # [...]
  safe = jnp.where(valid, ids, 0)                                       # [...]
  if jax.typeof(safe).sharding.mesh.explicit_axes:
    # Explicit axes need the output sharding spelled out: ids' batch axes, the table's D axis.
    rows = table.at[safe].get(mode="clip", out_sharding=_gather_sharding(safe, table))
  else:
    rows = jnp.take(table, safe, axis=0, mode="clip")                   # [..., D]
  return jnp.where(valid[..., None], rows, jnp.zeros((), table.dtype))


def _gather_sharding(ids: jax.Array, table: jax.Array) -> NamedSharding:
  """``table[ids]``'s sharding under explicit axes: ``ids``' spec, then the table's D axis."""
  ids_sharding = jax.typeof(ids).sharding
  ids_spec = tuple(ids_sharding.spec) + (None,) * (ids.ndim - len(ids_sharding.spec))
  table_spec = tuple(jax.typeof(table).sharding.spec) + (None,) * table.ndim
  return NamedSharding(ids_sharding.mesh, P(*ids_spec, table_spec[1]))


class PositionEmbedding(hk.Module):
  """Learned absolute positions ``[seq_len, D]`` (parameter ``embeddings``)."""

  def __init__(self, seq_len: int, d_model: int, *, stddev: float = 0.02,
               name: str | None = None):
    super().__init__(name=name)
    self.seq_len = seq_len
    self.d_model = d_model
    self.stddev = stddev

  def __call__(self, length: int) -> jax.Array:
    return self.at(0, length)

  def at(self, start: Any, length: int) -> jax.Array:
    """Positions ``start .. start + length - 1`` (``start`` may be traced): ``[length, D]``."""
    w = param("embeddings", (self.seq_len, self.d_model), normal_init(self.stddev))  # [T_max, D]
    return jax.lax.dynamic_slice_in_dim(w, start, length, axis=0)       # [T, D]


class LMHead(hk.Module):
  """Output projection with weight ``w: [vocab_size, D]``; ``logits = x @ w.T`` in float32.

  The ``[V, D]`` layout equals the token embedding's, so the head can hold a tied copy of it.
  """

  def __init__(self, vocab_size: int, *, stddev: float = 0.02, name: str | None = None):
    super().__init__(name=name)
    self.vocab_size = vocab_size
    self.stddev = stddev

  def __call__(self, x: jax.Array, chunked: bool = False) -> Any:       # x [B, T, D]
    """``[B, T, V]`` float32 logits, or with ``chunked`` a :class:`losses.HeadOutput` of ``x``
    and the compute-dtype weight, for :func:`losses.chunked_cross_entropy`."""
    w = param("w", (self.vocab_size, x.shape[-1]), normal_init(self.stddev))  # [V, D]
    if chunked:
      return losses.HeadOutput(x, w.astype(x.dtype))
    logits = jnp.einsum("btd,vd->btv", x, w.astype(x.dtype))            # [B, T, V]
    return logits.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# Rotary position embedding and attention.


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (rotate-half convention) of ``x: [B, T, H, hd]``.

  Pair ``i`` of each head is ``(x[..., i], x[..., i + hd/2])``, rotated by the angle
  ``positions * theta ** (-2i / hd)``. Computed in float32, returned in ``x.dtype``.

  Args:
    x: queries or keys, ``[B, T, H, hd]`` with even ``hd``.
    positions: ``[T]`` integer positions.
    theta: the RoPE base (e.g. 10000).

  Returns:
    The rotated ``[B, T, H, hd]`` array.
  """
  hd = x.shape[-1]
  half = hd // 2
  freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)        # [hd/2]
  angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]      # [T, hd/2]
  cos = jnp.cos(angles)[None, :, None, :]                               # [1, T, 1, hd/2]
  sin = jnp.sin(angles)[None, :, None, :]                               # [1, T, 1, hd/2]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]                             # [B, T, H, hd/2] each
  out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)  # [B, T, H, hd]
  return out.astype(x.dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, dropout_rate: float = 0.0,
                     dropout_rng: jax.Array | None = None) -> jax.Array:
  """Causal scaled dot-product attention with grouped-query support.

  Query head ``h`` attends with key/value head ``h // (H // K)`` (consecutive query heads share a
  key/value head). Scores and softmax are computed in float32.

  Args:
    q: queries ``[B, T, H, hd]``.
    k: keys ``[B, T, K, hd]`` with ``K`` dividing ``H``.
    v: values ``[B, T, K, hd]``.
    dropout_rate: dropout on the attention probabilities (applied only with ``dropout_rng``).
    dropout_rng: key for attention dropout, or None for no dropout.

  Returns:
    The attended values ``[B, T, H, hd]`` in ``v.dtype``.
  """
  b, t, h, hd = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, h // kv, hd)                                  # [B, T, K, G, hd]
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k,
                      preferred_element_type=jnp.float32)               # [B, K, G, T, T]
  scores = scores / math.sqrt(hd)
  mask = jnp.tril(jnp.ones((t, t), dtype=bool))                         # [T, T], True = visible
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)                               # [B, K, G, T, T] f32
  if dropout_rng is not None and dropout_rate > 0.0:
    probs = hk.dropout(dropout_rng, dropout_rate, probs)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)       # [B, T, K, G, hd]
  return out.reshape(b, t, h, hd)                                       # [B, T, H, hd]


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     q_positions: jax.Array) -> jax.Array:
  """Attention of queries at ``q_positions`` over a key/value cache (grouped-query support).

  Query ``i`` sees cache positions ``<= q_positions[i]``, so slots past the written prefix are
  never read. Same head grouping and float32 softmax as :func:`causal_attention`.

  Args:
    q: queries ``[B, T, H, hd]``.
    k: cached keys ``[B, L, K, hd]`` with ``K`` dividing ``H``.
    v: cached values ``[B, L, K, hd]``.
    q_positions: ``[T]`` int positions of the queries.

  Returns:
    The attended values ``[B, T, H, hd]`` in ``v.dtype``.
  """
  b, t, h, hd = q.shape
  kv, cache_len = k.shape[2], k.shape[1]
  q = q.reshape(b, t, kv, h // kv, hd)                                  # [B, T, K, G, hd]
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k,
                      preferred_element_type=jnp.float32)               # [B, K, G, T, L]
  scores = scores / math.sqrt(hd)
  mask = jnp.arange(cache_len)[None, :] <= q_positions[:, None]         # [T, L]
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)                               # [B, K, G, T, L] f32
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)       # [B, T, K, G, hd]
  return out.reshape(b, t, h, hd)                                       # [B, T, H, hd]


class Attention(hk.Module):
  """Causal self-attention: q/k/v projections, optional RoPE, grouped-query attention, output.

  Parameters: ``w_q [D, H*hd]``, ``w_k [D, K*hd]``, ``w_v [D, K*hd]``, ``w_o [H*hd, D]`` and, with
  ``bias``, ``b_q``, ``b_k``, ``b_v``, ``b_o``. The attention itself runs through
  ``jax.nn.dot_product_attention`` with implementation ``impl`` (see :mod:`attention`), except
  with attention dropout active, where the reference :func:`causal_attention` is used.
  """

  def __init__(self, *, n_heads: int, n_kv_heads: int, head_dim: int, bias: bool,
               w_init: hk.initializers.Initializer, out_init: hk.initializers.Initializer,
               dropout: float = 0.0, rope_theta: float | None = None, impl: str = "xla",
               name: str | None = None):
    super().__init__(name=name)
    self.impl = impl
    self.n_heads = n_heads
    self.n_kv_heads = n_kv_heads
    self.head_dim = head_dim
    self.bias = bias
    self.w_init = w_init
    self.out_init = out_init
    self.dropout = dropout
    self.rope_theta = rope_theta

  def _proj(self, x: jax.Array, heads: int, tag: str) -> jax.Array:
    y = dense(x, heads * self.head_dim, w_name=f"w_{tag}",
              b_name=f"b_{tag}" if self.bias else None, w_init=self.w_init)  # [B, T, heads*hd]
    return y.reshape(x.shape[:-1] + (heads, self.head_dim))             # [B, T, heads, hd]

  def _qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    q = self._proj(x, self.n_heads, "q")                                # [B, T, H, hd]
    k = self._proj(x, self.n_kv_heads, "k")                             # [B, T, K, hd]
    v = self._proj(x, self.n_kv_heads, "v")                             # [B, T, K, hd]
    if self.rope_theta is not None:
      q = rope(q, positions, self.rope_theta)
      k = rope(k, positions, self.rope_theta)
    return q, k, v

  def _out(self, y: jax.Array, d: int) -> jax.Array:                    # y [B, T, H, hd]
    b, t = y.shape[:2]
    y = y.reshape(b, t, self.n_heads * self.head_dim)                   # [B, T, H*hd]
    return dense(y, d, w_name="w_o", b_name="b_o" if self.bias else None,
                 w_init=self.out_init)                                  # [B, T, D]

  def decode(self, x: jax.Array, cache: dict, pos: jax.Array) -> tuple[jax.Array, dict]:
    """Attention of ``T`` new positions ``pos .. pos+T-1`` against the cache (no dropout).

    Writes the new keys/values into the cache at ``pos`` and attends over every cached position
    up to each query's own. ``T`` is the prompt window for a prefill (``pos = 0``) and 1 per
    decoded token, so the shapes never depend on ``pos``.

    Args:
      x: ``[B, T, D]`` inputs of the new positions.
      cache: ``{"k", "v": [B, L, K, hd]}`` holding positions ``< pos``.
      pos: int32 scalar, the position of ``x[:, 0]``; ``pos + T <= L``.

    Returns:
      ``([B, T, D] outputs, the updated cache)``.
    """
    t, d = x.shape[1], x.shape[2]
    positions = pos + jnp.arange(t)                                     # [T]
    q, k, v = self._qkv(x, positions)
    k_all, v_all = write_cache(cache, k, v, pos)                        # [B, L, K, hd] each
    y = attention_lib.over_cache(q, k_all.astype(q.dtype), v_all.astype(q.dtype), positions)
    return self._out(y, d), {"k": k_all, "v": v_all}

  def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:     # x [B, T, D]
    t, d = x.shape[1], x.shape[2]
    q, k, v = self._qkv(x, jnp.arange(t))
    if is_training and self.dropout > 0.0:
      y = causal_attention(q, k, v, dropout_rate=self.dropout,
                           dropout_rng=hk.next_rng_key())               # [B, T, H, hd]
    else:
      y = attention_lib.causal(q, k, v, self.impl)                      # [B, T, H, hd]
    return dropout(self._out(y, d), self.dropout, is_training)


def write_cache(cache: dict, k: jax.Array, v: jax.Array,
                pos: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The cache's ``[B, L, K, hd]`` keys and values with ``k``, ``v`` (``[B, T, K, hd]``) written
  at positions ``pos..pos+T``."""
  k_all = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), pos, axis=1)
  v_all = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), pos, axis=1)
  return k_all, v_all


def empty_cache(batch: int, max_len: int, heads: int, head_dim: int, dtype: Any) -> dict:
  """An empty KV cache of one attention layer: ``{"k", "v": [batch, max_len, heads, head_dim]}``."""
  shape = (batch, max_len, heads, head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
