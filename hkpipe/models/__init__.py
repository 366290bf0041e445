"""hkpipe's model zoo: GPT-2 (nanoGPT), Llama-style and gpt-oss style mixture-of-experts language
models as layer chains.

``build(config)`` returns a :class:`hkpipe.SequentialModel` with layers named ``"embed"``,
``"block_0"`` ... ``"block_{n_layers-1}"`` and ``"head"`` (final norm + output projection) and the
token cross-entropy loss. See ``docs/models.md``.

Public names:

- Configs: :class:`GPTConfig`, :class:`LlamaConfig`, :class:`MoEConfig` (gpt-oss style
  mixture of experts), :class:`TRMConfig` (the Tiny Recursive Model: layers ``embed, recur``, loss
  :func:`trm_loss`, accuracy :func:`trm_metrics`).
- Building: :func:`build`, :class:`LanguageModel`, :class:`MoELanguageModel`.
- MoE: :func:`expert_load` (per-block expert load of a batch).
- Inspection: :func:`summary`, :func:`param_count`, :func:`layer_param_counts`,
  :func:`flops_per_token`.
- Loss: :func:`cross_entropy`; :func:`chunked_cross_entropy` and :class:`HeadOutput` for large
  vocabularies (``loss_chunk_size``).
- Sampling: :func:`generate` (KV cache; ``use_cache=False`` recomputes), :class:`CachedLayer`
  (the cached-apply contract for your own layers, see ``docs/generation.md``).
- Sharding: :func:`sharding_rules` (tensor-parallel rules of a GPT/Llama config, see
  ``docs/sharding.md``).
- Building blocks for your own models: :func:`causal_attention`, :func:`cached_attention`,
  :func:`rope`.
"""

from hkpipe._src.models.api import LanguageModel
from hkpipe._src.models.api import MoELanguageModel
from hkpipe._src.models.api import build
from hkpipe._src.models.api import flops_per_token
from hkpipe._src.models.api import layer_param_counts
from hkpipe._src.models.api import param_count
from hkpipe._src.models.api import summary
from hkpipe._src.models.cached import CachedLayer
from hkpipe._src.models.common import cached_attention
from hkpipe._src.models.common import causal_attention
from hkpipe._src.models.common import rope
from hkpipe._src.models.gpt import GPTConfig
from hkpipe._src.models.llama import LlamaConfig
from hkpipe._src.models.losses import HeadOutput
from hkpipe._src.models.losses import chunked_cross_entropy
from hkpipe._src.models.trm import TRMConfig
from hkpipe._src.models.trm import trm_loss
from hkpipe._src.models.trm import trm_metrics
from hkpipe._src.models.moe import expert_load
from hkpipe._src.models.moe_config import MoEConfig
from hkpipe._src.models.losses import cross_entropy
from hkpipe._src.models.generate import generate
from hkpipe._src.model_rules import sharding_rules

__all__ = (
    "CachedLayer",
    "GPTConfig",
    "HeadOutput",
    "LanguageModel",
    "LlamaConfig",
    "MoEConfig",
    "MoELanguageModel",
    "build",
    "cached_attention",
    "chunked_cross_entropy",
    "causal_attention",
    "cross_entropy",
    "expert_load",
    "flops_per_token",
    "generate",
    "layer_param_counts",
    "param_count",
    "rope",
    "sharding_rules",
    "summary",
    "TRMConfig",
    "trm_loss",
    "trm_metrics",
)
