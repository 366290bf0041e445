"""Per-leaf fingerprints and finiteness of a state tree, computed where its arrays live.

A checkpoint records, for every leaf, its path, shape, dtype and a fingerprint of its bits; a
restore recomputes the fingerprints and compares. The fingerprint of a leaf is two wrapping
``uint32`` sums over its elements' bit patterns: the plain sum and the sum weighted by
``2 * flat_index + 1``. Integer sums are exact and independent of the order of summation, so the
result does not depend on the sharding, the device count or the process count, and one jitted
reduction computes it for global arrays of a multi-process run without gathering them (each
process sums its shards, the compiler adds the partial sums). Leaves that live on the devices of
some processes only (an MPMD stage's) are summed by those processes alone; one small all-gather of
the ``[leaves, 3]`` table then gives every process every row. Any change to a single element
changes both sums; a change to several is missed only if it happens to cancel in both.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class LeafSummary:
  """What a checkpoint records about one leaf (``finite`` is checked at save, not stored)."""
  path: str
  shape: tuple[int, ...]
  dtype: str
  fingerprint: tuple[int, int]
  finite: bool = True


def _bits(x: jax.Array) -> jax.Array:
  """The elements' bit patterns as ``uint32`` (8-byte and complex elements: a trailing axis)."""
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    x = jnp.stack([x.real, x.imag], axis=-1)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size < 4:
    return lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)
  return lax.bitcast_convert_type(x, jnp.uint32)


def _odd_weights(shape: tuple[int, ...]) -> jax.Array:
  """``2 * flat_index + 1`` (mod 2**32) for every element of an array of ``shape``."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.uint32, shape, dim) * np.uint32(stride)
    stride = (stride * shape[dim]) % 2**32
  return index * np.uint32(2) + np.uint32(1)


def _summaries(leaves: list) -> jax.Array:
  """``[n, 3]`` uint32: per leaf the plain sum, the weighted sum and 1 if every value is finite."""
  rows = []
  for x in leaves:
    bits = _bits(x)
    finite = (jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
              else jnp.bool_(True))
    rows.append(jnp.stack([jnp.sum(bits, dtype=jnp.uint32),
                           jnp.sum(bits * _odd_weights(bits.shape), dtype=jnp.uint32),
                           finite.astype(jnp.uint32)]))
  return jnp.stack(rows)


def _group_key(x: Any) -> Any:
  """Leaves with the same key go into one computation: their devices, in the order the compiler
  assigns them (it refuses arguments whose device orders differ); None for host values."""
  if not isinstance(x, jax.Array):
    return None
  if isinstance(x.sharding, NamedSharding):
    return tuple(x.sharding.mesh.devices.flat)
  devices = tuple(x.sharding.device_set)
  return devices if len(devices) == 1 else ("own", id(x))  # another kind: a computation of its own


def _runs_here(key: Any, leaf: Any) -> bool:
  """Whether this process takes part in the computation of group ``key`` (holds a device of it)."""
  if key is None:
    return True
  devices = leaf.sharding.device_set if key[0] == "own" else key
  me = jax.process_index()
  return any(d.process_index == me for d in devices)


@functools.lru_cache(maxsize=None)
def _jitted(devices: tuple | None) -> Any:
  """The jitted ``_summaries`` for leaves on ``devices`` (None: host values), result replicated."""
  if devices is None:
    return jax.jit(_summaries)
  mesh = Mesh(np.asarray(devices, dtype=object), ("all",))
  return jax.jit(_summaries, out_shardings=NamedSharding(mesh, P()))


def _local_rows(flat: list) -> tuple[np.ndarray, np.ndarray]:
  """``([n, 3] uint32 rows, [n] bool known)``: the rows of the leaves this process holds."""
  groups: dict[Any, list[int]] = {}
  for i, (_, leaf) in enumerate(flat):
    groups.setdefault(_group_key(leaf), []).append(i)
  rows = np.zeros((len(flat), 3), np.uint32)
  known = np.zeros(len(flat), bool)
  pending = []
  for key, members in groups.items():
    if not _runs_here(key, flat[members[0]][1]):
      continue  # the processes holding these leaves compute their rows
    fn = _jitted(None if key is None or key[0] == "own" else key)
    # One leaf per call: the compiler's temporaries (about twice the argument) stay within one
    # leaf's size instead of the whole group's (a stage's state); all calls are dispatched
    # before any result is read.
    for i in members:
      leaf = flat[i][1] if key is not None else np.asarray(flat[i][1])
      pending.append((i, fn([leaf])))
  for i, out in pending:
    if not out.is_fully_replicated:
      raise ValueError(f"Cannot fingerprint leaves with sharding {flat[i][1].sharding}.")
    rows[i] = np.asarray(out.addressable_data(0))[0]
    known[i] = True
  return rows, known


def _everyones_rows(rows: np.ndarray, known: np.ndarray) -> np.ndarray:
  """Every leaf's row, from a process that computed it (a collective in a multi-process run)."""
  if jax.process_count() == 1:
    return rows
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  all_rows = np.asarray(multihost_utils.process_allgather(rows))        # [P, n, 3]
  all_known = np.asarray(multihost_utils.process_allgather(known.astype(np.int32)))  # [P, n]
  if not np.all(all_known.any(axis=0)):
    missing = int(np.flatnonzero(~all_known.any(axis=0))[0])
    raise ValueError(f"Leaf {missing} has no device on any process; cannot fingerprint it.")
  first = np.argmax(all_known, axis=0)                                  # [n]
  return all_rows[first, np.arange(rows.shape[0])]


