"""A checkpoint saved under one layout resumes under any other (issue #12, "resume of a
pp2 x fsdp2 x tp2 checkpoint under pp4 and under single").

A tiny GPT (tied embedding and head) trains 2 AdamW steps under MPMD on a
``("pp", "fsdp", "tp") = (2, 2, 2)`` mesh (parameters and optimizer state sharded inside each
stage), is saved with ``hkpipe.train.Checkpointer`` and restored under MPMD with 4 unsharded
ranks and under the single-device backend. Evidence: the restored parameters and optimizer state
equal the saved ones bit for bit, and the next step's loss equals the one of a single-device run
that trained the same 3 steps without any checkpoint (fp32, rtol 1e-5).
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import hkpipe
from hkpipe import train as train_lib
from tests import helpers

GPT = hkpipe.models.GPTConfig(vocab_size=32, seq_len=8, d_model=16, n_layers=2, n_heads=2)
KEY = jax.random.key(3)
M = 2


def _pipeline(model, backend: str, mesh=None, **kw) -> hkpipe.Pipeline:
  # A small Adam step: tensor-parallel sums reorder float rounding, which Adam would amplify.
  return hkpipe.Pipeline(model, optax.adamw(1e-4, weight_decay=0.1), backend=backend, mesh=mesh,
                         num_microbatches=M, donate=False, **kw)


def _leaves(canonical) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(
      jax.device_get((canonical["params"], canonical["opt_state"])))]


@pytest.mark.slow
def test_sharded_checkpoint_resumes_under_pp4_and_single(tmp_path):
  model = hkpipe.models.build(GPT)
  batch = helpers.token_batch(batch=8, seq=8, vocab=32, seed=4)

  # The reference: one device, 3 steps in a row.
  single = _pipeline(model, "single")
  state = single.init(KEY, batch)
  ref_losses = []
  for _ in range(3):
    state, metrics = single.train_step(state, batch)
    ref_losses.append(float(metrics["loss"]))

  # 2 steps sharded, then saved.
  mesh = jax.make_mesh((2, 2, 2), ("pp", "fsdp", "tp"))
  sharded = _pipeline(model, "mpmd", mesh,
                      sharding_rules=hkpipe.models.sharding_rules(GPT, fsdp_min_size=32))
  state = sharded.init(KEY, batch)
  embed = state.params[0]["embed"]["wte"]["embeddings"]
  assert not embed.sharding.is_fully_replicated            # really sharded inside the stage
  for step in range(2):
    state, metrics = sharded.train_step(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), ref_losses[step], rtol=1e-5)
  saved = sharded.to_canonical(state)
  saved_leaves = _leaves(saved)
  ckpt = train_lib.Checkpointer(tmp_path / "ckpt")
  ckpt.save(2, saved, {"step": 2})
  ckpt.wait()

  targets = {"mpmd pp4": _pipeline(model, "mpmd", jax.make_mesh((4,), ("pp",),
                                                                  devices=jax.devices()[:4])),
             "single": _pipeline(model, "single")}
  for name, pipe in targets.items():
    like = pipe.to_canonical(pipe.init(jax.random.key(99), batch))  # layout only
    canonical, meta = ckpt.restore(2, like)
    assert meta["step"] == 2
    restored = pipe.from_canonical(canonical, 2)
    for got, want in zip(_leaves(pipe.to_canonical(restored)), saved_leaves, strict=True):
      np.testing.assert_array_equal(got, want, err_msg=name)
    restored, metrics = pipe.train_step(restored, batch)
    np.testing.assert_allclose(float(metrics["loss"]), ref_losses[2], rtol=1e-5, err_msg=name)
    assert restored.step == 3
  ckpt.close()
