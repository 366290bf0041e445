"""Evaluation forwards on a pipeline's own stages, without gathering the model.

The trainer's periodic metrics that need more than the loss (TRM accuracy, MoE expert load) run
the model through :func:`walk`. Where the backend hands out its stages where they live
(``Pipeline.decodes_in_place``: ``single``, and ``mpmd`` and ``spmd`` in one process, through the
backend's ``stage_params`` hook), stage ``s`` runs on its rank's devices, its activations are
transferred to the next stage's devices (rows split over the rank's ``dp`` devices when they
divide), as :mod:`hkpipe._src.pipelined_decode` does for decoding: no device ever holds more
than its rank's parameters. Rows split over ``dp`` devices may change activations in their last
bits (other matmul shapes); the metrics built on them (argmax accuracy, top-k expert counts)
equal the gathered model's in the tests. Where it cannot (``pmap``, whose parameters are replicated on every
device by design; ``mpmd`` and ``spmd`` across processes), :func:`stages` gathers the model
explicitly with ``Pipeline.params`` (a collective across processes: every process calls it) onto
this process's first local device, as one stage holding every layer.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import numpy as np

from hkpipe._src import pipelined_decode
from hkpipe._src.models import moe

# stage_fn(layer_names, stage_params, x) -> (x for the next stage, this stage's extra outputs)
StageFn = Callable[[tuple[str, ...], Any, Any], tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class Stages:
  """A model cut into consecutive stages, each one's parameters where it is to run.

  Attributes:
    layer_names: per stage, its layers' names in model order.
    params: per stage, ``{layer_name: params}`` on the stage's devices.
    devices: per stage, the devices it runs on (its rank's devices).
    in_place: False where the model was gathered onto one device (one stage).
  """

  layer_names: tuple[tuple[str, ...], ...]
  params: tuple[Any, ...]
  devices: tuple[tuple[Any, ...], ...]
  in_place: bool

  def sharding(self, stage: int, rows: int) -> jax.sharding.Sharding:
    """Where stage ``stage``'s activations of ``rows`` rows live (see ``pipelined_decode``)."""
    return pipelined_decode.stage_sharding(self.params[stage], self.devices[stage], rows)


def _leaf_devices(params: Any) -> tuple[Any, ...]:
  """The devices the first array of ``params`` lives on (in a stable order)."""
  leaf = jax.tree.leaves(params)[0]
  return tuple(sorted(leaf.sharding.device_set, key=lambda d: d.id))


def stages(pipe: Any, state: Any) -> Stages:
  """``state``'s parameters per stage where they live, or gathered where the backend cannot.

  Every process calls it (across processes the fallback's ``Pipeline.params`` is a collective).
  """
  names = tuple(layer.name for layer in pipe.model.layers)
  if pipe.decodes_in_place:
    layout, per_stage = pipe.backend.stage_params(state)
    if layout is None:  # the whole model on one device (backend="single")
      return Stages((names,), (per_stage[0],), (_leaf_devices(per_stage[0]),), True)
    return Stages(tuple(tuple(spec.layer_names) for spec in layout.stages), tuple(per_stage),
                  tuple(tuple(layout.stage_devices(s)) for s in range(len(layout.stages))),
                  True)
  # Explicit gather: pmap (replicated by design) and multi-process mpmd / spmd.
  device = jax.local_devices()[0]
  params = jax.device_put(jax.device_get(pipe.params(state)), device)
  return Stages((names,), (params,), ((device,),), False)


def _rows(x: Any) -> int:
  return int(np.shape(jax.tree.leaves(x)[0])[0])


def walk(staged: Stages, stage_fn: StageFn, x: Any) -> tuple[Any, list]:
  """Runs ``x`` (``[B, ...]`` rows first) through every stage in model order.

  Stage ``s`` calls ``stage_fn(layer_names[s], params[s], x)`` (a jitted function: it runs on
  the stage's devices, where its parameters and the transferred ``x`` live).

  Returns:
    ``(outputs of the last stage, [each stage's extra outputs])``.
  """
  rows, extras = _rows(x), []
  for s, names in enumerate(staged.layer_names):
    x = jax.device_put(x, staged.sharding(s, rows))
    x, extra = stage_fn(names, staged.params[s], x)
    extras.append(extra)
  return x, extras


def on_one_device(staged: Stages, tree: Any) -> Any:
  """``tree`` (e.g. the last stage's outputs and the batch's labels) on the last stage's first
  device, so that a metric's reductions (means of per-row means) run in one device's order, as
  on the gathered model's device, rather than summed across the rank's ``dp`` devices."""
  return jax.device_put(tree, staged.devices[-1][0])


def apply_fn(model: Any) -> StageFn:
  """The ``stage_fn`` of ``model.apply`` in evaluation mode (no dropout): each stage applies its
  layers; no extra outputs. Compiled once per stage."""
  index = {name: i for i, name in enumerate(model.layer_names)}

  @functools.partial(jax.jit, static_argnums=(2, 3))
  def run(params: Any, x: Any, start: int, stop: int) -> Any:
    return model.apply_range(params, x, start, stop, is_training=False)

  def stage(names: tuple[str, ...], params: Any, x: Any) -> tuple[Any, None]:
    return run(params, x, index[names[0]], index[names[-1]] + 1), None

  return stage


_expert_load_of = jax.jit(moe.expert_load_of, static_argnums=(0, 1))


def expert_load(config: moe.MoEConfig, staged: Stages, tokens: Any) -> dict[str, np.ndarray]:
  """:func:`hkpipe.models.expert_load` of ``tokens`` (``[B, T]``) computed stage by stage where
  ``staged`` lives: ``{"load": [n_layers, E], "dropped": [n_layers]}`` on the host."""
  def stage(names: Sequence[str], params: Any, x: Any) -> tuple[Any, Any]:
    return _expert_load_of(config, tuple(names), params, x)

  _, extras = walk(staged, stage, np.asarray(tokens, np.int32))
  per_stage = jax.device_get(extras)
  return {k: np.concatenate([e[k] for e in per_stage], axis=0) for k in ("load", "dropped")}
