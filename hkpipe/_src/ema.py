"""Exponential moving average of the weights, kept in the optimizer state.

:func:`with_ema` wraps any optax transformation: its state is ``EmaState(inner, ema)`` where
``ema`` is a params-shaped tree updated after every step as
``ema = decay * ema + (1 - decay) * new_params`` (``ema`` starts as a copy of the initial params).
Living in the optimizer state, the average is sharded and pipelined with the parameters, converted
by ``to_canonical`` / ``from_canonical`` and saved in checkpoints like any optimizer state.
:func:`ema_params` finds it in a (canonical) optimizer state for evaluation.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hkpipe._src import errors


class EmaState(NamedTuple):
  """Optimizer state of :func:`with_ema`: the wrapped state and the weight average."""

  inner: Any
  ema: Any


def check_decay(decay: Any, field: str = "ema_decay") -> None:
  """Raises ``ConfigError`` unless ``decay`` is a number in ``[0, 1)``."""
  ok = isinstance(decay, (int, float)) and not isinstance(decay, bool) and 0.0 <= decay < 1.0
  if not ok:
    raise errors.ConfigError(f"{field}={decay!r} is invalid: it must be a number in [0, 1) "
                             "(e.g. 0.999, as the TRM paper uses). Set it to None to turn EMA off.")


def with_ema(inner: optax.GradientTransformation, decay: float) -> optax.GradientTransformation:
  """``inner`` plus an EMA of the parameters it produces.

  Args:
    inner: the optimizer (e.g. AdamW).
    decay: in ``[0, 1)``; 0 makes the EMA equal the latest parameters.

  Returns:
    An ``optax.GradientTransformation`` with the same updates as ``inner``; its ``update`` needs
    ``params``.
  """
  check_decay(decay)

  def init(params):
    return EmaState(inner=inner.init(params), ema=jax.tree.map(jnp.array, params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("with_ema needs params in update(updates, state, params).")
    updates, inner_state = inner.update(updates, state.inner, params)
    new_params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype),
                       state.ema, new_params)
    return updates, EmaState(inner=inner_state, ema=ema)

  return optax.GradientTransformation(init, update)


def ema_params(opt_state: Any) -> Any:
  """The ``ema`` tree of the first :class:`EmaState` in ``opt_state`` (None if there is none)."""
  if isinstance(opt_state, EmaState):
    return opt_state.ema
  if isinstance(opt_state, (tuple, list)):
    for node in opt_state:
      found = ema_params(node)
      if found is not None:
        return found
  if isinstance(opt_state, dict):
    for node in opt_state.values():
      found = ema_params(node)
      if found is not None:
        return found
  return None


def eval_state(pipe: Any, state: Any) -> Any:
  """``state`` with its parameters replaced by the EMA ones (in the pipeline's own layout), for
  ``pipe.eval_step``; ``state`` itself when its optimizer keeps no EMA. Every process calls it."""
  canonical = pipe.to_canonical(state)
  ema = ema_params(canonical["opt_state"])
  if ema is None:
    return state
  return pipe.from_canonical({**canonical, "params": ema}, state.step)
