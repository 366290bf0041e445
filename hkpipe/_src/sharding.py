"""Mesh axes and parameter sharding rules (pure functions; no device is touched).

A pipeline mesh has the axes ``"pp"`` (pipeline ranks), then any of ``"dp"`` (data parallel),
``"fsdp"`` (fully sharded data parallel: the batch *and* the parameters are split) and ``"tp"``
(tensor parallel), in that order. Inside one pipeline rank the inner axes form a sub-mesh
``("dp", "fsdp", "tp")`` (size 1 where absent).

Parameters (and, following them, gradients and optimizer state) are sharded over ``"fsdp"`` and
``"tp"`` by :class:`Rules`: an ordered list of ``(regex, PartitionSpec)`` matched (``re.search``)
against each parameter's path ``"layer/module/param"`` in the canonical layout
``{layer_name: {module: {param: array}}}``; the first matching rule wins. A leaf no rule matches
gets the default, FSDP: its largest dimension divisible by the ``fsdp`` size is split over
``"fsdp"`` (leaves under ``fsdp_min_size`` elements stay replicated). :func:`resolve` checks every
rule against the parameter shapes and the mesh and raises a :class:`ConfigError` naming the
leaf, the axis, the sizes and the fix.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hkpipe._src import errors

AXES = ("pp", "dp", "fsdp", "tp")
"""The mesh axis names, in mesh order: pipeline, data, fully sharded data, tensor parallel."""
INNER_AXES = ("dp", "fsdp", "tp")       # the sub-mesh of one pipeline rank, in this order
PARAM_AXES = ("fsdp", "tp")             # the axes sharding rules may name
DEFAULT_FSDP_MIN_SIZE = 1 << 14         # elements; smaller unmatched leaves stay replicated
"""Leaves no rule matches and with fewer elements than this stay replicated (default FSDP)."""


def check_mesh_axes(names: Sequence[str], *, require_pp: bool = True) -> None:
  """Checks a pipeline mesh's axis names: ``"pp"`` first, then a subset of dp, fsdp, tp in order.

  Raises:
    ConfigError: naming the offending axis and the fix.
  """
  names = tuple(names)
  for name in names:
    if name not in AXES:
      raise errors.ConfigError(
          f"Mesh axis {name!r} is not a pipeline axis; use only {list(AXES)} (pipeline ranks, "
          f"data parallel, fully sharded data parallel, tensor parallel), e.g. "
          f"jax.make_mesh((2, 2, 2), ('pp', 'fsdp', 'tp')).")
  if len(set(names)) != len(names):
    raise errors.ConfigError(f"Mesh axes {names} name an axis twice; give each axis once.")
  if require_pp and (not names or names[0] != "pp"):
    raise errors.ConfigError(
        f"Pipeline meshes need 'pp' as their first axis; got {names}. Build one with e.g. "
        "jax.make_mesh((pp, fsdp), ('pp', 'fsdp')).")
  order = [AXES.index(n) for n in names]
  if order != sorted(order):
    raise errors.ConfigError(f"Mesh axes {names} are out of order; use the order {AXES} "
                             f"(any subset), e.g. {tuple(n for n in AXES if n in names)}.")


def inner_sizes(axis_names: Sequence[str], shape: Sequence[int]) -> dict[str, int]:
  """``{"dp": .., "fsdp": .., "tp": ..}`` of a mesh (1 for an absent axis)."""
  sizes = dict(zip(axis_names, (int(s) for s in shape)))
  return {a: sizes.get(a, 1) for a in INNER_AXES}


def _spec_axes(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _as_spec(pattern: str, spec: Any) -> P:
  if not isinstance(spec, (P, tuple, list)):
    raise errors.ConfigError(f"Sharding rule {pattern!r}: the spec must be a PartitionSpec "
                             f"(e.g. P('fsdp', 'tp')), got {spec!r}.")
  spec = spec if isinstance(spec, P) else P(*spec)
  for entry in spec:
    axes = _spec_axes(entry)
    if any(not isinstance(a, str) for a in axes):
      raise errors.ConfigError(f"Sharding rule {pattern!r}: spec entry {entry!r} is not an axis "
                               "name, a tuple of axis names, or None.")
    bad = [a for a in axes if a not in PARAM_AXES]
    if bad:
      raise errors.ConfigError(
          f"Sharding rule {pattern!r} names axis {bad[0]!r}; parameters are sharded only over "
          f"{list(PARAM_AXES)} (the batch is split over 'dp' and 'fsdp' automatically). Use "
          "'fsdp', 'tp' or None in the spec.")
  used = [a for entry in spec for a in _spec_axes(entry)]
  if len(set(used)) != len(used):
    raise errors.ConfigError(f"Sharding rule {pattern!r}: spec {spec} uses an axis twice; use "
                             "each axis on at most one dimension.")
  return spec


@dataclasses.dataclass(frozen=True)
class Rules:
  """Parameter sharding rules: ``(regex, PartitionSpec)`` pairs, first match wins.

  Each regex is searched (``re.search``) in a parameter's path ``"layer/module/param"`` (e.g.
  ``"block_3/attn/w_q"``); the spec names, per dimension, ``"fsdp"``, ``"tp"``, a tuple of both,
  or None (trailing dimensions may be left out). A leaf no rule matches gets the default FSDP
  spec (:func:`default_spec`). Every rule must match at least one leaf.

  Attributes:
    rules: the ordered ``(regex, spec)`` pairs.
    fsdp_min_size: unmatched leaves with fewer elements stay replicated (default 16384).
  """

  rules: tuple[tuple[str, P], ...] = ()
  fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE

  def __post_init__(self):
    if isinstance(self.rules, (str, bytes)) or not isinstance(self.rules, Sequence):
      raise errors.ConfigError(f"Sharding rules must be a sequence of (regex, PartitionSpec) "
                               f"pairs, got {self.rules!r}.")
    out = []
    for rule in self.rules:
      if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
        raise errors.ConfigError(f"Sharding rule {rule!r} is not a (regex, PartitionSpec) pair; "
                                 "write e.g. ('attn/w_[qkv]$', P('fsdp', 'tp')).")
      try:
        re.compile(rule[0])
      except re.error as e:
        raise errors.ConfigError(f"Sharding rule {rule[0]!r} is not a valid regex ({e}).") from e
      out.append((rule[0], _as_spec(rule[0], rule[1])))
    object.__setattr__(self, "rules", tuple(out))
    size = self.fsdp_min_size
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
      raise errors.ConfigError(f"fsdp_min_size must be an int >= 0 (elements), got {size!r}.")


def as_rules(value: Any) -> Rules:
  """``value`` as :class:`Rules`: a ``Rules``, a sequence of pairs, or None (no rules)."""
  if isinstance(value, Rules):
    return value
  return Rules(tuple(value) if value is not None else ())


def leaf_path(key_path: Sequence[Any]) -> str:
  """``"layer/module/param"`` of a ``jax.tree_util`` key path into a canonical params tree."""
  parts = []
  for k in key_path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def default_spec(shape: Sequence[int], fsdp: int, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> P:
  """The default FSDP spec of a leaf: its largest dimension divisible by ``fsdp`` (the first of
  equal ones) over ``"fsdp"``; ``P()`` (replicated) if ``fsdp == 1``, the leaf has fewer than
  ``min_size`` elements, or no dimension divides."""
  shape = tuple(int(d) for d in shape)
  if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  fits = [i for i, d in enumerate(shape) if d % fsdp == 0]
  if not fits:
    return P()
  dim = max(fits, key=lambda i: (shape[i], -i))
  return P(*([None] * dim + ["fsdp"]))


def _check_spec(path: str, pattern: str, spec: P, shape: Sequence[int],
                axis_sizes: Mapping[str, int]) -> None:
  if len(spec) > len(shape):
    raise errors.ConfigError(
        f"Sharding rule {pattern!r} gives {path} (shape {tuple(shape)}) the spec {spec} with "
        f"{len(spec)} entries, more than its {len(shape)} dimensions; shorten the spec or make "
        "the regex more specific.")
  for dim, entry in enumerate(spec):
    axes = _spec_axes(entry)
    for a in axes:
      if a not in axis_sizes:
        raise errors.ConfigError(
            f"Sharding rule {pattern!r} shards {path} over axis {a!r}, but the mesh has no "
            f"{a!r} axis (inner axes: {list(axis_sizes)}); add {a!r} to the mesh or drop it "
            "from the rule.")
    size = int(np.prod([axis_sizes[a] for a in axes], dtype=np.int64)) if axes else 1
    if shape[dim] % size:
      raise errors.ConfigError(
          f"Sharding rule {pattern!r} splits dimension {dim} of {path} (shape {tuple(shape)}, "
          f"size {shape[dim]}) over {'x'.join(axes)} = {size} devices, but {shape[dim]} is not "
          f"divisible by {size}; change the mesh's {'/'.join(axes)} size, or give this leaf "
          "another spec (an earlier rule, or None on that dimension).")


def resolve(param_shapes: Any, rules: Rules | Sequence[Any] | None,
            axis_sizes: Mapping[str, int]) -> Any:
  """The ``PartitionSpec`` of every parameter leaf.

  Args:
    param_shapes: a canonical params tree (arrays or ``ShapeDtypeStruct`` s).
    rules: :class:`Rules` (or a sequence of pairs, or None).
    axis_sizes: the sizes of the inner axes the mesh *has* (e.g. ``{"fsdp": 2}``); a rule naming
      another axis is an error. ``"fsdp"`` absent or 1: unmatched leaves are replicated.

  Returns:
    A tree of ``PartitionSpec`` with the structure of ``param_shapes``.

  Raises:
    ConfigError: a rule that matches no leaf (or only leaves an earlier rule took), names an axis
      the mesh lacks, has more entries than a leaf's dimensions, or splits a dimension its axes'
      size does not divide.
  """
  rules = as_rules(rules)
  fsdp = int(axis_sizes.get("fsdp", 1))
  flat, treedef = jax.tree_util.tree_flatten_with_path(param_shapes)
  matched, used = [0] * len(rules.rules), [0] * len(rules.rules)
  specs = []
  for key_path, leaf in flat:
    path, shape = leaf_path(key_path), tuple(np.shape(leaf))
    hits = [i for i, (pattern, _) in enumerate(rules.rules) if re.search(pattern, path)]
    for i in hits:
      matched[i] += 1
    if hits:
      used[hits[0]] += 1
      pattern, spec = rules.rules[hits[0]]
      _check_spec(path, pattern, spec, shape, axis_sizes)
    else:
      spec = default_spec(shape, fsdp, rules.fsdp_min_size)
    specs.append(spec)
  for i, (pattern, _) in enumerate(rules.rules):
    if not used[i]:
      why = ("matches no parameter" if not matched[i] else
             "matches only parameters an earlier rule already took")
      example = leaf_path(flat[0][0]) if flat else "(none)"
      raise errors.ConfigError(
          f"Sharding rule {pattern!r} {why} (paths look like {example!r}); fix the regex or "
          "remove the rule.")
  return jax.tree_util.tree_unflatten(treedef, specs)


def named(specs: Any, mesh: jax.sharding.Mesh) -> Any:
  """A tree of ``PartitionSpec`` as ``NamedSharding`` s on ``mesh``."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def opt_state_shardings(optimizer: optax.GradientTransformation, params: Any,
                        param_shardings: Any, replicated: Any) -> Any:
  """Shardings of ``optimizer.init(params)``: each parameter-shaped part follows its parameter
  (``optax.tree_map_params``), everything else (step counters...) is ``replicated``.

  Args:
    optimizer: the optimizer.
    params: the parameter tree (shapes suffice).
    param_shardings: a tree of shardings with ``params``' structure.
    replicated: the sharding of the other leaves.
  """
  state = jax.eval_shape(optimizer.init, params)
  return optax.tree_map_params(optimizer, lambda _, sh: sh, state, param_shardings,
                               transform_non_params=lambda _: replicated)


def shard_bytes(arrays: Sequence[jax.Array]) -> dict[Any, int]:
  """Per device, the bytes of the addressable shards of ``arrays`` held there."""
  out: dict[Any, int] = {}
  for a in arrays:
    for shard in a.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + int(shard.data.nbytes)
  return out
