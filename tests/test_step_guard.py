"""The non-finite step guard on every backend, its host-side counter, and the training loop's stop.

Each backend runs: a finite step, a step whose inputs hold a NaN (loss and gradients NaN), a step
whose loss alone is infinite (an infinite target term that no parameter depends on: the gradients
stay finite), then a finite step. The two bad steps must leave parameters and optimizer state
bit-identical, advance ``state.step`` and set ``metrics["skipped"]``; the final parameters and
optimizer state must equal a plain-JAX reference (``jax.grad`` of the model's loss and optax:
``helpers.adam_reference``) that applied only the two finite batches.
"""

from __future__ import annotations

import json
import pathlib
import sys

import chex
import jax
import numpy as np
import optax
import pytest

import hkpipe
from hkpipe import train as train_lib
from hkpipe._src import step_guard
from hkpipe._src import trainer as trainer_lib
from hkpipe._src.errors import ConfigError
from tests import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import shakespeare_gpt  # pylint: disable=wrong-import-position

M = 2              # microbatches
LR = 1e-2          # Adam: its state (mu, nu, count) must stay untouched by a skipped step


def _pipeline(backend: str, max_grad_norm=None, **kw) -> hkpipe.Pipeline:
  devices = jax.devices()
  if backend == "pmap":
    kw["devices"] = devices[:2]
  elif backend == "spmd":    # pp=2 x dp=2: the NaN row reaches one dp replica only
    kw["mesh"] = jax.make_mesh((2, 2), ("pp", "dp"), devices=devices[:4])
  elif backend == "mpmd":
    kw["devices"] = devices[:2]
  return hkpipe.Pipeline(helpers.float_model(), optax.adam(LR), backend=backend,
                         num_microbatches=M, max_grad_norm=max_grad_norm,
                         **kw)  # donate=True (the default)


def _host_state(pipe, state):
  canonical = pipe.to_canonical(state)
  return jax.device_get({"params": canonical["params"], "opt_state": canonical["opt_state"]})


@pytest.mark.parametrize("backend,max_grad_norm", [
    ("single", None), ("pmap", None), ("spmd", 0.3), ("mpmd", None), ("mpmd", 0.3)])
def test_nonfinite_steps_are_skipped_bit_identically(backend, max_grad_norm):
  good_a, nan_in, inf_loss, good_b = helpers.float_batches()
  pipe = _pipeline(backend, max_grad_norm)
  state = pipe.init(jax.random.key(0), good_a)
  init_params = jax.device_get(pipe.params(state))
  state, metrics = pipe.train_step(state, good_a)
  assert float(metrics["skipped"]) == 0.0
  for bad, loss_only in ((nan_in, False), (inf_loss, True)):
    before, step = _host_state(pipe, state), state.step
    state, metrics = pipe.train_step(state, bad)
    assert float(metrics["skipped"]) == 1.0
    assert state.step == step + 1
    assert not np.isfinite(float(metrics["loss"]))
    assert np.isfinite(float(metrics["grad_norm"])) == loss_only
    chex.assert_trees_all_equal(_host_state(pipe, state), before)  # exact, bit for bit
  state, metrics = pipe.train_step(state, good_b)
  assert float(metrics["skipped"]) == 0.0 and state.step == 4
  ref_params, ref_opt = helpers.adam_reference(pipe.model, init_params, [good_a, good_b],
                                               num_microbatches=M, lr=LR,
                                               max_grad_norm=max_grad_norm)
  got = _host_state(pipe, state)
  helpers.assert_trees_close(got["params"], ref_params)
  helpers.assert_trees_close(got["opt_state"], ref_opt)
  if max_grad_norm is not None:  # the clip was active, so the reference checks it too
    assert float(metrics["grad_norm"]) > max_grad_norm


def test_without_the_guard_nan_reaches_the_parameters():
  """Negative control: with skip_nonfinite=False the NaN step is applied (and not flagged)."""
  good_a, nan_in, _, _ = helpers.float_batches()
  pipe = _pipeline("single", skip_nonfinite=False)
  state = pipe.init(jax.random.key(0), good_a)
  state, metrics = pipe.train_step(state, nan_in)
  assert float(metrics["skipped"]) == 0.0
  assert not all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(pipe.params(state))))


def test_mpmd_without_guard_or_clip_fuses_finalize_into_update_and_matches():
  """skip_nonfinite=False, no clipping: each stage updates as soon as its backward is done (no
  separate finalize program); the results still equal the reference."""
  good_a, _, _, good_b = helpers.float_batches()
  pipe = _pipeline("mpmd", skip_nonfinite=False)
  state = pipe.init(jax.random.key(0), good_a)
  init_params = jax.device_get(pipe.params(state))
  for batch in (good_a, good_b):
    state, metrics = pipe.train_step(state, batch)
    assert float(metrics["skipped"]) == 0.0
  setup = next(iter(pipe.backend._setups.values()))  # pylint: disable=protected-access
  assert setup._families["train"].programs["finalize"] is None  # pylint: disable=protected-access
  ref_params, ref_opt = helpers.adam_reference(pipe.model, init_params, [good_a, good_b],
                                               num_microbatches=M, lr=LR)
  got = _host_state(pipe, state)
  helpers.assert_trees_close(got["params"], ref_params)
  helpers.assert_trees_close(got["opt_state"], ref_opt)


