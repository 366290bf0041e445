"""Where the SPMD state lives: bytes per device after ``init`` and in ``to_canonical``'s output.

Usage::

  python benchmarks/spmd_state_bytes.py            # backends_bench.py's GPT, AdamW, pp=4

Measured on the devices: per device, the bytes of every live array's shard (a buffer shared by
several arrays counted once), after ``init`` and after ``to_canonical`` (minus before); and, where
the backend offers it (``SpmdBackend.init_memory_analysis``), each rank's compiled init program's
output + temp bytes. "whole" is the model's params + AdamW state from ``jax.eval_shape``.
"""

from __future__ import annotations

import collections
import gc
import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402
import optax  # noqa: E402

import hkpipe  # noqa: E402
from hkpipe import models  # noqa: E402


def per_device() -> collections.Counter:
  gc.collect()
  out: collections.Counter = collections.Counter()
  seen = set()
  for a in jax.live_arrays():
    for shard in a.addressable_shards:
      key = (shard.device.id, shard.data.unsafe_buffer_pointer())
      if key not in seen:
        seen.add(key)
        out[shard.device.id] += shard.data.nbytes
  return out


def main() -> None:
  config = models.GPTConfig(vocab_size=256, seq_len=64, d_model=256, n_layers=8, n_heads=4)
  model, opt = models.build(config), optax.adamw(3e-4)
  tokens = np.random.default_rng(0).integers(0, 256, (32, 64), dtype=np.int32)
  batch = (tokens, tokens)
  avals = jax.eval_shape(model.init, jax.random.key(0), tokens[:4])
  nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))
  whole = nbytes(avals) + nbytes(jax.eval_shape(opt.init, avals))
  mib = lambda b: f"{b / 2**20:.2f}"
  print(f"hkpipe: {hkpipe.__file__}\nwhole state (params + AdamW): {mib(whole)} MiB")
  # What an init on one device holds there at once: the outputs of jit(model.init) and
  # jit(optimizer.init) (the spmd backend's init before issue 12).
  one = jax.jit(model.init).lower(jax.random.key(0), tokens[:4]).compile().memory_analysis()
  opt_one = jax.jit(opt.init).lower(avals).compile().memory_analysis()
  print("init on one device, output MiB (params, optimizer):",
        mib(one.output_size_in_bytes), mib(opt_one.output_size_in_bytes))
  pipe = hkpipe.Pipeline(model, opt, backend="spmd", num_microbatches=8, schedule="1f1b",
                         devices=jax.devices()[:4])
  before = per_device()
  state = jax.block_until_ready(pipe.init(jax.random.key(0), batch))
  after = per_device()
  print("after init, MiB per device:", [mib(after[d] - before[d]) for d in range(4)])
  analyse = getattr(pipe.backend, "init_memory_analysis", None)
  if analyse is not None:
    peaks = [a.output_size_in_bytes + a.temp_size_in_bytes
             for a in analyse(jax.random.key(0), batch)]
    print("init programs, output + temp MiB per rank:", [mib(p) for p in peaks])
  before = per_device()
  canonical = jax.block_until_ready(pipe.to_canonical(state))
  after = per_device()
  print("to_canonical, MiB per device:", [mib(after[d] - before[d]) for d in range(4)])
  del canonical


if __name__ == "__main__":
  main()
