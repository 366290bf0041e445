"""Token-level losses for language models."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array, *, z_loss: float = 0.0,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Mean token cross-entropy in float32, with optional z-loss and label smoothing.

  Per token, with ``lse = logsumexp(logits)`` and ``log p = logits - lse``::

    loss = (1 - label_smoothing) * (-log p[target])
           + label_smoothing * mean_v(-log p[v])      # smoothing towards the uniform distribution
           + z_loss * lse ** 2                        # keeps the softmax normaliser near 1

  Args:
    logits: ``[..., V]`` unnormalised scores (any float dtype; cast to float32).
    targets: ``[...]`` integer class ids in ``[0, V)``.
    z_loss: weight of the ``lse ** 2`` penalty (PaLM uses 1e-4); 0 disables it.
    label_smoothing: mass in ``[0, 1)`` moved from the target to the uniform distribution.

  Returns:
    The scalar mean loss over all tokens, float32.

  Raises:
    ValueError: if shapes disagree or ``targets`` are not integers (checked at trace time).
  """
  if logits.shape[:-1] != targets.shape:
    raise ValueError(f"cross_entropy needs logits [..., V] and targets [...] with matching leading "
                     f"shape; got logits {logits.shape} and targets {targets.shape}.")
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"cross_entropy targets must be integer class ids; got dtype {targets.dtype}."
                     " Cast them with targets.astype(jnp.int32).")
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)                                  # [...]
  log_probs = logits - lse[..., None]                                      # [..., V]
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # [...]
  loss = nll
  if label_smoothing:
    uniform = -jnp.mean(log_probs, axis=-1)                                # [...]
    loss = (1.0 - label_smoothing) * nll + label_smoothing * uniform
  if z_loss:
    loss = loss + z_loss * jnp.square(lse)
  return jnp.mean(loss)
