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
import itertools
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from hkpipe._src import errors
from hkpipe._src import layers as layers_lib
from hkpipe._src import watchdog

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


# Options each backend does not use: giving one (a value other than the default) is an error.
_UNUSED_OPTIONS: Mapping[str, tuple[str, ...]] = {
    "single": ("schedule", "num_stages", "virtual_stages", "partition", "mesh", "record_timeline"),
    "pmap": ("schedule", "num_stages", "virtual_stages", "partition", "record_timeline"),
    "spmd": ("record_timeline",),
    "mpmd": (),
}
_PIPELINED_DEFAULTS: Mapping[str, Any] = {"schedule": "1f1b", "partition": "params"}


def _positive_int(name: str, value: Any, fix: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise errors.ConfigError(f"{name} must be a positive int, got {value!r}; {fix}.")


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
  """Everything a backend needs besides the model and the optimizer.

  Every option is used by the backend or rejected: giving an option that ``backend`` does not use
  (``schedule``, ``num_stages``, ``virtual_stages``, ``partition`` on ``single``/``pmap``; ``mesh``
  on ``single``; ``record_timeline`` anywhere but ``mpmd``) raises a ``ConfigError``.

  Attributes:
    backend: one of :func:`available_backends`.
    num_microbatches: microbatches per step (gradient accumulation on the single backend);
      default: the ``schedule`` object's, else 1.
    schedule: schedule name (see ``hkpipe.schedules``) or a ``Schedule`` object (then its ranks
      and microbatches are the pipeline's); pipelined backends only; default ``"1f1b"``.
    num_stages: number of pipeline ranks ``p`` (as in ``hkpipe.schedules.get``); default from
      ``devices``/``mesh`` or the ``schedule`` object; without any, the first ``num_stages``
      devices are used. The model is cut into ``p * virtual_stages`` stages.
    virtual_stages: stages per rank ``v`` (interleaved/V schedules); default from the schedule.
    partition: stage boundaries (layer indices where stages 1.. start), or a cost name
      (``"params"``, ``"flops"``) or a callable ``cost(layer, example_input) -> float``;
      pipelined backends only; default ``"params"``.
    devices: devices for the pipeline ranks (one per rank; ``pmap``: the data-parallel devices;
      ``single``: one device), default ``jax.devices()``.
    mesh: alternatively a mesh with axes ``("pp",)`` or ``("pp", "dp")`` (``pmap``: its devices).
    max_grad_norm: clip the global gradient norm (over all stages) to this value; None or 0: no
      clipping.
    remat: recompute each stage's forward in backward (activation checkpointing).
    record_timeline: record the executed per-rank actions with their times (``mpmd`` only).
    donate: donate parameter and optimizer buffers to the update (saves memory; the old state
      becomes invalid after ``train_step``).
    progress: a ``hkpipe.train.Progress`` the backend keeps up to date (the MPMD driver: the
      last op issued and the message awaited), for a hang ``Watchdog``; None: a private one.
    skip_nonfinite: skip a step whose loss or global gradient norm is NaN/Inf: parameters and
      optimizer state stay bit-identical (the decision is global: every stage, replica and
      process skips), ``TrainState.step`` still advances, and ``metrics["skipped"]`` is 1.0
      (0.0 otherwise; always 0.0 when False). The check is one scalar per step, fused with the
      update; on ``mpmd`` it makes every stage's update wait for the global decision, as
      clipping does (see ``hkpipe._src.step_guard``).
  """

  backend: str = "single"
  num_microbatches: int | None = None
  schedule: Any = None
  num_stages: int | None = None
  virtual_stages: int | None = None
  partition: Any = None
  devices: Sequence[Any] | None = None
  mesh: Any = None
  max_grad_norm: float | None = None
  remat: bool = False
  record_timeline: bool = False
  donate: bool = True
  progress: Any = None
  skip_nonfinite: bool = True

  def __post_init__(self):
    if self.backend not in _BACKENDS:
      raise errors.ConfigError(f"Unknown backend {self.backend!r}; choose one of "
                               f"{list(_BACKENDS)}.")
    unused = [n for n in _UNUSED_OPTIONS[self.backend] if getattr(self, n) not in (None, False)]
    if unused:
      shown = ", ".join(f"{n}={getattr(self, n)!r}" for n in unused)
      raise errors.ConfigError(
          f"backend={self.backend!r} does not use {shown}; drop "
          f"{'it' if len(unused) == 1 else 'them'}, or pick a backend that does "
          f"({'mpmd' if 'record_timeline' in unused else 'mpmd or spmd'}).")
    if not isinstance(self.skip_nonfinite, bool):
      raise errors.ConfigError(f"skip_nonfinite must be True or False, got "
                               f"{self.skip_nonfinite!r}.")
    if self.backend == "single" and self.devices is not None and len(self.devices) != 1:
      raise errors.ConfigError(f"backend='single' runs on one device, but devices= lists "
                               f"{len(self.devices)}; pass one device (or use backend='pmap', "
                               "'spmd' or 'mpmd' for several).")
    sched = self.schedule
    if sched is not None and not isinstance(sched, str):
      for name, value in (("num_microbatches", sched.num_microbatches),
                          ("num_stages", sched.num_ranks)):
        given = getattr(self, name)
        if given is None and (name == "num_microbatches" or (self.devices is None
                                                             and self.mesh is None)):
          object.__setattr__(self, name, int(value))
        elif given is not None and given != value:
          raise errors.ConfigError(
              f"{name}={given} but the schedule object {getattr(sched, 'name', sched)!r} has "
              f"{value}; drop {name} (the schedule's is used) or make them equal.")
    if self.num_microbatches is None:
      object.__setattr__(self, "num_microbatches", 1)
    _positive_int("num_microbatches", self.num_microbatches,
                  "pass the number of microbatches per step, e.g. num_microbatches=4")
    for name in ("num_stages", "virtual_stages"):
      if getattr(self, name) is not None:
        _positive_int(name, getattr(self, name), f"pass {name}=N with N >= 1, or leave it unset")
    if self.max_grad_norm is not None:
      norm = self.max_grad_norm
      if isinstance(norm, bool) or not isinstance(norm, (int, float)) or not norm >= 0 or (
          norm == float("inf")):
        raise errors.ConfigError(f"max_grad_norm must be a finite number >= 0 (0 or None: no "
                                 f"clipping), got {norm!r}.")
      if norm == 0:
        object.__setattr__(self, "max_grad_norm", None)  # documented: 0 disables clipping
    if self.backend in ("spmd", "mpmd"):
      for name, default in _PIPELINED_DEFAULTS.items():
        if getattr(self, name) is None:
          object.__setattr__(self, name, default)


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
# Multi-process helpers (pure functions; no collectives unless the docstring says so).


def _is_key(x: Any) -> bool:
  return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def example_microbatch(tree: Any, global_size: int, num_microbatches: int) -> Any:
  """The first rows of a (possibly process-local) batch, at most one global microbatch's worth.

  Only shapes matter (parameter initialisation, cost-balanced partitioning), so a process whose
  local rows are fewer than a microbatch uses what it has.
  """
  rows = max(1, global_size // num_microbatches)
  return jax.tree.map(lambda x: x[:rows], tree)


def process_batch_spec(mesh: Any, process_count: int | None = None) -> Any:
  """The ``PartitionSpec`` of a batch's leading axis that gives process ``p``'s devices exactly
  the global rows ``p * b : (p + 1) * b`` (its process-local rows, ``b = B / process_count``).

  The leading axis is split over some of the mesh's axes (in some order) so that, walking the
  blocks in order, the first ``1 / P`` of them lie on process 0's devices, the next on process
  1's, and so on; the remaining axes replicate. In one process this is ``P()`` (every device
  holds the whole batch).

  Args:
    mesh: a ``jax.sharding.Mesh`` (anything with ``devices`` and ``axis_names``).
    process_count: processes in the run; default ``jax.process_count()``.

  Raises:
    ValueError: if some process owns no device of the mesh, or the mesh's devices are not laid
      out in process order along any combination of its axes (with the fix).
  """
  grid = np.asarray(mesh.devices, dtype=object)
  names = tuple(mesh.axis_names)
  count = jax.process_count() if process_count is None else process_count
  procs = sorted({int(d.process_index) for d in grid.flat})
  if len(procs) != count:
    raise ValueError(
        f"The pipeline's devices belong to processes {procs}, but this run has {count} "
        "processes. Every process passes its own rows of the global batch, so every process must "
        "own devices of the pipeline: build the mesh/devices from jax.devices() (all processes), "
        "e.g. the first k of jax.local_devices(process_index=i) for every i.")
  rank = {p: i for i, p in enumerate(procs)}
  cells: dict[tuple[int, ...], Any] = {i: grid[i] for i in np.ndindex(*grid.shape)}
  owner = {i: rank[int(d.process_index)] for i, d in cells.items()}
  candidates: list[tuple[int, ...]] = [()]
  for size in range(1, len(names) + 1):
    candidates += list(itertools.permutations(range(len(names)), size))
  for axes in candidates:
    sizes = [grid.shape[a] for a in axes]
    blocks = int(np.prod(sizes)) if axes else 1
    if blocks % count:
      continue
    per = blocks // count
    ok = True
    for index, process in owner.items():
      block = int(np.ravel_multi_index([index[a] for a in axes], sizes)) if axes else 0
      if process != block // per:
        ok = False
        break
    if ok:
      if not axes:
        return P()
      chosen = tuple(names[a] for a in axes)
      return P(chosen[0] if len(chosen) == 1 else chosen)
  raise ValueError(
      f"The mesh {dict(zip(names, grid.shape))} does not lay its devices out in process order "
      "along any of its axes, so process-local batch rows cannot be placed without moving data "
      "between processes. Order the devices by process (e.g. sorted(devices, key=lambda d: "
      "(d.process_index, d.id))) before reshaping them into the mesh.")


def put_process_batch(tree: Any, sharding: Any) -> Any:
  """Global arrays from process-local batch rows, without collectives.

  Every leaf ``[b, ...]`` holds this process's rows ``p * b : (p + 1) * b`` of a global
  ``[P * b, ...]`` array placed with ``sharding`` (from :func:`process_batch_spec`); each process
  fills only its own devices. In one process this is ``jax.device_put`` (inputs may live anywhere).
  """
  if sharding.is_fully_addressable:
    return jax.device_put(tree, sharding)
  count, me = jax.process_count(), jax.process_index()
  spec = tuple(sharding.spec)
  axes = spec[0] if spec and spec[0] is not None else ()
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  blocks = int(np.prod([sharding.mesh.shape[a] for a in axes])) if axes else 1

  def put(x):
    host = np.asarray(x)
    b = host.shape[0]
    shape = (count * b,) + host.shape[1:]
    if shape[0] % blocks:
      raise ValueError(f"The global batch of {count} x {b} = {shape[0]} rows is split over the "
                       f"mesh axes {axes} ({blocks} blocks) to place each process's rows on its "
                       f"devices; use a global batch size that is a multiple of {blocks}.")

    def rows(index):
      first = index[0]
      start, stop = (first.start or 0), (shape[0] if first.stop is None else first.stop)
      if start < me * b or stop > (me + 1) * b:
        raise ValueError(f"Process {me} holds global rows {me * b}..{(me + 1) * b - 1} but its "
                         f"devices need rows {start}..{stop - 1}; place the batch with "
                         "process_batch_spec(mesh).")
      return host[(slice(start - me * b, stop - me * b),) + tuple(index[1:])]

    return jax.make_array_from_callback(shape, sharding, rows)

  return jax.tree.map(put, tree)


def put_global(tree: Any, sharding: Any) -> Any:
  """Places host values (the same on every process) as global arrays with ``sharding``.

  Each process fills only its addressable devices, so there is no collective and no
  cross-process check (``jax.device_put`` of host data onto a global sharding runs one). Leaves
  may be numpy arrays, fully addressable ``jax.Array`` s (including PRNG key arrays), or global
  arrays that are fully replicated. In one process this is ``jax.device_put``.
  """
  if sharding.is_fully_addressable:
    return jax.device_put(tree, sharding)

  def put(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and x.sharding == sharding:
      return x
    x = local_value(x)
    impl = jax.random.key_impl(x) if _is_key(x) else None
    host = np.asarray(jax.random.key_data(x) if impl is not None else x)
    shape = tuple(np.shape(x))
    shards = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
      shard = jax.device_put(host[index], device)
      shards.append(jax.random.wrap_key_data(shard, impl=impl) if impl is not None else shard)
    return jax.make_array_from_single_device_arrays(shape, sharding, shards)

  return jax.tree.map(put, tree)


def process_mesh() -> Mesh:
  """A mesh of the first local device of every process, in process order: ``("proc",)``."""
  devices = [jax.local_devices(process_index=p)[0] for p in range(jax.process_count())]
  return Mesh(np.asarray(devices, dtype=object), ("proc",))


def local_value(x: Any) -> Any:
  """A value of ``x`` usable on this process, without collectives.

  Host values and fully addressable arrays are returned as they are; a global array that is fully
  replicated gives its copy on this process's first device that holds one.

  Raises:
    ValueError: for a global array that is not fully replicated (use :func:`gather`).
  """
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return x
  if x.is_fully_replicated and x.sharding.has_addressable_devices:
    return x.addressable_data(0)
  raise ValueError(f"A global array of shape {x.shape} with sharding {x.sharding} has no full "
                   "copy on this process; gather it with hkpipe's pipeline.gather (every process "
                   "must call it).")


def gather(tree: Any) -> Any:
  """Process-local copies of every leaf of ``tree`` (arrays usable on this process).

  Leaves that :func:`local_value` can serve locally are; the others (global arrays sharded across
  processes) are all-gathered, which is a collective: in a multi-process run every process must
  call this with the same tree.
  """
  leaves, treedef = jax.tree.flatten(tree)
  need = [i for i, x in enumerate(leaves)
          if isinstance(x, jax.Array) and not x.is_fully_addressable
          and not (x.is_fully_replicated and x.sharding.has_addressable_devices)]
  if need:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    got = multihost_utils.process_allgather([leaves[i] for i in need], tiled=True)
    for i, value in zip(need, got):
      leaves[i] = value
  return jax.tree.unflatten(treedef, [local_value(x) for x in leaves])


def check_same_batch_on_every_process(batch: Any) -> None:
  """Checks every process passes a batch of the same structure, shapes and dtypes.

  A collective (a small all-gather): in a multi-process run every process must call it. Without
  it, processes passing different shapes would build different global arrays and compile
  mismatched programs, which hangs or aborts inside the collectives instead of raising.

  Raises:
    ValueError: naming this process's batch signature.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  leaves, treedef = jax.tree.flatten(batch)
  signature = repr((str(treedef), [(tuple(np.shape(x)), str(x.dtype if hasattr(x, "dtype")
                                                            else np.asarray(x).dtype))
                                   for x in leaves]))
  digest = np.array([zlib.crc32(signature.encode())], np.uint32)
  try:
    multihost_utils.assert_equal(digest)
  except AssertionError as e:
    raise ValueError(f"Process {jax.process_index()} passed a batch {signature} that differs in "
                     "structure, shapes or dtypes from another process's. Every process must "
                     "pass batches of the same shapes (its own rows of the global batch, or the "
                     "full global batch, as the backend's batch_is_process_local says).") from e


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

  Attributes:
    batch_is_process_local: whether each process passes its own rows of the global batch (True)
      or the whole global batch (False) in a multi-process run.
  """

  batch_is_process_local: bool = True

  def __init__(self, model: layers_lib.SequentialModel, optimizer: optax.GradientTransformation,
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
  def eval_loss(self, state: TrainState, batch: Batch) -> jax.Array:
    """Loss without dropout, averaged over microbatches."""

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
    return gather(self.to_canonical(state)["params"])

  def batch_process_count(self) -> int:
    """How many processes' batches make up the global batch (see :attr:`batch_is_process_local`)."""
    return jax.process_count() if self.batch_is_process_local else 1

  def global_batch_size(self, batch: Batch) -> int:
    """Validates ``batch`` (as passed on this process) and returns the global batch size."""
    return validate_batch(batch, self.options.num_microbatches,
                          process_count=self.batch_process_count())


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
    if backend == "single" and jax.process_count() > 1:
      raise ValueError(f"backend='single' runs on one device of one process, but this run has "
                       f"{jax.process_count()} processes; use backend='spmd', 'pmap' or 'mpmd' "
                       "(they span every process's devices), or run a single process.")
    self.backend: Backend = _backend_class(backend)(model, optimizer, self.options)

  def init(self, rng: jax.Array, batch: Batch) -> TrainState:
    """Initial state (parameters + optimizer state) for an example batch.

    In a multi-process run every process calls it with the same ``rng`` and a batch following
    the backend's data rule (see :class:`Backend`); the batch shapes are checked to agree across
    processes.
    """
    self.backend.global_batch_size(batch)
    check_same_batch_on_every_process(batch)
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
    """Evaluation metrics (``loss``) of one batch, without dropout (every process calls it)."""
    self.backend.global_batch_size(batch)
    return {"loss": self.backend.eval_loss(state, batch)}

  def describe(self, batch: Batch, call: str = "train") -> str:
    """The driver program of one call (``"train"``, ``"grads"``, ``"eval"``) as text; MPMD only."""
    return self.backend.describe(batch, call)

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
