"""One process of a multi-process MPMD test (started twice by tests/test_multiprocess_mpmd.py).

Usage (flags as ``launch/local.py`` passes them, plus the test's own):
  python tests/_mp_mpmd_worker.py --coordinator_address=127.0.0.1:P --num_processes=2 \
      --process_id=I --host_devices=2 --mode=MODE --out=DIR

Modes:
  pp2:   GPT (tied embedding/head) on 2 ranks, one per process; for schedules 1f1b and zbv:
         loss_and_grads, 2 SGD steps with clipping, eval, params, ``Pipeline.generate`` and the
         trainer's stage-by-stage evaluation (no gather: stages run on their owners); then an orbax checkpoint of the 1f1b state saved
         from both processes and restored into a fresh pipeline.
  pp2dp2: the same model on a (pp=2, dp=2) mesh, each rank's 2 devices on one process (1f1b).
  pp2fsdp2: the same on a (pp=2, fsdp=2) mesh: parameters and optimizer state sharded over each
         process's 2 devices (1f1b).
  kill:  trains pp=2 1f1b until killed, writing DIR/steps_pI (the number of finished steps).
  deep:  a wider GPT (deep_model) on the (pp=2, dp=2) mesh with DEEP_M = 32 microbatches, whose
         host dispatch runs far ahead of its devices: before the driver waited for pulled data
         on the host, every run stopped for good here (see hkpipe/_src/backends/mpmd/_interp.py).
  nan:   helpers.float_model on 2 ranks, one per process, Adam without clipping: a finite step,
         a NaN-input step, an inf-loss step (both skipped), a finite step.

Results go to DIR/<name>_pI.npz (flattened canonical trees, keys "params/<layer>/<...>").
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position

import hkpipe  # pylint: disable=g-import-not-at-top,wrong-import-position
from hkpipe import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from hkpipe._src import checkpoint  # pylint: disable=g-import-not-at-top,wrong-import-position
from hkpipe._src import distributed  # pylint: disable=g-import-not-at-top,wrong-import-position
from hkpipe._src import staged_eval  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests import helpers  # pylint: disable=g-import-not-at-top,wrong-import-position


def _parse(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser()
  parser.add_argument("--coordinator_address", required=True)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--host_devices", type=int, default=2)
  parser.add_argument("--mode", required=True, choices=("pp2", "pp2dp2", "pp2fsdp2", "kill",
                                                               "nan", "deep"))
  parser.add_argument("--out", required=True)
  return parser.parse_args(argv)


# Shared with the test (the reference must use exactly these).
M, LR, MAX_NORM, STEPS, SEED = 4, 0.5, 0.05, 2, 42
NAN_M, NAN_LR = 2, 1e-2   # mode "nan"
STALL_S = 200             # a mode takes 15-60 s; past this the worker prints stacks and exits


def model() -> hkpipe.SequentialModel:
  """GPT with tied embedding and head: embed, block_0, block_1, head."""
  return models.build(models.GPTConfig(vocab_size=32, seq_len=8, d_model=16, n_layers=2,
                                       n_heads=2))


DEEP_M, DEEP_T = 32, 32


def deep_model() -> hkpipe.SequentialModel:
  """A GPT whose steps take longer than their dispatch (mode "deep")."""
  return models.build(models.GPTConfig(vocab_size=32, seq_len=DEEP_T, d_model=128, n_layers=2,
                                       n_heads=2))


def deep_batch(step: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(200 + step)
  return tuple(rng.integers(0, 32, (2 * DEEP_M, DEEP_T), dtype=np.int32) for _ in range(2))


def batch(step: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(100 + step)
  x = rng.integers(0, 32, (8, 8), dtype=np.int32)
  y = rng.integers(0, 32, (8, 8), dtype=np.int32)
  return x, y


def flat(tree, prefix: str) -> dict:
  """``{"prefix/a/b": np.ndarray}`` of a nested dict of arrays."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    out[f"{prefix}/{name}"] = np.asarray(leaf)
  return out


def log(*args) -> None:
  print(f"[worker p{jax.process_index()}]", *args, flush=True)


def run_pipeline(pipe: hkpipe.Pipeline) -> tuple[dict, hkpipe.TrainState]:
  """Every driver call the test checks; returns the results and the final state."""
  state = pipe.init(jax.random.key(SEED), batch(0))
  res = flat(pipe.params(state), "init")
  loss, grads = pipe.loss_and_grads(state, batch(0))
  res["loss"] = np.asarray(float(loss))
  res.update(flat(grads, "grads"))
  losses, norms = [], []
  for step in range(STEPS):
    state, metrics = pipe.train_step(state, batch(step))
    losses.append(float(metrics["loss"]))
    norms.append(float(metrics["grad_norm"]))
  res["losses"], res["norms"] = np.asarray(losses), np.asarray(norms)
  res["eval"] = np.asarray(float(pipe.eval_step(state, batch(5))["loss"]))
  res.update(flat(pipe.params(state), "params"))
  res["generated"] = generate(pipe, state)
  res["staged_loss"] = staged_loss(pipe, state)
  return res, state


