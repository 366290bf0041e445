"""Canonical-tree helpers: cut a canonical-layout pytree into per-stage pieces and join them back.

The canonical layout is ``{layer_name: params}`` (and optimizer states that embed such dicts);
every backend converts to and from it with these two pure functions, so checkpoints move freely
between backends and stage counts.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence


def restrict(tree: Any, names: Sequence[str], all_names: Sequence[str]) -> Any:
  """Restricts a canonical-layout pytree (params, grads or optimizer state) to some layers.

  Every dict whose keys are exactly ``all_names`` (a canonical params-shaped subtree, as optax
  states embed them) is cut down to ``names``; everything else (step counters...) is kept.
  """
  full, keep = set(all_names), list(names)

  def go(node):
    if isinstance(node, Mapping) and set(node.keys()) == full:
      return {k: node[k] for k in keep}
    if isinstance(node, Mapping):
      return {k: go(v) for k, v in node.items()}
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      return type(node)(*(go(v) for v in node))
    if isinstance(node, (tuple, list)):
      return type(node)(go(v) for v in node)
    return node

  return go(tree)


def merge(parts: Sequence[Any], part_names: Sequence[Sequence[str]]) -> Any:
  """Inverse of :func:`restrict`: joins per-stage trees back into the canonical layout.

  Dicts keyed by a stage's layer names are unioned in model order; other leaves (counters) are
  taken from the first part.
  """
  names0 = set(part_names[0])

  def go(nodes):
    node = nodes[0]
    if isinstance(node, Mapping) and set(node.keys()) == names0:
      out: dict = {}
      for n in nodes:
        out.update(n)
      return out
    if isinstance(node, Mapping):
      return {k: go([n[k] for n in nodes]) for k in node}
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      return type(node)(*(go([n[i] for n in nodes]) for i in range(len(node))))
    if isinstance(node, (tuple, list)):
      return type(node)(go([n[i] for n in nodes]) for i in range(len(node)))
    return node

  return go(list(parts))
