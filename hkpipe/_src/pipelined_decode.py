"""KV-cache decoding with a trained pipeline's own layout (``Pipeline.generate``).

Nothing is gathered: stage ``s`` decodes with its parameters where they live, on the devices of
rank ``schedule.stage_to_rank[s]`` (the backend's ``stage_params`` hook: ``mpmd`` hands out
``state.params[s]``, ``spmd`` unpacks each rank's parameters on that rank's devices), and keeps
its layers' KV caches there, one cache per group of sequences (its rows split over the rank's
``dp`` devices when they divide). One decoding step of one group walks the stages in model
order: each stage's program (``jax.jit`` of the stage's cached applies; compiled once per rank,
since its inputs live on that rank's devices) runs on its rank, and its activations are
transferred to the next stage's rank; the last stage's logits are sampled there and the token
goes back to the first stage's rank. Dispatch is asynchronous, so with ``G`` groups in flight,
rank ``r`` works on group ``g`` while rank ``r + 1`` works on group ``g - 1``: the groups are
interleaved across ranks the way microbatches are in training, and ``G >= ranks`` keeps every
rank busy.

Every group samples with the per-row keys of :mod:`hkpipe._src.models.sampling` (its rows'
indices in the whole batch), so the tokens equal single-device decoding's for any grouping.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hkpipe._src import errors
from hkpipe._src.models import cached
from hkpipe._src.models import generate as generate_lib
from hkpipe._src.models import sampling


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(3,))
def _stage(layers: tuple, params: Any, x: Any, caches: list, pos: jax.Array
           ) -> tuple[Any, list]:
  """One stage's cached applies on new positions ``pos..``: ``(outputs, caches)``."""
  return cached.apply_range(layers, params, x, caches, pos)


@jax.jit
def _sample(logits: jax.Array, index: jax.Array, rng: jax.Array, step: jax.Array,
            rows: jax.Array, done: jax.Array, s: dict) -> tuple[jax.Array, jax.Array]:
  """Samples token ``step`` of a group from its logits at position ``index``: ``[Bg]`` each."""
  last = jax.lax.dynamic_index_in_dim(logits, index, axis=1, keepdims=False)  # [Bg, V]
  return sampling.stop(sampling.sample(last, sampling.row_keys(rng, step, rows), s), done,
                       s["end_token"])


def stage_sharding(params: Any, devices: Sequence[Any], rows: int) -> NamedSharding:
  """Where a stage's activations and caches of ``rows`` sequences live: the mesh its parameters
  live on (its rank's devices), rows split over its ``dp`` axis when they divide, else
  replicated."""
  mesh = next((leaf.sharding.mesh for leaf in jax.tree.leaves(params)
               if isinstance(leaf.sharding, NamedSharding)), None)
  if mesh is None:
    mesh = Mesh(np.asarray(devices, dtype=object), ("dp",))
  if "dp" in mesh.axis_names and mesh.shape["dp"] > 1 and rows % mesh.shape["dp"] == 0:
    return NamedSharding(mesh, P("dp"))
  return NamedSharding(mesh, P())


def default_groups(batch: int, num_ranks: int) -> int:
  """The most groups ``<= num_ranks`` that divide the batch (one per rank keeps all busy)."""
  return max(g for g in range(1, min(batch, num_ranks) + 1) if batch % g == 0)


def check_groups(num_groups: Any, batch: int) -> int:
  """``num_groups`` if it is a positive int dividing ``batch``; else a ConfigError."""
  if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or (
      batch % num_groups):
    divisors = [g for g in range(1, batch + 1) if batch % g == 0]
    raise errors.ConfigError(f"num_groups={num_groups!r} is invalid: the {batch} prompts are cut "
                             f"into equal groups, so it must be one of {divisors}.")
  return num_groups