def staged_loss(pipe: hkpipe.Pipeline, state: hkpipe.TrainState) -> np.ndarray:
  """The loss of batch(5) by the trainer's stage-by-stage evaluation (``staged_eval``: each stage
  runs on its owner, activations and extra outputs cross by transfer), with every gather made to
  fail. Checks here that each stage's extra output (its outputs' mean) reached this process and
  that the last one equals the mean of the walk's outputs."""
  def no_gather(*args, **kwargs):
    raise AssertionError("the staged evaluation gathered the model")

  apply = staged_eval.apply_fn(pipe.model)

  def stage(names, params, x):
    y, _ = apply(names, params, x)
    return y, jnp.mean(y)

  x, y = batch(5)
  pipe.backend.params = pipe.backend.to_canonical = no_gather
  try:
    staged = staged_eval.stages(pipe, state)
    outputs, extras = staged_eval.walk(staged, stage, x)
    loss = staged_eval.on_last(staged, jax.jit(lambda o, x, y: pipe.model.loss_fn(o, y)), outputs,
                               (x, y))
    mean = staged_eval.on_last(staged, jax.jit(lambda o, x, y: jnp.mean(o)), outputs, (x, y))
  finally:
    del pipe.backend.params, pipe.backend.to_canonical
  assert len(extras) == len(staged.layer_names), extras
  np.testing.assert_allclose(np.asarray(extras[-1]), mean, rtol=1e-6)
  return np.asarray(loss)


PROMPT = np.asarray([[3, 1, 4], [1, 5, 9]], np.int32)


def generate(pipe: hkpipe.Pipeline, state: hkpipe.TrainState) -> np.ndarray:
  """``pipe.generate`` of PROMPT (KV cache, sampled), with every gather made to fail: across
  processes each stage decodes on its owner and activations and tokens cross by transfer."""
  def no_gather(*args, **kwargs):
    raise AssertionError("decoding gathered the model")

  pipe.backend.params = pipe.backend.to_canonical = no_gather
  try:
    return np.asarray(pipe.generate(state, PROMPT, max_new_tokens=4, rng=jax.random.key(5),
                                    temperature=1.0, top_k=8, num_groups=2))
  finally:
    del pipe.backend.params, pipe.backend.to_canonical


def assert_compiled_only_own_stages(pipe: hkpipe.Pipeline) -> None:
  """Every program this process compiled (or cloned) runs on its own devices only."""
  me = jax.process_index()
  placed = [devs for variants in pipe.backend.cache._by_key.values() for devs in variants]  # pylint: disable=protected-access
  assert placed and all(d.process_index == me for devs in placed for d in devs), placed


def pipeline(**kw) -> hkpipe.Pipeline:
  return hkpipe.Pipeline(model(), optax.sgd(LR), backend="mpmd", num_microbatches=M,
                         max_grad_norm=MAX_NORM, **kw)


def tracked(pipes: list, pipe: hkpipe.Pipeline) -> hkpipe.Pipeline:
  pipes.append(pipe)
  return pipe


