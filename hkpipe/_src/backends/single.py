"""The single-device backend: the reference every pipelined backend must equal.

The batch is split into ``num_microbatches`` microbatches and gradients are accumulated with a
``lax.scan`` (gradient accumulation), so a pipelined run with ``m`` microbatches and a single-device
run with ``m`` microbatches compute the same function, including dropout keys.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from hkpipe._src import model as model_lib
from hkpipe._src import pipeline as pipeline_lib
from hkpipe._src import step as step_lib


class SingleBackend(pipeline_lib.Backend):
  """Whole model on one device (``options.devices[0]`` or the default device)."""

  def __init__(self, model, optimizer, options):
    super().__init__(model, optimizer, options)
    self._device = options.devices[0] if options.devices else None
    donate = (0, 1) if options.donate else ()
    self._train = jax.jit(self._train_impl, donate_argnums=donate)
    self._grads = jax.jit(self._grads_impl)
    self._eval = jax.jit(self._eval_impl)

  # -- pure, jitted pieces ---------------------------------------------------------------------

  def _grads_impl(self, params, rng, step, batch):
    m = self.options.num_microbatches
    inputs, targets = pipeline_lib.split_microbatches(batch, m)
    key_of = lambda i: model_lib.microbatch_rng(rng, step, i)
    return step_lib.microbatch_grads(self.model, self.options.remat, params, inputs, targets,
                                     key_of, m)

  def _train_impl(self, params, opt_state, rng, step, batch):
    loss, grads = self._grads_impl(params, rng, step, batch)
    return step_lib.canonical_train_update(self.optimizer, self.options, self.model.ties, params,
                                           opt_state, loss, grads)

  def _eval_impl(self, params, batch):
    m = self.options.num_microbatches
    return step_lib.eval_step(self.model, params, *pipeline_lib.split_microbatches(batch, m))

  # -- Backend API -----------------------------------------------------------------------------

  def _put(self, tree: Any) -> Any:
    """``tree`` on this backend's device; without one, kept where it is unless its leaves are
    spread over several devices (e.g. a pipelined backend's ``to_canonical``): then on the
    default device."""
    if self._device is not None:
      return jax.device_put(tree, self._device)
    devices = {d for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)
               for d in x.sharding.device_set}
    return jax.device_put(tree, jax.devices()[0]) if len(devices) > 1 else tree

  def init(self, rng, batch):
    inputs, _ = batch
    one = jax.tree.map(lambda x: x[: x.shape[0] // self.options.num_microbatches], inputs)
    params_rng, state_rng = jax.random.split(rng)
    params = self._put(jax.jit(self.model.init)(params_rng, one))
    opt_state = self._put(jax.jit(self.optimizer.init)(params))
    return pipeline_lib.TrainState(step=0, params=params, opt_state=opt_state, rng=self._put(state_rng))

  def loss_and_grads(self, state, batch):
    return self._grads(state.params, state.rng, jnp.int32(state.step), self._put(batch))

  def train_step(self, state, batch):
    params, opt_state, metrics = self._train(state.params, state.opt_state, state.rng,
                                             jnp.int32(state.step), self._put(batch))
    return pipeline_lib.TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                         rng=state.rng), metrics

  def eval_step(self, state, batch):
    return self._eval(state.params, self._put(batch))

  def to_canonical(self, state):
    return {"params": state.params, "opt_state": state.opt_state, "rng": state.rng}

  decodes_in_place = True

  def stage_params(self, state):
    """The whole model, already on one device."""
    return None, [state.params]

  def from_canonical(self, canonical: Mapping[str, Any], step: int):
    return pipeline_lib.TrainState(step=int(step), params=self._put(canonical["params"]),
                         opt_state=self._put(canonical["opt_state"]),
                         rng=self._put(canonical["rng"]))

