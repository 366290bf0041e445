"""gpt-oss style mixture-of-experts decoder as hkpipe layers (config: :class:`MoEConfig`).

The activation between layers is the pair ``(h [B, T, D], aux [B] float32)``: ``aux`` is the running
sum of the weighted auxiliary losses (load balancing + router z-loss) of the blocks so far,
broadcast over the batch rows. Every block adds its own; the head passes it on with the logits and
the loss adds ``mean(aux)`` to the cross-entropy. Because ``aux`` travels inside the activations,
every backend carries it (and its cotangent) across pipeline stages like any activation, so the
pipelined loss and gradients equal the unpipelined model's. Cached decoding (no losses) passes
plain ``h`` between layers.

Layers (canonical parameter layout)::

  embed    {"wte": {"embeddings": [V, D]}}
  block_i  {"attn_norm": {"scale": [D]},
            "attn": {"w_q": [D, H*hd], "w_k": [D, K*hd], "w_v": [D, K*hd], "w_o": [H*hd, D],
                     "sinks": [H] (attention_sinks only)},
            "mlp_norm": {"scale": [D]},
            "moe": {"w_router": [D, E], "w_gate": [E, D, F], "w_up": [E, D, F],
                    "w_down": [E, F, D]}}
  head     {"norm": {"scale": [D]}, "lm_head": {"w": [V, D]}}
"""

from __future__ import annotations

import functools
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from hkpipe._src import model as model_lib
from hkpipe._src.models import cached
from hkpipe._src.models import common
from hkpipe._src.models import gpt
from hkpipe._src.models import llama
from hkpipe._src.models import losses
from hkpipe._src.models import moe_attention
from hkpipe._src.models import moe_layer
from hkpipe._src.models.moe_config import MoEConfig

INIT_STDDEV = 0.02


def _attention(c: MoEConfig, layer: int) -> moe_attention.SinkAttention:
  return moe_attention.SinkAttention(
      window=c.window_of(layer), sinks=c.attention_sinks, n_heads=c.n_heads,
      n_kv_heads=c.kv_heads, head_dim=c.head_dim, bias=False,
      w_init=common.normal_init(INIT_STDDEV),
      out_init=common.residual_init(c.n_layers, INIT_STDDEV), dropout=c.dropout,
      rope_theta=c.rope_theta, name="attn")


def _moe(c: MoEConfig) -> moe_layer.MoEMLP:
  return moe_layer.MoEMLP(n_experts=c.n_experts, k=c.experts_per_token, d_ff=c.ff_dim,
                          softmax=c.router_softmax, capacity_factor=c.capacity_factor,
                          w_init=common.normal_init(INIT_STDDEV),
                          out_init=common.residual_init(c.n_layers, INIT_STDDEV), name="moe")


def aux_loss(routing: moe_layer.Routing, config: MoEConfig) -> jax.Array:
  """The weighted auxiliary loss of one block: ``lb_w * load_balance + z_w * router_z``."""
  total = jnp.zeros((), jnp.float32)
  if config.load_balance_weight:
    total = total + config.load_balance_weight * moe_layer.load_balance_loss(routing)
  if config.router_z_weight:
    total = total + config.router_z_weight * moe_layer.router_z_loss(routing)
  return total


def _block(h: jax.Array, is_training: bool, c: MoEConfig, layer: int
           ) -> tuple[jax.Array, moe_layer.Routing]:
  a = common.RMSNorm(eps=c.norm_eps, name="attn_norm")(h)             # [B, T, D]
  h = h + _attention(c, layer)(a, is_training)                         # [B, T, D]
  m = common.RMSNorm(eps=c.norm_eps, name="mlp_norm")(h)               # [B, T, D]
  y, routing = _moe(c)(m)                                              # [B, T, D]
  return h + common.dropout(y, c.dropout, is_training), routing


def embed_fn(tokens: jax.Array, is_training: bool, *, config: MoEConfig
             ) -> tuple[jax.Array, jax.Array]:
  """``[B, T]`` tokens -> ``(h [B, T, D], aux [B] zeros)``."""
  h = llama.embed_fn(tokens, is_training, config=config)               # [B, T, D]
  return h, jnp.zeros(tokens.shape[:1], jnp.float32)


