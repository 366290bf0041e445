"""The ``Pipeline`` facade, its ``TrainState`` and the abstract backend adapter.

``Pipeline(model, optimizer=..., backend=...)`` is the one object the training loop, launcher and
tests use; everything a caller needs (steps, canonical state, the resolved layout, which batch
rows this process feeds, timeline and compile statistics) is a ``Pipeline`` method or property,
so no caller reads ``pipe.backend``. A backend is a small subclass of :class:`Backend` (the way
t5x has one base partitioner and small concrete ones); what all backends share (batch validation,
microbatch splitting) lives here once; the step math (accumulation, ties, clipping, the update)
lives in ``step``.

Neighbouring modules: ``pipeline_info`` (the facade's introspection properties and
:class:`DataLayout`), ``options`` (:class:`PipelineOptions` and its validation), ``placement``
(multi-host placement of batches and replicated values) and ``canonical`` (cutting canonical
trees into per-stage pieces and joining them back).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING, Any, Mapping, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hkpipe._src import errors
from hkpipe._src import model as model_lib
from hkpipe._src import options as options_lib
from hkpipe._src import pipeline_info
from hkpipe._src import pipelined_decode
from hkpipe._src import placement
from hkpipe._src import watchdog
from hkpipe._src.options import PipelineOptions
from hkpipe._src.options import available_backends
from hkpipe._src.pipeline_info import DataLayout
from hkpipe._src.pipeline_info import split_global_batch

if TYPE_CHECKING:
  from hkpipe._src import layout as layout_lib

__all__ = ("Backend", "Batch", "DataLayout", "Metrics", "Pipeline", "PipelineOptions",
           "TrainState", "available_backends", "split_global_batch", "split_microbatches",
           "validate_batch")

Batch = tuple[Any, Any]  # (inputs, targets), leading axis = batch
Metrics = dict[str, jax.Array]


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



# ---------------------------------------------------------------------------------------------
# Shared helpers (pure functions, used by every backend).


def validate_batch(batch: Any, num_microbatches: int, *, process_count: int = 1) -> int:
  """Checks ``batch`` is ``(inputs, targets)`` splittable into microbatches.

  Args:
    batch: ``(inputs, targets)``; every array has the same leading (batch) size.
    num_microbatches: microbatches per step.
    process_count: how many processes each pass a batch of this size whose rows together form the
      global batch (``jax.process_count()`` for process-local batches, see
      :attr:`Backend.batch_is_process_local`); 1 when ``batch`` is the whole global batch.

  Returns:
    The global batch size (local rows x ``process_count``).

  Raises:
    ValueError: naming the bad value and the fix, before anything is compiled.
  """
  if not isinstance(batch, (tuple, list)) or len(batch) != 2:
    raise ValueError(f"A batch must be a pair (inputs, targets); got {type(batch).__name__}"
                     f"{' of length ' + str(len(batch)) if isinstance(batch, (tuple, list)) else ''}.")
  sizes = {int(np.shape(x)[0]) for x in jax.tree.leaves(batch) if np.ndim(x) > 0}
  if len(sizes) != 1:
    raise ValueError(f"All batch arrays need the same leading (batch) size; got sizes {sorted(sizes)}.")
  local = sizes.pop()
  if local == 0:
    raise errors.ConfigError(f"The batch has 0 rows; pass at least num_microbatches="
                             f"{num_microbatches} rows (one per microbatch).")
  size = local * process_count
  if size % num_microbatches:
    if process_count > 1:
      raise ValueError(f"The global batch ({process_count} processes x {local} process-local rows "
                       f"= {size}) is not divisible by num_microbatches={num_microbatches}; use a "
                       f"global batch size that is a multiple of {num_microbatches} or change "
                       "num_microbatches.")
    raise ValueError(f"Batch size {size} is not divisible by num_microbatches={num_microbatches}; "
                     f"use a batch size that is a multiple of {num_microbatches} or change "
                     "num_microbatches.")
  return size


def split_microbatches(tree: Any, num_microbatches: int) -> Any:
  """Reshapes every leaf ``[B, ...]`` to ``[num_microbatches, B // num_microbatches, ...]``."""
  return jax.tree.map(
      lambda x: jnp.reshape(x, (num_microbatches, x.shape[0] // num_microbatches) + x.shape[1:]),
      tree)


# ---------------------------------------------------------------------------------------------


class Backend(abc.ABC):
  """Abstract backend adapter. Subclasses implement the step in their own execution model.

  Every backend must produce, for the same model, optimizer, batch and state, the loss and
  (canonical) gradients of the single-device reference, to float tolerance.

  Multi-process runs (``jax.process_count() > 1``, every process running the same program) follow
  one data rule, set per backend by :attr:`batch_is_process_local`:

  - ``True`` (``spmd``, ``pmap``): every process passes **its own rows** of the global batch to
    ``init``/``train_step``/``loss_and_grads``/``eval_step``: process ``i`` of ``P`` passes rows
    ``i*b : (i+1)*b`` of a global batch of ``B = P*b`` rows (what
    ``hkpipe.data.sample_batch(..., process_index=i, process_count=P)`` returns). The backend
    assembles the global batch on its devices; ``num_microbatches`` and every result refer to
    that global batch, exactly as the single-device reference run on all ``B`` rows.
  - ``False`` (``mpmd``): every process passes the **full** global batch (the first stage's
    process needs the inputs, the last stage's the targets).

  In one process both rules are the same: the batch is the global batch. Every process must call
  every ``Pipeline`` method, in the same order, with batches of the same shapes (``init`` checks
  the shapes across processes); results are then the same on every process: metrics and losses
  can be read with ``float()`` anywhere, ``params``/``loss_and_grads`` give process-local copies
  of the canonical tree, ``to_canonical`` gives global arrays that checkpoints save from every
  process.

  Callers read the rule through :meth:`Pipeline.data_layout`.

  Attributes:
    batch_is_process_local: whether each process passes its own rows of the global batch (True)
      or the whole global batch (False) in a multi-process run.
  """

  batch_is_process_local: bool = True

  def __init__(self, model: model_lib.SequentialModel, optimizer: optax.GradientTransformation,
               options: PipelineOptions):
    self.model = model
    self.optimizer = optimizer
    self.options = options
    self.progress = options.progress if options.progress is not None else watchdog.Progress()

  @abc.abstractmethod
  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    """Creates parameters and optimizer state for an example batch."""

  @abc.abstractmethod
  def loss_and_grads(self, state: TrainState, batch: Batch) -> tuple[jax.Array, dict]:
    """Mean microbatch loss and its gradient in the canonical layout (ties summed, unclipped)."""

  @abc.abstractmethod
  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    """One optimizer step. Metrics hold at least ``loss``, ``grad_norm`` (pre-clip) and
    ``skipped`` (see ``PipelineOptions.skip_nonfinite``)."""

  @abc.abstractmethod
  def eval_step(self, state: TrainState, batch: Batch) -> Metrics:
    """Eval metrics ``{"loss"}``: the loss without dropout, averaged over microbatches."""

  @abc.abstractmethod
  def to_canonical(self, state: TrainState) -> dict:
    """``{"params": canonical, "opt_state": canonical-layout optimizer state, "rng": key}``."""

  @abc.abstractmethod
  def from_canonical(self, canonical: Mapping[str, Any], step: int) -> TrainState:
    """Places a canonical state (e.g. a restored checkpoint) into this backend's layout."""

  def params(self, state: TrainState) -> dict:
    """Canonical ``{layer_name: params}`` of the state, as arrays usable on this process.

    In a multi-process run this may be a collective (every process must call it).
    """
    return placement.gather(self.to_canonical(state)["params"])

  def batch_process_count(self) -> int:
    """How many processes' batches make up the global batch (see :attr:`batch_is_process_local`)."""
    return jax.process_count() if self.batch_is_process_local else 1

  def global_batch_size(self, batch: Batch) -> int:
    """Validates ``batch`` (as passed on this process) and returns the global batch size."""
    # PipelineOptions.__post_init__ always sets num_microbatches (default 1).
    return validate_batch(batch, cast(int, self.options.num_microbatches),
                          process_count=self.batch_process_count())

  # -- introspection hooks: what the ``Pipeline`` facade reports ---------------------------------
  # Defaults for a backend without the feature; a backend that has it overrides the property or
  # method (or sets the ``last_*`` attributes on itself). Documented on the ``Pipeline`` facade.

  last_timeline: tuple = ()
  last_timeline_origin: float | None = None
  last_stash_peaks: tuple = ()
  last_stash_peak_bytes: tuple = ()
  last_predicted_bytes: tuple = ()
  last_measured_bytes: tuple = ()

  @property
  def layout(self) -> layout_lib.Layout | None:
    """The resolved pipeline layout; None on backends without pipeline stages."""
    return None

  @property
  def compile_stats(self) -> Any:
    """Compile statistics of a backend that caches programs itself; None otherwise."""
    return None

  def describe(self, batch: Batch, call: str = "train") -> str:
    """The driver program of one call as text (see ``Pipeline.describe``)."""
    del batch, call
    raise self._lacks("describe", "mpmd")

  def layout_report(self, batch: Batch, rng: jax.Array | None = None) -> dict:
    """Bytes of the padded layout for this batch shape (see ``Pipeline.layout_report``)."""
    del batch, rng
    raise self._lacks("layout_report", "spmd")

  def memory_analysis(self, state: TrainState | None, batch: Batch) -> Any:
    """XLA's memory analysis of the train step (see ``Pipeline.memory_analysis``)."""
    del state, batch
    raise self._lacks("memory_analysis", "spmd", "mpmd")

  @property
  def decodes_in_place(self) -> bool:
    """Whether :meth:`stage_params` hands out the stages where they live (``Pipeline.generate``
    then decodes without gathering)."""
    return False

  def stage_params(self, state: TrainState) -> tuple[layout_lib.Layout | None, list] | None:
    """Each stage's parameters where they live, for decoding without a gather:
    ``(layout, [params of stage s])``, layout None for one whole model on one device; None when
    this backend cannot (``Pipeline.generate`` then refuses, naming the ones that can). Across
    processes, the stages of other processes are given as trees of ``jax.ShapeDtypeStruct``
    (their shapes and dtypes: what a process needs to receive their outputs)."""
    del state
    return None

  def stage_channel(self) -> Any:
    """The message ids of one decoding or evaluation walk across processes
    (``stage_link.Channel``; every process calls this once per walk, in the same order); None
    in one process."""
    return None

  def _lacks(self, what: str, *where: str) -> errors.ConfigError:
    """The error for a feature this backend does not have, naming the backends that have it."""
    names = " or ".join(f"backend={w!r}" for w in where)
    return errors.ConfigError(f"{what} is available on {names} only; this pipeline "
                              f"uses backend={self.options.backend!r} ({type(self).__name__}).")



class Pipeline(pipeline_info.Introspection):
  """Trains a :class:`~hkpipe.SequentialModel` with one of several execution backends.

  Example::

    model = hkpipe.models.build(hkpipe.models.GPTConfig(...))
    pipe = hkpipe.Pipeline(model, optimizer=optax.adamw(3e-4), backend="single",
                           num_microbatches=4)
    state = pipe.init(jax.random.key(0), batch)
    state, metrics = pipe.train_step(state, batch)

  Everything a caller needs is a method or property of this object (:attr:`layout`,
  :meth:`data_layout`, :attr:`last_timeline`, :attr:`compile_stats`, ...); ``backend`` is the
  backend adapter and an implementation detail.

  Args:
    model: the model (ordered layers + loss).
    optimizer: an optax transformation, applied to the canonical parameter layout (per stage on
      pipelined backends). Leave gradient clipping to ``max_grad_norm``, which clips by the norm
      over *all* stages.
    backend: ``"single"`` (one device, the reference), or another of :func:`available_backends`.
    **options: fields of :class:`PipelineOptions`.
  """

  def __init__(self, model: model_lib.SequentialModel, optimizer: optax.GradientTransformation,
               backend: str = "single", **options: Any):
    if not isinstance(model, model_lib.SequentialModel):
      raise TypeError(f"model must be a hkpipe.SequentialModel, got {type(model).__name__}.")
    unknown = set(options) - {f.name for f in dataclasses.fields(PipelineOptions)}
    if unknown:
      raise TypeError(f"Unknown Pipeline options {sorted(unknown)}; valid options are "
                      f"{[f.name for f in dataclasses.fields(PipelineOptions)]}.")
    self.model = model
    self.optimizer = optimizer
    self.options = PipelineOptions(backend=backend, **options)
    if backend == "single" and jax.process_count() > 1:
      raise ValueError(f"backend='single' runs on one device of one process, but this run has "
                       f"{jax.process_count()} processes; use backend='spmd', 'pmap' or 'mpmd' "
                       "(they span every process's devices), or run a single process.")
    self.backend: Backend = options_lib.backend_class(backend)(model, optimizer, self.options)

  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    """Initial state (parameters + optimizer state) for an example batch.

    In a multi-process run every process calls it with the same ``rng`` and a batch following
    the backend's data rule (see :class:`Backend` and :meth:`data_layout`); the batch shapes are
    checked to agree across processes.
    """
    self.backend.global_batch_size(batch)
    placement.check_same_batch_on_every_process(batch)
    return self.backend.init(rng, batch)
  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    """One optimizer step; returns the new state and metrics (``loss``, ``grad_norm``,
    ``skipped``: 1.0 if the step was skipped for a non-finite loss or gradient norm).

    Multi-process: every process calls it with its batch (see :class:`Backend`); the metrics are
    the global ones on every process.
    """
    self.backend.global_batch_size(batch)
    return self.backend.train_step(state, batch)

  def loss_and_grads(self, state: TrainState, batch: Batch) -> tuple[jax.Array, dict]:
    """Loss and canonical gradients of one batch (no update); the equivalence-test entry.

    Multi-process: every process calls it; each gets the global loss and the full gradients.
    """
    self.backend.global_batch_size(batch)
    return self.backend.loss_and_grads(state, batch)

  def eval_step(self, state: TrainState, batch: Batch) -> Metrics:
    """Eval metrics of one batch: ``{"loss"}``, the loss without dropout averaged over the
    microbatches (no update; every process calls it). ``eval_step`` is hkpipe's one name for
    evaluation: ``Backend.eval_step`` implements it and the training loop averages it over
    ``config.eval_batches`` batches."""
    self.backend.global_batch_size(batch)
    return self.backend.eval_step(state, batch)

  def describe(self, batch: Batch, call: str = "train") -> str:
    """The driver program of one call (``"train"``, ``"grads"``, ``"eval"``) as text, without
    compiling anything (``mpmd`` only; see docs/mpmd.md, "The step as a program").

    Raises:
      ConfigError: on a backend other than ``mpmd``.
    """
    return self.backend.describe(batch, call)

  def generate(self, state: TrainState, prompt_tokens: Any, **kwargs: Any) -> jax.Array:
    """KV-cache decoding of ``[B, P]`` prompts with this pipeline's own layout, no gather:
    ``mpmd`` and ``spmd`` decode each stage on its rank, ``num_groups`` sequence groups
    interleaved across the ranks (across processes every process calls it with the same
    arguments and gets the tokens; ``spmd`` needs each rank within one process); ``single`` on
    its device. ``kwargs``:
    ``max_new_tokens``, ``rng`` and the sampling options of :func:`hkpipe.models.generate`,
    ``num_groups``. Returns ``[B, P + max_new_tokens]`` int32 tokens; a ``ConfigError`` before
    compiling for bad arguments or another backend. See ``docs/generation.md``."""
    return pipelined_decode.generate(self, state, prompt_tokens, **kwargs)

  def params(self, state: TrainState) -> dict:
    """Canonical ``{layer_name: params}``, as arrays usable on this process (e.g. for sampling).

    Multi-process: every process must call it (it may gather parameters across processes).
    """
    return self.backend.params(state)

  def to_canonical(self, state: TrainState) -> dict:
    """The layout-independent state that checkpoints store.

    Multi-process: every process calls it; leaves are global arrays (possibly with shards on some
    processes only), which ``hkpipe.train.Checkpointer`` saves from all processes.
    """
    return self.backend.to_canonical(state)

  def from_canonical(self, canonical: Mapping[str, Any], step: int) -> TrainState:
    """Rebuilds a state in this pipeline's layout from a canonical one."""
    return self.backend.from_canonical(canonical, step)
