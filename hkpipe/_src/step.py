"""The training step's math, written once: small pure functions every backend calls.

One step is: the loss and gradient of every microbatch, accumulated (:func:`accumulate`); tied
gradients summed (:func:`sum_ties`, :func:`sum_tie_leaves`); each stage's share of the squared
global norm (:func:`sq_norm_share`), summed over stages (and averaged replicas) by the backend;
clipping by that global norm (:func:`clip_by_global_norm`, an optax transformation that takes the
cross-stage squared norm as an extra argument); the optimizer update (:func:`apply_update`),
applied only when the loss and norm are finite (``step_guard``, see :func:`guarded_update`).

Backends differ only in where these run: ``single`` and ``pmap`` call them on the canonical tree,
``spmd`` on each rank's own tree inside its ``shard_map`` program, ``mpmd`` in each stage's
compiled update program (``_mpmd_programs``).

Tied weights: both copies of a tied weight hold the same summed gradient, so each copy counts
**half** in the squared norm (:data:`TIED_COPY_WEIGHT`): the global norm counts every tied weight
once, as the norm of the gradient of the model with one shared weight would.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, TypeVar

import jax
import jax.numpy as jnp
import optax

from hkpipe._src import model as model_lib
from hkpipe._src import remat as remat_lib
from hkpipe._src import step_guard

State = TypeVar("State")

# Each of the two copies of a tied weight holds the whole (summed) gradient: it counts half.
TIED_COPY_WEIGHT = 0.5


# -- gradients -------------------------------------------------------------------------------


def microbatch_loss(model: model_lib.SequentialModel, remat: bool) -> Callable:
  """``loss(params, x, y, key) -> float32 scalar``: the training loss of one microbatch
  (recomputed in the backward with ``remat``)."""

  def fn(params, x, y, key):
    return model.loss(params, x, y, rng=key, is_training=True).astype(jnp.float32)

  return remat_lib.wrap(fn, remat)


def accumulate(loss_and_grad: Callable[[Any, Any], tuple[jax.Array, Any]], params: Any,
               microbatches: Any, num_microbatches: int) -> tuple[jax.Array, Any]:
  """Mean loss and mean gradient over microbatches (a ``lax.scan``, one microbatch at a time).

  Args:
    loss_and_grad: ``(params, microbatch) -> (loss, grads)`` of one microbatch.
    params: the parameters (gradients have their structure).
    microbatches: a pytree whose leaves have a leading axis of ``num_microbatches``.
    num_microbatches: ``m``.

  Returns:
    ``(sum of losses / m, sum of gradients / m)``.
  """

  def body(carry, mb):
    loss, grads = loss_and_grad(params, mb)
    acc_loss, acc_grads = carry
    return (acc_loss + loss, jax.tree.map(jnp.add, acc_grads, grads)), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), microbatches)
  m = num_microbatches
  return loss / m, jax.tree.map(lambda g: g / m, grads)


def microbatch_grads(model: model_lib.SequentialModel, remat: bool, params: Any, inputs: Any,
                     targets: Any, key_of: Callable[[jax.Array], Any], num_microbatches: int,
                     reduce: Callable[[Any], Any] = lambda t: t) -> tuple[jax.Array, Any]:
  """Mean training loss and mean gradient (ties summed) of the whole model over microbatches.

  Args:
    model: the model.
    remat: recompute the forward in the backward.
    params: canonical parameters.
    inputs: inputs, leaves ``[m, b, ...]``.
    targets: targets, leaves ``[m, b, ...]``.
    key_of: microbatch index (traced) -> its dropout key.
    num_microbatches: ``m``.
    reduce: applied to ``(loss, grads)`` before the ties are summed (e.g. a ``pmean`` over
      data-parallel replicas).

  Returns:
    ``(loss, grads)``: the :func:`accumulate` means, reduced, with :func:`sum_ties` applied.
  """
  loss_fn = microbatch_loss(model, remat)

  def loss_and_grad(p, mb):
    i, x, y = mb
    return jax.value_and_grad(loss_fn)(p, x, y, key_of(i))

  m = num_microbatches
  loss, grads = reduce(accumulate(loss_and_grad, params, (jnp.arange(m), inputs, targets), m))
  return loss, sum_ties(grads, model.ties)


def eval_step(model: model_lib.SequentialModel, params: Any, inputs: Any,
              targets: Any) -> dict[str, jax.Array]:
  """Eval metrics ``{"loss"}``: the mean loss over microbatches (leaves ``[m, b, ...]``) without
  dropout, one microbatch at a time."""
  losses = jax.lax.map(lambda xy: model.loss(params, xy[0], xy[1]).astype(jnp.float32),
                       (inputs, targets))
  return {"loss": jnp.mean(losses)}


def sum_ties(grads: Any, ties: Sequence[model_lib.Tie]) -> dict:
  """Canonical gradients with both sides of every tie replaced by their sum."""
  return model_lib.tie_grads(grads, ties)


def sum_tie_leaves(g: Sequence[Any], same_stage: Sequence[tuple[int, int]],
                   incoming: Sequence[int], partner: Sequence[Any]) -> list:
  """One stage's flat gradient leaves with tied pairs summed (``a + b`` on both sides, so both
  copies stay bit-identical).

  Args:
    g: the stage's gradient leaves.
    same_stage: leaf pairs tied within the stage.
    incoming: per partner leaf (the tied gradient of another stage, moved here), the leaf it is
      added to.
    partner: those partner leaves.
  """
  g = list(g)
  for i, j in same_stage:
    g[i], g[j] = g[i] + g[j], g[j] + g[i]
  for k, i in enumerate(incoming):
    g[i] = g[i] + partner[k]
  return g


# -- the global norm -------------------------------------------------------------------------


def sq_norm(tree: Any) -> jax.Array:
  """Sum of squares of every leaf, in float32."""
  return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)),
             jnp.zeros((), jnp.float32))


def sq_norm_share(grads: Any, tied_copies: Any = ()) -> jax.Array:
  """A part's share of the squared global norm, counting each tied weight once.

  Args:
    grads: the part's gradients (a stage, a rank, or the whole canonical tree), ties summed.
    tied_copies: the copies of tied weights among ``grads`` (after :func:`sum_ties`, each copy
      holds the whole tied gradient): each counts :data:`TIED_COPY_WEIGHT` instead of 1, so a
      tie's two copies, wherever they live, add up to the tied weight counted once.

  Returns:
    ``sq_norm(grads) - (1 - TIED_COPY_WEIGHT) * sq_norm(tied_copies)`` (float32).
  """
  return sq_norm(grads) - (1.0 - TIED_COPY_WEIGHT) * sq_norm(tied_copies)


def tied_copies(grads: Any, ties: Sequence[model_lib.Tie]) -> list:
  """Both copies of every tied weight in a canonical gradient tree (for :func:`sq_norm_share`)."""
  return [grads[layer][module][name] for tie in ties
          for layer, module, name in (tie.source, tie.target)]


def clip_scale(global_norm: jax.Array, max_norm: float | None) -> jax.Array:
  """The factor that scales gradients with ``global_norm`` down to at most ``max_norm``."""
  if max_norm is None:
    return jnp.ones((), jnp.float32)
  return jnp.minimum(1.0, max_norm / jnp.maximum(global_norm, 1e-12))


def clip_by_global_norm(max_norm: float | None) -> optax.GradientTransformationExtraArgs:
  """Clips updates by a global norm measured elsewhere (over every stage of a pipeline).

  Unlike ``optax.clip_by_global_norm``, which measures the norm of the updates it sees (one
  stage's), the squared global norm comes in as the extra argument ``global_sq_norm``::

    grads, _ = clip_by_global_norm(1.0).update(grads, state, global_sq_norm=sq)

  Args:
    max_norm: the largest global norm; None: the identity.

  Returns:
    A stateless ``optax.GradientTransformationExtraArgs``.
  """

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None, *, global_sq_norm=None, **extra):
    del params, extra
    if max_norm is None:
      return updates, state
    if global_sq_norm is None:
      raise ValueError("clip_by_global_norm needs global_sq_norm= (the squared gradient norm "
                       "over every stage).")
    scale = clip_scale(jnp.sqrt(global_sq_norm), max_norm)
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformationExtraArgs(init, update)


# -- the update ------------------------------------------------------------------------------


def apply_update(optimizer: optax.GradientTransformation, max_norm: float | None, grads: Any,
                 params: Any, opt_state: Any, global_sq_norm: jax.Array | None) -> tuple[Any, Any]:
  """Clips ``grads`` by the global norm, then takes one optimizer step.

  Returns:
    ``(new params, new optimizer state)``.
  """
  grads, _ = clip_by_global_norm(max_norm).update(grads, optax.EmptyState(),
                                                  global_sq_norm=global_sq_norm)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def guarded_update(skip_nonfinite: bool, loss: jax.Array, global_sq_norm: jax.Array,
                   update: Callable[[State], State], state: State) -> tuple[State, dict]:
  """``update(state)`` unless the step is non-finite (see ``step_guard``), and the metrics.

  Args:
    skip_nonfinite: ``PipelineOptions.skip_nonfinite``.
    loss: the step's global loss.
    global_sq_norm: the squared global gradient norm (before clipping).
    update: ``state -> state`` (e.g. :func:`apply_update` on ``(params, opt_state)``).
    state: the state before the step.

  Returns:
    ``(new state, {"loss", "grad_norm", "skipped"})``.
  """
  norm = jnp.sqrt(global_sq_norm)
  state, skipped = step_guard.guard(skip_nonfinite, loss, norm, update, state)
  return state, {"loss": loss, "grad_norm": norm, "skipped": skipped}


def train_update(optimizer: optax.GradientTransformation, max_norm: float | None,
                 skip_nonfinite: bool, params: Any, opt_state: Any, loss: jax.Array,
                 grads: Any, global_sq_norm: jax.Array) -> tuple[Any, Any, dict]:
  """The end of a step on one tree of parameters: clip, guard, update.

  Returns:
    ``(params, opt_state, metrics)``.
  """
  step = lambda s: apply_update(optimizer, max_norm, grads, s[0], s[1], global_sq_norm)
  (params, opt_state), metrics = guarded_update(skip_nonfinite, loss, global_sq_norm, step,
                                                (params, opt_state))
  return params, opt_state, metrics


def canonical_train_update(optimizer: optax.GradientTransformation, options: Any,
                           ties: Sequence[model_lib.Tie], params: Any, opt_state: Any,
                           loss: jax.Array, grads: Any) -> tuple[Any, Any, dict]:
  """:func:`train_update` on the whole canonical tree (``single``, ``pmap``), the global norm
  measured on ``grads`` (ties summed) with each tied weight counted once.

  Args:
    options: the ``PipelineOptions`` (``max_grad_norm``, ``skip_nonfinite``).
  """
  sq = sq_norm_share(grads, tied_copies(grads, ties))
  return train_update(optimizer, options.max_grad_norm, options.skip_nonfinite, params,
                      opt_state, loss, grads, sq)


def global_metrics(num_microbatches: int, skip_nonfinite: bool, loss_sum: jax.Array,
                   sq_shares: Sequence[jax.Array]) -> tuple:
  """For backends whose stages update in separate programs (``mpmd``): the step's metrics and
  the one scalar every stage's update receives.

  Args:
    num_microbatches: ``m``.
    skip_nonfinite: ``PipelineOptions.skip_nonfinite``.
    loss_sum: the sum of microbatch losses.
    sq_shares: every stage's :func:`sq_norm_share`.

  Returns:
    ``(loss, grad_norm, global_sq_norm, skipped)``; ``global_sq_norm`` is NaN when the step must
    be skipped (``step_guard.flag_scale``): pass it to :func:`stage_update`.
  """
  sq = sum(sq_shares[1:], sq_shares[0])
  norm = jnp.sqrt(sq)
  loss = loss_sum / num_microbatches
  flagged, skipped = step_guard.flag_scale(skip_nonfinite, sq, loss, norm)
  return loss, norm, flagged, skipped


def stage_update(optimizer: optax.GradientTransformation, max_norm: float | None,
                 skip_nonfinite: bool, params: Any, opt_state: Any, grads: Any,
                 global_sq_norm: jax.Array | None) -> tuple[Any, Any]:
  """One stage's update, given the (flagged) squared global norm from :func:`global_metrics`:
  clipped by it, and skipped (parameters and state returned as they are) when it is NaN."""
  step = lambda s: apply_update(optimizer, max_norm, grads, s[0], s[1], global_sq_norm)
  if not skip_nonfinite:
    return step((params, opt_state))
  if global_sq_norm is None:
    raise ValueError("stage_update with skip_nonfinite=True needs the flagged global_sq_norm "
                     "from global_metrics.")
  return step_guard.apply_if(step_guard.scale_ok(global_sq_norm), step, (params, opt_state))
