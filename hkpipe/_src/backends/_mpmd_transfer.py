"""Cross-process point-to-point transfers of the MPMD driver (``jax.experimental.transfer``).

When pipeline ranks live on devices of different processes (a ``jax.distributed`` run), each
process drives only the actions of its own ranks, and every value that moves between ranks of two
processes goes through a *transfer server* (one per process):

- the sender posts the arrays under an integer uuid, ``server.await_pull(uuid, shards)``: non
  blocking, the arrays may still be computing;
- the receiver pulls them, ``connection.pull(uuid, specs)``: non blocking too (a pull issued
  before the post waits for it); the result becomes ready when the data has arrived.

Matching is by uuid only, in any order, so no process has to agree on an issue order with another:
the uuid of every message is derived on both sides from the same pure data (see :func:`uuid`), and
a mismatch can only make a pull wait (or fail on a shape mismatch), never deliver wrong data.

Arrays cross as their per-device shards (a ``[dp]``-device array sends ``dp`` single-device
shards, in the order of their index in the global array) and are reassembled on the receiver with
``jax.make_array_from_single_device_arrays``: the transfer server is only verified for
single-device arrays (docs/design/multiprocess.md, section 2b).

Failures: when the peer process dies, its pending pulls fail at once (``Connection closed``). A
watcher thread waits on every pulled array and records the first failure; the driver raises it as
a :class:`TransferError` at the start of its next call. Reading a result derived from a failed
pull (``float(metrics["loss"])``) raises the runtime's error directly (the watcher also prints the
clear message to stderr at once), and the distributed runtime's heartbeat ends the process within
``heartbeat_timeout_seconds`` anyway.

The transport is one per process (a listening server bound to the process): :func:`transport`
creates it lazily after ``jax.distributed`` is initialised and returns the same object afterwards.
"""

from __future__ import annotations

import functools
import hashlib
import queue
import socket
import sys
import threading
from typing import Any, Sequence

import jax
from jax._src import distributed as jax_distributed  # pylint: disable=g-bad-import-order
from jax.sharding import SingleDeviceSharding

from hkpipe.schedules import _engine

_KV_PREFIX = "hkpipe/mpmd/transfer_server"
_ADDRESS_TIMEOUT_MS = 60_000      # every process starts its server within the init timeout


class TransferError(RuntimeError):
  """A cross-process transfer failed (typically: the peer process died)."""


