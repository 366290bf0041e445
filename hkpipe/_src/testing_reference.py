"""``hkpipe.testing``'s equivalence check: a ``Pipeline`` against the unpipelined reference.

The reference is the ``"single"`` backend built from the pipeline's own model (the same layers,
applied in order on one device) and optimizer, with the options that change the step's math
(``num_microbatches``, ``max_grad_norm``, ``skip_nonfinite``) copied over and none that only
place the work (backend, mesh, devices, schedule, layout, sharding rules, remat). The single
backend is itself checked against plain ``jax.grad`` + optax in hkpipe's own tests
(``tests/test_pipeline.py``, ``tests/test_moe.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax

from hkpipe._src import errors
from hkpipe._src import pipeline as pipeline_lib
from hkpipe._src import testing_compare as compare

# The options that change what a step computes; every other option only places the work.
SEMANTIC_OPTIONS = ("num_microbatches", "max_grad_norm", "skip_nonfinite")
# The metrics compared after each step (when both runs report them).
STEP_METRICS = ("loss", "grad_norm")


@dataclasses.dataclass(frozen=True)
class ReferenceRun:
  """What the unpipelined reference computed, as host (numpy) trees; cache it to compare many
  pipelines against one reference.

  Attributes:
    options: the reference's values of :data:`SEMANTIC_OPTIONS`.
    init_params: canonical ``{layer: params}`` after ``init``.
    loss: the loss of the first batch at the initial parameters.
    grads: its canonical gradients (ties summed, unclipped).
    step_metrics: per optimizer step, the metrics of :data:`STEP_METRICS` it reported.
    step_params: per optimizer step, the canonical parameters after it.
  """

  options: dict
  init_params: Any
  loss: Any
  grads: Any
  step_metrics: tuple[dict, ...]
  step_params: tuple[Any, ...]

  @property
  def steps(self) -> int:
    """The number of optimizer steps recorded."""
    return len(self.step_params)


def _check_pipeline(pipeline: Any) -> None:
  if not isinstance(pipeline, pipeline_lib.Pipeline):
    raise TypeError(f"Expected a hkpipe.Pipeline, got {type(pipeline).__name__}; build one with "
                    "hkpipe.Pipeline(model, optimizer, backend=..., **options).")


def _step_batches(batch: Any, steps: int, step_batches: Sequence[Any] | None) -> list:
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
    raise errors.ConfigError(f"steps must be an int >= 0, got {steps!r}.")
  if step_batches is None:
    return [batch] * steps
  if len(step_batches) != steps:
    raise errors.ConfigError(f"step_batches has {len(step_batches)} batches but steps={steps}; "
                             "give one batch per step (or leave step_batches out to reuse batch).")
  return list(step_batches)


def semantic_options(pipeline: pipeline_lib.Pipeline) -> dict:
  """The pipeline's values of the options that change the step's math
  (:data:`SEMANTIC_OPTIONS`)."""
  return {name: getattr(pipeline.options, name) for name in SEMANTIC_OPTIONS}


def reference_pipeline(pipeline: pipeline_lib.Pipeline) -> pipeline_lib.Pipeline:
  """The unpipelined twin of ``pipeline``: the ``"single"`` backend with the same model, optimizer
  and :data:`SEMANTIC_OPTIONS`, on the default device, without buffer donation."""
  _check_pipeline(pipeline)
  return pipeline_lib.Pipeline(pipeline.model, pipeline.optimizer, backend="single",
                               donate=False, **semantic_options(pipeline))


def _host_metrics(metrics: dict) -> dict:
  return {k: jax.device_get(metrics[k]) for k in STEP_METRICS if k in metrics}


def reference_run(pipeline: pipeline_lib.Pipeline, batch: Any, *, steps: int = 2,
                  rng: jax.Array | None = None,
                  step_batches: Sequence[Any] | None = None) -> ReferenceRun:
  """Runs the unpipelined reference of ``pipeline`` (:func:`reference_pipeline`).

  Args:
    pipeline: the pipeline whose reference to run (any backend; ``"single"`` is its own).
    batch: ``(inputs, targets)``: the batch of ``init`` and of the loss/gradient check, and of
      every step unless ``step_batches`` is given.
    steps: optimizer steps to record.
    rng: the key of ``init``; default ``jax.random.key(0)``.
    step_batches: one batch per step instead of ``batch``.

  Returns:
    A :class:`ReferenceRun` (host arrays).
  """
  batches = _step_batches(batch, steps, step_batches)
  ref = reference_pipeline(pipeline)
  state = ref.init(jax.random.key(0) if rng is None else rng, batch)
  init_params = jax.device_get(ref.params(state))
  loss, grads = jax.device_get(ref.loss_and_grads(state, batch))
  metrics, params = [], []
  for b in batches:
    state, m = ref.train_step(state, b)
    metrics.append(_host_metrics(m))
    params.append(jax.device_get(ref.params(state)))
  return ReferenceRun(options=semantic_options(ref), init_params=init_params, loss=loss,
                      grads=grads, step_metrics=tuple(metrics), step_params=tuple(params))


def _check_reference(reference: ReferenceRun, pipeline: pipeline_lib.Pipeline, steps: int) -> None:
  mine = semantic_options(pipeline)
  differ = {k: (v, reference.options.get(k)) for k, v in mine.items()
            if k != "skip_nonfinite" and reference.options.get(k) != v}
  if differ:
    shown = ", ".join(f"{k}={a!r} (reference: {b!r})" for k, (a, b) in differ.items())
    raise errors.ConfigError(f"The reference was run with other options than the pipeline: "
                             f"{shown}; run it with reference_run(pipeline, ...).")
  if reference.steps != steps:
    raise errors.ConfigError(f"steps={steps} but the reference recorded {reference.steps} steps; "
                             f"pass steps={reference.steps} or rerun reference_run.")


def assert_pipeline_matches_reference(
    pipeline: pipeline_lib.Pipeline, batch: Any, *, steps: int = 2,
    rng: jax.Array | None = None, step_batches: Sequence[Any] | None = None,
    state: pipeline_lib.TrainState | None = None, reference: ReferenceRun | None = None,
    rtol: float | None = None, atol: float | None = None,
    params_rtol: float | None = None, params_atol: float | None = None,
) -> pipeline_lib.TrainState:
  """Asserts ``pipeline`` trains exactly like its unpipelined reference.

  Compares, in this order: the initial parameters; the loss and every gradient leaf of
  ``batch``; then for each of ``steps`` optimizer steps the step's ``loss`` and ``grad_norm``
  metrics and every parameter leaf after the step. The first difference beyond the tolerance
  raises an ``AssertionError`` naming the check (e.g. ``"parameters after step 2"``) and its
  worst leaf (path, shape, dtype, max abs and rel difference, the worst element).

  Args:
    pipeline: a :class:`~hkpipe.Pipeline` (any backend, schedule, layout or mesh).
    batch: ``(inputs, targets)`` for ``init``, the loss/gradient check and every step (unless
      ``step_batches``).
    steps: the number of optimizer steps to compare.
    rng: the key of ``init`` (both runs); default ``jax.random.key(0)``.
    step_batches: one batch per step, instead of reusing ``batch``.
    state: an already initialised state of ``pipeline`` (made by ``pipeline.init(rng, batch)``
      with the same ``rng``), e.g. after inspecting it; default: ``pipeline.init(rng, batch)``.
    reference: a :class:`ReferenceRun` from :func:`reference_run` (to reuse one reference for
      several pipelines); default: run it now.
    rtol: relative tolerance of the initial parameters, loss, gradients and step metrics;
      None: each leaf's dtype default (float32: ``rtol=1e-5, atol=1e-6``; see
      ``hkpipe.testing.DEFAULT_TOLERANCES``).
    atol: absolute tolerance of the same; None: each leaf's dtype default.
    params_rtol: relative tolerance of the parameters after each step (rounding differences
      grow with the steps and the learning rate); None: ``rtol``.
    params_atol: absolute tolerance of the parameters after each step; None: ``atol``.

  Returns:
    The pipeline's state after the last step (e.g. for further checks).

  Raises:
    AssertionError: a difference beyond the tolerance.
    ConfigError: bad ``steps``/``step_batches``, or a ``reference`` recorded with other options.
  """
  _check_pipeline(pipeline)
  batches = _step_batches(batch, steps, step_batches)
  rng = jax.random.key(0) if rng is None else rng
  if reference is None:
    reference = reference_run(pipeline, batch, steps=steps, rng=rng, step_batches=step_batches)
  _check_reference(reference, pipeline, steps)
  tol = dict(rtol=rtol, atol=atol)
  params_tol = dict(rtol=rtol if params_rtol is None else params_rtol,
                    atol=atol if params_atol is None else params_atol)
  if state is None:
    state = pipeline.init(rng, batch)
  compare.assert_trees_close(pipeline.params(state), reference.init_params,
                             what="initial parameters", **tol)
  loss, grads = pipeline.loss_and_grads(state, batch)
  compare.assert_trees_close(loss, reference.loss, what="loss", **tol)
  compare.assert_trees_close(grads, reference.grads, what="gradients", **tol)
  for k, (b, ref_metrics, ref_params) in enumerate(
      zip(batches, reference.step_metrics, reference.step_params), start=1):
    state, metrics = pipeline.train_step(state, b)
    got = {name: metrics[name] for name in ref_metrics if name in metrics}
    compare.assert_trees_close(got, {name: ref_metrics[name] for name in got},
                               what=f"metrics of step {k}", **tol)
    compare.assert_trees_close(pipeline.params(state), ref_params,
                               what=f"parameters after step {k}", **params_tol)
  return state
