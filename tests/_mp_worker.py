r"""One process of a multi-process SPMD/pmap test (started by tests/test_multiprocess_spmd.py).

Run through the local launcher, which adds the distributed flags:

  python launch/local.py 2 --devices_per_process=2 --timeout=240 --script=tests/_mp_worker.py \
      -- --case=spmd_pp_across --out=DIR

Every process builds the same tiny tied GPT pipeline on a global mesh, feeds its own rows of each
global batch (``hkpipe.data.sample_batch(..., process_index, process_count)``), and writes what
it observes to ``DIR/p<process>.npz``: loss and canonical grads of ``loss_and_grads``, the metrics
of 2 SGD steps, the params after them (``pipe.params``), an eval loss, the tokens of
``Pipeline.generate`` (decoded on the stages' owners, where each rank lies in one process), the
params restored from an
orbax checkpoint saved by all processes, and loss and grads of a dropout variant. The test
compares every process's file with the single-process single-device reference (and the dropout
variant with the same layout run in one process).

Cases:
  spmd_dp_across   spmd, mesh pp=2 x dp=2 with dp across processes (each rank on both).
  spmd_pp_across   spmd, pp=2 x tp=2 with one rank per process, tensor parallel over the
                   process's 2 devices (the default Megatron rules; tp left to the compiler);
                   the checkpoint is also restored into a pmap pipeline over all 4 devices
                   (another layout), and a hand-made canonical tree with arrays on one
                   process's devices only is saved and restored.
  pmap_dp4         pmap over the 4 devices of both processes.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CASES = ("spmd_dp_across", "spmd_pp_across", "pmap_dp4")
BATCH, SEQ, VOCAB, M, LR, STEPS = 8, 8, 32, 2, 0.5, 2
DROPOUT = 0.3  # the dropout variant: its masks depend on which rows form which microbatch


def gpt_config(dropout: float = 0.0):
  """The test model: a tied GPT small enough to compile in seconds (embed, block_0, head)."""
  from hkpipe import models  # pylint: disable=g-import-not-at-top
  return models.GPTConfig(vocab_size=VOCAB, seq_len=SEQ, d_model=16, n_layers=1, n_heads=2,
                          dropout=dropout)


def tokens():
  """The token stream every batch is drawn from (the same in every process and in the test)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.random.default_rng(0).integers(0, VOCAB, 4000).astype(np.int32)


def batch(step: int, process_index: int = 0, process_count: int = 1):
  """Rows ``process_index`` of ``process_count`` of global batch ``step``."""
  from hkpipe import data  # pylint: disable=g-import-not-at-top
  return data.sample_batch(tokens(), batch_size=BATCH, seq_len=SEQ, seed=0, step=step,
                           process_index=process_index, process_count=process_count)


