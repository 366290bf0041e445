"""Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases, untied head.

Layers (canonical parameter layout)::

  embed    {"wte": {"embeddings": [V, D]}}
  block_i  {"attn_norm": {"scale": [D]},
            "attn": {"w_q": [D, H*hd], "w_k": [D, K*hd], "w_v": [D, K*hd], "w_o": [H*hd, D]},
            "mlp_norm": {"scale": [D]},
            "mlp": {"w_gate": [D, F], "w_up": [D, F], "w_down": [F, D]}}
  head     {"norm": {"scale": [D]}, "lm_head": {"w": [V, D]}}
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import chex
import haiku as hk
import jax

from hkpipe._src import model as model_lib
from hkpipe._src import precision
from hkpipe._src.models import cached
from hkpipe._src.models import common
from hkpipe._src.models import gpt

if TYPE_CHECKING:  # the MoE model reuses the embed, head and KV cache below
  from hkpipe._src.models.moe_config import MoEConfig

INIT_STDDEV = 0.02


@chex.dataclass(frozen=True, mappable_dataclass=False)
class LlamaConfig(common.LlamaDims):
  """Llama-style configuration. Validated on construction; frozen and hashable.

  Attributes:
    vocab_size: number of token ids.
    seq_len: maximum context length (RoPE itself has no table; inputs longer than this are
      rejected).
    d_model: width of the residual stream; divisible by ``n_heads``, and ``d_model // n_heads``
      even (RoPE rotates pairs).
    n_layers: number of transformer blocks.
    n_heads: query heads per block.
    n_kv_heads: key/value heads (grouped-query attention); must divide ``n_heads``. None means
      ``n_heads`` (plain multi-head attention; see :attr:`kv_heads`).
    d_ff: SwiGLU hidden width; None means ``8 * d_model / 3`` rounded up to a multiple of 8
      (see :attr:`ff_dim`).
    rope_theta: RoPE base, > 0.
    norm_eps: RMSNorm epsilon, > 0.
    dropout: dropout rate in ``[0, 1)`` on attention probabilities and residual branches (training
      only; Llama itself uses 0).
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
  n_kv_heads: int | None = None
  d_ff: int | None = None
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  dropout: float = 0.0
  dtype: str = "float32"
  z_loss: float = 0.0
  label_smoothing: float = 0.0
  attention_impl: str = "xla"
  loss_chunk_size: int | None = None

  def __post_init__(self):
    common.check_common(self)
    self.check_llama_fields()


class SwiGLU(hk.Module):
  """``w_down(silu(w_gate x) * w_up x)``, no biases, dropout on the output."""

  def __init__(self, config: LlamaConfig, name: str | None = None):
    super().__init__(name=name)
    self.config = config

  def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:     # x [B, T, D]
    c = self.config
    init = common.normal_init(INIT_STDDEV)
    gate = common.dense(x, c.ff_dim, w_name="w_gate", b_name=None, w_init=init)  # [B, T, F]
    up = common.dense(x, c.ff_dim, w_name="w_up", b_name=None, w_init=init)      # [B, T, F]
    y = common.dense(jax.nn.silu(gate) * up, c.d_model, w_name="w_down", b_name=None,
                     w_init=common.residual_init(c.n_layers, INIT_STDDEV))       # [B, T, D]
    return common.dropout(y, c.dropout, is_training)


def embed_fn(tokens: jax.Array, is_training: bool, *,
             config: LlamaConfig | MoEConfig) -> jax.Array:
  """Token embedding (no positions: RoPE adds them in attention): ``[B, T]`` -> ``[B, T, D]``."""
  common.check_tokens(tokens, config.seq_len)
  x = common.TokenEmbedding(config.vocab_size, config.d_model, stddev=INIT_STDDEV,
                            name="wte")(tokens)                         # [B, T, D]
  return common.dropout(x, config.dropout, is_training)


def embed_decode_fn(tokens: jax.Array, cache: dict, pos: jax.Array, *,
                    config: LlamaConfig) -> tuple[jax.Array, dict]:
  """Cached apply of ``embed`` (position-free): ``[B, T]`` -> ``[B, T, D]``, no cache."""
  del pos
  return embed_fn(tokens, False, config=config), cache