def embed_decode_fn(tokens: jax.Array, cache: dict, pos: jax.Array, *, config: MoEConfig
                    ) -> tuple[jax.Array, dict]:
  """Cached apply of ``embed``: ``[B, T]`` -> ``h [B, T, D]`` (no aux while decoding)."""
  del pos
  return llama.embed_fn(tokens, False, config=config), cache


def block_fn(x: tuple[jax.Array, jax.Array], is_training: bool, *, config: MoEConfig,
             layer: int) -> tuple[jax.Array, jax.Array]:
  """One MoE block: ``(h, aux) -> (h', aux + this block's weighted aux loss)``."""
  h, aux = x
  h, routing = _block(h, is_training, config, layer)
  return h, aux + aux_loss(routing, config).astype(aux.dtype)


def block_load_fn(h: jax.Array, *, config: MoEConfig, layer: int
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Evaluation apply of a block that also returns ``[E]`` expert load and the dropped fraction."""
  h, routing = _block(h, False, config, layer)
  dropped = 1.0 - jnp.mean(routing.kept.astype(jnp.float32))
  return h, moe_layer.expert_load(routing), dropped


def block_decode_fn(h: jax.Array, cache: dict, pos: jax.Array, *, config: MoEConfig,
                    layer: int) -> tuple[jax.Array, dict]:
  """Cached apply of a block on positions ``pos..`` (window and sinks over the cache)."""
  c = config
  a = common.RMSNorm(eps=c.norm_eps, name="attn_norm")(h)             # [B, T, D]
  y, cache = _attention(c, layer).decode(a, cache, pos)                # [B, T, D]
  h = h + y
  m = common.RMSNorm(eps=c.norm_eps, name="mlp_norm")(h)               # [B, T, D]
  return h + _moe(c)(m)[0], cache


def head_fn(x: tuple[jax.Array, jax.Array], is_training: bool, *, config: MoEConfig
            ) -> tuple[jax.Array, jax.Array]:
  """``(h, aux) -> (logits [B, T, V] float32, aux [B])``."""
  h, aux = x
  return llama.head_fn(h, is_training, config=config), aux


def head_decode_fn(h: jax.Array, cache: dict, pos: jax.Array, *, config: MoEConfig
                   ) -> tuple[jax.Array, dict]:
  """Cached apply of the head: ``h -> logits``."""
  del pos
  return llama.head_fn(h, False, config=config), cache


def loss(outputs: tuple[jax.Array, jax.Array], targets: jax.Array, *, z_loss: float = 0.0,
         label_smoothing: float = 0.0) -> jax.Array:
  """``cross_entropy(logits, targets) + mean(aux)``: the microbatch's token loss plus the sum of
  its blocks' weighted auxiliary losses (``aux`` holds the same value in every row)."""
  logits, aux = outputs
  ce = losses.cross_entropy(logits, targets, z_loss=z_loss, label_smoothing=label_smoothing)
  return ce + jnp.mean(aux.astype(jnp.float32))


def make_layers(config: MoEConfig) -> tuple[list[model_lib.Layer], tuple[model_lib.Tie, ...]]:
  """The float32 cached layers ``embed, block_0.., head`` (no ties)."""
  p = functools.partial
  block_cache = p(llama.block_cache, config=config)
  layers: list[model_lib.Layer] = [cached.CachedLayer.from_fns(
      "embed", p(embed_fn, config=config), p(embed_decode_fn, config=config), gpt.no_cache)]
  layers += [cached.CachedLayer.from_fns(f"block_{i}", p(block_fn, config=config, layer=i),
                                         p(block_decode_fn, config=config, layer=i), block_cache)
             for i in range(config.n_layers)]
  layers.append(cached.CachedLayer.from_fns("head", p(head_fn, config=config),
                                            p(head_decode_fn, config=config), gpt.no_cache))
  return layers, ()


def with_compute_dtype(layer: cached.CachedLayer, dtype: Any) -> cached.CachedLayer:
  """Mixed precision for an MoE layer: parameters and ``h`` in ``dtype``, ``aux`` kept float32."""
  plain = cached.cached_with_compute_dtype(layer, dtype)
  base = layer.transformed

  def init(rng, x, **kwargs):
    return base.init(rng, model_lib.cast_floating(x, jnp.float32), **kwargs)

  def apply(params, rng, x, **kwargs):
    if isinstance(x, tuple):
      x = (model_lib.cast_floating(x[0], dtype), x[1])
    return base.apply(model_lib.cast_floating(params, dtype), rng, x, **kwargs)

  return cached.CachedLayer(layer.name, hk.Transformed(init, apply), decode=plain.decode,
                            init_cache=layer.init_cache)


def expert_load_of(config: MoEConfig, names: tuple[str, ...], params: Any, x: Any
                   ) -> tuple[Any, dict[str, jax.Array]]:
  """Evaluation apply of consecutive layers ``names`` (a pipeline stage, or the whole model) that
  also returns the routing statistics of the blocks among them.

  Args:
    config: the model's :class:`MoEConfig`.
    names: layer names in model order (``embed``, ``block_i``, ``head``); ``head`` is skipped
      (the statistics do not need the logits).
    params: canonical float32 parameters holding at least these layers.
    x: ``[B, T]`` int tokens when ``names`` starts with ``embed``, else ``h [B, T, D]``.

  Returns:
    ``(h [B, T, D], {"load": [k, E], "dropped": [k]})`` for the ``k`` blocks in ``names`` (see
    :func:`expert_load`).
  """
  loads, dropped = [], []
  for name in names:
    if name == "embed":
      x = hk.transform(functools.partial(llama.embed_fn, is_training=False, config=config)
                       ).apply(params[name], None, x)                  # [B, T, D]
    elif name.startswith("block_"):
      fn = hk.transform(functools.partial(block_load_fn, config=config,
                                          layer=int(name[len("block_"):])))
      x, load, drop = fn.apply(params[name], None, x)
      loads.append(load)
      dropped.append(drop)
  return x, {"load": (jnp.stack(loads) if loads
                      else jnp.zeros((0, config.n_experts), jnp.float32)),
             "dropped": jnp.stack(dropped) if dropped else jnp.zeros((0,), jnp.float32)}


def expert_load(config: MoEConfig, params: Any, tokens: jax.Array) -> dict[str, jax.Array]:
  """Per-block routing statistics of a batch in evaluation mode.

  Args:
    config: the model's :class:`MoEConfig`.
    params: canonical float32 parameters (``{"embed": ..., "block_i": ..., ...}``).
    tokens: ``[B, T]`` int tokens.

  Returns:
    ``{"load": [n_layers, E] fraction of the token assignments each expert got (rows sum to 1),
    "dropped": [n_layers] fraction of assignments dropped by the capacity limit}``.
  """
  names = ("embed", *(f"block_{i}" for i in range(config.n_layers)))
  return expert_load_of(config, names, params, tokens)[1]


def layer_param_counts(config: MoEConfig) -> dict[str, int]:
  """Closed-form parameter count of each layer (all experts)."""
  d, f, v, e = config.d_model, config.ff_dim, config.vocab_size, config.n_experts
  kv = config.kv_heads * config.head_dim
  attn = 2 * d * d + 2 * d * kv + (config.n_heads if config.attention_sinks else 0)
  block = 2 * d + attn + d * e + 3 * e * d * f
  counts = {"embed": v * d}
  counts.update({f"block_{i}": block for i in range(config.n_layers)})
  counts["head"] = d + v * d
  return counts


def active_params_per_token(config: MoEConfig) -> int:
  """Parameters outside ``embed`` that one token's forward uses: only k of the E experts."""
  counts = layer_param_counts(config)
  inactive = 3 * (config.n_experts - config.experts_per_token) * config.d_model * config.ff_dim
  return sum(c for name, c in counts.items() if name != "embed") - config.n_layers * inactive


def load_record(stats: dict[str, Any]) -> dict[str, float]:
  """Flat metrics of :func:`expert_load`'s ``stats`` for ``metrics.jsonl``: ``moe/block_i/load_e``
  (fraction of block i's assignments routed to expert e), ``moe/block_i/dropped`` and
  ``moe/max_load`` (the largest fraction anywhere; ``1 / E`` when perfectly balanced)."""
  stats = jax.device_get(stats)
  record = {"moe/max_load": float(stats["load"].max())}
  for i, (load, dropped) in enumerate(zip(stats["load"], stats["dropped"])):
    record.update({f"moe/block_{i}/load_{e}": float(f) for e, f in enumerate(load)})
    record[f"moe/block_{i}/dropped"] = float(dropped)
  return record
