"""Remat policies give the gradients of no remat, on the pipelined backends."""

import functools

import jax
import jax.numpy as jnp
import optax
import pytest

import hkpipe
from hkpipe import models
from hkpipe._src import remat as remat_lib
from tests import helpers


@functools.lru_cache(maxsize=None)
def _model():
  return models.build(models.GPTConfig(vocab_size=32, seq_len=8, d_model=16, n_layers=2,
                                       n_heads=2))


def _batch():
  x = jax.random.randint(jax.random.key(3), (4, 8), 0, 32)
  return x, jnp.roll(x, -1, axis=1)


def _pipe(backend, remat):
  kw = {} if backend == "single" else dict(devices=jax.devices()[:2], partition=[2])
  return hkpipe.Pipeline(_model(), optax.sgd(0.1), backend=backend, num_microbatches=2,
                         remat=remat, donate=False, **kw)


@functools.lru_cache(maxsize=None)
def _reference():
  ref = _pipe("single", False)
  state = ref.init(jax.random.key(0), _batch())
  return ref.to_canonical(state), ref.loss_and_grads(state, _batch())


@pytest.mark.parametrize("backend,remat", [
    ("mpmd", "dots_saveable"), ("mpmd", "offload_dots_with_no_batch_dims"),
    ("spmd", "dots_with_no_batch_dims_saveable")])
def test_policy_grads_equal_no_remat(backend, remat):
  canonical, (ref_loss, ref_grads) = _reference()
  pipe = _pipe(backend, remat)
  state = pipe.from_canonical(canonical, 0)
  loss, grads = pipe.loss_and_grads(state, _batch())
  helpers.assert_trees_close(loss, ref_loss)
  helpers.assert_trees_close(grads, ref_grads)


@pytest.mark.parametrize("backend,remat", [("mpmd", ("dots_saveable", False)),
                                           ("spmd", (False, "nothing_saveable"))])
def test_per_stage_policies_grads_equal_no_remat(backend, remat):
  test_policy_grads_equal_no_remat(backend, remat)


def test_policies_change_what_spmd_stashes():
  """``dots_saveable`` stashes the matmul outputs that ``nothing_saveable`` recomputes."""

  def stash_bytes(remat):
    pipe = _pipe("spmd", remat)
    pipe.loss_and_grads(pipe.from_canonical(_reference()[0], 0), _batch())
    prog, _ = next(iter(pipe.backend._programs.values()))
    return sum(a.size * a.dtype.itemsize for b in prog.backward for a in b.layout.avals)

  assert stash_bytes("dots_saveable") > stash_bytes("nothing_saveable")


def test_unknown_policy_is_a_config_error():
  with pytest.raises(hkpipe.ConfigError, match="remat='everything'"):
    hkpipe.PipelineOptions(backend="mpmd", remat="everything")


def test_per_stage_errors_and_trainer_spelling():
  with pytest.raises(hkpipe.ConfigError, match="per-stage tuple needs backend"):
    hkpipe.PipelineOptions(backend="single", remat=("dots_saveable",))
  pipe = _pipe("mpmd", ("dots_saveable", False, True))          # 3 values, 2 stages
  with pytest.raises(hkpipe.ConfigError, match="3 per-stage values.*2 stages"):
    pipe.loss_and_grads(pipe.from_canonical(_reference()[0], 0), _batch())
  assert remat_lib.from_config(True, None) is True
  assert remat_lib.from_config(False, "dots_saveable") == "dots_saveable"
  assert remat_lib.from_config(False, "dots_saveable, none") == ("dots_saveable", False)
