"""Built-in tensor-parallel sharding rules for the GPT and Llama models of ``hkpipe.models``.

Megatron style, with FSDP on the other dimension of every matrix:

- attention ``w_q``, ``w_k``, ``w_v`` ``[D, H*hd]`` and MLP-in (``w_in``; ``w_gate``, ``w_up``)
  ``[D, F]``: column parallel, ``P("fsdp", "tp")``; their biases ``P("tp")``;
- attention-out ``w_o`` ``[H*hd, D]`` and MLP-out (``w_out``; ``w_down``) ``[F, D]``: row
  parallel, ``P("tp", "fsdp")``;
- token embedding and LM head ``[V, D]``: vocabulary parallel, ``P("tp", "fsdp")``.

MoE blocks (:class:`hkpipe.models.MoEConfig`) shard their experts the same way on the last two
axes: ``w_gate``, ``w_up`` ``[E, D, F]`` as ``P(None, "fsdp", "tp")``, ``w_down`` ``[E, F, D]`` as
``P(None, "tp", "fsdp")``; the router ``[D, E]`` and the attention sinks fall to the default rule.

Everything else (norms, the other biases, GPT's position table) falls to the default FSDP rule.
"""

from __future__ import annotations

from typing import Any, Sequence

from jax.sharding import PartitionSpec as P

from hkpipe._src import errors
from hkpipe._src import sharding as sharding_lib

_COLUMN = ("fsdp", "tp")
_ROW = ("tp", "fsdp")
_VOCAB = ("tp", "fsdp")


def _spec(axes: Sequence[str | None], keep: Sequence[str]) -> P:
  return P(*(a if a in keep else None for a in axes))


def sharding_rules(config: Any, axes: Sequence[str] = ("fsdp", "tp"),
                   fsdp_min_size: int = sharding_lib.DEFAULT_FSDP_MIN_SIZE
                   ) -> sharding_lib.Rules:
  """The tensor-parallel :class:`hkpipe.sharding.Rules` of a GPT or Llama config.

  Args:
    config: a :class:`hkpipe.models.GPTConfig`, :class:`hkpipe.models.LlamaConfig` or
      :class:`hkpipe.models.MoEConfig`.
    axes: the inner mesh axes to use (``"fsdp"``, ``"tp"``); an axis left out is replaced by
      None in every spec (e.g. ``axes=("tp",)`` for a mesh without ``"fsdp"``).
    fsdp_min_size: passed to :class:`hkpipe.sharding.Rules` (for the leaves no rule matches).

  Raises:
    ConfigError: for another config type or an axis outside ``("fsdp", "tp")``.
  """
  # Imported here: hkpipe._src.models imports the model layer, which must not import this.
  from hkpipe._src.models.gpt import GPTConfig  # pylint: disable=g-import-not-at-top
  from hkpipe._src.models.llama import LlamaConfig  # pylint: disable=g-import-not-at-top
  from hkpipe._src.models.moe_config import MoEConfig  # pylint: disable=g-import-not-at-top

  bad = [a for a in axes if a not in sharding_lib.PARAM_AXES]
  if bad:
    raise errors.ConfigError(f"sharding_rules axes must be among {list(sharding_lib.PARAM_AXES)},"
                             f" got {bad[0]!r}.")
  column, row, vocab = (_spec(s, axes) for s in (_COLUMN, _ROW, _VOCAB))
  if isinstance(config, GPTConfig):
    rules = [(r"/attn/w_[qkv]$", column), (r"/attn/w_o$", row),
             (r"/mlp/w_in$", column), (r"/mlp/w_out$", row)]
    if config.bias:
      rules += [(r"/attn/b_[qkv]$", _spec(("tp",), axes)), (r"/mlp/b_in$", _spec(("tp",), axes))]
  elif isinstance(config, LlamaConfig):
    rules = [(r"/attn/w_[qkv]$", column), (r"/attn/w_o$", row),
             (r"/mlp/w_(gate|up)$", column), (r"/mlp/w_down$", row)]
  elif isinstance(config, MoEConfig):
    rules = [(r"/attn/w_[qkv]$", column), (r"/attn/w_o$", row),
             (r"/moe/w_(gate|up)$", _spec((None,) + _COLUMN, axes)),
             (r"/moe/w_down$", _spec((None,) + _ROW, axes))]
  else:
    raise errors.ConfigError(f"sharding_rules knows GPTConfig, LlamaConfig and MoEConfig, got "
                             f"{type(config).__name__}; write hkpipe.sharding.Rules for it.")
  rules += [(r"^embed/wte/embeddings$", vocab), (r"^head/lm_head/w$", vocab)]
  return sharding_lib.Rules(tuple(rules), fsdp_min_size=fsdp_min_size)


def default_rules(model: Any, axis_sizes: dict[str, int],
                  fsdp_min_size: int = sharding_lib.DEFAULT_FSDP_MIN_SIZE
                  ) -> sharding_lib.Rules:
  """The rules a pipeline uses when none are given: a GPT/Llama model from ``hkpipe.models`` on
  a mesh with ``tp > 1`` gets :func:`sharding_rules` of its config (over the axes the mesh has);
  anything else gets no rules, i.e. the default FSDP spec for every leaf (replicated when the
  mesh has no ``fsdp`` axis)."""
  config = getattr(model, "config", None)
  if axis_sizes.get("tp", 1) > 1 and config is not None:
    try:
      return sharding_rules(config, tuple(a for a in sharding_lib.PARAM_AXES if a in axis_sizes),
                            fsdp_min_size)
    except errors.ConfigError:
      pass
  return sharding_lib.Rules((), fsdp_min_size=fsdp_min_size)