def generate(pipe: Any, state: Any, prompt_tokens: Any, *, max_new_tokens: int, rng: jax.Array,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             end_token: int | None = None, num_groups: int | None = None,
             seq_len: int | None = None) -> jax.Array:
  """KV-cache decoding on ``pipe``'s stages (see :meth:`hkpipe.Pipeline.generate`).

  Returns:
    ``[B, P + max_new_tokens]`` int32 tokens: the prompt followed by the samples.
  """
  model = pipe.model
  window_len = generate_lib.context_len(model, seq_len)
  prompt = generate_lib.check_prompt(prompt_tokens, max_new_tokens)
  settings = sampling.Sampling(temperature, top_k, top_p, end_token)
  settings.check_vocab(getattr(getattr(model, "config", None), "vocab_size", None))
  layers = cached.check_cached(model.layers)
  generate_lib.check_fits(prompt.shape[1], max_new_tokens, window_len)
  if not pipe.backend.decodes_in_place:
    backend = pipe.options.backend
    if jax.process_count() > 1 and backend in ("mpmd", "spmd"):
      raise errors.ConfigError("Pipeline.generate does not decode across processes yet; run the "
                               "sampling in one process (launch/sample.py without "
                               "--num_processes).")
    raise errors.ConfigError(
        f"Pipeline.generate decodes where the stages live, on backend='single', 'mpmd' or "
        f"'spmd'; this pipeline uses backend={backend!r}. Restore its checkpoint into such a "
        "pipeline (launch/sample.py --config.backend=mpmd), or decode a small model on one "
        "device with hkpipe.models.generate(model, pipe.params(state), ...).")
  if pipe.backend.layout is None:  # the whole model lives on one device
    return generate_lib.generate(model, pipe.backend.stage_params(state)[1][0], prompt,
                                 max_new_tokens=max_new_tokens, rng=rng,
                                 temperature=temperature, top_k=top_k, top_p=top_p,
                                 end_token=end_token, seq_len=window_len, use_cache=True)
  batch = prompt.shape[0]
  if max_new_tokens == 0:
    return jnp.asarray(prompt)
  groups = check_groups(default_groups(batch, pipe.backend.layout.num_ranks)
                        if num_groups is None else num_groups, batch)
  # Only now, every argument checked: spmd unpacks each rank's parameters (one program per rank).
  layout, stage_params = pipe.backend.stage_params(state)
  return _decode(layout, layers, stage_params, prompt, max_new_tokens, rng, settings, groups,
                 window_len)


def _decode(layout: Any, layers: Sequence[cached.CachedLayer], stage_params: Sequence[Any],
            prompt: np.ndarray, max_new_tokens: int, rng: jax.Array,
            settings: sampling.Sampling, groups: int, max_len: int) -> jax.Array:
  """The host loop: prefill every group, then one token per group per step."""
  batch, plen = prompt.shape
  size = batch // groups
  stages = layout.stages
  stage_layers = [tuple(layers[spec.start:spec.stop]) for spec in stages]
  shard = [stage_sharding(stage_params[s], layout.stage_devices(s), size)
           for s in range(len(stages))]
  last = NamedSharding(shard[-1].mesh, P())  # the sampler's scalars and [Bg] vectors
  s_arrays = jax.device_put(settings.arrays(), last)
  rng = jax.device_put(rng, last)
  rows = [jax.device_put(np.arange(g * size, (g + 1) * size, dtype=np.int32), last)
          for g in range(groups)]
  # Caches: per group, per stage, created on the stage's devices (one zeros program per stage).
  makers = [jax.jit(functools.partial(cached.init_caches, stage_layers[s], size, max_len),
                    out_shardings=shard[s]) for s in range(len(stages))]
  caches = [[make() for make in makers] for _ in range(groups)]

  def walk(g: int, x: Any, pos: int) -> Any:
    """Runs group ``g``'s new positions through every stage; returns the logits (last rank)."""
    for s in range(len(stages)):
      x = jax.device_put(x, shard[s])
      x, caches[g][s] = _stage(stage_layers[s], stage_params[s], x, caches[g][s], np.int32(pos))
    return x

  window = np.zeros((batch, max_len), np.int32)
  window[:, :plen] = prompt
  done = [jax.device_put(np.zeros((size,), bool), last) for _ in range(groups)]
  tokens: list[list] = [[] for _ in range(groups)]
  for g in range(groups):  # prefill: the padded window in one pass per stage
    logits = walk(g, window[g * size:(g + 1) * size], 0)
    tok, done[g] = _sample(logits, np.int32(plen - 1), rng, np.int32(0), rows[g], done[g],
                           s_arrays)
    tokens[g].append(tok)
  for i in range(1, max_new_tokens):
    if settings.end_token is not None and i % 8 == 0 and all(bool(jnp.all(d)) for d in done):
      break  # every sequence has stopped
    for g in range(groups):
      logits = walk(g, tokens[g][-1][:, None], plen + i - 1)
      tok, done[g] = _sample(logits, np.int32(0), rng, np.int32(i), rows[g], done[g], s_arrays)
      tokens[g].append(tok)
  new = np.zeros((batch, max_new_tokens), np.int32)
  for g in range(groups):
    got = np.stack([np.asarray(t) for t in tokens[g]], axis=1)      # [size, <= N]
    new[g * size:(g + 1) * size, :got.shape[1]] = got
    if got.shape[1] < max_new_tokens:  # stopped early: the rest repeats the end token
      new[g * size:(g + 1) * size, got.shape[1]:] = settings.end_token
  return jnp.asarray(np.concatenate([prompt, new], axis=1))

