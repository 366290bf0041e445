"""The configuration of the gpt-oss style mixture-of-experts language model (``hkpipe.models``)."""

from __future__ import annotations

import chex

from hkpipe._src.models import common

ROUTER_SOFTMAX = ("topk", "all")


@chex.dataclass(frozen=True, mappable_dataclass=False)
class MoEConfig(common.LlamaDims):
  """gpt-oss style mixture-of-experts decoder. Validated on construction; frozen and hashable.

  A Llama-style decoder (RMSNorm, RoPE, grouped-query attention, no biases, untied head) whose
  MLPs are mixtures of ``n_experts`` SwiGLU experts with a learned top-``experts_per_token``
  router, plus the gpt-oss attention options (sliding window on even layers, learned sinks).

  Attributes:
    vocab_size: number of token ids.
    seq_len: maximum context length.
    d_model: residual width; divisible by ``n_heads`` with an even head dim (RoPE).
    n_layers: number of transformer blocks (each one an MoE block).
    n_heads: query heads per block.
    n_kv_heads: key/value heads (GQA), dividing ``n_heads``; None means ``n_heads``.
    d_ff: hidden width of each SwiGLU expert; None means ``ceil(8 * d_model / 3)`` rounded up to 8.
    n_experts: experts per block, E >= 1.
    experts_per_token: experts each token is routed to, k in ``[1, n_experts]``.
    router_softmax: ``"topk"`` (gpt-oss: the combine weights are a softmax over the k selected
      logits, so they sum to 1) or ``"all"`` (Switch/GShard: a softmax over all E logits, then the
      selected probabilities are used as they are).
    capacity_factor: None (dropless, the default) or a number > 0: each expert takes at most
      ``ceil(capacity_factor * tokens * k / E)`` token assignments per microbatch (per device under
      ``pmap``), the later ones (in token order) are dropped (their expert output is zero; the
      residual carries the token on).
    load_balance_weight: weight of the Switch load-balancing loss ``E * sum_e f_e * P_e`` of every
      block (>= 0).
    router_z_weight: weight of the router z-loss ``mean(logsumexp(router_logits) ** 2)`` of every
      block (>= 0).
    sliding_window: None (full causal attention everywhere) or a window W >= 1: even blocks
      (0, 2, ...) attend only to the last W positions (the query's own included), as gpt-oss.
    attention_sinks: learned per-head sink logits (gpt-oss): an extra softmax column with no
      value that lets a head attend to "nothing".
    rope_theta: RoPE base, > 0.
    norm_eps: RMSNorm epsilon, > 0.
    dropout: dropout rate in ``[0, 1)`` (attention probabilities and residual branches).
    dtype: ``"float32"``, or ``"bfloat16"`` compute with float32 parameters (the router, its
      losses and the auxiliary-loss carrier stay float32).
    z_loss: weight of the output z-loss in :func:`cross_entropy` (>= 0).
    label_smoothing: label smoothing of :func:`cross_entropy`, in ``[0, 1)``.
    attention_impl: ``"xla"`` only (the field is shared with the other configs).
    loss_chunk_size: None only (the chunked loss is not built for the MoE head yet).
  """

  vocab_size: int
  seq_len: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int | None = None
  d_ff: int | None = None
  n_experts: int = 4
  experts_per_token: int = 2
  router_softmax: str = "topk"
  capacity_factor: float | None = None
  load_balance_weight: float = 0.01
  router_z_weight: float = 1e-3
  sliding_window: int | None = None
  attention_sinks: bool = False
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  dropout: float = 0.0
  dtype: str = "float32"
  z_loss: float = 0.0
  label_smoothing: float = 0.0
  attention_impl: str = "xla"
  loss_chunk_size: int | None = None

  def __post_init__(self):
    name = "MoEConfig"
    common.check_common(self)
    # Fields shared with GPTConfig/LlamaConfig that the MoE model does not implement yet: rejected,
    # never ignored.
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"MoEConfig.dtype={self.dtype!r} is invalid: the MoE model takes "
                       "'float32' or 'bfloat16' (float32 parameters, router and aux losses); "
                       "precision policy strings are for GPTConfig/LlamaConfig.")
    if self.attention_impl != "xla":
      raise ValueError(f"MoEConfig.attention_impl={self.attention_impl!r} is invalid: MoE "
                       "attention (sliding window, sinks) runs as 'xla' only; drop the field.")
    if self.loss_chunk_size is not None:
      raise ValueError(f"MoEConfig.loss_chunk_size={self.loss_chunk_size!r} is invalid: the MoE "
                       "head returns (logits, aux) and has no chunked loss yet; drop the field.")
    self.check_llama_fields()
    common.check_positive_int(name, "n_experts", self.n_experts)
    common.check_positive_int(name, "experts_per_token", self.experts_per_token)
    if self.experts_per_token > self.n_experts:
      raise ValueError(f"MoEConfig.experts_per_token={self.experts_per_token} is invalid: it "
                       f"must be <= n_experts={self.n_experts}. Route each token to at most "
                       "n_experts experts, or add experts.")
    if self.router_softmax not in ROUTER_SOFTMAX:
      raise ValueError(f"MoEConfig.router_softmax={self.router_softmax!r} is invalid: it must be "
                       f"one of {list(ROUTER_SOFTMAX)}. Use \"topk\" (gpt-oss) or \"all\" "
                       "(Switch).")
    if self.capacity_factor is not None:
      common.check_real(name, "capacity_factor", self.capacity_factor, 0.0, None,
                        low_inclusive=False)
    common.check_real(name, "load_balance_weight", self.load_balance_weight, 0.0, None)
    common.check_real(name, "router_z_weight", self.router_z_weight, 0.0, None)
    if self.sliding_window is not None:
      common.check_positive_int(name, "sliding_window", self.sliding_window)
    common.check_bool(name, "attention_sinks", self.attention_sinks)


  def window_of(self, layer: int) -> int | None:
    """The attention window of block ``layer``: ``sliding_window`` on even blocks, else None."""
    return self.sliding_window if layer % 2 == 0 else None
