"""Layers and sequential models: the unit every partitioner and backend works on.

A model is an ordered tuple of :class:`Layer` objects plus a loss. Each layer wraps a pure
``hk.Transformed`` of ``fn(x)`` or ``fn(x, is_training)`` that maps one activation to the next.
Parameters always live in the *canonical layout* ``dict[layer_name, hk.Params]``, whatever the
pipeline layout, so checkpoints move freely between backends and stage counts.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

Params = Mapping[str, Any]  # canonical: {layer_name: hk.Params}
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def _takes_is_training(name: str, transformed: Any) -> bool:
  """Whether a layer's Haiku function takes ``is_training``; rejects any other signature.

  ``hk.transform`` keeps the user function's signature on ``apply`` (after ``params, rng``), so
  ``fn(x)`` and ``fn(x, is_training)`` are told apart here, when the layer is built.

  Raises:
    TypeError: for anything that is not an ``hk.Transformed`` of ``fn(x)`` or
      ``fn(x, is_training)``, with the expected signatures in the message.
  """
  expected = ("a Haiku function fn(x) or fn(x, is_training) -> y wrapped by hk.transform "
              "(or hkpipe.Layer.from_fn(name, fn))")
  if isinstance(transformed, hk.TransformedWithState) or not isinstance(transformed,
                                                                        hk.Transformed):
    raise TypeError(f"Layer {name!r}: transformed must be {expected}; got "
                    f"{type(transformed).__name__}. Layers are stateless: use hk.transform, not "
                    "hk.transform_with_state.")
  try:
    sig = inspect.signature(transformed.apply)
  except (TypeError, ValueError):  # no signature to read: call it the documented way
    return True
  params = list(sig.parameters.values())[2:]  # after (params, rng)
  kinds = inspect.Parameter
  positional = [p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD,
                                                kinds.VAR_POSITIONAL)]
  required = [p.name for p in params if p.default is p.empty
              and p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)]
  # x is the first positional parameter; is_training the only other one that may be required.
  extra = [n for n in required if n != "is_training" and (not positional or n != positional[0].name)]
  if not positional or positional[0].name == "is_training" or extra:
    raise TypeError(f"Layer {name!r}: the function must be {expected}; got "
                    f"fn({', '.join(str(p) for p in params)}). Bind other arguments with "
                    "functools.partial or a closure.")
  takes = any(p.name == "is_training" or p.kind == kinds.VAR_KEYWORD for p in params)
  return takes


@dataclasses.dataclass(frozen=True)
class Layer:
  """One pure step of a model: ``x -> y`` with its own Haiku parameters.

  Attributes:
    name: unique name of the layer inside its model; the key of its parameters in the canonical
      layout.
    transformed: a ``hk.Transformed`` (from ``hk.transform``) of a function ``fn(x) -> y`` or
      ``fn(x, is_training) -> y`` (``is_training`` is passed only to functions that take it, e.g.
      for dropout). Shapes and dtypes may change (tokens -> hidden -> logits). Any other signature
      is rejected when the layer is built.
  """

  name: str
  transformed: hk.Transformed
  takes_is_training: bool = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise TypeError(f"Layer name must be a non-empty str, got {self.name!r}.")
    object.__setattr__(self, "takes_is_training",
                       _takes_is_training(self.name, self.transformed))

  @classmethod
  def from_fn(cls, name: str, fn: Callable[..., Any]) -> "Layer":
    """Builds a layer from a Haiku function ``fn(x) -> y`` or ``fn(x, is_training) -> y``."""
    return cls(name, hk.transform(fn))

  def _kwargs(self, is_training: bool) -> dict:
    return {"is_training": is_training} if self.takes_is_training else {}

  def init(self, rng: jax.Array, x: Any) -> hk.Params:
    """Initialises this layer's parameters for an example input ``x``."""
    return self.transformed.init(rng, x, **self._kwargs(False))

  def apply(self, params: hk.Params, rng: jax.Array | None, x: Any, *, is_training: bool) -> Any:
    """Applies the layer. ``rng`` may be ``None`` when ``is_training`` is False."""
    return self.transformed.apply(params, rng, x, **self._kwargs(is_training))


@dataclasses.dataclass(frozen=True)
class Tie:
  """Declares two parameters that are one weight (e.g. GPT's token embedding and LM head).

  Both copies live in the canonical layout (so each pipeline stage owns the copy it uses). They are
  initialised equal and every backend replaces both gradients by their sum (see :func:`tie_grads`),
  so any elementwise optimizer keeps them bit-identical: mathematically one shared weight.

  Attributes:
    source: ``(layer_name, module_name, param_name)`` of the original weight.
    target: ``(layer_name, module_name, param_name)`` of the copy; same shape and dtype.
  """

  source: tuple[str, str, str]
  target: tuple[str, str, str]


def _get(params: Params, path: tuple[str, str, str]) -> jax.Array:
  layer, module, name = path
  return params[layer][module][name]


def _set(params: Params, path: tuple[str, str, str], value: jax.Array) -> dict:
  layer, module, name = path
  out = dict(params)
  out[layer] = dict(out[layer])
  out[layer][module] = dict(out[layer][module])
  out[layer][module][name] = value
  return out


