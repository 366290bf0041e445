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

Across processes every process runs the same host loop and only the stages it owns; values
that cross processes go through :mod:`hkpipe._src.stage_link` (the transfer servers), and the
last stage's owner sends the tokens to every process.

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
from hkpipe._src import stage_link
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
    if jax.process_count() > 1 and backend == "spmd":
      raise errors.ConfigError("Pipeline.generate decodes across processes when every pipeline "
                               "rank's devices belong to one process; this spmd mesh puts a "
                               "rank on several. Order the mesh's devices so that 'pp' runs "
                               "across processes and the inner axes within one, or use "
                               "backend='mpmd'.")
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
  link = stage_link.of_layout(layout, pipe.backend.stage_channel())
  return _decode(layout, link, layers, stage_params, prompt, max_new_tokens, rng, settings,
                 groups, window_len)


def _input_avals(layers: Sequence[Sequence[cached.CachedLayer]], params: Sequence[Any],
                 x: jax.ShapeDtypeStruct, size: int, max_len: int) -> list:
  """Per stage, the shapes and dtypes of its input when the first stage reads ``x``, then the
  last stage's output (traced abstractly: what a process receiving them must know)."""
  out = [x]
  pos = jax.ShapeDtypeStruct((), np.int32)
  for stage_layers, stage_params in zip(layers, params):
    caches = jax.eval_shape(functools.partial(cached.init_caches, stage_layers, size, max_len))
    out.append(jax.eval_shape(functools.partial(cached.apply_range, stage_layers),
                              stage_link.abstract(stage_params), out[-1], caches, pos)[0])
  return out


def _decode(layout: Any, link: stage_link.Link, layers: Sequence[cached.CachedLayer],
            stage_params: Sequence[Any], prompt: np.ndarray, max_new_tokens: int,
            rng: jax.Array, settings: sampling.Sampling, groups: int, max_len: int
            ) -> jax.Array:
  """The host loop: prefill every group, then one token per group per step. Every process
  runs it and skips the stages it does not own (``link``)."""
  batch, plen = prompt.shape
  size = batch // groups
  stages = layout.stages
  n = len(stages)
  mine = [link.owns(s) for s in range(n)]
  stage_layers = [tuple(layers[spec.start:spec.stop]) for spec in stages]
  shard = [stage_sharding(stage_params[s], layout.stage_devices(s), size) if mine[s] else None
           for s in range(n)]
  # The stages' input shapes (prefill window, then one token), for values pulled from a peer.
  avals = {t: _input_avals(stage_layers, stage_params, jax.ShapeDtypeStruct((size, t), np.int32),
                           size, max_len) if link.across else [None] * (n + 1)
           for t in (max_len, 1)}
  tokens: list[list] = [[] for _ in range(groups)]
  if shard[-1] is not None:  # the sampler's scalars and [Bg] vectors, on the last stage's devices
    last = NamedSharding(shard[-1].mesh, P())
    s_arrays = jax.device_put(settings.arrays(), last)
    rng = jax.device_put(rng, last)
    rows = [jax.device_put(np.arange(g * size, (g + 1) * size, dtype=np.int32), last)
            for g in range(groups)]
    done = [jax.device_put(np.zeros((size,), bool), last) for _ in range(groups)]
  # Caches: per group, per own stage, created on the stage's devices (one zeros program each).
  makers = [jax.jit(functools.partial(cached.init_caches, stage_layers[s], size, max_len),
                    out_shardings=shard[s]) if mine[s] else None for s in range(n)]
  caches = [[make() if make else None for make in makers] for _ in range(groups)]

  def walk(g: int, x: Any, i: int) -> Any:
    """Runs group ``g``'s positions of token ``i`` through every stage: ``x`` is the window
    (host, ``i == 0``) or the last stage's token; returns the logits (None off the last stage's
    process)."""
    ins = avals[max_len if i == 0 else 1]
    pos = np.int32(0 if i == 0 else plen + i - 1)
    for s in range(n):
      if s == 0 and i == 0:
        x = jax.device_put(x, shard[0]) if mine[0] else None
      else:
        x = link.move(("x", g, i, s), x, (s or n) - 1, s, shard[s], ins[s])
      if mine[s]:
        x, caches[g][s] = _stage(stage_layers[s], stage_params[s], x, caches[g][s], pos)
    return x

  def sample(g: int, logits: Any, i: int) -> None:
    """Token ``i`` of group ``g`` from its logits (on the last stage's process)."""
    if mine[-1]:
      tok, done[g] = _sample(logits, np.int32(plen - 1 if i == 0 else 0), rng, np.int32(i),
                             rows[g], done[g], s_arrays)
      tokens[g].append(tok)

  window = np.zeros((batch, max_len), np.int32)
  window[:, :plen] = prompt
  for g in range(groups):  # prefill: the padded window in one pass per stage
    sample(g, walk(g, window[g * size:(g + 1) * size], 0), 0)
  for i in range(1, max_new_tokens):
    # Across processes only the last stage's owner knows which rows stopped: decode all.
    if (settings.end_token is not None and not link.across and i % 8 == 0
        and all(bool(jnp.all(d)) for d in done)):
      break  # every sequence has stopped
    for g in range(groups):
      sample(g, walk(g, tokens[g][-1][:, None] if mine[-1] else None, i), i)
  new = np.zeros((batch, max_new_tokens), np.int32)
  if mine[-1]:
    for g in range(groups):
      got = np.stack([np.asarray(t) for t in tokens[g]], axis=1)      # [size, <= N]
      new[g * size:(g + 1) * size, :got.shape[1]] = got
      if got.shape[1] < max_new_tokens:  # stopped early: the rest repeats the end token
        new[g * size:(g + 1) * size, got.shape[1]:] = int(settings.end_token or 0)
  new = np.asarray(link.share(("tokens",), new, n - 1, jax.ShapeDtypeStruct(new.shape, np.int32)))
  return jnp.asarray(np.concatenate([prompt, new], axis=1))
