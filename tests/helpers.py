"""Shared test models and the backend-equivalence assertions used by every backend's suite."""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import os
import sys
import threading
import time
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

import hkpipe

RTOL, ATOL = 1e-5, 1e-6


def token_ce(logits, targets):
  """Mean token cross-entropy; logits [B, T, V], targets [B, T] int."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def hetero_model(vocab: int = 11, n_mid: int = 3) -> hkpipe.SequentialModel:
  """A heterogeneous chain: activations change shape and dtype at every kind of boundary.

  tokens [B, T] int32 -> embed [B, T, 8] f32 -> widen [B, T, 12] f32 -> mids [B, T, 12]
  -> pooled+tiled [B, T, 6] bf16->f32 -> head logits [B, T, vocab].
  """

  def embed(x, is_training):
    del is_training
    return hk.Embed(vocab, 8)(x)                                   # [B, T, 8]

  def widen(x, is_training):
    del is_training
    return jnp.tanh(hk.Linear(12)(x))                              # [B, T, 12]

  def mid(x, is_training):
    del is_training
    return x + jax.nn.gelu(hk.Linear(12)(hk.LayerNorm(-1, True, True)(x)))  # [B, T, 12]

  def narrow(x, is_training):
    del is_training
    return hk.Linear(6)(x).astype(jnp.bfloat16)                    # [B, T, 6] bf16

  def head(x, is_training):
    del is_training
    return hk.Linear(vocab)(x.astype(jnp.float32) * 2.0)           # [B, T, vocab]

  layers = [hkpipe.Layer.from_fn("embed", embed), hkpipe.Layer.from_fn("widen", widen)]
  layers += [hkpipe.Layer.from_fn(f"mid_{i}", mid) for i in range(n_mid)]
  layers += [hkpipe.Layer.from_fn("narrow", narrow), hkpipe.Layer.from_fn("head", head)]
  return hkpipe.SequentialModel(layers, token_ce)


def token_batch(batch: int = 8, seq: int = 5, vocab: int = 11, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, vocab, (batch, seq), dtype=np.int32)
  y = rng.integers(0, vocab, (batch, seq), dtype=np.int32)
  return x, y


def assert_trees_close(actual: Any, expected: Any, rtol: float = RTOL, atol: float = ATOL):
  """Same structure, every leaf close (fp32 tolerance of the equivalence suite); a failure names
  the worst leaf (``hkpipe.testing.assert_trees_close``)."""
  hkpipe.testing.assert_trees_close(actual, expected, rtol=rtol, atol=atol)


def assert_matches_reference(model: hkpipe.SequentialModel, batch, *, num_microbatches: int,
                             steps: int = 3, lr: float = 0.5, **pipeline_kwargs):
  """Loss, canonical grads and ``steps`` SGD updates of a backend equal the single device's
  (``hkpipe.testing.assert_pipeline_matches_reference``; parameters after each step within
  rtol 1e-4, atol 1e-5). Returns ``(pipeline, state after the steps)``.

  Plain SGD with a large learning rate (AdamW would normalise away scaling bugs).
  """
  pipe = hkpipe.Pipeline(model, optax.sgd(lr), num_microbatches=num_microbatches, donate=False,
                         **pipeline_kwargs)
  state = hkpipe.testing.assert_pipeline_matches_reference(
      pipe, batch, steps=steps, rng=jax.random.key(42), rtol=RTOL, atol=ATOL, params_rtol=1e-4,
      params_atol=1e-5)
  return pipe, state


# -- the tiny GPT / Llama / hetero cases of the sharded equivalence suites --------------------
# (tests/test_mpmd_sharding.py, tests/test_spmd_sharding.py: M = 2 microbatches, AdamW, 2 steps)

SHARDED_GPT = hkpipe.models.GPTConfig(vocab_size=32, seq_len=8, d_model=16, n_layers=2,
                                      n_heads=2)
SHARDED_LLAMA = hkpipe.models.LlamaConfig(vocab_size=32, seq_len=8, d_model=16, n_layers=2,
                                          n_heads=4, n_kv_heads=2)
SHARDED_M, SHARDED_SEED = 2, 7  # a seed, not a key: workers import helpers before jax starts


def sharded_optimizer() -> optax.GradientTransformation:
  # A small step: Adam normalises each update, so it would amplify (to ~lr) the float rounding
  # noise of near-zero gradients, which tensor-parallel sums reorder.
  return optax.adamw(1e-4, weight_decay=0.1)


@functools.lru_cache(maxsize=None)
def sharded_case(name: str) -> tuple[hkpipe.SequentialModel, Any]:
  """``(model, batch)`` of ``"gpt"`` (tied embedding and head), ``"llama"`` (grouped-query
  attention: 4 query heads, 2 key/value heads) or ``"hetero"`` (:func:`hetero_model`)."""
  if name == "gpt":
    return hkpipe.models.build(SHARDED_GPT), token_batch(batch=8, seq=8, vocab=32, seed=1)
  if name == "llama":
    return hkpipe.models.build(SHARDED_LLAMA), token_batch(batch=8, seq=8, vocab=32, seed=2)
  assert name == "hetero"
  return hetero_model(n_mid=2), token_batch(batch=8, seq=5)


@functools.lru_cache(maxsize=None)
def sharded_reference(name: str, max_grad_norm: float | None = None):
  """The single-device run of :func:`sharded_case` ``name`` (init, loss, gradients, two AdamW
  steps) as a ``hkpipe.testing.ReferenceRun``, built from the layers alone."""
  model, batch = sharded_case(name)
  pipe = hkpipe.Pipeline(model, sharded_optimizer(), backend="single",
                         num_microbatches=SHARDED_M, max_grad_norm=max_grad_norm)
  return hkpipe.testing.reference_run(pipe, batch, steps=2, rng=jax.random.key(SHARDED_SEED))


def assert_sharded_matches_reference(name: str, pipe: hkpipe.Pipeline, state, reference):
  """``pipe`` (already initialised to ``state`` with ``jax.random.key(SHARDED_SEED)``) equals the
  single device (``reference``, from :func:`sharded_reference`) on the initial parameters, the
  loss and every gradient leaf and two AdamW steps (fp32, rtol 1e-5, atol 1e-6). Returns the
  state after the steps."""
  _, batch = sharded_case(name)
  return hkpipe.testing.assert_pipeline_matches_reference(
      pipe, batch, steps=2, rng=jax.random.key(SHARDED_SEED), state=state, reference=reference,
      rtol=RTOL, atol=ATOL)


def stop_processes(procs: list, logs: list) -> None:
  """Kills the still-running test subprocesses ``procs`` and closes their log files."""
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()
  for f in logs:
    f.close()


def run_concurrently(fn: Any, n: int) -> tuple[list, list]:
  """Calls ``fn()`` from ``n`` threads released together; returns (results, exceptions)."""
  barrier, results, errors = threading.Barrier(n), [], []

  def run() -> None:
    barrier.wait()
    try:
      results.append(fn())
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=run) for _ in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return results, errors


@contextlib.contextmanager
def backend_compiles():
  """Records the XLA backend compiles inside the block: yields a list that fills with their
  event names (``jax.monitoring``; independent of any cache the code under test keeps)."""
  events: list[str] = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event.endswith("backend_compile_duration"):
      events.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def exit_with_stacks_after(seconds: float, where: Any = None) -> None:
  """Ends this (worker) process with status 70 after ``seconds``, first printing every thread's
  Python stack and ``where()`` (e.g. an MPMD driver's last instruction and awaited message).

  For the multi-process workers: a hang then fails the test with where each process stood,
  well before the launcher's own timeout.
  """
  def fire() -> None:
    time.sleep(seconds)
    text = ""
    try:
      text = str(where()) if where is not None else ""
    except Exception as e:  # pylint: disable=broad-except
      text = f"(where() failed: {e!r})"
    print(f"[stall] no result after {seconds:.0f} s; {text}", file=sys.stderr, flush=True)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(70)

  threading.Thread(target=fire, name="stall-report", daemon=True).start()


# -- non-finite steps (tests/test_step_guard.py, the "nan" multi-process MPMD worker) -------------

NAN_ROW, INF_ROW = 3, 5


def _mse_plus_offset(y, targets):
  """MSE plus a term of the targets alone: ``c`` = inf makes the loss, not the gradients, inf."""
  t, c = targets
  return jnp.mean((y - t) ** 2) + jnp.mean(c)


def float_model() -> hkpipe.SequentialModel:
  """Float inputs [B, 5] -> 4 x tanh(linear(6)); targets ``(t [B, 6], c [B])``."""

  def layer(x, is_training):
    del is_training
    return jnp.tanh(hk.Linear(6)(x))

  return hkpipe.SequentialModel([hkpipe.Layer.from_fn(f"l{i}", layer) for i in range(4)],
                                _mse_plus_offset)


def float_batches():
  """Four batches of 8 rows for :func:`float_model`: finite, a NaN input (loss and gradients NaN),
  an infinite target offset (only the loss inf), finite."""

  def batch(seed):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(8, 5)).astype(np.float32),
            (rng.normal(size=(8, 6)).astype(np.float32), np.zeros((8,), np.float32)))

  good_a, nan_in, inf_loss, good_b = (batch(s) for s in range(4))
  nan_in[0][NAN_ROW, 1] = np.nan
  inf_loss[1][1][INF_ROW] = np.inf
  return good_a, nan_in, inf_loss, good_b


def adam_reference(model: hkpipe.SequentialModel, params, batches, *, num_microbatches: int,
                   lr: float, max_grad_norm: float | None = None):
  """Plain JAX + optax, from the layers alone: Adam on the mean of per-microbatch gradients
  (``jax.grad`` of ``model.loss``), optionally clipped by the global norm. Returns
  ``(params, opt_state)``."""
  opt = optax.adam(lr)
  state = opt.init(params)
  m = num_microbatches
  for batch in batches:
    size = jax.tree.leaves(batch)[0].shape[0] // m
    parts = [jax.tree.map(lambda a, i=i: a[i * size:(i + 1) * size], batch) for i in range(m)]
    grads = [jax.grad(model.loss)(params, *part) for part in parts]
    g = jax.tree.map(lambda *gs: sum(gs) / m, *grads)
    if max_grad_norm is not None:
      g, _ = optax.clip_by_global_norm(max_grad_norm).update(g, optax.EmptyState())
    updates, state = opt.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state
