"""The non-finite step guard: a step whose loss or gradient norm is NaN/Inf changes nothing.

Every backend computes the step's loss and its global gradient norm (over all stages, data-parallel
replicas and processes), and, inside the same compiled program as the optimizer update (so donated
buffers are still the old values there), applies the update only when both are finite
(:func:`guard`, one ``lax.cond``). The decision is global, so every stage, replica and process
skips together. ``TrainState.step`` still advances (the batch was consumed, so a resumed run sees
the same batches) and the metrics carry ``skipped`` (1.0 or 0.0).

MPMD updates each stage in its own program: the last rank, which holds the loss and the global
norm, folds the decision into the one scalar it sends to every stage, the squared global norm
each stage clips by (NaN: skip; see :func:`flag_scale`, :func:`scale_ok` and
``hkpipe._src.step.global_metrics``), with or without clipping.

On the host, :class:`SkipCounter` counts skipped steps from the metrics flags without waiting on
the step in flight, and ends a run after too many skips in a row (:class:`NonFiniteStepsError`).
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp

State = TypeVar("State")
DEFAULT_MAX_CONSECUTIVE_SKIPS = 5


def is_finite_step(loss: jax.Array, grad_norm: jax.Array) -> jax.Array:
  """Whether a step may be applied: its loss and global gradient norm are both finite."""
  return jnp.isfinite(loss) & jnp.isfinite(grad_norm)


def skipped_flag(ok: jax.Array) -> jax.Array:
  """The ``skipped`` metric: 1.0 when the step was skipped, 0.0 otherwise (float32)."""
  return jnp.where(ok, 0.0, 1.0).astype(jnp.float32)


def apply_if(ok: jax.Array, update: Callable[[State], State], state: State) -> State:
  """``update(state)`` if ``ok``, else ``state`` itself, bit for bit.

  One ``lax.cond`` in the program that owns ``state``: the skip branch hands its operands back,
  so donated buffers are updated in place as without the guard. (A per-leaf
  ``jnp.where(ok, new, old)`` after the update would keep the old values alive next to the new
  ones: XLA then copies every donated leaf, about one more pass over the optimizer state.)
  """
  return jax.lax.cond(ok, update, lambda s: s, state)


def guard(enabled: bool, loss: jax.Array, grad_norm: jax.Array, update: Callable[[State], State],
          state: State) -> tuple[State, jax.Array]:
  """The state a step leaves behind, and its ``skipped`` metric.

  Args:
    enabled: ``PipelineOptions.skip_nonfinite``; False: the update is always applied.
    loss: the step's (global) loss.
    grad_norm: the step's global gradient norm (before clipping).
    update: ``update(state) -> new state`` (e.g. the optimizer step on ``(params, opt_state)``).
    state: the state before the step.

  Returns:
    ``(update(state) or state, skipped)``.
  """
  if not enabled:
    return update(state), jnp.zeros((), jnp.float32)
  ok = is_finite_step(loss, grad_norm)
  return apply_if(ok, update, state), skipped_flag(ok)


def flag_scale(enabled: bool, scale: jax.Array, loss: jax.Array,
               grad_norm: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A scalar (e.g. the squared global norm) that carries the skip decision (NaN: skip), and the
  ``skipped`` metric.

  For backends whose stages update in separate programs: the stage that knows the loss and the
  global norm sends this one scalar to every stage, which passes :func:`scale_ok` of it to
  :func:`apply_if`.
  """
  if not enabled:
    return scale, jnp.zeros((), jnp.float32)
  ok = is_finite_step(loss, grad_norm)
  return jnp.where(ok, scale, jnp.nan).astype(jnp.float32), skipped_flag(ok)


def scale_ok(scale: jax.Array) -> jax.Array:
  """Whether a factor from :func:`flag_scale` says "apply the step"."""
  return jnp.isfinite(scale)


class NonFiniteStepsError(FloatingPointError):
  """Too many consecutive training steps had a non-finite loss or gradient norm.

  Raised by ``hkpipe.train.train`` after ``config.max_consecutive_skips`` skipped steps in a row;
  no checkpoint of the state after them is written.
  """


class SkipCounter:
  """Counts skipped steps from the metrics' ``skipped`` flags, reading them late.

  ``push`` queues a step's flag (a device scalar, possibly not computed yet); ``settle`` reads
  queued flags in step order. Reading all but the newest right after dispatching a step only waits
  for steps that are already done, so the loop never stalls the device for this.

  Args:
    max_consecutive: skipped steps in a row that end the run (an int >= 1:
      ``config.max_consecutive_skips``, checked by ``config_checks.validate``).
    checkpoints: where the run's checkpoints are (named in the error message).
  """

  def __init__(self, max_consecutive: int, checkpoints: str = ""):
    self.max_consecutive = max_consecutive
    self.checkpoints = checkpoints
    self.total = 0          # skipped steps read so far
    self.consecutive = 0    # skipped steps in a row, up to the last one read
    self._first = 0         # the first step of the current run of skips
    self._pending: list[tuple[int, Any]] = []

  def push(self, step: int, flag: Any) -> None:
    """Queues the ``skipped`` flag of step ``step`` (the step number after it, 1-based)."""
    self._pending.append((step, flag))

  def settle(self, keep_newest: bool = False) -> NonFiniteStepsError | None:
    """Reads the queued flags (all, or all but the newest) and updates the counts.

    Returns:
      The error to stop the run with, once ``max_consecutive`` steps in a row were skipped (it is
      returned, not raised, so the caller can leave its loop before raising: nothing after the
      skipped steps must be checkpointed), else None.
    """
    n = len(self._pending) - (1 if keep_newest and self._pending else 0)
    ready, self._pending = self._pending[:n], self._pending[n:]
    for step, flag in ready:
      if float(flag) > 0.0:
        self.total += 1
        self.consecutive += 1
        if self.consecutive == 1:
          self._first = step
        if self.consecutive >= self.max_consecutive:
          self._pending = []
          return NonFiniteStepsError(self._message(step))
      else:
        self.consecutive = 0
    return None

  def _message(self, step: int) -> str:
    where = f" in {self.checkpoints}" if self.checkpoints else ""
    return (f"Training stopped at step {step}: {self.consecutive} steps in a row (steps "
            f"{self._first}..{step}) had a non-finite loss or gradient norm (NaN or Inf) and "
            f"were skipped, so parameters and optimizer state are still those after step "
            f"{self._first - 1} ({self.total} skipped steps in this run; the limit is "
            f"config.max_consecutive_skips={self.max_consecutive}). Try a lower learning rate "
            f"(config.optim.learning_rate) or gradient clipping (config.optim.max_grad_norm), "
            f"check the training data around these steps, or resume from the last "
            f"checkpoint{where} (its parameters are those of step {self._first - 1} or earlier) "
            f"with such a change.")
