"""Building the spmd ``_Plan``: the layout, where each rank's parameters and optimizer state
live in its packed buffers (every leaf aligned to ``fsdp x tp`` columns, see ``_columns``;
padded to the largest rank), the ties and the schedule's tick tables. Pure functions of shapes:
nothing is compiled."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import optax
from jax.sharding import PartitionSpec as P

from hkpipe._src import layout as layout_lib
from hkpipe._src import model as model_lib
from hkpipe._src import options as options_lib
from hkpipe._src import stage as stage_lib
from hkpipe._src.backends.mpmd import _shard as rules_lib
from hkpipe._src.backends.spmd import _pack as pack
from hkpipe._src.backends.spmd import _tables as tables_lib
from hkpipe._src.backends.spmd import _zero as zero
from hkpipe._src.backends.spmd._plan import _Plan, _Tie
from hkpipe.schedules import _ir


def make_plan(model: model_lib.SequentialModel, optimizer: optax.GradientTransformation,
              options: options_lib.PipelineOptions, param_avals: Mapping[str, Any],
              example_microbatch: Any, state_shards: int) -> _Plan:
  """The plan for these parameter shapes.

  Args:
    model: the model.
    optimizer: the optimizer (its state's shapes are laid out per rank).
    options: the pipeline options.
    param_avals: ``{layer: params}`` shapes of the whole model.
    example_microbatch: one microbatch (for cost-balanced partitioning), or None.
    state_shards: ``fsdp x tp``: buffer lengths are rounded up to a multiple of it.

  Raises:
    ConfigError: bad sharding rules for these shapes and this mesh (checked so that options
      move between backends, although spmd splits every buffer evenly whatever they say).
  """
  layout = layout_lib.resolve(model, options, example_microbatch, inner=True)
  specs = rules_lib.canonical_specs(model, options, layout, param_avals)
  schedule = layout.schedule
  if not isinstance(schedule, _ir.Schedule):
    raise TypeError(f"options.schedule resolved to {type(schedule).__name__}; expected a "
                    "hkpipe.schedules Schedule.")
  p = layout.num_ranks
  stage_layouts: list[pack.FlatLayout | None] = [None] * len(layout.stages)
  rank_layouts = []
  for r in range(p):
    base: dict[str, int] = {}
    for s in schedule.stages_of_rank(r):
      tree = {n: param_avals[n] for n in layout.stages[s].layer_names}
      lay = pack.FlatLayout.of(tree, base, align=state_shards)
      stage_layouts[s] = lay
      base = dict(lay.ends)
      rank_layouts.append(lay)
  opt_layouts = []
  for r in range(p):
    rank_params = {n: param_avals[n] for s in schedule.stages_of_rank(r)
                   for n in layout.stages[s].layer_names}
    opt_layouts.append(pack.FlatLayout.of(jax.eval_shape(optimizer.init, rank_params),
                                          align=state_shards))
  assert all(lay is not None for lay in stage_layouts)
  tp = jax.tree.map(tp_only, specs, is_leaf=lambda x: isinstance(x, P))
  plan = _Plan(layout=layout, stage_layouts=tuple(stage_layouts),  # type: ignore[arg-type]
               stage_tp_specs=tuple({n: tp[n] for n in st.layer_names} for st in layout.stages),
               param_sizes=zero.padded(pack.padded_sizes(rank_layouts), state_shards),
               opt_layouts=tuple(opt_layouts),
               opt_sizes=zero.padded(pack.padded_sizes(opt_layouts), state_shards),
               ties=(), tables=tables_lib.build(schedule))
  return dataclasses.replace(plan, ties=locate_ties(model, plan))


def tp_only(spec: P) -> P:
  """A rule's spec with only its ``"tp"`` entries (``fsdp`` is the ZeRO-3 split on spmd)."""
  keep = lambda e: ("tp" if e == "tp" or (isinstance(e, tuple) and "tp" in e) else None)
  return P(*(keep(e) for e in spec))


def locate_ties(model: model_lib.SequentialModel, plan: _Plan) -> tuple[_Tie, ...]:
  """Where both sides of every tie live in each device's pieces of the parameter buffers: their
  first column and width (``_columns``); both sides have the same shape, so a device holds the
  same part of each."""
  trees = [lay.treedef.unflatten(lay.avals) for lay in plan.stage_layouts]
  names = [st.layer_names for st in plan.layout.stages]
  out = []
  for tie in stage_lib.locate_ties(model.ties, trees, names):
    sides = []
    for s, leaf in (tie.source, tie.target):
      lay = plan.stage_layouts[s]
      k, off, size = lay.slots[leaf]
      col, width = off // lay.align, -(-size // lay.align)
      on = tuple(r == plan.rank_of(s) for r in range(plan.num_ranks))
      sides.append((k, width, on, tuple(col if o else 0 for o in on)))
    (k, size, src_on, src_off), (_, _, tgt_on, tgt_off) = sides
    out.append(_Tie(k, size, src_on, src_off, tgt_on, tgt_off))
  return tuple(out)