def main(argv: list[str]) -> None:
  args = _parse(argv)
  # Before anything touches a device: simulated CPU devices, then the multi-process runtime.
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", args.host_devices)
  distributed.initialize(distributed.DistributedConfig(
      coordinator_address=args.coordinator_address, num_processes=args.num_processes,
      process_id=args.process_id))
  t0 = time.time()
  me = jax.process_index()
  pipes: list = []          # every pipeline this process built (the stall report reads them)

  def where() -> str:
    if not pipes:
      return "no pipeline built yet"
    progress = pipes[-1].backend.progress
    return f"last instruction: {progress.op}; awaiting: {progress.awaiting}"

  helpers.exit_with_stacks_after(STALL_S, where)

  def save(name: str, res: dict) -> None:
    np.savez(os.path.join(args.out, f"{name}_p{me}.npz"), **res)

  if args.mode == "pp2":
    for schedule in ("1f1b", "zbv"):
      pipe = tracked(pipes, pipeline(schedule=schedule, num_ranks=2))
      res, state = run_pipeline(pipe)
      assert_compiled_only_own_stages(pipe)
      ranks = [d.process_index for d in pipe.layout.device_grid[:, 0]]
      assert ranks == [0, 1], ranks                       # default: ranks in process order
      save(schedule, res)
      log(schedule, "done", f"{time.time() - t0:.1f}s")
      if schedule == "1f1b":
        ckpt = checkpoint.Checkpointer(os.path.join(args.out, "ckpt"))
        ckpt.save(STEPS, pipe.to_canonical(state), {"step": STEPS})
        ckpt.wait()
        fresh = tracked(pipes, pipeline(schedule="1f1b", num_ranks=2))
        other = fresh.init(jax.random.key(SEED + 1), batch(0))
        restored, meta = ckpt.restore(STEPS, fresh.to_canonical(other))
        back = fresh.from_canonical(restored, meta["step"])
        res = flat(fresh.params(back), "params")
        state2, metrics = fresh.train_step(back, batch(STEPS))
        res["next_loss"] = np.asarray(float(metrics["loss"]))
        res.update(flat(fresh.params(state2), "next"))
        save("restored", res)
        ckpt.close()
        log("checkpoint done", f"{time.time() - t0:.1f}s")
  elif args.mode == "pp2dp2":
    grid = np.asarray([jax.local_devices(process_index=p) for p in range(2)], dtype=object)
    mesh = jax.sharding.Mesh(grid, ("pp", "dp"))
    pipe = tracked(pipes, pipeline(schedule="1f1b", mesh=mesh))
    res, _ = run_pipeline(pipe)
    assert_compiled_only_own_stages(pipe)
    save("dp", res)
    log("pp2dp2 done", f"{time.time() - t0:.1f}s")
  elif args.mode == "pp2fsdp2":
    grid = np.asarray([jax.local_devices(process_index=p) for p in range(2)], dtype=object)
    mesh = jax.sharding.Mesh(grid, ("pp", "fsdp"))
    pipe = tracked(pipes, pipeline(schedule="1f1b", mesh=mesh,
                                   sharding_rules=hkpipe.sharding.Rules(fsdp_min_size=32)))
    res, state = run_pipeline(pipe)
    assert_compiled_only_own_stages(pipe)
    own = [s for s in state.params if jax.tree.leaves(s)[0].is_fully_addressable]
    w_in = [p["mlp"]["w_in"] for stage in own for name, p in stage.items() if "block" in name]
    assert w_in and all(not w.sharding.is_fully_replicated and len(w.sharding.device_set) == 2
                        for w in w_in), [w.sharding for w in w_in]
    save("fsdp", res)
    log("pp2fsdp2 done", f"{time.time() - t0:.1f}s")
  elif args.mode == "deep":
    grid = np.asarray([jax.local_devices(process_index=p) for p in range(2)], dtype=object)
    pipe = tracked(pipes, hkpipe.Pipeline(
        deep_model(), optax.sgd(LR), backend="mpmd", num_microbatches=DEEP_M, schedule="1f1b",
        mesh=jax.sharding.Mesh(grid, ("pp", "dp"))))
    state = pipe.init(jax.random.key(SEED), deep_batch(0))
    losses = []
    for step in range(STEPS):
      state, metrics = pipe.train_step(state, deep_batch(step))
      losses.append(metrics["loss"])          # read after both steps: dispatch runs ahead
    save("deep", {"losses": np.asarray([float(x) for x in losses])})
    log("deep done", f"{time.time() - t0:.1f}s")
  elif args.mode == "nan":
    pipe = tracked(pipes, hkpipe.Pipeline(helpers.float_model(), optax.adam(NAN_LR),
                                          backend="mpmd", num_microbatches=NAN_M, num_ranks=2))
    batches = helpers.float_batches()
    state = pipe.init(jax.random.key(SEED), batches[0])
    res = flat(pipe.params(state), "init")
    skipped = []
    for i, b in enumerate(batches):
      state, metrics = pipe.train_step(state, b)
      skipped.append(float(metrics["skipped"]))
      if i in (0, 2):   # before and after the two bad steps
        res.update(flat(pipe.params(state), f"after{i + 1}"))
    res["skipped"], res["steps"] = np.asarray(skipped), np.asarray(state.step)
    res.update(flat(pipe.params(state), "final"))
    save("nan", res)
    log("nan done", f"{time.time() - t0:.1f}s")
  else:  # kill: train until the test kills a process
    pipe = tracked(pipes, pipeline(schedule="1f1b", num_ranks=2))
    state = pipe.init(jax.random.key(SEED), batch(0))
    step_file = os.path.join(args.out, f"steps_p{me}")
    for step in range(100_000):
      state, metrics = pipe.train_step(state, batch(step % 4))
      float(metrics["loss"])
      with open(step_file + ".tmp", "w") as f:
        f.write(str(step + 1))
      os.replace(step_file + ".tmp", step_file)


if __name__ == "__main__":
  main(sys.argv[1:])
