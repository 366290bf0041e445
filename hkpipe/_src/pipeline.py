"""The ``Pipeline`` object and the abstract backend adapter every backend subclasses.

``Pipeline(model, optimizer=..., backend=...)`` is the one object the training loop, launcher and
tests use. A backend is a small subclass of :class:`Backend` (the way t5x has one base partitioner
and small concrete ones); what all backends share (batch validation, microbatch splitting,
global-norm clipping, canonical-state conversion helpers) lives here once.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hkpipe._src import layers as layers_lib

Batch = tuple[Any, Any]  # (inputs, targets), leading axis = batch
Metrics = dict[str, jax.Array]

# name -> "module:Class"; imported lazily so a backend's dependencies load only when used.
_BACKENDS: Mapping[str, str] = {
    "single": "hkpipe._src.backends.single:SingleBackend",
    "mpmd": "hkpipe._src.backends.mpmd:MpmdBackend",
    "spmd": "hkpipe._src.backends.spmd:SpmdBackend",
    "pmap": "hkpipe._src.backends.pmap:PmapBackend",
}


def available_backends() -> tuple[str, ...]:
  """Names accepted by ``Pipeline(backend=...)``."""
  return tuple(_BACKENDS)


@dataclasses.dataclass(frozen=True)
class TrainState:
  """Training state in a backend's own layout.

  Attributes:
    step: number of optimizer steps taken so far (a Python int).
    params: parameters, laid out as the backend needs (use ``Pipeline.params`` for the canonical
      ``{layer_name: params}`` view).
    opt_state: optimizer state, in the backend's layout.
    rng: base PRNG key; dropout keys derive from (rng, step, microbatch, layer).
  """

  step: int
  params: Any
  opt_state: Any
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
  """Everything a backend needs besides the model and the optimizer.

  Attributes:
    backend: one of :func:`available_backends`.
    num_microbatches: microbatches per step (gradient accumulation on the single backend).
    schedule: schedule name (see ``hkpipe.schedules``) or a ``Schedule`` object.
    num_stages: number of pipeline ranks ``p`` (as in ``hkpipe.schedules.get``); default from
      ``devices``/``mesh``; without either, the first ``num_stages`` devices are used. The model is
      cut into ``p * virtual_stages`` stages.
    virtual_stages: stages per rank ``v`` (interleaved/V schedules); default from the schedule.
    partition: stage boundaries (layer indices where stages 1.. start), or a cost name
      (``"params"``, ``"flops"``) or a callable ``cost(layer, example_input) -> float``.
    devices: devices for the pipeline ranks (one per rank), default ``jax.devices()``.
    mesh: alternatively a mesh with axes ``("pp",)`` or ``("pp", "dp")``.
    max_grad_norm: clip the global gradient norm (over all stages) to this value; None: no clip.
    remat: recompute each stage's forward in backward (activation checkpointing).
    record_timeline: record the executed per-rank actions with their times (MPMD).
    donate: donate parameter and optimizer buffers to the update (saves memory; the old state
      becomes invalid after ``train_step``).
  """

  backend: str = "single"
  num_microbatches: int = 1
  schedule: Any = "1f1b"
  num_stages: int | None = None
  virtual_stages: int | None = None
  partition: Any = "params"
  devices: Sequence[Any] | None = None
  mesh: Any = None
  max_grad_norm: float | None = None
  remat: bool = False
  record_timeline: bool = False
  donate: bool = True

  def __post_init__(self):
    if self.backend not in _BACKENDS:
      raise ValueError(f"Unknown backend {self.backend!r}; choose one of {list(_BACKENDS)}.")
    if not isinstance(self.num_microbatches, int) or self.num_microbatches < 1:
      raise ValueError(f"num_microbatches must be a positive int, got {self.num_microbatches!r}.")
    if self.max_grad_norm is not None and not self.max_grad_norm > 0:
      raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}.")


# ---------------------------------------------------------------------------------------------
# Shared helpers (pure functions, used by every backend).


def validate_batch(batch: Any, num_microbatches: int) -> int:
  """Checks ``batch`` is ``(inputs, targets)`` splittable into microbatches; returns batch size.

  Raises:
    ValueError: naming the bad value and the fix, before anything is compiled.
  """
  if not isinstance(batch, (tuple, list)) or len(batch) != 2:
    raise ValueError(f"A batch must be a pair (inputs, targets); got {type(batch).__name__}"
                     f"{' of length ' + str(len(batch)) if isinstance(batch, (tuple, list)) else ''}.")
  sizes = {int(np.shape(x)[0]) for x in jax.tree.leaves(batch) if np.ndim(x) > 0}
  if len(sizes) != 1:
    raise ValueError(f"All batch arrays need the same leading (batch) size; got sizes {sorted(sizes)}.")
  size = sizes.pop()
  if size % num_microbatches:
    raise ValueError(f"Batch size {size} is not divisible by num_microbatches={num_microbatches}; "
                     f"use a batch size that is a multiple of {num_microbatches} or change "
                     "num_microbatches.")
  return size


def split_microbatches(tree: Any, num_microbatches: int) -> Any:
  """Reshapes every leaf ``[B, ...]`` to ``[num_microbatches, B // num_microbatches, ...]``."""
  return jax.tree.map(
      lambda x: jnp.reshape(x, (num_microbatches, x.shape[0] // num_microbatches) + x.shape[1:]),
      tree)


def sq_norm(tree: Any) -> jax.Array:
  """Sum of squares of every leaf, in float32 (a stage's share of the global norm)."""
  return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)),
             jnp.zeros((), jnp.float32))


