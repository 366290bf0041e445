"""Packing heterogeneous pytrees into fixed-size buffers for the SPMD backend.

Under ``shard_map`` every ``pp`` rank runs the same program on arrays of the same local shape, but
pipeline stages differ in parameter structure and boundary activation shape/dtype. Two codecs bridge
that gap:

- :class:`ByteCodec` packs any pytree (floats of any width, ints, bools, PRNG keys) into a flat
  ``uint8`` vector by bit-casting; it is used for the boundary activations and cotangents that
  travel between ranks (one ``ppermute`` buffer), padded to the largest boundary.
- :class:`FlatLayout` packs a pytree into one flat vector *per dtype* (no bit-casting), so that
  gradients can be accumulated and optimizers applied on the packed form; it is used for
  parameters, gradients and optimizer state (padded per dtype to the largest rank), and, one slot
  per stashed forward, for the backward stashes (see :func:`slot_arena`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Bufs = dict[str, jax.Array]  # dtype name -> flat vector


def _is_key(dtype: Any) -> bool:
  return jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _is_float0(dtype: Any) -> bool:
  return dtype == jax.dtypes.float0


def _aval(x: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype)


def cotangent_aval(aval: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
  """The aval of a cotangent for ``aval``: itself for floats, ``float0`` otherwise."""
  if jnp.issubdtype(aval.dtype, jnp.inexact):
    return aval
  return jax.ShapeDtypeStruct(aval.shape, jax.dtypes.float0)


def word_aval(aval: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
  """The plain array a leaf is stored as: key data for PRNG keys, uint8 for bools."""
  if _is_key(aval.dtype):
    return jax.eval_shape(jax.random.key_data, aval)
  if aval.dtype == jnp.bool_:
    return jax.ShapeDtypeStruct(aval.shape, jnp.uint8)
  return aval


def to_word(x: jax.Array) -> jax.Array:
  if _is_key(x.dtype):
    return jax.random.key_data(x)
  return x.astype(jnp.uint8) if x.dtype == jnp.bool_ else x


def from_word(w: jax.Array, aval: jax.ShapeDtypeStruct) -> jax.Array:
  if _is_key(aval.dtype):
    return jax.random.wrap_key_data(w, dtype=aval.dtype)
  return w != 0 if aval.dtype == jnp.bool_ else w


def _vector_to_bytes(v: jax.Array) -> jax.Array:
  if v.dtype == jnp.uint8:
    return v
  return jax.lax.bitcast_convert_type(v, jnp.uint8).reshape(-1)  # [n, itemsize] -> [n * itemsize]


def _bytes_to_vector(raw: jax.Array, dtype: Any) -> jax.Array:
  size = jnp.dtype(dtype).itemsize
  if size == 1:
    return raw if dtype == jnp.uint8 else jax.lax.bitcast_convert_type(raw, dtype)
  return jax.lax.bitcast_convert_type(raw.reshape(-1, size), dtype)


@dataclasses.dataclass(frozen=True)
class ByteCodec:
  """Packs a pytree with fixed leaf avals into (a prefix of) a flat ``uint8`` buffer.

  Leaves are grouped by storage dtype; each group is concatenated and bit-cast once, so packing
  costs one concatenation and one bit-cast per dtype, whatever the number of leaves.

  Attributes:
    treedef: the pytree structure.
    avals: leaf avals, in flattening order.
    groups: per storage dtype, ``(dtype name, byte offset, element count, leaf indices)``.
    nbytes: total bytes (the buffer may be longer: padding).
  """

  treedef: Any
  avals: tuple[jax.ShapeDtypeStruct, ...]
  groups: tuple[tuple[str, int, int, tuple[int, ...]], ...]
  nbytes: int

  @classmethod
  def of(cls, tree: Any) -> "ByteCodec":
    """Codec for a pytree of arrays or ``ShapeDtypeStruct``s."""
    leaves, treedef = jax.tree.flatten(tree)
    avals = tuple(_aval(l) for l in leaves)
    by_dtype: dict[str, list[int]] = {}
    for i, a in enumerate(avals):
      if not _is_float0(a.dtype) and math.prod(a.shape):
        by_dtype.setdefault(jnp.dtype(word_aval(a).dtype).name, []).append(i)
    groups, total = [], 0
    for name in sorted(by_dtype):
      idx = tuple(by_dtype[name])
      count = sum(int(math.prod(word_aval(avals[i]).shape)) for i in idx)
      groups.append((name, total, count, idx))
      total += count * jnp.dtype(name).itemsize
    return cls(treedef, avals, tuple(groups), total)

  def pack(self, tree: Any, size: int) -> jax.Array:
    """``uint8[size]`` holding the tree's bytes followed by zero padding."""
    if size < self.nbytes:
      raise ValueError(f"Buffer of {size} bytes is too small for {self.nbytes} bytes.")
    leaves = self.treedef.flatten_up_to(tree)
    parts = []
    for _, _, _, idx in self.groups:
      words = [jnp.reshape(to_word(leaves[i]), (-1,)) for i in idx]
      parts.append(_vector_to_bytes(jnp.concatenate(words) if len(words) > 1 else words[0]))
    if size > self.nbytes:
      parts.append(jnp.zeros((size - self.nbytes,), jnp.uint8))
    if not parts:
      return jnp.zeros((0,), jnp.uint8)
    return jnp.concatenate(parts) if len(parts) > 1 else parts[0]

  def unpack(self, buf: jax.Array) -> Any:
    """Inverse of :meth:`pack` (ignores the padding)."""
    leaves: list[Any] = [None] * len(self.avals)
    for name, off, count, idx in self.groups:
      nbytes = count * jnp.dtype(name).itemsize
      vec = _bytes_to_vector(jax.lax.slice(buf, (off,), (off + nbytes,)), jnp.dtype(name))
      pos = 0
      for i in idx:
        word = word_aval(self.avals[i])
        n = int(math.prod(word.shape))
        leaves[i] = from_word(jax.lax.slice(vec, (pos,), (pos + n,)).reshape(word.shape),
                               self.avals[i])
        pos += n
    for i, a in enumerate(self.avals):
      if leaves[i] is None:  # float0 or empty leaves
        word = word_aval(a)
        leaves[i] = (np.zeros(a.shape, jax.dtypes.float0) if _is_float0(a.dtype)
                     else from_word(jnp.zeros(word.shape, word.dtype), a))
    return self.treedef.unflatten(leaves)