def flat(prefix: str, tree) -> dict:
  """``{prefix/path: numpy}`` of a pytree (the npz layout the test reads)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[prefix + jax.tree_util.keystr(path)] = np.asarray(jax.device_get(leaf))
  return out


def _pipeline(case: str, model, optimizer):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import hkpipe  # pylint: disable=g-import-not-at-top
  local = [jax.local_devices(process_index=p) for p in range(jax.process_count())]
  kw = dict(num_microbatches=M, donate=False)
  if case == "spmd_dp_across":  # row r = rank r = device r of every process
    grid = np.asarray([[local[0][r], local[1][r]] for r in range(2)], dtype=object)
    return hkpipe.Pipeline(model, optimizer, backend="spmd", schedule="1f1b",
                           mesh=jax.sharding.Mesh(grid, ("pp", "dp")), **kw)
  if case == "spmd_pp_across":  # rank p = process p's two devices, split over tp
    grid = np.asarray([local[0][:2], local[1][:2]], dtype=object)
    return hkpipe.Pipeline(model, optimizer, backend="spmd", schedule="1f1b",
                           mesh=jax.sharding.Mesh(grid, ("pp", "tp")), **kw)
  return hkpipe.Pipeline(model, optimizer, backend="pmap", **kw)  # all devices of all processes


def _partial_checkpoint(directory: str) -> dict:
  """Saves and restores a canonical-like tree whose leaves live on one process's devices only
  (as an MPMD stage's do): returns what this process observes."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top,g-multiple-import
  from hkpipe import train as train_lib  # pylint: disable=g-import-not-at-top
  me = jax.process_index()
  values = {"a": np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5,
            "b": np.arange(6, dtype=np.int32) * 7, "c": np.linspace(-1, 1, 8).astype(np.float32)}
  owner = {"a": 1, "b": 0, "c": None}  # None: replicated over every process's devices

  def array(name):
    if owner[name] is None:
      devices = [d for p in range(jax.process_count()) for d in jax.local_devices(process_index=p)]
    else:
      devices = jax.local_devices(process_index=owner[name])
    sharding = NamedSharding(Mesh(np.asarray(devices, dtype=object), ("x",)), P())
    value = values[name]
    shards = ([jax.device_put(value, d) for d in devices if d.process_index == me])
    return jax.make_array_from_single_device_arrays(value.shape, sharding, shards,
                                                    dtype=value.dtype)

  tree = {"params": {"a": array("a"), "c": array("c")}, "opt_state": {"count": array("b")},
          "rng": jax.random.key(7)}
  assert not tree["params"]["a"].addressable_shards or me == 1
  ckpt = train_lib.Checkpointer(directory)
  ckpt.save(5, tree, {"step": 5})
  ckpt.wait()
  like = {"params": {"a": array("a"), "c": array("c")}, "opt_state": {"count": array("b")},
          "rng": jax.random.key(0)}
  restored, meta = ckpt.restore(5, like)
  ckpt.close()
  out = {"partial/meta_step": np.asarray(meta["step"]),
         "partial/rng": np.asarray(jax.random.key_data(restored["rng"]))}
  wanted = {"a": like["params"]["a"], "c": like["params"]["c"], "b": like["opt_state"]["count"]}
  for name, leaf in (("a", restored["params"]["a"]), ("c", restored["params"]["c"]),
                     ("b", restored["opt_state"]["count"])):
    assert leaf.sharding == wanted[name].sharding, (name, leaf.sharding)
    out[f"partial/{name}/num_shards"] = np.asarray(len(leaf.addressable_shards))
    for i, shard in enumerate(leaf.addressable_shards):
      out[f"partial/{name}/shard{i}"] = np.asarray(shard.data)
  return out


PROMPT = ((3, 1, 4), (1, 5, 9))
SAMPLING = dict(max_new_tokens=4, temperature=1.0, top_k=8)  # with rng=jax.random.key(5)


def generate(pipe, state):
  """``(tokens, 1)`` of ``pipe.generate`` of PROMPT with every gather made to fail, where each
  rank lies in one process (stages decode on their owners, values cross by transfer); else
  ``(tokens of the gathered model, 0)`` after checking that ``pipe.generate`` refuses."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import hkpipe  # pylint: disable=g-import-not-at-top
  from hkpipe import models  # pylint: disable=g-import-not-at-top
  prompt, rng = np.asarray(PROMPT, np.int32), jax.random.key(5)
  if not pipe.decodes_in_place:
    try:
      pipe.generate(state, prompt, rng=rng, **SAMPLING)
      raise AssertionError("generate decoded a pipeline whose ranks span processes")
    except hkpipe.ConfigError as e:
      assert "Pipeline.generate" in str(e), e
    return np.asarray(models.generate(pipe.model, pipe.params(state), prompt, rng=rng,
                                      use_cache=True, **SAMPLING)), np.asarray(0)

  def no_gather(*args, **kwargs):
    raise AssertionError("decoding gathered the model")

  pipe.backend.params = pipe.backend.to_canonical = no_gather
  try:
    return np.asarray(pipe.generate(state, prompt, rng=rng, **SAMPLING)), np.asarray(1)
  finally:
    del pipe.backend.params, pipe.backend.to_canonical


def run(case: str, out_dir: str) -> None:
  """Runs ``case`` on this process and writes ``out_dir/p<process>.npz``."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from hkpipe import models  # pylint: disable=g-import-not-at-top
  from hkpipe import train as train_lib  # pylint: disable=g-import-not-at-top
  import hkpipe  # pylint: disable=g-import-not-at-top
  me, count = jax.process_index(), jax.process_count()
  model = models.build(gpt_config())
  pipe = _pipeline(case, model, optax.sgd(LR))
  local = lambda step: batch(step, me, count)
  state = pipe.init(jax.random.key(42), local(0))
  out = flat("init", pipe.params(state))
  loss, grads = pipe.loss_and_grads(state, local(0))
  out["loss"] = np.asarray(float(loss))
  out.update(flat("grads", grads))
  metrics = []
  for step in range(STEPS):
    state, m = pipe.train_step(state, local(step))
    metrics.append([float(m["loss"]), float(m["grad_norm"])])
  out["metrics"] = np.asarray(metrics)
  out["eval"] = np.asarray(float(pipe.eval_step(state, local(5))["loss"]))
  out.update(flat("params", pipe.params(state)))
  out["generated"], out["generate_in_place"] = generate(pipe, state)

  ckpt = train_lib.Checkpointer(os.path.join(out_dir, "ckpt"))
  ckpt.save(STEPS, pipe.to_canonical(state), {"step": STEPS})
  ckpt.wait()
  fresh = pipe.init(jax.random.key(0), local(0))
  restored, meta = ckpt.restore(ckpt.latest_step(), pipe.to_canonical(fresh))
  ckpt.close()
  again = pipe.from_canonical(restored, meta["step"])
  out.update(flat("restored", pipe.params(again)))
  out["restored_rng"] = np.asarray(jax.random.key_data(pipe.to_canonical(again)["rng"]
                                                       .addressable_data(0)))
  out["rng"] = np.asarray(jax.random.key_data(pipe.to_canonical(state)["rng"].addressable_data(0)))
  out["restored_eval"] = np.asarray(float(pipe.eval_step(again, local(5))["loss"]))

  # Dropout: keys follow (microbatch, replica), so the loss sees which global rows each process's
  # devices put in which microbatch; the test compares it with the same layout in one process.
  dropout = _pipeline(case, models.build(gpt_config(DROPOUT)), optax.sgd(LR))
  dloss, dgrads = dropout.loss_and_grads(dropout.init(jax.random.key(42), local(0)), local(0))
  out["dropout_loss"] = np.asarray(float(dloss))
  out.update(flat("dropout_grads", dgrads))

  if case == "spmd_pp_across":
    # The same checkpoint into another layout and backend: pmap over all 4 devices.
    other = hkpipe.Pipeline(model, optax.sgd(LR), backend="pmap", num_microbatches=M,
                            donate=False)
    target = other.to_canonical(other.init(jax.random.key(0), local(0)))
    ckpt = train_lib.Checkpointer(os.path.join(out_dir, "ckpt"))
    moved, _ = ckpt.restore(STEPS, target)
    ckpt.close()
    out.update(flat("other_layout", other.params(other.from_canonical(moved, STEPS))))
    out.update(_partial_checkpoint(os.path.join(out_dir, "partial_ckpt")))
  np.savez(os.path.join(out_dir, f"p{me}.npz"), **out)
  print(f"worker {me}/{count} {case}: done", flush=True)


def main(argv: list[str]) -> None:
  """Joins the 2-process run (flags from the launcher) and runs ``--case``."""
  parser = argparse.ArgumentParser()
  parser.add_argument("--case", choices=CASES, required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--coordinator_address", required=True)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--host_devices", type=int, default=2)
  args = parser.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", args.host_devices)
  from hkpipe._src import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(distributed.DistributedConfig(
      coordinator_address=args.coordinator_address, num_processes=args.num_processes,
      process_id=args.process_id))
  run(args.case, args.out)


if __name__ == "__main__":
  main(sys.argv[1:])
