"""What one pipeline stage computes, shared by the ``spmd`` and ``mpmd`` backends.

- :func:`apply_layers` / :func:`stage_output`: apply a contiguous range of layers (per-layer
  dropout keys), and on the last stage the loss.
- :func:`vjp_with_stash` / :func:`rebuild_pullback`: a forward under ``jax.vjp`` whose pullback is
  split into a static structure (:class:`Residuals`), the residuals that are inputs the backward
  gets again anyway (parameters, stage inputs), and the rest: the *stash* a schedule keeps between
  a microbatch's forward and its backward.
- :func:`locate_ties`: where both sides of every :class:`~hkpipe.Tie` live, as (stage, leaf index)
  in each stage's own parameter tree.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from hkpipe._src import model as model_lib


def apply_layers(layers: Sequence[model_lib.Layer], params: Sequence[Any], x: Any,
                 key: jax.Array | None, indices: Any, is_training: bool) -> Any:
  """Applies ``layers`` in order, layer ``j`` with ``params[j]`` and the dropout key
  ``layer_rng(key, indices[j])`` (``indices``: the layers' global positions in the model, ints or
  a traced int array, so that identical stages may share one program)."""
  for j, layer in enumerate(layers):
    x = layer.apply(params[j], model_lib.layer_rng(key, indices[j]), x, is_training=is_training)
  return x


def stage_output(model: model_lib.SequentialModel, start: int, stop: int, params: Sequence[Any],
                 x: Any, key: jax.Array | None, indices: Any, targets: Any, is_training: bool) -> Any:
  """Layers ``start..stop-1`` applied to ``x``; when they end the model, the float32 loss
  against ``targets`` instead of the outputs."""
  y = apply_layers(model.layers[start:stop], params, x, key, indices, is_training)
  if stop == len(model.layers):
    return model.loss_fn(y, targets).astype(jnp.float32)
  return y


@dataclasses.dataclass(frozen=True)
class Residuals:
  """How to rebuild a forward's ``jax.vjp`` pullback in the backward.

  Attributes:
    tree: treedef of the pullback (a pytree whose leaves are its residual arrays; its static part
      does not depend on the trace, so a structure recorded once rebuilds it in another program).
    source: per residual leaf, ``("in", i)`` (it is kept input ``i``, passed to the backward
      again instead of being stashed) or ``("out", k)`` (stash entry ``k``).
    num_out: number of stash entries.
  """

  tree: Any = None
  source: tuple[tuple[str, int], ...] = ()
  num_out: int = 0


def vjp_with_stash(fn: Callable[..., Any], primals: Sequence[Any],
                   kept: Sequence[Any]) -> tuple[Any, Any, Residuals, list]:
  """``jax.vjp(fn, *primals)``, with its pullback split for stashing.

  Args:
    fn: the stage's forward (e.g. :func:`stage_output` of parameters and input).
    primals: its differentiated arguments.
    kept: arrays the backward receives again (e.g. the parameter leaves, the forward's inputs):
      residuals that are one of them (by identity) are not stashed.

  Returns:
    ``(output, pullback, residuals, stash)``: the stash holds each other residual once.
  """
  y, pullback = jax.vjp(fn, *primals)
  leaves, tree = jax.tree.flatten(pullback)
  by_id = {id(v): i for i, v in enumerate(kept)}
  source: list[tuple[str, int]] = []
  stash: list[Any] = []
  stashed: dict[int, int] = {}
  for leaf in leaves:
    i = by_id.get(id(leaf))
    if i is not None and kept[i] is leaf:
      source.append(("in", i))
    else:
      if id(leaf) not in stashed:
        stashed[id(leaf)] = len(stash)
        stash.append(leaf)
      source.append(("out", stashed[id(leaf)]))
  return y, pullback, Residuals(tree, tuple(source), len(stash)), stash


def rebuild_pullback(residuals: Residuals, kept: Sequence[Any], stash: Sequence[Any]) -> Any:
  """The pullback :func:`vjp_with_stash` split, from the kept inputs and the stash."""
  leaves = [kept[i] if kind == "in" else stash[i] for kind, i in residuals.source]
  return jax.tree.unflatten(residuals.tree, leaves)


@dataclasses.dataclass(frozen=True)
class TieSides:
  """Where a tie's two sides live: ``(stage, leaf index)`` of its source and of its target, the
  leaf index counting in the flattening of the stage's own parameter tree."""

  source: tuple[int, int]
  target: tuple[int, int]


def locate_ties(ties: Sequence[model_lib.Tie], stage_params: Sequence[Any],
                stage_layers: Sequence[Sequence[str]]) -> tuple[TieSides, ...]:
  """Locates every tie in the stages' parameter trees.

  Args:
    ties: the model's ties.
    stage_params: per stage, its parameter tree (arrays or shapes) as the backend flattens it:
      ``{layer_name: params}``, or a tuple of per-layer params in stage layer order.
    stage_layers: per stage, its layer names in order.

  Returns:
    One :class:`TieSides` per tie.
  """
  where: dict[str, tuple[int, Any]] = {}
  for s, (tree, names) in enumerate(zip(stage_params, stage_layers)):
    leaves, treedef = jax.tree.flatten(tree)
    numbered = jax.tree.unflatten(treedef, list(range(len(leaves))))
    by_layer = numbered if isinstance(numbered, Mapping) else dict(zip(names, numbered))
    for name in names:
      where[name] = (s, by_layer[name])

  def side(path: tuple[str, str, str]) -> tuple[int, int]:
    layer, module, name = path
    s, numbered = where[layer]
    return s, int(numbered[module][name])

  return tuple(TieSides(side(t.source), side(t.target)) for t in ties)
