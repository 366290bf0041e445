"""Evaluation forwards on a pipeline's own stages, without gathering the model.

The trainer's periodic metrics that need more than the loss (TRM accuracy, MoE expert load) run
the model through :func:`walk`. Where the backend hands out its stages where they live
(``Pipeline.decodes_in_place``: ``single``, ``mpmd``, and ``spmd`` when every rank lies in one
process, through the backend's ``stage_params`` hook), stage ``s`` runs on its rank's devices and
its activations are transferred to the next stage's devices (rows split over the rank's ``dp``
devices when they divide), as :mod:`hkpipe._src.pipelined_decode` does for decoding: no device
ever holds more than its rank's parameters. Across processes the values move through the
transfer servers (:mod:`hkpipe._src.stage_link`): every process walks the same stages, runs the
ones it owns, the first stage's owner feeds its batch, and the extra outputs and the metric
(:func:`on_last`) are sent to every process. Rows split over ``dp`` devices may change
activations in their last bits (other matmul shapes); the metrics built on them (argmax
accuracy, top-k expert counts) equal the gathered model's in the tests. Where it cannot
(``pmap``, whose parameters are replicated on every device by design; an ``spmd`` mesh with a
rank on several processes), :func:`stages` gathers the model explicitly with
``Pipeline.params`` (a collective across processes: every process calls it) onto this process's
first local device, as one stage holding every layer.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import numpy as np

from hkpipe._src import pipelined_decode
from hkpipe._src import stage_link
from hkpipe._src.models import moe

# stage_fn(layer_names, stage_params, x) -> (x for the next stage, this stage's extra outputs)
StageFn = Callable[[tuple[str, ...], Any, Any], tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class Stages:
  """A model cut into consecutive stages, each one's parameters where it is to run.

  Attributes:
    layer_names: per stage, its layers' names in model order.
    params: per stage, ``{layer_name: params}`` on the stage's devices (across processes: the
      stages of other processes as their shapes, ``jax.ShapeDtypeStruct`` s).
    in_place: False where the model was gathered onto one device (one stage).
    link: each stage's devices, and how values move between stages (across processes: through
      the transfer servers).
  """

  layer_names: tuple[tuple[str, ...], ...]
  params: tuple[Any, ...]
  in_place: bool
  link: stage_link.Link

  @property
  def devices(self) -> tuple[tuple[Any, ...], ...]:
    """Per stage, the devices it runs on (its rank's devices)."""
    return self.link.stage_devices

  def sharding(self, stage: int, rows: int) -> jax.sharding.Sharding:
    """Where stage ``stage``'s activations of ``rows`` rows live (see ``pipelined_decode``)."""
    return pipelined_decode.stage_sharding(self.params[stage], self.devices[stage], rows)


def _leaf_devices(params: Any) -> tuple[Any, ...]:
  """The devices the first array of ``params`` lives on (in a stable order)."""
  leaf = jax.tree.leaves(params)[0]
  return tuple(sorted(leaf.sharding.device_set, key=lambda d: d.id))


def stages(pipe: Any, state: Any) -> Stages:
  """``state``'s parameters per stage where they live, or gathered where the backend cannot.

  Every process calls it (across processes the walks that follow are collective, and the
  fallback's ``Pipeline.params`` is a collective).
  """
  names = tuple(layer.name for layer in pipe.model.layers)
  if pipe.decodes_in_place:
    layout, per_stage = pipe.backend.stage_params(state)
    if layout is None:  # the whole model on one device (backend="single")
      return Stages((names,), (per_stage[0],), True,
                    stage_link.local((_leaf_devices(per_stage[0]),)))
    return Stages(tuple(tuple(spec.layer_names) for spec in layout.stages), tuple(per_stage),
                  True, stage_link.of_layout(layout, pipe.backend.stage_channel()))
  # Explicit gather: pmap (replicated by design) and spmd meshes with a rank on several
  # processes.
  device = jax.local_devices()[0]
  params = jax.device_put(jax.device_get(pipe.params(state)), device)
  return Stages((names,), (params,), False, stage_link.local(((device,),)))


def _rows(x: Any) -> int:
  return int(np.shape(jax.tree.leaves(x)[0])[0])


def walk(staged: Stages, stage_fn: StageFn, x: Any, tag: tuple = ()) -> tuple[Any, list]:
  """Runs ``x`` (``[B, ...]`` rows first, on the host) through every stage in model order.

  Stage ``s`` calls ``stage_fn(layer_names[s], params[s], x)`` (a jitted function: it runs on
  the stage's devices, where its parameters and the transferred ``x`` live). Across processes
  every process calls this (``tag``: a name unique within the ``Stages``' walks, e.g. the
  batch's index); the first stage's owner feeds its own ``x``, each process runs the stages it
  owns, and every stage's extra outputs are sent to every process.

  Returns:
    ``(outputs of the last stage, [each stage's extra outputs])``; the outputs are their
    shapes (``jax.ShapeDtypeStruct`` s) on processes that do not own the last stage.
  """
  link, rows, extras = staged.link, _rows(x), []
  aval = stage_link.abstract(x)
  for s, names in enumerate(staged.layer_names):
    mine = link.owns(s)
    where = staged.sharding(s, rows) if mine else None
    if s == 0:
      x = jax.device_put(x, where) if mine else None
    else:
      x = link.move(("eval",) + tag + (s,), x, s - 1, s, where, aval)
    if link.across:  # what a process receiving this stage's outputs must expect
      aval, extra_aval = jax.eval_shape(functools.partial(stage_fn, names),
                                        stage_link.abstract(staged.params[s]), aval)
    x, extra = stage_fn(names, staged.params[s], x) if mine else (None, None)
    if link.across and jax.tree.leaves(extra_aval):
      extra = link.share(("extra",) + tag + (s,), extra, s, extra_aval)
    extras.append(extra)
  return (x if link.owns(len(staged.layer_names) - 1) else aval), extras


def on_last(staged: Stages, fn: Callable[..., Any], outputs: Any, inputs: tuple,
            tag: tuple = ()) -> Any:
  """``fn(outputs, *inputs)`` on the last stage's first device, as host values on every process.

  ``outputs``: :func:`walk`'s; ``inputs``: host values of the batch (e.g. its inputs and
  labels), the first stage's owner's (the rows the walk ran). On one device the metric's
  reductions (means of per-row means) run in one device's order, as on the gathered model's
  device, rather than summed across the rank's ``dp`` devices.
  """
  link, last = staged.link, len(staged.layer_names) - 1
  device = staged.devices[last][0]
  if link.across:
    in_avals = stage_link.abstract(tuple(inputs))
    aval = jax.eval_shape(fn, stage_link.abstract(outputs), *in_avals)
    inputs = link.move(("inputs",) + tag, tuple(inputs), 0, last, device, in_avals)
  result = (fn(*jax.device_put((outputs, *inputs), device)) if link.owns(last) else None)
  if link.across:
    result = link.share(("result",) + tag, result, last, aval)
  return jax.device_get(result)


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
  per_stage = jax.device_get(extras)  # across processes: sent to every process by walk
  return {k: np.concatenate([e[k] for e in per_stage], axis=0) for k in ("load", "dropped")}
