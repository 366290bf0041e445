"""Tests for the stage partitioner (``hkpipe.partition``)."""

import itertools

import haiku as hk
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

import hkpipe
from hkpipe._src import partition as partition_lib

from tests import helpers


def _stage_costs(costs, boundaries):
  edges = (0,) + tuple(boundaries) + (len(costs),)
  return [sum(costs[a:b]) for a, b in zip(edges, edges[1:])]


def _brute_force_best(costs, num_stages):
  """The smallest possible most-expensive stage over every contiguous split."""
  cuts = itertools.combinations(range(1, len(costs)), num_stages - 1)
  return min(max(_stage_costs(costs, b)) for b in cuts)


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(costs=st.lists(st.integers(0, 50), min_size=1, max_size=9), data=st.data())
def test_balance_is_optimal_against_brute_force(costs, data):
  num_stages = data.draw(st.integers(1, len(costs)), label="num_stages")
  boundaries = partition_lib.balance(costs, num_stages)
  assert len(boundaries) == num_stages - 1
  assert list(boundaries) == sorted(set(boundaries))
  assert all(0 < b < len(costs) for b in boundaries)
  assert max(_stage_costs(costs, boundaries)) == _brute_force_best(costs, num_stages)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(costs=st.lists(st.floats(0.0, 1e3, allow_nan=False), min_size=2, max_size=8),
                  data=st.data())
def test_balance_float_costs_within_rounding_of_optimum(costs, data):
  num_stages = data.draw(st.integers(2, len(costs)), label="num_stages")
  got = max(_stage_costs(costs, partition_lib.balance(costs, num_stages)))
  np.testing.assert_allclose(got, _brute_force_best(costs, num_stages), rtol=1e-9, atol=1e-9)


def test_balance_examples():
  assert partition_lib.balance([1, 1, 1, 1], 2) == (2,)
  assert partition_lib.balance([10, 1, 1, 1], 2) == (1,)           # the heavy layer alone
  assert partition_lib.balance([1, 1, 1, 10], 3) == (1, 3)          # ties: earliest split
  assert partition_lib.balance([5], 1) == ()


@pytest.mark.parametrize("costs, num_stages, match", [
    ([1, 2], 3, "Cannot cut 2 layers into 3 stages"),
    ([1, 2], 0, "num_stages must be a positive int"),
    ([1, -2, 3], 2, "finite and >= 0"),
    ([1, float("nan"), 3], 2, "finite and >= 0"),
])
def test_balance_errors(costs, num_stages, match):
  with pytest.raises(ValueError, match=match):
    partition_lib.balance(costs, num_stages)


@pytest.fixture(scope="module")
def model():
  return helpers.hetero_model()     # 7 layers: embed, widen, mid_0..2, narrow, head


@pytest.fixture(scope="module")
def example():
  x, _ = helpers.token_batch(batch=2, seq=5)
  return x


def test_explicit_boundaries_are_used_as_given(model):
  stages = hkpipe.partition(model, 3, boundaries=[1, 6])
  assert [(s.index, s.start, s.stop) for s in stages] == [(0, 0, 1), (1, 1, 6), (2, 6, 7)]
  assert stages[0].layer_names == ("embed",)
  assert stages[1].layer_names == ("widen", "mid_0", "mid_1", "mid_2", "narrow")
  assert stages[2].layer_names == ("head",)


@pytest.mark.parametrize("boundaries, num_stages, match", [
    ([3, 2], 3, "strictly increasing"),
    ([2, 2], 3, "strictly increasing"),
    ([0, 3], 3, "strictly increasing"),
    ([3, 7], 3, "strictly increasing"),
    ([3], 3, "3 stages need 2 boundaries"),
    ([1, 2, 3, 4, 5, 6, 7], 8, "Cannot cut 7 layers into 8 stages"),
])
def test_bad_boundaries_raise(model, boundaries, num_stages, match):
  with pytest.raises(ValueError, match=match):
    hkpipe.partition(model, num_stages, boundaries=boundaries)


def test_more_stages_than_layers_raises(model, example):
  with pytest.raises(ValueError, match="Cannot cut 7 layers into 8 stages"):
    hkpipe.partition(model, 8, example_inputs=example)


def test_cost_balancing_needs_example_inputs(model):
  with pytest.raises(ValueError, match="needs example_inputs"):
    hkpipe.partition(model, 2)


def test_unknown_cost_raises(model, example):
  with pytest.raises(ValueError, match="Unknown partition cost 'bytes'"):
    hkpipe.partition(model, 2, cost="bytes", example_inputs=example)


def test_params_cost_counts_parameters(model, example):
  params = model.init(jax.random.key(0), example)
  costs = partition_lib.layer_costs(model, example, "params")
  expected = [sum(x.size for x in jax.tree.leaves(params[name])) for name in model.layer_names]
  assert costs == [float(c) for c in expected]
  stages = hkpipe.partition(model, 3, cost="params", example_inputs=example)
  best = _brute_force_best(expected, 3)
  assert max(_stage_costs(expected, [s.start for s in stages[1:]])) == best


def _flops_model(width: int) -> hkpipe.SequentialModel:
  """embed -> one heavy [w, w] matmul layer -> three light elementwise layers -> head."""

  def embed(x, is_training):
    del is_training
    return hk.Embed(16, width)(x)                                   # [B, T, w]

  def heavy(x, is_training):
    del is_training
    return hk.Linear(width, with_bias=False)(x)                     # [B, T, w]

  def light(x, is_training):
    del is_training
    return jnp.tanh(x) * hk.get_parameter("s", [width], init=jnp.ones)  # [B, T, w]

  def head(x, is_training):
    del is_training
    return hk.Linear(16, with_bias=False)(x)                        # [B, T, 16]

  layers = [hkpipe.Layer.from_fn("embed", embed), hkpipe.Layer.from_fn("heavy", heavy)]
  layers += [hkpipe.Layer.from_fn(f"light_{i}", light) for i in range(3)]
  layers.append(hkpipe.Layer.from_fn("head", head))
  return hkpipe.SequentialModel(layers, helpers.token_ce)


def test_flops_cost_measures_matmuls_and_isolates_the_heavy_layer():
  width, batch, seq = 64, 4, 8
  model = _flops_model(width)
  x = np.zeros((batch, seq), np.int32)
  costs = partition_lib.layer_costs(model, x, "flops")
  assert costs[1] == pytest.approx(2 * batch * seq * width * width, rel=0.01)   # the matmul
  assert costs[5] == pytest.approx(2 * batch * seq * width * 16, rel=0.01)
  assert max(costs[2:5]) < costs[1] / 10
  by_flops = hkpipe.partition(model, 2, cost="flops", example_inputs=x)
  assert [s.layer_names for s in by_flops] == [("embed", "heavy"),
                                               ("light_0", "light_1", "light_2", "head")]
  # The same partition is optimal for the measured costs.
  assert max(_stage_costs(costs, [by_flops[1].start])) == pytest.approx(
      _brute_force_best(costs, 2))


def test_callable_cost_sees_input_shapes(model, example):
  seen = []

  def cost(layer, x):
    seen.append((layer.name, x.shape))
    return 100.0 if layer.name == "head" else 1.0

  stages = hkpipe.partition(model, 2, cost=cost, example_inputs=example)
  assert [name for name, _ in seen] == list(model.layer_names)
  assert seen[0][1] == example.shape and seen[1][1] == example.shape + (8,)
  assert stages[1].layer_names == ("head",)