def test_bad_skip_option_raises():
  with pytest.raises(ConfigError, match="skip_nonfinite must be True or False, got 'yes'"):
    hkpipe.Pipeline(helpers.float_model(), optax.adam(LR), skip_nonfinite="yes")


# -- the host-side counter and the training loop ------------------------------------------------


def test_skip_counter_reads_late_and_stops_at_the_limit():
  counter = step_guard.SkipCounter(3, checkpoints="/ck")
  flags = {1: 0.0, 2: 1.0, 3: 1.0, 4: 0.0, 5: 1.0, 6: 1.0, 7: 1.0, 8: 0.0}
  for step in range(1, 7):
    counter.push(step, np.float32(flags[step]))
    assert counter.settle(keep_newest=True) is None    # the newest flag stays unread
  assert (counter.total, counter.consecutive) == (3, 1)  # steps 2, 3, 5 read; 6 pending
  counter.push(7, np.float32(flags[7]))
  error = counter.settle()
  assert isinstance(error, step_guard.NonFiniteStepsError)
  assert isinstance(error, FloatingPointError)
  message = str(error)
  for part in ("stopped at step 7", "3 steps in a row (steps 5..7)", "after step 4",
               "5 skipped steps", "config.max_consecutive_skips=3", "learning rate",
               "check the training data", "checkpoint in /ck"):
    assert part in message, (part, message)


@pytest.mark.parametrize("bad", [0, -1, True, None])
def test_bad_max_consecutive_skips_are_config_errors(bad):
  config = _train_config("unused", max_consecutive_skips=bad)
  with pytest.raises(ConfigError, match=rf"config\.max_consecutive_skips={bad!r} must be an int "
                     r">= 1; .*non-finite loss.*use e\.g\. 5"):
    train_lib.validate_config(config)


def _train_config(data_dir, **overrides):
  c = shakespeare_gpt.get_config("runlocal")
  c.data.dir = data_dir
  c.sample_tokens = 0
  for k, v in overrides.items():
    c[k] = v
  return c


def test_bad_max_consecutive_skips_raises_before_anything_runs(tmp_path):
  config = _train_config(str(tmp_path / "no_data"), max_consecutive_skips=0)
  with pytest.raises(ConfigError,
                     match=r"max_consecutive_skips=0 must be an int >= 1; .*use e\.g\. 5"):
    train_lib.train(config, tmp_path / "run")
  assert not (tmp_path / "run").exists() and not (tmp_path / "no_data").exists()


def test_training_stops_after_consecutive_skips_without_checkpointing_them(tmp_path):
  """A learning rate of 1e38 takes step 2 (lr 0 at step 1: warmup) to parameters whose loss is
  NaN: steps 3.. are all skipped. With a limit of 3 the run stops at step 5 (read late, while
  step 6 runs, since step 5 is neither logged nor checkpointed), keeps the checkpoints of steps
  2 and 4 (after fewer than 3 skips) and writes none after."""
  data_dir = tmp_path / "data"
  hkpipe.data.prepare(data_dir)
  config = _train_config(str(data_dir), num_steps=10, log_every=4, eval_every=0,
                         checkpoint_every=2, max_consecutive_skips=3)
  config.optim.learning_rate = 1e38
  config.optim.warmup_steps = 1
  work = tmp_path / "run"
  with pytest.raises(train_lib.NonFiniteStepsError) as info:
    train_lib.train(config, work)
  message = str(info.value)
  assert "Training stopped at step 5: 3 steps in a row (steps 3..5)" in message, message
  assert "config.optim.learning_rate" in message and str(work / "checkpoints") in message
  assert sorted(int(p.name) for p in (work / "checkpoints").iterdir()) == [2, 4]
  records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
  by_step = {r["step"]: r for r in records}
  assert sorted(by_step) == [1, 4]
  assert by_step[1]["skipped_steps"] == 0 and np.isfinite(by_step[1]["loss"])
  assert by_step[4]["skipped_steps"] == 2 and np.isnan(by_step[4]["loss"])
  # The checkpoint of step 4 holds step 2's state, bit for bit (steps 3 and 4 were skipped).
  pipe = hkpipe.Pipeline(hkpipe.models.build(train_lib.model_config(config)),
                         train_lib.adamw(trainer_lib.optimizer_config(config)))
  tokens = np.zeros((config.batch_size, config.model.seq_len), np.int32)
  like = pipe.to_canonical(pipe.init(jax.random.key(0), (tokens, tokens)))
  ckpt = train_lib.Checkpointer(work / "checkpoints")
  (at2, _), (at4, meta4) = ckpt.restore(2, like), ckpt.restore(4, like)
  ckpt.close()
  assert meta4["step"] == 4
  chex.assert_trees_all_equal(jax.device_get((at4["params"], at4["opt_state"])),
                              jax.device_get((at2["params"], at2["opt_state"])))
