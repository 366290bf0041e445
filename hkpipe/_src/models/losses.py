"""Token-level losses for language models: the plain cross-entropy and a chunked one.

:func:`chunked_cross_entropy` never materialises the ``[B, T, V]`` logits: it scans over chunks of
tokens, computing each chunk's logits from the head's hidden state and output weight and reducing
them to a loss at once; the chunk body is rematerialised (``jax.checkpoint``), so the backward
recomputes one chunk's logits at a time instead of keeping all of them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class HeadOutput(NamedTuple):
  """What a head returns for the chunked loss instead of logits.

  Attributes:
    hidden: ``[..., D]`` final hidden states (after the final norm), in the compute dtype.
    w: ``[V, D]`` output projection, in the compute dtype; ``logits = hidden @ w.T``.
  """

  hidden: jax.Array
  w: jax.Array


def as_logits(y):
  """``y`` itself, or for a :class:`HeadOutput` its ``[..., V]`` float32 logits (as LMHead)."""
  if isinstance(y, HeadOutput):
    return jnp.einsum("...d,vd->...v", y.hidden, y.w).astype(jnp.float32)
  return y


def _check_targets(lead: tuple[int, ...], targets: jax.Array, what: str) -> None:
  if lead != targets.shape:
    raise ValueError(f"cross_entropy needs {what} [..., V] and targets [...] with matching leading "
                     f"shape; got {what} leading shape {lead} and targets {targets.shape}.")
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"cross_entropy targets must be integer class ids; got dtype {targets.dtype}."
                     " Cast them with targets.astype(jnp.int32).")


def token_losses(logits: jax.Array, targets: jax.Array, *, z_loss: float = 0.0,
                 label_smoothing: float = 0.0) -> jax.Array:
  """Per-token float32 loss ``[...]`` of logits ``[..., V]`` (see :func:`cross_entropy`)."""
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
  return loss


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
  _check_targets(logits.shape[:-1], targets, "logits")
  return jnp.mean(token_losses(logits, targets, z_loss=z_loss, label_smoothing=label_smoothing))


def chunked_cross_entropy(head: HeadOutput, targets: jax.Array, *, chunk_size: int,
                          z_loss: float = 0.0, label_smoothing: float = 0.0) -> jax.Array:
  """:func:`cross_entropy` of ``logits = head.hidden @ head.w.T``, ``chunk_size`` tokens at a time.

  The tokens (all leading axes flattened, ``N`` of them) are padded to a multiple of
  ``chunk_size`` and scanned; each step computes ``[chunk_size, V]`` logits (in the compute dtype,
  then float32, exactly as :class:`LMHead`) and their summed loss. The step is rematerialised, so
  the backward keeps only the step inputs, never all chunks' logits. Peak logits memory is
  ``chunk_size * V`` instead of ``N * V``.

  Args:
    head: the head's :class:`HeadOutput` (``hidden [..., D]``, ``w [V, D]``).
    targets: ``[...]`` integer class ids.
    chunk_size: tokens per chunk (>= 1).
    z_loss: as :func:`cross_entropy`.
    label_smoothing: as :func:`cross_entropy`.

  Returns:
    The scalar mean loss over all tokens, float32.
  """
  hidden, w = head
  _check_targets(hidden.shape[:-1], targets, "hidden")
  d = hidden.shape[-1]
  h = hidden.reshape(-1, d)                                                # [N, D]
  y = targets.reshape(-1)                                                  # [N]
  n = h.shape[0]
  chunks = -(-n // chunk_size)
  pad = chunks * chunk_size - n
  valid = jnp.arange(chunks * chunk_size) < n                              # [N_pad]
  h = jnp.pad(h, ((0, pad), (0, 0))).reshape(chunks, chunk_size, d)       # [C, S, D]
  y = jnp.pad(y, (0, pad)).reshape(chunks, chunk_size)                     # [C, S]
  valid = valid.reshape(chunks, chunk_size)                                # [C, S]

  @jax.checkpoint
  def chunk_loss(w, h_c, y_c, valid_c):
    logits = jnp.einsum("sd,vd->sv", h_c, w).astype(jnp.float32)           # [S, V]
    per_token = token_losses(logits, y_c, z_loss=z_loss, label_smoothing=label_smoothing)
    return jnp.sum(jnp.where(valid_c, per_token, 0.0))

  def step(total, xs):
    return total + chunk_loss(w, *xs), None

  total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), (h, y, valid))
  return total / n
