"""GPT-2 as in nanoGPT: learned positions, pre-LayerNorm blocks, GELU MLP, optional weight tying.

Layers (canonical parameter layout ``{layer_name: {module: {param: array}}}``)::

  embed    {"wte": {"embeddings": [V, D]}, "wpe": {"embeddings": [T, D]}}
  block_i  {"ln_1": {"scale", "offset"?}, "attn": {"w_q", "w_k", "w_v", "w_o", "b_*"?},
            "ln_2": {...}, "mlp": {"w_in": [D, F], "b_in"?, "w_out": [F, D], "b_out"?}}
  head     {"ln_f": {...}, "lm_head": {"w": [V, D]}}

``?`` marks parameters that exist only with ``bias=True``. With ``tie_embeddings=True`` the head's
``lm_head/w`` is a tied copy of ``embed/wte/embeddings`` (see :class:`hkpipe.Tie`).
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import haiku as hk
import jax

from hkpipe._src import model as model_lib
from hkpipe._src import precision
from hkpipe._src.models import cached
from hkpipe._src.models import common

INIT_STDDEV = 0.02
LN_EPS = 1e-5


@chex.dataclass(frozen=True, mappable_dataclass=False)
class GPTConfig:
  """GPT-2 (nanoGPT) configuration. Validated on construction; frozen and hashable.

  Attributes:
    vocab_size: number of token ids (e.g. 256 for bytes).
    seq_len: maximum context length (size of the learned position table).
    d_model: width of the residual stream; divisible by ``n_heads``.
    n_layers: number of transformer blocks.
    n_heads: attention heads per block.
    d_ff: hidden width of the MLP; None means ``4 * d_model`` (see :attr:`ff_dim`).
    dropout: dropout rate in ``[0, 1)`` on embeddings, attention probabilities and residual
      branches (training only).
    bias: whether linear layers and LayerNorms have biases/offsets.
    tie_embeddings: share the token embedding with the output head (a :class:`hkpipe.Tie`).
    dtype: the precision policy (:func:`hkpipe.precision.get_policy`): ``"float32"``, or
      ``"bfloat16"`` for bf16 compute with float32 parameters, loss and norms, or a ``jmp``-style
      ``"params=float32,compute=bfloat16,output=float32"``. Applied per layer.
    z_loss: weight of the z-loss term in :func:`cross_entropy` (>= 0).
    label_smoothing: label smoothing of :func:`cross_entropy`, in ``[0, 1)``.
    attention_impl: ``"xla"`` (default, any device) or ``"cudnn"`` (flash attention, GPU only)
      for ``jax.nn.dot_product_attention``; see ``docs/accelerators.md``.
    loss_chunk_size: None (plain loss on ``[B, T, V]`` logits), or a number of tokens: the head
      then returns its hidden state and weight (:class:`HeadOutput`) and the loss computes the
      logits that many tokens at a time (:func:`chunked_cross_entropy`).
  """

  vocab_size: int
  seq_len: int
  d_model: int
  n_layers: int
  n_heads: int
  d_ff: int | None = None
  dropout: float = 0.0
  bias: bool = True
  tie_embeddings: bool = True
  dtype: str = "float32"
  z_loss: float = 0.0
  label_smoothing: float = 0.0
  attention_impl: str = "xla"
  loss_chunk_size: int | None = None

  def __post_init__(self):
    common.check_common(self)
    common.check_bool("GPTConfig", "bias", self.bias)
    common.check_bool("GPTConfig", "tie_embeddings", self.tie_embeddings)

  @property
  def ff_dim(self) -> int:
    """The MLP hidden width: ``d_ff`` or, when None, ``4 * d_model``."""
    return 4 * self.d_model if self.d_ff is None else self.d_ff

  @property
  def head_dim(self) -> int:
    """Width of one attention head, ``d_model // n_heads``."""
    return self.d_model // self.n_heads


class GeluMLP(hk.Module):
  """``w_out(gelu(w_in x))`` with optional biases and dropout on the output."""

  def __init__(self, config: GPTConfig, name: str | None = None):
    super().__init__(name=name)
    self.config = config

  def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:     # x [B, T, D]
    c = self.config
    h = common.dense(x, c.ff_dim, w_name="w_in", b_name="b_in" if c.bias else None,
                     w_init=common.normal_init(INIT_STDDEV))            # [B, T, F]
    h = jax.nn.gelu(h, approximate=False)
    y = common.dense(h, c.d_model, w_name="w_out", b_name="b_out" if c.bias else None,
                     w_init=common.residual_init(c.n_layers, INIT_STDDEV))  # [B, T, D]
    return common.dropout(y, c.dropout, is_training)


def _embed(tokens: jax.Array, pos: jax.Array | int, config: GPTConfig) -> jax.Array:
  common.check_tokens(tokens, config.seq_len)
  tok = common.TokenEmbedding(config.vocab_size, config.d_model, stddev=INIT_STDDEV,
                              name="wte")(tokens)                       # [B, T, D]
  pos_emb = common.PositionEmbedding(config.seq_len, config.d_model, stddev=INIT_STDDEV,
                                     name="wpe").at(pos, tokens.shape[1])  # [T, D]
  return tok + pos_emb[None].astype(tok.dtype)                          # [B, T, D]


