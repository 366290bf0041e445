"""The mixture-of-experts MLP: a top-k router and SwiGLU experts computed per expert group.

Tokens are never run through every expert. The ``N * k`` (token, expert) assignments are sorted by
expert, the token rows gathered in that order, and each expert's SwiGLU applied to its contiguous
group with ``jax.lax.ragged_dot`` (a grouped matmul); the outputs are weighted and scatter-added
back to their tokens. Everything is dropless unless a capacity factor is set.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

from hkpipe._src.models import common


class Routing(NamedTuple):
  """The router's decisions for ``N`` tokens.

  Attributes:
    logits: ``[N, E]`` float32 router logits.
    experts: ``[N, k]`` int32 selected experts, best first.
    weights: ``[N, k]`` float32 combine weights (0 for a dropped assignment).
    kept: ``[N, k]`` bool, False for assignments dropped by the capacity limit.
  """

  logits: jax.Array
  experts: jax.Array
  weights: jax.Array
  kept: jax.Array


def route(logits: jax.Array, k: int, softmax: str, capacity: int | None) -> Routing:
  """Top-``k`` routing of ``[N, E]`` float32 logits (see :class:`MoEConfig` ``router_softmax``)."""
  top_logits, experts = jax.lax.top_k(logits, k)                       # [N, k] each
  if softmax == "topk":
    weights = jax.nn.softmax(top_logits, axis=-1)                      # [N, k]
  else:
    weights = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), experts, axis=-1)  # [N, k]
  kept = jnp.ones(experts.shape, bool)
  if capacity is not None:
    kept = slot_in_expert(experts) < capacity                          # [N, k]
  return Routing(logits, experts, jnp.where(kept, weights, 0.0), kept)


def slot_in_expert(experts: jax.Array) -> jax.Array:
  """``[N, k]`` -> each assignment's rank among its expert's assignments in token-major order."""
  flat = experts.reshape(-1)                                           # [N*k]
  order = jnp.argsort(flat, stable=True)                               # [N*k]
  sorted_ids = flat[order]
  starts = jnp.searchsorted(sorted_ids, sorted_ids, side="left")       # [N*k] group start
  rank_sorted = jnp.arange(flat.shape[0]) - starts
  rank = jnp.zeros_like(flat).at[order].set(rank_sorted)
  return rank.reshape(experts.shape)


def capacity_of(tokens: int, k: int, n_experts: int, factor: float | None) -> int | None:
  """Assignments one expert may take: ``ceil(factor * tokens * k / E)``, or None (dropless)."""
  if factor is None:
    return None
  return max(1, math.ceil(factor * tokens * k / n_experts))


def grouped_swiglu(x: jax.Array, routing: Routing, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array) -> jax.Array:
  """Each token through its selected experts, grouped per expert: ``[N, D] -> [N, D]``.

  Args:
    x: ``[N, D]`` tokens.
    routing: the router's :class:`Routing`.
    w_gate, w_up: ``[E, D, F]`` expert input projections.
    w_down: ``[E, F, D]`` expert output projections.

  Returns:
    ``sum_j weights[n, j] * expert_{experts[n, j]}(x[n])`` for every token ``n``.
  """
  n, k = routing.experts.shape
  flat = routing.experts.reshape(-1)                                   # [N*k]
  order = jnp.argsort(flat, stable=True)                               # [N*k] sorted by expert
  token = order // k                                                   # [N*k] source token
  sizes = jnp.bincount(flat, length=w_gate.shape[0]).astype(jnp.int32)  # [E]
  xs = x[token]                                                        # [N*k, D]
  gate = jax.lax.ragged_dot(xs, w_gate.astype(x.dtype), sizes)         # [N*k, F]
  up = jax.lax.ragged_dot(xs, w_up.astype(x.dtype), sizes)             # [N*k, F]
  ys = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down.astype(x.dtype), sizes)  # [N*k, D]
  ys = ys * routing.weights.reshape(-1)[order][:, None].astype(ys.dtype)
  return jnp.zeros((n, x.shape[-1]), ys.dtype).at[token].add(ys)       # [N, D]


def load_balance_loss(routing: Routing) -> jax.Array:
  """Switch load-balancing loss ``E * sum_e f_e * P_e`` (1 when perfectly balanced).

  ``f_e`` is the fraction of the ``N * k`` assignments that chose expert ``e`` (before capacity
  drops) and ``P_e`` the mean over tokens of the softmax over all E logits.
  """
  e = routing.logits.shape[-1]
  f = expert_load(routing)                                             # [E]
  p = jnp.mean(jax.nn.softmax(routing.logits, axis=-1), axis=0)        # [E]
  return e * jnp.sum(f * p)


def router_z_loss(routing: Routing) -> jax.Array:
  """Router z-loss ``mean_n logsumexp(logits[n]) ** 2`` (ST-MoE)."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(routing.logits, axis=-1)))


def expert_load(routing: Routing) -> jax.Array:
  """``[E]`` fraction of the assignments routed to each expert (sums to 1)."""
  e = routing.logits.shape[-1]
  onehot = jax.nn.one_hot(routing.experts, e, dtype=jnp.float32)       # [N, k, E]
  return jnp.mean(jnp.sum(onehot, axis=1), axis=0) / routing.experts.shape[-1]


class MoEMLP(hk.Module):
  """Router (``w_router [D, E]``) and SwiGLU experts (``w_gate``, ``w_up [E, D, F]``,
  ``w_down [E, F, D]``), no biases. Returns the output and the routing of the tokens."""

  def __init__(self, *, n_experts: int, k: int, d_ff: int, softmax: str,
               capacity_factor: float | None, w_init: hk.initializers.Initializer,
               out_init: hk.initializers.Initializer, name: str | None = None):
    super().__init__(name=name)
    self.n_experts = n_experts
    self.k = k
    self.d_ff = d_ff
    self.softmax = softmax
    self.capacity_factor = capacity_factor
    self.w_init = w_init
    self.out_init = out_init

  def __call__(self, x: jax.Array) -> tuple[jax.Array, Routing]:       # x [B, T, D]
    b, t, d = x.shape
    e, f = self.n_experts, self.d_ff
    w_router = common.param("w_router", (d, e), self.w_init)          # [D, E]
    w_gate = common.param("w_gate", (e, d, f), self.w_init)            # [E, D, F]
    w_up = common.param("w_up", (e, d, f), self.w_init)                # [E, D, F]
    w_down = common.param("w_down", (e, f, d), self.out_init)          # [E, F, D]
    tokens = x.reshape(b * t, d)                                       # [N, D]
    logits = jnp.einsum("nd,de->ne", tokens.astype(jnp.float32),
                        w_router.astype(jnp.float32))                  # [N, E] f32
    capacity = capacity_of(b * t, self.k, e, self.capacity_factor)
    routing = route(logits, self.k, self.softmax, capacity)
    y = grouped_swiglu(tokens, routing, w_gate, w_up, w_down)          # [N, D]
    return y.reshape(b, t, d).astype(x.dtype), routing
