"""Moving a value from one stage's devices to another stage's devices, in or across processes.

Decoding and evaluation on a pipeline's own stages (:mod:`hkpipe._src.pipelined_decode`,
:mod:`hkpipe._src.staged_eval`) walk the stages in model order and hand each stage's outputs to
the next one. In one process that is a ``jax.device_put``. Across processes (``jax.distributed``:
each stage's devices belong to one process, its *owner*) every process walks the same loop, runs
the stages it owns and skips the others, and a value whose two stages have different owners goes
through the processes' transfer servers (:mod:`hkpipe._src.backends._mpmd_transfer`, as the MPMD
training driver's activations do): the sender copies it to its stage's first device and posts it,
the receiver pulls it onto its stage's first device, waits for it, and places it.

Every process must make the same sequence of :meth:`Link.move` calls (keys included): a message's
id comes from the backend's namespace, the call number (equal on every process: the backend
counts its calls) and the key. The receiver waits for each pulled value before it dispatches a
program that reads it: a program dispatched on data still in flight holds one of the CPU
runtime's few dispatch slots while it waits, and slots held that way on both processes stop them
(docs/mpmd.md, "Across processes").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
from jax.sharding import SingleDeviceSharding

from hkpipe._src.backends import _mpmd_transfer as xfer_lib


@dataclasses.dataclass(frozen=True)
class Channel:
  """One call's message ids across processes: ``xfer_lib.uuid(namespace, call, key)``.

  Attributes:
    transport: this process's transfer server and connections.
    namespace: the backend's number (equal on every process).
    call: the backend's call number (equal on every process).
  """

  transport: Any
  namespace: int
  call: int

  def uid(self, key: tuple) -> int:
    """The id of message ``key`` of this call."""
    return xfer_lib.uuid(self.namespace, self.call, key)


@dataclasses.dataclass(frozen=True)
class Link:
  """Which process owns each stage, and how values move between stages.

  Attributes:
    stage_devices: per stage, the devices it runs on (its rank's devices, in order).
    process: this process's index.
    channel: the message ids of this call across processes; None in one process.
  """

  stage_devices: tuple[tuple[Any, ...], ...]
  process: int = 0
  channel: Channel | None = None

  @property
  def across(self) -> bool:
    """Whether the stages live on more than one process."""
    return self.channel is not None

  def owner(self, stage: int) -> int:
    """The process whose devices run ``stage``."""
    return int(self.stage_devices[stage][0].process_index)

  def owns(self, stage: int) -> bool:
    """Whether this process runs ``stage``."""
    return self.owner(stage) == self.process

  def move(self, key: tuple, x: Any, src: int, dst: int, sharding: Any,
           avals: Any = None) -> Any:
    """Stage ``src``'s value ``x`` placed for stage ``dst`` with ``sharding``.

    Args:
      key: the message's name (ints and strings), unique within this call.
      x: the value on ``src``'s devices (anything where this process does not own ``src``).
      src: the stage that computed ``x``.
      dst: the stage that reads it.
      sharding: where ``dst`` wants it (used where this process owns ``dst``).
      avals: ``x``'s shapes and dtypes (a pytree of ``jax.ShapeDtypeStruct``): needed where this
        process owns ``dst`` but not ``src``.

    Returns:
      ``x`` on ``sharding`` where this process owns ``dst``; None elsewhere (posted to
      ``dst``'s owner where this process owns ``src``).
    """
    mine, theirs = self.owns(src), self.owns(dst)
    if mine and theirs:
      return jax.device_put(x, sharding)
    if mine:
      self._post(key, x, self.stage_devices[src][0])
      return None
    if theirs:
      return jax.device_put(self._pull(key, avals, self.owner(src), self.stage_devices[dst][0]),
                            sharding)
    return None

  def share(self, key: tuple, x: Any, src: int, avals: Any) -> Any:
    """Stage ``src``'s value ``x`` on every process (on this process's first local device
    elsewhere than ``src``'s owner); ``x`` as it is on the owner."""
    if not self.across:
      return x
    if self.owns(src):
      for q in range(jax.process_count()):
        if q != self.process:
          self._post(key + (q,), x, self.stage_devices[src][0])
      return x
    return self._pull(key + (self.process,), avals, self.owner(src), jax.local_devices()[0])

  def _post(self, key: tuple, x: Any, device: Any) -> None:
    assert self.channel is not None, "a value crosses processes only in a multi-process run"
    leaves = jax.tree.leaves(x)
    # A copy on one device: one shard per leaf, never donated before the peer pulls it.
    one = jax.device_put(leaves, [device] * len(leaves), may_alias=False)
    self.channel.transport.post(self.channel.uid(key), one)

  def _pull(self, key: tuple, avals: Any, process: int, device: Any) -> Any:
    assert self.channel is not None, "a value crosses processes only in a multi-process run"
    if avals is None:
      raise ValueError(f"Link.move of {key} into this process needs the value's avals.")
    leaves, treedef = jax.tree.flatten(avals)
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=SingleDeviceSharding(device))
             for a in leaves]
    got = self.channel.transport.pull(process, self.channel.uid(key), specs, what=f"{key}")
    jax.block_until_ready(got)   # never dispatch a program on a value still in flight
    return jax.tree.unflatten(treedef, got)


def of_layout(layout: Any, channel: Channel | None) -> Link:
  """The link of a pipeline ``layout``'s stages (their rank's devices), with the backend's
  ``stage_channel()`` (None in one process)."""
  devices = tuple(tuple(layout.stage_devices(s)) for s in range(len(layout.stages)))
  return Link(devices, jax.process_index(), channel)


def local(stage_devices: Sequence[Sequence[Any]]) -> Link:
  """The link of stages that all live in this process."""
  return Link(tuple(tuple(d) for d in stage_devices), jax.process_index(), None)


def abstract(tree: Any) -> Any:
  """``tree``'s arrays as ``jax.ShapeDtypeStruct`` s (shape and dtype only)."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def is_abstract(tree: Any) -> bool:
  """Whether ``tree`` holds no array data here (another process's stage)."""
  return all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(tree))
