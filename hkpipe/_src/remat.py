"""Rematerialisation (activation checkpointing) policies for a stage's forward: one home.

``PipelineOptions.remat`` (and the trainer's ``pipeline.remat`` / ``pipeline.remat_policy``)
takes a bool or a policy name:

- ``False`` / ``None``: no remat; the backward uses the forward's stashed residuals.
- ``True`` or ``"nothing_saveable"``: recompute the whole stage forward in the backward (only the
  stage inputs are kept); ``True`` is the historical spelling.
- ``"dots_saveable"``: keep every matmul output, recompute the rest (element-wise ops, norms).
- ``"dots_with_no_batch_dims_saveable"``: keep only matmuls without batch dimensions (the
  projections and MLPs, not the attention score/value matmuls).
- ``"offload_dots_with_no_batch_dims"``: as the previous one, but the kept values are moved to
  pinned host memory during the forward and back for the backward (needs a device with a
  ``pinned_host`` memory space: GPUs, TPUs, and the CPU backend).

On the pipelined backends (``spmd``, ``mpmd``) it may also be a tuple with one of these values per
model stage (``p * v`` of them, in model order), e.g. ``("dots_saveable", False)`` to remat only
the first of two stages (which holds the most microbatches' activations under 1F1B).
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from hkpipe._src import errors

_OFFLOAD = "offload_dots_with_no_batch_dims"
POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", _OFFLOAD)


def _policy(name: str) -> Any:
  cp = jax.checkpoint_policies
  if name == _OFFLOAD:
    return cp.offload_dot_with_no_batch_dims(offload_src="device", offload_dst="pinned_host")
  return getattr(cp, name)


def check(remat: Any, devices: Any = None, backend: str | None = None) -> None:
  """Raises :class:`hkpipe.ConfigError` unless ``remat`` is a bool, None or a name in
  :data:`POLICIES` (and, for the offload policy, the devices have pinned host memory), or on a
  pipelined ``backend`` a tuple of those (one per stage)."""
  if isinstance(remat, tuple):
    if backend not in ("spmd", "mpmd"):
      raise errors.ConfigError(
          f"remat={remat!r}: a per-stage tuple needs backend 'spmd' or 'mpmd' (got "
          f"{backend!r}); pass one value for the whole model.")
    for value in remat:
      if isinstance(value, tuple):
        raise errors.ConfigError(f"remat={remat!r}: per-stage values cannot be tuples.")
      check(value, devices, backend)
    return
  if remat is None or isinstance(remat, bool):
    return
  if remat not in POLICIES:
    raise errors.ConfigError(
        f"remat={remat!r} is invalid: it must be True, False or one of {list(POLICIES)}. "
        "Use True (recompute everything) or a policy name that keeps some activations.")
  if remat == _OFFLOAD:
    device = (list(devices) if devices is not None else jax.devices())[0]
    kinds = {m.kind for m in device.addressable_memories()}
    if "pinned_host" not in kinds:
      raise errors.ConfigError(
          f"remat={remat!r} offloads to pinned host memory, which {device.platform} devices do "
          f"not have (memory kinds {sorted(kinds)}); use 'dots_with_no_batch_dims_saveable'.")


def wrap(fn: Callable[..., Any], remat: Any) -> Callable[..., Any]:
  """``fn`` under the remat policy ``remat`` (unchanged for ``False``/``None``)."""
  if remat is None or remat is False:
    return fn
  if remat is True:
    return jax.checkpoint(fn)
  return jax.checkpoint(fn, policy=_policy(remat))


def for_stage(remat: Any, index: int, num_stages: int) -> Any:
  """Stage ``index``'s remat value: ``remat`` itself, or its entry for a per-stage tuple."""
  if not isinstance(remat, tuple):
    return remat
  if len(remat) != num_stages:
    raise errors.ConfigError(
        f"remat={remat!r} has {len(remat)} per-stage values, but the model is cut into "
        f"{num_stages} stages; give one value per stage (or a single value for all).")
  return remat[index]


def from_config(remat: bool, remat_policy: str | None) -> Any:
  """The ``PipelineOptions.remat`` value of the trainer's ``pipeline.remat`` and
  ``pipeline.remat_policy`` (a policy name, or comma-separated per-stage values where ``none``
  means no remat): the policy when given, else the bool."""
  if not remat_policy:
    return bool(remat)
  if "," not in remat_policy:
    return remat_policy
  return tuple(False if v.strip() in ("none", "false", "False") else v.strip()
               for v in remat_policy.split(","))
