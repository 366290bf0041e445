"""Stage partitioner: groups consecutive layers into pipeline stages.

Stages are contiguous layer ranges. Given explicit ``boundaries`` they are used as is; otherwise the
per-layer costs (parameter counts, XLA-measured forward FLOPs, or a user function) are balanced by
dynamic programming over contiguous splits so that the most expensive stage is as cheap as possible
(the pipeline's throughput is set by its slowest stage).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax

from hkpipe._src import model as model_lib

CostFn = Callable[[model_lib.Layer, Any], float]


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One pipeline stage: layers ``start..stop-1`` of the model.

  Attributes:
    index: stage number in model order (0 = first).
    start: index of the stage's first layer.
    stop: one past the index of its last layer.
    layer_names: names of its layers (its keys in the canonical parameter layout).
  """

  index: int
  start: int
  stop: int
  layer_names: tuple[str, ...]


def _shapes(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def layer_io_shapes(model: model_lib.SequentialModel,
                    example_inputs: Any) -> list[tuple[Any, Any]]:
  """Per layer: (parameter shapes, input shapes), by abstract evaluation (nothing compiled)."""
  out = []
  x = _shapes(example_inputs)
  key = jax.random.key(0)
  for layer in model.layers:
    p = jax.eval_shape(layer.init, key, x)
    out.append((p, x))
    x = jax.eval_shape(lambda p_, x_, l=layer: l.apply(p_, None, x_, is_training=False), p, x)
  return out


def _flops(layer: model_lib.Layer, params: Any, x: Any) -> float:
  """Forward FLOPs of one layer: XLA's HLO cost analysis of the lowered program (no compile)."""
  fn = jax.jit(lambda p_, x_: layer.apply(p_, None, x_, is_training=False))
  analysis = fn.lower(params, x).cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


def layer_costs(model: model_lib.SequentialModel, example_inputs: Any,
                cost: str | CostFn = "params") -> list[float]:
  """Cost of each layer.

  Args:
    model: the model.
    example_inputs: a microbatch of inputs (arrays or ShapeDtypeStructs).
    cost: ``"params"`` (parameter count), ``"flops"`` (XLA's cost analysis of the layer's lowered
      forward on one microbatch; nothing is compiled) or a callable
      ``cost(layer, input_shapes) -> float``.

  Raises:
    ValueError: for an unknown cost name.
  """
  io = layer_io_shapes(model, example_inputs)
  if callable(cost):
    return [float(cost(layer, x)) for layer, (_, x) in zip(model.layers, io)]
  if cost == "params":
    return [float(sum(l.size for l in jax.tree.leaves(p))) for p, _ in io]
  if cost == "flops":
    return [_flops(layer, p, x) for layer, (p, x) in zip(model.layers, io)]
  raise ValueError(f"Unknown partition cost {cost!r}; use 'params', 'flops' or a callable "
                   "cost(layer, input_shapes) -> float.")


def balance(costs: Sequence[float], num_stages: int) -> tuple[int, ...]:
  """Boundaries minimising the most expensive contiguous stage (ties: earliest split).

  Args:
    costs: per-layer costs (non-negative).
    num_stages: number of stages, at most ``len(costs)``.

  Returns:
    ``num_stages - 1`` boundaries: the first layer index of stages 1..S-1.

  Raises:
    ValueError: more stages than layers, or a negative / non-finite cost.
  """
  n = len(costs)
  _check_count(n, num_stages)
  bad = [(i, c) for i, c in enumerate(costs) if not math.isfinite(float(c)) or float(c) < 0]
  if bad:
    raise ValueError(f"Layer costs must be finite and >= 0; got {bad[0][1]!r} for layer "
                     f"{bad[0][0]}. Fix the cost function.")
  prefix = [0.0]
  for c in costs:
    prefix.append(prefix[-1] + float(c))

  @functools.lru_cache(maxsize=None)
  def best(i: int, s: int) -> tuple[float, tuple[int, ...]]:
    # Split layers i..n-1 into s stages; returns (max stage cost, boundaries).
    if s == 1:
      return prefix[n] - prefix[i], ()
    result: tuple[float, tuple[int, ...]] = (float("inf"), ())
    for j in range(i + 1, n - s + 2):
      rest_cost, rest = best(j, s - 1)
      cand = (max(prefix[j] - prefix[i], rest_cost), (j,) + rest)
      if cand[0] < result[0]:
        result = cand
    return result

  return best(0, num_stages)[1]


def _check_count(num_layers: int, num_stages: int) -> None:
  if not isinstance(num_stages, int) or num_stages < 1:
    raise ValueError(f"num_stages must be a positive int, got {num_stages!r}.")
  if num_stages > num_layers:
    raise ValueError(f"Cannot cut {num_layers} layers into {num_stages} stages: every stage needs "
                     f"at least one layer. Use at most {num_layers} stages (or a deeper model).")


def check_boundaries(boundaries: Sequence[int], num_layers: int,
                     num_stages: int) -> tuple[int, ...]:
  """Validates explicit boundaries (first layer index of stages 1..S-1)."""
  _check_count(num_layers, num_stages)
  b = tuple(int(x) for x in boundaries)
  if len(b) != num_stages - 1:
    raise ValueError(f"{num_stages} stages need {num_stages - 1} boundaries (the first layer index "
                     f"of stages 1..{num_stages - 1}); got {len(b)}: {list(b)}.")
  prev = 0
  for x in b:
    if not prev < x < num_layers:
      raise ValueError(f"Stage boundaries must be strictly increasing layer indices in "
                       f"1..{num_layers - 1}; got {list(b)} (bad value {x}).")
    prev = x
  return b


def partition(model: model_lib.SequentialModel, num_stages: int, *,
              boundaries: Sequence[int] | None = None, cost: str | CostFn = "params",
              example_inputs: Any = None) -> tuple[StageSpec, ...]:
  """Groups the model's consecutive layers into ``num_stages`` stages.

  Args:
    model: the model to cut.
    num_stages: number of stages (ranks x virtual stages per rank).
    boundaries: optional first-layer index of each stage after the first; if given, used as is.
    cost: balancing cost when ``boundaries`` is None: ``"params"``, ``"flops"`` or a callable.
    example_inputs: one microbatch of inputs, needed for ``"flops"`` and callables (and for
      ``"params"`` too, since parameter shapes may depend on input shapes).

  Returns:
    The stages in model order.

  Raises:
    ValueError: more stages than layers, malformed boundaries, or missing example inputs.
  """
  n = len(model.layers)
  if boundaries is not None:
    b = check_boundaries(boundaries, n, num_stages)
  else:
    _check_count(n, num_stages)
    if example_inputs is None:
      raise ValueError("partition() needs example_inputs (one microbatch) to measure layer costs "
                       "when no explicit boundaries are given.")
    b = balance(layer_costs(model, example_inputs, cost), num_stages)
  starts = (0,) + b
  stops = b + (n,)
  return tuple(
      StageSpec(i, s, e, tuple(l.name for l in model.layers[s:e]))
      for i, (s, e) in enumerate(zip(starts, stops)))
