"""A rank's packed state as columns split over its ``("fsdp", "tp")`` devices (ZeRO-3 layout).

With ``z = fsdp x tp`` devices per rank, each per-dtype buffer of length ``n`` (a multiple of
``z``) is read as a ``[z, n / z]`` **view** whose row ``d`` is device ``d``'s piece (the buffer's
``PartitionSpec("pp", ("fsdp", "tp"))`` split). Every leaf of a layout built with
``FlatLayout.of(tree, align=z)`` starts at a multiple of ``z`` and spans ``c = ceil(size / z)``
whole **columns** of the view: its flattened values, zero-padded to ``z x c``, fill them row by
row. So device ``d`` holds the ``d``-th ``1/z`` of *every* leaf, and any set of leaves (one stage,
one layer, one layer's optimizer moments) is gathered whole by one ``all_gather`` of the
matching columns of the pieces, and its gradients are reduced onto their owners by one
``psum_scatter``; nothing else of the rank needs to be whole at the same time.

With ``z == 1`` the view is ``[1, n]`` and the layout is the plain ``FlatLayout`` one.

:class:`Columns` selects leaves of a layout and moves them between trees and:

- whole views ``{dtype: [z, n / z]}`` (packing and unpacking a rank's rows: ``read``/``write``);
- a shard's pieces ``{dtype: [r, n / z]}`` inside ``shard_map`` (``gather``, ``scatter_add``,
  ``write_own``): ``r = 1`` when the step is manual over ``("fsdp", "tp")``, ``r = tp`` when
  ``tp`` is left to the compiler (tensor-parallel compute).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from hkpipe._src import canonical as canonical_lib
from hkpipe._src.backends.spmd import _pack as pack

Bufs = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Columns:
  """Some leaves of an aligned ``FlatLayout``, as runs of columns of the ``[z, n / z]`` view.

  Attributes:
    treedef: structure of the selected tree.
    avals: the selected leaves' avals, in ``treedef`` order.
    z: the view's rows (the layout's ``align``).
    groups: per dtype key ``(key, runs, leaves)``: ``runs`` are ``(first column, width)`` of
      contiguous columns, in column order; ``leaves`` are ``(leaf index in avals, position in the
      runs' concatenation, columns, size)``.
  """

  treedef: Any
  avals: tuple[jax.ShapeDtypeStruct, ...]
  z: int
  groups: tuple[tuple[str, tuple[tuple[int, int], ...], tuple[tuple[int, int, int, int], ...]],
                ...]

  @classmethod
  def of(cls, lay: pack.FlatLayout, ids: Sequence[int] | None = None,
         treedef: Any = None) -> "Columns":
    """Leaves ``ids`` of ``lay`` (default: all), unflattened by ``treedef`` (default: ``lay``'s)."""
    z = lay.align
    ids = list(range(len(lay.avals))) if ids is None else list(ids)
    by_key: dict[str, list[tuple[int, int, int, int]]] = {}
    for i, j in enumerate(ids):
      k, off, size = lay.slots[j]
      by_key.setdefault(k, []).append((i, off // z, -(-size // z), size))
    groups = []
    for k in sorted(by_key):
      runs: list[tuple[int, int]] = []
      leaves, pos = [], 0
      for i, col, c, size in sorted(by_key[k], key=lambda t: t[1]):
        if runs and sum(runs[-1]) == col:
          runs[-1] = (runs[-1][0], runs[-1][1] + c)
        else:
          runs.append((col, c))
        leaves.append((i, pos, c, size))
        pos += c
      groups.append((k, tuple(runs), tuple(leaves)))
    return cls(lay.treedef if treedef is None else treedef,
               tuple(lay.avals[j] for j in ids), z, tuple(groups))

  # -- trees <-> [z, width] blocks (a group's columns, concatenated) -------------------------------

  def _tree(self, blocks: Mapping[str, Any]) -> Any:
    leaves: list[Any] = [None] * len(self.avals)
    for k, _, items in self.groups:
      for i, pos, c, size in items:
        word = pack.word_aval(self.avals[i])
        flat = blocks[k][:, pos:pos + c].reshape(-1)[:size]
        leaves[i] = pack.from_word(flat.reshape(word.shape), self.avals[i])
    return self.treedef.unflatten(leaves)

  def _blocks(self, tree: Any) -> list[tuple[str, tuple[tuple[int, int], ...], jax.Array]]:
    """Per dtype group ``(key, runs, [z, width] block of the tree's leaves)``."""
    leaves = self.treedef.flatten_up_to(tree)
    out = []
    for k, runs, items in self.groups:
      parts = []
      for i, _, c, size in items:
        flat = jnp.reshape(pack.to_word(leaves[i]), (-1,)).astype(k)
        parts.append(jnp.pad(flat, (0, self.z * c - size)).reshape(self.z, c))
      out.append((k, runs, jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]))
    return out

  def _cut(self, bufs: Mapping[str, Any], k: str, runs: Sequence[tuple[int, int]]) -> Any:
    """The runs' columns of ``bufs[k]`` (last axis), concatenated."""
    axis = bufs[k].ndim - 1
    parts = [jax.lax.slice_in_dim(bufs[k], col, col + w, axis=axis) for col, w in runs]
    return jnp.concatenate(parts, axis=axis) if len(parts) > 1 else parts[0]

  def _paste(self, bufs: Bufs, k: str, runs: Sequence[tuple[int, int]], block: Any,
             add: bool) -> Any:
    """``bufs[k]`` with the runs' columns (last axis) replaced by (or, with ``add``, increased by)
    ``block``'s consecutive columns."""
    buf, pos = bufs[k], 0
    axis = buf.ndim - 1
    for col, w in runs:
      part = jax.lax.slice_in_dim(block, pos, pos + w, axis=axis)
      if add:
        part = jax.lax.slice_in_dim(buf, col, col + w, axis=axis) + part
      buf = jax.lax.dynamic_update_slice_in_dim(buf, part, col, axis)
      pos += w
    return buf

  # -- whole views ---------------------------------------------------------------------------------

  def read(self, view: Mapping[str, Any]) -> Any:
    """The selected tree from whole ``{dtype: [z, n / z]}`` views."""
    return self._tree({k: self._cut(view, k, runs) for k, runs, _ in self.groups})

  def write(self, view: Bufs, tree: Any, *, add: bool = False) -> Bufs:
    """Whole views with the tree written (or, with ``add``, accumulated) into its columns."""
    out = dict(view)
    for k, runs, block in self._blocks(tree):
      out[k] = self._paste(out, k, runs, block, add)
    return out

  # -- this device's pieces, inside shard_map ------------------------------------------------------
  # A shard's pieces are ``{dtype: [r, n / z]}``: the view's rows it holds. ``axes`` are the
  # manual state axes of size > 1 the rows are split over (``r = z / their size``); with ``tp``
  # left to the compiler (tensor-parallel compute) ``r = tp`` and only ``fsdp`` is manual.

  def gather(self, pieces: Mapping[str, jax.Array], axes: tuple[str, ...] = ()) -> Any:
    """The selected tree, whole, from the shards' ``[r, n / z]`` pieces (one ``all_gather``
    per dtype over ``axes``)."""
    blocks = {}
    for k, runs, _ in self.groups:
      local = self._cut(pieces, k, runs)
      blocks[k] = jax.lax.all_gather(local, axes, axis=0, tiled=True) if axes else local
    return self._tree(blocks)

  def scatter_add(self, pieces: Bufs, tree: Any, axes: tuple[str, ...] = ()) -> Bufs:
    """Adds the tree's sum over the shards of ``axes`` into their pieces, each shard keeping its
    own rows (one ``psum_scatter`` per dtype)."""
    out = dict(pieces)
    for k, runs, block in self._blocks(tree):
      local = (jax.lax.psum_scatter(block, axes, scatter_dimension=0, tiled=True) if axes
               else block)
      out[k] = self._paste(out, k, runs, local, True)
    return out

  def write_own(self, pieces: Bufs, tree: Any, axes: tuple[str, ...] = ()) -> Bufs:
    """Writes this shard's rows of a tree every shard of ``axes`` holds whole."""
    out = dict(pieces)
    for k, runs, block in self._blocks(tree):
      if axes:
        rows = out[k].shape[0]
        block = jax.lax.dynamic_slice_in_dim(block, jax.lax.axis_index(axes) * rows, rows, 0)
      out[k] = self._paste(out, k, runs, block, False)
    return out


def view(bufs: Mapping[str, Any], z: int) -> dict[str, Any]:
  """``{dtype: [n]}`` rows as ``[z, n / z]`` views (row ``d``: device ``d``'s piece)."""
  return {k: v.reshape(z, -1) for k, v in bufs.items()}


def unview(bufs: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of :func:`view`."""
  return {k: v.reshape(-1) for k, v in bufs.items()}


def unpack(lay: pack.FlatLayout, rows: Mapping[str, Any]) -> Any:
  """The layout's tree from whole ``{dtype: [n]}`` rows (traced or host arrays)."""
  return Columns.of(lay).read(view(rows, lay.align))


def pack_into(lay: pack.FlatLayout, rows: Bufs, tree: Any) -> Bufs:
  """Whole ``{dtype: [n]}`` rows with the layout's tree written in."""
  return unview(Columns.of(lay).write(view(rows, lay.align), tree))


def layer_columns(lay: pack.FlatLayout, names: Sequence[str]) -> Columns:
  """The leaves of layers ``names`` in a stage's ``{layer: params}`` layout, as
  ``{name: ...}``."""
  marks = lay.treedef.unflatten(list(range(len(lay.avals))))
  marks = {name: marks[name] for name in names}
  return Columns.of(lay, jax.tree.leaves(marks), jax.tree.structure(marks))


def opt_layer_columns(lay: pack.FlatLayout, names: Sequence[str], all_names: Sequence[str]
                      ) -> Columns:
  """The optimizer-state leaves of layers ``names`` (and the leaves every layer shares, e.g. step
  counters) in a rank's optimizer layout over layers ``all_names``, as the state
  ``optimizer.init`` gives for ``{name: params}`` (``canonical.restrict``)."""
  marks = canonical_lib.restrict(lay.treedef.unflatten(list(range(len(lay.avals)))), names,
                                 all_names)
  return Columns.of(lay, jax.tree.leaves(marks), jax.tree.structure(marks))
