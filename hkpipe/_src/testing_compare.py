"""Tree comparison for ``hkpipe.testing``: dtype-aware tolerances and a report of the worst leaf.

A leaf passes when ``|actual - expected| <= atol + rtol * |expected|`` elementwise (numpy's and
chex's rule; NaN equals NaN, an infinity equals the same infinity). When the caller gives no
tolerance, each leaf gets the default of its dtype (the less precise of the two arrays' dtypes),
see :data:`DEFAULT_TOLERANCES`. A failure raises an ``AssertionError`` whose message names the
worst leaf (its path, shape, dtype, max abs and rel difference and where), then the other
failing leaves' paths, never the arrays themselves.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import chex
import jax
import numpy as np

from hkpipe._src import sharding as sharding_lib


@dataclasses.dataclass(frozen=True)
class Tolerance:
  """Elementwise ``|actual - expected| <= atol + rtol * |expected|``."""

  rtol: float
  atol: float

  def __str__(self) -> str:
    return f"rtol={self.rtol:g}, atol={self.atol:g}"


# Defaults by dtype name. float32 is the project's equivalence tolerance (a pipelined run reorders
# float sums, e.g. over microbatches, stages and tensor-parallel shards; 1e-5 is 84 epsilons);
# bfloat16 (8 mantissa bits, eps 7.8e-3) and float16 (11 bits, eps 9.8e-4) allow a few ulps of
# their own; integer and boolean leaves must be equal.
DEFAULT_TOLERANCES: Mapping[str, Tolerance] = {
    "float64": Tolerance(rtol=1e-10, atol=1e-12),
    "float32": Tolerance(rtol=1e-5, atol=1e-6),
    "float16": Tolerance(rtol=5e-3, atol=5e-4),
    "bfloat16": Tolerance(rtol=2e-2, atol=2e-3),
}
"""Default tolerance per floating dtype name (narrower floats than bfloat16 use bfloat16's;
integers and bools compare exactly); a leaf uses the less precise dtype of its two arrays."""
EXACT = Tolerance(rtol=0.0, atol=0.0)
_ORDER = ("bfloat16", "float16", "float32", "float64")  # least precise first


def default_tolerance(*dtypes: Any) -> Tolerance:
  """The default tolerance for comparing arrays of ``dtypes``: that of the least precise
  floating dtype among them (float8 and other narrower floats get bfloat16's); exact when none
  is floating.

  Example: ``default_tolerance(jnp.bfloat16)`` is ``Tolerance(rtol=2e-2, atol=2e-3)``;
  ``default_tolerance(np.float32, np.float64)`` is float32's ``Tolerance(rtol=1e-5, atol=1e-6)``.
  """
  names = [np.dtype(d).name for d in dtypes if jax.dtypes.issubdtype(d, np.floating)]
  if not names:
    return EXACT
  known = [n for n in names if n in DEFAULT_TOLERANCES]
  if len(known) < len(names):     # float8 variants and friends: the loosest we have
    return DEFAULT_TOLERANCES[_ORDER[0]]
  return DEFAULT_TOLERANCES[min(known, key=_ORDER.index)]


def resolve(dtypes: tuple[Any, ...], rtol: float | None, atol: float | None) -> Tolerance:
  """``rtol``/``atol`` where given, the dtype default (:func:`default_tolerance`) otherwise."""
  base = default_tolerance(*dtypes)
  return Tolerance(base.rtol if rtol is None else float(rtol),
                   base.atol if atol is None else float(atol))


@dataclasses.dataclass(frozen=True)
class LeafDiff:
  """How one leaf differs. ``excess`` is the largest ``|diff| / (atol + rtol |expected|)``
  (> 1: outside the tolerance; inf for a NaN/inf mismatch or a zero tolerance)."""

  path: str
  shape: tuple[int, ...]
  expected_shape: tuple[int, ...]
  dtype: str
  expected_dtype: str
  tolerance: Tolerance
  max_abs: float
  max_rel: float
  excess: float
  index: tuple[int, ...] = ()
  actual_value: float | complex = 0.0
  expected_value: float | complex = 0.0

  @property
  def ok(self) -> bool:
    return self.shape_ok and self.excess <= 1.0

  @property
  def shape_ok(self) -> bool:
    # numpy's rule: a scalar broadcasts against anything; otherwise the shapes must be equal.
    return self.shape == self.expected_shape or not self.shape or not self.expected_shape

  def describe(self) -> str:
    """One readable paragraph about this leaf."""
    name = self.path or "(the value)"
    if not self.shape_ok:
      return (f"{name}: shape {self.shape} {self.dtype} but the reference has shape "
              f"{self.expected_shape} {self.expected_dtype}")
    where = f" at index {self.index}" if self.index else ""
    return (f"{name}: shape {self.shape} {self.dtype} (reference {self.expected_dtype}), max abs "
            f"diff {self.max_abs:.3g}, max rel diff {self.max_rel:.3g}; worst element{where}: "
            f"{self.actual_value:.8g} vs reference {self.expected_value:.8g} "
            f"({self.excess:.3g}x the tolerance {self.tolerance})")


def leaf_diff(path: str, actual: Any, expected: Any, rtol: float | None = None,
              atol: float | None = None) -> LeafDiff:
  """Compares one pair of arrays (see the module docstring for the rule)."""
  a, e = np.asarray(jax.device_get(actual)), np.asarray(jax.device_get(expected))
  tol = resolve((a.dtype, e.dtype), rtol, atol)
  common: dict[str, Any] = dict(path=path, shape=tuple(a.shape), expected_shape=tuple(e.shape),
                                dtype=a.dtype.name, expected_dtype=e.dtype.name, tolerance=tol)
  if not (a.shape == e.shape or not a.shape or not e.shape):
    return LeafDiff(max_abs=float("nan"), max_rel=float("nan"), excess=float("inf"), **common)
  wide = np.complex128 if np.iscomplexobj(a) or np.iscomplexobj(e) else np.float64
  af, ef = np.broadcast_arrays(a.astype(wide), e.astype(wide))
  if af.size == 0:
    return LeafDiff(max_abs=0.0, max_rel=0.0, excess=0.0, **common)
  same = (af == ef) | (np.isnan(af) & np.isnan(ef))        # covers equal infinities
  with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
    diff = np.where(same, 0.0, np.abs(af - ef))
    diff = np.where(np.isnan(diff), np.inf, diff)          # NaN vs number, inf vs other
    allowed = tol.atol + tol.rtol * np.abs(np.where(np.isfinite(ef), ef, 0.0))
    excess = np.where(diff == 0, 0.0, diff / allowed)
    rel = np.where(diff == 0, 0.0, diff / np.abs(ef))
  worst = np.unravel_index(int(np.argmax(excess)), excess.shape)
  return LeafDiff(max_abs=float(diff.max()), max_rel=float(rel.max()),
                  excess=float(excess[worst]), index=tuple(int(i) for i in worst),
                  actual_value=af[worst].item(), expected_value=ef[worst].item(), **common)


def tree_diffs(actual: Any, expected: Any, rtol: float | None = None,
               atol: float | None = None) -> list[LeafDiff]:
  """Every leaf's :class:`LeafDiff`, in tree order; the trees must have the same structure
  (checked with ``chex.assert_trees_all_equal_structs``)."""
  chex.assert_trees_all_equal_structs(actual, expected)
  paths = jax.tree_util.tree_flatten_with_path(actual)[0]
  expected_leaves = jax.tree.leaves(expected)
  return [leaf_diff(sharding_lib.leaf_path(p), a, e, rtol, atol)
          for (p, a), e in zip(paths, expected_leaves)]


def failure_report(diffs: list[LeafDiff], what: str = "") -> str | None:
  """The message for the failing leaves of ``diffs`` (worst first), or None when all pass."""
  bad = sorted((d for d in diffs if not d.ok), key=lambda d: (d.shape_ok, -d.excess))
  if not bad:
    return None
  head = f"{what}: " if what else ""
  lines = [f"{head}{len(bad)} of {len(diffs)} leaves differ from the reference beyond the "
           f"tolerance. Worst leaf: {bad[0].describe()}."]
  if len(bad) > 1:
    more = ", ".join(f"{d.path or '(the value)'} ({d.excess:.3g}x)" for d in bad[1:6])
    lines.append(f"Also differing: {more}{' ...' if len(bad) > 6 else ''}.")
  return "\n".join(lines)


def assert_trees_close(actual: Any, expected: Any, *, rtol: float | None = None,
                       atol: float | None = None, what: str = "") -> list[LeafDiff]:
  """Asserts two trees have the same structure and every leaf is close.

  Args:
    actual: the tree under test (jax or numpy arrays, scalars).
    expected: the reference tree.
    rtol: relative tolerance; None: each leaf's dtype default (:func:`default_tolerance`).
    atol: absolute tolerance; None: each leaf's dtype default.
    what: a label for the failure message (e.g. ``"gradients"``).

  Returns:
    The per-leaf differences (all within tolerance).

  Raises:
    AssertionError: naming the worst leaf (path, shapes, max abs/rel difference) and the others
      that fail; or, from chex, the first structure difference.
  """
  diffs = tree_diffs(actual, expected, rtol, atol)
  message = failure_report(diffs, what)
  if message is not None:
    raise AssertionError(message)
  return diffs
