"""Where every MPMD stage's parameters, gradients and optimizer state live inside its rank.

Each rank's devices form a sub-mesh ``("dp", "fsdp", "tp")`` (``Layout.rank_mesh``). A stage's
parameter leaves (and its gradient accumulator, same layout) get the ``PartitionSpec`` the
pipeline's sharding rules give them (``hkpipe._src.sharding``; default rules from
``model_rules``); its optimizer state follows them; scalars are replicated. A weight tied across
stages (GPT's embedding and head) is sharded by the rules on both of its stages: the tie exchange
(``_interp``) moves each gradient into its partner leaf's own sharding.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hkpipe._src import layout as layout_lib
from hkpipe._src import model_rules
from hkpipe._src import sharding as sharding_lib


def _is_spec(x: Any) -> bool:
  return isinstance(x, P)


def rules_of(model: Any, options: Any, layout: layout_lib.Layout) -> sharding_lib.Rules:
  """The pipeline's rules: ``options.sharding_rules``, else the model's default."""
  if options.sharding_rules is not None:
    return options.sharding_rules
  return model_rules.default_rules(model, axis_sizes(layout))


def axis_sizes(layout: layout_lib.Layout) -> dict[str, int]:
  """Sizes of the inner axes the mesh has (a rule naming another is an error)."""
  return {a: layout.axis_sizes[a] for a in layout.inner_axes}


def stage_param_specs(model: Any, options: Any, layout: layout_lib.Layout,
                      stage_params: Sequence[tuple[Any, ...]]) -> list[tuple[P, ...]]:
  """Per stage, the ``PartitionSpec`` of each flat parameter leaf (stage layer order).

  Args:
    model: the model (its layer order and, for default rules, its config).
    options: the pipeline options (``sharding_rules``).
    layout: the layout (stages, inner mesh axes).
    stage_params: per stage, a tuple of per-layer parameter trees (arrays or shapes).

  Raises:
    ConfigError: from ``sharding.resolve`` (bad rules for these shapes and this mesh).
  """
  names = [spec.layer_names for spec in layout.stages]
  canonical = {n: tree for ns, trees in zip(names, stage_params) for n, tree in zip(ns, trees)}
  specs = canonical_specs(model, options, layout, canonical)
  return [tuple(jax.tree.leaves(tuple(specs[n] for n in ns), is_leaf=_is_spec)) for ns in names]


def canonical_specs(model: Any, options: Any, layout: layout_lib.Layout,
                    param_shapes: Any) -> dict:
  """``{layer: tree of PartitionSpec}`` of the pipeline's rules for canonical parameter shapes
  (``{layer: params}``; model order).

  Raises:
    ConfigError: from ``sharding.resolve`` (bad rules for these shapes and this mesh).
  """
  canonical = {layer.name: param_shapes[layer.name] for layer in model.layers}
  return sharding_lib.resolve(canonical, rules_of(model, options, layout), axis_sizes(layout))


def named(mesh: jax.sharding.Mesh, specs: Sequence[P]) -> list[NamedSharding]:
  return [NamedSharding(mesh, s) for s in specs]


def opt_shardings(optimizer: Any, stage_dict_shapes: Any, stage_dict_shardings: Any,
                  replicated: NamedSharding) -> list:
  """Flat shardings of ``optimizer.init`` of a stage's ``{layer_name: params}`` (leaf order)."""
  tree = sharding_lib.opt_state_shardings(optimizer, stage_dict_shapes, stage_dict_shardings,
                                          replicated)
  return jax.tree.leaves(tree)
