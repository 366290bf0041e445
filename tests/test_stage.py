"""Shared stage code (hkpipe/_src/stage.py): forward with stashed residuals and tie location."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import hkpipe
from hkpipe._src import stage as stage_lib


def test_vjp_with_stash_rebuilds_the_pullback_without_stashing_kept_inputs():
  w = jnp.arange(6.0).reshape(2, 3)
  x = jnp.array([[1.0, -2.0], [0.5, 3.0]])
  fn = lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2)
  y, _, residuals, stash = stage_lib.vjp_with_stash(fn, (w, x), kept=[w, x])
  assert residuals.num_out == len(stash)
  assert all(not any(s is k for k in (w, x)) for s in stash)  # kept inputs are not stashed
  assert ("in", 0) in residuals.source or ("in", 1) in residuals.source
  pullback = stage_lib.rebuild_pullback(residuals, [w, x], stash)
  dw, dx = pullback(jnp.ones_like(y))
  ref_dw, ref_dx = jax.grad(fn, argnums=(0, 1))(w, x)
  np.testing.assert_allclose(dw, ref_dw, rtol=1e-6)
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-6)


def test_locate_ties_in_dict_and_tuple_stage_trees():
  p = lambda *shape: np.zeros(shape, np.float32)
  a = {"lin": {"b": p(3), "w": p(2, 3)}}
  b = {"lin": {"b": p(3), "w": p(2, 3)}, "ln": {"scale": p(3)}}
  c = {"head": {"w": p(2, 3)}}
  ties = (hkpipe.Tie(("a", "lin", "w"), ("c", "head", "w")),
          hkpipe.Tie(("b", "lin", "w"), ("b2", "lin", "w")))
  names = [("a", "b"), ("b2", "c")]
  # {layer: params} dicts flatten by sorted keys: a.lin.b, a.lin.w, b.lin.b, b.lin.w, b.ln.scale.
  as_dicts = [{"a": a, "b": b}, {"b2": a, "c": c}]
  found = stage_lib.locate_ties(ties, as_dicts, names)
  assert found == (stage_lib.TieSides((0, 1), (1, 2)), stage_lib.TieSides((0, 3), (1, 1)))
  # Tuples of per-layer params flatten in stage layer order (here the same order).
  as_tuples = [(a, b), (a, c)]
  assert stage_lib.locate_ties(ties, as_tuples, names) == found
  swapped = stage_lib.locate_ties(ties, [(b, a), (c, a)], [("b", "a"), ("c", "b2")])
  assert swapped == (stage_lib.TieSides((0, 4), (1, 0)), stage_lib.TieSides((0, 1), (1, 2)))
