"""Model-zoo entry points: ``build``, ``summary``, ``param_count`` and ``flops_per_token``."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Union

import jax
import jax.numpy as jnp

from hkpipe._src import model as model_lib
from hkpipe._src import precision
from hkpipe._src.models import attention
from hkpipe._src.models import gpt
from hkpipe._src.models import llama
from hkpipe._src.models import losses
from hkpipe._src.models import moe
from hkpipe._src.models import trm
from hkpipe._src.models.moe_config import MoEConfig

Config = Union[gpt.GPTConfig, llama.LlamaConfig, MoEConfig, trm.TRMConfig]


@dataclasses.dataclass(frozen=True)
class LanguageModel(model_lib.SequentialModel):
  """A :class:`hkpipe.SequentialModel` built from a config, which it keeps for later use.

  Behaves exactly like a ``SequentialModel`` (it adds no behaviour); the config lets helpers such
  as :func:`generate` know the context length.

  Attributes:
    config: the :class:`GPTConfig` or :class:`LlamaConfig` the model was built from.
  """

  config: Any = None


@dataclasses.dataclass(frozen=True)
class MoELanguageModel(LanguageModel):
  """The :class:`LanguageModel` of an :class:`MoEConfig`.

  Its layers pass ``(h, aux)`` pairs and its head returns ``(logits, aux)`` (see
  ``docs/models.md``); :meth:`apply` returns the logits alone, like every language model, and
  :meth:`loss` adds the blocks' auxiliary losses to the cross-entropy.
  """

  def apply(self, params: model_lib.Params, inputs: Any, *, rng: jax.Array | None = None,
            is_training: bool = False) -> Any:
    """The ``[B, T, V]`` logits of ``inputs``."""
    return self.apply_range(params, inputs, 0, len(self.layers), rng=rng,
                            is_training=is_training)[0]

  def loss(self, params: model_lib.Params, inputs: Any, targets: Any, *,
           rng: jax.Array | None = None, is_training: bool = False) -> jax.Array:
    """Cross-entropy plus the weighted auxiliary losses of every block, of one (micro)batch."""
    outputs = self.apply_range(params, inputs, 0, len(self.layers), rng=rng,
                               is_training=is_training)
    return self.loss_fn(outputs, targets)


def _make_layers(config: Config) -> tuple[list[model_lib.Layer], tuple[model_lib.Tie, ...]]:
  if isinstance(config, gpt.GPTConfig):
    return gpt.make_layers(config)
  if isinstance(config, llama.LlamaConfig):
    return llama.make_layers(config)
  if isinstance(config, MoEConfig):
    return moe.make_layers(config)
  raise TypeError(f"build() takes a GPTConfig, LlamaConfig, MoEConfig or TRMConfig, got "
                  f"{type(config).__name__}. Construct one of those configs (or assemble your "
                  "own hkpipe.SequentialModel).")


def build(config: Config) -> LanguageModel:
  """Builds the layers ``embed, block_0, ..., block_{n_layers-1}, head`` and the loss of a config.

  ``config.dtype`` names the precision policy (:func:`hkpipe.precision.get_policy`), applied per
  layer: with ``"bfloat16"`` every layer computes in bfloat16 while its parameters stay float32,
  and the head returns float32 logits. The loss is
  :func:`cross_entropy` with the config's ``z_loss`` and ``label_smoothing``; with
  ``config.loss_chunk_size`` the head returns a :class:`HeadOutput` instead and the loss is
  :func:`chunked_cross_entropy` (the cached decode apply still returns logits).

  Args:
    config: a :class:`GPTConfig`, :class:`LlamaConfig` or :class:`MoEConfig`.

  Returns:
    A :class:`LanguageModel` (a :class:`hkpipe.SequentialModel`).

  Raises:
    TypeError: for any other config type.
    ConfigError: for ``attention_impl="cudnn"`` without a GPU.
  """
  if isinstance(config, (gpt.GPTConfig, llama.LlamaConfig)):
    attention.check_available(config.attention_impl)
  if isinstance(config, trm.TRMConfig):  # embed | recur, the deep-supervision loss
    policy = precision.get_policy(config.dtype)
    layers = trm.make_layers(config)
    layers = [precision.apply_to_layer(layer, policy, last=i == len(layers) - 1)
              for i, layer in enumerate(layers)]
    return LanguageModel(layers=tuple(layers), loss_fn=trm.loss_fn(config), config=config)
  layers, ties = _make_layers(config)
  if isinstance(config, MoEConfig):  # aux losses travel with the activations, kept in float32
    if config.dtype == "bfloat16":
      layers = [moe.with_compute_dtype(layer, jnp.bfloat16) for layer in layers]  # type: ignore[arg-type]
    loss_fn = functools.partial(moe.loss, z_loss=config.z_loss,
                                label_smoothing=config.label_smoothing)
    return MoELanguageModel(layers=tuple(layers), loss_fn=loss_fn, ties=ties, config=config)
  policy = precision.get_policy(config.dtype)
  layers = [precision.apply_to_layer(layer, policy, last=i == len(layers) - 1)
            for i, layer in enumerate(layers)]
  if config.loss_chunk_size is None:
    loss_fn = functools.partial(losses.cross_entropy, z_loss=config.z_loss,
                                label_smoothing=config.label_smoothing)
  else:
    loss_fn = functools.partial(losses.chunked_cross_entropy, chunk_size=config.loss_chunk_size,
                                z_loss=config.z_loss, label_smoothing=config.label_smoothing)
  return LanguageModel(layers=tuple(layers), loss_fn=loss_fn, ties=ties, config=config)


def param_count(model: model_lib.SequentialModel, params: model_lib.Params) -> int:
  """Number of scalar parameters of ``model``, counting each tied weight once."""
  return model_lib.count_params(params, model.ties)


def layer_param_counts(config: Config) -> dict[str, int]:
  """Closed-form parameter count per layer name (without initialising anything).

  A tied head copy is included in ``"head"``; :func:`param_count` counts it once.
  """
  if isinstance(config, gpt.GPTConfig):
    return gpt.layer_param_counts(config)
  if isinstance(config, llama.LlamaConfig):
    return llama.layer_param_counts(config)
  if isinstance(config, trm.TRMConfig):
    return trm.layer_param_counts(config)
  if isinstance(config, MoEConfig):
    return moe.layer_param_counts(config)
  raise TypeError(f"Expected a GPTConfig, LlamaConfig, MoEConfig or TRMConfig, got "
                  f"{type(config).__name__}.")


def flops_per_token(config: Config) -> int:
  """Training FLOPs per token (forward + backward), the PaLM / nanoGPT MFU estimate.

  ``6 * N + 12 * n_layers * d_model * seq_len`` where ``N`` counts every parameter outside the
  ``embed`` layer: all block weights plus the final norm and the ``[V, D]`` output projection (which
  is a matmul even when tied). Embedding lookups are treated as free, as in the PaLM formula. The
  second term is the attention score and value matmuls (``QK^T`` and ``PV``) at full context
  length, without discounting the causal mask. For an :class:`MoEConfig`, ``N`` counts only the
  ``experts_per_token`` experts a token uses (active parameters), and sliding windows are not
  discounted either.

  Args:
    config: a :class:`GPTConfig`, :class:`LlamaConfig` or :class:`MoEConfig`.

  Returns:
    FLOPs per trained token. MFU = ``flops_per_token * tokens_per_second / peak_flops``.
  """
  if isinstance(config, trm.TRMConfig):
    return trm.flops_per_token(config)
  if isinstance(config, MoEConfig):
    n = moe.active_params_per_token(config)
  else:
    counts = layer_param_counts(config)
    n = sum(c for name, c in counts.items() if name != "embed")
  return 6 * n + 12 * config.n_layers * config.d_model * config.seq_len


def _struct(x: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))


def _describe(tree: Any) -> tuple[str, str]:
  leaves = jax.tree.leaves(tree)
  shapes = ", ".join(str(tuple(l.shape)) for l in leaves)
  dtypes = ", ".join(sorted({str(l.dtype) for l in leaves}))
  return shapes, dtypes


def summary(model: model_lib.SequentialModel, example_inputs: Any) -> str:
  """A per-layer table of parameter counts and output shapes, computed with ``jax.eval_shape``.

  Nothing is compiled or executed: only shapes are traced.

  Args:
    model: any :class:`hkpipe.SequentialModel`.
    example_inputs: arrays or ``jax.ShapeDtypeStruct`` s shaped like one (micro)batch of inputs.

  Returns:
    The table as a string: layer name, parameter count, output shape and dtype per layer, then the
    total with tied weights counted once.
  """
  x = jax.tree.map(_struct, example_inputs)
  key = jax.eval_shape(lambda: jax.random.key(0))
  rows = []
  sizes: dict[tuple[str, str, str], int] = {}
  for layer in model.layers:
    params = jax.eval_shape(layer.init, key, x)
    x = jax.eval_shape(lambda p, v, l=layer: l.apply(p, None, v, is_training=False), params, x)
    count = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    for module, names in params.items():
      for name, p in names.items():
        sizes[(layer.name, module, name)] = math.prod(p.shape)
    rows.append((layer.name, f"{count:,}", *_describe(x)))
  total = sum(sizes.values())
  tied = sum(sizes[t.target] for t in model.ties)
  header = ("layer", "params", "output shape", "dtype")
  footer = [("total", f"{total - tied:,}", "", "")]
  if tied:
    footer.insert(0, ("tied copies", f"-{tied:,}", "", ""))
  table = [header] + rows + footer
  widths = [max(len(r[i]) for r in table) for i in range(4)]

  def fmt(r):
    return "  ".join([r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2].ljust(widths[2]),
                      r[3].ljust(widths[3])]).rstrip()

  rule = "-" * len(fmt(header))
  lines = [fmt(header), rule] + [fmt(r) for r in rows] + [rule] + [fmt(r) for r in footer]
  return "\n".join(lines)