def dtype_key(dtype: Any) -> str:
  """Name of the per-dtype buffer a leaf of ``dtype`` lives in."""
  return jnp.dtype(dtype).name


@dataclasses.dataclass(frozen=True)
class FlatLayout:
  """Places a pytree's leaves into one flat vector per dtype, starting at per-dtype bases.

  Several layouts can share buffers (e.g. a rank's stages, one after another): give each the
  previous one's :attr:`ends` as ``base``.

  Attributes:
    treedef: the pytree structure.
    avals: leaf avals, in flattening order.
    slots: per leaf, ``(dtype key, offset, size)``.
    base: per dtype key, the first offset this layout uses.
    ends: per dtype key, one past the last offset this layout uses (``>= base``).
    align: every slot starts at a multiple of it and takes a multiple of it (its size rounded
      up): the column layout of ``_columns`` (1: packed back to back).
  """

  treedef: Any
  avals: tuple[jax.ShapeDtypeStruct, ...]
  slots: tuple[tuple[str, int, int], ...]
  base: Mapping[str, int]
  ends: Mapping[str, int]
  align: int = 1

  @classmethod
  def of(cls, tree: Any, base: Mapping[str, int] | None = None, align: int = 1
         ) -> "FlatLayout":
    """Layout for a pytree of arrays or ``ShapeDtypeStruct``s (``align``: see the class; bases
    must then be multiples of it)."""
    leaves, treedef = jax.tree.flatten(tree)
    avals = tuple(_aval(l) for l in leaves)
    base = dict(base or {})
    ends = dict(base)
    slots = []
    for a in avals:
      if _is_float0(a.dtype):
        raise ValueError(f"FlatLayout cannot hold leaves of dtype {a.dtype}.")
      word = word_aval(a)
      k = dtype_key(word.dtype)
      off = ends.setdefault(k, 0)
      if off % align:
        raise ValueError(f"Base offset {off} of {k} is not a multiple of align={align}.")
      size = int(math.prod(word.shape))
      slots.append((k, off, size))
      ends[k] = off + -(-size // align) * align
    for k in ends:
      base.setdefault(k, 0)
    return cls(treedef, avals, tuple(slots), base, ends, align)

  def leaf_index(self, path: Sequence[Any]) -> int:
    """Flattening index of the leaf at ``path`` (a sequence of dict keys / sequence indices)."""
    paths = [tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p)
             for p, _ in jax.tree_util.tree_flatten_with_path(
                 self.treedef.unflatten(list(range(len(self.avals)))))[0]]
    want = tuple(path)
    if want not in paths:
      raise KeyError(f"No leaf at {want}; leaves are at {paths}.")
    return paths.index(want)

  def _plain(self) -> None:
    if self.align != 1:
      raise ValueError("An aligned FlatLayout is read and written through _columns.Columns.")

  def _groups(self, tree: Any) -> list[tuple[str, int, jax.Array]]:
    """Per dtype key: (key, first offset, the tree's leaves of that dtype concatenated)."""
    self._plain()
    leaves = self.treedef.flatten_up_to(tree)
    out = []
    for k in sorted({s[0] for s in self.slots}):
      idx = [i for i, s in enumerate(self.slots) if s[0] == k]
      parts = [jnp.reshape(to_word(leaves[i]), (-1,)).astype(k) for i in idx]
      out.append((k, self.slots[idx[0]][1], jnp.concatenate(parts)))
    return out

  def pack_into(self, bufs: Bufs, tree: Any, *, add: bool = False) -> Bufs:
    """Writes (or, with ``add``, accumulates) the tree into ``bufs`` at this layout's offsets."""
    out = dict(bufs)
    for k, start, flat in self._groups(tree):
      if add:
        flat = jax.lax.dynamic_slice_in_dim(out[k], start, flat.shape[0]) + flat
      out[k] = jax.lax.dynamic_update_slice_in_dim(out[k], flat, start, 0)
    return out

  def unpack(self, bufs: Bufs) -> Any:
    """Reads the tree back from ``bufs``."""
    self._plain()
    leaves = [from_word(jax.lax.slice(bufs[k], (off,), (off + size,))
                        .reshape(word_aval(a).shape), a)
              for (k, off, size), a in zip(self.slots, self.avals)]
    return self.treedef.unflatten(leaves)

  def write_slot(self, bufs: Bufs, tree: Any, slot: jax.Array, strides: Mapping[str, int]
                 ) -> Bufs:
    """Writes the tree into slot ``slot`` (traced) of 1-D buffers cut into slots of
    ``strides[dtype]`` elements (slot ``i`` starts at ``i * stride``)."""
    out = dict(bufs)
    slot = slot.astype(jnp.int32)
    for k, start, flat in self._groups(tree):
      out[k] = jax.lax.dynamic_update_slice_in_dim(out[k], flat, slot * strides[k] + start, 0)
    return out

  def read_slot(self, bufs: Bufs, slot: jax.Array, strides: Mapping[str, int]) -> Any:
    """Reads the tree back from slot ``slot`` (traced) of :meth:`write_slot`'s buffers."""
    self._plain()
    slot = slot.astype(jnp.int32)
    leaves = [from_word(jax.lax.dynamic_slice_in_dim(bufs[k], slot * strides[k] + off, size)
                         .reshape(word_aval(a).shape), a)
              for (k, off, size), a in zip(self.slots, self.avals)]
    return self.treedef.unflatten(leaves)


