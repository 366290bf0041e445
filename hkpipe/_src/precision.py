"""Mixed-precision policies (``jmp``-style): which dtype parameters, compute and outputs use.

A :class:`Policy` names three dtypes:

- ``param_dtype``: how parameters are stored and updated (float32 for mixed precision);
- ``compute_dtype``: what a layer computes in: its floating parameters and inputs are cast to it
  on entry (the cast is differentiable, so gradients arrive in ``param_dtype``);
- ``output_dtype``: the dtype of the model's final output (the logits the loss reads).

Numerically sensitive parts stay float32 whatever the policy: the model zoo's norms compute their
statistics in float32, attention's softmax is float32, and the losses cast logits to float32.
The policy is applied per layer (:func:`apply_to_layer`), so a pipeline stage casts its own
parameters and receives its neighbour's activations in the compute dtype.

Spelled as a string (the model configs' ``dtype`` field): ``"float32"`` (everything float32),
``"bfloat16"`` (params float32, compute bfloat16, output float32), or the ``jmp`` form
``"params=float32,compute=bfloat16,output=float32"`` (short keys ``p``, ``c``, ``o`` and short
dtype names ``f32``, ``bf16``, ``f16`` accepted).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import haiku as hk
import jax.numpy as jnp

from hkpipe._src import errors
from hkpipe._src import model as model_lib

_DTYPES = {"float32": jnp.float32, "f32": jnp.float32, "bfloat16": jnp.bfloat16,
           "bf16": jnp.bfloat16, "float16": jnp.float16, "f16": jnp.float16}
_KEYS = {"params": "param_dtype", "p": "param_dtype", "compute": "compute_dtype",
         "c": "compute_dtype", "output": "output_dtype", "o": "output_dtype"}


@dataclasses.dataclass(frozen=True)
class Policy:
  """Dtypes of parameters, compute and outputs (see the module docstring).

  Attributes:
    param_dtype: storage dtype of the parameters.
    compute_dtype: dtype layers compute in.
    output_dtype: dtype of the model's final output.
  """

  param_dtype: Any = jnp.float32
  compute_dtype: Any = jnp.float32
  output_dtype: Any = jnp.float32

  def __post_init__(self):
    for field in ("param_dtype", "compute_dtype", "output_dtype"):
      object.__setattr__(self, field, jnp.dtype(getattr(self, field)))

  def cast_to_param(self, tree: Any) -> Any:
    """Floating leaves of ``tree`` cast to ``param_dtype``."""
    return model_lib.cast_floating(tree, self.param_dtype)

  def cast_to_compute(self, tree: Any) -> Any:
    """Floating leaves of ``tree`` cast to ``compute_dtype``."""
    return model_lib.cast_floating(tree, self.compute_dtype)

  def cast_to_output(self, tree: Any) -> Any:
    """Floating leaves of ``tree`` cast to ``output_dtype``."""
    return model_lib.cast_floating(tree, self.output_dtype)

  @property
  def is_identity(self) -> bool:
    """Whether every dtype is float32 (the policy changes nothing)."""
    return {self.param_dtype, self.compute_dtype, self.output_dtype} == {jnp.dtype(jnp.float32)}


def _dtype(spec: str, name: str) -> Any:
  if name not in _DTYPES:
    raise errors.ConfigError(f"Precision policy {spec!r}: unknown dtype {name!r}; use one of "
                             f"{sorted(_DTYPES)}.")
  return _DTYPES[name]


def get_policy(spec: str | Policy) -> Policy:
  """The :class:`Policy` a string names (a :class:`Policy` is returned as is).

  Raises:
    ConfigError: for anything else, naming the accepted spellings.
  """
  if isinstance(spec, Policy):
    return spec
  if spec == "float32":
    return Policy()
  if spec == "bfloat16":
    return Policy(compute_dtype=jnp.bfloat16)
  if not isinstance(spec, str) or "=" not in spec:
    raise errors.ConfigError(
        f"Precision policy {spec!r} is invalid: use 'float32', 'bfloat16' (bf16 compute, float32 "
        "params and output) or 'params=float32,compute=bfloat16,output=float32'.")
  fields = {}
  for part in spec.split(","):
    key, _, value = part.strip().partition("=")
    if key not in _KEYS:
      raise errors.ConfigError(f"Precision policy {spec!r}: unknown key {key!r}; use params=, "
                               "compute= and output= (or p=, c=, o=).")
    fields[_KEYS[key]] = _dtype(spec, value.strip())
  return Policy(**fields)


def apply_to_layer(layer: model_lib.Layer, policy: Policy, *, last: bool) -> model_lib.Layer:
  """``layer`` under ``policy``: parameters initialised in ``param_dtype``, parameters and floating
  inputs cast to ``compute_dtype`` on entry, and (``last``) array outputs cast to
  ``output_dtype``. A :class:`~hkpipe.models.CachedLayer` gets the same casts on its decode.

  A tuple output of the last layer (e.g. :class:`~hkpipe.models.HeadOutput` for the chunked loss)
  is left in the compute dtype: its loss computes the float32 logits itself.
  """
  if policy.is_identity:
    return layer
  base = layer.transformed

  def out(y):
    return policy.cast_to_output(y) if last and hasattr(y, "dtype") else y

  def init(rng, x, **kwargs):
    return policy.cast_to_param(base.init(rng, model_lib.cast_floating(x, jnp.float32), **kwargs))

  def apply(params, rng, x, **kwargs):
    return out(base.apply(policy.cast_to_compute(params), rng, policy.cast_to_compute(x),
                          **kwargs))

  transformed = hk.Transformed(init=init, apply=apply)
  decode = getattr(layer, "decode", None)
  if decode is None:
    return model_lib.Layer(layer.name, transformed)

  def apply_decode(params, rng, x, cache, pos):
    y, cache = decode.apply(policy.cast_to_compute(params), rng, policy.cast_to_compute(x),
                            cache, pos)
    return out(y), cache

  # layer has a decode field here (a CachedLayer, found by duck typing; mypy sees a Layer)
  return dataclasses.replace(layer, transformed=transformed,  # type: ignore[call-arg]
                             decode=hk.Transformed(decode.init, apply_decode))
