"""Tests of ``hkpipe.testing``: the helpers pass on a correct pipeline and fail, naming the right
leaf, on a wrong one; dtype-aware tolerances; the schedule assertions.

The "wrong" pipelines are made wrong on purpose in a known place (one perturbed parameter leaf,
one layer's learning rate doubled), so the leaf the report must name is known independently of
the helpers; reported numbers are recomputed here with numpy.
"""

from __future__ import annotations

import functools
import pathlib
import re

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hkpipe
from hkpipe import schedules
from hkpipe import testing

LR = 0.1
KEY = jax.random.key(3)


def _model() -> hkpipe.SequentialModel:
  """x [B, 3] -> 4 x tanh(linear(4)) [B, 4]; MSE against targets [B, 4]."""

  def layer(x, is_training):
    del is_training
    return jnp.tanh(hk.Linear(4)(x))                                # [B, 4]

  return hkpipe.SequentialModel([hkpipe.Layer.from_fn(f"l{i}", layer) for i in range(4)],
                                lambda y, t: jnp.mean((y - t) ** 2))


@functools.lru_cache(maxsize=None)
def _batch():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=(8, 4)).astype(np.float32))


def _mpmd(optimizer=None) -> hkpipe.Pipeline:
  return hkpipe.Pipeline(_model(), optimizer or optax.sgd(LR), backend="mpmd",
                         devices=jax.devices()[:2], num_microbatches=2, schedule="1f1b",
                         donate=False)


@functools.lru_cache(maxsize=None)
def _reference() -> testing.ReferenceRun:
  return testing.reference_run(_mpmd(), _batch(), steps=2, rng=KEY)


def _scale_updates_of(layer: str, factor: float) -> optax.GradientTransformation:
  """Multiplies the updates of ``layer``'s parameters by ``factor`` (a wrong per-layer lr)."""

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda p, u: u * factor if jax.tree_util.keystr(p).startswith(f"['{layer}']") else u,
        updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def test_correct_pipeline_passes():
  pipe = _mpmd()
  state = testing.assert_pipeline_matches_reference(pipe, _batch(), steps=2, rng=KEY,
                                                    reference=_reference())
  assert state.step == 2
  # The reference really trained: its parameters moved, so "passes" compared something.
  ref = _reference()
  assert not np.allclose(ref.step_params[1]["l0"]["linear"]["w"],
                         ref.init_params["l0"]["linear"]["w"])


def test_builds_its_own_reference_with_step_batches():
  """No cached reference: the helper runs the single backend itself; one batch per step."""
  x, y = _batch()
  steps = [(x[::-1].copy(), y), (x, y[::-1].copy())]
  pipe = hkpipe.Pipeline(_model(), optax.adam(1e-2), backend="spmd", devices=jax.devices()[:2],
                         num_microbatches=2, donate=False)
  state = testing.assert_pipeline_matches_reference(pipe, _batch(), steps=2, step_batches=steps)
  assert state.step == 2


def test_perturbed_parameter_is_named():
  pipe = _mpmd()
  state = pipe.init(KEY, _batch())
  canonical = pipe.to_canonical(state)
  params = jax.device_get(canonical["params"])
  w = np.array(params["l2"]["linear"]["w"])
  w[1, 3] += 0.01
  params["l2"]["linear"]["w"] = w
  state = pipe.from_canonical(dict(canonical, params=params), 0)
  with pytest.raises(AssertionError) as e:
    testing.assert_pipeline_matches_reference(pipe, _batch(), steps=2, rng=KEY, state=state,
                                              reference=_reference())
  msg = str(e.value)
  assert msg.startswith("initial parameters: 1 of 8 leaves differ"), msg
  assert "Worst leaf: l2/linear/w: shape (4, 4) float32" in msg, msg
  assert "at index (1, 3)" in msg, msg
  got = float(re.search(r"max abs diff ([0-9.e-]+)", msg).group(1))
  np.testing.assert_allclose(got, 0.01, rtol=1e-3)
  assert "Also differing" not in msg and len(msg) < 600   # a report, not a dump


def test_wrong_learning_rate_of_one_layer_is_named():
  """Layer l1 steps with twice the learning rate: the loss and gradients still match, the
  parameters after step 1 do not, and only l1's leaves are reported."""
  pipe = _mpmd(optax.chain(optax.sgd(LR), _scale_updates_of("l1", 2.0)))
  state = pipe.init(KEY, _batch())
  with pytest.raises(AssertionError) as e:
    testing.assert_pipeline_matches_reference(pipe, _batch(), steps=2, rng=KEY, state=state,
                                              reference=_reference())
  msg = str(e.value)
  assert msg.startswith("parameters after step 1: 2 of 8 leaves differ"), msg
  worst = re.search(r"Worst leaf: (\S+):", msg).group(1)
  other = re.search(r"Also differing: (\S+) \(", msg).group(1)
  assert {worst, other} == {"l1/linear/w", "l1/linear/b"}, msg
  # The reported max abs diff is the leaf's own: one extra SGD update = LR x its gradient.
  module, name = worst.split("/")[1:]
  g = np.asarray(_reference().grads["l1"][module][name])
  got = float(re.search(r"max abs diff ([0-9.e-]+)", msg).group(1))
  np.testing.assert_allclose(got, LR * np.abs(g).max(), rtol=1e-2)


