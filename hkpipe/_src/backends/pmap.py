"""The ``pmap`` backend: pure data parallelism, the whole model replicated on every device.

Microbatch semantics (chosen so that ``num_microbatches`` means the same on every backend): the
global batch of ``B`` rows is cut into ``m = num_microbatches`` microbatches of ``B / m`` rows, as
on the single-device reference, and every microbatch is split evenly across the ``n`` devices. Device
``d`` therefore runs ``m`` gradient-accumulation steps on ``B / (n * m)`` rows each: its microbatch
``i`` is the ``d``-th slice of the reference's microbatch ``i``. Because every loss in hkpipe is a
mean over equally sized examples, the mean over devices of the per-device microbatch losses (and
gradients) is the reference's microbatch loss (and gradient), so loss and gradients equal the
single backend's to float tolerance. ``B`` must therefore be a multiple of ``n * m``.

Dropout: device ``d`` folds its index into the reference microbatch key, so the masks are
independent across devices (same distribution as the reference, different draws). With one
device, or without dropout, results equal the reference.

Multi-process: ``devices`` (default: every device of every process, process by process) may span
processes, with the same number per process. Each process passes its own rows of the global batch;
they are placed on its own devices and one small jitted program rearranges the global batch into
the ``[n, m, B / (n m), ...]`` layout above (a device's microbatch slices come from every part of
the global batch, so rows cross processes there). As ``jax.pmap`` expects, the state holds this
process's replicas only; metrics come from the first local replica (identical everywhere after
``pmean``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hkpipe._src import model as model_lib
from hkpipe._src import options as options_lib
from hkpipe._src import placement
from hkpipe._src import pipeline as pipeline_lib
from hkpipe._src import step as step_lib

_AXIS = "dp"


def default_devices() -> tuple[Any, ...]:
  """Every device of the run, process by process (``jax.local_devices()`` in one process)."""
  return tuple(d for p in range(jax.process_count()) for d in jax.local_devices(process_index=p))


def _devices(options: options_lib.PipelineOptions) -> tuple[Any, ...]:
  """The data-parallel devices: ``options.devices``, the mesh's devices, or all devices (of every
  process, process by process)."""
  if options.mesh is not None and options.devices is not None:
    raise ValueError("Pass either devices=... or mesh=..., not both.")
  if options.mesh is not None:
    devices = tuple(np.asarray(options.mesh.devices).reshape(-1))
  elif options.devices is not None:
    devices = tuple(options.devices)
  else:
    devices = default_devices()
  if not devices:
    raise ValueError("devices=... is empty; pass at least one device.")
  if len(set(devices)) != len(devices):
    raise ValueError(f"devices=... lists a device twice: {list(devices)}.")
  return devices


def _check_process_layout(devices: Sequence[Any]) -> None:
  """Multi-process ``pmap`` needs every process to own the same number of the devices, listed
  process by process (``jax.pmap``'s own convention, and what puts each process's batch rows on its
  own devices)."""
  count = jax.process_count()
  procs = [int(d.process_index) for d in devices]
  per, extra = divmod(len(devices), count)
  expected = [p for p in range(count) for _ in range(per)]
  if extra or procs != expected:
    raise ValueError(
        f"A multi-process pmap backend needs the same number of devices from each of the {count} "
        f"processes, listed process by process; got devices of processes {procs}. Omit devices= "
        "(all devices), or pass the first k of jax.local_devices(process_index=i) for every i, "
        "in process order.")


def shard_batch_layout(x: Any, num_devices: int, num_microbatches: int) -> Any:
  """``[B, ...] -> [n, m, B / (n m), ...]``: device ``d``'s microbatch ``i`` is slice ``d`` of the
  reference's microbatch ``i``.

  Works on numpy and jax arrays alike (``x.reshape``/``swapaxes`` stay on the array's own device).
  """
  b = x.shape[0] // (num_devices * num_microbatches)
  x = x.reshape((num_microbatches, num_devices, b) + x.shape[1:])  # [m, n, b, ...]
  return x.swapaxes(0, 1)                                          # [n, m, b, ...]


class PmapBackend(pipeline_lib.Backend):
  """Replicates the model on ``n`` devices and averages gradients with ``lax.pmean``.

  The state's arrays carry a leading device axis (one replica per device), sharded over the
  devices of this process (``jax.pmap``'s multi-process convention: each process holds its own
  devices' replicas); ``to_canonical`` returns one replica, replicated over all ``n`` devices as a
  global array.
  """

  def __init__(self, model: model_lib.SequentialModel, optimizer: optax.GradientTransformation,
               options: options_lib.PipelineOptions):
    super().__init__(model, optimizer, options)
    self.devices = _devices(options)
    self.num_devices = len(self.devices)
    if jax.process_count() > 1:
      _check_process_layout(self.devices)
    self._mesh = Mesh(np.asarray(self.devices, dtype=object), (_AXIS,))
    self._local_devices = tuple(self._mesh.local_mesh.devices.flat)
    self._sharded = NamedSharding(self._mesh, P(_AXIS))        # global [n, ...]
    self._local_sharded = NamedSharding(self._mesh.local_mesh, P(_AXIS))  # this process's part
    self._feed = NamedSharding(self._mesh, placement.process_batch_spec(self._mesh))
    donate = (0, 1) if options.donate else ()
    pmap = lambda fn, **kw: jax.pmap(fn, axis_name=_AXIS, devices=self.devices, **kw)
    self._train = pmap(self._train_impl, donate_argnums=donate)
    self._grads = pmap(self._grads_impl)
    self._eval = pmap(self._eval_impl)
    n, m = self.num_devices, options.num_microbatches
    assert m is not None  # Options.__post_init__ sets it (1 when unset)
    # Global [B, ...] -> [n, m, B/(n m), ...] on the devices, in one program: across processes
    # the rows a device needs are spread over the whole global batch.
    self._arrange = jax.jit(lambda tree: jax.tree.map(lambda x: shard_batch_layout(x, n, m), tree),
                            out_shardings=self._sharded)

  # -- pure per-device pieces (run under pmap) -------------------------------------------------

  def _device_key(self, rng, step, mb):
    key = model_lib.microbatch_rng(rng, step, mb)
    if self.num_devices == 1:
      return key
    return jax.random.fold_in(key, jax.lax.axis_index(_AXIS))

  def _grads_impl(self, params, rng, step, batch):
    """Mean loss and tied, device-averaged grads; batch leaves are ``[m, b, ...]``."""
    inputs, targets = batch
    m = self.options.num_microbatches
    return step_lib.microbatch_grads(self.model, self.options.remat, params, inputs, targets,
                                     lambda i: self._device_key(rng, step, i), m,
                                     reduce=lambda t: jax.lax.pmean(t, _AXIS))

  def _train_impl(self, params, opt_state, rng, step, batch):
    loss, grads = self._grads_impl(params, rng, step, batch)
    return step_lib.canonical_train_update(self.optimizer, self.options, self.model.ties, params,
                                           opt_state, loss, grads)

  def _eval_impl(self, params, batch):
    return jax.lax.pmean(step_lib.eval_step(self.model, params, *batch), _AXIS)

  # -- placement -------------------------------------------------------------------------------

  def _check_batch(self, batch: pipeline_lib.Batch) -> int:
    size = self.global_batch_size(batch)
    n, m = self.num_devices, self.options.num_microbatches
    assert m is not None  # Options.__post_init__ sets it (1 when unset)
    if size % (n * m):
      raise ValueError(f"The pmap backend splits every one of the num_microbatches={m} "
                       f"microbatches across {n} devices, so the batch size must be a multiple of "
                       f"{n} * {m} = {n * m}; got {size}. Use a batch size that is a multiple of "
                       f"{n * m}, fewer microbatches, or fewer devices.")
    return size

  def _put_batch(self, batch: pipeline_lib.Batch) -> pipeline_lib.Batch:
    """This process's batch (its rows of the global batch) -> global ``[n, m, b, ...]`` arrays:
    device ``d``'s microbatch ``i`` is slice ``d`` of the reference's microbatch ``i``."""
    self._check_batch(batch)
    return self._arrange(placement.put_process_batch(tuple(batch), self._feed))

  def _replicate(self, tree: Any) -> Any:
    """One copy of every leaf on each of this process's devices, stacked along a leading device
    axis (the host-local arrays ``jax.pmap`` takes; in one process, all ``n`` devices)."""

    def put(x):
      x = jnp.asarray(placement.local_value(x))[None]
      shards = [jax.device_put(x, d) for d in self._local_devices]
      return jax.make_array_from_single_device_arrays(
          (len(self._local_devices),) + x.shape[1:], self._local_sharded, shards)

    return jax.tree.map(put, tree)

  def _first_replica(self, tree: Any) -> Any:
    return jax.tree.map(lambda x: x.addressable_shards[0].data[0], tree)

  def _canonical(self, tree: Any) -> Any:
    """One replica of every leaf as a global array replicated over all ``n`` devices (each
    process contributes its own devices' identical replicas; no data moves)."""
    sharding = NamedSharding(self._mesh, P())

    def one(x):
      shards = [s.data.reshape(s.data.shape[1:]) for s in x.addressable_shards]
      return jax.make_array_from_single_device_arrays(x.shape[1:], sharding, shards)

    return jax.tree.map(one, tree)

  def _step(self, state: pipeline_lib.TrainState) -> jax.Array:
    return self._replicate(jnp.int32(state.step))

  # -- Backend API -----------------------------------------------------------------------------

  def init(self, rng, batch):
    size = self._check_batch(batch)
    inputs, _ = batch
    one = placement.example_microbatch(inputs, size, self.options.num_microbatches)
    params_rng, state_rng = jax.random.split(rng)
    params = jax.jit(self.model.init)(params_rng, one)
    opt_state = jax.jit(self.optimizer.init)(params)
    return self.from_canonical({"params": params, "opt_state": opt_state, "rng": state_rng}, 0)

  def loss_and_grads(self, state, batch):
    loss, grads = self._grads(state.params, state.rng, self._step(state), self._put_batch(batch))
    return self._first_replica(loss), self._first_replica(grads)

  def train_step(self, state, batch):
    params, opt_state, metrics = self._train(state.params, state.opt_state, state.rng,
                                             self._step(state), self._put_batch(batch))
    new_state = pipeline_lib.TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                              rng=state.rng)
    return new_state, self._first_replica(metrics)

  def eval_step(self, state, batch):
    return self._first_replica(self._eval(state.params, self._put_batch(batch)))

  def params(self, state):
    """Canonical params: this process's first replica (no communication)."""
    return self._first_replica(state.params)

  def to_canonical(self, state):
    """Canonical state as global arrays replicated over all ``n`` devices (checkpoints save them
    from every process)."""
    return {"params": self._canonical(state.params),
            "opt_state": self._canonical(state.opt_state),
            "rng": self._canonical(state.rng)}

  def from_canonical(self, canonical: Mapping[str, Any], step: int):
    return pipeline_lib.TrainState(step=int(step), params=self._replicate(canonical["params"]),
                         opt_state=self._replicate(canonical["opt_state"]),
                         rng=self._replicate(canonical["rng"]))


__all__: Sequence[str] = ("PmapBackend", "default_devices", "shard_batch_layout")