def uuid(namespace: int, call: int, key: tuple) -> int:
  """The transfer id of message ``key`` in driver call ``call`` of backend ``namespace``.

  A 63-bit BLAKE2b digest of the (deterministic) ``repr`` of its inputs: equal on every process
  (unlike Python's salted ``hash``), unique per message for all practical purposes (the chance
  that two of a million live messages collide is about 1e-7).

  Args:
    namespace: the backend's number in this process (equal on every process when every
      process creates its multi-process pipelines in the same order).
    call: the backend's driver-call counter (every process advances it on every call).
    key: what the message is, e.g. ``("F", stage, microbatch)`` (``schedules`` engine's
      ``message_key``: the activation of ``stage``); ints and strings only.
  """
  digest = hashlib.blake2b(repr((namespace, call, key)).encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") >> 1


_NOUNS = {"F": "activations", "G": "cotangents", "tie": "tied-weight gradients",
          "sq": "the squared gradient norm", "scale": "the global squared gradient norm",
          "metrics": "the step's loss and gradient norm"}


def describe(key: tuple, src_rank: int, process: int) -> str:
  """What message ``key`` is, for people: ``"cotangents of microbatch 3 for stage 0 from rank 1
  (process 1)"`` (``src_rank``, ``process``: the sender)."""
  kind = key[0]
  if kind in ("F", "G"):         # the engine's message_key: (what, producer stage, microbatch)
    what = f"{_NOUNS[kind]} of microbatch {key[2]} for stage {key[1] + _engine.FLOW[kind]}"
  elif kind == "tie":
    what = f"{_NOUNS[kind]} for stage {key[1]}"
  elif kind == "sq":
    what = f"{_NOUNS[kind]} of stage {key[1]}"
  elif kind == "scale":
    what = f"{_NOUNS[kind]} for rank {key[1]}"
  else:
    what = _NOUNS.get(kind, f"{kind} {key[1:]}")
  return f"{what} from rank {src_rank} (process {process})"


def _index_key(index: tuple) -> tuple:
  return tuple((sl.start or 0) if isinstance(sl, slice) else 0 for sl in index)


def ordered_shards(x: jax.Array) -> list:
  """The addressable single-device shards of ``x``, ordered by their index in ``x``.

  Replicated shards (equal indices) keep the runtime's order; their contents are equal.
  """
  shards = sorted(x.addressable_shards, key=lambda s: _index_key(s.index))
  return [s.data for s in shards]


def ordered_devices(sharding: Any, shape: Sequence[int]) -> list:
  """The devices of ``sharding`` ordered as :func:`ordered_shards` orders the shards."""
  indices = sharding.devices_indices_map(tuple(shape))
  return sorted(indices, key=lambda d: _index_key(indices[d]))


@functools.lru_cache(maxsize=4096)
def shard_specs(spec: jax.ShapeDtypeStruct) -> tuple[jax.ShapeDtypeStruct, ...]:
  """Per device of ``spec.sharding`` (in :func:`ordered_devices` order), the shard to pull.

  Memoised: a driver pulls the same few specs every step.
  """
  shape = spec.sharding.shard_shape(tuple(spec.shape))
  return tuple(jax.ShapeDtypeStruct(shape, spec.dtype, sharding=SingleDeviceSharding(d))
               for d in ordered_devices(spec.sharding, spec.shape))


def remote_array(spec: jax.ShapeDtypeStruct) -> jax.Array:
  """A global array with no shard on this process (a stand-in for another process's data).

  Has the shape, dtype and sharding of ``spec`` (devices of another process), so pytrees of a
  multi-process state have the same structure on every process and checkpoint libraries see the
  global layout.
  """
  return jax.make_array_from_single_device_arrays(tuple(spec.shape), spec.sharding, [],
                                                  dtype=spec.dtype)


def _host_address(coordinator: str | None) -> str:
  """This host's address as the coordinator sees it (the interface that routes to it).

  On one machine (coordinator ``127.0.0.1``) that is ``127.0.0.1``; across machines, the local
  address of the route to the coordinator, so that peers can connect to this server.
  """
  if not coordinator:
    return "127.0.0.1"
  host = coordinator.rsplit(":", 1)[0].strip("[]")
  if host in ("127.0.0.1", "localhost", "::1"):
    return "127.0.0.1"
  try:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
      s.connect((host, 1))          # no packet is sent: this only picks the route
      return str(s.getsockname()[0])
  except OSError:
    return "127.0.0.1"


class Transport:
  """This process's transfer server, its connections to peers and a failure watcher.

  Args:
    process_index: this process (``jax.process_index()``).
    kv_client: the ``jax.distributed`` key-value client used to exchange server addresses.
  """

  def __init__(self, process_index: int, kv_client: Any):
    from jax.experimental import transfer  # pylint: disable=g-import-not-at-top
    self.process_index = process_index
    self._kv = kv_client
    client = jax.local_devices()[0].client
    host = _host_address(getattr(jax_distributed.global_state, "coordinator_address", None))
    self._server = transfer.start_transfer_server(client, f"{host}:0", [f"{host}:0"])
    kv_client.key_value_set(f"{_KV_PREFIX}/{process_index}", self._server.address())
    self._conns: dict[int, Any] = {}
    self._lock = threading.Lock()
    self._namespaces = 0
    self._error: TransferError | None = None
    self._watch: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=self._watcher, name="hkpipe-transfer-watch", daemon=True).start()

  def new_namespace(self) -> int:
    """A number for a new multi-process backend (the n-th one created in this process)."""
    with self._lock:
      self._namespaces += 1
      return self._namespaces

  def _conn(self, process: int) -> Any:
    conn = self._conns.get(process)
    if conn is None:
      try:
        address = self._kv.blocking_key_value_get(f"{_KV_PREFIX}/{process}",
                                                  _ADDRESS_TIMEOUT_MS)
      except Exception as e:  # pylint: disable=broad-except
        raise TransferError(f"Process {process} did not publish its transfer server address "
                            f"within {_ADDRESS_TIMEOUT_MS / 1000:.0f} s (is it running the same "
                            f"pipeline?): {e}") from e
      conn = self._conns[process] = self._server.connect(address)
    return conn

  def post(self, uid: int, arrays: Sequence[jax.Array], first_shard_only: bool = False) -> None:
    """Offers ``arrays`` (as their shards) to whichever process pulls ``uid``; non blocking.

    Args:
      uid: the message id (see :func:`uuid`).
      arrays: arrays with all their shards on this process. They must not be donated before
        the peer has pulled them (post a copy if a later program donates them).
      first_shard_only: send one shard per array (its values must be replicated), for a
        receiver that wants the value on a single device.
    """
    shards = []
    for x in arrays:
      parts = ordered_shards(x)
      shards.extend(parts[:1] if first_shard_only else parts)
    self._server.await_pull(uid, shards)

  def pull(self, process: int, uid: int, specs: Sequence[jax.ShapeDtypeStruct],
           what: str, progress: Any = None, label: tuple[str, str] | None = None
           ) -> list[jax.Array]:
    """Requests message ``uid`` from ``process``; returns its arrays at once (not ready yet).

    Args:
      process: the sending process.
      uid: the message id.
      specs: per array: shape, dtype and the sharding it gets here. Its devices must number
        the sender's shards (or one, for ``first_shard_only`` posts).
      what: a description for error messages.
      progress: a ``watchdog.Progress``: while the watcher waits for this message it sets
        ``progress.awaiting`` to ``(progress.step, *label)`` and counts ``progress.received``.
      label: ``(receiver, message)`` texts for the watchdog (see :func:`describe`); default
        from ``what`` and ``process``.
    """
    self.check()
    per = [shard_specs(s) for s in specs]
    flat = [p for group in per for p in group]
    try:
      shards = self._conn(process).pull(uid, flat)
    except Exception as e:  # pylint: disable=broad-except
      raise TransferError(f"Pulling {what} from process {process} failed: {e}") from e
    out, i = [], 0
    for spec, group in zip(specs, per):
      part = list(shards[i:i + len(group)])
      i += len(group)
      if len(part) == 1 and isinstance(spec.sharding, SingleDeviceSharding):
        out.append(part[0])
      else:
        out.append(jax.make_array_from_single_device_arrays(tuple(spec.shape), spec.sharding,
                                                            part))
    if progress is not None:
      label = label or (f"process {self.process_index}", f"{what} from process {process}")
      self._watch.put((shards, process, what, progress, (progress.step, *label)))
    else:
      self._watch.put((shards, process, what, None, None))
    return out

  def _watcher(self) -> None:
    while True:
      shards, process, what, progress, awaiting = self._watch.get()
      try:
        if progress is not None:
          progress.awaiting = awaiting
        jax.block_until_ready(shards)
        if progress is not None:
          progress.received += 1
          progress.awaiting = None
      except Exception as e:  # pylint: disable=broad-except
        if self._error is None:
          self._error = TransferError(
              f"Receiving {what} from process {process} failed (did process {process} die?): "
              f"{e}")
          # Said at once: the main thread may meet the raw runtime error first (reading a
          # metric computed from the failed transfer) and exit without another driver call.
          print(f"hkpipe MPMD: {self._error}", file=sys.stderr, flush=True)

  def check(self) -> None:
    """Raises the first recorded transfer failure, if any."""
    if self._error is not None:
      raise self._error


@functools.cache
def transport() -> Transport:
  """This process's :class:`Transport` (created on first use; needs ``jax.distributed``)."""
  client = getattr(jax_distributed.global_state, "client", None)
  if client is None:
    raise RuntimeError("Multi-process MPMD needs jax.distributed: call "
                       "hkpipe._src.distributed.initialize(...) (launch/train.py does) in every "
                       "process before building the pipeline.")
  return Transport(jax.process_index(), client)