def test_reference_with_other_options_is_refused():
  pipe = hkpipe.Pipeline(_model(), optax.sgd(LR), backend="mpmd", devices=jax.devices()[:2],
                         num_microbatches=4, donate=False)
  with pytest.raises(hkpipe.ConfigError, match=r"num_microbatches=4 \(reference: 2\)"):
    testing.assert_pipeline_matches_reference(pipe, _batch(), steps=2, reference=_reference())
  with pytest.raises(hkpipe.ConfigError, match=r"steps=3 but the reference recorded 2"):
    testing.assert_pipeline_matches_reference(_mpmd(), _batch(), steps=3, reference=_reference())
  with pytest.raises(hkpipe.ConfigError, match=r"step_batches has 1 batches but steps=2"):
    testing.assert_pipeline_matches_reference(_mpmd(), _batch(), step_batches=[_batch()])


# -- tolerances and the report of any two trees ------------------------------------------------


def test_default_tolerance_by_dtype():
  assert testing.default_tolerance(jnp.float32) == testing.Tolerance(1e-5, 1e-6)
  assert testing.default_tolerance(jnp.bfloat16) == testing.Tolerance(2e-2, 2e-3)
  assert testing.default_tolerance(jnp.float16) == testing.Tolerance(5e-3, 5e-4)
  assert testing.default_tolerance(np.float32, np.float64) == testing.Tolerance(1e-5, 1e-6)
  assert testing.default_tolerance(jnp.bfloat16, np.float32) == testing.Tolerance(2e-2, 2e-3)
  assert testing.default_tolerance(jnp.float8_e4m3fn) == testing.Tolerance(2e-2, 2e-3)
  assert testing.default_tolerance(np.int32) == testing.Tolerance(0.0, 0.0)


def test_tolerance_follows_each_leafs_dtype():
  base = np.linspace(1.0, 2.0, 6, dtype=np.float32)
  off = base * (1 + 1e-2)                      # 1 % off: within bf16's rtol, far outside fp32's
  testing.assert_trees_close({"a": jnp.asarray(off, jnp.bfloat16)},
                             {"a": jnp.asarray(base, jnp.bfloat16)})
  with pytest.raises(AssertionError, match=r"Worst leaf: b: shape \(6,\) float32.*rtol=1e-05"):
    testing.assert_trees_close({"a": jnp.asarray(off, jnp.bfloat16), "b": off},
                               {"a": jnp.asarray(base, jnp.bfloat16), "b": base})
  testing.assert_trees_close({"b": off}, {"b": base}, rtol=2e-2)          # explicit wins
  with pytest.raises(AssertionError, match=r"of 1 leaves"):
    testing.assert_trees_close(np.array([1, 2]), np.array([1, 3]))     # ints: exact


def test_report_of_shapes_nans_and_structure():
  with pytest.raises(AssertionError, match=r"x/y: shape \(2, 3\) float32 but the reference has "
                                           r"shape \(3, 2\)"):
    testing.assert_trees_close({"x": {"y": np.zeros((2, 3), np.float32)}},
                               {"x": {"y": np.zeros((3, 2), np.float32)}})
  nan = np.array([1.0, np.nan, np.inf], np.float32)
  testing.assert_trees_close(nan, nan.copy())                             # same NaN/inf: equal
  with pytest.raises(AssertionError, match=r"index \(1,\): nan vs reference 2 "):
    testing.assert_trees_close(nan, np.array([1.0, 2.0, np.inf], np.float32))
  with pytest.raises(AssertionError):
    testing.assert_trees_close({"a": 1.0}, {"b": 1.0})                    # chex: structures
  z = np.array([1 + 5j], np.complex64)                                    # imaginary parts count
  testing.assert_trees_close(z, z.copy())
  with pytest.raises(AssertionError, match="max abs diff 8"):
    testing.assert_trees_close(z, np.array([1 - 3j], np.complex64))


# -- schedules ---------------------------------------------------------------------------------


def test_schedule_valid_returns_simulation_and_checks_bounds():
  s = schedules.get("1f1b", num_ranks=2, num_microbatches=4)
  result = testing.assert_schedule_valid(s, max_bubble_ratio=0.5, max_peak_activations=2)
  assert result.peak_activations == (2, 1)
  with pytest.raises(AssertionError, match=r"bubble ratio 0\.\d+ > max_bubble_ratio=0\.01"):
    testing.assert_schedule_valid(s, max_bubble_ratio=0.01)
  with pytest.raises(AssertionError, match=r"rank 0: 2 > 1"):
    testing.assert_schedule_valid(s, max_peak_activations=[1, 1])


def test_invalid_schedule_is_reported_with_its_row():
  good = schedules.from_text("0F0 0F1 0B0 0B1\n1F0 1B0 1F1 1B1\n")
  bad = schedules.from_text("0F0 0F1 0B0 0B1\n1B0 1F0 1F1 1B1\n")          # B before its F
  testing.assert_schedule_valid(good)
  with pytest.raises(AssertionError) as e:
    testing.assert_schedule_valid(bad)
  assert "rank 1, position 0, action 1B0" in str(e.value)
  assert "rank 1: [1B0] 1F0 1F1 1B1" in str(e.value)
  err = testing.assert_schedule_invalid(bad, match="needs 1F0 earlier")
  assert (err.rank, err.position) == (1, 0)
  with pytest.raises(AssertionError, match="is valid, but a ScheduleError was expected"):
    testing.assert_schedule_invalid(good)
  with pytest.raises(AssertionError, match="does not match 'deadlock'"):
    testing.assert_schedule_invalid(bad, match="deadlock")


def test_docs_example_runs():
  """docs/testing.md's user test of a custom model, run as written."""
  text = (pathlib.Path(__file__).parents[1] / "docs" / "testing.md").read_text()
  code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
  namespace: dict = {}
  exec(compile(code, "docs/testing.md", "exec"), namespace)  # pylint: disable=exec-used
  namespace["test_my_model_pipelines"]()