def clip_scale(global_norm: jax.Array, max_norm: float | None) -> jax.Array:
  """The factor that scales gradients with ``global_norm`` down to at most ``max_norm``."""
  if max_norm is None:
    return jnp.ones((), jnp.float32)
  return jnp.minimum(1.0, max_norm / jnp.maximum(global_norm, 1e-12))


def restrict(tree: Any, names: Sequence[str], all_names: Sequence[str]) -> Any:
  """Restricts a canonical-layout pytree (params, grads or optimizer state) to some layers.

  Every dict whose keys are exactly ``all_names`` (a canonical params-shaped subtree, as optax
  states embed them) is cut down to ``names``; everything else (step counters...) is kept.
  """
  full, keep = set(all_names), list(names)

  def go(node):
    if isinstance(node, Mapping) and set(node.keys()) == full:
      return {k: node[k] for k in keep}
    if isinstance(node, Mapping):
      return {k: go(v) for k, v in node.items()}
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      return type(node)(*(go(v) for v in node))
    if isinstance(node, (tuple, list)):
      return type(node)(go(v) for v in node)
    return node

  return go(tree)


def merge(parts: Sequence[Any], part_names: Sequence[Sequence[str]]) -> Any:
  """Inverse of :func:`restrict`: joins per-stage trees back into the canonical layout.

  Dicts keyed by a stage's layer names are unioned in model order; other leaves (counters) are
  taken from the first part.
  """
  names0 = set(part_names[0])

  def go(nodes):
    node = nodes[0]
    if isinstance(node, Mapping) and set(node.keys()) == names0:
      out: dict = {}
      for n in nodes:
        out.update(n)
      return out
    if isinstance(node, Mapping):
      return {k: go([n[k] for n in nodes]) for k in node}
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      return type(node)(*(go([n[i] for n in nodes]) for i in range(len(node))))
    if isinstance(node, (tuple, list)):
      return type(node)(go([n[i] for n in nodes]) for i in range(len(node)))
    return node

  return go(list(parts))


# ---------------------------------------------------------------------------------------------