def tie_params(params: Params, ties: Sequence[Tie]) -> dict:
  """Returns ``params`` with every tie's target set to its source."""
  out = dict(params)
  for tie in ties:
    out = _set(out, tie.target, _get(out, tie.source))
  return out


def tie_grads(grads: Params, ties: Sequence[Tie]) -> dict:
  """Returns ``grads`` with both sides of every tie replaced by their sum."""
  out = dict(grads)
  for tie in ties:
    total = _get(out, tie.source) + _get(out, tie.target)
    out = _set(_set(out, tie.source, total), tie.target, total)
  return out


def layer_rng(rng: jax.Array | None, index: int) -> jax.Array | None:
  """The dropout key of layer ``index`` (its global position in the model), or None."""
  return None if rng is None else jax.random.fold_in(rng, index)


def microbatch_rng(rng: jax.Array | None, step: Any, microbatch: Any) -> jax.Array | None:
  """The key of one microbatch of one step: the same on every backend and partitioning."""
  if rng is None:
    return None
  return jax.random.fold_in(jax.random.fold_in(rng, step), microbatch)


@dataclasses.dataclass(frozen=True)
class SequentialModel:
  """An ordered chain of layers plus a loss ``loss_fn(outputs, targets) -> scalar``.

  Attributes:
    layers: the layers in model order; names must be unique.
    loss_fn: maps the last layer's outputs and the batch targets to a scalar loss (mean over the
      microbatch, so that averaging microbatch losses gives the batch loss).
    ties: parameters shared between layers (see :class:`Tie`).
  """

  layers: tuple[Layer, ...]
  loss_fn: LossFn
  ties: tuple[Tie, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "layers", tuple(self.layers))
    object.__setattr__(self, "ties", tuple(self.ties))
    if not self.layers:
      raise ValueError("SequentialModel needs at least one layer; got an empty list.")
    names = [layer.name for layer in self.layers]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
      raise ValueError(f"SequentialModel layer names must be unique; duplicated: {dupes}. "
                       "Give each layer its own name.")
    for tie in self.ties:
      for side in (tie.source, tie.target):
        if side[0] not in names:
          raise ValueError(f"Tie refers to layer {side[0]!r}, which is not in the model "
                           f"(layers: {names}).")

  @property
  def layer_names(self) -> tuple[str, ...]:
    return tuple(layer.name for layer in self.layers)

  def init(self, rng: jax.Array, inputs: Any) -> dict:
    """Canonical parameters ``{layer_name: params}`` for example ``inputs``."""
    params = {}
    x = inputs
    for i, layer in enumerate(self.layers):
      params[layer.name] = layer.init(jax.random.fold_in(rng, i), x)
      x = jax.eval_shape(lambda p, v, l=layer: l.apply(p, None, v, is_training=False),
                         params[layer.name], x)
      x = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), x)
    return tie_params(params, self.ties)

  def apply_range(self, params: Params, x: Any, start: int, stop: int, *,
                  rng: jax.Array | None = None, is_training: bool = False) -> Any:
    """Applies layers ``start..stop-1`` (a pipeline stage) with per-layer dropout keys."""
    for i in range(start, stop):
      layer = self.layers[i]
      x = layer.apply(params[layer.name], layer_rng(rng, i), x, is_training=is_training)
    return x

  def apply(self, params: Params, inputs: Any, *, rng: jax.Array | None = None,
            is_training: bool = False) -> Any:
    """Runs the whole chain and returns the last layer's outputs (e.g. logits)."""
    return self.apply_range(params, inputs, 0, len(self.layers), rng=rng, is_training=is_training)

  def loss(self, params: Params, inputs: Any, targets: Any, *, rng: jax.Array | None = None,
           is_training: bool = False) -> jax.Array:
    """Scalar loss of one (micro)batch."""
    return self.loss_fn(self.apply(params, inputs, rng=rng, is_training=is_training), targets)


def count_params(params: Params, ties: Sequence[Tie] = ()) -> int:
  """Number of scalar parameters, counting each tied weight once."""
  total = sum(int(x.size) for x in jax.tree.leaves(params))
  return total - sum(int(_get(params, t.target).size) for t in ties)


def cast_floating(tree: Any, dtype: Any) -> Any:
  """Casts every floating-point leaf of ``tree`` to ``dtype`` (integers untouched)."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x, tree)


def with_compute_dtype(layer: Layer, dtype: Any) -> Layer:
  """Mixed precision: parameters stay in their stored dtype (fp32), compute runs in ``dtype``.

  Float parameters and float inputs are cast to ``dtype`` inside the layer, so gradients flow back
  to fp32 parameters through the cast.
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return layer
  base = layer.transformed

  def init(rng, x, **kwargs):
    # Parameters are created in fp32 whatever the dtype of the incoming activation.
    return base.init(rng, cast_floating(x, jnp.float32), **kwargs)

  def apply(params, rng, x, **kwargs):
    return base.apply(cast_floating(params, dtype), rng, cast_floating(x, dtype), **kwargs)

  return Layer(layer.name, hk.Transformed(init=init, apply=apply))