def _attention(c: LlamaConfig) -> common.Attention:
  return common.Attention(n_heads=c.n_heads, n_kv_heads=c.kv_heads, head_dim=c.head_dim,
                          bias=False, w_init=common.normal_init(INIT_STDDEV),
                          out_init=common.residual_init(c.n_layers, INIT_STDDEV),
                          dropout=c.dropout, rope_theta=c.rope_theta, impl=c.attention_impl,
                          name="attn")


def block_fn(x: jax.Array, is_training: bool, *, config: LlamaConfig) -> jax.Array:
  """One pre-RMSNorm block with RoPE GQA attention and SwiGLU: ``[B, T, D] -> [B, T, D]``."""
  c = config
  attn = _attention(c)
  h = common.RMSNorm(eps=c.norm_eps, name="attn_norm")(x)               # [B, T, D]
  x = x + attn(h, is_training)                                          # [B, T, D]
  h = common.RMSNorm(eps=c.norm_eps, name="mlp_norm")(x)                # [B, T, D]
  return x + SwiGLU(c, name="mlp")(h, is_training)                      # [B, T, D]


def block_decode_fn(x: jax.Array, cache: dict, pos: jax.Array, *,
                    config: LlamaConfig) -> tuple[jax.Array, dict]:
  """Cached apply of a block on positions ``pos..`` (RoPE at those positions)."""
  c = config
  attn = _attention(c)
  h = common.RMSNorm(eps=c.norm_eps, name="attn_norm")(x)               # [B, T, D]
  a, cache = attn.decode(h, cache, pos)                                 # [B, T, D]
  x = x + a
  h = common.RMSNorm(eps=c.norm_eps, name="mlp_norm")(x)                # [B, T, D]
  return x + SwiGLU(c, name="mlp")(h, False), cache                     # [B, T, D]


def block_cache(batch: int, max_len: int, *, config: LlamaConfig | MoEConfig) -> dict:
  """Empty KV cache of one block: ``{"k", "v": [batch, max_len, kv_heads, head_dim]}`` (GQA)."""
  return common.empty_cache(batch, max_len, config.kv_heads, config.head_dim,
                            precision.get_policy(config.dtype).compute_dtype)


def head_fn(x: jax.Array, is_training: bool, *, config: LlamaConfig | MoEConfig,
            chunked: bool | None = None) -> Any:
  """Final RMSNorm and untied output projection: ``[B, T, D] -> [B, T, V]`` float32 logits."""
  del is_training  # with ``loss_chunk_size``: a HeadOutput instead of logits (see the config)
  h = common.RMSNorm(eps=config.norm_eps, name="norm")(x)               # [B, T, D]
  return common.LMHead(config.vocab_size, stddev=INIT_STDDEV, name="lm_head")(
      h, chunked=config.loss_chunk_size is not None if chunked is None else chunked)  # [B, T, V]


def head_decode_fn(x: jax.Array, cache: dict, pos: jax.Array, *,
                   config: LlamaConfig) -> tuple[jax.Array, dict]:
  """Cached apply of the (position-wise) head: ``[B, T, D] -> [B, T, V]``, no cache."""
  del pos
  return head_fn(x, False, config=config, chunked=False), cache


def make_layers(config: LlamaConfig) -> tuple[list[model_lib.Layer], tuple[model_lib.Tie, ...]]:
  """The float32 cached layers ``embed, block_0.., head`` (no ties)."""
  p = functools.partial
  layers: list[model_lib.Layer] = [cached.CachedLayer.from_fns(
      "embed", p(embed_fn, config=config), p(embed_decode_fn, config=config), gpt.no_cache)]
  layers += [cached.CachedLayer.from_fns(f"block_{i}", p(block_fn, config=config),
                                         p(block_decode_fn, config=config),
                                         p(block_cache, config=config))
             for i in range(config.n_layers)]
  layers.append(cached.CachedLayer.from_fns("head", p(head_fn, config=config),
                                            p(head_decode_fn, config=config), gpt.no_cache))
  return layers, ()


def layer_param_counts(config: LlamaConfig) -> dict[str, int]:
  """Closed-form parameter count of each layer."""
  d, f, v = config.d_model, config.ff_dim, config.vocab_size
  kv = config.kv_heads * config.head_dim
  attn = 2 * d * d + 2 * d * kv
  block = 2 * d + attn + 3 * d * f
  counts = {"embed": v * d}
  counts.update({f"block_{i}": block for i in range(config.n_layers)})
  counts["head"] = d + v * d
  return counts