class Backend(abc.ABC):
  """Abstract backend adapter. Subclasses implement the step in their own execution model.

  Every backend must produce, for the same model, optimizer, batch and state, the loss and
  (canonical) gradients of the single-device reference, to float tolerance.
  """

  def __init__(self, model: layers_lib.SequentialModel, optimizer: optax.GradientTransformation,
               options: PipelineOptions):
    self.model = model
    self.optimizer = optimizer
    self.options = options

  @abc.abstractmethod
  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    """Creates parameters and optimizer state for an example batch."""

  @abc.abstractmethod
  def loss_and_grads(self, state: TrainState, batch: Batch) -> tuple[jax.Array, dict]:
    """Mean microbatch loss and its gradient in the canonical layout (ties summed, unclipped)."""

  @abc.abstractmethod
  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    """One optimizer step. Metrics hold at least ``loss`` and ``grad_norm`` (pre-clip)."""

  @abc.abstractmethod
  def eval_loss(self, state: TrainState, batch: Batch) -> jax.Array:
    """Loss without dropout, averaged over microbatches."""

  @abc.abstractmethod
  def to_canonical(self, state: TrainState) -> dict:
    """``{"params": canonical, "opt_state": canonical-layout optimizer state, "rng": key}``."""

  @abc.abstractmethod
  def from_canonical(self, canonical: Mapping[str, Any], step: int) -> TrainState:
    """Places a canonical state (e.g. a restored checkpoint) into this backend's layout."""

  def params(self, state: TrainState) -> dict:
    """Canonical ``{layer_name: params}`` view of the state's parameters."""
    return self.to_canonical(state)["params"]


def _backend_class(name: str) -> Callable[..., Backend]:
  module_name, cls_name = _BACKENDS[name].split(":")
  return getattr(importlib.import_module(module_name), cls_name)


class Pipeline:
  """Trains a :class:`~hkpipe.SequentialModel` with one of several execution backends.

  Example::

    model = hkpipe.models.build(hkpipe.models.GPTConfig(...))
    pipe = hkpipe.Pipeline(model, optimizer=optax.adamw(3e-4), backend="single",
                           num_microbatches=4)
    state = pipe.init(jax.random.key(0), batch)
    state, metrics = pipe.train_step(state, batch)

  Args:
    model: the model (ordered layers + loss).
    optimizer: an optax transformation, applied to the canonical parameter layout (per stage on
      pipelined backends). Leave gradient clipping to ``max_grad_norm``, which clips by the norm
      over *all* stages.
    backend: ``"single"`` (one device, the reference), or another of :func:`available_backends`.
    **options: fields of :class:`PipelineOptions`.
  """

  def __init__(self, model: layers_lib.SequentialModel, optimizer: optax.GradientTransformation,
               backend: str = "single", **options: Any):
    if not isinstance(model, layers_lib.SequentialModel):
      raise TypeError(f"model must be a hkpipe.SequentialModel, got {type(model).__name__}.")
    unknown = set(options) - {f.name for f in dataclasses.fields(PipelineOptions)}
    if unknown:
      raise TypeError(f"Unknown Pipeline options {sorted(unknown)}; valid options are "
                      f"{[f.name for f in dataclasses.fields(PipelineOptions)]}.")
    self.model = model
    self.optimizer = optimizer
    self.options = PipelineOptions(backend=backend, **options)
    self.backend: Backend = _backend_class(backend)(model, optimizer, self.options)

  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    """Initial state (parameters + optimizer state) for an example batch."""
    validate_batch(batch, self.options.num_microbatches)
    return self.backend.init(rng, batch)

  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    """One optimizer step; returns the new state and metrics (``loss``, ``grad_norm``)."""
    validate_batch(batch, self.options.num_microbatches)
    return self.backend.train_step(state, batch)

  def loss_and_grads(self, state: TrainState, batch: Batch) -> tuple[jax.Array, dict]:
    """Loss and canonical gradients of one batch (no update); the equivalence-test entry."""
    validate_batch(batch, self.options.num_microbatches)
    return self.backend.loss_and_grads(state, batch)

  def eval_step(self, state: TrainState, batch: Batch) -> Metrics:
    """Evaluation metrics (``loss``) of one batch, without dropout."""
    validate_batch(batch, self.options.num_microbatches)
    return {"loss": self.backend.eval_loss(state, batch)}

  def params(self, state: TrainState) -> dict:
    """Canonical ``{layer_name: params}`` view of the parameters."""
    return self.backend.params(state)

  def to_canonical(self, state: TrainState) -> dict:
    """The layout-independent state that checkpoints store."""
    return self.backend.to_canonical(state)

  def from_canonical(self, canonical: Mapping[str, Any], step: int) -> TrainState:
    """Rebuilds a state in this pipeline's layout from a canonical one."""
    return self.backend.from_canonical(canonical, step)
