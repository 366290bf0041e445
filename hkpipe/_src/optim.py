"""Optimizers: AdamW with linear warmup + cosine decay, weight decay on matrices only.

Gradient clipping is *not* part of the optax chain: ``Pipeline(max_grad_norm=...)`` clips by the
global norm over all pipeline stages, which a per-stage optax clip could not see.
"""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW hyper-parameters.

  Attributes:
    learning_rate: peak learning rate.
    warmup_steps: linear warmup from 0 to the peak.
    total_steps: steps of the whole run; cosine decay runs from the end of warmup to here.
    min_lr_ratio: final learning rate as a fraction of the peak.
    weight_decay: decoupled weight decay, applied to parameters with ndim >= 2 (not to biases,
      norms' scales).
    b1: Adam beta1.
    b2: Adam beta2.
    eps: Adam epsilon.
  """

  learning_rate: float = 1e-3
  warmup_steps: int = 100
  total_steps: int = 1000
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8

  def __post_init__(self):
    if self.learning_rate <= 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")
    if self.warmup_steps < 0 or self.total_steps < 1:
      raise ValueError(f"Need warmup_steps >= 0 and total_steps >= 1; got {self.warmup_steps}, "
                       f"{self.total_steps}.")
    if self.warmup_steps >= self.total_steps:
      raise ValueError(f"warmup_steps={self.warmup_steps} must be < total_steps="
                       f"{self.total_steps}; lower the warmup.")
    if not 0.0 <= self.min_lr_ratio <= 1.0:
      raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")


def lr_schedule(config: OptimizerConfig) -> optax.Schedule:
  """Linear warmup to ``learning_rate``, then cosine decay to ``min_lr_ratio * learning_rate``."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=config.total_steps, end_value=config.learning_rate * config.min_lr_ratio)


def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def adamw(config: OptimizerConfig) -> optax.GradientTransformation:
  """AdamW with the warmup-cosine schedule; decays only matrices (embeddings included)."""
  return optax.adamw(lr_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                     weight_decay=config.weight_decay, mask=_decay_mask)