def summarize(tree: Any) -> list[LeafSummary]:
  """Path, shape, dtype, fingerprint and finiteness of every leaf of ``tree``, in flatten order.

  Leaves are host values or ``jax.Array`` s (global arrays included, on the devices of any subset
  of the processes). One jitted reduction runs per leaf, on the devices the leaf lives on (by the
  processes that hold it); nothing is gathered or copied between devices, and the temporaries
  stay within about twice one leaf's shard. In a
  multi-process run every process must call this with the same tree (a collective: the rows are
  exchanged with one small all-gather).
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  rows = _everyones_rows(*_local_rows(flat))
  summaries = []
  for (path, leaf), row in zip(flat, rows):
    summaries.append(LeafSummary(path=jax.tree_util.keystr(path), shape=tuple(np.shape(leaf)),
                                 dtype=str(np.dtype(leaf.dtype)),
                                 fingerprint=(int(row[0]), int(row[1])), finite=bool(row[2])))
  return summaries


def describe(tree: Any) -> list[tuple[str, tuple[int, ...], str]]:
  """Path, shape and dtype of every leaf (leaves may be abstract), in flatten order."""
  return [(jax.tree_util.keystr(path), tuple(np.shape(leaf)), str(np.dtype(leaf.dtype)))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def to_json(summaries: Sequence[LeafSummary]) -> dict:
  """The record a checkpoint stores (JSON-serialisable)."""
  return {"format": _FORMAT, "leaves": [[s.path, list(s.shape), s.dtype, *s.fingerprint]
                                        for s in summaries]}


def from_json(record: Any) -> list[LeafSummary]:
  """The summaries of a stored record.

  Raises:
    ValueError: the record is not one this version wrote.
  """
  if not isinstance(record, dict) or record.get("format") != _FORMAT:
    raise ValueError(f"unknown integrity record format: {str(record)[:200]}")
  return [LeafSummary(path=str(p), shape=tuple(int(d) for d in shape), dtype=str(dtype),
                      fingerprint=(int(a), int(b)))
          for p, shape, dtype, a, b in record["leaves"]]


def layout_mismatches(saved: Sequence[LeafSummary], target: Any) -> list[str]:
  """One line per leaf whose path, shape or dtype differs between ``saved`` and ``target``."""
  want = {path: (shape, dtype) for path, shape, dtype in describe(target)}
  have = {s.path: (s.shape, s.dtype) for s in saved}
  lines = []
  paths = list(have) + [p for p in want if p not in have]
  for path in sorted(paths, key=lambda p: not p.startswith("['params']")):  # parameters first
    old, new = have.get(path), want.get(path)
    if old != new:
      fmt = lambda v: "absent" if v is None else f"{v[1]}{list(v[0])}"
      lines.append(f"{path}: {fmt(old)} in the checkpoint, {fmt(new)} here")
  return lines


def changed_leaves(saved: Sequence[LeafSummary], now: Sequence[LeafSummary]) -> list[str]:
  """Paths of the leaves whose fingerprint differs (``now`` from :func:`summarize`)."""
  stored = {s.path: s.fingerprint for s in saved}
  return [s.path for s in now if stored.get(s.path) != s.fingerprint]