def embed_fn(tokens: jax.Array, is_training: bool, *, config: GPTConfig) -> jax.Array:
  """Token + learned position embedding, then dropout: ``[B, T]`` int -> ``[B, T, D]``."""
  return common.dropout(_embed(tokens, 0, config), config.dropout, is_training)


def embed_decode_fn(tokens: jax.Array, cache: dict, pos: jax.Array, *,
                    config: GPTConfig) -> tuple[jax.Array, dict]:
  """Cached apply of ``embed``: tokens at positions ``pos..`` -> ``[B, T, D]`` (no cache)."""
  return _embed(tokens, pos, config), cache


def _attention(c: GPTConfig) -> common.Attention:
  return common.Attention(n_heads=c.n_heads, n_kv_heads=c.n_heads, head_dim=c.head_dim,
                          bias=c.bias, w_init=common.normal_init(INIT_STDDEV),
                          out_init=common.residual_init(c.n_layers, INIT_STDDEV),
                          dropout=c.dropout, impl=c.attention_impl, name="attn")


def block_fn(x: jax.Array, is_training: bool, *, config: GPTConfig) -> jax.Array:
  """One pre-norm transformer block: ``[B, T, D] -> [B, T, D]``."""
  c = config
  attn = _attention(c)
  h = common.LayerNorm(bias=c.bias, eps=LN_EPS, name="ln_1")(x)         # [B, T, D]
  x = x + attn(h, is_training)                                          # [B, T, D]
  h = common.LayerNorm(bias=c.bias, eps=LN_EPS, name="ln_2")(x)         # [B, T, D]
  return x + GeluMLP(c, name="mlp")(h, is_training)                     # [B, T, D]


def block_decode_fn(x: jax.Array, cache: dict, pos: jax.Array, *,
                    config: GPTConfig) -> tuple[jax.Array, dict]:
  """Cached apply of a block on positions ``pos..``: ``[B, T, D]`` and its KV cache."""
  c = config
  attn = _attention(c)
  h = common.LayerNorm(bias=c.bias, eps=LN_EPS, name="ln_1")(x)         # [B, T, D]
  a, cache = attn.decode(h, cache, pos)                                 # [B, T, D]
  x = x + a
  h = common.LayerNorm(bias=c.bias, eps=LN_EPS, name="ln_2")(x)         # [B, T, D]
  return x + GeluMLP(c, name="mlp")(h, False), cache                    # [B, T, D]


def block_cache(batch: int, max_len: int, *, config: GPTConfig) -> dict:
  """Empty KV cache of one block: ``{"k", "v": [batch, max_len, n_heads, head_dim]}``."""
  return common.empty_cache(batch, max_len, config.n_heads, config.head_dim,
                            precision.get_policy(config.dtype).compute_dtype)


def head_fn(x: jax.Array, is_training: bool, *, config: GPTConfig,
            chunked: bool | None = None) -> Any:
  """Final LayerNorm and output projection: ``[B, T, D] -> [B, T, V]`` float32 logits."""
  del is_training  # with ``loss_chunk_size``: a HeadOutput instead of logits (see the config)
  h = common.LayerNorm(bias=config.bias, eps=LN_EPS, name="ln_f")(x)    # [B, T, D]
  return common.LMHead(config.vocab_size, stddev=INIT_STDDEV, name="lm_head")(
      h, chunked=config.loss_chunk_size is not None if chunked is None else chunked)  # [B, T, V]


def head_decode_fn(x: jax.Array, cache: dict, pos: jax.Array, *,
                   config: GPTConfig) -> tuple[jax.Array, dict]:
  """Cached apply of the (position-wise) head: ``[B, T, D] -> [B, T, V]``, no cache."""
  del pos
  return head_fn(x, False, config=config, chunked=False), cache


def no_cache(batch: int, max_len: int) -> dict:
  """The cache of a layer that keeps nothing between positions."""
  del batch, max_len
  return {}


def make_layers(config: GPTConfig) -> tuple[list[model_lib.Layer], tuple[model_lib.Tie, ...]]:
  """The float32 cached layers ``embed, block_0.., head`` and the embedding tie (if enabled)."""
  p = functools.partial
  layers: list[model_lib.Layer] = [cached.CachedLayer.from_fns(
      "embed", p(embed_fn, config=config), p(embed_decode_fn, config=config), no_cache)]
  layers += [cached.CachedLayer.from_fns(f"block_{i}", p(block_fn, config=config),
                                         p(block_decode_fn, config=config),
                                         p(block_cache, config=config))
             for i in range(config.n_layers)]
  layers.append(cached.CachedLayer.from_fns("head", p(head_fn, config=config),
                                            p(head_decode_fn, config=config), no_cache))
  ties: tuple[model_lib.Tie, ...] = ()
  if config.tie_embeddings:
    ties = (model_lib.Tie(source=("embed", "wte", "embeddings"),
                           target=("head", "lm_head", "w")),)
  return layers, ties


def layer_param_counts(config: GPTConfig) -> dict[str, int]:
  """Closed-form parameter count of each layer (a tied head copy included in ``head``)."""
  d, f, v, b = config.d_model, config.ff_dim, config.vocab_size, int(config.bias)
  norm = d * (1 + b)
  attn = 4 * d * d + b * 4 * d
  mlp = 2 * d * f + b * (f + d)
  counts = {"embed": v * d + config.seq_len * d}
  counts.update({f"block_{i}": 2 * norm + attn + mlp for i in range(config.n_layers)})
  counts["head"] = norm + v * d
  return counts