def slot_arena(layouts_per_rank: Sequence[Sequence[FlatLayout]], slots_per_rank: Sequence[int]
               ) -> tuple[tuple[dict[str, int], ...], dict[str, int]]:
  """Per-rank slot strides and the shared 1-D buffer length of a slotted store (the stash).

  Rank ``r`` keeps ``slots_per_rank[r]`` slots, each as large as its own largest layout (its
  stride), so a rank with small stages or few slots does not pay for another rank's: the buffer
  (every rank allocates the same) holds ``max_r slots_r * stride_r`` elements per dtype, instead of
  ``max_r slots_r * max_r stride_r``.

  Returns:
    ``(strides, sizes)``: per rank, per dtype key, the slot stride; per dtype key, the buffer
    length (at least 1).
  """
  strides = tuple(padded_sizes(lays) if lays else {} for lays in layouts_per_rank)
  keys = sorted({k for st in strides for k in st})
  full = tuple({k: st.get(k, 0) for k in keys} for st in strides)
  sizes = {k: max([1] + [n * st[k] for n, st in zip(slots_per_rank, full)]) for k in keys}
  return full, sizes


def padded_sizes(layouts: Sequence[FlatLayout]) -> dict[str, int]:
  """Per dtype key, the buffer length holding the largest of ``layouts`` (at least 1)."""
  sizes: dict[str, int] = {}
  for lay in layouts:
    for k, end in lay.ends.items():
      sizes[k] = max(sizes.get(k, 1), end)
  return sizes


def zeros(sizes: Mapping[str, int]) -> Bufs:
  """Zero buffers of the given per-dtype sizes."""
  return {k: jnp.zeros((n,), k) for k, n in sizes.items()}
